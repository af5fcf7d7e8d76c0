/* serve/http.c — the libmicrohttpd server of `modpipe serve` (contract in serve.h): the
 * endpoints, routing and the checks made before a body is read, start and stop, signals.
 * The shared state and the other parts: serve/http_impl.h. */
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

#include "serve/http_impl.h"

/* ---- Endpoints ------------------------------------------------------------------------------- */

/* A body with more JSON values than a prompt of ctx tokens can need is refused before it is
 * parsed: parsing costs a cJSON node per value. Chat messages take a few values each. */
static int too_many_values(serve_server *s, conn_ctx *cc, char *err, size_t errlen)
{
    long n = serve_json_values(cc->body.p ? cc->body.p : "", cc->body.n);
    long most = 4L * s->ctx + 1024;
    if (n <= most) return 0;
    snprintf(err, errlen,
             "the request holds %ld JSON values, more than a prompt for a context of %d tokens "
             "can need (%ld)",
             n, s->ctx, most);
    return 1;
}

/* A text longer than ctx tokens can spell is refused before it is tokenized (the tokenizer
 * takes memory in proportion to the text). */
static int text_too_long(serve_server *s, size_t len, char *err, size_t errlen)
{
    if (len <= s->max_text) return 0;
    snprintf(err, errlen,
             "the prompt is %zu bytes; the context holds %d tokens, at most %zu bytes of text "
             "with this tokenizer",
             len, s->ctx, s->max_text);
    return 1;
}

/* The queue's messages start with the field they are about ("top_p: ..."). */
static const char *queue_field(const char *err, const char *dflt)
{
    static const char *const F[] = {"top_p", "temperature", "max_tokens"};
    for (size_t i = 0; i < sizeof F / sizeof F[0]; i++) {
        size_t n = strlen(F[i]);
        if (!strncmp(err, F[i], n) && err[n] == ':') return F[i];
    }
    return dflt;
}

