/* tok/tok.c — loading a Hugging Face tokenizer.json (tok.h) into the tables of tok_impl.h.
 *
 * Every construct is either implemented or rejected with its name: a normalizer,
 * pre-tokenizer, model, post-processor or decoder type not listed in tok.h's contract is an
 * error at load time, never ignored at encode time.
 */
#include "tok/tok.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/file.h"
#include "tok/tok_impl.h"

/* ---- small helpers --------------------------------------------------------------------------- */

char *tok_strndup(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (!d) return NULL;
    if (n) memcpy(d, s, n);
    d[n] = 0;
    return d;
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes
 * are moved to 256, 257, ... in byte order. Filled once (pthread_once) by tok_load_json. */
uint16_t tok_byte_cp[256];
static int16_t tok_cp_byte_tab[324];
static pthread_once_t tok_bytemap_once = PTHREAD_ONCE_INIT;

static void tok_bytemap_fill(void)
{
    int n = 0;
    for (int i = 0; i < 324; i++) tok_cp_byte_tab[i] = -1;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
        tok_byte_cp[b] = (uint16_t)(keep ? b : 256 + n++);
        tok_cp_byte_tab[tok_byte_cp[b]] = (int16_t)b;
    }
}

static void tok_bytemap_init(void) { pthread_once(&tok_bytemap_once, tok_bytemap_fill); }

int tok_cp_byte(uint32_t cp) { return cp < 324 ? tok_cp_byte_tab[cp] : -1; }

/* ---- UTF-8 ----------------------------------------------------------------------------------- */

