/* serve/serve.h — the OpenAI-compatible HTTP layer of `modpipe serve`.
 *
 * Three parts, each usable alone:
 *   1. serve_request_parse: a pure function, JSON text -> validated request, or an error that
 *      names the offending field (the libFuzzer target fuzz/fuzz_request.c drives it).
 *   2. serve_chat_*: named chat templates (messages -> prompt text).
 *   3. serve_server: a libmicrohttpd daemon (one thread per connection) that answers
 *        POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
 *        POST /tokenize, POST /detokenize, GET /metrics
 *      and talks to the pipeline only through serve/queue.h. The srvq callbacks (pipeline
 *      thread) only copy a token id into a preallocated per-request array and signal a
 *      condition variable; detokenisation (tok_stream), stop-string matching and writing to
 *      the socket happen on the connection's own thread, so a slow client never blocks the
 *      pipeline. A client that goes away (seen by a zero-length peek on its socket while we
 *      wait for tokens, or by MHD's completion callback) cancels its request (srvq_cancel),
 *      which frees its KV slot.
 *
 * Ownership: serve_server_start borrows the srvq and the tokenizer; both must outlive
 * serve_server_free. serve_request_parse fills a caller-owned struct whose strings/arrays it
 * allocates; serve_request_free releases them (NULL-safe, and safe on a zeroed struct).
 * Errors: non-zero return with one line in err (and, for the parser, the field in param).
 */
#ifndef SERVE_SERVE_H
#define SERVE_SERVE_H

#include <stddef.h>
#include <stdint.h>

#include "serve/queue.h"
#include "tok/tok.h"

/* ---- 1. request parser ----------------------------------------------------------------------- */

typedef enum {
    SERVE_REQ_COMPLETION = 0, /* POST /v1/completions */
    SERVE_REQ_CHAT,           /* POST /v1/chat/completions */
    SERVE_REQ_TOKENIZE,   /* POST /tokenize   {"content": str, "add_special"?, "with_pieces"?} */
    SERVE_REQ_DETOKENIZE, /* POST /detokenize {"tokens": [ids]} */
} serve_req_kind;

#define SERVE_MAX_STOP 4          /* OpenAI's limit on stop sequences */
#define SERVE_MAX_BODY (8u << 20) /* bytes of a request body at most (413 beyond) */

typedef struct {
    char *role;    /* "system" | "user" | "assistant" */
    char *content; /* text (an array of {"type":"text","text":...} parts is joined) */
} serve_msg;

typedef struct {
    serve_req_kind kind;
    char *model;         /* as sent (NULL: absent); any value is accepted */
    char *prompt_text;   /* completion: string prompt; tokenize: content. NULL if ids */
    int32_t *prompt_ids; /* [n_prompt_ids] completion: id prompt; detokenize: tokens */
    int n_prompt_ids;
    serve_msg *msgs; /* [n_msgs] chat */
    int n_msgs;
    int max_tokens;    /* >= 1, or 0: not given (server default) */
    float temperature; /* [0, 2], default 1 (OpenAI); 0: greedy */
    float top_p;       /* (0, 1], default 1 */
    uint64_t seed;
    int has_seed;
    char *stop[SERVE_MAX_STOP]; /* non-empty UTF-8 strings */
    int n_stop;
    int stream;        /* SSE */
    int include_usage; /* stream_options.include_usage */
    int ignore_eos;    /* extension (benchmarks): keep going past EOS */
    int add_special;   /* tokenize: add BOS etc. (default 1 for completion text) */
    int with_pieces;   /* tokenize: [{"id", "piece"}] instead of ids */
} serve_request;

/* Parse and validate `json` (len bytes, need not be NUL-terminated). vocab > 0: token ids
 * must lie in [0, vocab). Refused as well: bytes after the object, and a NUL (\u0000) in any
 * string (C strings would end there; param names its path, e.g. "messages[0].content").
 * On error: non-zero, `param` gets the field name ("" when the body itself is not a JSON
 * object) and err one line; *out is left zeroed. */
int serve_request_parse(serve_req_kind kind, const char *json, size_t len, int vocab,
                        serve_request *out, char *param, size_t paramlen, char *err, size_t errlen);
void serve_request_free(serve_request *r);
/* An upper bound on the number of values in json[0..len) (commas and opening brackets outside
 * strings, + 1), counted without allocating: checked against the context before the body is
 * parsed, since every parsed value costs a cJSON node (~64 bytes). */
