/* tok/tok_encode.c — text -> ids (tok_encode of tok.h).
 *
 * Pipeline, as in Hugging Face tokenizers: added tokens are cut out of the raw text first
 * (leftmost-longest; special ones only when add_special), each remaining section goes through
 * the normalizer, the pre-tokenizers split it into pieces, and BPE turns every piece into ids;
 * the post-processor's template ids go around the result.
 *
 * BPE is the usual rank-ordered merge: a piece's symbols form a linked list and a binary
 * min-heap holds the candidate pairs by (rank, position), so a piece of n characters costs
 * O(n log n) whatever its length (a SentencePiece-style tokenizer without a pre-tokenizer
 * sees a whole section as one piece).
 *
 * Memory: one workspace per call (growable arrays reused across pieces); nothing is cached in
 * the tokenizer, so concurrent calls on one tokenizer are safe.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include "tok/tok.h"
#include "tok/tok_impl.h"

const tok_merge_ent *tok_merges_get(const tok_merges *mg, int32_t a, int32_t b);

#define TOK_MAX_TEXT ((size_t)1 << 28) /* keeps every piece index in int32 after normalizing */

/* ---- growable buffers ------------------------------------------------------------------------ */

typedef struct {
    size_t off, len;
} tok_span;

/* Pieces of text: their bytes back to back in buf, spans into it. */
typedef struct {
    char *buf; /* [cap] */
    size_t len, cap;
    tok_span *sp; /* [sp_cap] */
    size_t n, sp_cap;
} tok_pieces;

typedef struct {
    int32_t rank, left, right, a, b, merged;
} tok_heap_ent;

typedef struct {
    const tok_tokenizer *t;
    char *err;
    size_t errlen;
    pcre2_match_data *md;
    pcre2_match_context *mctx; /* the backtracking limit of this call (see tok_encode) */
    tok_pieces p[2];           /* ping-pong between pre-tokenizer steps */
    char *nbuf[2];             /* normalizer ping-pong, [nbuf_cap[i]] */
    size_t nbuf_cap[2];
    UChar *u16[2]; /* NFC: the text as UTF-16 and its normal form, [u16_cap[i]] */
    size_t u16_cap[2];
    /* BPE, [sym_cap] each */
    int32_t *sym, *prev, *next;
    size_t sym_cap;
    tok_heap_ent *heap; /* [heap_cap] */
    size_t heap_n, heap_cap;
    /* output */
    int32_t *ids; /* [ids_cap] */
    size_t n_ids, ids_cap;
} tok_ws;

static int ws_oom(tok_ws *w)
{
    base_set_err(w->err, w->errlen, "%s: out of memory while encoding", w->t->name);
    return -1;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return 0;
    size_t nc = *cap ? *cap : 64;
    while (nc < need) nc *= 2;
    void *np = realloc(*p, nc * elem);
    if (!np) return -1;
    *p = np;
    *cap = nc;
    return 0;
}

static int pieces_add(tok_ws *w, tok_pieces *P, const char *s, size_t len)
{
    if (grow((void **)&P->buf, &P->cap, P->len + len + 1, 1) ||
        grow((void **)&P->sp, &P->sp_cap, P->n + 1, sizeof *P->sp))
        return ws_oom(w);
    memcpy(P->buf + P->len, s, len);
    P->sp[P->n].off = P->len;
    P->sp[P->n].len = len;
    P->len += len;
    P->n++;
    return 0;
}

/* Extend the last piece (which ends the buffer) by s. */
static int pieces_append(tok_ws *w, tok_pieces *P, const char *s, size_t len)
{
    if (grow((void **)&P->buf, &P->cap, P->len + len + 1, 1)) return ws_oom(w);
    memcpy(P->buf + P->len, s, len);
    P->len += len;
    P->sp[P->n - 1].len += len;
    return 0;
}

static int push_id(tok_ws *w, int32_t id)
{
    if (grow((void **)&w->ids, &w->ids_cap, w->n_ids + 1, sizeof *w->ids)) return ws_oom(w);
    w->ids[w->n_ids++] = id;
    return 0;
}

/* ---- regex iteration ------------------------------------------------------------------------- */

/* Next non-empty match of re in s[0..len) at or after *pos: 1 with [*ms, *me), 0 none, -1
 * error. An empty match is retried anchored and non-empty at the same place, then skipped
 * by one character (the Perl / Rust iteration rule). */