int tok_utf8_valid(const char *str, size_t len, size_t *bad)
{
    const uint8_t *s = (const uint8_t *)str;
    size_t i = 0;
    while (i < len) {
        uint8_t c = s[i];
        size_t n;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            n = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F; /* no surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            if (bad) *bad = i;
            return 0;
        }
        if (len - i - 1 < n || s[i + 1] < lo || s[i + 1] > hi) {
            if (bad) *bad = i;
            return 0;
        }
        for (size_t k = 2; k <= n; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xBF) {
                if (bad) *bad = i;
                return 0;
            }
        i += n + 1;
    }
    return 1;
}

int tok_utf8_next(const char *str, size_t len, size_t i, uint32_t *cp)
{
    const uint8_t *s = (const uint8_t *)str + i;
    size_t left = len - i;
    if (s[0] < 0x80 || left < 2) {
        *cp = s[0];
        return 1;
    }
    if (s[0] < 0xE0) {
        *cp = (uint32_t)(s[0] & 0x1F) << 6 | (s[1] & 0x3F);
        return 2;
    }
    if (s[0] < 0xF0 || left < 4) {
        if (left < 3) {
            *cp = s[0];
            return 1;
        }
        *cp = (uint32_t)(s[0] & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
        return 3;
    }
    *cp = (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 |
          (uint32_t)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
    return 4;
}

int tok_utf8_put(char *out, uint32_t cp)
{
    uint8_t *o = (uint8_t *)out;
    if (cp < 0x80) {
        o[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (uint8_t)(0xC0 | cp >> 6);
        o[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (uint8_t)(0xE0 | cp >> 12);
        o[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (uint8_t)(0xF0 | cp >> 18);
    o[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* ---- hash maps ------------------------------------------------------------------------------- */

static uint64_t tok_fnv(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ULL;
    return h;
}

static size_t tok_pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

int tok_map_init(tok_map *m, size_t n_expected)
{
    m->cap = tok_pow2_at_least(n_expected * 2 + 1);
    m->n = 0;
    m->ent = calloc(m->cap, sizeof *m->ent);
    return m->ent ? 0 : -1;
}

void tok_map_free(tok_map *m)
{
    free(m->ent);
    m->ent = NULL;
    m->cap = m->n = 0;
}

static int tok_map_grow(tok_map *m)
{
    tok_map g;
    g.cap = m->cap * 2;
    g.n = 0;
    g.ent = calloc(g.cap, sizeof *g.ent);
    if (!g.ent) return -1;
    for (size_t i = 0; i < m->cap; i++)
        if (m->ent[i].key) tok_map_put(&g, m->ent[i].key, m->ent[i].len, m->ent[i].id);
    free(m->ent);
    *m = g;
    return 0;
}

int tok_map_put(tok_map *m, const char *key, uint32_t len, int32_t id)
{
    if ((m->n + 1) * 2 > m->cap && tok_map_grow(m)) return -1;
    size_t mask = m->cap - 1, i = (size_t)tok_fnv(key, len) & mask;
    while (m->ent[i].key) {
        if (m->ent[i].len == len && memcmp(m->ent[i].key, key, len) == 0) return 0;
        i = (i + 1) & mask;
    }
    m->ent[i].key = key;
    m->ent[i].len = len;
    m->ent[i].id = id;
    m->n++;
    return 1;
}

int32_t tok_map_get(const tok_map *m, const char *key, size_t len)
{
    if (!m->ent) return -1;
    size_t mask = m->cap - 1, i = (size_t)tok_fnv(key, len) & mask;
    while (m->ent[i].key) {
        if (m->ent[i].len == len && memcmp(m->ent[i].key, key, len) == 0) return m->ent[i].id;
        i = (i + 1) & mask;
    }
    return -1;
}

static int tok_merges_init(tok_merges *mg, size_t n)
{
    mg->cap = tok_pow2_at_least(n * 2 + 1);
    mg->n = 0;
    mg->ent = malloc(mg->cap * sizeof *mg->ent);
    if (!mg->ent) return -1;
    for (size_t i = 0; i < mg->cap; i++) mg->ent[i].key = UINT64_MAX;
    return 0;
}

static uint64_t tok_mix64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return k;
}

/* 1 added, 0 the pair was there already (an earlier merge keeps its lower rank). */
static int tok_merges_put(tok_merges *mg, int32_t a, int32_t b, int32_t rank, int32_t merged)
{
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    size_t mask = mg->cap - 1, i = (size_t)tok_mix64(key) & mask;
    while (mg->ent[i].key != UINT64_MAX) {
        if (mg->ent[i].key == key) return 0;
        i = (i + 1) & mask;
    }
    mg->ent[i].key = key;
    mg->ent[i].rank = rank;
    mg->ent[i].merged = merged;
    mg->n++;
    return 1;
}

/* Used by tok_encode.c through this declaration (kept here with the table layout). */
const tok_merge_ent *tok_merges_get(const tok_merges *mg, int32_t a, int32_t b);
const tok_merge_ent *tok_merges_get(const tok_merges *mg, int32_t a, int32_t b)
{
    if (!mg->ent) return NULL;
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    size_t mask = mg->cap - 1, i = (size_t)tok_mix64(key) & mask;
    while (mg->ent[i].key != UINT64_MAX) {
        if (mg->ent[i].key == key) return &mg->ent[i];
        i = (i + 1) & mask;
    }
    return NULL;
}

/* ---- regex ----------------------------------------------------------------------------------- */

pcre2_code *tok_re_compile(const char *pat, size_t len, int literal, char *msg, size_t msglen)
{
    int ec;
    PCRE2_SIZE eo;
    uint32_t opt = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP); /* LITERAL refuses UCP */
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, len, opt, &ec, &eo, NULL);
    if (!re) {
        PCRE2_UCHAR buf[160];
        pcre2_get_error_message(ec, buf, sizeof buf);
        base_set_err(msg, msglen, "%s at offset %zu", (const char *)buf, (size_t)eo);
        return NULL;
    }
    /* JIT when the platform has it (several times faster on long texts); pcre2_match uses
     * it by itself, and falls back to the interpreter if it is not there. The fuzz build
     * turns it off (TOK_NO_JIT): compiling machine code at every load dominates its runs. */
#ifndef TOK_NO_JIT
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
#endif
    return re;
}

/* ---- loading --------------------------------------------------------------------------------- */

const char *tok_j_type_name(const cJSON *j)
{
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(j, "type");
    return cJSON_IsString(ty) ? ty->valuestring : NULL;
}

