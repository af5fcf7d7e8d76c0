/* stage/safetensors_impl.h — what the safetensors reader (safetensors.c) and writer
 * (safetensors_write.c) share; not for use outside these two files.
 *
 * Strings returned by st_strdup / st_path_join are malloc'd (the caller frees; NULL when out of
 * memory). No errors are reported through err here: callers name the file.
 */
#ifndef STAGE_SAFETENSORS_IMPL_H
#define STAGE_SAFETENSORS_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "stage/dtype.h"
#include "stage/safetensors.h"

/* Offsets and dims are JSON numbers (doubles): integers above 2^53 cannot be exact. */
#define ST_MAX_JSON_INT 9007199254740992.0
/* An index file is a name -> file map; anything larger than this is not one. */
#define ST_MAX_INDEX_BYTES (1L << 30)

#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"

char *st_strdup(const char *s);
char *st_path_join(const char *dir, const char *name); /* "dir/name" */
int st_is_regular_file(const char *path);
void st_write_le64(uint8_t *p, uint64_t v);
/* The header's name of a dtype ("F32", "BF16", ...; "I8" for the q of a Q8_0 matrix), and the
 * bytes of one element in the file (1 for Q8_0's q). */
const char *st_dtype_header_name(stage_dtype d);
size_t st_file_esize(stage_dtype d);
/* Where tensor `name` (found by st_find, its bytes at `data`) starts in its file. */
int64_t st_file_offset(st_model *m, const char *name, const void *data);

#endif