long serve_json_values(const char *json, size_t len);

/* ---- 2. chat templates ----------------------------------------------------------------------- */

/* Names: "chatml", "llama2", "llama3", "mistral", "zephyr", "plain" (see README). */
typedef struct serve_chat_template serve_chat_template;

/* NULL when the name is unknown. */
const serve_chat_template *serve_chat_find(const char *name);
const char *serve_chat_name(const serve_chat_template *t);
/* Comma-separated list of the names, for help and error messages. */
const char *serve_chat_names(void);
/* A template chosen from a model directory's tokenizer_config.json "chat_template" (by its
 * markers); "plain" when there is none or it is not recognised. */
const serve_chat_template *serve_chat_detect(const char *model_dir);
/* The prompt text (malloc'd, NUL-terminated); the generation prompt of the assistant turn
 * is appended. BOS is not written: encode the text with add_special = 1 (the tokenizer's
 * post-processor adds its template), then call serve_chat_bos. */
char *serve_chat_apply(const serve_chat_template *t, const serve_msg *msgs, int n);
/* After tok_encode(add_special = 1) of serve_chat_apply's text: for templates whose model
 * template begins with bos_token (llama2, llama3, mistral) puts the tokenizer's BOS first when
 * its post-processor did not (e.g. Meta Llama-3's tokenizer.json, a ByteLevel post-processor
 * only), as Hugging Face's apply_chat_template does. *ids (malloc'd, from tok_encode) may be
 * reallocated. 0, or -1 with err (out of memory; *ids still owned by the caller). */
int serve_chat_bos(const serve_chat_template *t, const tok_tokenizer *tok, int32_t **ids, int *n,
                   char *err, size_t errlen);
/* The end-of-turn marker that also ends generation (e.g. "<|im_end|>"), or NULL. */
const char *serve_chat_end_marker(const serve_chat_template *t);

/* ---- 3. the server --------------------------------------------------------------------------- */

typedef struct {
    const char *host;                /* bind address (default "127.0.0.1") */
    int port;                        /* 0: any free port (see serve_server_port) */
    const char *api_key;             /* NULL: no auth; else "Authorization: Bearer KEY" required
                               * everywhere but GET /health */
    const char *model_name;          /* id reported by /v1/models (e.g. the directory's basename) */
    const serve_chat_template *chat; /* NULL: "plain" */
    int ctx;                         /* positions per slot (prompt + generated) */
    int max_connections;             /* connections served at once (default 256); beyond: 503 */
    int idle_timeout_s;              /* a connection idle this long (s) is closed (0: never);
                                      * not while its generation runs */
    double shutdown_grace_s;         /* serve_server_shutdown: running requests get this long */
    int quiet;                       /* no log lines on stderr */
} serve_opts;

typedef struct serve_server serve_server;

/* Starts listening at once; /health answers 503 until serve_server_set_ready. */
int serve_server_start(const serve_opts *o, srvq *q, const tok_tokenizer *tok, serve_server **out,
                       char *err, size_t errlen);
int serve_server_port(const serve_server *s);
void serve_server_set_ready(serve_server *s);
/* on: the pipeline is being restarted (serve/front.h): /health answers 503 "recovering";
 * requests are still taken (they wait in the queue). */
void serve_server_set_recovering(serve_server *s, int on);

/* Graceful stop: no new connections or requests (503), srvq_close, wait up to the grace
 * period for running requests, then cancel what is left and wait for it to end. Returns the
 * number of requests that had to be cancelled. Safe to call once from any thread. */
int serve_server_shutdown(serve_server *s);
/* The pipeline died: every waiting request ends with an error now (HTTP 500, or an error
 * event on a stream) and no new ones are taken. The queue's requests are abandoned. */
void serve_server_abort(serve_server *s, const char *msg);
/* Stops the daemon (after shutdown, or at once) and frees everything. NULL-safe. */
void serve_server_free(serve_server *s);

/* SIGTERM / SIGINT: after serve_signals_install(), serve_signals_wait() blocks until one
 * arrives (or serve_signals_notify() is called) and returns the signal number (0 for
 * notify). The handler only writes to a pipe. */
int serve_signals_install(char *err, size_t errlen);
int serve_signals_wait(void);
void serve_signals_notify(void);

#endif
