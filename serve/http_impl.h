/* serve/http_impl.h — the inside of the HTTP server (contract in serve/serve.h), shared by
 * its parts: serve/http_util.c (byte buffers, JSON strings, histograms, replies),
 * serve/http_gen.c (a generation request: the pipeline's callbacks and the text or SSE they
 * become) and serve/http.c (endpoints, routing, start and stop). Not for other modules.
 *
 * Threads: MHD runs one thread per connection. The pipeline thread only enters
 * gen_on_token / gen_on_done, which append to a request's preallocated token array under its
 * mutex and signal; the connection thread turns tokens into text (tok_stream), holds back
 * what may be the start of a stop string, and writes JSON or SSE. A request object (gen) is
 * shared by the two sides and freed by whichever lets go last (refs).
 */
#ifndef SERVE_HTTP_IMPL_H
#define SERVE_HTTP_IMPL_H

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "base/clock.h"
#include "serve/sbuf.h"
#include "serve/serve.h"

/* ---- latency histograms and status counts for /metrics --------------------------------------- */
#define N_BUCKETS 14
typedef struct {
    uint64_t count[N_BUCKETS + 1]; /* [N_BUCKETS + 1]: per bucket (not cumulative), last = +Inf */
    uint64_t n;
    double sum;
} histo;
void histo_add(histo *h, double v);
void histo_print(sb *b, const char *name, const char *help, const histo *h);
#define N_STATUS 8
extern const int HTTP_STATUSES[N_STATUS]; /* the codes counted one by one */

typedef struct gen gen;

#define CONN_SPARE 16 /* connections MHD takes beyond serve_opts.max_connections (to say 503) */

struct serve_server {
    struct MHD_Daemon *d;
    srvq *q;
    const tok_tokenizer *tok;
    char *host, *api_key, *model_name;
    const serve_chat_template *chat;
    int ctx, vocab, eos, port, quiet;
    int max_conns;      /* connections answered; beyond: 503 (MHD's own limit is a little higher) */
    unsigned idle_s;    /* MHD's connection timeout (s); 0 while a generation runs */
    size_t max_text;    /* bytes of prompt text at most: what ctx tokens can spell */
    atomic_int n_conns; /* open TCP connections */
    int32_t end_id;     /* the chat template's end-of-turn token, -1: none */
    double grace_s;
    long created;  /* start time (unix), for /v1/models */
    int listen_fd; /* after quiesce: closed after MHD_stop_daemon */
    atomic_int ready, closing, shut_done, aborted;
    atomic_int recovering; /* the front is restarting the job (serve/front.h) */
    char abort_msg[512];   /* written once before aborted is set */
    atomic_long next_id;

    pthread_mutex_t mu;                  /* guards everything below */
    gen *active;                         /* requests the queue still holds (for cancel-all) */
    int gen_conns;                       /* generation connections not yet completed by MHD */
    uint64_t status_count[N_STATUS + 1]; /* [N_STATUS + 1] last: other codes */
    histo ttft, itl;
};

/* One generation request, shared by the connection thread and the pipeline callbacks. */
struct gen {
    serve_server *srv;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;         /* queue side + connection side */
    long id;          /* srvq id, -1 before submit returned */
    gen *prev, *next; /* srv->active (under srv->mu) */
    int in_active;

    /* written by the pipeline thread under mu */
    int32_t *toks; /* [cap] generated ids in order */
    int n_toks, cap;
    int done;
    srvq_finish why;
    char msg[256];
    double t_submit, t_last;

    /* connection thread only */
    int chat, stream, include_usage, return_ids, ignore_eos;
    int n_prompt;
    int consumed;     /* toks[0..consumed) processed */
    int ids_sent;     /* toks[0..ids_sent) reported in token_ids */
    int n_completion; /* tokens counted in usage */
    tok_stream *ts;
    char *stop[SERVE_MAX_STOP];
    int n_stop;
    sb pend; /* decoded text that may still start a stop string */
    sb text; /* non-stream: the completion text so far */
    sb out;  /* stream: SSE bytes not yet handed to MHD */
    size_t out_off;
    const char *finish; /* NULL while running, else "stop" / "length" */
    int failed;         /* the pipeline (msg) or the detokeniser (cmsg) failed */
    char cmsg[256];
    int cancelled; /* we asked the queue to cancel */
    int writer_done;
    int fd;         /* client socket, to notice a hang-up while we wait */
    double t_check; /* last look at it */
    char cid[48];
    long created;
};

/* Per connection (MHD's req_cls). */
typedef enum { R_NONE, R_COMPL, R_CHAT, R_MODELS, R_HEALTH, R_TOK, R_DETOK, R_METRICS } route_id;
typedef struct {
    route_id route;
    sb body;
    gen *g; /* a streaming response's request, released on completion */
} conn_ctx;

/* ---- replies (http_util.c) and generation requests (http_gen.c) ------------------------------ */
void count_status(serve_server *s, int status);
enum MHD_Result reply(serve_server *s, struct MHD_Connection *c, int status, const char *ctype,
                      const char *body, size_t len, const char *h1, const char *v1);
enum MHD_Result reply_json(serve_server *s, struct MHD_Connection *c, int status, sb *b);
void error_json(sb *b, const char *msg, const char *type, const char *param, const char *code);
enum MHD_Result reply_error_h(serve_server *s, struct MHD_Connection *c, int status,
                              const char *msg, const char *param, const char *code, const char *h1,
                              const char *v1);
enum MHD_Result reply_error(serve_server *s, struct MHD_Connection *c, int status, const char *msg,
                            const char *param, const char *code);
void gen_free(gen *g);
void gen_unref(gen *g);
void active_remove(serve_server *s, gen *g);
void gen_on_token(void *arg, int32_t token);
void gen_on_done(void *arg, srvq_finish why, int n_prompt, int n_generated, const char *msg);
void chunk_head(gen *g, sb *b);
void token_ids(gen *g, sb *b, int upto);
void gen_cancel(gen *g);
int gen_step(gen *g);
const char *gen_errmsg(gen *g);
void usage_json(gen *g, sb *b);
ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max);

#endif
