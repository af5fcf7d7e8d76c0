/* stage/onednn.h — internal to stage/matmul.c: the large path's tiles on oneDNN's matmul
 * primitive (libdnnl, Debian's 2.6 build on its OpenMP runtime).
 *
 * A tile is y [m][n] (+)= x [m][k] · W^T with W [n][k] row-major (the checkpoint's own layout,
 * handed to oneDNN as its "ba" weights: no reorder, no copy); x, W and y have leading
 * dimensions ldx, ldw, ldy (elements). acc = 1 adds to y (oneDNN's sum post-op), else y is
 * overwritten. bf16 = 0: x and W are f32; bf16 = 1: x and W are bf16 (uint16_t), the products
 * are accumulated in f32 and y stays f32 (oneDNN 2.6 has no kernel mixing f32 x with bf16 W:
 * the caller rounds or splits x, stage/matmul.h).
 *
 * One pool: oneDNN never starts threads of its own. Every thread that runs a tile has called
 * stage_dnnl_thread_init (OpenMP's thread count 1 for that thread), so each primitive runs
 * single-threaded inside the caller's pool thread (stage/matmul.h) and a tile's result does not
 * depend on the thread count. oneDNN picks its kernel from the CPU at run time
 * (ONEDNN_MAX_CPU_ISA caps it); a primitive whose implementation is a reference ("ref...") one
 * is refused: the caller then uses its own kernels for that shape, on every rank alike.
 *
 * stage_dnnl_prepare (caller thread only, before the tiles run) returns the cached primitive
 * for a shape, creating it once (with a stream, memory objects and a scratchpad for each of
 * nthreads threads), or -1 when oneDNN cannot take the shape. stage_dnnl_tile may then run in
 * threads 0..nthreads-1 concurrently, each with its own tid. At most STAGE_DNNL_CACHE shapes
 * are kept; the least recently used is dropped for a new one. Nothing here allocates once a
 * shape is cached.
 */
#ifndef STAGE_ONEDNN_H
#define STAGE_ONEDNN_H

#include <stddef.h>

#define STAGE_DNNL_CACHE 48

typedef struct {
    int m, n, k;
    int ldx, ldw, ldy;
    int acc;
    int bf16;
} stage_dnnl_shape;

void stage_dnnl_thread_init(void);
/* handle >= 0, or -1 (oneDNN unavailable, no kernel, or out of memory) */
int stage_dnnl_prepare(const stage_dnnl_shape *s, int nthreads);
void stage_dnnl_tile(int handle, int tid, const void *x, const void *w, float *y);
/* oneDNN's implementation for an f32 tile of this shape and the ISA it dispatches to
 * ("gemm:jit isa=avx2", "brg:avx512_core_amx isa=avx512_core_amx"...),
 * or NULL when there is none that is not a reference implementation. */
const char *stage_dnnl_impl(const stage_dnnl_shape *s);
/* 1 when oneDNN dispatches to AVX-512 or better (its brgemm kernels: 372 GFLOP/s f32 on 2 Xeon
 * cores where OpenBLAS gave 242); on AVX2 its f32 gemm measured level with OpenBLAS's, no gain
 * (docs/BENCH.md, bench-matmul), so the default stays OpenBLAS there. */
int stage_dnnl_preferred(void);
/* 1 when oneDNN dispatches to avx512_core_bf16 or better (native bf16 dot products); below it
 * (AVX2, or ONEDNN_MAX_CPU_ISA=AVX512_CORE) its bf16 matmul is a reference or emulated one and
 * the caller keeps bf16 weights on its exact f32 conversion. */
int stage_dnnl_bf16(void);
/* 1 when oneDNN dispatches to AMX (avx512_core_amx): its bf16 tiles then run on the matrix
 * engine, and the small path's threshold for bf16 drops (stage_matmul_m_small). */
int stage_dnnl_amx(void);
int stage_dnnl_cached(void); /* shapes in the cache (tests) */
void stage_dnnl_free(void);  /* drop every primitive, stream and scratchpad */

#endif
