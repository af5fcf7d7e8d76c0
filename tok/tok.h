/* tok/tok.h — text <-> token ids from a Hugging Face tokenizer.json.
 *
 * Families: BPE with merges as "a b" strings or ["a","b"] pairs; SentencePiece style
 * (Llama-2 / TinyLlama: Prepend/Replace normalizers or Metaspace "▁", byte_fallback
 * <0xNN> tokens, decoder chain Replace/ByteFallback/Fuse/Strip); byte-level (GPT-2,
 * Llama-3: ByteLevel byte<->unicode map, Split pre-tokenizer regex through PCRE2 with
 * Unicode properties, ignore_merges); added / special tokens. BOS / EOS come from
 * tokenizer_config.json (bos_token / eos_token, add_bos_token) or config.json
 * (bos_token_id / eos_token_id) next to tokenizer.json.
 *
 * Anything else (another model / normalizer / pre-tokenizer / decoder / post-processor type,
 * BPE dropout, truncation or padding set) is a load error naming it, never ignored; what is
 * supported in detail: docs/TOKENIZER.md.
 *
 * Special tokens: encoding with add_special adds the post-processor's template ids and
 * matches every added token in the text; without it, "special": true added tokens are plain
 * text (so user text cannot inject them) while other added tokens still match. Decoding is
 * tokenizer.json's decoder chain only (no clean_up_tokenization_spaces), lossy UTF-8 (U+FFFD
 * per invalid sequence).
 *
 * Ownership: tok_load returns a tokenizer the caller frees with tok_free (NULL-safe); it is
 * read-only after loading, so several threads may encode/decode with it at once.
 * Encoded ids and decoded text are malloc'd for the caller.
 * Errors: non-zero return, one line in err naming the file and what is wrong (not JSON,
 * unknown model type, a merge naming a token not in the vocab, a regex PCRE2 rejects, ...).
 */
#ifndef TOK_TOK_H
#define TOK_TOK_H

#include <stddef.h>
#include <stdint.h>

typedef struct tok_tokenizer tok_tokenizer;

/* path: a tokenizer.json file, or a directory holding one (then tokenizer_config.json and
 * config.json there are read for BOS / EOS too). */
int tok_load(const char *path, tok_tokenizer **out, char *err, size_t errlen);
/* The same from a tokenizer.json already in memory (json[0..len), need not be NUL-ended);
 * name is used in messages. No config files are read: BOS is the first special token of the
 * post-processor's template (if any), EOS is -1. */
int tok_load_json(const char *name, const char *json, size_t len, tok_tokenizer **out, char *err,
                  size_t errlen);
void tok_free(tok_tokenizer *t);

int tok_vocab_size(const tok_tokenizer *t); /* highest id + 1, added tokens included */
int tok_bos(const tok_tokenizer *t);        /* -1: none */
int tok_eos(const tok_tokenizer *t);        /* -1: none */
int tok_is_special(const tok_tokenizer *t, int32_t id);
/* The most bytes of text one id decodes to (its longest piece, >= 1). With the supported
 * normalizers (Prepend, Replace) a text of n ids is at most about n times this long, so a
 * caller can refuse a text that cannot fit n ids before encoding it (encoding takes memory
 * in proportion to the text). */
size_t tok_max_piece_bytes(const tok_tokenizer *t);

/* UTF-8 text -> ids. add_special: the post-processor's tokens (e.g. BOS) are added and
 * special tokens written in the text are recognised; 0: plain text only (--no-special). */
int tok_encode(const tok_tokenizer *t, const char *text, size_t len, int add_special, int32_t **ids,
               int *n_ids, char *err, size_t errlen);

/* ids -> UTF-8 text (NUL-terminated, malloc'd; *len without the NUL). skip_special drops
 * special tokens. An id outside the vocab is an error. */
int tok_decode(const tok_tokenizer *t, const int32_t *ids, int n, int skip_special, char **text,
               size_t *len, char *err, size_t errlen);

/* Streaming detokenisation: push ids one at a time, get the text they complete. Never
 * returns part of a UTF-8 character (at most 3 bytes are held back); the result of all
 * pushes + flush equals tok_decode of all ids. The returned pointer is valid until the next
 * call on s. tok_stream_new allocates all the stream needs (NULL: out of memory): pushes do
 * not allocate. After flush, reset before the next sequence (a leading-space Strip applies to
 * a sequence's first character only). A push of an id outside the vocab is an error and
 * leaves the stream as it was. */
typedef struct tok_stream tok_stream;
tok_stream *tok_stream_new(const tok_tokenizer *t, int skip_special);
int tok_stream_push(tok_stream *s, int32_t id, const char **piece, size_t *len, char *err,
                    size_t errlen);
int tok_stream_flush(tok_stream *s, const char **piece, size_t *len); /* what is left */
void tok_stream_reset(tok_stream *s);
void tok_stream_free(tok_stream *s);

#endif
