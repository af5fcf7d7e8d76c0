/* tok/tok_parts.c — the pipeline parts of a tokenizer.json: normalizer, pre-tokenizer,
 * post-processor and decoder, read into the tables of tok_impl.h (tok_impl.h). Every type is
 * implemented or refused with its name (tok.h's contract lists them); the model (vocab,
 * merges, added tokens) is read in tok.c.
 */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tok/tok_impl.h"

static pcre2_code *parse_pattern(tok_ld *ld, const cJSON *p, const char *what)
{
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(p, "String");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(p, "Regex");
    const cJSON *v = cJSON_IsString(s) ? s : r;
    if (!cJSON_IsObject(p) || !cJSON_IsString(v)) {
        LD_ERR(ld, "%s: pattern is neither {\"String\": ...} nor {\"Regex\": ...}", what);
        return NULL;
    }
    if (v == s && v->valuestring[0] == 0) {
        LD_ERR(ld, "%s: empty String pattern", what);
        return NULL;
    }
    char msg[256];
    pcre2_code *re =
        tok_re_compile(v->valuestring, strlen(v->valuestring), v == s, msg, sizeof msg);
    if (!re) LD_ERR(ld, "%s: PCRE2 rejects the pattern \"%.80s\": %s", what, v->valuestring, msg);
    return re;
}

/* The parts of a "Sequence" normalizer / pre-tokenizer / post-processor / decoder (under
 * `key`), or NULL with an error; nesting deeper than 8 is refused (a crafted file). */
static const cJSON *seq_list(tok_ld *ld, const cJSON *j, const char *key, const char *what,
                             int depth)
{
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, key);
    if (!cJSON_IsArray(list) || depth > 8) {
        LD_ERR(ld, "%s Sequence without a \"%s\" array", what, key);
        return NULL;
    }
    return list;
}

int tok_parse_normalizer(tok_ld *ld, const cJSON *j, int depth)
{
    tok_tokenizer *t = ld->t;
    if (!j || cJSON_IsNull(j)) return 0;
    const char *ty = tok_j_type_name(j);
    if (!ty) {
        LD_ERR(ld, "normalizer has no \"type\"");
        return -1;
    }
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = seq_list(ld, j, "normalizers", "normalizer", depth), *e;
        if (!list) return -1;
        cJSON_ArrayForEach(e, list) if (tok_parse_normalizer(ld, e, depth + 1)) return -1;
        return 0;
    }
    tok_norm n = {0};
    if (strcmp(ty, "Prepend") == 0) {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "prepend");
        if (!cJSON_IsString(p)) {
            LD_ERR(ld, "normalizer Prepend without a \"prepend\" string");
            return -1;
        }
        n.kind = TOK_NORM_PREPEND;
        n.str_len = strlen(p->valuestring);
        size_t bad;
        if (!tok_utf8_valid(p->valuestring, n.str_len, &bad)) { /* the regexes need UTF-8 */
            LD_ERR(ld, "normalizer Prepend: \"prepend\" is not valid UTF-8");
            return -1;
        }
        n.str = tok_strndup(p->valuestring, n.str_len);
    } else if (strcmp(ty, "Replace") == 0) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "content");
        if (!cJSON_IsString(c)) {
            LD_ERR(ld, "normalizer Replace without a \"content\" string");
            return -1;
        }
        n.kind = TOK_NORM_REPLACE;
        size_t bad;
        if (!tok_utf8_valid(c->valuestring, strlen(c->valuestring), &bad)) {
            LD_ERR(ld, "normalizer Replace: \"content\" is not valid UTF-8");
            return -1;
        }
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(j, "pattern");
        const cJSON *ps = cJSON_GetObjectItemCaseSensitive(pat, "String");
        if (cJSON_IsString(ps) && ps->valuestring[0]) { /* a plain string: memmem, no regex */
            n.lit_len = strlen(ps->valuestring);
            if (!(n.lit = tok_strndup(ps->valuestring, n.lit_len))) {
                LD_ERR(ld, "out of memory");
                return -1;
            }
        } else if (!(n.re = parse_pattern(ld, pat, "normalizer Replace"))) {
            return -1;
        }
        n.str_len = strlen(c->valuestring);
        n.str = tok_strndup(c->valuestring, n.str_len);
    } else if (strcmp(ty, "NFC") == 0) { /* Unicode canonical composition (ICU) */
        n.kind = TOK_NORM_NFC;
    } else {
        LD_ERR(ld, "normalizer type \"%s\" is not supported (Prepend, Replace, NFC, Sequence)", ty);
        return -1;
    }
    tok_norm *nn = realloc(t->norm, (size_t)(t->n_norm + 1) * sizeof *nn);
    if ((!n.str && n.kind != TOK_NORM_NFC) || !nn) {
        free(n.str);
        free(n.lit);
        pcre2_code_free(n.re);
        if (nn) t->norm = nn;
        LD_ERR(ld, "out of memory");
        return -1;
    }
    t->norm = nn;
    t->norm[t->n_norm++] = n;
    return 0;
}

