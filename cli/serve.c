/* cli/serve.c — `modpipe serve`: options, tokenizer, HTTP server, signals (see cmd.h). */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sys/socket.h>
#include <sys/un.h>

#include "cli/serve.h"
#include "cli/opts.h"
#include "cli/plan.h"
#include "cli/start.h"
#include "comm/link.h"
#include "serve/chan.h"
#include "serve/front.h"
#include "serve/loop.h"
#include "serve/serve.h"
#include "stage/matmul.h"

static void usage(int cmd)
{
    (void)cmd;
    cli_opts_usage(
        stdout, CLI_SERVE,
        "modpipe serve: an OpenAI-compatible HTTP server (rank 0) over the pipeline.\n"
        "Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,\n"
        "GET /health, POST /tokenize, POST /detokenize, GET /metrics.\n\n"
        "usage: modpipe serve --model DIR --ranks N [options]  (starts and supervises the MPI "
        "job)\n"
        "       mpirun -np N modpipe serve --model DIR [options]  (HTTP on rank 0; no "
        "restarts)\n",
        "  modpipe serve --model stories260K --ranks 2 --mpi-args '--oversubscribe' --port 8080\n"
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
    char key[512]; /* the API key read from --api-key-file */
    const char *tok_path;
    double grace;
    int no_prefix_reuse; /* --no-prefix-reuse */
} setup;

/* The API key: the first line of `path` (without its line end), non-empty. */
static int read_key_file(const char *path, char *key, size_t keylen, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "--api-key-file %s: %s", path, strerror(errno));
        return -1;
    }
    int ok = fgets(key, (int)keylen, f) != NULL;
    fclose(f);
    size_t n = ok ? strlen(key) : 0;
    int whole = n == 0 || key[n - 1] == '\n' || n < keylen - 1;
    while (n > 0 && (key[n - 1] == '\n' || key[n - 1] == '\r')) key[--n] = 0;
    if (!whole) {
        snprintf(err, errlen, "--api-key-file %s: the first line is longer than %zu bytes", path,
                 keylen - 2);
        return -1;
    }
    if (!n) {
        snprintf(err, errlen, "--api-key-file %s: the first line (the key) is empty", path);
        return -1;
    }
    return 0;
}

/* The plan for n_ranks ranks (engine/partition.c through cli_make_plan), as the job makes it. */
static int plan_for(const cli_opts *a, const setup *st, int n_ranks, engine_plan *plan, char *err,
                    size_t errlen)
{
    const serve_loop_opts *l = &st->p.loop;
    engine_mem_opts mem;
    int plan_mem = cli_opt_has(a, "mem-per-rank");
    if (plan_mem) {
        if (cli_mem_opts(a, l->pipe.model_dir, &mem, err, errlen)) return -1;
        if (l->pipe.weights_dtype >= 0) mem.weight_dtype = (stage_dtype)l->pipe.weights_dtype;
        mem.slots = l->slots;
        mem.ctx = l->ctx;
        mem.micro_batch = l->pipe.micro_batch;
    }
    return cli_make_plan(a, &st->cfg, n_ranks, 0, plan_mem ? &mem : NULL, plan, err, errlen);
}

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
    p->loop.pipe.model_dir = model;
    p->loop.pipe.cfg = cfg;
    long v;
    double d;
    if (cfg->max_pos < 2) {
        snprintf(err, errlen,
                 "%s/config.json: max_position_embeddings is %d; serving needs at least 2 "
                 "positions (a prompt token and a new one)",
                 model, cfg->max_pos);
        return -1;
    }
    int max_ctx = cfg->max_pos < 4096 ? cfg->max_pos : 4096;
    if (cli_opt_long(a, "slots", 1, 4096, 8, &v, err, errlen)) return -1;
    p->loop.slots = (int)v;
    if (cli_opt_long(a, "ctx", 2, 1 << 20, max_ctx, &v, err, errlen)) return -1;
    p->loop.ctx = (int)v;
    if (cli_opt_long(a, "queue", 0, 1 << 20, 64, &v, err, errlen)) return -1;
    p->queue = (int)v;
    if (cli_pipe_opts_read(a, &p->loop.pipe, err, errlen)) return -1;
    st->no_prefix_reuse = cli_opt_has(a, "no-prefix-reuse");

    if (plan_for(a, st, n_ranks, &st->plan, err, errlen)) return -1;
    st->have_plan = 1;
    p->loop.pipe.plan = &st->plan;
    engine_pipe_opts *pipe = &p->loop.pipe;
    if (!pipe->max_in_flight) pipe->max_in_flight = 2 * st->plan.n_stages;
    if (pipe->max_in_flight < 2) pipe->max_in_flight = 2;
    long groups;
    if (cli_opt_long(a, "decode-groups", 1, 4096, st->plan.n_stages, &groups, err, errlen))
        return -1;
    p->loop.decode_groups = (int)groups;

    /* HTTP side (used on rank 0) */
    serve_opts *so = &st->so;
    so->host = cli_opt_str(a, "host") ? cli_opt_str(a, "host") : "127.0.0.1";
    if (cli_opt_long(a, "port", 0, 65535, 8080, &v, err, errlen)) return -1;
    so->port = (int)v;
    if (cli_opt_str(a, "api-key")) {
        snprintf(err, errlen,
                 "--api-key: a key on the command line is visible to every user in ps; put it in "
                 "a file (--api-key-file PATH) or in the environment (MODPIPE_API_KEY)");
        return -1;
    }
    if (cli_opt_str(a, "api-key-file")) {
        if (read_key_file(cli_opt_str(a, "api-key-file"), st->key, sizeof st->key, err, errlen))
            return -1;
        so->api_key = st->key;
    } else {
        so->api_key = getenv("MODPIPE_API_KEY");
    }
    if (cli_opt_long(a, "max-connections", 1, 100000, 256, &v, err, errlen)) return -1;
    so->max_connections = (int)v;
    if (cli_opt_long(a, "idle-timeout", 0, 86400, 30, &v, err, errlen)) return -1;
    so->idle_timeout_s = (int)v;
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
    so->ctx = p->loop.ctx;
    so->quiet = !p->loop.pipe.progress;
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

