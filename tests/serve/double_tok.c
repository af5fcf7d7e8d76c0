/* tests/serve/double_tok.c — TEST DOUBLE of tok/tok.h for the HTTP layer's unit tests (the
 * product and the end-to-end tests use the real tokenizer). Bytes are ids 0..255, "<s>" is
 * 256 (BOS), "</s>" 257 (EOS); with add_special a BOS is prepended and "</s>" in the text is
 * the EOS id. The stream holds back incomplete UTF-8 sequences. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tok/tok.h"

struct tok_tokenizer {
    int dummy;
};
static struct tok_tokenizer the_tok;

int tok_load(const char *path, tok_tokenizer **out, char *err, size_t errlen)
{
    (void)path;
    (void)err;
    (void)errlen;
    *out = &the_tok;
    return 0;
}
void tok_free(tok_tokenizer *t) { (void)t; }
int tok_vocab_size(const tok_tokenizer *t)
{
    (void)t;
    return 258;
}
int tok_bos(const tok_tokenizer *t)
{
    (void)t;
    return 256;
}
int tok_eos(const tok_tokenizer *t)
{
    (void)t;
    return 257;
}
int tok_is_special(const tok_tokenizer *t, int32_t id)
{
    (void)t;
    return id >= 256;
}

size_t tok_max_piece_bytes(const tok_tokenizer *t)
{
    (void)t;
    return 4; /* "</s>" */
}

int tok_encode(const tok_tokenizer *t, const char *text, size_t len, int add_special, int32_t **ids,
               int *n_ids, char *err, size_t errlen)
{
    (void)t;
    (void)err;
    (void)errlen;
    *ids = malloc((len + 1) * sizeof **ids);
    int n = 0;
    if (add_special) (*ids)[n++] = 256;
    for (size_t i = 0; i < len; i++) {
        if (add_special && i + 4 <= len && !memcmp(text + i, "</s>", 4)) {
            (*ids)[n++] = 257;
            i += 3;
            continue;
        }
        (*ids)[n++] = (unsigned char)text[i];
    }
    *n_ids = n;
    return 0;
}

int tok_decode(const tok_tokenizer *t, const int32_t *ids, int n, int skip_special, char **text,
               size_t *len, char *err, size_t errlen)
{
    (void)t;
    char *s = malloc((size_t)n * 4 + 1);
    size_t k = 0;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] > 257) {
            free(s);
            snprintf(err, errlen, "id %d out of range", ids[i]);
            return -1;
        }
        if (ids[i] >= 256) {
            if (!skip_special) {
                const char *p = ids[i] == 256 ? "<s>" : "</s>";
                memcpy(s + k, p, strlen(p));
                k += strlen(p);
            }
            continue;
        }
        s[k++] = (char)ids[i];
    }
    s[k] = 0;
    *text = s;
    *len = k;
    return 0;
}

struct tok_stream {
    int skip;
    char buf[64];
    size_t n;
    char out[80];
};

tok_stream *tok_stream_new(const tok_tokenizer *t, int skip_special)
{
    (void)t;
    tok_stream *s = calloc(1, sizeof *s);
    if (s) s->skip = skip_special;
    return s;
}

/* bytes of buf that form complete UTF-8 characters */
static size_t complete(const char *b, size_t n)
{
    size_t i = 0, ok = 0;
    while (i < n) {
        unsigned char c = (unsigned char)b[i];
        size_t k = c < 0x80             ? 1
                   : (c & 0xE0) == 0xC0 ? 2
                   : (c & 0xF0) == 0xE0 ? 3
                   : (c & 0xF8) == 0xF0 ? 4
                                        : 1;
        if (i + k > n) break;
        i += k;
        ok = i;
    }
    return ok;
}

int tok_stream_push(tok_stream *s, int32_t id, const char **piece, size_t *len, char *err,
                    size_t errlen)
{
    if (id < 0 || id > 257) {
        snprintf(err, errlen, "id %d out of range", id);
        return -1;
    }
    if (id >= 256) {
        if (s->skip) {
            *piece = "";
            *len = 0;
            return 0;
        }
        const char *p = id == 256 ? "<s>" : "</s>";
        memcpy(s->buf + s->n, p, strlen(p));
        s->n += strlen(p);
    } else {
        s->buf[s->n++] = (char)id;
    }
    size_t k = complete(s->buf, s->n);
    memcpy(s->out, s->buf, k);
    s->out[k] = 0;
    memmove(s->buf, s->buf + k, s->n - k);
    s->n -= k;
    *piece = s->out;
    *len = k;
    return 0;
}

int tok_stream_flush(tok_stream *s, const char **piece, size_t *len)
{
    memcpy(s->out, s->buf, s->n);
    *len = s->n;
    s->out[s->n] = 0;
    s->n = 0;
    *piece = s->out;
    return 0;
}
void tok_stream_reset(tok_stream *s) { s->n = 0; }
void tok_stream_free(tok_stream *s) { free(s); }
