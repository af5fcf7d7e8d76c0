/* tests/bench_kernels.c — micro-benchmark of stage/matmul.h (not a test; `make bench-kernels`).
 *
 *   bench_kernels [--threads N] [--quick] [--isa NAME] [--bw-gib G] [--gemv-only] [--dtype D]
 *                 [--fast] [--cross-only] [--bw-pass-only] [--gemv K,N ...]
 *   (--fast: stage_matmul_set_mode FAST, Q8_0 with int8 x)
 *
 * Prints one `key=value ...` line per measurement (lines starting with # are comments):
 *   --bw-only: only the bw lines, then for each --shape m,k,n one `shape` line: cblas_sgemm
 *            (OpenBLAS on N threads) vs stage_matmul_w with f32 and bf16 weights, GFLOP/s, with
 *            the default large-path engine (engine=) and with the tiles forced onto oneDNN
 *            (scripts/bench-decode's reference for prefill), bf16 also in fast mode
 *            (onednn_bf16_fast_gflops, stage_matmul_set_mode); own_f32_gflops /
 *            own_bf16_gflops: oneDNN's own matmul on the whole shape, one primitive on N OpenMP
 *            threads, weights in the checkpoint layout (scripts/bench-matmul's ceiling), also
 *            per CPU-second x N (own_*_cpu_gflops);
 *   bw       read bandwidth of this machine: 1, 2, 4 .. N threads summing a G GiB buffer
 *            (--bw-gib, default 1; it is also the GEMV lines' weight arena: make it several
 *            times the L3, or the weights come from cache), best of 5 passes (read_gbs),
 *            and the median over 32 MiB pieces (read_gbs_32mib_pieces); the GEMV lines'
 *            of_read_bw divides by the larger of the two N-thread values;
 *            --bw-pass-only stops after the bw lines (a benchmark script samples the bandwidth
 *            around its own runs: on a shared host it moves by tens of percent in minutes);
 *   cache    one thread re-reading a 4 .. 512 MiB buffer (best pass of 2 GiB read): where the rate
 *            falls to the bw one is the size of the cache a core really reaches;
 *   gemv     decode shapes (m = 1, 4, 16; k = 4096; n = 4096, 14336; f32, bf16, q8_0) per ISA
 *            variant: GB/s of weights streamed and the fraction of the read bandwidth. The
 *            weights rotate through copies filling 1 GiB so they come from memory, not the L3;
 *            --gemv-only stops after the gemv lines, --dtype f32|bf16|q8_0 runs only that one
 *            (e.g. under perf stat); --gemv K,N (repeatable) replaces the (k, n) pairs, e.g. a
 *            model's own projections (the cross and prefill lines keep k = 4096);
 *   cross    small path vs large path for m around STAGE_M_SMALL (how it was chosen): f32, bf16
 *            exact and bf16 fast (stage_matmul_set_mode); --cross-only skips the gemv lines and
 *            stops after these;
 *   prefill  m = 256 GFLOP/s per variant vs one cblas_sgemm call (OpenBLAS on N threads) on the
 *            same f32 shape; prefill_engine: the large path with its tiles on OpenBLAS and on
 *            oneDNN (stage/onednn.h), f32 and bf16 weights.
 *   attend   stage_attend_gqa, 4 query heads sharing a KV head, hd 128, 2048 cached positions.
 * Times are the median of the repetitions; on a loaded machine they are noisy.
 */
#include "stage/matmul.h"
#include "stage/convert.h"

#include <cblas.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define GIB (1024.0 * 1024.0 * 1024.0)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ---- read bandwidth -------------------------------------------------------------------------- */

typedef struct {
    const uint64_t *p;
    size_t n;     /* words */
    size_t piece; /* words per timed piece (0: one piece) */
    double gbs;   /* out: median GB/s over the pieces */
    uint64_t sum;
} reader;

/* The range read as 8 interleaved streams, 64 bytes a stream per step (AVX2 when the CPU has
 * it): one sequential stream per thread leaves this machine's prefetchers latency-bound
 * (~8 GB/s a thread), while a GEMV streams several weight rows at once; the reference must be
 * what a reader can get, not what one stream gets. */