/* Optional boolean member: absent or null gives def; anything else but a bool is an error. */
int tok_j_bool(tok_ld *ld, const cJSON *j, const char *key, int def, int *out, const char *what)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(v)) {
        LD_ERR(ld, "%s: \"%s\" is not a boolean", what, key);
        return -1;
    }
    *out = cJSON_IsTrue(v);
    return 0;
}

/* An id in [0, TOK_MAX_ID): cJSON numbers are doubles. */
int tok_j_id(const cJSON *v, int32_t *out)
{
    if (!cJSON_IsNumber(v)) return -1;
    double d = v->valuedouble;
    if (!(d >= 0 && d < TOK_MAX_ID) || d != (double)(int32_t)d) return -1;
    *out = (int32_t)d;
    return 0;
}

/* Set id's string, growing the tables. A second, different string for an id is an error. */
static int tok_set_token(tok_ld *ld, int32_t id, const char *s, size_t len, uint8_t flags, int *cap)
{
    tok_tokenizer *t = ld->t;
    if (id >= *cap) {
        int nc = *cap ? *cap : 1024;
        while (nc <= id) nc *= 2;
        char **ns = realloc(t->str, (size_t)nc * sizeof *ns);
        if (!ns) goto oom;
        t->str = ns;
        uint32_t *nl = realloc(t->str_len, (size_t)nc * sizeof *nl);
        if (!nl) goto oom;
        t->str_len = nl;
        uint8_t *nf = realloc(t->flags, (size_t)nc);
        if (!nf) goto oom;
        t->flags = nf;
        for (int i = *cap; i < nc; i++) {
            t->str[i] = NULL;
            t->str_len[i] = 0;
            t->flags[i] = 0;
        }
        *cap = nc;
    }
    if (id >= t->n_vocab) t->n_vocab = id + 1;
    if (t->str[id]) {
        if (t->str_len[id] != len || memcmp(t->str[id], s, len) != 0) {
            LD_ERR(ld, "id %d is both \"%.60s\" and \"%.60s\"", (int)id, t->str[id], s);
            return -1;
        }
        t->flags[id] |= flags;
        return 0;
    }
    if (!(t->str[id] = tok_strndup(s, len))) goto oom;
    t->str_len[id] = (uint32_t)len;
    t->flags[id] = flags;
    return 0;
oom:
    LD_ERR(ld, "out of memory");
    return -1;
}

int tok_is_byte_token(const char *s, size_t len, int *byte)
{
    static const char hex[] = "0123456789ABCDEF";
    if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return 0;
    const char *h1 = memchr(hex, s[3], 16), *h2 = memchr(hex, s[4], 16);
    if (!h1 || !h2 || !s[3] || !s[4]) return 0;
    *byte = (int)((h1 - hex) * 16 + (h2 - hex));
    return 1;
}

