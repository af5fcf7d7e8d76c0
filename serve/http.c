/* serve/http.c — the libmicrohttpd server of `modpipe serve` (contract in serve.h).
 *
 * Threads: MHD runs one thread per connection. The pipeline thread only enters on_token /
 * on_done, which append to a request's preallocated token array under its mutex and
 * signal; the connection thread turns tokens into text (tok_stream), holds back what may
 * be the start of a stop string, and writes JSON or SSE. A request object (gen) is shared
 * by the two sides and freed by whichever lets go last (refs).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "base/clock.h"
#include "serve/serve.h"

/* ========================================================================================
 * Small helpers: growable byte buffer, JSON string escaping, clock
 * ===================================================================================== */

typedef struct {
    char *p; /* [cap] */
    size_t n, cap;
    int oom;
} sb;

static void sb_reserve(sb *b, size_t extra)
{
    if (b->oom || b->n + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + extra + 1) cap *= 2;
    char *q = realloc(b->p, cap);
    if (!q) {
        b->oom = 1;
        return;
    }
    b->p = q;
    b->cap = cap;
}

static void sb_add(sb *b, const char *s, size_t k)
{
    sb_reserve(b, k);
    if (b->oom) return;
    memcpy(b->p + b->n, s, k);
    b->n += k;
    b->p[b->n] = 0;
}

static void sb_str(sb *b, const char *s) { sb_add(b, s, strlen(s)); }

static void sb_fmt(sb *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_fmt(sb *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char tmp[512];
    int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (k < 0) return;
    if ((size_t)k < sizeof tmp) {
        sb_add(b, tmp, (size_t)k);
        return;
    }
    sb_reserve(b, (size_t)k);
    if (b->oom) return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->n, (size_t)k + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)k;
}

static void sb_free(sb *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* Length of the valid UTF-8 sequence at s[0..n), 0 if invalid. */
static int utf8_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    int k;
    unsigned min;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        k = 2;
        min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
        k = 3;
        min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        k = 4;
        min = 0x10000;
    } else
        return 0;
    if (n < (size_t)k) return 0;
    unsigned cp = c & (0x7F >> k);
    for (int i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return k;
}

/* A JSON string literal of s[0..n); invalid UTF-8 bytes become U+FFFD. */
static void sb_json(sb *b, const char *s, size_t n)
{
    sb_reserve(b, n + 2);
    sb_add(b, "\"", 1);
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned char c = u[i];
        if (c == '"') {
            sb_add(b, "\\\"", 2);
            i++;
        } else if (c == '\\') {
            sb_add(b, "\\\\", 2);
            i++;
        } else if (c == '\n') {
            sb_add(b, "\\n", 2);
            i++;
        } else if (c == '\r') {
            sb_add(b, "\\r", 2);
            i++;
        } else if (c == '\t') {
            sb_add(b, "\\t", 2);
            i++;
        } else if (c < 0x20 || c == 0x7F) {
            sb_fmt(b, "\\u%04x", c);
            i++;
        } else {
            int k = utf8_len(u + i, n - i);
            if (!k) {
                sb_add(b, "\\ufffd", 6);
                i++;
            } else {
                sb_add(b, s + i, (size_t)k);
                i += (size_t)k;
            }
        }
    }
    sb_add(b, "\"", 1);
}

/* ========================================================================================
 * Metrics
 * ===================================================================================== */

#define N_BUCKETS 14
static const double BUCKETS[N_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                          0.25,  0.5,    1.0,   2.5,  5.0,   10.0, 30.0};
typedef struct {
    uint64_t count[N_BUCKETS + 1]; /* [N_BUCKETS + 1]: per bucket (not cumulative), last = +Inf */
    uint64_t n;
    double sum;
} histo;

static void histo_add(histo *h, double v)
{
    int i = 0;
    while (i < N_BUCKETS && v > BUCKETS[i]) i++;
    h->count[i]++;
    h->n++;
    h->sum += v;
}

static void histo_print(sb *b, const char *name, const char *help, const histo *h)
{
    sb_fmt(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < N_BUCKETS; i++) {
        cum += h->count[i];
        sb_fmt(b, "%s_bucket{le=\"%g\"} %llu\n", name, BUCKETS[i], (unsigned long long)cum);
    }
    sb_fmt(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
           (unsigned long long)h->n, name, h->sum, name, (unsigned long long)h->n);
}

static const int STATUSES[] = {200, 400, 401, 404, 405, 413, 500, 503};
#define N_STATUS ((int)(sizeof STATUSES / sizeof STATUSES[0]))

/* ========================================================================================
 * Server and request state
 * ===================================================================================== */

typedef struct gen gen;

struct serve_server {
    struct MHD_Daemon *d;
    srvq *q;
    const tok_tokenizer *tok;
    char *host, *api_key, *model_name;
    const serve_chat_template *chat;
    int ctx, vocab, eos, port, quiet;
    int32_t end_id; /* the chat template's end-of-turn token, -1: none */
    double grace_s;
    long created;  /* start time (unix), for /v1/models */
    int listen_fd; /* after quiesce: closed after MHD_stop_daemon */
    atomic_int ready, closing, shut_done, aborted;
    char abort_msg[512]; /* written once before aborted is set */
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
    int too_big;
    gen *g; /* a streaming response's request, released on completion */
} conn_ctx;

static void count_status(serve_server *s, int status)
{
    int i = 0;
    while (i < N_STATUS && STATUSES[i] != status) i++;
    pthread_mutex_lock(&s->mu);
    s->status_count[i]++;
    pthread_mutex_unlock(&s->mu);
}

static enum MHD_Result reply(serve_server *s, struct MHD_Connection *c, int status,
                             const char *ctype, const char *body, size_t len, const char *h1,
                             const char *v1)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", ctype);
    if (h1) MHD_add_response_header(r, h1, v1);
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    count_status(s, status);
    return ok;
}

static enum MHD_Result reply_json(serve_server *s, struct MHD_Connection *c, int status, sb *b)
{
    if (b->oom) return MHD_NO;
    return reply(s, c, status, "application/json", b->p ? b->p : "", b->n, NULL, NULL);
}

