/* stage/matmul.c — see matmul.h: the thread pool, the dispatcher (ISA variant, small or large
 * path), the plain C variant and the large path's tiles on cblas_sgemm. */
#include "stage/matmul.h"

#include "stage/convert.h"
#include "stage/matmul_isa.h"
#include "stage/onednn.h"

#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define SPIN_NS 50000L /* how long an idle worker spins before it sleeps */

/* ---- plain C variant ------------------------------------------------------------------------- */

static inline float c_elem(const void *row, int c, stage_dtype dt)
{
    if (dt == STAGE_F32) return ((const float *)row)[c];
    uint16_t h = ((const uint16_t *)row)[c];
    return dt == STAGE_BF16 ? stage_bf16_to_f32(h) : stage_f16_to_f32(h);
}

/* Eight running sums per output (lane l takes columns c with c % 8 == l), added pairwise at the
 * end: a fixed order that does not depend on m or on the rows around. */
static void c_rows(const float *x, int m, const stage_weight *w, int r0, int r1, float *y,
                   const uint16_t *xs)
{
    (void)xs;
    const int n = w->rows, k = w->cols;
    const size_t es = w->dtype == STAGE_F32 ? 4 : 2;
    for (int j = r0; j < r1; j++) {
        const void *wj = (const char *)w->data + (size_t)j * k * es;
        for (int i = 0; i < m; i++) {
            const float *xi = x + (size_t)i * k;
            float a[8] = {0};
            for (int c = 0; c < k; c++) a[c & 7] += c_elem(wj, c, w->dtype) * xi[c];
            y[(size_t)i * n + j] =
                ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
        }
    }
}

static void c_cvt_f32(const void *src, float *dst, size_t n)
{
    memcpy(dst, src, n * sizeof(float));
}
static void c_cvt_bf16(const void *src, float *dst, size_t n) { stage_bf16_to_f32_n(src, dst, n); }
static void c_cvt_f16(const void *src, float *dst, size_t n) { stage_f16_to_f32_n(src, dst, n); }

/* Row-wise max-subtracted softmax, expf per element: the same in every variant. */
void stage_mm_softmax_rows(float *probs, int n_q, int n_ctx)
{
    for (int h = 0; h < n_q; h++) {
        float *p = probs + (size_t)h * n_ctx;
        float mx = p[0];
        for (int t = 1; t < n_ctx; t++)
            if (p[t] > mx) mx = p[t];
        float sum = 0.0f;
        for (int t = 0; t < n_ctx; t++) {
            p[t] = expf(p[t] - mx);
            sum += p[t];
        }
        const float inv = 1.0f / sum;
        for (int t = 0; t < n_ctx; t++) p[t] *= inv;
    }
}

static void c_attend(const float *q, int n_q, const stage_kv_view *kv, int n_ctx, int hd,
                     float scale, float *probs, float *out)
{
    mm_kv_it ik;
    mm_kv_it_init(&ik, kv->k, kv);
    for (int t = 0; t < n_ctx; t++) {
        const float *kt = mm_kv_it_next(&ik);
        for (int h = 0; h < n_q; h++) {
            const float *qh = q + (size_t)h * hd;
            float a[8] = {0};
            for (int i = 0; i < hd; i++) a[i & 7] += qh[i] * kt[i];
            float d = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
            probs[(size_t)h * n_ctx + t] = d * scale;
        }
    }
    stage_mm_softmax_rows(probs, n_q, n_ctx);
    memset(out, 0, (size_t)n_q * hd * sizeof(float));
    mm_kv_it iv;
    mm_kv_it_init(&iv, kv->v, kv);
    for (int t = 0; t < n_ctx; t++) {
        const float *vt = mm_kv_it_next(&iv);
        for (int h = 0; h < n_q; h++) {
            const float p = probs[(size_t)h * n_ctx + t];
            float *o = out + (size_t)h * hd;
            for (int i = 0; i < hd; i++) o[i] += p * vt[i];
        }
    }
}

const mm_ops stage_mm_ops_c = {
    .rows = {[STAGE_F32] = c_rows,
             [STAGE_BF16] = c_rows,
             [STAGE_F16] = c_rows,
             [STAGE_Q8_0] = stage_mm_q8_rows_c},
    .cvt = {[STAGE_F32] = c_cvt_f32, [STAGE_BF16] = c_cvt_bf16, [STAGE_F16] = c_cvt_f16},
    .split = NULL,
    .rows_nosplit_bf16 = NULL,
    .attend = c_attend,
};

/* ---- dispatch -------------------------------------------------------------------------------- */

static const mm_ops *g_ops; /* the variant in use; NULL until the first call */
static stage_isa g_isa;
static stage_path g_path = STAGE_PATH_AUTO;
static stage_engine g_engine = STAGE_ENGINE_AUTO;
static stage_matmul_mode g_mode = STAGE_MATMUL_EXACT;

