/* serve/sbuf.h — the growable string buffer of serve/ (HTTP replies, chat templates).
 *
 * A zeroed sb is empty. Every add keeps p NUL-terminated (p stays NULL until the first add;
 * sb_str(b, "") makes it ""). Out of memory sticks: oom is set, later adds are dropped, what
 * was added stays; the caller checks oom once at the end. The caller owns p (sb_free, or
 * takes p). Not thread-safe: one buffer, one thread.
 */
#ifndef SERVE_SBUF_H
#define SERVE_SBUF_H

#include <stddef.h>

typedef struct {
    char *p; /* [cap] */
    size_t n, cap;
    int oom;
} sb;

void sb_add(sb *b, const char *s, size_t k);
void sb_str(sb *b, const char *s);
void sb_fmt(sb *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sb_free(sb *b);
/* A JSON string literal of s[0..n); invalid UTF-8 bytes become U+FFFD. */
void sb_json(sb *b, const char *s, size_t n);

#endif