static int re_next(tok_ws *w, const pcre2_code *re, const char *s, size_t len, size_t *pos,
                   size_t *ms, size_t *me)
{
    size_t at = *pos;
    uint32_t opts = 0;
    while (at <= len) {
        int rc = pcre2_match(re, (PCRE2_SPTR)s, len, at, opts | PCRE2_NO_UTF_CHECK, w->md, w->mctx);
        if (rc == PCRE2_ERROR_NOMATCH) {
            if (opts == 0) return 0;
            /* no non-empty match here: move one character on */
            if (at >= len) return 0;
            uint32_t cp;
            at += (size_t)tok_utf8_next(s, len, at, &cp);
            opts = 0;
            continue;
        }
        if (rc < 0) {
            PCRE2_UCHAR msg[120];
            pcre2_get_error_message(rc, msg, sizeof msg);
            base_set_err(w->err, w->errlen, "%s: regex match failed: %s", w->t->name,
                         (const char *)msg);
            return -1;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(w->md);
        if (ov[1] > ov[0]) {
            *ms = ov[0];
            *me = ov[1];
            *pos = ov[1];
            return 1;
        }
        at = ov[0];
        opts = PCRE2_NOTEMPTY_ATSTART | PCRE2_ANCHORED;
    }
    return 0;
}

/* ---- normalizers ----------------------------------------------------------------------------- */

/* Next occurrence of the normalizer's pattern in s[0..len) from *pos (as re_next). */
static int norm_next(tok_ws *w, const tok_norm *n, const char *s, size_t len, size_t *pos,
                     size_t *ms, size_t *me)
{
    if (!n->lit) return re_next(w, n->re, s, len, pos, ms, me);
    if (*pos >= len) return 0;
    const char *hit = memmem(s + *pos, len - *pos, n->lit, n->lit_len);
    if (!hit) return 0;
    *ms = (size_t)(hit - s);
    *me = *pos = *ms + n->lit_len;
    return 1;
}

/* dst = NFC(src [len]) in w->nbuf[which] (*dlen bytes). ICU works on UTF-16: the text goes
 * there and back through the workspace's buffers, which grow with the text and are kept. */
static int nfc(tok_ws *w, const char *src, size_t len, int which, size_t *dlen)
{
    UErrorCode st = U_ZERO_ERROR;
    const UNormalizer2 *n2 = unorm2_getNFCInstance(&st);
    if (U_FAILURE(st) || len > INT32_MAX / 2) {
        base_set_err(w->err, w->errlen, "%s: NFC normalizer: %s", w->t->name,
                     U_FAILURE(st) ? u_errorName(st) : "text too long");
        return -1;
    }
    /* UTF-8 -> UTF-16 at most one unit per byte; NFC of UTF-16 at most 3x (Unicode's bound) */
    if (grow((void **)&w->u16[0], &w->u16_cap[0], len + 1, sizeof(UChar)) ||
        grow((void **)&w->u16[1], &w->u16_cap[1], 3 * len + 1, sizeof(UChar)))
        return ws_oom(w);
    int32_t n16 = 0, nn = 0, n8 = 0;
    u_strFromUTF8(w->u16[0], (int32_t)w->u16_cap[0], &n16, src, (int32_t)len, &st);
    if (U_SUCCESS(st))
        nn = unorm2_normalize(n2, w->u16[0], n16, w->u16[1], (int32_t)w->u16_cap[1], &st);
    /* back to UTF-8: at most 3 bytes per UTF-16 unit */
    if (U_SUCCESS(st) && grow((void **)&w->nbuf[which], &w->nbuf_cap[which], 3 * (size_t)nn + 1, 1))
        return ws_oom(w);
    if (U_SUCCESS(st))
        u_strToUTF8(w->nbuf[which], (int32_t)w->nbuf_cap[which], &n8, w->u16[1], nn, &st);
    if (U_FAILURE(st)) {
        base_set_err(w->err, w->errlen, "%s: NFC normalizer: %s", w->t->name, u_errorName(st));
        return -1;
    }
    *dlen = (size_t)n8;
    return 0;
}

static int normalize(tok_ws *w, const char *s, size_t len, const char **out, size_t *olen)
{
    const tok_tokenizer *t = w->t;
    const char *cur = s;
    size_t cl = len;
    int which = 0;
    for (int k = 0; k < t->n_norm; k++) {
        const tok_norm *n = &t->norm[k];
        if (n->kind == TOK_NORM_NFC) {
            if (nfc(w, cur, cl, which, &cl)) return -1;
        } else if (n->kind == TOK_NORM_PREPEND) {
            if (cl == 0) continue; /* nothing to prepend to */
            if (grow((void **)&w->nbuf[which], &w->nbuf_cap[which], cl + n->str_len + 1, 1))
                return ws_oom(w);
            memcpy(w->nbuf[which], n->str, n->str_len);
            memmove(w->nbuf[which] + n->str_len, cur, cl);
            cl += n->str_len;
        } else {
            size_t pos = 0, ms, me, o = 0, from = 0;
            int r;
            char *dst;
            if (grow((void **)&w->nbuf[which], &w->nbuf_cap[which], cl + 1, 1)) return ws_oom(w);
            while ((r = norm_next(w, n, cur, cl, &pos, &ms, &me)) == 1) {
                size_t need = o + (ms - from) + n->str_len + (cl - me) + 1;
                if (grow((void **)&w->nbuf[which], &w->nbuf_cap[which], need, 1)) return ws_oom(w);
                dst = w->nbuf[which];
                memmove(dst + o, cur + from, ms - from);
                o += ms - from;
                memcpy(dst + o, n->str, n->str_len);
                o += n->str_len;
                from = me;
            }
            if (r < 0) return -1;
            if (grow((void **)&w->nbuf[which], &w->nbuf_cap[which], o + (cl - from) + 1, 1))
                return ws_oom(w);
            memmove(w->nbuf[which] + o, cur + from, cl - from);
            cl = o + (cl - from);
        }
        cur = w->nbuf[which];
        which ^= 1;
    }
    *out = cur;
    *olen = cl;
    return 0;
}

/* ---- pre-tokenizers -------------------------------------------------------------------------- */

/* Split one piece by re into out, per behavior (Hugging Face SplitDelimiterBehavior). */
static int split_piece(tok_ws *w, const tok_pre *p, const char *s, size_t len, tok_pieces *out)
{
    size_t pos = 0, ms, me, at = 0;
    size_t added = 0;   /* pieces this call added */
    int open_next = 0;  /* MERGED_NEXT: the last piece is a delimiter taking what follows */
    int prev_delim = 0; /* CONTIGUOUS */
    for (;;) {
        int r = re_next(w, p->re, s, len, &pos, &ms, &me);
        if (r < 0) return -1;
        if (r == 0) ms = me = len;
        /* two segments: the gap [at, ms) and the match [ms, me) */
        for (int part = 0; part < 2; part++) {
            size_t a = part ? ms : at, b = part ? me : ms;
            if (b <= a) continue;
            int delim = part ^ p->invert;
            int rc = 0;
            switch (p->behavior) {
            case TOK_SPLIT_ISOLATED:
                rc = pieces_add(w, out, s + a, b - a);
                added++;
                break;
            case TOK_SPLIT_REMOVED:
                if (!delim) {
                    rc = pieces_add(w, out, s + a, b - a);
                    added++;
                }
                break;
            case TOK_SPLIT_MERGED_PREV:
                if (delim && added) {
                    rc = pieces_append(w, out, s + a, b - a);
                } else {
                    rc = pieces_add(w, out, s + a, b - a);
                    added++;
                }
                break;
            case TOK_SPLIT_MERGED_NEXT:
                if (!delim && open_next) {
                    rc = pieces_append(w, out, s + a, b - a);
                    open_next = 0;
                } else {
                    rc = pieces_add(w, out, s + a, b - a);
                    added++;
                    open_next = delim;
                }
                break;
            case TOK_SPLIT_CONTIGUOUS:
                if (delim && prev_delim && added) {
                    rc = pieces_append(w, out, s + a, b - a);
                } else {
                    rc = pieces_add(w, out, s + a, b - a);
                    added++;
                }
                prev_delim = delim;
                break;
            }
            if (rc) return -1;
        }
        if (r == 0) break;
        at = me;
    }
    return 0;
}

/* One pre-tokenizer step over every piece of in, into out. first_at_start: in's first piece
 * begins the text (Metaspace's "first" scheme). */
static int pre_step(tok_ws *w, const tok_pre *p, const tok_pieces *in, tok_pieces *out,
                    int first_at_start)
{
    char *tmp = NULL; /* a transformed piece */
    size_t tmp_cap = 0;
    int rc = -1;
    out->len = out->n = 0;
    for (size_t k = 0; k < in->n; k++) {
        const char *s = in->buf + in->sp[k].off;
        size_t len = in->sp[k].len;
        if (p->kind == TOK_PRE_BYTELEVEL) {
            if (p->add_prefix_space && (len == 0 || s[0] != ' ')) {
                if (grow((void **)&tmp, &tmp_cap, len + 2, 1)) goto oom;
                tmp[0] = ' ';
                memcpy(tmp + 1, s, len);
                s = tmp;
                len++;
            }
            size_t start = out->n;
            if (p->re) {
                if (split_piece(w, p, s, len, out)) goto out;
            } else if (len && pieces_add(w, out, s, len)) {
                goto out;
            }
            /* map the new pieces' bytes to the byte-level alphabet, in place at the end */
            if (out->n > start) {
                size_t from = out->sp[start].off, n = out->len - from;
                if (grow((void **)&tmp, &tmp_cap, n + 1, 1)) goto oom;
                memcpy(tmp, out->buf + from, n);
                if (grow((void **)&out->buf, &out->cap, from + 2 * n + 1, 1)) goto oom;
                size_t o = from;
                for (size_t q = start; q < out->n; q++) {
                    size_t a = out->sp[q].off - from, b = a + out->sp[q].len;
                    out->sp[q].off = o;
                    for (size_t i = a; i < b; i++)
                        o += (size_t)tok_utf8_put(out->buf + o, tok_byte_cp[(uint8_t)tmp[i]]);
                    out->sp[q].len = o - out->sp[q].off;
                }
                out->len = o;
            }
        } else if (p->kind == TOK_PRE_METASPACE) {
            /* ' ' -> replacement, then the prepend scheme, then (split) MergedWithNext */
            size_t spaces = 0;
            for (size_t i = 0; i < len; i++) spaces += s[i] == ' ';
            size_t need = len + spaces * p->replacement_len + p->replacement_len + 1;
            if (grow((void **)&tmp, &tmp_cap, need, 1)) goto oom;
            size_t o = 0;
            int prepend = p->prepend == TOK_PREPEND_ALWAYS ||
                          (p->prepend == TOK_PREPEND_FIRST && k == 0 && first_at_start);
            int starts =
                len > 0 && (s[0] == ' ' || (len >= p->replacement_len &&
                                            memcmp(s, p->replacement, p->replacement_len) == 0));
            if (prepend && !starts && len > 0) {
                memcpy(tmp, p->replacement, p->replacement_len);
                o = p->replacement_len;
            }
            for (size_t i = 0; i < len; i++)
                if (s[i] == ' ') {
                    memcpy(tmp + o, p->replacement, p->replacement_len);
                    o += p->replacement_len;
                } else {
                    tmp[o++] = s[i];
                }
            if (p->re) {
                if (split_piece(w, p, tmp, o, out)) goto out;
            } else if (o && pieces_add(w, out, tmp, o)) {
                goto out;
            }
        } else { /* SPLIT, DIGITS */
            if (split_piece(w, p, s, len, out)) goto out;
        }
    }
    rc = 0;
    goto out;
oom:
    ws_oom(w);
out:
    free(tmp);
    return rc;
}

/* ---- BPE ------------------------------------------------------------------------------------- */

static int heap_less(const tok_heap_ent *x, const tok_heap_ent *y)
{
    return x->rank < y->rank || (x->rank == y->rank && x->left < y->left);
}

static int heap_push(tok_ws *w, int32_t left, int32_t right)
{
    const tok_merge_ent *m = tok_merges_get(&w->t->merges, w->sym[left], w->sym[right]);
    if (!m) return 0;
    if (grow((void **)&w->heap, &w->heap_cap, w->heap_n + 1, sizeof *w->heap)) return ws_oom(w);
    tok_heap_ent e = {m->rank, left, right, w->sym[left], w->sym[right], m->merged};
    size_t i = w->heap_n++;
    while (i > 0) {
        size_t par = (i - 1) / 2;
        if (!heap_less(&e, &w->heap[par])) break;
        w->heap[i] = w->heap[par];
        i = par;
    }
    w->heap[i] = e;
    return 0;
}

static tok_heap_ent heap_pop(tok_ws *w)
{
    tok_heap_ent top = w->heap[0], last = w->heap[--w->heap_n];
    size_t i = 0, n = w->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_less(&w->heap[c + 1], &w->heap[c])) c++;
        if (!heap_less(&w->heap[c], &last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n) w->heap[i] = last;
    return top;
}

static int bpe_piece(tok_ws *w, const char *s, size_t len)
{
    const tok_tokenizer *t = w->t;
    if (len == 0) return 0;
    if (t->ignore_merges) {
        int32_t id = tok_map_get(&t->vocab, s, len);
        if (id >= 0) return push_id(w, id);
    }
    /* at most one symbol a byte; sym, prev and next share sym_cap */
    if (len > w->sym_cap) {
        size_t nc = w->sym_cap ? w->sym_cap : 64;
        while (nc < len) nc *= 2;
        int32_t *a = realloc(w->sym, nc * sizeof *a);
        if (a) w->sym = a;
        int32_t *b = a ? realloc(w->prev, nc * sizeof *b) : NULL;
        if (b) w->prev = b;
        int32_t *c = b ? realloc(w->next, nc * sizeof *c) : NULL;
        if (!c) return ws_oom(w);
        w->next = c;
        w->sym_cap = nc;
    }
    int32_t n = 0;
    int last_unk = 0;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        int cl = tok_utf8_next(s, len, i, &cp);
        int32_t id = tok_map_get(&t->vocab, s + i, (size_t)cl);
        if (id >= 0) {
            w->sym[n++] = id;
            last_unk = 0;
        } else {
            int ok = t->byte_fallback;
            for (int k = 0; ok && k < cl; k++) ok = t->byte_id[(uint8_t)s[i + k]] >= 0;
            if (ok) {
                for (int k = 0; k < cl; k++) w->sym[n++] = t->byte_id[(uint8_t)s[i + k]];
                last_unk = 0;
            } else if (t->unk_id >= 0) {
                if (!(t->fuse_unk && last_unk)) w->sym[n++] = t->unk_id;
                last_unk = 1;
            } else {
                base_set_err(w->err, w->errlen,
                             "%s: character U+%04X has no token (no byte fallback, no unk_token)",
                             t->name, (unsigned)cp);
                return -1;
            }
        }
        i += (size_t)cl;
    }
    for (int32_t i = 0; i < n; i++) {
        w->prev[i] = i - 1;
        w->next[i] = i + 1 < n ? i + 1 : -1;
    }
    w->heap_n = 0;
    for (int32_t i = 0; i + 1 < n; i++)
        if (heap_push(w, i, i + 1)) return -1;
    while (w->heap_n) {
        tok_heap_ent e = heap_pop(w);
        /* stale: one side merged since the pair was queued */
        if (w->sym[e.left] != e.a || w->next[e.left] != e.right || w->sym[e.right] != e.b) continue;
        w->sym[e.left] = e.merged;
        int32_t nx = w->next[e.right];
        w->next[e.left] = nx;
        if (nx >= 0) w->prev[nx] = e.left;
        w->sym[e.right] = -1; /* dead */
        w->next[e.right] = -2;
        if (w->prev[e.left] >= 0 && heap_push(w, w->prev[e.left], e.left)) return -1;
        if (nx >= 0 && heap_push(w, e.left, nx)) return -1;
    }
    for (int32_t i = 0; i >= 0; i = w->next[i])
        if (push_id(w, w->sym[i])) return -1;
    return 0;
}