static const char tok_gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int push_pre(tok_ld *ld, tok_pre *p)
{
    tok_tokenizer *t = ld->t;
    tok_pre *np = realloc(t->pre, (size_t)(t->n_pre + 1) * sizeof *np);
    if (!np) {
        pcre2_code_free(p->re);
        free(p->replacement);
        LD_ERR(ld, "out of memory");
        return -1;
    }
    t->pre = np;
    t->pre[t->n_pre++] = *p;
    return 0;
}

static int parse_behavior(tok_ld *ld, const cJSON *j, tok_split_behavior *out, const char *what)
{
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(j, "behavior");
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                                  "Contiguous"};
    if (!cJSON_IsString(b)) {
        LD_ERR(ld, "%s without a \"behavior\" string", what);
        return -1;
    }
    for (int k = 0; k < 5; k++)
        if (strcmp(b->valuestring, names[k]) == 0) {
            *out = (tok_split_behavior)k;
            return 0;
        }
    LD_ERR(ld, "%s: behavior \"%.40s\" is not supported", what, b->valuestring);
    return -1;
}

/* Metaspace config, shared by the pre-tokenizer and the decoder. */
static int parse_metaspace(tok_ld *ld, const cJSON *j, const char *what, char **repl,
                           tok_prepend_scheme *scheme, int *split)
{
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(j, "replacement");
    if (!cJSON_IsString(r) || r->valuestring[0] == 0) {
        LD_ERR(ld, "%s without a \"replacement\" string", what);
        return -1;
    }
    size_t bad;
    int cl;
    uint32_t cp;
    size_t rl = strlen(r->valuestring);
    if (!tok_utf8_valid(r->valuestring, rl, &bad) ||
        (cl = tok_utf8_next(r->valuestring, rl, 0, &cp), (size_t)cl != rl)) {
        LD_ERR(ld, "%s: replacement is not one character", what);
        return -1;
    }
    const cJSON *ps = cJSON_GetObjectItemCaseSensitive(j, "prepend_scheme");
    if (cJSON_IsString(ps)) {
        if (strcmp(ps->valuestring, "always") == 0)
            *scheme = TOK_PREPEND_ALWAYS;
        else if (strcmp(ps->valuestring, "first") == 0)
            *scheme = TOK_PREPEND_FIRST;
        else if (strcmp(ps->valuestring, "never") == 0)
            *scheme = TOK_PREPEND_NEVER;
        else {
            LD_ERR(ld, "%s: prepend_scheme \"%.20s\" is not supported", what, ps->valuestring);
            return -1;
        }
    } else {
        int aps; /* older files: add_prefix_space (default true) */
        if (tok_j_bool(ld, j, "add_prefix_space", 1, &aps, what)) return -1;
        *scheme = aps ? TOK_PREPEND_ALWAYS : TOK_PREPEND_NEVER;
    }
    if (split && tok_j_bool(ld, j, "split", 1, split, what)) return -1;
    *repl = tok_strndup(r->valuestring, rl);
    if (!*repl) {
        LD_ERR(ld, "out of memory");
        return -1;
    }
    return 0;
}