int stage_isa_supported(stage_isa isa)
{
    switch (isa) {
    case STAGE_ISA_C: return 1;
#if defined(__x86_64__)
    case STAGE_ISA_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    case STAGE_ISA_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case STAGE_ISA_AVX512BF16:
        return stage_isa_supported(STAGE_ISA_AVX512) && __builtin_cpu_supports("avx512bf16");
#endif
    default: return 0;
    }
}

stage_isa stage_isa_best(void)
{
    /* not AVX512BF16: see matmul.h */
    if (stage_isa_supported(STAGE_ISA_AVX512)) return STAGE_ISA_AVX512;
    if (stage_isa_supported(STAGE_ISA_AVX2)) return STAGE_ISA_AVX2;
    return STAGE_ISA_C;
}

const char *stage_blas_coretype_hint(void)
{
    if (getenv("OPENBLAS_CORETYPE")) return NULL;
    const char *core = openblas_get_corename();
    if (!core) return NULL;
    /* the generic fallbacks OpenBLAS uses for an unknown Intel / AMD CPU id */
    if (strcasecmp(core, "Prescott") && strcasecmp(core, "Core2") && strcasecmp(core, "Nehalem") &&
        strcasecmp(core, "Barcelona") && strcasecmp(core, "Katmai"))
        return NULL;
    if (stage_isa_supported(STAGE_ISA_AVX512)) return "SkylakeX";
    if (stage_isa_supported(STAGE_ISA_AVX2)) return "Haswell";
    return NULL;
}

static int dnnl_wanted(void);

int stage_matmul_m_small(stage_dtype d)
{
    if (d == STAGE_F32 || d == STAGE_Q8_0) return STAGE_M_SMALL;
    /* bf16 tiles on oneDNN's native bf16 matmul overtake the streaming kernel at fewer rows
     * than the f32-converted tiles do (matmul.h) */
    if (d == STAGE_BF16 && dnnl_wanted() && stage_dnnl_bf16()) {
        const int fast = g_mode == STAGE_MATMUL_FAST;
        if (stage_dnnl_amx())
            return fast ? STAGE_M_SMALL_BF16_AMX_FAST : STAGE_M_SMALL_BF16_AMX_EXACT;
        return fast ? STAGE_M_SMALL_BF16_FAST : STAGE_M_SMALL_BF16_EXACT;
    }
    return STAGE_M_SMALL_16BIT;
}

const char *stage_isa_name(stage_isa isa)
{
    static const char *names[STAGE_N_ISAS] = {"c", "avx2", "avx512", "avx512bf16"};
    return (unsigned)isa < STAGE_N_ISAS ? names[isa] : "?";
}

static const mm_ops *isa_ops(stage_isa isa)
{
    switch (isa) {
#if defined(__x86_64__)
    case STAGE_ISA_AVX2: return &stage_mm_ops_avx2;
    case STAGE_ISA_AVX512: return &stage_mm_ops_avx512;
    case STAGE_ISA_AVX512BF16: return &stage_mm_ops_avx512bf16;
#endif
    default: return &stage_mm_ops_c;
    }
}

int stage_matmul_force_isa(stage_isa isa)
{
    if ((unsigned)isa >= STAGE_N_ISAS || !stage_isa_supported(isa)) return -1;
    g_isa = isa;
    g_ops = isa_ops(isa);
    return 0;
}

static const mm_ops *ops(void)
{
    if (!g_ops) stage_matmul_force_isa(stage_isa_best());
    return g_ops;
}

stage_isa stage_matmul_isa(void)
{
    ops();
    return g_isa;
}

/* The large path's tiles go to oneDNN (stage_matmul_force_engine). */
static int dnnl_wanted(void)
{
    return g_engine == STAGE_ENGINE_ONEDNN ||
           (g_engine == STAGE_ENGINE_AUTO && stage_dnnl_preferred());
}

void stage_matmul_force_path(stage_path p) { g_path = p; }
void stage_matmul_force_engine(stage_engine e) { g_engine = e; }
void stage_matmul_set_mode(stage_matmul_mode m) { g_mode = m; }
stage_matmul_mode stage_matmul_get_mode(void) { return g_mode; }
int stage_q8_fast_available(void)
{
#if defined(__x86_64__)
    return stage_mm_q8_fast_supported() && ops() != &stage_mm_ops_c && ops() != &stage_mm_ops_avx2;
#else
    return 0;
#endif
}

/* ---- thread pool ----------------------------------------------------------------------------- */

typedef void (*pool_fn)(void *arg, int task, int tid);

/* A job is published in one word, gen << 32 | ntasks << 16 | next task: a worker claims a
 * task by a CAS on it, so a late worker can never claim a task of a job other than the one
 * whose fn/arg it read (those are rewritten only after every task of the job finished). */
#define JOB_GEN(w) ((uint32_t)((w) >> 32))
#define JOB_N(w) ((int)(((w) >> 16) & 0xffffu))
#define JOB_NEXT(w) ((int)((w)&0xffffu))
#define MAX_TASKS 0xffff

