/* tok/tok_impl.h — the tokenizer's internal representation, shared by tok.c (loading),
 * tok_encode.c (text -> ids) and tok_decode.c (ids -> text). Not part of the module's API.
 *
 * Loading turns tokenizer.json into flat tables: the id -> token string array, a hash map
 * string -> id for the model vocab, a hash map (left id, right id) -> (rank, merged id) for the
 * merges, the normalizer / pre-tokenizer steps as small arrays of tagged structs, and per id
 * the bytes the decoder chain turns it into (so decoding is a table lookup plus one lossy
 * UTF-8 pass). Everything is read-only after tok_load.
 */
#ifndef TOK_TOK_IMPL_H
#define TOK_TOK_IMPL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <cjson/cJSON.h>
#include <pcre2.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "base/err.h"
#include "tok/tok.h"

/* Largest id accepted in a vocab (tables are indexed by id, ~13 bytes an id). The fuzz
 * build lowers it, so a mutated id does not make every run allocate 200 MB. */
#ifndef TOK_MAX_ID
#define TOK_MAX_ID (1 << 24)
#endif

/* ---- string -> id hash map (open addressing, FNV-1a) ----------------------------------------- */
typedef struct {
    const char *key; /* points into the tokenizer's token strings */
    uint32_t len;
    int32_t id;
} tok_map_ent;

typedef struct {
    tok_map_ent *ent; /* [cap], key NULL = empty */
    size_t cap, n;    /* cap a power of two, n <= cap / 2 */
} tok_map;

int tok_map_init(tok_map *m, size_t n_expected);
void tok_map_free(tok_map *m);
/* 1 inserted, 0 the key was present (its id is left alone), -1 out of memory. */
int tok_map_put(tok_map *m, const char *key, uint32_t len, int32_t id);
int32_t tok_map_get(const tok_map *m, const char *key, size_t len); /* -1: absent */

/* ---- merges: (left id, right id) -> rank, merged id ------------------------------------------ */
typedef struct {
    uint64_t key; /* left << 32 | right; UINT64_MAX = empty */
    int32_t rank, merged;
} tok_merge_ent;

typedef struct {
    tok_merge_ent *ent; /* [cap] */
    size_t cap, n;
} tok_merges;

/* ---- normalizers ----------------------------------------------------------------------------- */
typedef enum { TOK_NORM_PREPEND, TOK_NORM_REPLACE, TOK_NORM_NFC } tok_norm_kind;
typedef struct {
    tok_norm_kind kind;
    char *str; /* PREPEND: the prefix; REPLACE: the replacement content */
    size_t str_len;
    pcre2_code *re; /* REPLACE with a Regex pattern */
    char *lit;      /* REPLACE with a String pattern (matched with memmem) */
    size_t lit_len;
} tok_norm;

/* ---- pre-tokenizers -------------------------------------------------------------------------- */
typedef enum { TOK_PRE_BYTELEVEL, TOK_PRE_SPLIT, TOK_PRE_METASPACE, TOK_PRE_DIGITS } tok_pre_kind;
typedef enum {
    TOK_SPLIT_REMOVED,
    TOK_SPLIT_ISOLATED,
    TOK_SPLIT_MERGED_PREV,
    TOK_SPLIT_MERGED_NEXT,
    TOK_SPLIT_CONTIGUOUS
} tok_split_behavior;
typedef enum { TOK_PREPEND_ALWAYS, TOK_PREPEND_FIRST, TOK_PREPEND_NEVER } tok_prepend_scheme;

typedef struct {
    tok_pre_kind kind;
    pcre2_code *re;              /* SPLIT: the pattern; BYTELEVEL with use_regex: GPT-2's;
                                  * METASPACE with split: the replacement as a literal;
                                  * DIGITS: \p{N} one at a time or as runs */
    tok_split_behavior behavior; /* SPLIT, DIGITS */
    int invert;                  /* SPLIT: the pieces are the matches, not the gaps */
    int add_prefix_space;        /* BYTELEVEL */
    tok_prepend_scheme prepend;  /* METASPACE */
    char *replacement;           /* METASPACE: UTF-8 of the replacement character */
    size_t replacement_len;
} tok_pre;