int tok_parse_pre(tok_ld *ld, const cJSON *j, int depth)
{
    if (!j || cJSON_IsNull(j)) return 0;
    const char *ty = tok_j_type_name(j);
    if (!ty) {
        LD_ERR(ld, "pre_tokenizer has no \"type\"");
        return -1;
    }
    tok_pre p;
    memset(&p, 0, sizeof p);
    char msg[256];
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = seq_list(ld, j, "pretokenizers", "pre_tokenizer", depth), *e;
        if (!list) return -1;
        cJSON_ArrayForEach(e, list) if (tok_parse_pre(ld, e, depth + 1)) return -1;
        return 0;
    }
    if (strcmp(ty, "ByteLevel") == 0) {
        int use_regex;
        p.kind = TOK_PRE_BYTELEVEL;
        if (tok_j_bool(ld, j, "add_prefix_space", 1, &p.add_prefix_space,
                       "pre_tokenizer ByteLevel") ||
            tok_j_bool(ld, j, "use_regex", 1, &use_regex, "pre_tokenizer ByteLevel"))
            return -1;
        if (use_regex) {
            p.re =
                tok_re_compile(tok_gpt2_pattern, sizeof tok_gpt2_pattern - 1, 0, msg, sizeof msg);
            if (!p.re) {
                LD_ERR(ld, "PCRE2 rejects the GPT-2 pattern: %s", msg);
                return -1;
            }
        }
        p.behavior = TOK_SPLIT_ISOLATED;
    } else if (strcmp(ty, "Split") == 0) {
        p.kind = TOK_PRE_SPLIT;
        if (parse_behavior(ld, j, &p.behavior, "pre_tokenizer Split") ||
            tok_j_bool(ld, j, "invert", 0, &p.invert, "pre_tokenizer Split"))
            return -1;
        p.re = parse_pattern(ld, cJSON_GetObjectItemCaseSensitive(j, "pattern"),
                             "pre_tokenizer Split");
        if (!p.re) return -1;
    } else if (strcmp(ty, "Metaspace") == 0) {
        int split;
        p.kind = TOK_PRE_METASPACE;
        if (parse_metaspace(ld, j, "pre_tokenizer Metaspace", &p.replacement, &p.prepend, &split))
            return -1;
        p.replacement_len = strlen(p.replacement);
        if (split) {
            p.re = tok_re_compile(p.replacement, p.replacement_len, 1, msg, sizeof msg);
            if (!p.re) {
                free(p.replacement);
                LD_ERR(ld, "pre_tokenizer Metaspace: %s", msg);
                return -1;
            }
        }
        p.behavior = TOK_SPLIT_MERGED_NEXT;
    } else if (strcmp(ty, "Digits") == 0) {
        int individual;
        p.kind = TOK_PRE_DIGITS;
        if (tok_j_bool(ld, j, "individual_digits", 0, &individual, "pre_tokenizer Digits"))
            return -1;
        const char *pat = individual ? "\\p{N}" : "\\p{N}+";
        p.re = tok_re_compile(pat, strlen(pat), 0, msg, sizeof msg);
        if (!p.re) {
            LD_ERR(ld, "pre_tokenizer Digits: %s", msg);
            return -1;
        }
        p.behavior = TOK_SPLIT_ISOLATED;
    } else {
        LD_ERR(ld,
               "pre_tokenizer type \"%s\" is not supported (ByteLevel, Split, Metaspace, Digits, "
               "Sequence)",
               ty);
        return -1;
    }
    return push_pre(ld, &p);
}

/* Ids of a TemplateProcessing special token name. */
static int template_ids(tok_ld *ld, const cJSON *special, const char *name, int32_t **ids, int *n)
{
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(special, name);
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(st, "ids");
    if (!cJSON_IsArray(arr)) {
        LD_ERR(ld, "post_processor: special token \"%.60s\" has no \"ids\"", name);
        return -1;
    }
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)
    {
        int32_t id;
        if (tok_j_id(e, &id)) {
            LD_ERR(ld, "post_processor: special token \"%.60s\" has a bad id", name);
            return -1;
        }
        int32_t *ni = realloc(*ids, (size_t)(*n + 1) * sizeof *ni);
        if (!ni) {
            LD_ERR(ld, "out of memory");
            return -1;
        }
        *ids = ni;
        (*ids)[(*n)++] = id;
    }
    return 0;
}

