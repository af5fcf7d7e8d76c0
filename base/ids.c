/* base/ids.c — see base/ids.h. */
#include "base/ids.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "base/err.h"

static int is_sep(char c) { return c == ' ' || c == '\t' || c == ',' || c == '\r' || c == '\n'; }

int base_ids_push(base_ids *ids, int32_t id)
{
    if (ids->n == ids->cap) {
        long cap = ids->cap ? ids->cap * 2 : 16;
        int32_t *v = realloc(ids->v, (size_t)cap * sizeof *v);
        if (!v) return -1;
        ids->v = v;
        ids->cap = cap;
    }
    ids->v[ids->n++] = id;
    return 0;
}

int base_ids_parse(const char *s, long limit, base_ids *ids, const char *where, char *err,
                   size_t errlen)
{
    const long before = ids->n;
    for (const char *p = s;;) {
        while (is_sep(*p)) p++;
        if (!*p) return 0;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        int k = (int)(ids->n - before) + 1;
        if (end == p || errno || v < 0 || (*end && !is_sep(*end))) {
            int w = 0;
            while (p[w] && !is_sep(p[w]) && w < 40) w++;
            base_set_err(err, errlen, "%s: id %d: '%.*s' is not a token id (>= 0)", where, k, w, p);
            ids->n = before;
            return -1;
        }
        if (v >= limit) {
            base_set_err(err, errlen, "%s: id %d: token id %ld out of range [0, %ld)", where, k, v,
                         limit);
            ids->n = before;
            return -1;
        }
        if (base_ids_push(ids, (int32_t)v)) {
            base_set_err(err, errlen, "%s: out of memory", where);
            ids->n = before;
            return -1;
        }
        p = end;
    }
}

void base_ids_free(base_ids *ids)
{
    free(ids->v);
    memset(ids, 0, sizeof *ids);
}
