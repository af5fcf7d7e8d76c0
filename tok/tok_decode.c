/* tok/tok_decode.c — ids -> text (tok_decode and the tok_stream_* of tok.h).
 *
 * Every id contributes the bytes precomputed at load (tok->dec_pool: Replace applied, a
 * <0xNN> byte token its byte, a byte-level token its bytes); the concatenation goes through
 * one lossy UTF-8 decoder (the WHATWG / Unicode "maximal subpart" rule: each invalid
 * sequence becomes one U+FFFD, as TextDecoder and Rust's from_utf8_lossy do); then the
 * decoder's Strip drops its leading characters. Literal tokens (added tokens, SentencePiece
 * pieces) are valid UTF-8, so decoding them inside the same byte stream gives what decoding
 * each byte run separately gives.
 *
 * tok_decode is the stream run over all ids, so streaming equals decoding by construction;
 * the stream holds back only an incomplete UTF-8 sequence (at most 3 bytes).
 */
#include <stdlib.h>
#include <string.h>

#include "tok/tok.h"
#include "tok/tok_impl.h"

struct tok_stream {
    const tok_tokenizer *t;
    int skip_special;
    int first_token; /* no token taken yet (the Metaspace decoder's first-token strip) */
    int strip_left;  /* leading characters the Strip decoder may still drop */
    /* UTF-8 decoder state: an incomplete sequence of pend_n bytes, need more to come */
    uint8_t pend[4];
    int pend_n, need;
    uint8_t lo, hi; /* the allowed range of the next byte */
    char *out;      /* [out_cap] the text of the last push / flush */
    size_t out_len, out_cap;
};