typedef uint64_t v4u64 __attribute__((vector_size(32)));
#define SUM_STREAMS 8
__attribute__((target("avx2"))) static uint64_t sum_words_avx2(const uint64_t *p, size_t n)
{
    const size_t len = n / SUM_STREAMS / 8 * 8; /* words a stream, a multiple of 8 */
    v4u64 acc[SUM_STREAMS][2];
    memset(acc, 0, sizeof acc);
    for (size_t i = 0; i < len; i += 8)
        for (int s = 0; s < SUM_STREAMS; s++) {
            v4u64 x0, x1;
            memcpy(&x0, p + (size_t)s * len + i, 32);
            memcpy(&x1, p + (size_t)s * len + i + 4, 32);
            acc[s][0] += x0;
            acc[s][1] += x1;
        }
    uint64_t t = 0;
    for (int s = 0; s < SUM_STREAMS; s++)
        for (int j = 0; j < 4; j++) t += acc[s][0][j] + acc[s][1][j];
    for (size_t i = len * SUM_STREAMS; i < n; i++) t += p[i];
    return t;
}

typedef uint64_t v2u64 __attribute__((vector_size(16)));
static uint64_t sum_words(const uint64_t *p, size_t n)
{
    if (__builtin_cpu_supports("avx2")) return sum_words_avx2(p, n);
    v2u64 a = {0, 0}, b = a, c = a, d = a;
    for (size_t i = 0; i + 8 <= n; i += 8) {
        v2u64 x0, x1, x2, x3;
        memcpy(&x0, p + i, 16);
        memcpy(&x1, p + i + 2, 16);
        memcpy(&x2, p + i + 4, 16);
        memcpy(&x3, p + i + 6, 16);
        a += x0;
        b += x1;
        c += x2;
        d += x3;
    }
    v2u64 s = a + b + c + d;
    uint64_t t = s[0] + s[1];
    for (size_t i = n / 8 * 8; i < n; i++) t += p[i];
    return t;
}

static void *read_part(void *a)
{
    reader *r = a;
    const size_t piece = r->piece ? r->piece : r->n;
    const int np = (int)(r->n / piece);
    double *t = malloc((size_t)np * sizeof *t);
    r->sum = 0;
    for (int i = 0; i < np; i++) {
        double t0 = now_s();
        r->sum += sum_words(r->p + (size_t)i * piece, piece);
        t[i] = now_s() - t0;
    }
    r->gbs = (double)piece * 8 / median(t, np) / 1e9;
    free(t);
    return NULL;
}

/* Read bandwidth of nt threads, each summing its own part of buf. piece_words = 0: best of 5
 * whole passes; else the median over pieces of that many words per thread (how the GEMV lines
 * see memory: one weight matrix at a time), summed over the threads. */
static double read_bw(const uint64_t *buf, size_t words, int nt, size_t piece_words)
{
    pthread_t th[64];
    reader rd[64];
    double best = 0;
    uint64_t check = 0;
    for (int pass = 0; pass < (piece_words ? 2 : 5); pass++) {
        double t0 = now_s();
        for (int t = 0; t < nt; t++) {
            rd[t].p = buf + words / nt * t;
            rd[t].n = words / nt;
            rd[t].piece = piece_words;
            if (t) pthread_create(&th[t], NULL, read_part, &rd[t]);
        }
        read_part(&rd[0]);
        for (int t = 1; t < nt; t++) pthread_join(th[t], NULL);
        double dt = now_s() - t0, gbs = 0;
        for (int t = 0; t < nt; t++) {
            check += rd[t].sum;
            gbs += rd[t].gbs;
        }
        if (!piece_words) gbs = (double)(words / nt * nt) * 8 / dt / 1e9;
        if (gbs > best) best = gbs;
    }
    if (check == 42) fprintf(stderr, "#\n"); /* keep the sums live */
    return best;
}

/* ---- matmul timing --------------------------------------------------------------------------- */

/* Median seconds of one stage_matmul_w call, rotating over weight copies in arena. */
static double time_matmul(const float *x, int m, int n, int k, stage_dtype dt, const char *arena,
                          size_t arena_bytes, float *y, int reps)
{
    const size_t wbytes = stage_matrix_bytes(dt, (size_t)n, (size_t)k); /* Q8_0: q, scales */
    /* The copies continue where the previous call stopped (next_off), so each call reads the
     * part of the arena touched longest ago, not the copies the previous shape left in the L3. */
    static size_t next_off;
    double *t = malloc((size_t)reps * sizeof *t);
    for (int r = -2; r < reps; r++) { /* two warm-up calls */
        if (next_off + wbytes > arena_bytes) next_off = 0;
        const char *p = arena + next_off;
        next_off += (wbytes + 4095) & ~(size_t)4095;
        stage_weight w = {.dtype = dt, .rows = n, .cols = k, .data = p};
        if (dt == STAGE_Q8_0) w.scale = (const uint16_t *)(p + (size_t)n * k);
        double t0 = now_s();
        stage_matmul_w(x, m, &w, y);
        if (r >= 0) t[r] = now_s() - t0;
    }
    double md = median(t, reps);
    free(t);
    return md;
}

