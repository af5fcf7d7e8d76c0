/* base/file.h — a whole file into memory.
 *
 * base_read_file reads `path` (a regular file, or a pipe / character device: read until EOF)
 * into a malloc'd buffer with a NUL after the last byte; *len (may be NULL) gets the byte
 * count (the file may itself hold NULs). max > 0: a file larger than max bytes is an error.
 * Errors: NULL and one line in err: "PATH: <strerror>" (cannot open), "PATH: a directory",
 * "PATH: larger than MAX bytes", "PATH: out of memory", "PATH: read error: <strerror>".
 * Ownership: the caller frees the buffer. Threads: none shared.
 */
#ifndef BASE_FILE_H
#define BASE_FILE_H

#include <stddef.h>

char *base_read_file(const char *path, size_t max, size_t *len, char *err, size_t errlen);

#endif
