/* stage/matmul.h — weight matmuls in the checkpoint dtype, the thread pool they run on, and
 * vectorised attention.
 *
 * stage_matmul_w(x, m, w, y): y [m][w->rows] = x [m][w->cols] · W^T, W a stage_weight in f32,
 * bf16 or f16 (stage/dtype.h), products accumulated in f32. Two paths, chosen by m:
 *   - small (m <= stage_matmul_m_small(dtype): 32 for f32 and Q8_0, 64 for f16 and for bf16
 *     where oneDNN has no native bf16 kernel; bf16 on oneDNN's bf16 matmul: 32 without AMX,
 *     with AMX 8 in EXACT mode and 4 in FAST mode; decode and batched decode): each weight row
 *     is streamed from memory once per call, no packing; blocks of 4 weight rows x up to 4
 *     rows of x are held in registers (bf16 with m >= 2: x rearranged once per call into a
 *     scratch grown once, the next weight block prefetched; FAST on a CPU with AVX-512 BF16:
 *     x rounded to bf16, vdpbf16ps, m = 1 too). Work is split over output columns (weight rows) between
 *     the pool's threads.
 *   - large (larger m, prefill): fixed tiles of STAGE_TILE_N weight rows; f32 tiles go
 *     straight to a single-threaded f32 matmul, bf16/f16 tiles are first converted (exactly) to
 *     f32 in STAGE_TILE_K-column blocks in a per-thread scratch and multiplied block by block.
 *     Tiles are handed to the pool's threads in any order. The tile matmul is oneDNN's
 *     (stage/onednn.h: the weights in their checkpoint layout, a primitive created once per
 *     tile shape and cached, run inside the pool thread) on CPUs where oneDNN has AVX-512 or
 *     better kernels, else OpenBLAS's cblas_sgemm (stage_matmul_force_engine).
 *     bf16 weights where oneDNN has native bf16 kernels (stage_dnnl_bf16: avx512_core_bf16 or
 *     better, not under ONEDNN_MAX_CPU_ISA below it) skip the conversion: the weight rows go as
 *     they are to oneDNN's bf16 matmul (brgemm; bf16 x bf16 products, f32 accumulation), and x,
 *     which oneDNN 2.6 cannot mix with bf16 weights, is made bf16 once per call (in the pool):
 *     EXACT mode (the default) splits it, hi = bf16(x), lo = bf16(x - hi), into 2m rows that
 *     go through one product, and y = (hi · W^T) + (lo · W^T) in f32; FAST mode
 *     (stage_matmul_set_mode, --matmul fast) rounds it, one product of m rows. The products
 *     land in a per-thread dense [2m][STAGE_TILE_N] scratch (oneDNN's brgemm takes no strided
 *     dst), then y. f16 (no oneDNN kernel) and Q8_0 keep the conversion.
 *
 * Reduction order (why N-rank runs stay bit-identical to 1-rank runs): every output element
 * y[i][j] is computed by one thread from x row i and weight row j alone, in an order that is
 * fixed by (ISA variant, dtype, k) on the small path and by (engine kernel, m, k, mode) on the
 * large one (oneDNN's and OpenBLAS's order can change with the number of rows; the tile shapes
 * are fixed, and the engine is chosen per shape, the same on every rank; the mode is one
 * option for the whole run). oneDNN's bf16 brgemm computes each row alone in practice
 * (tests/test_kernels.c checks that a row's bits do not depend on m), but oneDNN promises
 * nothing of the kind, so this contract promises only the fixed order per (m, k).
 * It does not depend on the thread count, on which thread ran it, or, on the small path, on m
 * or on the other rows in the call: row i of a call with any m up to the threshold is
 * bit-identical to the same row computed alone with m = 1 (so is column j to the same weight
 * row in a weight of other rows), in both modes. Different ISA variants, and oneDNN / OpenBLAS kernels (CPUs,
 * ONEDNN_MAX_CPU_ISA, OPENBLAS_CORETYPE), give different roundings: ranks that must agree bit for bit must run the
 * same ones (stage_matmul_force_isa can pin the variant).
 *
 * Accuracy (tests/test_kernels.c, against a double reference on the same bf16/f16-rounded
 * weights; max |err| / max |ref|, bound 1e-5 for every variant): the f32 FMA paths and the
 * bf16/f16 paths that convert weights to f32 (C, AVX2, AVX-512, and the large path's
 * conversion) are plain f32 dot products: measured <= 6.2e-7 (k from 5 to 4133). The AVX-512
 * BF16 path (vdpbf16ps) and the large path's oneDNN bf16 EXACT mode split each f32 x value
 * into bf16 hi + lo parts and do two dot products, so x keeps ~16 mantissa bits: measured
 * 3.0e-6 at k = 4096, up to 7.7e-6 on short rows (k = 5..67) where the result cancels; oneDNN
 * bf16 EXACT <= 2.7e-6 (k 64..2085). FAST mode keeps 8 bits of x: bound 4e-3, measured
 * <= 1.7e-3; on stories260K its logits move 6e-3 and the held-out NLL +0.002% (docs/BENCH.md).
 * Q8_0 FAST (small path, AVX-512 VNNI CPUs: stage_q8_fast_available): x quantized per
 * 32-column block to int8 (d = max|x| / 127) and dotted with the int8 weights by vpdpbusd; per
 * output, 64 columns a step in order, exact int32 block sums, f32 accumulation of sum * dw * dx,
 * then _mm512_reduce_add_ps. Measured (tests/test_kernels.c) 1.6e-7 against a double reference
 * on the quantized x, 6.3e-3 against the f32 x (bound 2e-2). Held-out NLL on stories260K
 * (scripts/q8-nll): +0.058% over f32 against exact q8_0's +0.056%; one-sequence decode 1.3x
 * exact q8_0's steady rate, 1.05x llama.cpp's (1.22x with the weights on huge pages, stage/wmem.h;
 * docs/BENCH.md); opt-in, as every lossy mode is.
 *
 * Threads: one process-wide pool. stage_threads_init(n) starts n - 1 workers (the caller is
 * the n-th); workers spin ~50 us after a job, then sleep on a condition variable. Without init
 * everything runs in the caller. It also sets OpenBLAS to 1 thread: its own spinning threads
 * fought the MPI progress loop, and the pool gives the large path its parallelism. oneDNN runs
 * on the same pool: each pool thread sets OpenMP's thread count to 1 for itself, so oneDNN never
 * starts threads of its own and --threads N is the whole process's compute parallelism.
 * stage_matmul_w and stage_attend* are not re-entrant: one caller thread at a time (the stage's
 * thread). Errors: init returns non-zero (with the reason) when threads or memory cannot be
 * had; the matmul itself cannot fail (scratch for the large path, for the split x and for
 * the bf16 tile products is grown once, in the caller thread; if that allocation fails the
 * call falls back to the f32 conversion, or to an allocation-free path: the small kernel, or
 * the f32-converting variant).
 */
