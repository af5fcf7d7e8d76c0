/* stage/tp.h — tensor parallelism inside one pipeline stage on ScaLAPACK (SPEC §5, issue 10).
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
 * Threads: one caller thread (the stage's). Errors: stage_tp_new / stage_tp_weight_init return
 * non-zero with one line in err; stage_tp_matmul cannot fail (its scratch is sized by
 * stage_tp_reserve; a call beyond it is a programming error and aborts).
 * *_free(NULL) is a no-op. The group communicator is the caller's (stage_tp_new dups it).
 */
#ifndef STAGE_TP_H
#define STAGE_TP_H

#include <mpi.h>
#include <stddef.h>

#include "stage/dtype.h"

typedef struct stage_tp stage_tp;

/* Collective over `group` (every rank of it). */
int stage_tp_new(MPI_Comm group, stage_tp **out, char *err, size_t errlen);
void stage_tp_free(stage_tp *tp);
int stage_tp_size(const stage_tp *tp);
int stage_tp_rank(const stage_tp *tp);
MPI_Comm stage_tp_comm(const stage_tp *tp);

/* Scratch for matmuls of up to `rows` rows and `width` features (n or k) at once. */
int stage_tp_reserve(stage_tp *tp, int rows, int width, char *err, size_t errlen);

/* This rank's slice of n features: returns its length, *off its first feature. */
int stage_tp_split(const stage_tp *tp, int n, int *off);

/* Bytes moved inside the group so far (see above), and adding to it. */
double stage_tp_bytes(const stage_tp *tp);
void stage_tp_count(stage_tp *tp, double bytes);

typedef struct {
    int n, k;      /* the full W [n][k] */
    int n_loc, r0; /* this rank's rows [r0, r0 + n_loc) of W */
    float *a;      /* [k][max(1,n_loc)] column-major local block (n_loc x k, lld max(1,n_loc)) */
    int desc[9];   /* ScaLAPACK descriptor of W */
} stage_tp_weight;

/* This rank's slice of `full` (any dtype; only its rows are read), converted to f32. */
int stage_tp_weight_init(stage_tp *tp, const stage_weight *full, stage_tp_weight *w, char *err,
                         size_t errlen);
void stage_tp_weight_free(stage_tp_weight *w);
static inline size_t stage_tp_weight_bytes(const stage_tp_weight *w)
{
    return (size_t)w->n_loc * (size_t)w->k * sizeof(float);
}

/* y = x W^T over the group (collective: every rank calls it with the same m and w).
 * x: x_local ? [m][k_loc] (this rank's feature slice) : [m][k] (the full rows, same on every
 * rank). y: y_local ? [m][n_loc] : [m][n] (gathered: the same on every rank). m <= 0: no-op. */
void stage_tp_matmul(stage_tp *tp, const float *x, int x_local, int m, const stage_tp_weight *w,
                     float *y, int y_local);

#endif