static int n_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 64 ? 64 : (int)n;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* oneDNN's own matmul on the whole m x k x n shape: y [m][n] = x [m][k] · W^T, W [n][k] (the
 * checkpoint layout, oneDNN's "ba"), f32 or bf16 x and W, f32 y, one primitive run on nt
 * OpenMP threads. GFLOP/s, median of 7 calls after a warm-up; 0 when oneDNN has no
 * non-reference kernel. *cpu_gf: the same per CPU-second of the process times nt (what nt
 * cores would give; on a loaded machine steadier than the wall-clock rate). */
static double own_dnnl(int m, int k, int n, int bf16, int nt, const void *x, const void *w,
                       float *y, double *cpu_gf)
{
    *cpu_gf = 0.0;
    dnnl_engine_t eng = NULL;
    dnnl_stream_t st = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t prim = NULL;
    dnnl_memory_t mem[3] = {NULL, NULL, NULL};
    double gf = 0.0;
    const dnnl_data_type_t dt = bf16 ? dnnl_bf16 : dnnl_f32;
    dnnl_memory_desc_t sd, wd, dd;
    dnnl_dims_t sdim = {m, k}, sstr = {k, 1}, wdim = {k, n}, wstr = {1, k}, ddim = {m, n},
                dstr = {n, 1};
    dnnl_matmul_desc_t md;
    const char *impl = NULL;
    if (dnnl_engine_create(&eng, dnnl_cpu, 0) != dnnl_success ||
        dnnl_stream_create(&st, eng, dnnl_stream_default_flags) != dnnl_success ||
        dnnl_memory_desc_init_by_strides(&sd, 2, sdim, dt, sstr) != dnnl_success ||
        dnnl_memory_desc_init_by_strides(&wd, 2, wdim, dt, wstr) != dnnl_success ||
        dnnl_memory_desc_init_by_strides(&dd, 2, ddim, dnnl_f32, dstr) != dnnl_success ||
        dnnl_matmul_desc_init(&md, &sd, &wd, NULL, &dd) != dnnl_success ||
        dnnl_primitive_desc_create(&pd, &md, NULL, eng, NULL) != dnnl_success ||
        dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) != dnnl_success ||
        !impl || !strncmp(impl, "ref", 3) || dnnl_primitive_create(&prim, pd) != dnnl_success ||
        dnnl_memory_create(&mem[0], &sd, eng, (void *)x) != dnnl_success ||
        dnnl_memory_create(&mem[1], &wd, eng, (void *)w) != dnnl_success ||
        dnnl_memory_create(&mem[2], &dd, eng, y) != dnnl_success)
        goto done;
    dnnl_exec_arg_t args[3] = {
        {DNNL_ARG_SRC, mem[0]}, {DNNL_ARG_WEIGHTS, mem[1]}, {DNNL_ARG_DST, mem[2]}};
    const int before = omp_get_max_threads();
    omp_set_num_threads(nt);
    double t[8], c[8];
    for (int r = 0; r < 8; r++) {
        double t0 = now_s(), c0 = cpu_s();
        dnnl_primitive_execute(prim, st, 3, args);
        dnnl_stream_wait(st);
        t[r] = now_s() - t0;
        c[r] = cpu_s() - c0;
    }
    omp_set_num_threads(before);
    gf = 2.0 * m * n * k / 1e9 / median(t + 1, 7);
    *cpu_gf = 2.0 * m * n * k / 1e9 / median(c + 1, 7) * nt;
done:
    for (int a = 0; a < 3; a++)
        if (mem[a]) dnnl_memory_destroy(mem[a]);
    if (prim) dnnl_primitive_destroy(prim);
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (st) dnnl_stream_destroy(st);
    if (eng) dnnl_engine_destroy(eng);
    return gf;
}

