/* stage/tp.h — tensor parallelism inside one pipeline stage: what the layer math needs from
 * the stage's group of ranks, as operations the engine provides (engine/tp.h builds them on
 * ScaLAPACK and MPI; stage/ itself makes no MPI call). docs/SPEC.md §5.
 *
 * A stage may span a group of K ranks (K = 1: none of this is used; the single-rank path in
 * stage/layers.c is unchanged and never calls ScaLAPACK). The group is a BLACS process grid of
 * K x 1 (K process rows, one process column) built on the group's communicator.
 *
 * Distribution. A projection W [n][k] (HF nn.Linear [out][in], y = x W^T) is the ScaLAPACK
 * matrix A = W (n x k) with block size MB = ceil(n / K), NB = k: process row p holds the one
 * row block [p*MB, min(n, (p+1)*MB)) of W — a block-cyclic descriptor with one block per
 * process, so rank p's output features are contiguous (its attention heads, its slice of the
 * MLP's intermediate features, its slice of the vocabulary). Activations are the ScaLAPACK
 * matrices X^T (k x m) and Y^T (n x m) with the same row split (MB = ceil(k/K), resp.
 * ceil(n/K); NB = m): a row-major x [m][k] is the column-major X^T, so rank p's local part
 * [m][k_loc] of an activation is simply its feature slice of each row. psgemm_ computes
 * Y^T = W X^T; it brings the rows of X^T each rank lacks itself.
 *
 * Why this layout: q/k/v and gate/up end split by features = by heads and by intermediate
 * features, which is what the next step needs locally (attention per head with the rank's own
 * KV cache; SwiGLU element-wise), and o_proj / down_proj take exactly that split as their
 * input. Only the block outputs (attention output, MLP output, logits) are gathered so every
 * rank holds the full residual rows again (the per-row control flow — routers, norms, top-k,
 * mindskip — then runs replicated and identically on every rank of the group).
 *
 * Memory: each rank holds 1/K of every distributed matrix, as f32 (psgemm is single
 * precision: the slice is converted from the checkpoint dtype at load; a bf16 checkpoint thus
 * takes 2/K of its own size per rank). The loader reads only the rows of the slice from the
 * (mmap'd) safetensors.
 *
 * Accounting: stage_tp_bytes counts the bytes moved inside the group, each byte once per
 * receiving rank: a broadcast of B bytes counts B (K-1); an allgather of a total of B bytes
 * counts B (K-1); a psgemm counts its X^T operand k*m*4 (K-1) (every rank needs all of it;
 * this is the data PBLAS must move, a model of its traffic: PBLAS does its own MPI calls).
 *
 * The group protocol (stage/state.c): the leader (group rank 0) runs the pipeline and
 * broadcasts each operation on the stage state (bcast_idle: a small header; bcast: its data);
 * the followers repeat it. Both are collective over the group, rank 0 the root.
 *
 * Threads: one caller thread (the stage's). Errors: reserve / weight_init return non-zero
 * with one line in err; matmul cannot fail (its scratch is sized by reserve; a call beyond it
 * is a programming error and aborts). stage_tp_weight_free(NULL) is a no-op. The stage never
 * owns a stage_tp: its maker (engine/tp.h) frees it after the stage.
 */
#ifndef STAGE_TP_H
#define STAGE_TP_H

#include <stddef.h>
#include <stdint.h>

#include "stage/dtype.h"

typedef struct {
    int n, k;      /* the full W [n][k] */
    int n_loc, r0; /* this rank's rows [r0, r0 + n_loc) of W */
    float *a;      /* [k][max(1,n_loc)] column-major local block (n_loc x k, lld max(1,n_loc)) */
    int desc[9];   /* ScaLAPACK descriptor of W (filled by weight_init) */
} stage_tp_weight;

typedef struct stage_tp stage_tp;
struct stage_tp {
    int size, rank; /* K ranks in the group; this rank's place in it (0: the leader) */
    double bytes;   /* moved inside the group by reserve/matmul so far (see Accounting) */
    /* Scratch for matmuls of up to `rows` rows and `width` features (n or k) at once. */
    int (*reserve)(stage_tp *tp, int rows, int width, char *err, size_t errlen);
    /* This rank's slice of `full` (any dtype; only its rows are read), converted to f32. */
    int (*weight_init)(stage_tp *tp, const stage_weight *full, stage_tp_weight *w, char *err,
                       size_t errlen);
    /* y = x W^T over the group (collective: every rank calls it with the same m and w).
     * x: x_local ? [m][k_loc] (this rank's feature slice) : [m][k] (the full rows, same on
     * every rank). y: y_local ? [m][n_loc] : [m][n] (gathered: the same on every rank).
     * m <= 0: no-op. */
    void (*matmul)(stage_tp *tp, const float *x, int x_local, int m, const stage_tp_weight *w,
                   float *y, int y_local);
    /* buf [len] bytes: rank 0's to every rank of the group (blocking). */
    void (*bcast)(stage_tp *tp, void *buf, size_t len);
    /* hdr [n]: the same for an operation header; a follower waiting for the next operation
     * polls, then sleeps between polls (an idle stage costs no core). */
    void (*bcast_idle)(stage_tp *tp, int32_t *hdr, int n);
};

static inline int stage_tp_size(const stage_tp *tp) { return tp->size; }
static inline int stage_tp_rank(const stage_tp *tp) { return tp->rank; }
static inline double stage_tp_bytes(const stage_tp *tp) { return tp->bytes; }
static inline int stage_tp_reserve(stage_tp *tp, int rows, int width, char *err, size_t errlen)
{
    return tp->reserve(tp, rows, width, err, errlen);
}
static inline int stage_tp_weight_init(stage_tp *tp, const stage_weight *full, stage_tp_weight *w,
                                       char *err, size_t errlen)
{
    return tp->weight_init(tp, full, w, err, errlen);
}
static inline void stage_tp_matmul(stage_tp *tp, const float *x, int x_local, int m,
                                   const stage_tp_weight *w, float *y, int y_local)
{
    tp->matmul(tp, x, x_local, m, w, y, y_local);
}

/* Rank p's slice of n features split over K ranks in blocks of ceil(n / K): returns its
 * length, *off its first feature (what ScaLAPACK's numroc gives for one block per rank). */
int stage_tp_split_of(int n, int K, int p, int *off);
static inline int stage_tp_split(const stage_tp *tp, int n, int *off)
{
    return stage_tp_split_of(n, tp->size, tp->rank, off);
}

void stage_tp_weight_free(stage_tp_weight *w);
static inline size_t stage_tp_weight_bytes(const stage_tp_weight *w)
{
    return (size_t)w->n_loc * (size_t)w->k * sizeof(float);
}

#endif