static int parse_model(tok_ld *ld, const cJSON *m, int *cap)
{
    tok_tokenizer *t = ld->t;
    const char *ty = tok_j_type_name(m);
    if (!cJSON_IsObject(m)) {
        LD_ERR(ld, "no \"model\" object");
        return -1;
    }
    if (!ty) {
        /* tokenizers writes "type"; a model with vocab + merges and no type is BPE too */
        if (!cJSON_GetObjectItemCaseSensitive(m, "merges")) {
            LD_ERR(ld, "model has no \"type\"");
            return -1;
        }
        ty = "BPE";
    }
    if (strcmp(ty, "BPE") != 0) {
        LD_ERR(ld, "model type \"%s\" is not supported (only BPE)", ty);
        return -1;
    }
    const cJSON *dr = cJSON_GetObjectItemCaseSensitive(m, "dropout");
    if (dr && !cJSON_IsNull(dr) && !(cJSON_IsNumber(dr) && dr->valuedouble == 0)) {
        LD_ERR(ld, "model: BPE dropout is not supported");
        return -1;
    }
    const char *affix[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int k = 0; k < 2; k++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(m, affix[k]);
        if (v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && v->valuestring[0] == 0)) {
            LD_ERR(ld, "model: BPE %s is not supported", affix[k]);
            return -1;
        }
    }
    if (tok_j_bool(ld, m, "byte_fallback", 0, &t->byte_fallback, "model") ||
        tok_j_bool(ld, m, "fuse_unk", 0, &t->fuse_unk, "model") ||
        tok_j_bool(ld, m, "ignore_merges", 0, &t->ignore_merges, "model"))
        return -1;

    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab");
    if (!cJSON_IsObject(vocab)) {
        LD_ERR(ld, "model has no \"vocab\" object");
        return -1;
    }
    int nv = cJSON_GetArraySize(vocab);
    if (tok_map_init(&t->vocab, (size_t)nv)) {
        LD_ERR(ld, "out of memory");
        return -1;
    }
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab)
    {
        int32_t id;
        if (tok_j_id(e, &id)) {
            LD_ERR(ld, "vocab entry \"%.60s\" has no valid id", e->string);
            return -1;
        }
        size_t len = strlen(e->string);
        int byte;
        int is_byte = tok_is_byte_token(e->string, len, &byte);
        if (tok_set_token(ld, id, e->string, len, is_byte ? TOKF_BYTE : 0, cap)) return -1;
        int r = tok_map_put(&t->vocab, t->str[id], (uint32_t)len, id);
        if (r < 0) {
            LD_ERR(ld, "out of memory");
            return -1;
        }
        if (r == 0) {
            LD_ERR(ld, "vocab has \"%.60s\" twice", e->string);
            return -1;
        }
        if (is_byte && t->byte_id[byte] < 0) t->byte_id[byte] = id;
    }
    /* sp_split (tok_impl.h): a vocab with "▁" and no token holding "X▁" (X not "▁") */
    t->sp_split = tok_map_get(&t->vocab, "\xe2\x96\x81", 3) >= 0;
    for (int id = 0; t->sp_split && id < t->n_vocab; id++) {
        const char *s = t->str[id];
        if (!s) continue;
        for (const char *q = s; *q && (q = strstr(q + 1, "\xe2\x96\x81")) != NULL;)
            if (q - s < 3 || memcmp(q - 3, "\xe2\x96\x81", 3) != 0) {
                t->sp_split = 0;
                break;
            }
    }
    if (nv != (int)t->vocab.n) {
        LD_ERR(ld, "vocab has duplicate ids");
        return -1;
    }

    t->unk_id = -1;
    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(m, "unk_token");
    if (cJSON_IsString(unk)) {
        t->unk_id = tok_map_get(&t->vocab, unk->valuestring, strlen(unk->valuestring));
        if (t->unk_id < 0) {
            LD_ERR(ld, "model: unk_token \"%.60s\" is not in the vocab", unk->valuestring);
            return -1;
        }
    } else if (unk && !cJSON_IsNull(unk)) {
        LD_ERR(ld, "model: unk_token is not a string");
        return -1;
    }

    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (merges && !cJSON_IsNull(merges) && !cJSON_IsArray(merges)) {
        LD_ERR(ld, "model: \"merges\" is not an array");
        return -1;
    }
    int nm = merges ? cJSON_GetArraySize(merges) : 0;
    if (tok_merges_init(&t->merges, (size_t)nm)) {
        LD_ERR(ld, "out of memory");
        return -1;
    }
    char *cat = NULL; /* scratch for a + b */
    size_t cat_cap = 0;
    int rank = 0, rc = -1;
    cJSON_ArrayForEach(e, merges)
    {
        const char *a, *b;
        size_t la, lb;
        if (cJSON_IsString(e)) {
            /* "a b": exactly one space (tokens in this form cannot contain one) */
            const char *s = e->valuestring, *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' ') || sp == s || sp[1] == 0) {
                LD_ERR(ld, "merge %d \"%.60s\" is not \"left right\"", rank, s);
                goto out;
            }
            a = s;
            la = (size_t)(sp - s);
            b = sp + 1;
            lb = strlen(b);
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(e, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(e, 1))) {
            a = cJSON_GetArrayItem(e, 0)->valuestring;
            b = cJSON_GetArrayItem(e, 1)->valuestring;
            la = strlen(a);
            lb = strlen(b);
        } else {
            LD_ERR(ld, "merge %d is neither \"a b\" nor [\"a\", \"b\"]", rank);
            goto out;
        }
        int32_t ia = tok_map_get(&t->vocab, a, la), ib = tok_map_get(&t->vocab, b, lb);
        if (ia < 0 || ib < 0) {
            LD_ERR(ld, "merge %d names \"%.*s\", which is not in the vocab", rank,
                   (int)(ia < 0 ? (la > 60 ? 60 : la) : (lb > 60 ? 60 : lb)), ia < 0 ? a : b);
            goto out;
        }
        if (la + lb + 1 > cat_cap) {
            cat_cap = (la + lb + 1) * 2;
            char *nc = realloc(cat, cat_cap);
            if (!nc) {
                LD_ERR(ld, "out of memory");
                goto out;
            }
            cat = nc;
        }
        memcpy(cat, a, la);
        memcpy(cat + la, b, lb);
        int32_t im = tok_map_get(&t->vocab, cat, la + lb);
        if (im < 0) {
            LD_ERR(ld, "merge %d gives \"%.*s\", which is not in the vocab", rank,
                   (int)(la + lb > 60 ? 60 : la + lb), cat);
            goto out;
        }
        tok_merges_put(&t->merges, ia, ib, rank, im);
        rank++;
    }
    rc = 0;