static void error_json(sb *b, const char *msg, const char *type, const char *param,
                       const char *code)
{
    sb_str(b, "{\"error\":{\"message\":");
    sb_json(b, msg, strlen(msg));
    sb_str(b, ",\"type\":");
    sb_json(b, type, strlen(type));
    sb_str(b, ",\"param\":");
    if (param && *param)
        sb_json(b, param, strlen(param));
    else
        sb_str(b, "null");
    sb_str(b, ",\"code\":");
    if (code)
        sb_json(b, code, strlen(code));
    else
        sb_str(b, "null");
    sb_str(b, "}}");
}

static enum MHD_Result reply_error(serve_server *s, struct MHD_Connection *c, int status,
                                   const char *msg, const char *param, const char *code)
{
    const char *type = status == 401   ? "authentication_error"
                       : status >= 500 ? (status == 503 ? "unavailable_error" : "server_error")
                       : status == 404 ? "not_found_error"
                                       : "invalid_request_error";
    sb b = {0};
    error_json(&b, msg, type, param, code);
    struct MHD_Response *r =
        MHD_create_response_from_buffer(b.n, b.p ? b.p : (char *)"", MHD_RESPMEM_MUST_COPY);
    sb_free(&b);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", "application/json");
    if (status == 503) MHD_add_response_header(r, "Retry-After", "1");
    if (status == 401) MHD_add_response_header(r, "WWW-Authenticate", "Bearer");
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    count_status(s, status);
    return ok;
}

/* ========================================================================================
 * gen: lifetime and the pipeline callbacks
 * ===================================================================================== */

static void gen_free(gen *g)
{
    if (!g) return;
    free(g->toks);
    tok_stream_free(g->ts);
    for (int i = 0; i < g->n_stop; i++) free(g->stop[i]);
    sb_free(&g->pend);
    sb_free(&g->text);
    sb_free(&g->out);
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
    free(g);
}

static void gen_unref(gen *g)
{
    pthread_mutex_lock(&g->mu);
    int last = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    if (last) gen_free(g);
}

static void active_remove(serve_server *s, gen *g)
{
    pthread_mutex_lock(&s->mu);
    if (g->in_active) {
        if (g->prev)
            g->prev->next = g->next;
        else
            s->active = g->next;
        if (g->next) g->next->prev = g->prev;
        g->in_active = 0;
    }
    pthread_mutex_unlock(&s->mu);
}

static void on_token(void *arg, int32_t token)
{
    gen *g = arg;
    double t = base_now_s();
    pthread_mutex_lock(&g->mu);
    int first = g->n_toks == 0;
    double prev = g->t_last;
    if (g->n_toks < g->cap) g->toks[g->n_toks++] = token;
    g->t_last = t;
    pthread_cond_signal(&g->cv);
    pthread_mutex_unlock(&g->mu);
    serve_server *s = g->srv;
    pthread_mutex_lock(&s->mu);
    if (first)
        histo_add(&s->ttft, t - g->t_submit);
    else
        histo_add(&s->itl, t - prev);
    pthread_mutex_unlock(&s->mu);
}

static void on_done(void *arg, srvq_finish why, int n_prompt, int n_generated, const char *msg)
{
    (void)n_prompt;
    (void)n_generated;
    gen *g = arg;
    active_remove(g->srv, g);
    pthread_mutex_lock(&g->mu);
    g->done = 1;
    g->why = why;
    snprintf(g->msg, sizeof g->msg, "%s", msg ? msg : "");
    pthread_cond_signal(&g->cv);
    pthread_mutex_unlock(&g->mu);
    gen_unref(g);
}

/* ========================================================================================
 * gen: turning tokens into output (connection thread)
 * ===================================================================================== */

static void chunk_head(gen *g, sb *b)
{
    sb_fmt(b, "data: {\"id\":\"%s\",\"object\":\"%s\",\"created\":%ld,\"model\":", g->cid,
           g->chat ? "chat.completion.chunk" : "text_completion", g->created);
    sb_json(b, g->srv->model_name, strlen(g->srv->model_name));
    sb_str(b, ",\"choices\":[{\"index\":0,");
}

static void token_ids(gen *g, sb *b, int upto)
{
    if (!g->return_ids) return;
    sb_str(b, ",\"token_ids\":[");
    for (int i = g->ids_sent; i < upto; i++)
        sb_fmt(b, "%s%d", i > g->ids_sent ? "," : "", g->toks[i]);
    sb_str(b, "]");
    g->ids_sent = upto;
}

/* One SSE chunk with text (stream) or append to the full text. */
static void emit(gen *g, const char *p, size_t n, int upto)
{
    if (!n) return;
    if (!g->stream) {
        sb_add(&g->text, p, n);
        return;
    }
    sb *b = &g->out;
    chunk_head(g, b);
    if (g->chat) {
        sb_str(b, "\"delta\":{\"content\":");
        sb_json(b, p, n);
        sb_str(b, "}");
    } else {
        sb_str(b, "\"text\":");
        sb_json(b, p, n);
    }
    token_ids(g, b, upto);
    sb_str(b, ",\"logprobs\":null,\"finish_reason\":null}]}\n\n");
}

/* Emit what can no longer be part of a stop string; on a full match emit the text before it
 * and finish with "stop". final: nothing more comes, release the held-back tail. */
static int stop_scan(gen *g, int final, int upto)
{
    sb *p = &g->pend;
    long best = -1;
    for (int i = 0; i < g->n_stop; i++) {
        const char *m = memmem(p->p ? p->p : "", p->n, g->stop[i], strlen(g->stop[i]));
        if (m && (best < 0 || m - p->p < best)) best = m - p->p;
    }
    if (best >= 0) {
        emit(g, p->p, (size_t)best, upto);
        p->n = 0;
        return 1;
    }
    size_t hold = 0;
    for (int i = 0; !final && i < g->n_stop; i++) {
        size_t sl = strlen(g->stop[i]);
        for (size_t k = sl - 1 < p->n ? sl - 1 : p->n; k > hold; k--)
            if (!memcmp(p->p + p->n - k, g->stop[i], k)) {
                hold = k;
                break;
            }
    }
    size_t go = p->n - hold;
    emit(g, p->p, go, upto);
    memmove(p->p, p->p + go, hold);
    p->n = hold;
    if (p->p) p->p[p->n] = 0;
    return 0;
}

