/* cli/serve.c — `modpipe serve`: options, tokenizer, HTTP server, signals (see cmd.h). */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/serve.h"
#include "cli/opts.h"
#include "cli/plan.h"
#include "comm/link.h"
#include "serve/serve.h"
#include "stage/matmul.h"

static void usage(void)
{
    cli_opts_usage(
        stdout, CLI_SERVE,
        "modpipe serve: an OpenAI-compatible HTTP server (rank 0) over the pipeline.\n"
        "Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,\n"
        "GET /health, POST /tokenize, POST /detokenize, GET /metrics.\n\n"
        "usage: mpirun -np N modpipe serve --model DIR [options]\n",
        "  mpirun --oversubscribe -np 2 modpipe serve --model stories260K --port 8080\n"
        "  curl -s localhost:8080/v1/completions -H 'Content-Type: application/json' \\\n"
        "       -d '{\"prompt\": \"Once upon a time\", \"max_tokens\": 32, \"temperature\": 0}'\n");
}

typedef struct {
    stage_config cfg;
    int have_cfg;
    engine_plan plan;
    int have_plan;
    serve_pipeline p;
    serve_opts so;
    char name[256];
    const char *tok_path;
    double grace;
} setup;

static int make_setup(const cli_opts *a, int n_ranks, setup *st, char *err, size_t errlen)
{
    const char *model = cli_opt_str(a, "model");
    if (!model) {
        snprintf(err, errlen, "--model DIR is required (see modpipe serve --help)");
        return -1;
    }
    if (stage_config_load(model, &st->cfg, err, errlen)) return -1;
    st->have_cfg = 1;
    const stage_config *cfg = &st->cfg;
    for (int l = 0; l < cfg->n_layers; l++)
        if (stage_kind_is_routed(cfg->layer_kind[l]) && cfg->mod_routing == STAGE_ROUTING_TOPK) {
            snprintf(err, errlen,
                     "%s uses topk routing, which is non-causal: it cannot decode token "
                     "by token, so it cannot be served",
                     model);
            return -1;
        }
    serve_pipeline *p = &st->p;
    p->model_dir = model;
    p->cfg = cfg;
    long v;
    double d;
    int max_ctx = cfg->max_pos > 0 ? (cfg->max_pos < 4096 ? cfg->max_pos : 4096) : 2048;
    if (cli_opt_long(a, "slots", 1, 4096, 8, &v, err, errlen)) return -1;
    p->slots = (int)v;
    if (cli_opt_long(a, "ctx", 2, 1 << 20, max_ctx, &v, err, errlen)) return -1;
    p->ctx = (int)v;
    if (cli_opt_long(a, "queue", 0, 1 << 20, 64, &v, err, errlen)) return -1;
    p->queue = (int)v;
    cli_pipe_opts po;
    if (cli_pipe_opts_read(a, &po, err, errlen)) return -1;
    p->micro_batch = po.micro_batch;
    p->timeout_s = po.timeout_s;
    p->wire = po.wire;
    p->weights_dtype = po.weights_dtype;
    p->dense_transport = po.dense_transport;
    p->progress = po.progress;
    p->kv = po.kv;

    engine_mem_opts mem;
    int plan_mem = cli_opt_has(a, "mem-per-rank");
    if (plan_mem) {
        if (cli_mem_opts(a, model, &mem, err, errlen)) return -1;
        if (p->weights_dtype >= 0) mem.weight_dtype = (stage_dtype)p->weights_dtype;
        mem.slots = p->slots;
        mem.ctx = p->ctx;
        mem.micro_batch = p->micro_batch;
    }
    if (cli_make_plan(a, cfg, n_ranks, 0, plan_mem ? &mem : NULL, &st->plan, err, errlen))
        return -1;
    st->have_plan = 1;
    p->plan = &st->plan;
    p->max_in_flight = po.max_in_flight ? po.max_in_flight : 2 * st->plan.n_stages;
    if (p->max_in_flight < 2) p->max_in_flight = 2;

    /* HTTP side (used on rank 0) */
    serve_opts *so = &st->so;
    so->host = cli_opt_str(a, "host") ? cli_opt_str(a, "host") : "127.0.0.1";
    if (cli_opt_long(a, "port", 0, 65535, 8080, &v, err, errlen)) return -1;
    so->port = (int)v;
    so->api_key = cli_opt_str(a, "api-key") ? cli_opt_str(a, "api-key") : getenv("MODPIPE_API_KEY");
    const char *ct = cli_opt_str(a, "chat-template");
    if (!ct || !strcmp(ct, "auto"))
        so->chat = serve_chat_detect(model);
    else if (!(so->chat = serve_chat_find(ct))) {
        snprintf(err, errlen, "--chat-template: unknown template '%s' (known: %s, auto)", ct,
                 serve_chat_names());
        return -1;
    }
    const char *nm = cli_opt_str(a, "name");
    if (!nm) {
        size_t n = strlen(model);
        while (n > 1 && model[n - 1] == '/') n--;
        const char *b = model + n;
        while (b > model && b[-1] != '/') b--;
        snprintf(st->name, sizeof st->name, "%.*s", (int)(model + n - b), b);
    } else {
        snprintf(st->name, sizeof st->name, "%s", nm);
    }
    so->model_name = st->name;
    so->ctx = p->ctx;
    so->quiet = !p->progress;
    if (cli_opt_double(a, "shutdown-grace", 0.0, 1e6, 0, 30.0, &d, err, errlen)) return -1;
    so->shutdown_grace_s = d > 0 ? d : 1e-3;
    st->tok_path = cli_opt_str(a, "tokenizer") ? cli_opt_str(a, "tokenizer") : model;
    return 0;
}