int main(int argc, char **argv)
{
    int nt = n_cpus(), quick = 0, only = -1, bw_only = 0, n_shapes = 0, gemv_only = 0;
    int bw_pass_only = 0;
    int cross_only = 0; /* --cross-only: skip the gemv lines, stop after the cross lines */
    double bw_gib = 0;  /* 0: 1 GiB (0.25 with --quick) */
    int only_dt = -1;   /* --dtype: the gemv lines of one weight dtype */
    int gemv_kn[8][2], n_gemv = 0; /* --gemv K,N: the decode shapes instead of the defaults */
    int shapes[16][3];             /* --shape m,k,n: cblas_sgemm vs stage_matmul_w on that shape */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            nt = atoi(argv[++i]);
            if (nt < 1 || nt > 64) {
                fprintf(stderr, "bench_kernels: --threads must be 1..64\n");
                return 2;
            }
        } else if (!strcmp(argv[i], "--quick")) {
            quick = 1;
        } else if (!strcmp(argv[i], "--bw-only")) {
            bw_only = 1;
        } else if (!strcmp(argv[i], "--fast")) {
            stage_matmul_set_mode(STAGE_MATMUL_FAST); /* Q8_0: int8 x (stage/matmul.h) */
        } else if (!strcmp(argv[i], "--bw-pass-only")) {
            bw_pass_only = 1;
        } else if (!strcmp(argv[i], "--gemv") && i + 1 < argc && n_gemv < 8) {
            if (sscanf(argv[++i], "%d,%d", &gemv_kn[n_gemv][0], &gemv_kn[n_gemv][1]) != 2 ||
                gemv_kn[n_gemv][0] < 1 || gemv_kn[n_gemv][1] < 1 || gemv_kn[n_gemv][0] > 14336 ||
                gemv_kn[n_gemv][1] > 14336) {
                fprintf(stderr, "bench_kernels: --gemv %s: expected K,N, each 1..14336\n", argv[i]);
                return 2;
            }
            n_gemv++;
        } else if (!strcmp(argv[i], "--gemv-only")) {
            gemv_only = 1;
        } else if (!strcmp(argv[i], "--cross-only")) {
            cross_only = 1;
        } else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
            stage_dtype d;
            if (stage_wdtype_parse(argv[++i], &d) || d == STAGE_F16) {
                fprintf(stderr, "bench_kernels: --dtype %s: expected f32, bf16 or q8_0\n", argv[i]);
                return 2;
            }
            only_dt = (int)d;
        } else if (!strcmp(argv[i], "--bw-gib") && i + 1 < argc) {
            bw_gib = atof(argv[++i]);
            if (!(bw_gib >= 0.125 && bw_gib <= 64)) {
                fprintf(stderr, "bench_kernels: --bw-gib must be 0.125..64\n");
                return 2;
            }
        } else if (!strcmp(argv[i], "--shape") && i + 1 < argc && n_shapes < 16) {
            int *sh = shapes[n_shapes++];
            if (sscanf(argv[++i], "%d,%d,%d", &sh[0], &sh[1], &sh[2]) != 3 || sh[0] < 1 ||
                sh[1] < 1 || sh[2] < 1 || (double)sh[0] * sh[2] > 64e6 ||
                (double)sh[1] * sh[2] > 256e6) {
                fprintf(stderr, "bench_kernels: --shape %s: expected m,k,n (positive, not huge)\n",
                        argv[i]);
                return 2;
            }
        } else if (!strcmp(argv[i], "--isa") && i + 1 < argc) {
            const char *name = argv[++i];
            for (int s = 0; s < STAGE_N_ISAS; s++)
                if (!strcmp(name, stage_isa_name((stage_isa)s))) only = s;
            if (only < 0 || !stage_isa_supported((stage_isa)only)) {
                fprintf(stderr, "bench_kernels: --isa %s: unknown or not supported by this CPU\n",
                        name);
                return 2;
            }
        } else {
            fprintf(stderr,
                    "usage: bench_kernels [--threads N] [--quick] [--isa c|avx2|avx512|avx512bf16] "
                    "[--bw-gib G] [--gemv-only] [--cross-only] [--dtype D] [--fast] "
                    "[--bw-pass-only] [--gemv K,N] "
                    "[--bw-only [--shape m,k,n ...]]\n");
            return 2;
        }
    }
    char err[256];
    if (stage_threads_init(nt, err, sizeof err)) {
        fprintf(stderr, "bench_kernels: %s\n", err);
        return 1;
    }
    const int reps = quick ? 5 : 20;
    const size_t arena_bytes = (size_t)(bw_gib > 0 ? bw_gib * GIB : quick ? 0.25 * GIB : 1.0 * GIB);

    /* One buffer: first the read-bandwidth buffer, then the weight arena. Filled with bf16 values
     * in [-1, 1) (as f32 pairs they are ordinary floats in [-1, 1)), so no NaN / subnormal
     * assists skew the timings. */
    uint16_t *arena = malloc(arena_bytes);
    if (!arena) {
        fprintf(stderr, "bench_kernels: cannot allocate %.2f GiB\n", arena_bytes / GIB);
        return 1;
    }
    uint64_t rng = 88172645463325252ull;
    for (size_t i = 0; i < arena_bytes / 2; i++) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        /* sign, exponent 119..126 (|v| in [2^-8, 1)), 7 random mantissa bits */
        arena[i] =
            (uint16_t)(((rng >> 20) & 0x8000u) | ((119u + ((rng >> 8) & 7u)) << 7) | (rng & 0x7fu));
    }
    printf("# bench_kernels threads=%d best_isa=%s m_small_f32=%d m_small_16bit=%d tile_n=%d "
           "tile_k=%d\n",
           nt, stage_isa_name(stage_isa_best()), stage_matmul_m_small(STAGE_F32),
           stage_matmul_m_small(STAGE_BF16), STAGE_TILE_N, STAGE_TILE_K);
    const char *hint = stage_blas_coretype_hint();
    printf("blas corename=%s coretype_hint=%s\n", openblas_get_corename(), hint ? hint : "none");
    if (hint)
        printf("# OpenBLAS runs generic kernels on this CPU: rerun with OPENBLAS_CORETYPE=%s for a "
               "fair sgemm baseline\n",
               hint);
    /* 32 MiB pieces: a 4096 x 4096 bf16 weight */
    const size_t piece = (size_t)32 << 20 >> 3;
    double bwn = 0;
    for (int t = 1; t <= nt; t = t == nt ? nt + 1 : (t * 2 > nt ? nt : t * 2)) {
        double pass = read_bw((const uint64_t *)arena, arena_bytes / 8, t, 0);
        double pieces = read_bw((const uint64_t *)arena, arena_bytes / 8, t, piece / t);
        printf("bw threads=%d buffer_gib=%.2f read_gbs=%.2f read_gbs_32mib_pieces=%.2f\n", t,
               arena_bytes / GIB, pass, pieces);
        bwn = pass > pieces ? pass : pieces; /* the stricter reference */
    }
    if (bw_pass_only) {
        fflush(stdout);
        free(arena);
        return 0;
    }
    /* Repeated reads of a buffer by one thread, best of enough passes to read 2 GiB: the rate
     * stays above the memory one while the buffer fits the cache this core reaches (on AMD,
     * its CCD's L3, whatever the CPU reports for the socket). */
    for (size_t mib = 4; mib <= 512 && (mib << 20) <= arena_bytes; mib *= 2) {
        const size_t words = (mib << 20) / 8;
        double best = 0;
        uint64_t sink = 0;
        for (size_t pass = 0; pass < 5 || pass < (size_t)2048 / mib; pass++) {
            double t0 = now_s();
            sink += sum_words((const uint64_t *)arena, words);
            double g = (double)(mib << 20) / (now_s() - t0) / 1e9;
            if (g > best) best = g;
        }
        if (sink == 42) fprintf(stderr, "#\n"); /* keep the sums live */
        printf("cache mib=%zu read_gbs=%.2f\n", mib, best);
    }
    fflush(stdout);
    if (bw_only) {
        /* the shapes a benchmark script asks for: OpenBLAS on nt threads vs the kernels */
        for (int q = 0; q < n_shapes; q++) {
            const int m = shapes[q][0], k = shapes[q][1], n = shapes[q][2];
            float *xs = malloc((size_t)m * k * sizeof *xs),
                  *ys = malloc((size_t)m * n * sizeof *ys);
            float *wf = malloc((size_t)n * k * sizeof *wf);
            uint16_t *wb = malloc((size_t)n * k * 2);
            if (!xs || !ys || !wf || !wb) {
                fprintf(stderr, "bench_kernels: out of memory for --shape\n");
                return 1;
            }
            for (size_t i = 0; i < (size_t)m * k; i++)
                xs[i] = (float)((i * 2654435761u) % 2001) / 1000.0f - 1.0f;
            for (size_t i = 0; i < (size_t)n * k; i++) {
                wf[i] = (float)((i * 40503u) % 2001) / 1000.0f - 1.0f;
                wb[i] = arena[i % (arena_bytes / 2)];
            }
            double tb[7], tf[7], t16[7], tdf[7], td16[7], tfast[7];
            for (int r = 0; r < 7; r++) {
                openblas_set_num_threads(nt);
                double t0 = now_s();
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, xs, k, wf, k,
                            0.0f, ys, n);
                tb[r] = now_s() - t0;
                openblas_set_num_threads(1);
                stage_weight w32 = {STAGE_F32, n, k, wf, NULL}, w16 = {STAGE_BF16, n, k, wb, NULL};
                t0 = now_s();
                stage_matmul_w(xs, m, &w32, ys);
                tf[r] = now_s() - t0;
                t0 = now_s();
                stage_matmul_w(xs, m, &w16, ys);
                t16[r] = now_s() - t0;
                /* the large path with its tiles on oneDNN, whatever the default engine is */
                stage_matmul_force_engine(STAGE_ENGINE_ONEDNN);
                t0 = now_s();
                stage_matmul_w(xs, m, &w32, ys);
                tdf[r] = now_s() - t0;
                t0 = now_s();
                stage_matmul_w(xs, m, &w16, ys);
                td16[r] = now_s() - t0;
                stage_matmul_set_mode(STAGE_MATMUL_FAST);
                t0 = now_s();
                stage_matmul_w(xs, m, &w16, ys);
                tfast[r] = now_s() - t0;
                stage_matmul_set_mode(STAGE_MATMUL_EXACT);
                stage_matmul_force_engine(STAGE_ENGINE_AUTO);
            }
            double fl = 2.0 * m * n * k / 1e9;
            char eng[96], engd[96];
            stage_matmul_large_engine(m, k, eng, sizeof eng);
            stage_matmul_force_engine(STAGE_ENGINE_ONEDNN);
            stage_matmul_large_engine(m, k, engd, sizeof engd);
            stage_matmul_force_engine(STAGE_ENGINE_AUTO);
            for (char *c = eng; *c; c++) *c = *c == ' ' ? ',' : *c;
            for (char *c = engd; *c; c++) *c = *c == ' ' ? ',' : *c;
            uint16_t *xb = malloc((size_t)m * k * 2);
            if (!xb) {
                fprintf(stderr, "bench_kernels: out of memory for --shape\n");
                return 1;
            }
            for (size_t i = 0; i < (size_t)m * k; i++) xb[i] = stage_f32_to_bf16(xs[i]);
            double own32c, own16c;
            const double own32 = own_dnnl(m, k, n, 0, nt, xs, wf, ys, &own32c);
            const double own16 = own_dnnl(m, k, n, 1, nt, xb, wb, ys, &own16c);
            free(xb);
            printf("shape m=%d k=%d n=%d threads=%d sgemm_gflops=%.2f f32_gflops=%.2f "
                   "bf16_gflops=%.2f engine=%s onednn_f32_gflops=%.2f onednn_bf16_gflops=%.2f "
                   "onednn_bf16_fast_gflops=%.2f onednn_engine=%s own_f32_gflops=%.2f "
                   "own_bf16_gflops=%.2f own_f32_cpu_gflops=%.2f own_bf16_cpu_gflops=%.2f\n",
                   m, k, n, nt, fl / median(tb, 7), fl / median(tf, 7), fl / median(t16, 7), eng,
                   fl / median(tdf, 7), fl / median(td16, 7), fl / median(tfast, 7), engd, own32,
                   own16, own32c, own16c);
            free(xs);
            free(ys);
            free(wf);
            free(wb);
        }
        free(arena);
        stage_threads_free();
        return 0;
    }

    const int K = 4096, M_PRE = 256, M_MAX = 256;
    if (!n_gemv) {
        gemv_kn[0][0] = gemv_kn[1][0] = K;
        gemv_kn[0][1] = 4096;
        gemv_kn[1][1] = 14336;
        n_gemv = 2;
    }
    float *x = malloc((size_t)M_MAX * 14336 * sizeof *x);
    float *y = malloc((size_t)M_MAX * 14336 * sizeof *y);
    for (size_t i = 0; i < (size_t)M_MAX * 14336; i++)
        x[i] = (float)((i * 2654435761u) % 2001) / 1000.0f - 1.0f;
    const stage_dtype dts[] = {STAGE_F32, STAGE_BF16, STAGE_Q8_0}; /* q8_0: decode shapes only */

    /* ---- decode shapes ----------------------------------------------------------------------- */
    const int ms[] = {1, 4, 16};
    for (int s = 0; s < STAGE_N_ISAS && !cross_only; s++) {
        if (!stage_isa_supported((stage_isa)s) || (only >= 0 && s != only)) continue;
        stage_matmul_force_isa((stage_isa)s);
        for (int d = 0; d < 3; d++)
            for (int ni = 0; ni < n_gemv && (only_dt < 0 || only_dt == (int)dts[d]); ni++)
                for (int mi = 0; mi < 3; mi++) {
                    if (s == STAGE_ISA_C && (gemv_kn[ni][1] > 4096 || ms[mi] > 4) && only < 0)
                        continue; /* slow */
                    const int kk = gemv_kn[ni][0], n = gemv_kn[ni][1], m = ms[mi];
                    double t =
                        time_matmul(x, m, n, kk, dts[d], (const char *)arena, arena_bytes, y, reps);
                    double bytes = (double)stage_matrix_bytes(dts[d], (size_t)n, (size_t)kk);
                    printf("gemv isa=%s dtype=%s m=%d k=%d n=%d threads=%d us=%.1f gbs=%.2f "
                           "of_read_bw=%.2f gflops=%.2f\n",
                           stage_isa_name((stage_isa)s), stage_wdtype_name(dts[d]), m, kk, n, nt,
                           t * 1e6, bytes / t / 1e9, bytes / t / 1e9 / bwn,
                           2.0 * m * n * kk / t / 1e9);
                    fflush(stdout);
                }
    }

    if (gemv_only) {
        free(x);
        free(y);
        free(arena);
        stage_threads_free();
        return 0;
    }

    /* ---- small vs large path around the threshold (best variant) ----------------------------- */
    stage_matmul_force_isa(only >= 0 ? (stage_isa)only : stage_isa_best());
    const int cm[] = {4, 6, 8, 12, 16, 24, 32, 64, 128};
    /* f32; bf16 exact; bf16 fast (the mode matters where oneDNN multiplies bf16 natively) */
    for (int d = 0; d < 3; d++)
        for (int ci = 0; ci < (quick ? 5 : 9); ci++) {
            const int m = cm[ci], n = 4096;
            const stage_dtype dt = d ? STAGE_BF16 : STAGE_F32;
            stage_matmul_set_mode(d == 2 ? STAGE_MATMUL_FAST : STAGE_MATMUL_EXACT);
            stage_matmul_force_path(STAGE_PATH_SMALL);
            double ts = time_matmul(x, m, n, K, dt, (const char *)arena, arena_bytes, y, reps);
            stage_matmul_force_path(STAGE_PATH_LARGE);
            double tl = time_matmul(x, m, n, K, dt, (const char *)arena, arena_bytes, y, reps);
            printf("cross isa=%s dtype=%s mode=%s m=%d k=%d n=%d threads=%d small_us=%.1f "
                   "large_us=%.1f faster=%s m_small=%d\n",
                   stage_isa_name(stage_matmul_isa()), d ? "bf16" : "f32",
                   d == 2 ? "fast" : "exact", m, K, n, nt, ts * 1e6, tl * 1e6,
                   ts <= tl ? "small" : "large", stage_matmul_m_small(dt));
            fflush(stdout);
        }
    stage_matmul_set_mode(STAGE_MATMUL_EXACT);
    if (cross_only) {
        stage_matmul_force_path(STAGE_PATH_AUTO);
        free(x);
        free(y);
        free(arena);
        stage_threads_free();
        return 0;
    }
    stage_matmul_force_path(STAGE_PATH_AUTO);

    /* ---- prefill ----------------------------------------------------------------------------- */
    const int preps = quick ? 3 : 5;
    const int ns[] = {4096, 14336};
    for (int ni = 0; ni < 2; ni++) {
        const int n = ns[ni];
        if (quick && ni) break;
        /* the reference: one cblas_sgemm on all N threads, f32 weights */
        openblas_set_num_threads(nt);
        double ts[8];
        const float *wf = (const float *)arena;
        for (int r = -1; r < preps; r++) {
            double t0 = now_s();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M_PRE, n, K, 1.0f, x, K, wf, K,
                        0.0f, y, n);
            if (r >= 0) ts[r] = now_s() - t0;
        }
        openblas_set_num_threads(1);
        const double flops = 2.0 * M_PRE * n * K;
        const double sg = flops / median(ts, preps) / 1e9;
        printf("sgemm m=%d k=%d n=%d threads=%d gflops=%.2f\n", M_PRE, K, n, nt, sg);
        for (int s = 0; s < STAGE_N_ISAS; s++) {
            if (!stage_isa_supported((stage_isa)s) || (only >= 0 && s != only)) continue;
            stage_matmul_force_isa((stage_isa)s);
            for (int d = 0; d < 2; d++) {
                double t =
                    time_matmul(x, M_PRE, n, K, dts[d], (const char *)arena, arena_bytes, y, preps);
                printf("prefill isa=%s dtype=%s m=%d k=%d n=%d threads=%d gflops=%.2f "
                       "sgemm_gflops=%.2f "
                       "of_sgemm=%.2f\n",
                       stage_isa_name((stage_isa)s), dts[d] == STAGE_F32 ? "f32" : "bf16", M_PRE, K,
                       n, nt, flops / t / 1e9, sg, flops / t / 1e9 / sg);
                fflush(stdout);
            }
        }
        /* the large path's two tile engines, interleaved so load changes hit both alike */
        stage_matmul_force_isa(only >= 0 ? (stage_isa)only : stage_isa_best());
        for (int d = 0; d < 2; d++) {
            double te[2][3];
            for (int rr = 0; rr < 3; rr++)
                for (int e = 0; e < 2; e++) {
                    stage_matmul_force_engine(e ? STAGE_ENGINE_ONEDNN : STAGE_ENGINE_BLAS);
                    te[e][rr] = time_matmul(x, M_PRE, n, K, dts[d], (const char *)arena,
                                            arena_bytes, y, preps);
                }
            for (int e = 0; e < 2; e++) {
                char eng[96];
                stage_matmul_force_engine(e ? STAGE_ENGINE_ONEDNN : STAGE_ENGINE_BLAS);
                stage_matmul_large_engine(M_PRE, K, eng, sizeof eng);
                printf("prefill_engine engine=\"%s\" dtype=%s m=%d k=%d n=%d threads=%d "
                       "gflops=%.2f\n",
                       eng, dts[d] == STAGE_F32 ? "f32" : "bf16", M_PRE, K, n, nt,
                       flops / median(te[e], 3) / 1e9);
            }
            fflush(stdout);
        }
        stage_matmul_force_engine(STAGE_ENGINE_AUTO);
    }
    /* ---- attention: one GQA group (4 query heads, hd 128) over a long context ---------------- */
    {
        const int hd = 128, n_q = 4, n_ctx = 2048;
        const size_t stride = 8 * 128; /* 8 KV heads per cached row */
        float *kv = malloc((size_t)n_ctx * stride * 2 * sizeof *kv);
        float *probs = malloc((size_t)n_q * n_ctx * sizeof *probs);
        float out[4 * 128];
        for (size_t i = 0; i < (size_t)n_ctx * stride * 2; i++)
            kv[i] = (float)(i % 97) / 97.0f - 0.5f;
        for (int s = 0; s < STAGE_N_ISAS; s++) {
            if (!stage_isa_supported((stage_isa)s) || (only >= 0 && s != only)) continue;
            stage_matmul_force_isa((stage_isa)s);
            double t[20];
            for (int r = -1; r < 20; r++) {
                double t0 = now_s();
                stage_attend_gqa(x, n_q, kv, kv + (size_t)n_ctx * stride, stride, n_ctx, hd, 0.088f,
                                 probs, out);
                if (r >= 0) t[r] = now_s() - t0;
            }
            const double md = median(t, 20);
            printf("attend isa=%s hd=%d n_q=%d n_ctx=%d us=%.1f gflops=%.2f\n",
                   stage_isa_name((stage_isa)s), hd, n_q, n_ctx, md * 1e6,
                   4.0 * n_q * n_ctx * hd / md / 1e9);
            fflush(stdout);
        }
        free(kv);
        free(probs);
    }
    free(x);
    free(y);
    free(arena);
    stage_threads_free();
    return 0;
}