static enum MHD_Result do_generate(serve_server *s, struct MHD_Connection *c, conn_ctx *cc)
{
    int chat = cc->route == R_CHAT;
    serve_request rq;
    char param[96], err[512];
    const char *pfield = chat ? "messages" : "prompt";
    if (too_many_values(s, cc, err, sizeof err))
        return reply_error(s, c, 400, err, pfield, "context_length_exceeded");
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
    if (rq.prompt_ids) {
        ids = rq.prompt_ids;
        n_ids = rq.n_prompt_ids;
        rq.prompt_ids = NULL;
    } else {
        char *text = chat ? serve_chat_apply(s->chat, rq.msgs, rq.n_msgs) : rq.prompt_text;
        int rc = -1, too_long = text && text_too_long(s, strlen(text), err, sizeof err);
        if (text && !too_long)
            rc = tok_encode(s->tok, text, strlen(text), 1, &ids, &n_ids, err, sizeof err);
        if (!rc && chat) rc = serve_chat_bos(s->chat, s->tok, &ids, &n_ids, err, sizeof err);
        if (!text) snprintf(err, sizeof err, "out of memory");
        if (chat) free(text);
        if (rc) {
            free(ids);
            serve_request_free(&rq);
            return reply_error(s, c, 400, err, pfield, too_long ? "context_length_exceeded" : NULL);
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
    /* a generation may wait long for a slot or between tokens (the client's hang-up is seen
     * on its socket): no idle timeout until it is answered (restored in `completed`) */
    MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, 0u);
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
        .on_token = gen_on_token,
        .on_done = gen_on_done,
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
        return reply_error(s, c, st, err, st == 400 ? queue_field(err, pfield) : NULL,
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
    /* the pipeline failed (a job past its restarts): unavailable; the detokeniser: ours */
    if (g->failed) return reply_error(s, c, g->cmsg[0] ? 500 : 503, gen_errmsg(g), NULL, NULL);
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
    if (too_many_values(s, cc, err, sizeof err))
        return reply_error(s, c, 400, err, detok ? "tokens" : "content", NULL);
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
        if (text_too_long(s, strlen(rq.prompt_text), err, sizeof err) ||
            tok_encode(s->tok, rq.prompt_text, strlen(rq.prompt_text), rq.add_special, &ids, &n,
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

/* The KV page pools (docs/SPEC.md §11), one series per stage, and the preemptions. */
static void metrics_kv(sb *b, const srvq_stats *st)
{
    static const struct {
        const char *name, *type, *help;
    } M[] = {
        {"modpipe_kv_pages_total", "gauge", "Pages in the stage's KV pool."},
        {"modpipe_kv_pages_used", "gauge", "KV pages held by running sequences."},
        {"modpipe_kv_pages_cached", "gauge",
         "KV pages held only by finished requests' parked prefixes (evicted when needed)."},
        {"modpipe_kv_pages_free", "gauge", "KV pages free (total = used + cached + free)."},
        {"modpipe_kv_pages_peak", "gauge", "Most KV pages held at once since start."},
        {"modpipe_kv_page_bytes", "gauge", "Bytes of one KV page (K, V and positions)."},
        {"modpipe_kv_bytes_used", "gauge",
         "KV bytes held by running sequences (pages used x page bytes)."},
        {"modpipe_kv_bytes_dense", "gauge",
         "KV bytes a dense model (every layer keeps every row, contiguous) would hold for the "
         "same sequences."},
    };
    sb_fmt(b,
           "# HELP modpipe_preemptions_total Sequences whose KV pages were given up under memory "
           "pressure and recomputed.\n"
           "# TYPE modpipe_preemptions_total counter\nmodpipe_preemptions_total %llu\n",
           (unsigned long long)st->preemptions);
    sb_fmt(b,
           "# HELP modpipe_prefix_cache_hits_total Requests that started from the KV pages of an "
           "identical prompt prefix (a running request's or a finished one's parked slot).\n"
           "# TYPE modpipe_prefix_cache_hits_total counter\nmodpipe_prefix_cache_hits_total %llu\n"
           "# HELP modpipe_prefix_cache_tokens_total Prompt positions those requests did not "
           "compute.\n"
           "# TYPE modpipe_prefix_cache_tokens_total counter\n"
           "modpipe_prefix_cache_tokens_total %llu\n"
           "# HELP modpipe_prefix_cache_parked_hits_total Of the hits, those on a finished "
           "request's parked slot.\n"
           "# TYPE modpipe_prefix_cache_parked_hits_total counter\n"
           "modpipe_prefix_cache_parked_hits_total %llu\n"
           "# HELP modpipe_prefix_cache_evictions_total Parked slots evicted (least recently "
           "used first), their pages given back.\n"
           "# TYPE modpipe_prefix_cache_evictions_total counter\n"
           "modpipe_prefix_cache_evictions_total %llu\n"
           "# HELP modpipe_prefix_holders_used Prefix holders in use now: finished requests' "
           "prefixes kept (holders are not slots).\n"
           "# TYPE modpipe_prefix_holders_used gauge\nmodpipe_prefix_holders_used %d\n",
           (unsigned long long)st->prefix_hits, (unsigned long long)st->prefix_tokens,
           (unsigned long long)st->prefix_cached_hits, (unsigned long long)st->prefix_evictions,
           st->prefix_holders_used);
    int n = st->n_kv < SRVQ_MAX_LINKS ? st->n_kv : SRVQ_MAX_LINKS;
    for (size_t m = 0; m < sizeof M / sizeof *M; m++) {
        sb_fmt(b, "# HELP %s %s\n# TYPE %s %s\n", M[m].name, M[m].help, M[m].name, M[m].type);
        for (int i = 0; i < n; i++) {
            const engine_kv_report *k = &st->kv[i];
            const uint64_t used = k->pages_used - k->pages_cached; /* running sequences' */
            uint64_t v[] = {
                k->pages_total, used,          k->pages_cached,      k->pages_total - k->pages_used,
                k->pages_peak,  k->page_bytes, used * k->page_bytes, k->bytes_dense};
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
            sb_fmt(&b, "modpipe_requests_total{status=\"%d\"} %llu\n", HTTP_STATUSES[i],
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
        "# HELP modpipe_requests_running Requests being computed now (holding a slot; a "
        "preempted one waits in the queue).\n"
        "# TYPE modpipe_requests_running gauge\nmodpipe_requests_running %ld\n"
        "# HELP modpipe_slots_in_use KV-cache slots in use.\n"
        "# TYPE modpipe_slots_in_use gauge\nmodpipe_slots_in_use %d\n"
        "# HELP modpipe_slots_total KV-cache slots.\n"
        "# TYPE modpipe_slots_total gauge\nmodpipe_slots_total %d\n"
        "# HELP modpipe_ready 1 once the model is loaded.\n"
        "# TYPE modpipe_ready gauge\nmodpipe_ready %d\n"
        "# HELP modpipe_connections_open Open HTTP connections.\n"
        "# TYPE modpipe_connections_open gauge\nmodpipe_connections_open %d\n"
        "# HELP modpipe_restarts_total Times the front restarted the pipeline job.\n"
        "# TYPE modpipe_restarts_total counter\nmodpipe_restarts_total %llu\n"
        "# HELP modpipe_replayed_requests_total Running requests replayed on a restarted job.\n"
        "# TYPE modpipe_replayed_requests_total counter\nmodpipe_replayed_requests_total %llu\n"
        "# HELP modpipe_replayed_tokens_total Positions prefilled again (prompt + tokens sent).\n"
        "# TYPE modpipe_replayed_tokens_total counter\nmodpipe_replayed_tokens_total %llu\n"
        "# HELP modpipe_recovering 1 while the pipeline job is being restarted.\n"
        "# TYPE modpipe_recovering gauge\nmodpipe_recovering %d\n"
        "# HELP modpipe_micro_batches_total Micro-batches the scheduler issued.\n"
        "# TYPE modpipe_micro_batches_total counter\nmodpipe_micro_batches_total %llu\n"
        "# HELP modpipe_decode_micro_batches_total Micro-batches with decode rows.\n"
        "# TYPE modpipe_decode_micro_batches_total counter\n"
        "modpipe_decode_micro_batches_total %llu\n"
        "# HELP modpipe_decode_rows_total Decode rows issued.\n"
        "# TYPE modpipe_decode_rows_total counter\nmodpipe_decode_rows_total %llu\n"
        "# HELP modpipe_decode_in_flight_total Summed over decode micro-batches: those in flight "
        "once it was issued (itself included); / modpipe_decode_micro_batches_total = the decode "
        "pipeline depth.\n"
        "# TYPE modpipe_decode_in_flight_total counter\nmodpipe_decode_in_flight_total %llu\n",
        (unsigned long long)st.requests_total, (unsigned long long)st.prompt_tokens,
        (unsigned long long)st.generated_tokens, st.queued, st.running, st.slots_used, st.slots,
        atomic_load(&s->ready), atomic_load(&s->n_conns), (unsigned long long)st.restarts,
        (unsigned long long)st.replayed_requests, (unsigned long long)st.replayed_tokens,
        atomic_load(&s->recovering), (unsigned long long)st.micro_batches,
        (unsigned long long)st.decode_micro_batches, (unsigned long long)st.decode_rows,
        (unsigned long long)st.decode_in_flight);
    sb_fmt(&b,
           "# HELP modpipe_stalls_total Times the front found the pipeline job stalled.\n"
           "# TYPE modpipe_stalls_total counter\nmodpipe_stalls_total %llu\n",
           (unsigned long long)st.stalls);
    if (st.stalls > 0)
        sb_fmt(&b,
               "# HELP modpipe_last_stall The rank the last stall was blamed on (-1: none "
               "named) and its host.\n"
               "# TYPE modpipe_last_stall gauge\n"
               "modpipe_last_stall{stage=\"%d\",rank=\"%d\",host=\"%s\"} 1\n",
               st.stall_stage, st.stall_rank, st.stall_host);
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

/* ---- Routing --------------------------------------------------------------------------------- */

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

/* The Content-Length headers of a request (MHD keeps every header line). */
typedef struct {
    int n, differ;
    unsigned long long v[2]; /* the first value, and the first one that differs */
} cl_scan;

static enum MHD_Result cl_iter(void *cls, enum MHD_ValueKind kind, const char *key,
                               const char *value)
{
    (void)kind;
    cl_scan *cl = cls;
    if (strcasecmp(key, "Content-Length") || !value) return MHD_YES;
    unsigned long long v = strtoull(value, NULL, 10);
    if (cl->n++ == 0)
        cl->v[0] = v;
    else if (v != cl->v[0] && !cl->differ) {
        cl->v[1] = v;
        cl->differ = 1;
    }
    return MHD_YES;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url,
                               const char *method, const char *version, const char *upload,
                               size_t *upload_size, void **req_cls)
{
    (void)version;
    serve_server *s = cls;
    conn_ctx *cc = *req_cls;
    if (!cc) {
        /* first call: headers only. Everything that can refuse the request is checked before
         * a byte of the body is read: the connection count, the key (even for an unknown
         * route: the server's routes are not shown to a client without it), route, method,
         * and the declared body size. MHD closes a connection whose body was not read. */
        int open = atomic_load(&s->n_conns);
        if (open > s->max_conns) {
            char m[200];
            snprintf(m, sizeof m, "too many connections: %d open, at most %d are served", open,
                     s->max_conns);
            return reply_error_h(s, c, 503, m, NULL, NULL, "Connection", "close");
        }
        int found = -1, path_known = 0;
        for (int i = 0; i < N_ROUTES; i++)
            if (!strcmp(url, ROUTES[i].path)) {
                path_known = 1;
                if (!strcmp(method, ROUTES[i].method) ||
                    (!strcmp(method, "HEAD") && !strcmp(ROUTES[i].method, "GET")))
                    found = i;
            }
        if (s->api_key && !(found >= 0 && ROUTES[found].id == R_HEALTH)) {
            const char *auth = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
            if (!auth)
                return reply_error(s, c, 401, "missing API key: send 'Authorization: Bearer KEY'",
                                   NULL, "invalid_api_key");
            if (strncasecmp(auth, "Bearer ", 7) || !key_ok(auth + 7, s->api_key))
                return reply_error(s, c, 401, "incorrect API key", NULL, "invalid_api_key");
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
        cl_scan cl = {0};
        MHD_get_connection_values(c, MHD_HEADER_KIND, cl_iter, &cl);
        if (cl.differ) {
            char m[160];
            snprintf(m, sizeof m, "two different Content-Length headers (%llu and %llu)", cl.v[0],
                     cl.v[1]);
            return reply_error_h(s, c, 400, m, NULL, NULL, "Connection", "close");
        }
        if (cl.n && cl.v[0] > SERVE_MAX_BODY) {
            char m[160];
            snprintf(m, sizeof m, "the request body (Content-Length %llu) exceeds %u bytes",
                     cl.v[0], SERVE_MAX_BODY);
            return reply_error_h(s, c, 413, m, NULL, NULL, "Connection", "close");
        }
        cc = calloc(1, sizeof *cc);
        if (!cc) return MHD_NO;
        cc->route = ROUTES[found].id;
        *req_cls = cc;
        return MHD_YES;
    }
    if (*upload_size) {
        /* a chunked body has no length up front: it is cut where it passes the limit */
        if (cc->body.n + *upload_size > SERVE_MAX_BODY) {
            if (!s->quiet)
                fprintf(stderr, "modpipe serve: a chunked request body passed %u bytes: closed\n",
                        SERVE_MAX_BODY);
            count_status(s, 413);
            return MHD_NO;
        }
        sb_add(&cc->body, upload, *upload_size);
        *upload_size = 0;
        return MHD_YES;
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
        if (atomic_load(&s->recovering))
            return reply_error(s, c, 503, "recovering: the pipeline is being restarted", NULL,
                               "recovering");
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
    (void)why;
    serve_server *s = cls;
    conn_ctx *cc = *req_cls;
    if (!cc) return;
    if (cc->g) {
        gen *g = cc->g;
        /* a kept-alive connection is idle again: give it its timeout back */
        MHD_set_connection_option(c, MHD_CONNECTION_OPTION_TIMEOUT, s->idle_s);
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

/* ---- Start / stop ---------------------------------------------------------------------------- */

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    (void)c;
    (void)socket_context;
    serve_server *s = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED)
        atomic_fetch_add(&s->n_conns, 1);
    else
        atomic_fetch_sub(&s->n_conns, 1);
}

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
    s->max_conns = o->max_connections > 0 ? o->max_connections : 256;
    s->idle_s = o->idle_timeout_s > 0 ? (unsigned)o->idle_timeout_s : 0u;
    s->max_text = (size_t)s->ctx * tok_max_piece_bytes(tok) + 16;
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
        MHD_OPTION_NOTIFY_CONNECTION, on_connection, s,
        /* a few more than served, so the ones beyond get a 503 instead of a silent close */
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)(s->max_conns + CONN_SPARE),
        MHD_OPTION_CONNECTION_TIMEOUT, s->idle_s, MHD_OPTION_END);
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
void serve_server_set_recovering(serve_server *s, int on) { atomic_store(&s->recovering, on); }

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

/* ---- Signals --------------------------------------------------------------------------------- */

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
