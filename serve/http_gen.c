/* serve/http_gen.c — a generation request of the HTTP server: the pipeline's callbacks and
 * the text / SSE events its tokens become (see serve/http_impl.h). */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "serve/http_impl.h"

/* ---- gen: lifetime and the pipeline callbacks ------------------------------------------------ */

void gen_free(gen *g)
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

void gen_unref(gen *g)
{
    pthread_mutex_lock(&g->mu);
    int last = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    if (last) gen_free(g);
}

void active_remove(serve_server *s, gen *g)
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

void gen_on_token(void *arg, int32_t token)
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

void gen_on_done(void *arg, srvq_finish why, int n_prompt, int n_generated, const char *msg)
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

/* ---- gen: turning tokens into output (connection thread) ------------------------------------- */

void chunk_head(gen *g, sb *b)
{
    sb_fmt(b, "data: {\"id\":\"%s\",\"object\":\"%s\",\"created\":%ld,\"model\":", g->cid,
           g->chat ? "chat.completion.chunk" : "text_completion", g->created);
    sb_json(b, g->srv->model_name, strlen(g->srv->model_name));
    sb_str(b, ",\"choices\":[{\"index\":0,");
}

void token_ids(gen *g, sb *b, int upto)
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

void gen_cancel(gen *g)
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
int gen_step(gen *g)
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
        /* the pipeline is gone: no gen_on_done will come */
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

const char *gen_errmsg(gen *g)
{
    if (g->cmsg[0]) return g->cmsg;
    pthread_mutex_lock(&g->mu);
    const char *m = g->msg[0] ? g->msg : "the pipeline failed";
    pthread_mutex_unlock(&g->mu);
    return m;
}

void usage_json(gen *g, sb *b)
{
    sb_fmt(b, "\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d}",
           g->n_prompt, g->n_completion, g->n_prompt + g->n_completion);
}

/* Streaming: MHD asks for bytes; we wait for tokens on this connection's own thread. */
ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
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