out:
    free(cat);
    return rc;
}

static int parse_added(tok_ld *ld, const cJSON *arr, int *cap)
{
    tok_tokenizer *t = ld->t;
    if (!arr || cJSON_IsNull(arr)) return 0;
    if (!cJSON_IsArray(arr)) {
        LD_ERR(ld, "\"added_tokens\" is not an array");
        return -1;
    }
    int n = cJSON_GetArraySize(arr);
    t->added = calloc((size_t)(n > 0 ? n : 1), sizeof *t->added);
    if (!t->added) {
        LD_ERR(ld, "out of memory");
        return -1;
    }
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)
    {
        int k = t->n_added;
        int32_t id;
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(e, "content");
        if (!cJSON_IsObject(e) || tok_j_id(cJSON_GetObjectItemCaseSensitive(e, "id"), &id) ||
            !cJSON_IsString(c) || c->valuestring[0] == 0) {
            LD_ERR(ld, "added token %d has no valid id or content", k);
            return -1;
        }
        tok_added *a = &t->added[k];
        char what[48];
        snprintf(what, sizeof what, "added token %d", k);
        if (tok_j_bool(ld, e, "special", 0, &a->special, what) ||
            tok_j_bool(ld, e, "lstrip", 0, &a->lstrip, what) ||
            tok_j_bool(ld, e, "rstrip", 0, &a->rstrip, what) ||
            tok_j_bool(ld, e, "single_word", 0, &a->single_word, what))
            return -1;
        a->len = strlen(c->valuestring);
        size_t bad;
        /* the text is cut at added tokens: one that is not UTF-8 could cut a character */
        if (!tok_utf8_valid(c->valuestring, a->len, &bad)) {
            LD_ERR(ld, "added token %d is not valid UTF-8 (byte %zu)", k, bad);
            return -1;
        }
        a->id = id;
        if (!(a->content = tok_strndup(c->valuestring, a->len))) {
            LD_ERR(ld, "out of memory");
            return -1;
        }
        t->n_added++;
        if (tok_set_token(ld, id, a->content, a->len,
                          (uint8_t)(TOKF_ADDED | (a->special ? TOKF_SPECIAL : 0)), cap))
            return -1;
    }
    return 0;
}