static struct {
    int n;                /* threads in all, the caller included */
    pthread_t *th;        /* [n - 1] workers */
    int *tids;            /* [n - 1] their ids 1..n-1 */
    _Atomic uint64_t job; /* the word above */
    _Atomic int left;     /* tasks of the current job not finished yet */
    _Atomic(pool_fn) fn;
    _Atomic(void *) arg;
    _Atomic int sleeping; /* workers in (or entering) cond_wait */
    _Atomic int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    float **tile; /* [n] per-thread [STAGE_TILE_N][STAGE_TILE_K], grown once */
} P = {.n = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static float *g_tile0; /* the caller's tile scratch when there is no pool */
static uint16_t
    *g_xs; /* split x: [m][2][mm_split_half] (AVX-512 BF16), [m][2][k] / [m][k] (run_large) */
static size_t g_xs_cap;     /* elements */
static float *g_xd;         /* deinterleaved x for rows_bf16_dx: [m][mm_dx_stride(k)] */
static size_t g_xd_cap;     /* floats */
static float **g_aprobs;    /* [g_aprobs_n] per-thread attention probs (stage_attend_batch) */
static size_t g_aprobs_cap; /* floats in each */
static int g_aprobs_n;
static float **g_dst;    /* [g_dst_n] per-thread bf16 tile products [mm][rn] (run_large) */
static size_t g_dst_cap; /* floats in each */
static int g_dst_n;

static long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void pool_run_tasks(uint32_t gen, int tid)
{
    pool_fn fn = atomic_load_explicit(&P.fn, memory_order_relaxed);
    void *arg = atomic_load_explicit(&P.arg, memory_order_relaxed);
    uint64_t cur = atomic_load_explicit(&P.job, memory_order_acquire);
    for (;;) {
        if (JOB_GEN(cur) != gen || JOB_NEXT(cur) >= JOB_N(cur)) return;
        if (!atomic_compare_exchange_weak_explicit(&P.job, &cur, cur + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue; /* cur was reloaded */
        fn(arg, JOB_NEXT(cur), tid);
        atomic_fetch_sub_explicit(&P.left, 1, memory_order_release);
        cur = atomic_load_explicit(&P.job, memory_order_acquire);
    }
}

static void *pool_worker(void *p)
{
    const int tid = *(const int *)p;
    stage_dnnl_thread_init();
    uint32_t seen = JOB_GEN(atomic_load(&P.job));
    for (;;) {
        uint64_t cur = atomic_load_explicit(&P.job, memory_order_acquire);
        if (JOB_GEN(cur) == seen && !atomic_load_explicit(&P.stop, memory_order_relaxed)) {
            long t0 = now_ns();
            for (unsigned spin = 1;; spin++) {
                CPU_RELAX();
                cur = atomic_load_explicit(&P.job, memory_order_acquire);
                if (JOB_GEN(cur) != seen || atomic_load_explicit(&P.stop, memory_order_relaxed))
                    break;
                if ((spin & 63) == 0 && now_ns() - t0 > SPIN_NS) {
                    /* Sleep. The caller publishes the job, then reads `sleeping`; we raise
                     * `sleeping`, then re-read the job (both seq_cst): one of us sees the other. */
                    pthread_mutex_lock(&P.mu);
                    atomic_fetch_add(&P.sleeping, 1);
                    while (JOB_GEN(atomic_load(&P.job)) == seen && !atomic_load(&P.stop))
                        pthread_cond_wait(&P.cv, &P.mu);
                    atomic_fetch_sub(&P.sleeping, 1);
                    pthread_mutex_unlock(&P.mu);
                    cur = atomic_load_explicit(&P.job, memory_order_acquire);
                    break;
                }
            }
        }
        if (atomic_load(&P.stop)) return NULL;
        seen = JOB_GEN(cur);
        pool_run_tasks(seen, tid);
    }
}

/* Run fn(arg, task, tid) for task < ntasks on the pool; returns when all are done. */
static void pool_run(pool_fn fn, void *arg, int ntasks)
{
    if (ntasks <= 0) return;
    if (P.n <= 1 || ntasks == 1 || ntasks > MAX_TASKS) { /* > MAX_TASKS: callers keep below */
        for (int t = 0; t < ntasks; t++) fn(arg, t, 0);
        return;
    }
    atomic_store_explicit(&P.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&P.arg, arg, memory_order_relaxed);
    atomic_store_explicit(&P.left, ntasks, memory_order_relaxed);
    uint32_t gen = JOB_GEN(atomic_load_explicit(&P.job, memory_order_relaxed)) + 1;
    atomic_store(&P.job, (uint64_t)gen << 32 | (uint64_t)ntasks << 16);
    if (atomic_load(&P.sleeping)) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
    pool_run_tasks(gen, 0);
    for (unsigned spin = 1; atomic_load_explicit(&P.left, memory_order_acquire) > 0; spin++) {
        CPU_RELAX();
        if ((spin & 1023) == 0) sched_yield(); /* a worker that was descheduled holds a task */
    }
}

static float **tile_slot(int tid) { return P.n > 1 ? &P.tile[tid] : &g_tile0; }

void stage_threads_free(void)
{
    if (P.n > 1) {
        pthread_mutex_lock(&P.mu);
        atomic_store(&P.stop, 1);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
        for (int i = 0; i < P.n - 1; i++) pthread_join(P.th[i], NULL);
        for (int i = 0; i < P.n; i++) free(P.tile[i]);
    }
    free(P.th);
    free(P.tids);
    free(P.tile);
    P.th = NULL;
    P.tids = NULL;
    P.tile = NULL;
    P.n = 1;
    atomic_store(&P.stop, 0);
    free(g_tile0);
    g_tile0 = NULL;
    free(g_xs);
    g_xs = NULL;
    g_xs_cap = 0;
    free(g_xd);
    g_xd = NULL;
    g_xd_cap = 0;
    for (int t = 0; t < g_dst_n; t++) free(g_dst[t]);
    free(g_dst);
    g_dst = NULL;
    g_dst_cap = 0;
    g_dst_n = 0;
    for (int t = 0; t < g_aprobs_n; t++) free(g_aprobs[t]);
    free(g_aprobs);
    g_aprobs = NULL;
    g_aprobs_cap = 0;
    g_aprobs_n = 0;
    stage_dnnl_free();
}

int stage_threads_init(int n, char *err, size_t errlen)
{
    stage_threads_free();
    /* The pool is the parallelism; OpenBLAS runs inside one pool thread at a time. */
    openblas_set_num_threads(1);
    if (n < 1 || n > 1024) {
        snprintf(err, errlen, "threads: %d is not in 1..1024", n);
        return -1;
    }
    if (n == 1) return 0;
    P.th = calloc((size_t)n - 1, sizeof *P.th);
    P.tids = calloc((size_t)n - 1, sizeof *P.tids);
    P.tile = calloc((size_t)n, sizeof *P.tile);
    if (!P.th || !P.tids || !P.tile) {
        snprintf(err, errlen, "threads: out of memory for %d threads", n);
        stage_threads_free();
        return -1;
    }
    for (int i = 0; i < n - 1; i++) {
        P.tids[i] = i + 1;
        int rc = pthread_create(&P.th[i], NULL, pool_worker, &P.tids[i]);
        if (rc) {
            snprintf(err, errlen, "threads: cannot start thread %d of %d: %s", i + 2, n,
                     strerror(rc));
            P.n = i + 1; /* join the ones that started */
            stage_threads_free();
            return -1;
        }
        P.n = i + 2;
    }
    return 0;
}

int stage_threads_n(void) { return P.n; }

/* ---- the matmul ------------------------------------------------------------------------------ */

typedef struct {
    const float *x;
    int m;
    const stage_weight *w;
    float *y;
    mm_rows_fn rows;
    const uint16_t *xs;
    int chunk; /* weight rows per task (small path) */
    const mm_ops *ops;
    int use_dnnl;    /* large path: tiles on oneDNN (dn) rather than OpenBLAS */
    int bf16_dnnl;   /* large path, bf16 weights on oneDNN's bf16 matmul: 1 exact, 2 fast */
    int simd;        /* bf16_dnnl: split and add with AVX512-BF16 (split_row, add_row) */
    int kc_full;     /* large path: columns of a full k block */
    int dn[2][2][2]; /* oneDNN handles by [last row tile][last k block][accumulate] */
} mm_job;

static void small_task(void *a, int t, int tid)
{
    (void)tid;
    const mm_job *j = a;
    int r0 = t * j->chunk, r1 = r0 + j->chunk;
    if (r1 > j->w->rows) r1 = j->w->rows;
    j->rows(j->x, j->m, j->w, r0, r1, j->y, j->xs);
}

/* buf grown to hold at least need elements of size bytes (*cap: elements it holds), never
 * shrunk: the buffer to use, or NULL when memory is short (buf is still valid then). */
static void *scratch_grow(void *buf, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap) return buf;
    void *nb = realloc(buf, need * size);
    if (nb) *cap = need;
    return nb;
}

/* The split-x scratch (g_xs) for m rows of k columns, or Q8_0 FAST mode's int8 x (the larger);
 * 0 when it is there. */
static int xs_reserve(int m, int k)
{
    const size_t split = 2 * (size_t)mm_split_half(k), q8x = (mm_q8x_row_bytes(k) + 1) / 2;
    uint16_t *p =
        scratch_grow(g_xs, &g_xs_cap, (size_t)m * (split > q8x ? split : q8x), sizeof *g_xs);
    if (!p) return -1;
    g_xs = p;
    return 0;
}

/* The deinterleaved-x scratch (g_xd) for m rows of k columns; 0 when it is there. */
static int xd_reserve(int m, int k)
{
    float *p = scratch_grow(g_xd, &g_xd_cap, (size_t)m * (size_t)mm_dx_stride(k), sizeof *g_xd);
    if (!p) return -1;
    g_xd = p;
    return 0;
}

/* FAST, bf16, the AVX-512 variant on a CPU with AVX-512 BF16: x rounded to bf16 once,
 * vdpbf16ps (the AVX-512 BF16 variant's rows in FAST mode: half the arithmetic of the f32
 * products, and a row's bits do not depend on m, one row included). 1 when j now runs on
 * them. */
static int fast_bf16_rows(mm_job *j, const mm_ops *o)
{
#if defined(__x86_64__)
    if (g_mode == STAGE_MATMUL_FAST && o == &stage_mm_ops_avx512 &&
        stage_isa_supported(STAGE_ISA_AVX512BF16) && xs_reserve(j->m, j->w->cols) == 0) {
        stage_mm_ops_avx512bf16.split(j->x, j->m, j->w->cols, g_xs);
        j->xs = g_xs;
        j->rows = stage_mm_ops_avx512bf16.rows[STAGE_BF16];
        return 1;
    }
#endif
    (void)j, (void)o;
    return 0;
}

static void run_small(const float *x, int m, const stage_weight *w, float *y, const mm_ops *o)
{
    mm_job j = {.x = x, .m = m, .w = w, .y = y, .rows = o->rows[w->dtype], .ops = o};
    /* bf16: FAST on vdpbf16ps; else, several rows, x deinterleaved once for the whole call (the
     * same results as rows[], which does that work per weight block: its fallback when the
     * scratch cannot be had) */
    if (w->dtype == STAGE_BF16 && !fast_bf16_rows(&j, o) && m >= 2 && o->rows_bf16_dx &&
        xd_reserve(m, w->cols) == 0) {
        o->dx(x, m, w->cols, g_xd);
        j.x = g_xd;
        j.rows = o->rows_bf16_dx;
    }
    if (o->split && w->dtype == STAGE_BF16) {
        if (xs_reserve(m, w->cols) == 0) {
            o->split(x, m, w->cols, g_xs);
            j.xs = g_xs;
        } else {
            j.rows = o->rows_nosplit_bf16; /* no memory for the split x: convert weights */
        }
    }
#if defined(__x86_64__)
    /* Q8_0 in FAST mode: x to int8 once per call, the int8 dot on the weights (matmul_isa.h) */
    if (w->dtype == STAGE_Q8_0 && g_mode == STAGE_MATMUL_FAST && stage_q8_fast_available() &&
        xs_reserve(m, w->cols) == 0) {
        stage_mm_q8_quant_x(x, m, w->cols, g_xs);
        j.xs = g_xs;
        j.rows = stage_mm_q8_rows_vnni;
    }
#endif
    const int n = w->rows;
    /* About four tasks per thread so a thread that starts late costs little; multiples of 4
     * rows (the kernels' row block). */
    int chunk = n;
    if (P.n > 1) {
        chunk = (n + P.n * 4 - 1) / (P.n * 4);
        if (chunk < 16) chunk = 16;
        chunk = (chunk + 3) & ~3;
        if ((n + chunk - 1) / chunk > MAX_TASKS) chunk = (n + MAX_TASKS - 1) / MAX_TASKS;
    }
    j.chunk = chunk;
    pool_run(small_task, &j, (n + chunk - 1) / chunk);
}

/* One f32 tile product, y [m][rn] (+)= x [m][kc] · Wt^T, on oneDNN when the call prepared
 * its primitives (dn[tail][ktail][acc] >= 0), else single-threaded cblas_sgemm. */
static void tile_gemm(const mm_job *j, int tid, int rn, int kc, const float *x, int ldx,
                      const float *wt, int ldw, float *y, int acc)
{
    if (j->use_dnnl) {
        int h = j->dn[rn != STAGE_TILE_N][kc != j->kc_full][acc];
        stage_dnnl_tile(h, tid, x, wt, y);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->m, rn, kc, 1.0f, x, ldx, wt, ldw,
                acc ? 1.0f : 0.0f, y, j->w->rows);
}

/* x row to bf16 for the large path's bf16 tiles: hi = bf16(x) rounded to nearest even and, when
 * lo is not NULL, lo = bf16(x - hi) (x - hi is exact in f32, so x = hi + lo to ~16 mantissa
 * bits). simd: vcvtneps2bf16, the same rounding but denormal inputs and results flushed to
 * zero (|x| < 2^-126: nothing a logit can see); else the C conversion (stage/convert.h). */
#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void
split_row_avx512bf16(const float *x, int k, uint16_t *hi, uint16_t *lo)
{
    for (int c = 0; c < k; c += 16) {
        const __mmask16 mk = k - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - c)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(mk, x + c);
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16(hi + c, mk, h);
        if (!lo) continue;
        const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        _mm256_mask_storeu_epi16(lo + c, mk, (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf)));
    }
}

