/* base/err.h — small helpers for error and report messages, shared by every layer. */
#ifndef BASE_ERR_H
#define BASE_ERR_H

#include <stddef.h>

/* printf into a caller's error buffer (err may be NULL or errlen 0: then nothing). */
void base_set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* b bytes as "1.50 GiB", "20.00 MiB", "4.1 KiB" or "100 B" into out [n]. */
void base_human_bytes(double b, char *out, size_t n);

#endif