/* Index the added tokens by first byte, longest first, for leftmost-longest matching. */
static int index_added(tok_ld *ld)
{
    tok_tokenizer *t = ld->t;
    t->added_first = calloc(257, sizeof *t->added_first);
    t->added_order = malloc((size_t)(t->n_added > 0 ? t->n_added : 1) * sizeof(int));
    if (!t->added_first || !t->added_order) {
        LD_ERR(ld, "out of memory");
        return -1;
    }
    if (t->n_added > 32767) {
        LD_ERR(ld, "%d added tokens (limit 32767)", t->n_added);
        return -1;
    }
    int n = 0;
    for (int b = 0; b < 256; b++) {
        t->added_first[b] = (int16_t)n;
        int start = n;
        for (int k = 0; k < t->n_added; k++)
            if ((uint8_t)t->added[k].content[0] == b) t->added_order[n++] = k;
        /* insertion sort by length, descending (few tokens per first byte) */
        for (int i = start + 1; i < n; i++)
            for (int j = i;
                 j > start && t->added[t->added_order[j]].len > t->added[t->added_order[j - 1]].len;
                 j--) {
                int s = t->added_order[j];
                t->added_order[j] = t->added_order[j - 1];
                t->added_order[j - 1] = s;
            }
    }
    t->added_first[256] = (int16_t)n;
    return 0;
}

/* A pattern object {"String": s} or {"Regex": r}, compiled. */
/* ---- files ----------------------------------------------------------------------------------- */

/* A tokenizer_config.json token entry: a string or {"content": ...}. */
static int32_t token_id_of(const tok_tokenizer *t, const cJSON *v)
{
    if (cJSON_IsObject(v)) v = cJSON_GetObjectItemCaseSensitive(v, "content");
    if (!cJSON_IsString(v)) return -1;
    size_t len = strlen(v->valuestring);
    for (int k = 0; k < t->n_added; k++)
        if (t->added[k].len == len && memcmp(t->added[k].content, v->valuestring, len) == 0)
            return t->added[k].id;
    return tok_map_get(&t->vocab, v->valuestring, len);
}

static int32_t config_id(const cJSON *v)
{
    int32_t id;
    if (cJSON_IsArray(v)) v = cJSON_GetArrayItem(v, 0);
    return tok_j_id(v, &id) ? -1 : id;
}

/* BOS / EOS (and add_bos_token / add_eos_token) from the files next to tokenizer.json. */
static int load_configs(tok_tokenizer *t, const char *dir, char *err, size_t errlen)
{
    char path[4096];
    size_t len;
    int32_t bos = -1, eos = -1;
    int add_bos = -1, add_eos = -1;
    snprintf(path, sizeof path, "%s/config.json", dir);
    struct stat st;
    if (stat(path, &st) == 0) {
        char *txt = base_read_file(path, 0, &len, err, errlen);
        if (!txt) return -1;
        cJSON *j = cJSON_ParseWithLength(txt, len);
        free(txt);
        if (!cJSON_IsObject(j)) {
            cJSON_Delete(j);
            base_set_err(err, errlen, "%s: not a JSON object", path);
            return -1;
        }
        bos = config_id(cJSON_GetObjectItemCaseSensitive(j, "bos_token_id"));
        eos = config_id(cJSON_GetObjectItemCaseSensitive(j, "eos_token_id"));
        cJSON_Delete(j);
    }
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    if (stat(path, &st) == 0) {
        char *txt = base_read_file(path, 0, &len, err, errlen);
        if (!txt) return -1;
        cJSON *j = cJSON_ParseWithLength(txt, len);
        free(txt);
        if (!cJSON_IsObject(j)) {
            cJSON_Delete(j);
            base_set_err(err, errlen, "%s: not a JSON object", path);
            return -1;
        }
        int32_t b = token_id_of(t, cJSON_GetObjectItemCaseSensitive(j, "bos_token"));
        int32_t e = token_id_of(t, cJSON_GetObjectItemCaseSensitive(j, "eos_token"));
        if (b >= 0) bos = b;
        if (e >= 0) eos = e;
        const cJSON *ab = cJSON_GetObjectItemCaseSensitive(j, "add_bos_token");
        const cJSON *ae = cJSON_GetObjectItemCaseSensitive(j, "add_eos_token");
        if (cJSON_IsBool(ab)) add_bos = cJSON_IsTrue(ab);
        if (cJSON_IsBool(ae)) add_eos = cJSON_IsTrue(ae);
        cJSON_Delete(j);
    }
    if (bos >= t->n_vocab || eos >= t->n_vocab) {
        base_set_err(err, errlen, "%s: BOS %d / EOS %d outside the vocab (%d tokens)", dir,
                     (int)bos, (int)eos, t->n_vocab);
        return -1;
    }
    if (bos >= 0) t->bos = bos;
    if (eos >= 0) t->eos = eos;
    /* As transformers' Llama tokenizers do: add_bos_token / add_eos_token edit the template. */
    if (add_bos == 1 && t->bos >= 0 && !(t->n_prefix > 0 && t->pp_prefix[0] == t->bos)) {
        int32_t *np = realloc(t->pp_prefix, (size_t)(t->n_prefix + 1) * sizeof *np);
        if (!np) goto oom;
        memmove(np + 1, np, (size_t)t->n_prefix * sizeof *np);
        np[0] = t->bos;
        t->pp_prefix = np;
        t->n_prefix++;
    } else if (add_bos == 0 && t->n_prefix > 0 && t->pp_prefix[0] == t->bos) {
        memmove(t->pp_prefix, t->pp_prefix + 1, (size_t)(t->n_prefix - 1) * sizeof(int32_t));
        t->n_prefix--;
    }
    if (add_eos == 1 && t->eos >= 0 &&
        !(t->n_suffix > 0 && t->pp_suffix[t->n_suffix - 1] == t->eos)) {
        int32_t *np = realloc(t->pp_suffix, (size_t)(t->n_suffix + 1) * sizeof *np);
        if (!np) goto oom;
        np[t->n_suffix++] = t->eos;
        t->pp_suffix = np;
    } else if (add_eos == 0 && t->n_suffix > 0 && t->pp_suffix[t->n_suffix - 1] == t->eos) {
        t->n_suffix--;
    }
    return 0;
oom:
    base_set_err(err, errlen, "%s: out of memory", dir);
    return -1;
}