/* y [n] = a [n] + a [n + ..n) : the two halves of an exact product, added in f32 */
__attribute__((target("avx512f"))) static void add_row_avx512(float *y, const float *d, int n)
{
    for (int c = 0; c < n; c += 16) {
        const __mmask16 mk = n - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - c)) - 1);
        _mm512_mask_storeu_ps(
            y + c, mk,
            _mm512_add_ps(_mm512_maskz_loadu_ps(mk, d + c), _mm512_maskz_loadu_ps(mk, d + n + c)));
    }
}
#endif

static void split_row(const float *x, int k, uint16_t *hi, uint16_t *lo, int simd)
{
#if defined(__x86_64__)
    if (simd) {
        split_row_avx512bf16(x, k, hi, lo);
        return;
    }
#endif
    (void)simd;
    stage_f32_to_bf16_n(x, hi, (size_t)k);
    if (lo)
        for (int c = 0; c < k; c++) lo[c] = stage_f32_to_bf16(x[c] - stage_bf16_to_f32(hi[c]));
}

/* y [n] = d [n] + d [n..2n): row 2i (hi · W^T) plus row 2i + 1 (lo · W^T) of a tile product */
static void add_row(float *y, const float *d, int n, int simd)
{
#if defined(__x86_64__)
    if (simd) {
        add_row_avx512(y, d, n);
        return;
    }
#endif
    (void)simd;
    for (int c = 0; c < n; c++) y[c] = d[c] + d[n + c];
}