static void gen_cancel(gen *g)
{
    if (g->cancelled || g->id < 0) return;
    g->cancelled = 1;
    srvq_cancel(g->srv->q, g->id);
}

/* Streams that asked for token ids get one event per token, also when the token has no text
 * yet (a partial UTF-8 character, a held-back stop prefix): clients time every token. */
static void token_event(gen *g)
{
    if (!g->stream || !g->return_ids || g->ids_sent >= g->consumed + 1) return;
    sb *b = &g->out;
    chunk_head(g, b);
    sb_str(b, g->chat ? "\"delta\":{\"content\":\"\"}" : "\"text\":\"\"");
    token_ids(g, b, g->consumed + 1);
    sb_str(b, ",\"logprobs\":null,\"finish_reason\":null}]}\n\n");
}

/* Process toks[consumed..n). */
static void gen_process(gen *g, int n)
{
    serve_server *s = g->srv;
    char err[256];
    for (; g->consumed < n && !g->finish; g->consumed++) {
        int32_t t = g->toks[g->consumed];
        g->n_completion++;
        if ((t == s->eos && !g->ignore_eos) || (g->chat && t == s->end_id)) {
            g->finish = "stop";
            if (t == s->end_id && t != s->eos) gen_cancel(g);
            g->consumed++;
            break;
        }
        const char *piece = NULL;
        size_t len = 0;
        /* a model whose vocab is larger than its tokenizer's (random benchmark models) may
         * sample ids the tokenizer cannot spell: they count, but have no text */
        if (t < 0 || t >= s->vocab) {
            token_event(g);
            continue;
        }
        if (tok_stream_push(g->ts, t, &piece, &len, err, sizeof err)) {
            g->failed = 1;
            snprintf(g->cmsg, sizeof g->cmsg, "detokenising: %.200s", err);
            g->finish = "stop";
            gen_cancel(g);
            g->consumed++;
            break;
        }
        sb_add(&g->pend, piece, len);
        if (g->n_stop == 0) {
            emit(g, g->pend.p, g->pend.n, g->consumed + 1);
            g->pend.n = 0;
        } else if (stop_scan(g, 0, g->consumed + 1)) {
            g->finish = "stop";
            gen_cancel(g);
        }
        if (!g->finish) token_event(g);
    }
}

/* The queue is done with the request (done == 1) or we stopped it: flush the text. */
static void gen_finish(gen *g, srvq_finish why)
{
    if (!g->finish) {
        const char *piece = NULL;
        size_t len = 0;
        tok_stream_flush(g->ts, &piece, &len);
        sb_add(&g->pend, piece, len);
        if (g->n_stop && stop_scan(g, 1, g->consumed))
            g->finish = "stop";
        else {
            emit(g, g->pend.p, g->pend.n, g->consumed);
            g->pend.n = 0;
            /* CANCELLED here: the server's shutdown deadline cut it (the client is still here) */
            g->finish = why == SRVQ_FINISH_STOP ? "stop" : "length";
            if (why == SRVQ_FINISH_ERROR) g->failed = 1;
        }
    }
}

/* The client hung up? (a zero-length peek on its socket, or an error) */
static int client_gone(int fd)
{
    if (fd < 0) return 0;
    struct pollfd p = {.fd = fd, .events = POLLIN | POLLRDHUP};
    if (poll(&p, 1, 0) <= 0) return 0;
    if (p.revents & (POLLERR | POLLHUP | POLLRDHUP | POLLNVAL)) return 1;
    if (p.revents & POLLIN) {
        char c;
        ssize_t k = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
        return k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
    }
    return 0;
}

/* Wait (up to ~100 ms) for tokens or the end, then process them.
 * Returns 1 when the request is over (output complete), 0 otherwise, -1 if the client left. */
static int gen_step(gen *g)
{
    pthread_mutex_lock(&g->mu);
    if (g->consumed == g->n_toks && !g->done && !g->finish) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&g->cv, &g->mu, &ts);
    }
    int n = g->n_toks, done = g->done;
    srvq_finish why = g->why;
    pthread_mutex_unlock(&g->mu);
    if (!done && atomic_load(&g->srv->aborted)) {
        /* the pipeline is gone: no on_done will come */
        g->failed = 1;
        snprintf(g->cmsg, sizeof g->cmsg, "%.250s", g->srv->abort_msg);
        g->finish = "stop";
        return 1;
    }
    int had = g->consumed;
    gen_process(g, n);
    if (g->finish) return 1;
    if (done && g->consumed == n) {
        gen_finish(g, why);
        return 1;
    }
    /* a hang-up shows on the socket only when we look: at most every 100 ms */
    double t = base_now_s();
    if (had == n || t - g->t_check > 0.1) {
        g->t_check = t;
        if (client_gone(g->fd)) return -1;
    }
    return 0;
}

static const char *gen_errmsg(gen *g)
{
    if (g->cmsg[0]) return g->cmsg;
    pthread_mutex_lock(&g->mu);
    const char *m = g->msg[0] ? g->msg : "the pipeline failed";
    pthread_mutex_unlock(&g->mu);
    return m;
}

static void usage_json(gen *g, sb *b)
{
    sb_fmt(b, "\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d}",
           g->n_prompt, g->n_completion, g->n_prompt + g->n_completion);
}