/* ---- sections -------------------------------------------------------------------------------- */

/* Normal text between added tokens: normalize, pre-tokenize, BPE. */
static int encode_section(tok_ws *w, const char *s, size_t len, int at_start)
{
    const tok_tokenizer *t = w->t;
    const char *ns;
    size_t nl;
    if (normalize(w, s, len, &ns, &nl)) return -1;
    if (nl == 0) return 0;
    tok_pieces *in = &w->p[0], *out = &w->p[1];
    in->len = in->n = 0;
    if (pieces_add(w, in, ns, nl)) return -1;
    for (int k = 0; k < t->n_pre; k++) {
        if (pre_step(w, &t->pre[k], in, out, at_start)) return -1;
        tok_pieces *x = in;
        in = out;
        out = x;
    }
    for (size_t k = 0; k < in->n; k++) {
        const char *p = in->buf + in->sp[k].off;
        size_t len = in->sp[k].len, from = 0;
        if (t->sp_split) /* cut before every "▁" run that follows another character */
            for (size_t i = 3; i + 3 <= len; i++)
                if (memcmp(p + i, "\xe2\x96\x81", 3) == 0 &&
                    memcmp(p + i - 3, "\xe2\x96\x81", 3) != 0) {
                    if (bpe_piece(w, p + from, i - from)) return -1;
                    from = i;
                    i += 2;
                }
        if (bpe_piece(w, p + from, len - from)) return -1;
    }
    return 0;
}