#ifndef STAGE_MATMUL_H
#define STAGE_MATMUL_H

#include <stddef.h>
#include <stdint.h>

#include "stage/dtype.h"

/* Largest m the small (streaming) path takes, by weight dtype (stage_matmul_m_small). Measured
 * on this machine (tests/bench_kernels.c `cross` lines, one thread, OpenBLAS on its SkylakeX
 * kernels): f32 small and large paths are level at m = 24-32, sgemm tiles win from 48;
 * bf16/f16 rows converted in registers beat converted sgemm tiles up to m = 64, the tiles win
 * from 128. STAGE_M_SMALL: the m-independence every dtype has, but bf16 on oneDNN (below). */
#define STAGE_M_SMALL 32
#define STAGE_M_SMALL_16BIT 64
/* bf16 where stage_dnnl_bf16 (oneDNN's native bf16 matmul takes the large path's tiles).
 * Without AMX, measured on 2 Zen 5 cores, 2 threads, one decoder layer's products (hidden 2048,
 * FFN 5632) with the weights streamed from memory, interleaved (docs/BENCH.md, batched decode):
 * the small path (x deinterleaved once per call, 4 x 4 register blocks, the next weight block
 * prefetched; FAST: x rounded to bf16, vdpbf16ps) is ahead of oneDNN's bf16 brgemm through
 * m = 32 in both modes and level at 48-64. With AMX (oneDNN's tiles on the matrix engine)
 * the earlier thresholds stay: EXACT (2m bf16 rows) 8, FAST 4, measured before the small
 * path's rework and not re-measured on an AMX machine. */