/* Streaming: MHD asks for bytes; we wait for tokens on this connection's own thread. */
static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    gen *g = cls;
    for (;;) {
        if (g->out_off < g->out.n) {
            size_t k = g->out.n - g->out_off;
            if (k > max) k = max;
            memcpy(buf, g->out.p + g->out_off, k);
            g->out_off += k;
            if (g->out_off == g->out.n) g->out_off = g->out.n = 0;
            return (ssize_t)k;
        }
        if (g->writer_done) return MHD_CONTENT_READER_END_OF_STREAM;
        if (g->out.oom) return MHD_CONTENT_READER_END_WITH_ERROR;
        int r = gen_step(g);
        if (r < 0) {
            gen_cancel(g);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        if (r == 1) {
            sb *b = &g->out;
            if (g->failed) {
                sb_str(b, "data: ");
                error_json(b, gen_errmsg(g), "server_error", NULL, NULL);
                sb_str(b, "\n\n");
            } else {
                chunk_head(g, b);
                sb_str(b, g->chat ? "\"delta\":{}" : "\"text\":\"\"");
                token_ids(g, b, g->consumed);
                sb_fmt(b, ",\"logprobs\":null,\"finish_reason\":\"%s\"}]}\n\n", g->finish);
                if (g->include_usage) {
                    sb_fmt(b, "data: {\"id\":\"%s\",\"object\":\"%s\",\"created\":%ld,\"model\":",
                           g->cid, g->chat ? "chat.completion.chunk" : "text_completion",
                           g->created);
                    sb_json(b, g->srv->model_name, strlen(g->srv->model_name));
                    sb_str(b, ",\"choices\":[],");
                    usage_json(g, b);
                    sb_str(b, "}\n\n");
                }
            }
            sb_str(b, "data: [DONE]\n\n");
            g->writer_done = 1;
        }
    }
}

/* ========================================================================================
 * Endpoints
 * ===================================================================================== */

static enum MHD_Result do_generate(serve_server *s, struct MHD_Connection *c, conn_ctx *cc)
{
    int chat = cc->route == R_CHAT;
    serve_request rq;
    char param[96], err[512];
    if (serve_request_parse(chat ? SERVE_REQ_CHAT : SERVE_REQ_COMPLETION,
                            cc->body.p ? cc->body.p : "", cc->body.n, s->vocab, &rq, param,
                            sizeof param, err, sizeof err))
        return reply_error(s, c, 400, err, param, NULL);
    if (!atomic_load(&s->ready)) {
        serve_request_free(&rq);
        return reply_error(s, c, 503, "the model is loading", NULL, NULL);
    }
    if (atomic_load(&s->closing)) {
        serve_request_free(&rq);
        return reply_error(s, c, 503, "the server is shutting down", NULL, NULL);
    }
    /* prompt -> ids */
    int32_t *ids = NULL;
    int n_ids = 0;
    const char *pfield = chat ? "messages" : "prompt";
    if (rq.prompt_ids) {
        ids = rq.prompt_ids;
        n_ids = rq.n_prompt_ids;
        rq.prompt_ids = NULL;
    } else {
        char *text = chat ? serve_chat_apply(s->chat, rq.msgs, rq.n_msgs) : rq.prompt_text;
        int rc =
            text ? tok_encode(s->tok, text, strlen(text), 1, &ids, &n_ids, err, sizeof err) : -1;
        if (!text) snprintf(err, sizeof err, "out of memory");
        if (chat) free(text);
        if (rc) {
            serve_request_free(&rq);
            return reply_error(s, c, 400, err, pfield, NULL);
        }
    }
    if (n_ids == 0) {
        free(ids);
        serve_request_free(&rq);
        return reply_error(s, c, 400, "the prompt is empty (no tokens)", pfield, NULL);
    }
    if (n_ids + 1 > s->ctx) {
        snprintf(err, sizeof err,
                 "the prompt has %d tokens; the context holds %d (prompt + at least "
                 "one new token)",
                 n_ids, s->ctx);
        free(ids);
        serve_request_free(&rq);
        return reply_error(s, c, 400, err, pfield, "context_length_exceeded");
    }
    int room = s->ctx - n_ids;
    int max_tokens = rq.max_tokens ? rq.max_tokens : (chat ? room : 16);
    if (max_tokens > room) max_tokens = room;