static int is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}
static int is_word(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
           (unsigned char)c >= 0x80;
}

static void ws_free(tok_ws *w)
{
    pcre2_match_data_free(w->md);
    pcre2_match_context_free(w->mctx);
    for (int i = 0; i < 2; i++) {
        free(w->p[i].buf);
        free(w->p[i].sp);
        free(w->nbuf[i]);
        free(w->u16[i]);
    }
    free(w->sym);
    free(w->prev);
    free(w->next);
    free(w->heap);
    free(w->ids);
}

int tok_encode(const tok_tokenizer *t, const char *text, size_t len, int add_special, int32_t **ids,
               int *n_ids, char *err, size_t errlen)
{
    if (ids) *ids = NULL;
    if (n_ids) *n_ids = 0;
    if (!t || !ids || !n_ids || (!text && len)) {
        base_set_err(err, errlen, "tok_encode: no tokenizer, text or output");
        return -1;
    }
    if (len > TOK_MAX_TEXT) {
        base_set_err(err, errlen, "%s: text of %zu bytes (limit %zu)", t->name, len, TOK_MAX_TEXT);
        return -1;
    }
    size_t bad;
    if (!tok_utf8_valid(text ? text : "", len, &bad)) {
        base_set_err(err, errlen, "%s: text is not valid UTF-8 (byte %zu)", t->name, bad);
        return -1;
    }
    tok_ws w;
    memset(&w, 0, sizeof w);
    w.t = t;
    w.err = err;
    w.errlen = errlen;
    w.md = pcre2_match_data_create(1, NULL);
    w.mctx = pcre2_match_context_create(NULL);
    if (!w.md || !w.mctx) {
        ws_oom(&w);
        goto fail;
    }
    /* A hostile Split regex must fail, not hang; a real one on a long whitespace run
     * backtracks O(run) once (Llama-3's \s*[\r\n]+), so the bound grows with the text. */
    uint64_t lim = 10000000u + 64u * (uint64_t)len;
    pcre2_set_match_limit(w.mctx, lim > UINT32_MAX ? UINT32_MAX : (uint32_t)lim);
    pcre2_set_depth_limit(w.mctx, 100000);
    if (add_special)
        for (int k = 0; k < t->n_prefix; k++)
            if (push_id(&w, t->pp_prefix[k])) goto fail;

    size_t gap = 0; /* start of the normal text not yet encoded */
    for (size_t i = 0; i < len;) {
        uint8_t b = (uint8_t)text[i];
        const tok_added *hit = NULL;
        for (int q = t->added_first[b]; q < t->added_first[b + 1]; q++) {
            const tok_added *a = &t->added[t->added_order[q]];
            if ((a->special && !add_special) || a->len > len - i ||
                memcmp(text + i, a->content, a->len) != 0)
                continue;
            if (a->single_word && ((i > 0 && is_word(text[i - 1])) ||
                                   (i + a->len < len && is_word(text[i + a->len]))))
                continue;
            hit = a;
            break;
        }
        if (!hit) {
            i++;
            continue;
        }
        size_t end = i, next = i + hit->len;
        if (hit->lstrip)
            while (end > gap && is_ws(text[end - 1])) end--;
        if (hit->rstrip)
            while (next < len && is_ws(text[next])) next++;
        if (end > gap && encode_section(&w, text + gap, end - gap, gap == 0)) goto fail;
        if (push_id(&w, hit->id)) goto fail;
        i = gap = next;
    }
    if (len > gap && encode_section(&w, text + gap, len - gap, gap == 0)) goto fail;
    if (add_special)
        for (int k = 0; k < t->n_suffix; k++)
            if (push_id(&w, t->pp_suffix[k])) goto fail;
    if (w.n_ids > (size_t)0x7fffffff) {
        base_set_err(err, errlen, "%s: too many tokens", t->name);
        goto fail;
    }
    if (w.n_ids == 0 && !w.ids) { /* an empty result is still a malloc'd array */
        w.ids = malloc(sizeof *w.ids);
        if (!w.ids) {
            ws_oom(&w);
            goto fail;
        }
    }
    *ids = w.ids;
    *n_ids = (int)w.n_ids;
    w.ids = NULL;
    ws_free(&w);
    return 0;
fail:
    ws_free(&w);
    return -1;
}
