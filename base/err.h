/* base/err.h — small helpers shared by the cluster module's parsers. */
#ifndef BASE_ERR_H
#define BASE_ERR_H

#include <stddef.h>

/* printf into a caller's error buffer (err may be NULL or errlen 0: then nothing). */
void base_set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