    gen *g = calloc(1, sizeof *g);
    int ok = g && !pthread_mutex_init(&g->mu, NULL) && !pthread_cond_init(&g->cv, NULL);
    if (ok) {
        g->srv = s;
        g->id = -1;
        g->cap = max_tokens + 1;
        g->toks = malloc((size_t)g->cap * sizeof *g->toks);
        g->ts = tok_stream_new(s->tok, 1);
        ok = g->toks && g->ts;
    }
    if (!ok) {
        free(ids);
        serve_request_free(&rq);
        if (g) {
            free(g->toks);
            tok_stream_free(g->ts);
            free(g);
        }
        return reply_error(s, c, 500, "out of memory", NULL, NULL);
    }
    /* Prime the detokeniser with the prompt's last token: decoders such as SentencePiece's
     * strip the leading space of a text, and a continuation is not the start of one. */
    const char *piece;
    size_t plen;
    tok_stream_push(g->ts, ids[n_ids - 1], &piece, &plen, err, sizeof err);
    g->chat = chat;
    g->stream = rq.stream;
    g->include_usage = rq.include_usage;
    g->ignore_eos = rq.ignore_eos;
    g->n_prompt = n_ids;
    g->n_stop = rq.n_stop;
    for (int i = 0; i < rq.n_stop; i++) {
        g->stop[i] = rq.stop[i];
        rq.stop[i] = NULL;
    }
    rq.n_stop = 0;
    const char *rti = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "return_token_ids");
    g->return_ids = rti && strcmp(rti, "0");
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    g->fd = ci ? ci->connect_fd : -1;
    snprintf(g->cid, sizeof g->cid, "%s-%ld", chat ? "chatcmpl" : "cmpl",
             atomic_fetch_add(&s->next_id, 1));
    g->created = (long)time(NULL);
    g->refs = 2;
    g->t_submit = base_now_s();

    srvq_request r = {
        .prompt = ids,
        .n_prompt = n_ids,
        .max_tokens = max_tokens,
        .temperature = rq.temperature,
        .top_p = rq.top_p,
        .seed = rq.has_seed
                    ? rq.seed
                    : ((uint64_t)time(NULL) * 2654435761u) ^ (uint64_t)atomic_load(&s->next_id),
        .ignore_eos = rq.ignore_eos,
        .on_token = on_token,
        .on_done = on_done,
        .arg = g,
    };
    serve_request_free(&rq);
    pthread_mutex_lock(&s->mu);
    g->next = s->active;
    if (s->active) s->active->prev = g;
    s->active = g;
    g->in_active = 1;
    s->gen_conns++;
    pthread_mutex_unlock(&s->mu);
    long id = srvq_submit(s->q, &r, err, sizeof err);
    free(ids);
    if (id < 0) {
        active_remove(s, g);
        pthread_mutex_lock(&s->mu);
        s->gen_conns--;
        pthread_mutex_unlock(&s->mu);
        gen_free(g);
        int st = id == SRVQ_ERR_FULL || id == SRVQ_ERR_CLOSED ? 503 : 400;
        return reply_error(s, c, st, err, st == 400 ? pfield : NULL,
                           id == SRVQ_ERR_TOO_LONG ? "context_length_exceeded" : NULL);
    }
    pthread_mutex_lock(&g->mu);
    g->id = id;
    pthread_mutex_unlock(&g->mu);
    /* a stop found before we knew the id could not cancel: do it now */
    if (g->finish && !g->done) gen_cancel(g);

    if (g->stream) {
        cc->g = g; /* released in the completion callback */
        struct MHD_Response *resp =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, stream_reader, g, NULL);
        if (!resp) {
            gen_cancel(g);
            return MHD_NO;
        }
        MHD_add_response_header(resp, "Content-Type", "text/event-stream");
        MHD_add_response_header(resp, "Cache-Control", "no-cache");
        if (chat) {
            chunk_head(g, &g->out);
            sb_str(&g->out, "\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,"
                            "\"finish_reason\":null}]}\n\n");
        }
        enum MHD_Result ok2 = MHD_queue_response(c, 200, resp);
        MHD_destroy_response(resp);
        count_status(s, 200);
        return ok2;
    }

    /* Not streaming: this connection thread waits for the whole answer. */
    cc->g = g;
    int r2;
    while (!(r2 = gen_step(g))) {}
    if (r2 < 0) {
        gen_cancel(g);
        return MHD_NO; /* client gone: close */
    }
    if (g->failed) return reply_error(s, c, 500, gen_errmsg(g), NULL, NULL);
    sb b = {0};
    sb_fmt(&b, "{\"id\":\"%s\",\"object\":\"%s\",\"created\":%ld,\"model\":", g->cid,
           chat ? "chat.completion" : "text_completion", g->created);
    sb_json(&b, s->model_name, strlen(s->model_name));
    sb_str(&b, ",\"choices\":[{\"index\":0,");
    if (chat) {
        sb_str(&b, "\"message\":{\"role\":\"assistant\",\"content\":");
        sb_json(&b, g->text.p ? g->text.p : "", g->text.n);
        sb_str(&b, "}");
    } else {
        sb_str(&b, "\"text\":");
        sb_json(&b, g->text.p ? g->text.p : "", g->text.n);
    }
    g->return_ids = 1; /* non-stream answers always carry the ids (cheap; tests compare them) */
    token_ids(g, &b, g->consumed);
    sb_fmt(&b, ",\"logprobs\":null,\"finish_reason\":\"%s\"}],", g->finish);
    usage_json(g, &b);
    sb_str(&b, "}");
    enum MHD_Result res = reply_json(s, c, 200, &b);
    sb_free(&b);
    return res;
}

static enum MHD_Result do_tokenize(serve_server *s, struct MHD_Connection *c, conn_ctx *cc,
                                   int detok)
{
    serve_request rq;
    char param[96], err[512];
    if (serve_request_parse(detok ? SERVE_REQ_DETOKENIZE : SERVE_REQ_TOKENIZE,
                            cc->body.p ? cc->body.p : "", cc->body.n, s->vocab, &rq, param,
                            sizeof param, err, sizeof err))
        return reply_error(s, c, 400, err, param, NULL);
    sb b = {0};
    enum MHD_Result res;
    if (detok) {
        char *text = NULL;
        size_t len = 0;
        if (tok_decode(s->tok, rq.prompt_ids, rq.n_prompt_ids, 0, &text, &len, err, sizeof err)) {
            serve_request_free(&rq);
            return reply_error(s, c, 400, err, "tokens", NULL);
        }
        sb_str(&b, "{\"content\":");
        sb_json(&b, text, len);
        sb_str(&b, "}");
        free(text);
    } else {
        int32_t *ids = NULL;
        int n = 0;
        if (tok_encode(s->tok, rq.prompt_text, strlen(rq.prompt_text), rq.add_special, &ids, &n,
                       err, sizeof err)) {
            serve_request_free(&rq);
            return reply_error(s, c, 400, err, "content", NULL);
        }
        sb_str(&b, "{\"tokens\":[");
        for (int i = 0; i < n; i++) {
            if (i) sb_str(&b, ",");
            if (!rq.with_pieces) {
                sb_fmt(&b, "%d", ids[i]);
                continue;
            }
            char *piece = NULL;
            size_t pl = 0;
            if (tok_decode(s->tok, &ids[i], 1, 0, &piece, &pl, err, sizeof err)) pl = 0;
            sb_fmt(&b, "{\"id\":%d,\"piece\":", ids[i]);
            sb_json(&b, piece ? piece : "", pl);
            sb_str(&b, "}");
            free(piece);
        }
        sb_str(&b, "]}");
        free(ids);
    }
    serve_request_free(&rq);
    res = reply_json(s, c, 200, &b);
    sb_free(&b);
    return res;
}