static void large_task(void *a, int t, int tid)
{
    const mm_job *j = a;
    const stage_weight *w = j->w;
    const int n = w->rows, k = w->cols, m = j->m;
    const int r0 = t * STAGE_TILE_N;
    const int rn = n - r0 < STAGE_TILE_N ? n - r0 : STAGE_TILE_N;
    if (j->bf16_dnnl) {        /* the weight rows as they are; x split or rounded (run_large) */
        float *d = g_dst[tid]; /* [mm][rn]: oneDNN's brgemm wants a dense dst */
        stage_dnnl_tile(j->dn[rn != STAGE_TILE_N][0][0], tid, j->xs,
                        (const uint16_t *)w->data + (size_t)r0 * k, d);
        for (int i = 0; i < m; i++) {
            float *yi = j->y + (size_t)i * n + r0;
            if (j->bf16_dnnl == 1) /* rows 2i, 2i + 1: hi · W^T, lo · W^T */
                add_row(yi, d + (size_t)2 * i * rn, rn, j->simd);
            else
                memcpy(yi, d + (size_t)i * rn, (size_t)rn * sizeof *yi);
        }
        return;
    }
    if (w->dtype == STAGE_F32) {
        tile_gemm(j, tid, rn, k, j->x, k, (const float *)w->data + (size_t)r0 * k, k, j->y + r0, 0);
        return;
    }
    float **slot = tile_slot(tid);
    if (!*slot) *slot = malloc((size_t)STAGE_TILE_N * STAGE_TILE_K * sizeof(float));
    float *buf = *slot; /* [rn][kc] */
    if (!buf) {         /* no scratch: the allocation-free kernel does this tile */
        mm_rows_fn f = w->dtype == STAGE_BF16 && j->ops->rows_nosplit_bf16
                           ? j->ops->rows_nosplit_bf16
                           : j->ops->rows[w->dtype];
        f(j->x, m, w, r0, r0 + rn, j->y, NULL);
        return;
    }
    const size_t es = 2;
    for (int c0 = 0; c0 < k; c0 += STAGE_TILE_K) { /* STAGE_TILE_K: a multiple of 32 (Q8_0) */
        const int kc = k - c0 < STAGE_TILE_K ? k - c0 : STAGE_TILE_K;
        if (w->dtype == STAGE_Q8_0)
            stage_mm_q8_tile(w, r0, rn, c0, kc, buf);
        else
            for (int r = 0; r < rn; r++)
                j->ops->cvt[w->dtype]((const char *)w->data + ((size_t)(r0 + r) * k + c0) * es,
                                      buf + (size_t)r * kc, (size_t)kc);
        tile_gemm(j, tid, rn, kc, j->x + c0, k, buf, kc, j->y + r0, c0 > 0);
    }
}