/* The HTTP side: tokenizer, queue, signal pipe, server (rank 0, or the front). */
static int start_http(setup *st, tok_tokenizer **tok, srvq **q, serve_server **srv, char *err,
                      size_t errlen)
{
    int rc = tok_load(st->tok_path, tok, err, errlen);
    if (!rc && tok_vocab_size(*tok) > st->cfg.vocab) {
        snprintf(err, errlen, "%s: the tokenizer has %d ids, the model's vocab only %d",
                 st->tok_path, tok_vocab_size(*tok), st->cfg.vocab);
        rc = -1;
    }
    if (!rc && !(*q = srvq_new(st->p.loop.slots, st->p.loop.ctx, st->p.queue, st->cfg.vocab,
                               tok_eos(*tok)))) {
        snprintf(err, errlen, "out of memory (a queue of %d slots)", st->p.loop.slots);
        rc = -1;
    }
    if (!rc && st->no_prefix_reuse) srvq_set_prefix_reuse(*q, 0);
    if (!rc) rc = serve_signals_install(err, errlen);
    if (!rc) rc = serve_server_start(&st->so, *q, *tok, srv, err, errlen);
    return rc;
}

static void print_listening(const setup *st, serve_server *srv)
{
    fprintf(stderr,
            "modpipe serve: listening on http://%s:%d (pid %d), model %s, %d stage%s, "
            "%d slots x %d positions, chat template %s\n",
            st->so.host, serve_server_port(srv), (int)getpid(), st->name, st->plan.n_stages,
            st->plan.n_stages > 1 ? "s" : "", st->p.loop.slots, st->p.loop.ctx,
            serve_chat_name(st->so.chat));
}

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