/* The KV page pools (docs/SPEC.md §11), one series per stage. */
static void metrics_kv(sb *b, const srvq_stats *st)
{
    static const struct {
        const char *name, *type, *help;
    } M[] = {
        {"modpipe_kv_pages_total", "gauge", "Pages in the stage's KV pool."},
        {"modpipe_kv_pages_used", "gauge", "KV pages held by sequences."},
        {"modpipe_kv_pages_free", "gauge", "KV pages free."},
        {"modpipe_kv_pages_peak", "gauge", "Most KV pages held at once since start."},
        {"modpipe_kv_page_bytes", "gauge", "Bytes of one KV page (K, V and positions)."},
        {"modpipe_kv_bytes_used", "gauge", "KV bytes held by sequences (pages used x page bytes)."},
        {"modpipe_kv_bytes_dense", "gauge",
         "KV bytes a dense model (every layer keeps every row, contiguous) would hold for the "
         "same sequences."},
    };
    int n = st->n_kv < SRVQ_MAX_LINKS ? st->n_kv : SRVQ_MAX_LINKS;
    for (size_t m = 0; m < sizeof M / sizeof *M; m++) {
        sb_fmt(b, "# HELP %s %s\n# TYPE %s %s\n", M[m].name, M[m].help, M[m].name, M[m].type);
        for (int i = 0; i < n; i++) {
            const engine_kv_report *k = &st->kv[i];
            uint64_t v[] = {k->pages_total, k->pages_used, k->pages_total - k->pages_used,
                            k->pages_peak,  k->page_bytes, k->pages_used * k->page_bytes,
                            k->bytes_dense};
            sb_fmt(b, "%s{stage=\"%d\"} %llu\n", M[m].name, k->stage, (unsigned long long)v[m]);
        }
    }
    sb_str(b, "# HELP modpipe_kv_pages_used_by_kind KV pages held, by layer kind (routed: mod "
              "and mode_staged; mindskip; full: dense and mode_integrated).\n"
              "# TYPE modpipe_kv_pages_used_by_kind gauge\n");
    for (int i = 0; i < n; i++) {
        const engine_kv_report *k = &st->kv[i];
        const char *kind[] = {"routed", "mindskip", "full"};
        uint64_t v[] = {k->pages_routed, k->pages_skip, k->pages_full};
        for (int j = 0; j < 3; j++)
            sb_fmt(b, "modpipe_kv_pages_used_by_kind{stage=\"%d\",kind=\"%s\"} %llu\n", k->stage,
                   kind[j], (unsigned long long)v[j]);
    }
}

static enum MHD_Result do_metrics(serve_server *s, struct MHD_Connection *c)
{
    srvq_stats st;
    srvq_get_stats(s->q, &st);
    sb b = {0};
    pthread_mutex_lock(&s->mu);
    sb_str(&b, "# HELP modpipe_requests_total HTTP requests answered, by status code.\n"
               "# TYPE modpipe_requests_total counter\n");
    for (int i = 0; i <= N_STATUS; i++) {
        if (i < N_STATUS)
            sb_fmt(&b, "modpipe_requests_total{status=\"%d\"} %llu\n", STATUSES[i],
                   (unsigned long long)s->status_count[i]);
        else
            sb_fmt(&b, "modpipe_requests_total{status=\"other\"} %llu\n",
                   (unsigned long long)s->status_count[i]);
    }
    histo ttft = s->ttft, itl = s->itl;
    pthread_mutex_unlock(&s->mu);
    sb_fmt(
        &b,
        "# HELP modpipe_generation_requests_total Requests accepted by the scheduler.\n"
        "# TYPE modpipe_generation_requests_total counter\nmodpipe_generation_requests_total %llu\n"
        "# HELP modpipe_prompt_tokens_total Prompt tokens of accepted requests.\n"
        "# TYPE modpipe_prompt_tokens_total counter\nmodpipe_prompt_tokens_total %llu\n"
        "# HELP modpipe_generated_tokens_total Tokens generated.\n"
        "# TYPE modpipe_generated_tokens_total counter\nmodpipe_generated_tokens_total %llu\n"
        "# HELP modpipe_queue_length Requests waiting for a slot.\n"
        "# TYPE modpipe_queue_length gauge\nmodpipe_queue_length %ld\n"
        "# HELP modpipe_requests_running Requests holding a slot.\n"
        "# TYPE modpipe_requests_running gauge\nmodpipe_requests_running %ld\n"
        "# HELP modpipe_slots_in_use KV-cache slots in use.\n"
        "# TYPE modpipe_slots_in_use gauge\nmodpipe_slots_in_use %d\n"
        "# HELP modpipe_slots_total KV-cache slots.\n"
        "# TYPE modpipe_slots_total gauge\nmodpipe_slots_total %d\n"
        "# HELP modpipe_ready 1 once the model is loaded.\n"
        "# TYPE modpipe_ready gauge\nmodpipe_ready %d\n",
        (unsigned long long)st.requests_total, (unsigned long long)st.prompt_tokens,
        (unsigned long long)st.generated_tokens, st.queued, st.running, st.slots_used, st.slots,
        atomic_load(&s->ready));
    histo_print(&b, "modpipe_ttft_seconds", "Time from request to first generated token.", &ttft);
    histo_print(&b, "modpipe_inter_token_seconds", "Time between consecutive tokens of a request.",
                &itl);
    sb_str(&b, "# HELP modpipe_link_bytes_total Bytes handed to MPI on a pipeline link (headers + "
               "payload).\n"
               "# TYPE modpipe_link_bytes_total counter\n");
    int nl = st.n_links < SRVQ_MAX_LINKS ? st.n_links : SRVQ_MAX_LINKS;
    for (int i = 0; i < nl; i++)
        sb_fmt(&b, "modpipe_link_bytes_total{from=\"%d\",to=\"%d\"} %llu\n", st.link[i].from,
               st.link[i].to, (unsigned long long)st.link[i].bytes);
    sb_str(&b, "# HELP modpipe_link_dense_bytes_total Bytes a dense pipeline would have sent on "
               "the link.\n"
               "# TYPE modpipe_link_dense_bytes_total counter\n");
    for (int i = 0; i < nl; i++)
        sb_fmt(&b, "modpipe_link_dense_bytes_total{from=\"%d\",to=\"%d\"} %llu\n", st.link[i].from,
               st.link[i].to, (unsigned long long)st.link[i].dense_bytes);
    metrics_kv(&b, &st);
    enum MHD_Result res =
        b.oom ? MHD_NO : reply(s, c, 200, "text/plain; version=0.0.4", b.p, b.n, NULL, NULL);
    sb_free(&b);
    return res;
}