/* oneDNN primitives for every tile shape of this call, all or none (so a call's tiles all take
 * the same engine). 1 when they are ready. */
static int dnnl_plan(mm_job *j)
{
    const stage_weight *w = j->w;
    const int n = w->rows, k = w->cols;
    const int f32 = w->dtype == STAGE_F32;
    j->kc_full = f32 || k < STAGE_TILE_K ? k : STAGE_TILE_K;
    memset(j->dn, 0xff, sizeof j->dn); /* -1: not needed */
    for (int tail = 0; tail < 2; tail++) {
        const int rn = tail ? n % STAGE_TILE_N : (n >= STAGE_TILE_N ? STAGE_TILE_N : 0);
        if (!rn) continue;
        /* the k blocks large_task walks: one for f32, STAGE_TILE_K columns each otherwise */
        for (int c0 = 0; c0 < k; c0 += f32 ? k : STAGE_TILE_K) {
            const int kc = f32 || k - c0 >= STAGE_TILE_K ? (f32 ? k : STAGE_TILE_K) : k - c0;
            int *h = &j->dn[tail][kc != j->kc_full][c0 > 0];
            if (*h >= 0) continue;
            stage_dnnl_shape s = {.m = j->m,
                                  .n = rn,
                                  .k = kc,
                                  .ldx = k,
                                  .ldw = f32 ? k : kc,
                                  .ldy = n,
                                  .acc = c0 > 0};
            if ((*h = stage_dnnl_prepare(&s, P.n)) < 0) return 0;
        }
    }
    return 1;
}