/* ---- public ---------------------------------------------------------------------------------- */

static int tok_build(tok_tokenizer *t, const cJSON *root, tok_ld *ld)
{
    int cap = 0;
    tok_dec_cfg dc;
    memset(&dc, 0, sizeof dc);
    int rc = -1;
    if (!cJSON_IsObject(root)) {
        LD_ERR(ld, "not a JSON object");
        return -1;
    }
    const cJSON *tr = cJSON_GetObjectItemCaseSensitive(root, "truncation");
    const cJSON *pd = cJSON_GetObjectItemCaseSensitive(root, "padding");
    if ((tr && !cJSON_IsNull(tr)) || (pd && !cJSON_IsNull(pd))) {
        LD_ERR(ld, "\"%s\" is set: truncation / padding are not supported (set it to null)",
               tr && !cJSON_IsNull(tr) ? "truncation" : "padding");
        return -1;
    }
    if (parse_model(ld, cJSON_GetObjectItemCaseSensitive(root, "model"), &cap) ||
        parse_added(ld, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), &cap) ||
        index_added(ld) ||
        tok_parse_normalizer(ld, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), 0) ||
        tok_parse_pre(ld, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), 0) ||
        tok_parse_post(ld, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), 0) ||
        tok_parse_decoder(ld, cJSON_GetObjectItemCaseSensitive(root, "decoder"), &dc, 0))
        goto out;
    if (t->n_vocab == 0) {
        LD_ERR(ld, "empty vocab");
        goto out;
    }
    for (int k = 0; k < t->n_prefix + t->n_suffix; k++) {
        int32_t id = k < t->n_prefix ? t->pp_prefix[k] : t->pp_suffix[k - t->n_prefix];
        if (id >= t->n_vocab || !t->str[id]) {
            LD_ERR(ld, "post_processor adds id %d, which has no token", (int)id);
            goto out;
        }
    }
    const cJSON *decoder = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    t->dec_join_space = !decoder || cJSON_IsNull(decoder);
    if (tok_build_decoder(ld, &dc)) goto out;
    /* Without config files, a template that starts with a special token names the BOS. */
    t->bos = t->n_prefix > 0 ? t->pp_prefix[0] : -1;
    t->eos = -1;
    rc = 0;
