/* cli/files.h — small file-system helpers of the commands that write model directories
 * (router-tune, quantize).
 *
 * Errors: -1 with "cannot create PATH: reason" / "cannot read PATH" / "cannot write PATH:
 * reason" in err; 0 on success. (Reading a whole file: base/file.h.) Single-threaded, no global state.
 */
#ifndef CLI_FILES_H
#define CLI_FILES_H

#include <stddef.h>

int cli_mkdir_p(const char *dir, char *err, size_t errlen); /* like mkdir -p */
int cli_file_exists(const char *path);                      /* 1: a regular file */
int cli_write_text(const char *path, const char *text, char *err, size_t errlen);
int cli_copy_file(const char *src, const char *dst, char *err, size_t errlen);
/* The tokenizer and generation files of model dir src (tokenizer.json, tokenizer_config.json,
 * special_tokens_map.json, generation_config.json, tokenizer.model: those present) into dst. */
int cli_copy_side_files(const char *src, const char *dst, char *err, size_t errlen);

#endif