int tok_parse_post(tok_ld *ld, const cJSON *j, int depth)
{
    tok_tokenizer *t = ld->t;
    if (!j || cJSON_IsNull(j)) return 0;
    const char *ty = tok_j_type_name(j);
    if (!ty) {
        LD_ERR(ld, "post_processor has no \"type\"");
        return -1;
    }
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = seq_list(ld, j, "processors", "post_processor", depth), *e;
        if (!list) return -1;
        cJSON_ArrayForEach(e, list) if (tok_parse_post(ld, e, depth + 1)) return -1;
        return 0;
    }
    if (strcmp(ty, "ByteLevel") == 0) return 0; /* only trims offsets, which we do not return */
    if (strcmp(ty, "TemplateProcessing") == 0) {
        if (t->n_prefix || t->n_suffix) {
            LD_ERR(ld, "post_processor: two templates");
            return -1;
        }
        const cJSON *single = cJSON_GetObjectItemCaseSensitive(j, "single");
        const cJSON *special = cJSON_GetObjectItemCaseSensitive(j, "special_tokens");
        if (!cJSON_IsArray(single)) {
            LD_ERR(ld, "post_processor TemplateProcessing without a \"single\" array");
            return -1;
        }
        int seen_seq = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, single)
        {
            const cJSON *sp = cJSON_GetObjectItemCaseSensitive(e, "SpecialToken");
            const cJSON *sq = cJSON_GetObjectItemCaseSensitive(e, "Sequence");
            if (cJSON_IsObject(sq)) {
                const cJSON *id = cJSON_GetObjectItemCaseSensitive(sq, "id");
                if (seen_seq || !cJSON_IsString(id) || strcmp(id->valuestring, "A") != 0) {
                    LD_ERR(ld, "post_processor: \"single\" must hold sequence A once");
                    return -1;
                }
                seen_seq = 1;
            } else if (cJSON_IsObject(sp)) {
                const cJSON *id = cJSON_GetObjectItemCaseSensitive(sp, "id");
                if (!cJSON_IsString(id)) {
                    LD_ERR(ld, "post_processor: SpecialToken without an id");
                    return -1;
                }
                if (seen_seq
                        ? template_ids(ld, special, id->valuestring, &t->pp_suffix, &t->n_suffix)
                        : template_ids(ld, special, id->valuestring, &t->pp_prefix, &t->n_prefix))
                    return -1;
            } else {
                LD_ERR(ld,
                       "post_processor: a \"single\" item is neither SpecialToken nor Sequence");
                return -1;
            }
        }
        if (!seen_seq) {
            LD_ERR(ld, "post_processor: \"single\" has no sequence");
            return -1;
        }
        return 0;
    }
    if (strcmp(ty, "BertProcessing") == 0 || strcmp(ty, "RobertaProcessing") == 0) {
        const cJSON *cls = cJSON_GetObjectItemCaseSensitive(j, "cls");
        const cJSON *sep = cJSON_GetObjectItemCaseSensitive(j, "sep");
        int32_t ci, si;
        if (!cJSON_IsArray(cls) || !cJSON_IsArray(sep) ||
            tok_j_id(cJSON_GetArrayItem(cls, 1), &ci) ||
            tok_j_id(cJSON_GetArrayItem(sep, 1), &si)) {
            LD_ERR(ld, "post_processor %s without [token, id] cls / sep", ty);
            return -1;
        }
        t->pp_prefix = malloc(sizeof(int32_t));
        t->pp_suffix = malloc(sizeof(int32_t));
        if (!t->pp_prefix || !t->pp_suffix) {
            LD_ERR(ld, "out of memory");
            return -1;
        }
        t->pp_prefix[0] = ci;
        t->pp_suffix[0] = si;
        t->n_prefix = t->n_suffix = 1;
        return 0;
    }
    LD_ERR(ld,
           "post_processor type \"%s\" is not supported (TemplateProcessing, ByteLevel, "
           "BertProcessing, RobertaProcessing, Sequence)",
           ty);
    return -1;
}

