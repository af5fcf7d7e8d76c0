/* tok/tok_load.h — what the two halves of the tokenizer.json loader share: tok.c (the
 * model, added tokens, config files, tok_load_json) and tok_parts.c (normalizer,
 * pre-tokenizer, post-processor, decoder). Private to tok/.
 *
 * Every tok_parse_* reads one part of the JSON into ld->t; 0, or -1 with one line in ld->err
 * naming the file and the part. depth bounds nested Sequence parts. Not thread-safe: one
 * loader, one thread.
 */
#ifndef TOK_LOAD_H
#define TOK_LOAD_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "base/err.h"
#include "tok/tok_impl.h"

typedef struct {
    tok_tokenizer *t;
    const char *file; /* for messages */
    char *err;
    size_t errlen;
} tok_ld;

#define LD_ERR(ld, ...)                                                                            \
    do {                                                                                           \
        char m_[512];                                                                              \
        snprintf(m_, sizeof m_, __VA_ARGS__);                                                      \
        base_set_err((ld)->err, (ld)->errlen, "%s: %s", (ld)->file, m_);                           \
    } while (0)

/* The decoder chain, reduced to per-token rules (see tok_impl.h). */
typedef struct {
    int bytelevel, bytefallback, fused, metaspace;
    char *repl_from[8], *repl_to[8]; /* Replace String patterns, in order */
    int n_repl;
} tok_dec_cfg;

char *tok_strndup(const char *s, size_t n); /* malloc'd, NUL-terminated; NULL: out of memory */
const char *tok_j_type_name(const cJSON *j); /* its "type" string, or NULL */
/* j[key] as a bool (def when absent); -1 with a message naming `what` when not a bool. */
int tok_j_bool(tok_ld *ld, const cJSON *j, const char *key, int def, int *out, const char *what);
int tok_j_id(const cJSON *v, int32_t *out); /* a token id: 0, or -1 when not one */
/* "<0xNN>" (SentencePiece byte fallback): 1 with *byte = NN, else 0. */
int tok_is_byte_token(const char *s, size_t len, int *byte);

int tok_parse_normalizer(tok_ld *ld, const cJSON *j, int depth);
int tok_parse_pre(tok_ld *ld, const cJSON *j, int depth);
int tok_parse_post(tok_ld *ld, const cJSON *j, int depth);
int tok_parse_decoder(tok_ld *ld, const cJSON *j, tok_dec_cfg *c, int depth);
/* The per-token decode rules of c into ld->t. */
int tok_build_decoder(tok_ld *ld, const tok_dec_cfg *c);

#endif
