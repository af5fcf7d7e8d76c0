/* base/ids.h — token-id lists as people write them: "1,2,3", "1 2 3", one line of a file.
 *
 * base_ids_parse appends the ids of `s` (separated by spaces, tabs, commas, CR or LF) to `ids`.
 * Each must be an integer in [0, limit). Errors (-1, one line in err, `ids` keeps what it had):
 *   "WHERE: id K: 'TEXT' is not a token id (>= 0)", "WHERE: id K: token id V out of range
 *   [0, LIMIT)" (K counts the ids of this call from 1), "WHERE: out of memory".
 * An empty `s` adds nothing (the caller decides whether that is an error).
 * Ownership: ids->v is malloc'd, base_ids_free releases it (a zeroed base_ids is empty).
 */
#ifndef BASE_IDS_H
#define BASE_IDS_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int32_t *v; /* [n] */
    long n, cap;
} base_ids;

int base_ids_parse(const char *s, long limit, base_ids *ids, const char *where, char *err,
                   size_t errlen);
/* Append one id (no range check); -1 on out of memory. */
int base_ids_push(base_ids *ids, int32_t id);
void base_ids_free(base_ids *ids);

#endif