static enum MHD_Result do_models(serve_server *s, struct MHD_Connection *c)
{
    sb b = {0};
    sb_str(&b, "{\"object\":\"list\",\"data\":[{\"id\":");
    sb_json(&b, s->model_name, strlen(s->model_name));
    sb_fmt(&b,
           ",\"object\":\"model\",\"created\":%ld,\"owned_by\":\"modpipe\",\"meta\":{\"n_ctx\":%d,"
           "\"n_vocab\":%d,\"chat_template\":\"%s\"}}]}",
           s->created, s->ctx, s->vocab, serve_chat_name(s->chat));
    enum MHD_Result r = reply_json(s, c, 200, &b);
    sb_free(&b);
    return r;
}

/* ========================================================================================
 * Routing
 * ===================================================================================== */

static const struct {
    const char *path;
    const char *method;
    route_id id;
} ROUTES[] = {
    {"/v1/completions", "POST", R_COMPL},
    {"/completions", "POST", R_COMPL},
    {"/v1/chat/completions", "POST", R_CHAT},
    {"/chat/completions", "POST", R_CHAT},
    {"/v1/models", "GET", R_MODELS},
    {"/models", "GET", R_MODELS},
    {"/health", "GET", R_HEALTH},
    {"/v1/health", "GET", R_HEALTH},
    {"/tokenize", "POST", R_TOK},
    {"/detokenize", "POST", R_DETOK},
    {"/metrics", "GET", R_METRICS},
};
#define N_ROUTES ((int)(sizeof ROUTES / sizeof ROUTES[0]))

static int key_ok(const char *given, const char *want)
{
    size_t a = strlen(given), b = strlen(want);
    unsigned diff = a != b;
    for (size_t i = 0; i < a; i++)
        diff |= (unsigned char)given[i] ^ (unsigned char)want[i % (b ? b : 1)];
    return !diff;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url,
                               const char *method, const char *version, const char *upload,
                               size_t *upload_size, void **req_cls)
{
    (void)version;
    serve_server *s = cls;
    conn_ctx *cc = *req_cls;
    if (!cc) {
        /* first call: headers only. Route, method and key are checked before the body. */
        int found = -1, path_known = 0;
        for (int i = 0; i < N_ROUTES; i++)
            if (!strcmp(url, ROUTES[i].path)) {
                path_known = 1;
                if (!strcmp(method, ROUTES[i].method) ||
                    (!strcmp(method, "HEAD") && !strcmp(ROUTES[i].method, "GET")))
                    found = i;
            }
        if (!path_known) {
            char m[300];
            snprintf(m, sizeof m, "unknown route %.200s", url);
            return reply_error(s, c, 404, m, NULL, NULL);
        }
        if (found < 0) {
            const char *allow = "GET";
            for (int i = 0; i < N_ROUTES; i++)
                if (!strcmp(url, ROUTES[i].path)) allow = ROUTES[i].method;
            char m[300];
            snprintf(m, sizeof m, "%.20s is not allowed on %.200s (use %s)", method, url, allow);
            sb b = {0};
            error_json(&b, m, "invalid_request_error", NULL, NULL);
            enum MHD_Result r =
                reply(s, c, 405, "application/json", b.p ? b.p : "", b.n, "Allow", allow);
            sb_free(&b);
            return r;
        }
        if (s->api_key && ROUTES[found].id != R_HEALTH) {
            const char *auth = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
            if (!auth)
                return reply_error(s, c, 401, "missing API key: send 'Authorization: Bearer KEY'",
                                   NULL, "invalid_api_key");
            if (strncasecmp(auth, "Bearer ", 7) || !key_ok(auth + 7, s->api_key))
                return reply_error(s, c, 401, "incorrect API key", NULL, "invalid_api_key");
        }
        cc = calloc(1, sizeof *cc);
        if (!cc) return MHD_NO;
        cc->route = ROUTES[found].id;
        *req_cls = cc;
        return MHD_YES;
    }
    if (*upload_size) {
        if (cc->body.n + *upload_size > SERVE_MAX_BODY)
            cc->too_big = 1;
        else
            sb_add(&cc->body, upload, *upload_size);
        *upload_size = 0;
        return MHD_YES;
    }
    if (cc->too_big) {
        char m[128];
        snprintf(m, sizeof m, "the request body exceeds %u bytes", SERVE_MAX_BODY);
        return reply_error(s, c, 413, m, NULL, NULL);
    }
    if (cc->body.oom) return reply_error(s, c, 500, "out of memory", NULL, NULL);
    switch (cc->route) {
    case R_COMPL:
    case R_CHAT: return do_generate(s, c, cc);
    case R_TOK: return do_tokenize(s, c, cc, 0);
    case R_DETOK: return do_tokenize(s, c, cc, 1);
    case R_METRICS: return do_metrics(s, c);
    case R_MODELS: return do_models(s, c);
    case R_HEALTH:
        if (atomic_load(&s->ready)) {
            static const char ok[] = "{\"status\":\"ok\"}";
            return reply(s, c, 200, "application/json", ok, sizeof ok - 1, NULL, NULL);
        }
        return reply_error(s, c, 503, "loading model", NULL, NULL);
    default: return reply_error(s, c, 404, "unknown route", NULL, NULL);
    }
}

static void completed(void *cls, struct MHD_Connection *c, void **req_cls,
                      enum MHD_RequestTerminationCode why)
{
    (void)c;
    (void)why;
    serve_server *s = cls;
    conn_ctx *cc = *req_cls;
    if (!cc) return;
    if (cc->g) {
        gen *g = cc->g;
        /* ended before the queue was done with it (client gone, write error): free the slot */
        pthread_mutex_lock(&g->mu);
        int done = g->done;
        pthread_mutex_unlock(&g->mu);
        if (!done) gen_cancel(g);
        gen_unref(g);
        pthread_mutex_lock(&s->mu);
        s->gen_conns--;
        pthread_mutex_unlock(&s->mu);
    }
    sb_free(&cc->body);
    free(cc);
    *req_cls = NULL;
}

/* ========================================================================================
 * Start / stop
 * ===================================================================================== */

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    serve_server *s = cls;
    if (s->quiet) return;
    fprintf(stderr, "modpipe serve: http: ");
    vfprintf(stderr, fmt, ap);
}