#define STAGE_M_SMALL_BF16_EXACT 32
#define STAGE_M_SMALL_BF16_FAST 32
#define STAGE_M_SMALL_BF16_AMX_EXACT 8
#define STAGE_M_SMALL_BF16_AMX_FAST 4
int stage_matmul_m_small(stage_dtype d);
#define STAGE_TILE_N 256  /* weight rows per large-path tile */
#define STAGE_TILE_K 2048 /* columns per converted block of a bf16/f16 tile */

/* Start the pool with n threads in all (n >= 1; n = 1: no workers). Replaces an earlier pool.
 * 0 ok; -1 with one line in err. */
int stage_threads_init(int n, char *err, size_t errlen);
void stage_threads_free(void); /* stop the workers; safe to call when none were started */
int stage_threads_n(void);     /* threads the kernels use now (1 without init) */

/* y [m][w->rows] = x [m][w->cols] · W^T. m <= 0 or w->rows == 0 is a no-op. x and y must not
 * overlap. */
void stage_matmul_w(const float *x, int m, const stage_weight *w, float *y);

/* ---- test / benchmark hooks ------------------------------------------------------------------ */
typedef enum { STAGE_ISA_C = 0, STAGE_ISA_AVX2, STAGE_ISA_AVX512, STAGE_ISA_AVX512BF16 } stage_isa;
#define STAGE_N_ISAS 4
/* The default: the fastest variant this CPU (and OS) can run, AVX-512 > AVX2 > C. AVX-512 BF16
 * is never the default. Its bf16 rows (x split once per call into bf16 hi + lo, FAST: hi
 * only; blocks of 8 weight rows x 32 x rows x 1024 columns, two vdpbf16ps per 32 products in
 * EXACT) reach, in cache on one core, 50-65 G multiply-adds/s exact and 90-118 fast (peak
 * 7.2 G vdpbf16ps/s: 115 exact, 230 fast); at m = 1 it is no faster (memory-bound either
 * way), and EXACT is less exact (~4e-6 vs ~4e-7) for the same arithmetic as the AVX-512
 * variant's f32 products. So the AVX-512 variant borrows only its FAST rows, on a CPU that
 * has AVX-512 BF16 (stage/matmul.c, run_small). It stays selectable
 * (stage_matmul_force_isa). */
stage_isa stage_isa_best(void);
int stage_isa_supported(stage_isa isa);    /* 1 if this CPU can run it */
const char *stage_isa_name(stage_isa isa); /* "c", "avx2", "avx512", "avx512bf16" */
/* Use isa from now on (0), or -1 when the CPU cannot run it. */
int stage_matmul_force_isa(stage_isa isa);
stage_isa stage_matmul_isa(void); /* the variant in use */

typedef enum { STAGE_PATH_AUTO = 0, STAGE_PATH_SMALL, STAGE_PATH_LARGE } stage_path;
void stage_matmul_force_path(stage_path p); /* AUTO: by m (the default) */

/* The large path's tile engine. ONEDNN: oneDNN's f32 matmul whenever it has a kernel that is
 * not a reference one for every tile shape of the call, else OpenBLAS for that call. AUTO (the
 * default): ONEDNN where oneDNN dispatches to AVX-512 or better, OpenBLAS on AVX2 and below
 * (oneDNN's AVX2 f32 gemm measured level with OpenBLAS's on an AMD EPYC, 0.8-1.4x by shape on a
 * shared machine: docs/BENCH.md bench-matmul; its AVX-512 brgemm kernels beat it). Each
 * shape decides the same way on every rank of a run on one kind of CPU. */
typedef enum { STAGE_ENGINE_AUTO = 0, STAGE_ENGINE_BLAS, STAGE_ENGINE_ONEDNN } stage_engine;
/* How bf16 weights meet f32 activations on oneDNN's bf16 matmul (large path, CPUs where
 * stage_dnnl_bf16). EXACT (the default): x split in bf16 hi + lo, two products added in f32.
 * FAST: x rounded to bf16 once, one product: half the arithmetic, x keeps 8 mantissa bits
 * (--matmul fast; its cost in docs/BENCH.md). Process-wide, set before the stage runs. */
typedef enum { STAGE_MATMUL_EXACT = 0, STAGE_MATMUL_FAST } stage_matmul_mode;
void stage_matmul_set_mode(stage_matmul_mode m);
stage_matmul_mode stage_matmul_get_mode(void);
/* 1 when FAST mode changes Q8_0's small path (int8 x on AVX-512 VNNI; an AVX-512 variant in
 * use), else FAST leaves Q8_0 exact. */