/* Job mode, rank 0: connect to the front's socket and say HELLO. */
static int job_connect(const char *path, const setup *st, int size, int *fd, char *err,
                       size_t errlen)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) {
        snprintf(err, errlen, "--job %s: path too long", path);
        return -1;
    }
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    *fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (*fd < 0 || connect(*fd, (struct sockaddr *)&a, sizeof a)) {
        snprintf(err, errlen, "--job %s: %s (rank 0 must run on the front's host)", path,
                 strerror(errno));
        return -1;
    }
    chan_hello h = {st->p.loop.slots, st->p.loop.ctx, st->cfg.vocab, size, (int32_t)getpid()};
    if (chan_send(*fd, CHAN_HELLO, &h, sizeof h, NULL, 0)) {
        snprintf(err, errlen, "--job %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* The job's command line: mpirun [--mpi-args] [--hostfile F] -np N <this binary> serve
 * <the pipeline options, as resolved here> --job (the front appends the socket). */
typedef struct {
    char *v[128];
    int n;
    char buf[4096]; /* numbers and the split --mpi-args */
    size_t used;
} argv_b;

static int ab_add(argv_b *b, const char *s)
{
    if (b->n >= 126) return -1;
    b->v[b->n++] = (char *)s;
    return 0;
}

static int ab_num(argv_b *b, long x)
{
    int k = snprintf(b->buf + b->used, sizeof b->buf - b->used, "%ld", x);
    if (k < 0 || (size_t)k + 1 > sizeof b->buf - b->used) return -1;
    int rc = ab_add(b, b->buf + b->used);
    b->used += (size_t)k + 1;
    return rc;
}

static int job_argv(const cli_opts *a, const setup *st, int ranks, const char *hostfile, argv_b *b,
                    char *err, size_t errlen)
{
    static char exe[4096];
    ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (k <= 0) {
        snprintf(err, errlen, "cannot find this program (/proc/self/exe): %s", strerror(errno));
        return -1;
    }
    exe[k] = 0;
    int bad = ab_add(b, "mpirun");
    if (cli_opt_str(a, "mpi-args")) {
        size_t n = strlen(cli_opt_str(a, "mpi-args"));
        if (n + 1 > sizeof b->buf - b->used)
            bad = -1;
        else {
            char *m = b->buf + b->used;
            memcpy(m, cli_opt_str(a, "mpi-args"), n + 1);
            b->used += n + 1;
            char *save = NULL;
            for (char *t = strtok_r(m, " \t", &save); t && !bad; t = strtok_r(NULL, " \t", &save))
                bad = ab_add(b, t);
        }
    }
    if (!hostfile) hostfile = cli_opt_str(a, "hostfile");
    if (hostfile) bad |= ab_add(b, "--hostfile") | ab_add(b, hostfile);
    bad |= ab_add(b, "-np") | ab_num(b, ranks) | ab_add(b, exe) | ab_add(b, "serve");
    bad |= ab_add(b, "--model") | ab_add(b, cli_opt_str(a, "model"));
    bad |= ab_add(b, "--slots") | ab_num(b, st->p.loop.slots) | ab_add(b, "--ctx") |
           ab_num(b, st->p.loop.ctx);
    bad |= ab_add(b, "--micro-batch") | ab_num(b, st->p.loop.pipe.micro_batch);
    bad |= ab_add(b, "--max-in-flight") | ab_num(b, st->p.loop.pipe.max_in_flight);
    /* the options the job reads itself; those from a --config file reach it with the file */
    static const char *const PASS[] = {"config",     "stages",        "tp",        "mem-per-rank",
                                       "wire-dtype", "weights-dtype", "transport", "threads",
                                       "timeout",    "kv-page",       "kv-mem",    "matmul"};
    enum { N_PASS = sizeof PASS / sizeof PASS[0] };
    static char names[N_PASS][24];
    for (int i = 0; i < N_PASS; i++)
        if (cli_opt_has(a, PASS[i]) && !strncmp(cli_opt_origin(a, PASS[i]), "--", 2)) {
            snprintf(names[i], sizeof names[i], "--%s", PASS[i]);
            bad |= ab_add(b, names[i]) | ab_add(b, cli_opt_str(a, PASS[i]));
        }
    if (cli_opt_has(a, "quiet")) bad |= ab_add(b, "--quiet");
    if (cli_opt_has(a, "huge-pages") && !strncmp(cli_opt_origin(a, "huge-pages"), "--", 2))
        bad |= ab_add(b, "--huge-pages");
    bad |= ab_add(b, "--job");
    if (bad) {
        snprintf(err, errlen, "the job's command line is too long (--mpi-args?)");
        return -1;
    }
    b->v[b->n] = NULL;
    return 0;
}

/* serve_job_cmd_fn: the job for `ranks` ranks; a rank count other than the plan's is
 * re-partitioned here first, so a count no plan fits is refused before the job starts. */
typedef struct {
    const cli_opts *a;
    const setup *st;
    int ranks; /* the plan's (st->plan) */
    argv_b b;
} job_ctx;

static int job_cmd(void *arg, int ranks, const char *hostfile, char *const **argv, int *stages,
                   char *err, size_t errlen)
{
    job_ctx *c = arg;
    *stages = c->st->plan.n_stages;
    if (ranks != c->ranks) {
        engine_plan p;
        if (plan_for(c->a, c->st, ranks, &p, err, errlen)) return -1;
        *stages = p.n_stages;
        engine_plan_free(&p);
    }
    memset(&c->b, 0, sizeof c->b);
    if (job_argv(c->a, c->st, ranks, hostfile, &c->b, err, errlen)) return -1;
    *argv = c->b.v;
    return 0;
}

/* `modpipe serve --ranks N`: HTTP and the queue here, the pipeline in a job we start. */
static int front_main(const cli_opts *a, int ranks)
{
    char err[1024] = "";
    setup st;
    memset(&st, 0, sizeof st);
    tok_tokenizer *tok = NULL;
    srvq *q = NULL;
    serve_server *srv = NULL;
    static job_ctx jc; /* the job's argv (the front's lifetime) */
    memset(&jc, 0, sizeof jc);
    jc.a = a;
    jc.st = &st;
    jc.ranks = ranks;
    serve_hosts hosts;
    memset(&hosts, 0, sizeof hosts);
    const char *hf = cli_opt_str(a, "hostfile"), *spare = cli_opt_str(a, "spare-hosts");
    double stall;
    long restarts;
    int rc = make_setup(a, ranks, &st, err, sizeof err);
    if (!rc) rc = cli_opt_double(a, "stall-timeout", 0.1, 1e6, 0, 5.0, &stall, err, sizeof err);
    if (!rc) rc = cli_opt_long(a, "max-restarts", 0, 1000000, 3, &restarts, err, sizeof err);
    if (!rc && spare && !hf) {
        snprintf(err, sizeof err, "--spare-hosts needs --hostfile (the hosts of the plan)");
        rc = -1;
    }
    /* rank 0 runs on the first host and needs the front's Unix socket: refuse any other */
    if (!rc && hf) rc = serve_hosts_load(&hosts, hf, spare, err, sizeof err);
    if (!rc) rc = start_http(&st, &tok, &q, &srv, err, sizeof err);
    if (rc) {
        fprintf(stderr, "modpipe serve: %s\n", err);
        serve_server_free(srv);
        srvq_free(q);
        tok_free(tok);
        serve_hosts_free(&hosts);
        setup_free(&st);
        stage_threads_free();
        return 2;
    }
    int whole, max_rows = serve_loop_rows(&st.p.loop, &whole);
    serve_front_opts fo = {
        .job_cmd = job_cmd,
        .job_arg = &jc,
        .ranks = ranks,
        .hosts = spare ? &hosts : NULL,
        .slots = st.p.loop.slots,
        .ctx = st.p.loop.ctx,
        .micro_batch = st.p.loop.pipe.micro_batch,
        .whole_prompts = whole,
        .max_rows = max_rows,
        .max_in_flight = st.p.loop.pipe.max_in_flight,
        .decode_groups = cli_opt_has(a, "decode-groups") ? st.p.loop.decode_groups : 0,
        .stall_s = stall,
        .max_restarts = (int)restarts,
        .start_timeout_s = st.p.loop.pipe.timeout_s,
        .quiet = !st.p.loop.pipe.progress,
    };
    print_listening(&st, srv);
    pthread_t ctl;
    ctl_arg ca = {.s = srv, .quiet = !st.p.loop.pipe.progress};
    pthread_create(&ctl, NULL, control, &ca);
    rc = serve_front_run(&fo, q, srv, err, sizeof err);
    if (rc) {
        fprintf(stderr, "modpipe serve: %s\n", err);
        ca.stop_only = 1;
    }
    serve_signals_notify();
    pthread_join(ctl, NULL);
    if (rc) serve_server_shutdown(srv); /* the connections write their error events */
    serve_server_free(srv);
    srvq_free(q);
    tok_free(tok);
    serve_hosts_free(&hosts);
    if (!rc && st.p.loop.pipe.progress) fprintf(stderr, "modpipe serve: stopped\n");
    setup_free(&st);
    stage_threads_free();
    return rc ? 1 : 0;
}

int cli_serve_main(int argc, char **argv, serve_pipeline_fn run)
{
    {
        /* the front: no MPI in this process, it starts the job (serve/front.h) */
        cli_opts a;
        char err[1024];
        long ranks;
        int front = !cli_opts_parse(&a, CLI_SERVE, argc, argv, err, sizeof err) &&
                    !cli_opt_has(&a, "help") && !cli_opt_has(&a, "job") &&
                    cli_opt_has(&a, "ranks") &&
                    !cli_opt_long(&a, "ranks", 1, 1 << 16, 1, &ranks, err, sizeof err) &&
                    (ranks > 1 || cli_opt_has(&a, "hostfile") || cli_opt_has(&a, "mpi-args") ||
                     cli_opt_has(&a, "spare-hosts"));
        int rc = front ? front_main(&a, (int)ranks) : 0;
        cli_opts_free(&a);
        if (front) return rc;
    }
    char err[1024] = "";
    cli_opts a;
    int rank, size, rc;
    if (cli_mpi_start(CLI_SERVE, argc, argv, 1, usage, &a, &rank, &size, &rc, err, sizeof err))
        return 0;
    setup st;
    memset(&st, 0, sizeof st);
    if (!rc) rc = make_setup(&a, size, &st, err, sizeof err);

    const char *job = rc ? NULL : cli_opt_str(&a, "job");
    long ranks = 0;
    if (!rc && cli_opt_str(&a, "ranks") && !job) {
        rc = cli_opt_long(&a, "ranks", 1, 1 << 16, 1, &ranks, err, sizeof err);
        if (!rc && ranks != size) {
            snprintf(err, sizeof err,
                     "--ranks %ld under mpirun -np %d: --ranks starts the job itself (run it "
                     "without mpirun)",
                     ranks, size);
            rc = -1;
        }
    }
    if (!rc && !job && cli_opt_has(&a, "spare-hosts")) {
        snprintf(err, sizeof err,
                 "--spare-hosts: only the front restarts a job (modpipe serve --ranks N "
                 "--hostfile F --spare-hosts G, without mpirun)");
        rc = -1;
    }
    tok_tokenizer *tok = NULL;
    srvq *q = NULL;
    serve_server *srv = NULL;
    int chan = -1;
    if (!rc && rank == 0 && !job) rc = start_http(&st, &tok, &q, &srv, err, sizeof err);
    if (!rc && rank == 0 && job) rc = job_connect(job, &st, size, &chan, err, sizeof err);
    if (rank != 0 && !job) {
        /* mpirun forwards SIGTERM to every rank: only rank 0 decides when the pipeline ends */
        signal(SIGTERM, SIG_IGN);
        signal(SIGINT, SIG_IGN);
    }
    int first_bad = comm_first_failed(MPI_COMM_WORLD, rc != 0);
    if (first_bad >= 0) {
        if (rank == first_bad) fprintf(stderr, "modpipe serve: %s\n", err);
        if (rank == 0 && chan >= 0 && rank == first_bad)
            chan_send(chan, CHAN_ERROR, err, strlen(err), NULL, 0);
        serve_server_free(srv);
        srvq_free(q);
        tok_free(tok);
        setup_free(&st);
        stage_threads_free();
        cli_opts_free(&a);
        MPI_Finalize();
        return 2;
    }
    if (job) {
        /* a job the front started: rank 0 relays, the front owns every request */
        rc = serve_pipeline_run_job(MPI_COMM_WORLD, &st.p, chan, err, sizeof err);
        if (rc && rank == 0) fprintf(stderr, "modpipe serve: job: %s\n", err);
        if (chan >= 0) close(chan);
        setup_free(&st);
        stage_threads_free();
        cli_opts_free(&a);
        MPI_Finalize();
        return rc ? 1 : 0;
    }
    pthread_t ctl;
    ctl_arg ca = {.s = srv, .quiet = !st.p.loop.pipe.progress};
    if (rank == 0) {
        print_listening(&st, srv);
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
        if (!rc && st.p.loop.pipe.progress) fprintf(stderr, "modpipe serve: stopped\n");
    }
    setup_free(&st);
    stage_threads_free();
    cli_opts_free(&a);
    MPI_Finalize();
    return rc ? 1 : 0;
}