static char *xstrdup(const char *s) { return s ? strdup(s) : NULL; }

int serve_server_start(const serve_opts *o, srvq *q, const tok_tokenizer *tok, serve_server **out,
                       char *err, size_t errlen)
{
    *out = NULL;
    serve_server *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    pthread_mutex_init(&s->mu, NULL);
    s->q = q;
    s->tok = tok;
    s->host = xstrdup(o->host ? o->host : "127.0.0.1");
    s->api_key = xstrdup(o->api_key && *o->api_key ? o->api_key : NULL);
    s->model_name = xstrdup(o->model_name ? o->model_name : "modpipe");
    s->chat = o->chat ? o->chat : serve_chat_find("plain");
    s->ctx = o->ctx;
    s->vocab = tok_vocab_size(tok);
    s->eos = tok_eos(tok);
    s->quiet = o->quiet;
    s->grace_s = o->shutdown_grace_s > 0 ? o->shutdown_grace_s : 30.0;
    s->created = (long)time(NULL);
    s->listen_fd = -1;
    s->end_id = -1;
    const char *marker = serve_chat_end_marker(s->chat);
    if (marker) {
        int32_t *ids = NULL;
        int n = 0;
        char e2[256];
        if (!tok_encode(tok, marker, strlen(marker), 1, &ids, &n, e2, sizeof e2)) {
            int k = n > 0 && ids[0] == tok_bos(tok) ? 1 : 0;
            if (n - k == 1 && tok_is_special(tok, ids[k])) s->end_id = ids[k];
        }
        free(ids);
    }

    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV | AI_PASSIVE};
    char port[16];
    snprintf(port, sizeof port, "%d", o->port);
    struct addrinfo *ai = NULL;
    int gai = getaddrinfo(s->host, port, &hints, &ai);
    if (gai || !ai) {
        snprintf(err, errlen, "--host %s: %s", s->host, gai ? gai_strerror(gai) : "no address");
        serve_server_free(s);
        return -1;
    }
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ITC |
                     MHD_USE_ERROR_LOG | (ai->ai_family == AF_INET6 ? MHD_USE_IPv6 : 0);
    s->d = MHD_start_daemon(
        flags, (uint16_t)o->port, NULL, NULL, handler, s, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, s,
        MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_NOTIFY_COMPLETED, completed, s,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)(o->max_connections > 0 ? o->max_connections : 256),
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)0, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!s->d) {
        snprintf(err, errlen, "cannot listen on %s:%d (%s)", s->host, o->port,
                 errno ? strerror(errno) : "libmicrohttpd refused the options");
        serve_server_free(s);
        return -1;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : o->port;
    *out = s;
    return 0;
}

int serve_server_port(const serve_server *s) { return s->port; }
void serve_server_set_ready(serve_server *s) { atomic_store(&s->ready, 1); }

int serve_server_shutdown(serve_server *s)
{
    if (atomic_exchange(&s->shut_done, 1)) return 0;
    atomic_store(&s->closing, 1);
    if (s->d) s->listen_fd = MHD_quiesce_daemon(s->d);
    /* the kernel would still complete handshakes into the backlog of a quiesced socket:
     * shut it down so new clients are refused at once (it is closed after MHD_stop_daemon) */
    if (s->listen_fd >= 0) shutdown(s->listen_fd, SHUT_RDWR);
    srvq_close(s->q);
    double t0 = base_now_s();
    while (!srvq_idle(s->q) && base_now_s() - t0 < s->grace_s) usleep(20000);
    int cancelled = 0;
    if (!srvq_idle(s->q)) {
        long ids[1024];
        for (;;) {
            int n = 0;
            pthread_mutex_lock(&s->mu);
            for (gen *g = s->active; g && n < 1024; g = g->next)
                if (g->id >= 0) ids[n++] = g->id;
            pthread_mutex_unlock(&s->mu);
            for (int i = 0; i < n; i++) srvq_cancel(s->q, ids[i]);
            cancelled += n;
            if (n < 1024) break;
        }
        t0 = base_now_s();
        while (!srvq_idle(s->q) && base_now_s() - t0 < 10.0) usleep(20000);
    }
    /* let the connections write their last bytes */
    t0 = base_now_s();
    for (;;) {
        pthread_mutex_lock(&s->mu);
        int n = s->gen_conns;
        pthread_mutex_unlock(&s->mu);
        if (!n || base_now_s() - t0 > 5.0) break;
        usleep(20000);
    }
    return cancelled;
}

void serve_server_abort(serve_server *s, const char *msg)
{
    atomic_store(&s->closing, 1);
    snprintf(s->abort_msg, sizeof s->abort_msg, "the pipeline failed: %s", msg ? msg : "");
    atomic_store(&s->aborted, 1);
}

void serve_server_free(serve_server *s)
{
    if (!s) return;
    if (s->d) MHD_stop_daemon(s->d);
    if (s->listen_fd >= 0) close(s->listen_fd);
    free(s->host);
    free(s->api_key);
    free(s->model_name);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* ========================================================================================
 * Signals
 * ===================================================================================== */

static int sig_pipe[2] = {-1, -1};

static void on_signal(int sig)
{
    int e = errno;
    unsigned char b = (unsigned char)sig;
    if (write(sig_pipe[1], &b, 1) < 0) {}
    errno = e;
}

int serve_signals_install(char *err, size_t errlen)
{
    if (sig_pipe[0] < 0 && pipe2(sig_pipe, O_CLOEXEC)) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        return -1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGTERM, &sa, NULL) || sigaction(SIGINT, &sa, NULL)) {
        snprintf(err, errlen, "sigaction: %s", strerror(errno));
        return -1;
    }
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

int serve_signals_wait(void)
{
    unsigned char b = 0;
    for (;;) {
        ssize_t k = read(sig_pipe[0], &b, 1);
        if (k == 1) return b;
        if (k < 0 && errno == EINTR) continue;
        return 0;
    }
}

void serve_signals_notify(void)
{
    unsigned char b = 0;
    if (sig_pipe[1] >= 0 && write(sig_pipe[1], &b, 1) < 0) {}
}