int tok_parse_decoder(tok_ld *ld, const cJSON *j, tok_dec_cfg *c, int depth)
{
    tok_tokenizer *t = ld->t;
    if (!j || cJSON_IsNull(j)) return 0;
    const char *ty = tok_j_type_name(j);
    if (!ty) {
        LD_ERR(ld, "decoder has no \"type\"");
        return -1;
    }
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = seq_list(ld, j, "decoders", "decoder", depth), *e;
        if (!list) return -1;
        cJSON_ArrayForEach(e, list) if (tok_parse_decoder(ld, e, c, depth + 1)) return -1;
        return 0;
    }
    if (t->dec_strip_n) {
        LD_ERR(ld, "decoder %s after Strip is not supported", ty);
        return -1;
    }
    if (strcmp(ty, "ByteLevel") == 0) {
        c->bytelevel = 1;
    } else if (strcmp(ty, "ByteFallback") == 0) {
        c->bytefallback = 1;
    } else if (strcmp(ty, "Fuse") == 0) {
        c->fused = 1;
    } else if (strcmp(ty, "Replace") == 0) {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "pattern");
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(p, "String");
        const cJSON *ct = cJSON_GetObjectItemCaseSensitive(j, "content");
        if (!cJSON_IsString(s) || s->valuestring[0] == 0 || !cJSON_IsString(ct)) {
            LD_ERR(ld, "decoder Replace: only a {\"String\": ...} pattern and a content string "
                       "are supported");
            return -1;
        }
        if (c->fused) {
            LD_ERR(ld, "decoder Replace after Fuse is not supported");
            return -1;
        }
        if (c->n_repl == 8) {
            LD_ERR(ld, "decoder: more than 8 Replace steps");
            return -1;
        }
        c->repl_from[c->n_repl] = tok_strndup(s->valuestring, strlen(s->valuestring));
        c->repl_to[c->n_repl] = tok_strndup(ct->valuestring, strlen(ct->valuestring));
        c->n_repl++;
        if (!c->repl_from[c->n_repl - 1] || !c->repl_to[c->n_repl - 1]) {
            LD_ERR(ld, "out of memory");
            return -1;
        }
    } else if (strcmp(ty, "Strip") == 0) {
        const cJSON *ct = cJSON_GetObjectItemCaseSensitive(j, "content");
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(j, "start");
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(j, "stop");
        size_t bad;
        uint32_t cp;
        if (!cJSON_IsString(ct) || !cJSON_IsNumber(st) || !cJSON_IsNumber(sp) ||
            ct->valuestring[0] == 0 ||
            !tok_utf8_valid(ct->valuestring, strlen(ct->valuestring), &bad) ||
            (size_t)tok_utf8_next(ct->valuestring, strlen(ct->valuestring), 0, &cp) !=
                strlen(ct->valuestring) ||
            st->valuedouble < 0 || st->valuedouble > 64) {
            LD_ERR(ld, "decoder Strip needs a one-character content and start/stop counts");
            return -1;
        }
        if (sp->valuedouble != 0) {
            LD_ERR(ld, "decoder Strip with stop > 0 is not supported");
            return -1;
        }
        if (!c->fused && st->valuedouble > 0) {
            LD_ERR(ld, "decoder Strip before Fuse (a strip of every token) is not supported");
            return -1;
        }
        t->dec_strip_n = (int)st->valuedouble;
        t->dec_strip_cp = cp;
    } else if (strcmp(ty, "Metaspace") == 0) {
        char *repl = NULL;
        tok_prepend_scheme scheme;
        if (parse_metaspace(ld, j, "decoder Metaspace", &repl, &scheme, NULL)) return -1;
        if (c->n_repl == 8) {
            free(repl);
            LD_ERR(ld, "decoder: more than 8 Replace steps");
            return -1;
        }
        c->repl_from[c->n_repl] = repl;
        c->repl_to[c->n_repl] = tok_strndup(" ", 1);
        c->n_repl++;
        if (!c->repl_to[c->n_repl - 1]) {
            LD_ERR(ld, "out of memory");
            return -1;
        }
        c->metaspace = 1;
        if (scheme != TOK_PREPEND_NEVER) t->dec_strip_first_space = 1;
    } else {
        LD_ERR(ld,
               "decoder type \"%s\" is not supported (ByteLevel, ByteFallback, Fuse, Replace, "
               "Strip, Metaspace, Sequence)",
               ty);
        return -1;
    }
    return 0;
}