/* ---- added tokens ---------------------------------------------------------------------------- */
typedef struct {
    char *content;
    size_t len;
    int32_t id;
    int special, lstrip, rstrip, single_word;
} tok_added;

/* Token flags. */
#define TOKF_SPECIAL 1u /* an added token marked "special": skip_special drops it */
#define TOKF_ADDED 2u   /* an added token: matched in the text before the model */
#define TOKF_BYTE 4u    /* a <0xNN> byte-fallback token of the model vocab */

struct tok_tokenizer {
    char *name;        /* the file, for messages */
    int n_vocab;       /* highest id + 1 */
    char **str;        /* [n_vocab] token string (NUL-terminated), NULL for an unused id */
    uint32_t *str_len; /* [n_vocab] */
    uint8_t *flags;    /* [n_vocab] TOKF_* */

    tok_map vocab; /* model vocab string -> id */
    tok_merges merges;
    int byte_fallback, fuse_unk, ignore_merges;
    int32_t unk_id;       /* -1: none */
    int sp_split;         /* no token has "▁" right after another character, so no merge can
                          * cross the start of a "▁" run: BPE may cut pieces there (exact, and
                          * it keeps the heap small on texts without a pre-tokenizer) */
    int32_t byte_id[256]; /* the <0xNN> token of byte NN, -1 where missing */

    tok_norm *norm; /* [n_norm] applied in order */
    int n_norm;
    tok_pre *pre; /* [n_pre] applied in order */
    int n_pre;

    tok_added *added; /* [n_added] */
    int n_added;
    int16_t *added_first; /* [257] added[] sorted by first byte: indices for byte b are
                           * added_order[added_first[b] .. added_first[b+1]) */
    int *added_order;     /* [n_added] longest first within a first byte */

    int32_t *pp_prefix; /* [n_prefix] ids the post-processor puts before the text */
    int n_prefix;
    int32_t *pp_suffix; /* [n_suffix] ... and after it */
    int n_suffix;

    /* Decoder: per id the bytes it contributes, before the lossy UTF-8 pass. */
    char *dec_pool;            /* all decoded pieces back to back */
    uint32_t *dec_off;         /* [n_vocab + 1] offsets into dec_pool */
    size_t dec_max;            /* longest piece */
    int dec_strip_n;           /* Strip after Fuse: up to this many leading chars ... */
    uint32_t dec_strip_cp;     /* ... equal to this code point are dropped from the output */
    int dec_strip_first_space; /* Metaspace decoder: the first token loses a leading ' ' */
    int dec_join_space;        /* no decoder at all: tokens are joined with ' ' (as HF does) */

    int bos, eos;
};

/* The GPT-2 byte <-> unicode map: byte b is written as code point tok_byte_cp[b]. */
extern uint16_t tok_byte_cp[256];
/* Reverse: code point (< 324) -> byte, or -1. */
int tok_cp_byte(uint32_t cp);

/* UTF-8 helpers. tok_utf8_valid: 1 if s[0..len) is valid UTF-8 (no surrogates, no overlongs),
 * else 0 with *bad the offset of the first bad byte. tok_utf8_next: the code point at s[i]
 * of valid UTF-8 and its length. tok_utf8_put: encodes cp, returns its length. */
int tok_utf8_valid(const char *s, size_t len, size_t *bad);
int tok_utf8_next(const char *s, size_t len, size_t i, uint32_t *cp);
int tok_utf8_put(char *out, uint32_t cp);

/* Compiled with UTF + UCP; literal: the pattern is a plain string. NULL with a message. */
pcre2_code *tok_re_compile(const char *pat, size_t len, int literal, char *msg, size_t msglen);

/* ---- the loader's two halves: tok.c (model, added tokens, config files, tok_load_json) and
 * tok_parts.c (normalizer, pre-tokenizer, post-processor, decoder). Every tok_parse_* reads one
 * part of the JSON into ld->t: 0, or -1 with one line in ld->err naming the file and the part;
 * depth bounds nested Sequence parts. One loader, one thread. */

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

char *tok_strndup(const char *s, size_t n);  /* malloc'd, NUL-terminated; NULL: out of memory */
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
