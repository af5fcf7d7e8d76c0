/* tests/test_serve.c — serve_loop_run (serve/loop.h) through the srvq, no HTTP.
 *
 * The CUnit side starts this same binary under mpirun (`test_serve --worker ...`): rank 0
 * builds the srvq, a client thread submits 32 concurrent greedy requests on the real
 * stories260K model and closes the queue while they run (what SIGTERM does), one more
 * request is cancelled from its own on_token callback. The tokens of every request must
 * equal `modpipe generate` on the same prompts (continuous batching does not
 * change greedy results), at -np 1 and -np 3; the per-link byte counters reach
 * srvq_get_stats; the idle loop does not spin a core. The KV pages (docs/SPEC.md §11): pools
 * too small (preemption, lost sequences, every page back), shared prompt prefixes (reused from
 * running and finished requests, same tokens), a pair of running requests sharing 64
 * positions (the exact pages they hold with and without reuse), and sequence-granularity
 * MindSkip (tests/fixtures/mindskip), whose prefixes are never reused.
 * Needs: MODPIPE (the binary, default build/modpipe), mpirun, tests/fixtures/stories260K and
 * tests/fixtures/mindskip.
 */
#include <CUnit/Basic.h>
#include <math.h>
#include <mpi.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "engine/partition.h"
#include "engine/pipeline.h"
#include "serve/loop.h"
#include "serve/queue.h"
#include "serve/queue_sched.h"
#include "stage/config.h"
#include "tests/testutil.h"

#define MPIRUN                                                                                     \
    "mpirun --allow-run-as-root --oversubscribe --mca btl self,tcp --mca btl_tcp_if_include lo"
enum { NREQ = 32, MAXP = 160, MAX_NEW = 12 };
/* the pair (check_pair): prompts of PAIR_S shared + PAIR_OWN own positions, PAIR_NEW new
 * tokens each, pages of PAIR_PAGE positions */
enum { PAIR_S = 64, PAIR_OWN = 80, PAIR_NEW = 17, PAIR_PAGE = 16 };

/* ---- Worker (under mpirun) ------------------------------------------------------------------- */

typedef struct req {
    int32_t prompt[MAXP];
    int n_prompt;
    int32_t tok[256];
    int n_tok, n_done;
    srvq_finish why;
    long id;
    int cancel_after; /* > 0: cancel from on_token after this many tokens */
    struct req *then; /* submitted from on_token at this one's first token (the pair) */
} req;

static srvq *Q;
static req R[NREQ + 2]; /* [NREQ + 1]: the tail request */
static int tail; /* after all ended, R[tail_of]'s prompt once more: it shares a parked prefix */
static int tail_of;
/* then tail2: that prompt + the tail's first tokens up to 33 positions, so it shares 32 from
 * the tail's parked slot, generated positions included; it must go on with the tail's tokens */
static int tail2_same = -1;
static unsigned long long tail2_shared;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int ready_flag, n_done_all;

static long submit(struct req *r, int max_tokens, uint64_t seed, int ignore_eos);
static void on_token(void *arg, int32_t t)
{
    req *r = arg;
    pthread_mutex_lock(&mu); /* r->id is written by the client after submit returns */
    if (r->n_tok < 256) r->tok[r->n_tok] = t;
    r->n_tok++;
    const int cancel = r->cancel_after > 0 && r->n_tok == r->cancel_after;
    const long id = r->id;
    req *then = r->n_tok == 1 ? r->then : NULL;
    pthread_mutex_unlock(&mu);
    if (cancel) srvq_cancel(Q, id);
    /* from the pipeline thread, before its next micro-batch: it is admitted right after this
     * one's prompt is in, however fast the pipeline runs (the queue's lock is not held) */
    if (then) submit(then, PAIR_NEW, 0, 1);
}