/* Append s with every Replace rule applied (in order, each on the previous result). */
static int apply_repl(const tok_dec_cfg *c, const char *s, size_t len, char **out, size_t *olen)
{
    char *cur = tok_strndup(s, len);
    size_t cl = len;
    if (!cur) return -1;
    for (int r = 0; r < c->n_repl; r++) {
        size_t fl = strlen(c->repl_from[r]), tl = strlen(c->repl_to[r]);
        size_t count = 0;
        for (size_t i = 0; i + fl <= cl;)
            if (memcmp(cur + i, c->repl_from[r], fl) == 0) {
                count++;
                i += fl;
            } else {
                i++;
            }
        if (!count) continue;
        char *n = malloc(cl + count * tl + 1);
        if (!n) {
            free(cur);
            return -1;
        }
        size_t o = 0;
        for (size_t i = 0; i < cl;)
            if (i + fl <= cl && memcmp(cur + i, c->repl_from[r], fl) == 0) {
                memcpy(n + o, c->repl_to[r], tl);
                o += tl;
                i += fl;
            } else {
                n[o++] = cur[i++];
            }
        n[o] = 0;
        free(cur);
        cur = n;
        cl = o;
    }
    *out = cur;
    *olen = cl;
    return 0;
}

/* Per id, the bytes the decoder chain makes of it. */
int tok_build_decoder(tok_ld *ld, const tok_dec_cfg *c)
{
    tok_tokenizer *t = ld->t;
    size_t total = 0, cap = 4096;
    t->dec_off = malloc((size_t)(t->n_vocab + 1) * sizeof *t->dec_off);
    t->dec_pool = malloc(cap);
    if (!t->dec_off || !t->dec_pool) goto oom;
    for (int id = 0; id < t->n_vocab; id++) {
        t->dec_off[id] = (uint32_t)total;
        if (!t->str[id]) continue;
        const char *s = t->str[id];
        size_t len = t->str_len[id];
        char *piece = NULL, one[1];
        size_t pl = 0;
        int byte;
        if (c->bytefallback && (t->flags[id] & TOKF_BYTE) && tok_is_byte_token(s, len, &byte)) {
            one[0] = (char)byte;
            s = one;
            len = 1;
        } else if (c->bytelevel && !(t->flags[id] & TOKF_ADDED)) {
            /* every char must be in the byte map; else the token's own bytes (as HF does) */
            piece = malloc(len + 1);
            if (!piece) goto oom;
            size_t bad;
            int ok = tok_utf8_valid(s, len, &bad);
            for (size_t i = 0; ok && i < len;) {
                uint32_t cp;
                i += (size_t)tok_utf8_next(s, len, i, &cp);
                int b = tok_cp_byte(cp);
                if (b < 0)
                    ok = 0;
                else
                    piece[pl++] = (char)b;
            }
            if (ok) {
                s = piece;
                len = pl;
            }
        } else if (c->n_repl) {
            if (apply_repl(c, s, len, &piece, &pl)) goto oom;
            s = piece;
            len = pl;
        }
        if (total + len > UINT32_MAX) {
            free(piece);
            LD_ERR(ld, "decoded vocab larger than 4 GB");
            return -1;
        }
        if (total + len > cap) {
            while (total + len > cap) cap *= 2;
            char *np = realloc(t->dec_pool, cap);
            if (!np) {
                free(piece);
                goto oom;
            }
            t->dec_pool = np;
        }
        memcpy(t->dec_pool + total, s, len);
        total += len;
        if (len > t->dec_max) t->dec_max = len;
        free(piece);
    }
    t->dec_off[t->n_vocab] = (uint32_t)total;
    return 0;
oom:
    LD_ERR(ld, "out of memory");
    return -1;
}
