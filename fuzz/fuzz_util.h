/* fuzz/fuzz_util.h — checks shared by the libFuzzer targets (header-only; each target is its
 * own binary). FUZZ_CHECK aborts, so libFuzzer reports the input as a crash. */
#ifndef FUZZ_FUZZ_UTIL_H
#define FUZZ_FUZZ_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tok/tok.h"

#define FUZZ_CHECK(c)                                                                              \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c);                  \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static inline int fuzz_utf8_ok(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        int k = c < 0x80                   ? 0
                : (c >= 0xC2 && c <= 0xDF) ? 1
                : (c >= 0xE0 && c <= 0xEF) ? 2
                : (c >= 0xF0 && c <= 0xF4) ? 3
                                           : -1;
        if (k < 0 || i + (size_t)k >= n) return 0;
        unsigned lo = 0x80, hi = 0xBF;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
        if (k > 0 && (u[i + 1] < lo || u[i + 1] > hi)) return 0;
        for (int j = 2; j <= k; j++)
            if ((u[i + j] & 0xC0) != 0x80) return 0;
        i += (size_t)k + 1;
    }
    return 1;
}

/* tok_decode of ids (must succeed when must_ok) is valid UTF-8, and streaming the ids one at
 * a time gives whole characters each time and the same text; for both skip_special values. */
static inline void fuzz_check_decode(const tok_tokenizer *t, const int32_t *ids, int n, int must_ok)
{
    char err[512];
    for (int skip = 0; skip < 2; skip++) {
        char *full;
        size_t len;
        if (tok_decode(t, ids, n, skip, &full, &len, err, sizeof err)) {
            FUZZ_CHECK(!must_ok);
            continue;
        }
        FUZZ_CHECK(strlen(full) <= len && full[len] == 0);
        FUZZ_CHECK(fuzz_utf8_ok(full, len));
        tok_stream *s = tok_stream_new(t, skip);
        FUZZ_CHECK(s != NULL);
        size_t used = 0;
        for (int i = 0; i <= n; i++) {
            const char *p;
            size_t pl;
            if (i < n)
                FUZZ_CHECK(tok_stream_push(s, ids[i], &p, &pl, err, sizeof err) == 0);
            else
                FUZZ_CHECK(tok_stream_flush(s, &p, &pl) == 0);
            FUZZ_CHECK(fuzz_utf8_ok(p, pl));
            FUZZ_CHECK(used + pl <= len && memcmp(full + used, p, pl) == 0);
            used += pl;
        }
        FUZZ_CHECK(used == len);
        tok_stream_free(s);
        free(full);
    }
}

#endif