static void setup_free(setup *st)
{
    if (st->have_plan) engine_plan_free(&st->plan);
    if (st->have_cfg) stage_config_free(&st->cfg);
}

static void on_ready(void *arg) { serve_server_set_ready(arg); }

typedef struct {
    serve_server *s;
    int quiet;
    int cancelled;
    volatile int stop_only; /* the pipeline ended on its own: do not drain */
} ctl_arg;

/* Waits for SIGTERM / SIGINT (or a notify), then drains the server. */
static void *control(void *p)
{
    ctl_arg *c = p;
    int sig = serve_signals_wait();
    if (c->stop_only) return NULL;
    if (!c->quiet)
        fprintf(stderr, "modpipe serve: %s: no new requests; finishing the running ones\n",
                sig == SIGTERM  ? "SIGTERM"
                : sig == SIGINT ? "SIGINT"
                                : "stop");
    c->cancelled = serve_server_shutdown(c->s);
    if (!c->quiet && c->cancelled)
        fprintf(stderr, "modpipe serve: %d request(s) cut at the shutdown deadline\n",
                c->cancelled);
    return NULL;
}

int cli_serve_main(int argc, char **argv, serve_pipeline_fn run)
{
    int prov = 0;
    MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &prov);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    char err[1024] = "";
    cli_opts a;
    setup st;
    memset(&st, 0, sizeof st);
    int rc = cli_opts_parse(&a, CLI_SERVE, argc, argv, err, sizeof err);
    if (!rc && cli_opt_has(&a, "help")) {
        if (rank == 0) usage();
        cli_opts_free(&a);
        MPI_Finalize();
        return 0;
    }
    if (!rc) rc = make_setup(&a, size, &st, err, sizeof err);

    tok_tokenizer *tok = NULL;
    srvq *q = NULL;
    serve_server *srv = NULL;
    if (!rc && rank == 0) {
        rc = tok_load(st.tok_path, &tok, err, sizeof err);
        if (!rc && tok_vocab_size(tok) > st.cfg.vocab) {
            snprintf(err, sizeof err, "%s: the tokenizer has %d ids, the model's vocab only %d",
                     st.tok_path, tok_vocab_size(tok), st.cfg.vocab);
            rc = -1;
        }
        if (!rc && !(q = srvq_new(st.p.slots, st.p.ctx, st.p.queue, st.cfg.vocab, tok_eos(tok)))) {
            snprintf(err, sizeof err, "out of memory (queue)");
            rc = -1;
        }
        if (!rc) rc = serve_signals_install(err, sizeof err);
        if (!rc) rc = serve_server_start(&st.so, q, tok, &srv, err, sizeof err);
    }
    if (rank != 0) {
        /* mpirun forwards SIGTERM to every rank: only rank 0 decides when the pipeline ends */
        signal(SIGTERM, SIG_IGN);
        signal(SIGINT, SIG_IGN);
    }
    int first_bad = comm_first_failed(MPI_COMM_WORLD, rc != 0);
    if (first_bad >= 0) {
        if (rank == first_bad) fprintf(stderr, "modpipe serve: %s\n", err);
        serve_server_free(srv);
        srvq_free(q);
        tok_free(tok);
        setup_free(&st);
        stage_threads_free();
        cli_opts_free(&a);
        MPI_Finalize();
        return 2;
    }
    pthread_t ctl;
    ctl_arg ca = {.s = srv, .quiet = !st.p.progress};
    if (rank == 0) {
        fprintf(stderr,
                "modpipe serve: listening on http://%s:%d (pid %d), model %s, %d stage%s, "
                "%d slots x %d positions, chat template %s\n",
                st.so.host, serve_server_port(srv), (int)getpid(), st.name, st.plan.n_stages,
                st.plan.n_stages > 1 ? "s" : "", st.p.slots, st.p.ctx, serve_chat_name(st.so.chat));
        pthread_create(&ctl, NULL, control, &ca);
        st.p.q = q;
        st.p.on_ready = on_ready;
        st.p.ready_arg = srv;
    }
    rc = run(MPI_COMM_WORLD, &st.p, err, sizeof err);
    if (rank == 0) {
        if (rc) {
            fprintf(stderr, "modpipe serve: the pipeline failed: %s\n", err);
            serve_server_abort(srv, err);
            ca.stop_only = 1;
        }
        serve_signals_notify();
        pthread_join(ctl, NULL);
        serve_server_free(srv);
        srvq_free(q);
        tok_free(tok);
        if (!rc && st.p.progress) fprintf(stderr, "modpipe serve: stopped\n");
    }
    setup_free(&st);
    stage_threads_free();
    cli_opts_free(&a);
    MPI_Finalize();
    return rc ? 1 : 0;
}
