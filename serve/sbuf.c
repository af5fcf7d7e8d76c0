/* serve/sbuf.c — see serve/sbuf.h. */
#include "serve/sbuf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void sb_reserve(sb *b, size_t extra)
{
    if (b->oom || b->n + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + extra + 1) cap *= 2;
    char *q = realloc(b->p, cap);
    if (!q) {
        b->oom = 1;
        return;
    }
    b->p = q;
    b->cap = cap;
}

void sb_add(sb *b, const char *s, size_t k)
{
    sb_reserve(b, k);
    if (b->oom) return;
    memcpy(b->p + b->n, s, k);
    b->n += k;
    b->p[b->n] = 0;
}

void sb_str(sb *b, const char *s) { sb_add(b, s, strlen(s)); }

void sb_fmt(sb *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char tmp[512];
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (k < 0) return;
    if ((size_t)k < sizeof tmp) {
        sb_add(b, tmp, (size_t)k);
        return;
    }
    sb_reserve(b, (size_t)k);
    if (b->oom) return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->n, (size_t)k + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)k;
}

void sb_free(sb *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* Length of the valid UTF-8 sequence at s[0..n), 0 if invalid. */
static int utf8_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    int k;
    unsigned min;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        k = 2;
        min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
        k = 3;
        min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        k = 4;
        min = 0x10000;
    } else
        return 0;
    if (n < (size_t)k) return 0;
    unsigned cp = c & (0x7F >> k);
    for (int i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return k;
}

void sb_json(sb *b, const char *s, size_t n)
{
    sb_reserve(b, n + 2);
    sb_add(b, "\"", 1);
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned char c = u[i];
        if (c == '"') {
            sb_add(b, "\\\"", 2);
            i++;
        } else if (c == '\\') {
            sb_add(b, "\\\\", 2);
            i++;
        } else if (c == '\n') {
            sb_add(b, "\\n", 2);
            i++;
        } else if (c == '\r') {
            sb_add(b, "\\r", 2);
            i++;
        } else if (c == '\t') {
            sb_add(b, "\\t", 2);
            i++;
        } else if (c < 0x20 || c == 0x7F) {
            sb_fmt(b, "\\u%04x", c);
            i++;
        } else {
            int k = utf8_len(u + i, n - i);
            if (!k) {
                sb_add(b, "\\ufffd", 6);
                i++;
            } else {
                sb_add(b, s + i, (size_t)k);
                i += (size_t)k;
            }
        }
    }
    sb_add(b, "\"", 1);
}