static void on_done(void *arg, srvq_finish why, int n_prompt, int n_gen, const char *msg)
{
    (void)n_prompt;
    (void)msg;
    req *r = arg;
    pthread_mutex_lock(&mu);
    r->n_done++;
    r->why = why;
    if (n_gen != r->n_tok) r->n_done += 100; /* n_generated must match the tokens passed on */
    n_done_all++;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

static void on_ready(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&mu);
    ready_flag = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

/* Submits r (greedy, its tokens into r); r->id: the request id, or < 0 (the error printed). */
static long submit(req *r, int max_tokens, uint64_t seed, int ignore_eos)
{
    char err[256];
    srvq_request q = {.prompt = r->prompt,
                      .n_prompt = r->n_prompt,
                      .max_tokens = max_tokens,
                      .top_p = 1,
                      .seed = seed,
                      .ignore_eos = ignore_eos,
                      .on_token = on_token,
                      .on_done = on_done,
                      .arg = r};
    pthread_mutex_lock(&mu); /* on_token may read r->id */
    r->id = srvq_submit(Q, &q, err, sizeof err);
    pthread_mutex_unlock(&mu);
    if (r->id < 0) fprintf(stderr, "submit (%d ids): %s\n", r->n_prompt, err);
    return r->id;
}

static void wait_done(int n)
{
    pthread_mutex_lock(&mu);
    while (n_done_all < n) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
}

static void wait_ready(void)
{
    pthread_mutex_lock(&mu);
    while (!ready_flag) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec * 1e-6;
}

static double idle_cpu = -1;
static size_t kv_mem;           /* --kv-mem of the run (0: the default, room for everything) */
static long kv_used_after = -1; /* pages held on all stages once every request ended and the
                                 * prefix cache was cleared */
static long kv_live_after = -1; /* pages held by running sequences once every request ended
                                 * (before the clear: the rest is cached) */
/* blind: the queue never sees the pools' reports, so it admits by slots alone and the stages
 * run out of pages (the stage's soft mode and the recompute of lost sequences); the reports
 * are kept here instead */
static int blind;
static pthread_mutex_t kv_mu = PTHREAD_MUTEX_INITIALIZER;
static engine_kv_report kv_seen[SRVQ_MAX_LINKS];
static int n_kv_seen;
static void blind_kv(void *self, const engine_kv_report *k, int n)
{
    (void)self;
    pthread_mutex_lock(&kv_mu);
    n_kv_seen = n < SRVQ_MAX_LINKS ? n : SRVQ_MAX_LINKS;
    memcpy(kv_seen, k, (size_t)n_kv_seen * sizeof *k);
    pthread_mutex_unlock(&kv_mu);
}
static void kv_now(srvq_stats *st)
{
    srvq_get_stats(Q, st);
    if (!blind) return;
    pthread_mutex_lock(&kv_mu);
    st->n_kv = n_kv_seen;
    memcpy(st->kv, kv_seen, (size_t)n_kv_seen * sizeof *kv_seen);
    pthread_mutex_unlock(&kv_mu);
}
static int forever; /* keep submitting, never close: the dead-rank test kills a rank */

/* The live phase (kv runs): one request whose on_token sleeps, so it runs for well over a
 * report period (0.25 s), while the client watches the pools' reports: pages held by a
 * running request must show, on one stage as on N (the pipeline loop reports while it
 * issues). */
static long kv_live_max = -1; /* most pages held on all stages seen while it ran */
static int live_done;
static void live_token(void *arg, int32_t t)
{
    (void)arg;
    (void)t;
    struct timespec ts = {0, 15000000};
    nanosleep(&ts, NULL);
}
static void live_end(void *arg, srvq_finish why, int n_prompt, int n_gen, const char *msg)
{
    (void)arg;
    (void)why;
    (void)n_prompt;
    (void)n_gen;
    (void)msg;
    pthread_mutex_lock(&mu);
    live_done = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}
static void live_phase(void)
{
    char err[256];
    srvq_request q = {.prompt = R[0].prompt,
                      .n_prompt = R[0].n_prompt,
                      .max_tokens = 40,
                      .top_p = 1,
                      .ignore_eos = 1,
                      .on_token = live_token,
                      .on_done = live_end};
    if (srvq_submit(Q, &q, err, sizeof err) < 0) {
        fprintf(stderr, "live submit: %s\n", err);
        return;
    }
    kv_live_max = 0;
    for (;;) {
        pthread_mutex_lock(&mu);
        int d = live_done;
        pthread_mutex_unlock(&mu);
        if (d) break;
        srvq_stats st;
        kv_now(&st);
        long used = 0;
        for (int k = 0; k < st.n_kv; k++) used += (long)st.kv[k].pages_used;
        if (st.running > 0 && used > kv_live_max) kv_live_max = used;
        struct timespec ts = {0, 5000000};
        nanosleep(&ts, NULL);
    }
}

static void *client_forever(void *arg)
{
    (void)arg;
    wait_ready();
    static req r[1];
    r[0].prompt[0] = 1;
    r[0].n_prompt = 1;
    char err[256];
    for (;;) {
        srvq_request q = {.prompt = r[0].prompt,
                          .n_prompt = 1,
                          .max_tokens = 12,
                          .top_p = 1,
                          .on_done = on_done,
                          .arg = &r[0]};
        srvq_submit(Q, &q, err, sizeof err); /* full: try again later */
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

/* The stages' pools summed over their last reports, polled every 50 ms for up to 10 s until
 * no running sequence holds a page (empty 0: held = cached) or no page is held (empty 1);
 * settle: wait 0.6 s first, so that every stage has reported since the caller's last request
 * ended (a stage reports at most every 0.25 s, rank 0 hands reports on at most every 0.25 s)
 * and an older report cannot pass for the one after. The last values seen; -1: no report. */
typedef struct {
    long held, cached, peak;
} kv_sum;
static kv_sum kv_poll(int empty, int settle)
{
    kv_sum v = {-1, -1, -1};
    struct timespec ts = {0, settle ? 600000000 : 0};
    nanosleep(&ts, NULL);
    for (int t = 0; t < 200; t++) {
        srvq_stats st;
        kv_now(&st);
        if (st.n_kv > 0) {
            v = (kv_sum){0, 0, 0};
            for (int k = 0; k < st.n_kv; k++) {
                v.held += (long)st.kv[k].pages_used;
                v.cached += (long)st.kv[k].pages_cached;
                v.peak += (long)st.kv[k].pages_peak;
            }
            if (v.held == (empty ? 0 : v.cached)) break;
        }
        ts = (struct timespec){0, 50000000};
        nanosleep(&ts, NULL);
    }
    return v;
}

static void *client(void *arg)
{
    (void)arg;
    wait_ready();
    /* one idle second first: the loop must sleep, not spin */
    double c0 = cpu_s();
    struct timespec one = {1, 0};
    nanosleep(&one, NULL);
    idle_cpu = cpu_s() - c0;
    if (kv_mem) live_phase();
    for (int i = 0; i <= NREQ; i++) {
        submit(&R[i], i == NREQ ? 200 : MAX_NEW, (uint64_t)i, 0);
        if (i % 5 == 4) { /* arrivals spread out: requests join a running pipeline */
            struct timespec ts = {0, 3000000};
            nanosleep(&ts, NULL);
        }
    }
    if (tail) { /* nothing runs: only a finished request's parked slot can give the prefix */
        wait_done(NREQ + 1);
        for (int i = 0; i < NREQ && !tail_of; i++) /* long enough for 32 shared positions */
            if (R[i].n_prompt >= 21 && R[i].n_tok == MAX_NEW) tail_of = i;
        req *r = &R[NREQ + 1];
        *r = R[tail_of];
        r->n_tok = r->n_done = 0;
        submit(r, MAX_NEW, 0, 0);
        wait_done(NREQ + 2);
        static req r2;
        const int k = 33 - r->n_prompt;
        if (r->n_prompt >= 21 && r->n_tok == MAX_NEW) {
            memcpy(r2.prompt, r->prompt, (size_t)r->n_prompt * sizeof *r2.prompt);
            memcpy(r2.prompt + r->n_prompt, r->tok, (size_t)k * sizeof *r2.prompt);
            r2.n_prompt = 33;
            srvq_stats s0, s1;
            srvq_get_stats(Q, &s0);
            submit(&r2, MAX_NEW - k, 0, 1);
            wait_done(NREQ + 3);
            srvq_get_stats(Q, &s1);
            tail2_shared = (unsigned long long)(s1.prefix_tokens - s0.prefix_tokens);
            tail2_same = r2.n_tok == MAX_NEW - k &&
                         !memcmp(r2.tok, r->tok + k, (size_t)(MAX_NEW - k) * sizeof *r2.tok);
        }
    }
    if (kv_mem) { /* every request ends: every page is free or cached; then the cache is
                   * cleared and the stages' pools report every page back */
        wait_done(NREQ + 1);
        kv_sum v = kv_poll(0, 0);
        kv_live_after = v.held < 0 ? -1 : v.held - v.cached;
        srvq_prefix_cache_clear(Q);
        kv_used_after = kv_poll(1, 0).held;
    }
    srvq_close(Q); /* like SIGTERM: running and queued requests still finish */
    return NULL;
}

/* The pair (check_pair): R[0]'s prompt alone (as R[2]): the most pages it held; the cache is
 * cleared; then R[0] and, from its first token's callback (its prompt is in), R[1], whose
 * prompt begins with the same PAIR_S positions: the most pages the two held, and what stays
 * cached once both ended; the cache is cleared: every page back. */
static long pair_alone = -1, pair_peak = -1, pair_cached = -1;
static void *client_pair(void *arg)
{
    (void)arg;
    wait_ready();
    R[2].n_prompt = R[0].n_prompt;
    memcpy(R[2].prompt, R[0].prompt, sizeof R[0].prompt);
    submit(&R[2], PAIR_NEW, 0, 1);
    wait_done(1);
    pair_alone = kv_poll(0, 1).peak;
    srvq_prefix_cache_clear(Q);
    kv_poll(1, 0);
    R[0].then = &R[1];
    submit(&R[0], PAIR_NEW, 0, 1);
    wait_done(3);
    kv_sum v = kv_poll(0, 1);
    pair_peak = v.peak;
    pair_cached = v.cached;
    srvq_prefix_cache_clear(Q);
    kv_used_after = kv_poll(1, 0).held;
    srvq_close(Q);
    return NULL;
}

static int worker(int argc, char **argv)
{
    if (argc < 5) return 2;
    const char *model = argv[2], *prompts = argv[3];
    int slots = atoi(argv[4]);
    forever = argc > 5 && !strcmp(argv[5], "forever");
    if (argc > 5 && !forever) kv_mem = (size_t)atol(argv[5]);
    int noprefix = 0, pair = 0;
    for (int i = 6; i < argc; i++) { /* modes */
        pair |= !strcmp(argv[i], "pair");
        blind |= !strcmp(argv[i], "blind");
        noprefix |= !strcmp(argv[i], "noprefix");
        tail |= !strcmp(argv[i], "tail");
    }
    int provided;
    MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    char err[1024];
    stage_config cfg;
    engine_plan plan;
    if (stage_config_load(model, &cfg, err, sizeof err) ||
        engine_partition_auto(&cfg, size, &plan, err, sizeof err)) {
        fprintf(stderr, "worker: %s\n", err);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    FILE *f = fopen(prompts, "r");
    for (int i = 0; f && i < NREQ; i++) {
        char line[2048];
        if (!fgets(line, sizeof line, f)) break;
        char *p = line, *end;
        while (R[i].n_prompt < MAXP) {
            long v = strtol(p, &end, 10);
            if (end == p) break;
            R[i].prompt[R[i].n_prompt++] = (int32_t)v;
            p = end;
            while (*p == ',' || *p == ' ') p++;
        }
    }
    if (f) fclose(f);
    R[NREQ].prompt[0] = 1;
    R[NREQ].n_prompt = 1;
    R[NREQ].cancel_after = 3;
    /* the pair: room for its prompts, and micro-batches of 64 rows so that a prompt is in
     * after three: the first request is still running when the second's last page comes */
    const int ctx = pair ? 256 : 64;
    serve_loop_opts o = {.pipe = {.weights_dtype = -1,
                                  .model_dir = model,
                                  .cfg = &cfg,
                                  .plan = &plan,
                                  .micro_batch = pair ? 64 : 8,
                                  .max_in_flight = 2 * size,
                                  .wire = STAGE_F32,
                                  /* pages of 4 positions: a request outgrows the page of growth
                                   * admission gave it, so a full pool preempts */
                                  .kv = {.page = kv_mem ? 4 : PAIR_PAGE, .mem_bytes = kv_mem},
                                  .timeout_s = 60},
                         .slots = slots,
                         .ctx = ctx};
    pthread_t th;
    if (rank == 0) {
        Q = srvq_new(slots, ctx, 2 * NREQ, cfg.vocab, cfg.eos_token_id);
        if (noprefix) srvq_set_prefix_reuse(Q, 0);
        pthread_create(&th, NULL, pair ? client_pair : forever ? client_forever : client, NULL);
    }
    int rc;
    if (!blind) {
        rc = serve_loop_run(MPI_COMM_WORLD, &o, Q, on_ready, NULL, err, sizeof err);
    } else { /* serve_loop_run's loop with the queue's ops but its own kv op */
        engine_sched_ops ops = srvq_sched_ops;
        ops.kv = blind_kv;
        engine_loop_opts lo = {.pipe = o.pipe,
                               .slots = slots,
                               .ctx = ctx,
                               .max_rows = o.pipe.micro_batch,
                               .serve = 1,
                               .command = "serve"};
        lo.pipe.progress = 0;
        engine_loop *L = NULL;
        if (rank == 0) srvq_sched_config(Q, o.pipe.micro_batch, 0, o.pipe.micro_batch);
        rc = engine_loop_open(MPI_COMM_WORLD, &lo, &ops, Q, &L, err, sizeof err);
        if (!rc) {
            if (rank == 0) on_ready(NULL);
            while (engine_loop_step(L)) {}
            rc = engine_loop_close(L, NULL, err, sizeof err);
        }
    }
    if (rc) fprintf(stderr, "serve_loop_run: %s\n", err);
    if (rank == 0 && rc) on_ready(NULL); /* the client finds the queue closed and stops */
    if (rank == 0) {
        pthread_join(th, NULL);
        for (int i = 0; i <= NREQ + tail; i++) {
            printf("req %d done %d why %d tokens ", i, R[i].n_done, (int)R[i].why);
            for (int k = 0; k < R[i].n_tok && k < 256; k++)
                printf("%s%d", k ? "," : "", R[i].tok[k]);
            printf("\n");
        }
        srvq_stats st;
        kv_now(&st);
        printf("stats requests %llu generated %llu running %ld queued %ld links %d\n",
               (unsigned long long)st.requests_total, (unsigned long long)st.generated_tokens,
               st.running, st.queued, st.n_links);
        for (int l = 0; l < st.n_links; l++)
            printf("link %d->%d bytes %llu dense %llu\n", st.link[l].from, st.link[l].to,
                   (unsigned long long)st.link[l].bytes,
                   (unsigned long long)st.link[l].dense_bytes);
        printf("idle_cpu %.3f\n", idle_cpu);
        printf("preemptions %llu kv_used_after %ld stages %d\n", (unsigned long long)st.preemptions,
               kv_used_after, st.n_kv);
        printf("kv_live_max %ld live_after %ld\n", kv_live_max, kv_live_after);
        printf("tail_of %d tail2_same %d shared %llu\n", tail_of, tail2_same, tail2_shared);
        printf("parked_hits %llu evictions %llu\n", (unsigned long long)st.prefix_cached_hits,
               (unsigned long long)st.prefix_evictions);
        printf("prefix_hits %llu tokens %llu\n", (unsigned long long)st.prefix_hits,
               (unsigned long long)st.prefix_tokens);
        printf("pair alone %ld peak %ld cached %ld\n", pair_alone, pair_peak, pair_cached);
        fflush(stdout);
        srvq_free(Q);
    }
    engine_plan_free(&plan);
    stage_config_free(&cfg);
    MPI_Finalize();
    return rc ? 1 : 0;
}

/* ---- Tests ----------------------------------------------------------------------------------- */

static const char *BIN, *SELF, *FIX;
static char *TMP;
static char OUT[1 << 17];

/* a shell command, stdout+stderr into OUT, killed after secs (tests/testutil.h) */
#define run(secs, ...) tu_run(OUT, sizeof OUT, (secs), __VA_ARGS__)

static char want[NREQ][2048], want_px[NREQ][2048], want_ms[NREQ][2048];
static char prompts[512], prompts_px[512], prompts_ms[512];
static char (*W)[2048] = want; /* the reference check_serve compares with, and its prompts */
static const char *PF = prompts;
static const char *MODEL = "stories260K"; /* the fixture check_serve runs */
static int WHOLE; /* MODEL has sequence-granularity MindSkip: never a reused prefix */

/* `modpipe generate` on the prompts file pf (greedy, max_new new tokens, more options in
 * extra): its first n lines of ids into want, without the EOS id `eos` that ends a line (the
 * server does not pass EOS on; -1: none). */
static int generate_into(const char *model, const char *pf, int max_new, const char *extra, int eos,
                         int n, char (*want)[2048])
{
    int rc =
        run(300, "%s -np 1 %s generate --model %s/%s --prompts-file %s --max-new %d --quiet %s",
            MPIRUN, BIN, FIX, model, pf, max_new, extra);
    if (rc) return rc;
    char *line = OUT, end[16];
    snprintf(end, sizeof end, ",%d", eos);
    for (int i = 0; i < n; i++) {
        char *g = strstr(line, "generated "), *e = g ? strchr(g, '\n') : NULL;
        if (!e) return -1;
        snprintf(want[i], 2048, "%.*s", (int)(e - g - 10), g + 10);
        size_t L = strlen(want[i]), k = strlen(end);
        if (eos >= 0 && L >= k && !strcmp(want[i] + L - k, end))
            want[i][L - k] = 0;
        else if (eos >= 0 && !strcmp(want[i], end + 1))
            want[i][0] = 0;
        line = e + 1;
    }
    return 0;
}

/* 32 prompts of 1..20 random ids < vocab (fixed seed, BOS 1 first) and what `modpipe
 * generate` makes of them on model. shared > 0: every prompt is the same `shared` ids, then
 * 1..6 of its own (prefix reuse). */
static int make_reference_of(const char *name, int shared, char *pf, char (*want)[2048],
                             const char *model, int vocab, int eos)
{
    snprintf(pf, 512, "%s/%s", TMP, name);
    FILE *f = fopen(pf, "w");
    if (!f) return -1;
    uint64_t x = 12345;
    for (int i = 0; i < NREQ; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        int n = shared ? shared + 1 + (int)((x >> 33) % 6) : 1 + (int)((x >> 33) % 20);
        fprintf(f, "1"); /* BOS, like a tokenized prompt */
        for (int k = 1; k < shared; k++) fprintf(f, ",%d", 3 + (k * 37) % (vocab - 3));
        for (int k = shared ? shared : 1; k < n; k++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            fprintf(f, ",%d", 3 + (int)((x >> 33) % (uint64_t)(vocab - 3)));
        }
        fprintf(f, "\n");
    }
    fclose(f);
    return generate_into(model, pf, MAX_NEW, "", eos, NREQ, want);
}
/* The pair: two prompts of PAIR_S shared ids (BOS first) and PAIR_OWN own ones each, the
 * first own ids differing; what generate makes of them with PAIR_NEW new tokens, EOS ignored
 * (the server is told to ignore it too: every request has all its positions). */
static char want_pair[2][2048], prompts_pair[512];
static int make_pair_reference(void)
{
    snprintf(prompts_pair, sizeof prompts_pair, "%s/prompts_pair.txt", TMP);
    FILE *f = fopen(prompts_pair, "w");
    if (!f) return -1;
    uint64_t x = 777;
    for (int i = 0; i < 2; i++) {
        fprintf(f, "1");
        for (int k = 1; k < PAIR_S; k++) fprintf(f, ",%d", 3 + (k * 37) % 509);
        fprintf(f, ",%d", 100 + i); /* the first own position differs */
        for (int k = 1; k < PAIR_OWN; k++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            fprintf(f, ",%d", 3 + (int)((x >> 33) % 509));
        }
        fprintf(f, "\n");
    }
    fclose(f);
    return generate_into("stories260K", prompts_pair, PAIR_NEW, "--ignore-eos", -1, 2, want_pair);
}

static int make_reference(void)
{
    /* stories260K: vocab 512, EOS 2; mindskip: vocab 97, no EOS */
    return make_reference_of("prompts.txt", 0, prompts, want, "stories260K", 512, 2) ||
           make_reference_of("prompts_px.txt", 18, prompts_px, want_px, "stories260K", 512, 2) ||
           make_reference_of("prompts_ms.txt", 18, prompts_ms, want_ms, "mindskip", 97, -1) ||
           make_pair_reference();
}

static void check_serve(int np, int slots, long kv_mem_bytes, const char *mode)
{
    const int px = PF != prompts; /* shared prefixes: a tail request after all ended */
    const int reuse = strcmp(mode, "noprefix") && !WHOLE;
    int rc = run(300, "%s -np %d %s --worker %s/%s %s %d %ld %s%s", MPIRUN, np, SELF, FIX, MODEL,
                 PF, slots, kv_mem_bytes, mode, px ? " tail" : "");
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    if (px) { /* the tail, R[j]'s prompt from a parked prefix (reuse on), gives R[j]'s tokens;
               * the tail2 (its prompt + its first tokens) goes on with the tail's tokens */
        int j = -1, same2 = -1;
        unsigned long long shared2 = 0;
        char *tl = strstr(OUT, "tail_of ");
        CU_ASSERT_PTR_NOT_NULL_FATAL(tl);
        sscanf(tl, "tail_of %d tail2_same %d shared %llu", &j, &same2, &shared2);
        char key[32];
        snprintf(key, sizeof key, "req %d done 1 why ", NREQ + 1);
        char *l = strstr(OUT, key), *t = l ? strstr(l, "tokens ") : NULL;
        CU_ASSERT_PTR_NOT_NULL_FATAL(t);
        CU_ASSERT_FATAL(j >= 0 && j < NREQ);
        t += 7;
        size_t n = (size_t)(strchr(t, '\n') - t);
        CU_ASSERT(n == strlen(W[j]) && !strncmp(t, W[j], n));
        /* (sequence-granularity MindSkip decides over the tail2's whole 33 positions: not
         * the tail's decision, so not its tokens either) */
        if (!WHOLE) CU_ASSERT_EQUAL(same2, 1);
        /* 32 positions from the tail's parked slot, its generated ones included */
        CU_ASSERT_EQUAL(shared2, reuse ? 32u : 0u);
    }
    int same = 0, once = 0;
    for (int i = 0; i < NREQ; i++) {
        char key[32];
        snprintf(key, sizeof key, "req %d done ", i);
        char *l = strstr(OUT, key);
        if (!l) continue;
        int done = 0, why = -1;
        sscanf(l + strlen(key), "%d why %d", &done, &why);
        once += done == 1 && (why == SRVQ_FINISH_STOP || why == SRVQ_FINISH_LENGTH);
        char *t = strstr(l, "tokens ") + 7, *e = strchr(t, '\n');
        size_t n = (size_t)(e - t);
        if (n == strlen(W[i]) && !strncmp(t, W[i], n))
            same++;
        else
            fprintf(stderr, "\n  -np %d request %d: %.*s\n  generate:      %s\n", np, i, (int)n, t,
                    W[i]);
    }
    CU_ASSERT_EQUAL(same, NREQ);
    CU_ASSERT_EQUAL(once, NREQ);
    /* the request cancelled from its callback: exactly 3 tokens, CANCELLED once */
    char key[64];
    snprintf(key, sizeof key, "req %d done 1 why %d tokens ", NREQ, SRVQ_FINISH_CANCELLED);
    char *c = strstr(OUT, key);
    CU_ASSERT(c != NULL);
    if (c) CU_ASSERT_EQUAL(strchr(c, '\n') - (c + strlen(key)) > 0 ? 1 : 0, 1);
    if (c) {
        int commas = 0;
        for (char *p = c + strlen(key); *p != '\n'; p++) commas += *p == ',';
        CU_ASSERT_EQUAL(commas, 2);
    }
    unsigned long long reqs = 0, gen = 0;
    long running = -1, queued = -1;
    int links = -1;
    char *s = strstr(OUT, "stats requests ");
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    sscanf(s, "stats requests %llu generated %llu running %ld queued %ld links %d", &reqs, &gen,
           &running, &queued, &links);
    CU_ASSERT_EQUAL(reqs, NREQ + 1 + (kv_mem_bytes ? 1 : 0) + 2 * px); /* live, tails */
    CU_ASSERT(running == 0 && queued == 0);
    if (np == 1) CU_ASSERT_EQUAL(links, 0); /* one stage: no link */
    if (np > 1) {
        /* every chain link carried rows, and a dense pipeline's bytes are counted there */
        int chains = 0;
        for (char *p = strstr(OUT, "link "); p; p = strstr(p + 1, "link ")) {
            int from, to;
            unsigned long long b, d;
            if (sscanf(p, "link %d->%d bytes %llu dense %llu", &from, &to, &b, &d) != 4) continue;
            if (to == from + 1) {
                chains++;
                CU_ASSERT(b > 0 && d > 0 && d % (64 * 4) == 0);
            }
        }
        CU_ASSERT_EQUAL(chains, np - 1);
    }
    double idle = 1;
    char *ic = strstr(OUT, "idle_cpu ");
    if (ic) idle = atof(ic + 9);
    CU_ASSERT(idle < 0.3); /* one idle second: rank 0 sleeps on the condvar */
    if (!(idle < 0.3)) fprintf(stderr, "\n  idle second used %.3f s of CPU\n", idle);
    unsigned long long hits = 99, parked = 99, evicted = 99;
    char *ph = strstr(OUT, "prefix_hits "), *pk = strstr(OUT, "parked_hits ");
    CU_ASSERT_FATAL(ph && pk);
    hits = strtoull(ph + 12, NULL, 10);
    sscanf(pk, "parked_hits %llu evictions %llu", &parked, &evicted);
    if (px && !reuse) { /* nothing shared, nothing parked */
        CU_ASSERT_EQUAL(hits, 0);
        CU_ASSERT_EQUAL(parked, 0);
    }
    if (WHOLE) CU_ASSERT_EQUAL(evicted, 0); /* a holder was never even filled */
    if (px && reuse) {
        CU_ASSERT(hits > 0); /* and the tokens above are still generate's */
        /* finished requests' parked prefixes were shared from, and evicted for slots */
        CU_ASSERT(parked > 0 && evicted > 0);
        fprintf(stderr, " [-np %d: %llu prefix hits, %llu on parked slots, %llu evictions] ", np,
                hits, parked, evicted);
    }
    if (!kv_mem_bytes) return;
    /* a pool too small for 8 sequences at once: sequences were preempted and recomputed (the
     * tokens above are still generate's), and every page came back, cancelled request included */
    unsigned long long pre = 0;
    long used = -1;
    int stages = 0;
    char *k = strstr(OUT, "preemptions ");
    CU_ASSERT_PTR_NOT_NULL_FATAL(k);
    sscanf(k, "preemptions %llu kv_used_after %ld stages %d", &pre, &used, &stages);
    CU_ASSERT(pre > 0);
    CU_ASSERT_EQUAL(used, 0);
    CU_ASSERT_EQUAL(stages, np);
    fprintf(stderr, " [-np %d: %llu preemptions] ", np, pre);
    /* the pages of a request that ran for over a report period were reported while it ran */
    long live = -1, live_after = -1;
    char *lv = strstr(OUT, "kv_live_max ");
    if (lv) sscanf(lv, "kv_live_max %ld live_after %ld", &live, &live_after);
    CU_ASSERT(live > 0);
    if (!(live > 0)) fprintf(stderr, "\n  -np %d: no KV report while running (%ld)\n", np, live);
    CU_ASSERT_EQUAL(live_after, 0); /* every page free or cached once all ended */
}

/* A rank killed while the server runs: the job ends (non-zero, naming the rank), no hang. The kill
   waits for all three ranks to exist (a fixed sleep lost the race on a loaded machine); the
   patterns name this run's prompts file (under its own temporary directory), so a test_serve
   of another checkout running at the same time is neither counted nor killed. */
static void test_dead_rank(void)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc =
        run(90,
            "%s -np 3 %s --worker %s/stories260K %s 4 forever & "
            "for i in $(seq 300); do [ $(pgrep -c -f \"[t]est_serve --worker %s/stories260K %s\") "
            "-ge 3 ] && break; sleep 0.1; done; sleep 1; "
            "pkill -9 -n -f \"[t]est_serve --worker %s/stories260K %s\"; wait $!",
            MPIRUN, SELF, FIX, prompts, FIX, prompts, FIX, prompts);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double el = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    CU_ASSERT_NOT_EQUAL(rc,
                        0); /* (mpirun itself exits 137 here; el tells it from the run timeout) */
    CU_ASSERT(el < 60.0);
    CU_ASSERT(strstr(OUT, "rank") != NULL);
    char pat[1200];
    snprintf(pat, sizeof pat, "pgrep -f \"[t]est_serve --worker %s/stories260K %s\"", FIX, prompts);
    CU_ASSERT(run(5, "%s", pat) != 0); /* nobody left */
}

static void test_reference(void) { CU_ASSERT_EQUAL_FATAL(make_reference(), 0); }
static void test_serve_np1(void) { check_serve(1, 8, 0, ""); }
static void test_serve_np3(void) { check_serve(3, 8, 0, ""); }
/* pages of 4 positions: 1040 bytes on stories260K (4 x (2 x 32 floats + a position)); a
 * request takes up to 8 pages on each of the 5 layers */
static void test_serve_kv_np1(void) { check_serve(1, 8, 100 * 1040, ""); }
static void test_serve_kv_np3(void) { check_serve(3, 8, 40 * 1040, ""); }
/* 32 prompts sharing their first 18 positions: with prefix reuse (16 of them shared from a
 * running request) and without, the tokens are generate's */
static void check_px(int np, long kv, const char *mode)
{
    W = want_px;
    PF = prompts_px;
    check_serve(np, 8, kv, mode);
    W = want;
    PF = prompts;
}
static void test_serve_px_np1(void) { check_px(1, 0, ""); }
static void test_serve_px_np3(void) { check_px(3, 0, ""); }
static void test_serve_px_off_np3(void) { check_px(3, 0, "noprefix"); }
static void test_serve_px_kv_np3(void) { check_px(3, 40 * 1040, "blind"); }
/* Sequence-granularity MindSkip (tests/fixtures/mindskip: one decision per prompt, over the
 * whole prompt: not causal): 32 prompts sharing their first 18 positions, then the tail
 * requests (a finished prompt again, and one continuing it): no prefix is ever reused, from a
 * running request or a finished one (docs/SPEC.md §11), and every token is generate's. */
static void check_ms(int np)
{
    MODEL = "mindskip";
    WHOLE = 1;
    W = want_ms;
    PF = prompts_ms;
    check_serve(np, 8, 0, "");
    MODEL = "stories260K";
    WHOLE = 0;
    W = want;
    PF = prompts;
}
static void test_serve_ms_np1(void) { check_ms(1); }
static void test_serve_ms_np3(void) { check_ms(3); }

/* Two running requests sharing a prompt prefix hold fewer pages together with reuse than
 * without, and make the same tokens (generate's). Prompts of 144 positions (64 shared), 17
 * new tokens: each holds 160 positions, 10 pages of 16 on each of stories260K's 5 layers: 50
 * pages alone. The second is sent once the first's prompt is in: with reuse it starts from the
 * first's 4 full pages a layer (64 positions, no partial page to copy) and takes 6 of its own:
 * 80 pages together; without, 100. The peak is exact (the pools' low-water mark): with reuse no
 * page is given back before both end (a finished request's pages move to a prefix holder,
 * 160 positions: whole pages, no copy), without it the first is still running when the
 * second takes its last page (the first runs 17 decode steps, the second's 144 prompt rows go
 * in three micro-batches of 64). */
static void check_pair(int np, const char *mode)
{
    const int reuse = strcmp(mode, "noprefix") != 0, L = 5;
    const int per = (PAIR_S + PAIR_OWN + PAIR_NEW - 1 + PAIR_PAGE - 1) / PAIR_PAGE; /* 10 */
    const long alone = (long)L * per, two = (long)L * (2 * per - (reuse ? PAIR_S / PAIR_PAGE : 0));
    int rc = run(300, "%s -np %d %s --worker %s/stories260K %s 8 0 pair %s", MPIRUN, np, SELF, FIX,
                 prompts_pair, mode);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    for (int i = 0; i < 3; i++) { /* R[2]: the first prompt alone */
        char key[64];
        snprintf(key, sizeof key, "req %d done 1 why %d tokens ", i, SRVQ_FINISH_LENGTH);
        char *t = strstr(OUT, key);
        CU_ASSERT_PTR_NOT_NULL_FATAL(t);
        t += strlen(key);
        const char *w = want_pair[i == 1];
        CU_ASSERT(strchr(t, '\n') - t == (long)strlen(w) && !strncmp(t, w, strlen(w)));
    }
    long a = -1, peak = -1, cached = -1, used = -1;
    unsigned long long hits = 99, ptok = 99, pre = 99;
    int stages = 0;
    char *l = strstr(OUT, "pair alone ");
    CU_ASSERT_PTR_NOT_NULL_FATAL(l);
    sscanf(l, "pair alone %ld peak %ld cached %ld", &a, &peak, &cached);
    l = strstr(OUT, "prefix_hits ");
    CU_ASSERT_PTR_NOT_NULL_FATAL(l);
    sscanf(l, "prefix_hits %llu tokens %llu", &hits, &ptok);
    l = strstr(OUT, "preemptions ");
    CU_ASSERT_PTR_NOT_NULL_FATAL(l);
    sscanf(l, "preemptions %llu kv_used_after %ld stages %d", &pre, &used, &stages);
    CU_ASSERT_EQUAL(stages, np);
    CU_ASSERT_EQUAL(a, alone);                /* 50 */
    CU_ASSERT_EQUAL(peak, two);               /* 80 with reuse, 100 without */
    CU_ASSERT_EQUAL(cached, reuse ? two : 0); /* both prefixes kept (reuse) once they ended */
    CU_ASSERT_EQUAL(used, 0);                 /* the cache cleared: every page back */
    CU_ASSERT_EQUAL(hits, reuse ? 1u : 0u);
    CU_ASSERT_EQUAL(ptok, reuse ? (unsigned long long)PAIR_S : 0u);
    CU_ASSERT_EQUAL(pre, 0u);
    fprintf(stderr, " [-np %d: %ld pages alone, %ld together] ", np, a, peak);
}
static void test_pair_np1(void) { check_pair(1, ""); }
static void test_pair_np3(void) { check_pair(3, ""); }
static void test_pair_off_np1(void) { check_pair(1, "noprefix"); }
static void test_pair_off_np3(void) { check_pair(3, "noprefix"); }

/* admission by slots alone: the stages run out, lose sequences, the queue recomputes them */
static void test_serve_kv_lost_np1(void) { check_serve(1, 8, 100 * 1040, "blind"); }
static void test_serve_kv_lost_np3(void) { check_serve(3, 8, 40 * 1040, "blind"); }

/* A model the server cannot decode (topk) and a queue that does not match: one line, every
 * submitted request ends with ERROR. */
static void test_serve_errors(void)
{
    int rc = run(120, "%s -np 2 %s --worker %s/mod_topk %s 8", MPIRUN, SELF, FIX, prompts);
    CU_ASSERT(rc != 0 && rc < 128); /* an error exit, not the timeout's kill */
    CU_ASSERT(strstr(OUT, "topk") != NULL);
    /* requests submitted to the failed server were refused (closed) or ended with ERROR */
    CU_ASSERT(strstr(OUT, "req 0 done 0 why 0 tokens \n") != NULL);
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "--worker")) return worker(argc, argv);
    BIN = getenv("MODPIPE") ? getenv("MODPIPE") : "build/modpipe";
    FIX = getenv("MODPIPE_FIXTURES") ? getenv("MODPIPE_FIXTURES") : "tests/fixtures";
    SELF = argv[0];
    if (tu_mpi_env("test_serve", BIN)) return 1;
    TMP = make_tmpdir_tagged("serve");
    if (!TMP) return 1;
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("serve", NULL, NULL);
    CU_add_test(s, "reference: modpipe generate on 32 prompts", test_reference);
    CU_add_test(s, "32 concurrent greedy requests = generate, np 1", test_serve_np1);
    CU_add_test(s, "32 concurrent greedy requests = generate, np 3", test_serve_np3);
    CU_add_test(s, "KV pool too small: preemption, same tokens, no page lost, np 1",
                test_serve_kv_np1);
    CU_add_test(s, "KV pool too small: preemption, same tokens, no page lost, np 3",
                test_serve_kv_np3);
    CU_add_test(s, "KV pool runs out on the stages: sequences lost and recomputed, np 1",
                test_serve_kv_lost_np1);
    CU_add_test(s, "KV pool runs out on the stages: sequences lost and recomputed, np 3",
                test_serve_kv_lost_np3);
    CU_add_test(s, "shared prompt prefixes: reused, same tokens, np 1", test_serve_px_np1);
    CU_add_test(s, "shared prompt prefixes: reused, same tokens, np 3", test_serve_px_np3);
    CU_add_test(s, "shared prompt prefixes, reuse off: same tokens, np 3", test_serve_px_off_np3);
    CU_add_test(s, "shared prefixes in a pool that runs out: same tokens, pages back, np 3",
                test_serve_px_kv_np3);
    CU_add_test(s, "two requests sharing 64 positions, reuse: 80 pages (50 alone), np 1",
                test_pair_np1);
    CU_add_test(s, "two requests sharing 64 positions, reuse: 80 pages (50 alone), np 3",
                test_pair_np3);
    CU_add_test(s, "two requests sharing 64 positions, no reuse: 100 pages, same tokens, np 1",
                test_pair_off_np1);
    CU_add_test(s, "two requests sharing 64 positions, no reuse: 100 pages, same tokens, np 3",
                test_pair_off_np3);
    CU_add_test(s, "sequence-level mindskip, shared prefixes: never reused, generate's, np 1",
                test_serve_ms_np1);
    CU_add_test(s, "sequence-level mindskip, shared prefixes: never reused, generate's, np 3",
                test_serve_ms_np3);
    CU_add_test(s, "start-up errors", test_serve_errors);
    CU_add_test(s, "a dead rank ends the server", test_dead_rank);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    rm_tmpdir(TMP);
    return fails != 0;
}
