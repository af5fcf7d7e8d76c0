/* base/file.c — see base/file.h. */
#include "base/file.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/err.h"

char *base_read_file(const char *path, size_t max, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        base_set_err(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    size_t cap = 65536; /* a regular file: its size (+1 to see EOF in one more read) */
    if (fstat(fileno(f), &st) == 0) {
        if (S_ISDIR(st.st_mode)) {
            base_set_err(err, errlen, "%s: a directory", path);
            fclose(f);
            return NULL;
        }
        if (S_ISREG(st.st_mode)) cap = (size_t)st.st_size + 1;
    }
    size_t n = 0;
    char *buf = malloc(cap + 1);
    const char *bad = buf ? NULL : "out of memory";
    while (!bad) {
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (max > 0 && n > max) {
            bad = "larger";
            break;
        }
        if (n < cap) break; /* EOF or an error */
        char *nb = realloc(buf, 2 * cap + 1);
        if (!nb) {
            bad = "out of memory";
            break;
        }
        buf = nb;
        cap *= 2;
    }
    if (!bad && ferror(f)) bad = "read error";
    fclose(f);
    if (bad) {
        if (!strcmp(bad, "larger"))
            base_set_err(err, errlen, "%s: larger than %zu bytes", path, max);
        else if (!strcmp(bad, "read error"))
            base_set_err(err, errlen, "%s: read error: %s", path, strerror(errno));
        else
            base_set_err(err, errlen, "%s: %s", path, bad);
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}