int stage_q8_fast_available(void);
void stage_matmul_force_engine(stage_engine e);
/* What the large path runs for an f32 tile of m rows, k columns: oneDNN's implementation name
 * ("gemm:jit", "brg:avx512_core_amx"...) or "openblas" (written into buf, returned). */
const char *stage_matmul_large_engine(int m, int k, char *buf, size_t len);

/* OpenBLAS built with DYNAMIC_ARCH picks its kernels from the CPU id; on a CPU it does not
 * know (a VM's generic "Intel Xeon Processor") it falls back to Prescott (SSE3) kernels, 4x
 * slower here. It reads OPENBLAS_CORETYPE when the library loads, so only the environment of
 * a fresh process can fix it: this returns the value to set ("SkylakeX", "Haswell") when
 * OpenBLAS runs a core older than this CPU supports and the variable is unset, else NULL. */
const char *stage_blas_coretype_hint(void);

/* ---- attention ------------------------------------------------------------------------------- */
/* One query head q [hd] over n_ctx cached positions: k_t = k + t*stride, v_t = v + t*stride
 * (floats). probs [n_ctx] gets softmax(q·k_t * scale) (max-subtracted); out [hd] = sum_t
 * p_t v_t. n_ctx >= 1. Deterministic for a given (ISA, n_ctx, hd): scores are one vector dot
 * product per t, the softmax is scalar expf in order (the same code in every variant), out
 * accumulates p_t v_t over t in order. The scalar loops this replaces read q·k_t one float at
 * a time; here k_t and v_t are read in vectors, and once per KV head for a GQA group. */
void stage_attend(const float *q, const float *k, const float *v, size_t stride, int n_ctx, int hd,
                  float scale, float *probs, float *out);
/* GQA: the n_q query heads q [n_q][hd] that share one KV head, at once, so each k_t / v_t is
 * read once for all of them; probs [n_q][n_ctx], out [n_q][hd]. Head h's results are
 * bit-identical to stage_attend on head h alone. */
void stage_attend_gqa(const float *q, int n_q, const float *k, const float *v, size_t stride,
                      int n_ctx, int hd, float scale, float *probs, float *out);
/* Entries of a paged cache (stage/kv.h, docs/SPEC.md §11): entry t0 + t of the view, t in
 * [0, n_ctx), is k_t = k + pages[(t0+t) / page] * page_stride + ((t0+t) % page) * stride (v_t
 * likewise). A contiguous cache is one page: pages = {0}, page >= t0 + n_ctx. */
typedef struct stage_kv_view {
    const float *k, *v;   /* pool bases, the KV head's offset included */
    const int32_t *pages; /* page ids in entry order */
    int page;             /* entries per page */
    int t0;               /* first entry attended */
    size_t page_stride;   /* floats from page i to page i + 1 of the pool */
    size_t stride;        /* floats from one entry to the next inside a page */
} stage_kv_view;
/* stage_attend_gqa over the entries of a view: the same arithmetic in the same order, so the
 * results are bit-identical to stage_attend_gqa on the same entries laid out contiguously. */
void stage_attend_paged(const float *q, int n_q, const stage_kv_view *kv, int n_ctx, int hd,
                        float scale, float *probs, float *out);

/* Many attention problems at once on the pool (prefill: every row x KV head of a micro-batch):
 * job i is stage_attend_paged(jobs[i].q, n_q, &jobs[i].kv, jobs[i].n_ctx, hd, scale, _,
 * jobs[i].out), each job run whole by one thread with its own probs scratch, so every job's
 * results are bit-identical to that call alone, whatever the thread count or the other jobs.
 * The per-thread scratch [n_q][n_ctx] is grown (geometrically) in the caller thread; when it
 * cannot be had the jobs run one after another in the caller on probs [n_q][max n_ctx]. The
 * outputs must not overlap. */
typedef struct {
    const float *q;   /* [n_q][hd] */
    stage_kv_view kv; /* the entries this job attends */
    int n_ctx;        /* >= 1 */
    float *out;       /* [n_q][hd] */
} stage_attend_job;
void stage_attend_batch(const stage_attend_job *jobs, int n_jobs, int n_q, int hd, float scale,
                        float *probs);

#endif
