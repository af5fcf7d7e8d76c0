/* stage/npy.c — see npy.h. */
#include "stage/npy.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int npy_write_f32(const char *path, const float *data, int ndim, const int64_t *shape, char *err,
                  size_t errlen)
{
    char dict[256];
    int n = snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (");
    size_t count = 1;
    for (int i = 0; i < ndim; i++) {
        n += snprintf(dict + n, sizeof dict - (size_t)n, "%lld,%s", (long long)shape[i],
                      (i + 1 < ndim) ? " " : "");
        count *= (size_t)shape[i];
    }
    n += snprintf(dict + n, sizeof dict - (size_t)n, "), }");
    /* magic(6) + version(2) + len(2) + dict + padding + '\n' is a multiple of 64 */
    size_t total = 10 + (size_t)n + 1;
    size_t pad = (64 - total % 64) % 64;
    FILE *f = fopen(path, "wb");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    unsigned hl = (unsigned)(n + pad + 1);
    unsigned char pre[10] = {
        0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hl & 0xff), (unsigned char)(hl >> 8)};
    int ok = fwrite(pre, 1, 10, f) == 10 && fwrite(dict, 1, (size_t)n, f) == (size_t)n;
    for (size_t i = 0; ok && i < pad; i++) ok = fputc(' ', f) != EOF;
    ok = ok && fputc('\n', f) != EOF;
    ok = ok && fwrite(data, sizeof(float), count, f) == count; /* x86/ARM: little-endian */
    ok = (fclose(f) == 0) && ok;
    if (!ok) {
        snprintf(err, errlen, "%s: write failed", path);
        return -1;
    }
    return 0;
}

int npy_read_f32(const char *path, float **data, int *ndim, int64_t shape[8], char *err,
                 size_t errlen)
{
    *data = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    unsigned char pre[10];
    char hdr[4096];
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) || pre[6] != 1) {
        snprintf(err, errlen, "%s: not a version 1 .npy file", path);
        fclose(f);
        return -1;
    }
    size_t hl = (size_t)pre[8] | ((size_t)pre[9] << 8);
    if (hl >= sizeof hdr || fread(hdr, 1, hl, f) != hl) {
        snprintf(err, errlen, "%s: truncated header", path);
        fclose(f);
        return -1;
    }
    hdr[hl] = 0;
    const char *sh = strstr(hdr, "'shape': (");
    if (!strstr(hdr, "'<f4'") || !strstr(hdr, "'fortran_order': False") || !sh) {
        snprintf(err, errlen, "%s: only C-order '<f4' arrays are supported", path);
        fclose(f);
        return -1;
    }
    sh += strlen("'shape': (");
    *ndim = 0;
    size_t count = 1;
    while (*sh && *sh != ')' && *ndim < 8) {
        char *end;
        long long v = strtoll(sh, &end, 10);
        if (end == sh) break;
        shape[(*ndim)++] = v;
        count *= (size_t)v;
        sh = end;
        while (*sh == ',' || *sh == ' ') sh++;
    }
    float *d = malloc(count ? count * sizeof(float) : 1);
    if (!d || fread(d, sizeof(float), count, f) != count) {
        snprintf(err, errlen, "%s: truncated data (%zu floats expected)", path, count);
        free(d);
        fclose(f);
        return -1;
    }
    fclose(f);
    *data = d;
    return 0;
}