static const char tok_fffd[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

static int out_reserve(tok_stream *s, size_t more)
{
    if (s->out_len + more <= s->out_cap) return 0;
    size_t nc = s->out_cap ? s->out_cap : 64;
    while (nc < s->out_len + more) nc *= 2;
    char *n = realloc(s->out, nc);
    if (!n) return -1;
    s->out = n;
    s->out_cap = nc;
    return 0;
}

/* One complete character (or U+FFFD) reaches the output; the Strip decoder may drop it. */
static void emit_char(tok_stream *s, const char *c, int n)
{
    if (s->strip_left > 0) {
        uint32_t cp;
        tok_utf8_next(c, (size_t)n, 0, &cp);
        if (n == 3 && memcmp(c, tok_fffd, 3) == 0) cp = 0xFFFD;
        if (cp == s->t->dec_strip_cp) {
            s->strip_left--;
            return;
        }
        s->strip_left = 0;
    }
    memcpy(s->out + s->out_len, c, (size_t)n);
    s->out_len += (size_t)n;
}

static void utf8_reset(tok_stream *s)
{
    s->pend_n = s->need = 0;
    s->lo = 0x80;
    s->hi = 0xBF;
}

/* Room needed: each byte can emit U+FFFD for a broken sequence and then itself. */
static void feed_byte(tok_stream *s, uint8_t b)
{
    for (;;) {
        if (s->need == 0) {
            if (b < 0x80) {
                char c = (char)b;
                emit_char(s, &c, 1);
                return;
            }
            if (b >= 0xC2 && b <= 0xDF)
                s->need = 1;
            else if (b >= 0xE0 && b <= 0xEF) {
                s->need = 2;
                if (b == 0xE0) s->lo = 0xA0;
                if (b == 0xED) s->hi = 0x9F;
            } else if (b >= 0xF0 && b <= 0xF4) {
                s->need = 3;
                if (b == 0xF0) s->lo = 0x90;
                if (b == 0xF4) s->hi = 0x8F;
            } else {
                emit_char(s, tok_fffd, 3);
                return;
            }
            s->pend[0] = b;
            s->pend_n = 1;
            return;
        }
        if (b < s->lo || b > s->hi) {
            /* the pending sequence is broken: one U+FFFD, then b starts afresh */
            utf8_reset(s);
            emit_char(s, tok_fffd, 3);
            continue;
        }
        s->lo = 0x80;
        s->hi = 0xBF;
        s->pend[s->pend_n++] = b;
        if (--s->need == 0) {
            emit_char(s, (const char *)s->pend, s->pend_n);
            s->pend_n = 0;
        }
        return;
    }
}

tok_stream *tok_stream_new(const tok_tokenizer *t, int skip_special)
{
    if (!t) return NULL;
    tok_stream *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->t = t;
    s->skip_special = skip_special;
    /* sized once: a push emits at most 6 bytes per input byte, plus the flushed U+FFFD */
    s->out_cap = 6 * t->dec_max + 16;
    s->out = malloc(s->out_cap);
    if (!s->out) {
        free(s);
        return NULL;
    }
    tok_stream_reset(s);
    return s;
}

void tok_stream_reset(tok_stream *s)
{
    if (!s) return;
    s->first_token = 1;
    s->strip_left = s->t->dec_strip_n;
    s->out_len = 0;
    utf8_reset(s);
}

void tok_stream_free(tok_stream *s)
{
    if (!s) return;
    free(s->out);
    free(s);
}

int tok_stream_push(tok_stream *s, int32_t id, const char **piece, size_t *len, char *err,
                    size_t errlen)
{
    if (piece) *piece = "";
    if (len) *len = 0;
    if (!s) {
        base_set_err(err, errlen, "tok_stream_push: no stream");
        return -1;
    }
    const tok_tokenizer *t = s->t;
    if (id < 0 || id >= t->n_vocab || !t->str[id]) {
        base_set_err(err, errlen, "%s: id %d is not in the vocab (%d tokens)", t->name, (int)id,
                     t->n_vocab);
        return -1;
    }
    s->out_len = 0;
    if (s->skip_special && (t->flags[id] & TOKF_SPECIAL)) {
        if (piece) *piece = s->out;
        return 0;
    }
    const uint8_t *p = (const uint8_t *)t->dec_pool + t->dec_off[id];
    size_t n = t->dec_off[id + 1] - t->dec_off[id];
    if (s->first_token && t->dec_strip_first_space && n > 0 && p[0] == ' ') {
        p++;
        n--;
    }
    if (out_reserve(s, 6 * n + 16)) {
        base_set_err(err, errlen, "%s: out of memory", t->name);
        return -1;
    }
    if (!s->first_token && t->dec_join_space) feed_byte(s, ' ');
    s->first_token = 0;
    for (size_t i = 0; i < n; i++) feed_byte(s, p[i]);
    if (piece) *piece = s->out;
    if (len) *len = s->out_len;
    s->out[s->out_len] = 0;
    return 0;
}

int tok_stream_flush(tok_stream *s, const char **piece, size_t *len)
{
    if (piece) *piece = "";
    if (len) *len = 0;
    if (!s) return -1;
    s->out_len = 0;
    if (s->need) { /* an incomplete sequence at the end: one U+FFFD */
        utf8_reset(s);
        emit_char(s, tok_fffd, 3);
    }
    s->out[s->out_len] = 0;
    if (piece) *piece = s->out;
    if (len) *len = s->out_len;
    return 0;
}

int tok_decode(const tok_tokenizer *t, const int32_t *ids, int n, int skip_special, char **text,
               size_t *len, char *err, size_t errlen)
{
    if (text) *text = NULL;
    if (len) *len = 0;
    if (!t || !text || (!ids && n > 0) || n < 0) {
        base_set_err(err, errlen, "tok_decode: no tokenizer, ids or output");
        return -1;
    }
    tok_stream *s = tok_stream_new(t, skip_special);
    size_t cap = 64, used = 0;
    char *res = malloc(cap);
    if (!s || !res) goto oom;
    for (int i = 0; i <= n; i++) {
        const char *piece;
        size_t pl;
        if (i < n) {
            if (tok_stream_push(s, ids[i], &piece, &pl, err, errlen)) goto fail;
        } else {
            tok_stream_flush(s, &piece, &pl);
        }
        if (used + pl + 1 > cap) {
            while (used + pl + 1 > cap) cap *= 2;
            char *nr = realloc(res, cap);
            if (!nr) goto oom;
            res = nr;
        }
        memcpy(res + used, piece, pl);
        used += pl;
    }
    res[used] = 0;
    tok_stream_free(s);
    *text = res;
    if (len) *len = used;
    return 0;
oom:
    base_set_err(err, errlen, "%s: out of memory while decoding", t->name);
fail:
    tok_stream_free(s);
    free(res);
    return -1;
}