/* oneDNN bf16 primitives for every tile shape of a bf16 call. x is g_xs, dense (oneDNN 2.6's
 * brgemm matmul takes no strided src or dst; strided ones go to a slower gemm): exact, 2m rows
 * [m][2][k], hi and lo of x row i at rows 2i and 2i + 1; fast, [m][k] rounded x. Each tile's
 * product lands in the thread's dense g_dst [mm][rn]. 1 when they are ready. */
static int dnnl_plan_bf16(mm_job *j, int mm)
{
    const int n = j->w->rows, k = j->w->cols;
    memset(j->dn, 0xff, sizeof j->dn);
    for (int tail = 0; tail < 2; tail++) {
        const int rn = tail ? n % STAGE_TILE_N : (n >= STAGE_TILE_N ? STAGE_TILE_N : 0);
        if (!rn) continue;
        stage_dnnl_shape s = {.m = mm, .n = rn, .k = k, .ldx = k, .ldw = k, .ldy = rn, .bf16 = 1};
        if ((j->dn[tail][0][0] = stage_dnnl_prepare(&s, P.n)) < 0) return 0;
    }
    return 1;
}

/* Per-thread buffers of at least `floats` each for threads 0..P.n-1, grown in the caller thread
 * (doubling, so a context that grows by one entry a step reallocates rarely); 0 when there. */
static int grow_per_thread(float ***bufs, int *nb, size_t *cap, size_t floats)
{
    if (*nb < P.n) {
        float **nd = realloc(*bufs, (size_t)P.n * sizeof *nd);
        if (!nd) return -1;
        *bufs = nd;
        for (; *nb < P.n; (*nb)++) nd[*nb] = NULL;
        *cap = 0; /* the new threads' buffers are to be made */
    }
    if (floats <= *cap) return 0;
    size_t want = *cap * 2 > floats ? *cap * 2 : floats;
    if (want < 4096) want = 4096;
    for (int t = 0; t < *nb; t++) {
        float *p = realloc((*bufs)[t], want * sizeof *p);
        if (!p) return -1;
        (*bufs)[t] = p;
    }
    *cap = want;
    return 0;
}

/* Per-thread dense dst of the bf16 tiles, floats each thread needs; 0 when they are there. */
static int dst_reserve(size_t floats)
{
    return grow_per_thread(&g_dst, &g_dst_n, &g_dst_cap, floats);
}

#define SPLIT_ROWS 16 /* rows of x per split task */

/* x rows to bf16 for the bf16 tiles (split_row): exact, hi and lo; fast, hi alone. */
static void split_task(void *a, int t, int tid)
{
    (void)tid;
    const mm_job *j = a;
    const int k = j->w->cols, parts = j->bf16_dnnl == 1 ? 2 : 1;
    const int r1 = (t + 1) * SPLIT_ROWS < j->m ? (t + 1) * SPLIT_ROWS : j->m;
    for (int i = t * SPLIT_ROWS; i < r1; i++) {
        uint16_t *hi = (uint16_t *)j->xs + (size_t)i * parts * k;
        split_row(j->x + (size_t)i * k, k, hi, parts == 2 ? hi + k : NULL, j->simd);
    }
}