out:
    for (int r = 0; r < dc.n_repl; r++) {
        free(dc.repl_from[r]);
        free(dc.repl_to[r]);
    }
    return rc;
}

int tok_load_json(const char *name, const char *json, size_t len, tok_tokenizer **out, char *err,
                  size_t errlen)
{
    if (out) *out = NULL;
    if (!json || !out) {
        base_set_err(err, errlen, "tok_load_json: no input");
        return -1;
    }
    if (!name) name = "tokenizer.json";
    tok_bytemap_init();
    tok_tokenizer *t = calloc(1, sizeof *t);
    if (!t || !(t->name = tok_strndup(name, strlen(name)))) {
        free(t);
        base_set_err(err, errlen, "%s: out of memory", name);
        return -1;
    }
    t->unk_id = t->bos = t->eos = -1;
    tok_ld ld = {t, t->name, err, errlen};
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = at && at >= json && at <= json + len ? (size_t)(at - json) : 0;
        base_set_err(err, errlen, "%s: not JSON (parse error near byte %zu)", name, off);
        tok_free(t);
        return -1;
    }
    int rc = tok_build(t, root, &ld);
    cJSON_Delete(root);
    if (rc) {
        tok_free(t);
        return -1;
    }
    *out = t;
    return 0;
}

int tok_load(const char *path, tok_tokenizer **out, char *err, size_t errlen)
{
    if (out) *out = NULL;
    if (!path || !out) {
        base_set_err(err, errlen, "tok_load: no path");
        return -1;
    }
    struct stat st;
    if (stat(path, &st) != 0) {
        base_set_err(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    int is_dir = S_ISDIR(st.st_mode);
    char file[4096];
    if (is_dir) {
        if (snprintf(file, sizeof file, "%s/tokenizer.json", path) >= (int)sizeof file) {
            base_set_err(err, errlen, "%s: path too long", path);
            return -1;
        }
    } else {
        snprintf(file, sizeof file, "%s", path);
    }
    size_t len;
    char *txt = base_read_file(file, 0, &len, err, errlen);
    if (!txt) return -1;
    tok_tokenizer *t;
    int rc = tok_load_json(file, txt, len, &t, err, errlen);
    free(txt);
    if (rc) return -1;
    if (is_dir && load_configs(t, path, err, errlen)) {
        tok_free(t);
        return -1;
    }
    *out = t;
    return 0;
}

void tok_free(tok_tokenizer *t)
{
    if (!t) return;
    for (int i = 0; i < t->n_vocab; i++) free(t->str[i]);
    free(t->str);
    free(t->str_len);
    free(t->flags);
    tok_map_free(&t->vocab);
    free(t->merges.ent);
    for (int k = 0; k < t->n_norm; k++) {
        free(t->norm[k].str);
        free(t->norm[k].lit);
        pcre2_code_free(t->norm[k].re);
    }
    free(t->norm);
    for (int k = 0; k < t->n_pre; k++) {
        pcre2_code_free(t->pre[k].re);
        free(t->pre[k].replacement);
    }
    free(t->pre);
    for (int k = 0; k < t->n_added; k++) free(t->added[k].content);
    free(t->added);
    free(t->added_first);
    free(t->added_order);
    free(t->pp_prefix);
    free(t->pp_suffix);
    free(t->dec_pool);
    free(t->dec_off);
    free(t->name);
    free(t);
}

int tok_vocab_size(const tok_tokenizer *t) { return t ? t->n_vocab : 0; }
int tok_bos(const tok_tokenizer *t) { return t ? t->bos : -1; }
int tok_eos(const tok_tokenizer *t) { return t ? t->eos : -1; }
size_t tok_max_piece_bytes(const tok_tokenizer *t) { return t->dec_max > 0 ? t->dec_max : 1; }

int tok_is_special(const tok_tokenizer *t, int32_t id)
{
    return t && id >= 0 && id < t->n_vocab && (t->flags[id] & TOKF_SPECIAL);
}