static void run_large(const float *x, int m, const stage_weight *w, float *y, const mm_ops *o)
{
    mm_job j = {.x = x, .m = m, .w = w, .y = y, .ops = o};
    const int want = dnnl_wanted();
    /* bf16 weights straight to oneDNN's bf16 matmul where it has native kernels; x split in
     * hi + lo (exact) or rounded once (fast; the lo half is then unused). Else, and if the
     * scratch cannot be had, the exact f32 conversion below. */
    const int parts = g_mode == STAGE_MATMUL_EXACT ? 2 : 1;
    if (want && w->dtype == STAGE_BF16 && m <= MAX_TASKS * SPLIT_ROWS && stage_dnnl_bf16() &&
        xs_reserve(m, w->cols) == 0 &&
        dst_reserve((size_t)parts * m * (w->rows < STAGE_TILE_N ? w->rows : STAGE_TILE_N)) == 0 &&
        dnnl_plan_bf16(&j, parts * m)) {
        j.bf16_dnnl = parts == 2 ? 1 : 2;
        j.simd = stage_isa_supported(STAGE_ISA_AVX512BF16);
        j.xs = g_xs;
        pool_run(split_task, &j, (m + SPLIT_ROWS - 1) / SPLIT_ROWS);
        pool_run(large_task, &j, (w->rows + STAGE_TILE_N - 1) / STAGE_TILE_N);
        return;
    }
    j.use_dnnl = want && dnnl_plan(&j);
    /* Several pool threads call sgemm at once: each must run single-threaded (an earlier
     * openblas_set_num_threads(n) would make them queue for OpenBLAS's own threads). */
    if (!j.use_dnnl && P.n > 1 && openblas_get_num_threads() != 1) openblas_set_num_threads(1);
    pool_run(large_task, &j, (w->rows + STAGE_TILE_N - 1) / STAGE_TILE_N);
}

void stage_matmul_w(const float *x, int m, const stage_weight *w, float *y)
{
    if (m <= 0 || w->rows <= 0) return;
    if (w->cols <= 0) {
        memset(y, 0, (size_t)m * w->rows * sizeof *y);
        return;
    }
    const mm_ops *o = ops();
    int small = g_path == STAGE_PATH_SMALL ||
                (g_path == STAGE_PATH_AUTO && m <= stage_matmul_m_small(w->dtype));
    if (small)
        run_small(x, m, w, y, o);
    else
        run_large(x, m, w, y, o);
}

/* ---- attention ------------------------------------------------------------------------------- */

void stage_attend_gqa(const float *q, int n_q, const float *k, const float *v, size_t stride,
                      int n_ctx, int hd, float scale, float *probs, float *out)
{
    if (n_q <= 0 || n_ctx <= 0) return;
    static const int32_t page0 = 0; /* one page holding every entry */
    const stage_kv_view kv = {.k = k,
                              .v = v,
                              .pages = &page0,
                              .page = n_ctx,
                              .t0 = 0,
                              .page_stride = 0,
                              .stride = stride};
    ops()->attend(q, n_q, &kv, n_ctx, hd, scale, probs, out);
}

void stage_attend_paged(const float *q, int n_q, const stage_kv_view *kv, int n_ctx, int hd,
                        float scale, float *probs, float *out)
{
    if (n_q <= 0 || n_ctx <= 0) return;
    ops()->attend(q, n_q, kv, n_ctx, hd, scale, probs, out);
}

typedef struct {
    const stage_attend_job *jobs;
    int n_q, hd;
    float scale;
    const mm_ops *ops;
} attend_arg;

static void attend_task(void *a, int t, int tid)
{
    const attend_arg *g = a;
    const stage_attend_job *j = &g->jobs[t];
    g->ops->attend(j->q, g->n_q, &j->kv, j->n_ctx, g->hd, g->scale, g_aprobs[tid], j->out);
}

void stage_attend_batch(const stage_attend_job *jobs, int n_jobs, int n_q, int hd, float scale,
                        float *probs)
{
    if (n_jobs <= 0 || n_q <= 0) return;
    const mm_ops *o = ops();
    int max_ctx = 0;
    for (int i = 0; i < n_jobs; i++)
        if (jobs[i].n_ctx > max_ctx) max_ctx = jobs[i].n_ctx;
    if (max_ctx <= 0) return;
    if (n_jobs == 1 || P.n <= 1 || n_jobs > MAX_TASKS ||
        grow_per_thread(&g_aprobs, &g_aprobs_n, &g_aprobs_cap, (size_t)n_q * max_ctx)) {
        for (int i = 0; i < n_jobs; i++)
            o->attend(jobs[i].q, n_q, &jobs[i].kv, jobs[i].n_ctx, hd, scale, probs, jobs[i].out);
        return;
    }
    attend_arg g = {.jobs = jobs, .n_q = n_q, .hd = hd, .scale = scale, .ops = o};
    pool_run(attend_task, &g, n_jobs);
}

void stage_attend(const float *q, const float *k, const float *v, size_t stride, int n_ctx, int hd,
                  float scale, float *probs, float *out)
{
    stage_attend_gqa(q, 1, k, v, stride, n_ctx, hd, scale, probs, out);
}

const char *stage_matmul_large_engine(int m, int k, char *buf, size_t len)
{
    stage_dnnl_shape s = {
        .m = m, .n = STAGE_TILE_N, .k = k, .ldx = k, .ldw = k, .ldy = STAGE_TILE_N};
    const int want = dnnl_wanted();
    const char *impl = want ? stage_dnnl_impl(&s) : NULL;
    snprintf(buf, len, "%s%s", impl ? "onednn:" : "openblas", impl ? impl : "");
    return buf;
}
