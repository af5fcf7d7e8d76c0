/* engine/tp.c — ScaLAPACK (BLACS + PBLAS psgemm) and MPI for tensor-parallel stages. See
 * engine/tp.h and stage/tp.h. */
#include "engine/tp.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/backoff.h"
#include "stage/dtype.h"

/* Debian's libscalapack-openmpi ships no C header: the prototypes we use (ScaLAPACK 2.2). */
extern int Csys2blacs_handle(MPI_Comm comm);
extern void Cfree_blacs_system_handle(int handle);
extern void Cblacs_gridinit(int *ctx, const char *order, int nprow, int npcol);
extern void Cblacs_gridinfo(int ctx, int *nprow, int *npcol, int *myrow, int *mycol);
extern void Cblacs_gridexit(int ctx);
extern void descinit_(int *desc, const int *m, const int *n, const int *mb, const int *nb,
                      const int *irsrc, const int *icsrc, const int *ictxt, const int *lld,
                      int *info);
extern void psgemm_(const char *transa, const char *transb, const int *m, const int *n,
                    const int *k, const float *alpha, const float *a, const int *ia, const int *ja,
                    const int *desca, const float *b, const int *ib, const int *jb,
                    const int *descb, const float *beta, float *c, const int *ic, const int *jc,
                    const int *descc);

typedef struct {
    stage_tp ops;  /* first: a stage_tp * is an engine_tp * */
    MPI_Comm comm; /* dup of the group */
    int K, rank;
    int handle, ctx;      /* BLACS system handle, grid context (K x 1) */
    size_t cap;           /* floats in each scratch buffer */
    float *xb;            /* [rows][k_loc] this rank's slice of a full x */
    float *cb;            /* [rows][n_loc] local product before the gather */
    float *gb;            /* [rows][width] gathered products, rank by rank */
    int *counts, *displs; /* [K] allgather */
} engine_tp;

static int ceil_div(int a, int b) { return (a + b - 1) / b; }

static int tp_reserve(stage_tp *st, int rows, int width, char *err, size_t errlen)
{
    engine_tp *tp = (engine_tp *)st;
    size_t need = (size_t)(rows < 1 ? 1 : rows) * (size_t)(width < 1 ? 1 : width);
    if (need <= tp->cap) return 0;
    free(tp->xb);
    free(tp->cb);
    free(tp->gb);
    tp->xb = malloc(need * sizeof(float));
    tp->cb = malloc(need * sizeof(float));
    tp->gb = malloc(need * sizeof(float));
    tp->cap = tp->xb && tp->cb && tp->gb ? need : 0;
    if (!tp->cap) {
        snprintf(err, errlen, "out of memory sizing the tensor-parallel scratch");
        return -1;
    }
    return 0;
}

static int tp_weight_init(stage_tp *st, const stage_weight *full, stage_tp_weight *w, char *err,
                          size_t errlen)
{
    engine_tp *tp = (engine_tp *)st;
    memset(w, 0, sizeof *w);
    w->n = full->rows;
    w->k = full->cols;
    w->n_loc = stage_tp_split(st, w->n, &w->r0);
    const int lld = w->n_loc > 0 ? w->n_loc : 1;
    w->a = malloc((size_t)lld * (size_t)w->k * sizeof(float));
    float *row = malloc((size_t)w->k * sizeof(float) + 4);
    if (!w->a || !row) {
        free(row);
        stage_tp_weight_free(w);
        snprintf(err, errlen, "out of memory for a %d x %d weight slice", w->n_loc, w->k);
        return -1;
    }
    /* rows of the slice only: the rest of the tensor is never read */
    for (int i = 0; i < w->n_loc; i++) {
        stage_weight_row_f32(full, w->r0 + i, row);
        for (int j = 0; j < w->k; j++) w->a[(size_t)j * lld + i] = row[j];
    }
    free(row);
    int mb = ceil_div(w->n, tp->K), zero = 0, info = 0;
    descinit_(w->desc, &w->n, &w->k, &mb, &w->k, &zero, &zero, &tp->ctx, &lld, &info);
    if (info) {
        stage_tp_weight_free(w);
        snprintf(err, errlen, "descinit of a %d x %d weight failed (info %d)", full->rows,
                 full->cols, info);
        return -1;
    }
    return 0;
}

static void tp_matmul(stage_tp *st, const float *x, int x_local, int m, const stage_tp_weight *w,
                      float *y, int y_local)
{
    engine_tp *tp = (engine_tp *)st;
    if (m <= 0 || w->n == 0) return;
    const int K = tp->K, n = w->n, k = w->k;
    int k0, kl = stage_tp_split(st, k, &k0);
    if ((size_t)m * (size_t)(n > k ? n : k) > tp->cap) {
        fprintf(stderr, "stage_tp_matmul: %d x %d exceeds the reserved scratch\n", m,
                n > k ? n : k);
        abort();
    }
    const float *B = x;
    if (!x_local) {
        for (int j = 0; j < m; j++)
            memcpy(tp->xb + (size_t)j * kl, x + (size_t)j * k + k0, (size_t)kl * sizeof(float));
        B = tp->xb;
    }
    float *C = y_local ? y : tp->cb;
    int descb[9], descc[9], info = 0, zero = 0, one = 1;
    int mbk = ceil_div(k, K), mbn = ceil_div(n, K);
    int lldb = kl > 0 ? kl : 1, lldc = w->n_loc > 0 ? w->n_loc : 1;
    descinit_(descb, &k, &m, &mbk, &m, &zero, &zero, &tp->ctx, &lldb, &info);
    if (!info) descinit_(descc, &n, &m, &mbn, &m, &zero, &zero, &tp->ctx, &lldc, &info);
    if (info) {
        fprintf(stderr, "stage_tp_matmul: descinit failed (info %d, m %d n %d k %d)\n", info, m, n,
                k);
        abort();
    }
    const float alpha = 1.0f, beta = 0.0f;
    psgemm_("N", "N", &n, &m, &k, &alpha, w->a, &one, &one, w->desc, B, &one, &one, descb, &beta, C,
            &one, &one, descc);
    st->bytes += (double)k * m * sizeof(float) * (K - 1);
    if (y_local) return;
    /* gather: rank p's [m][n_loc_p] block after rank p-1's, then interleave into rows */
    int total = 0;
    for (int p = 0; p < K; p++) {
        int off, nl = stage_tp_split_of(n, K, p, &off);
        tp->counts[p] = nl * m;
        tp->displs[p] = total;
        total += nl * m;
    }
    MPI_Allgatherv(C, w->n_loc * m, MPI_FLOAT, tp->gb, tp->counts, tp->displs, MPI_FLOAT, tp->comm);
    st->bytes += (double)n * m * sizeof(float) * (K - 1);
    for (int p = 0; p < K; p++) {
        int nl = tp->counts[p] / m;
        const float *src = tp->gb + tp->displs[p];
        for (int j = 0; j < m; j++)
            memcpy(y + (size_t)j * n + (size_t)p * mbn, src + (size_t)j * nl,
                   (size_t)nl * sizeof(float));
    }
}

static void tp_bcast(stage_tp *st, void *buf, size_t len)
{
    engine_tp *tp = (engine_tp *)st;
    MPI_Bcast(buf, (int)len, MPI_BYTE, 0, tp->comm);
}

/* The header goes by a non-blocking broadcast so an idle follower can sleep between polls. */
static void tp_bcast_idle(stage_tp *st, int32_t *hdr, int n)
{
    engine_tp *tp = (engine_tp *)st;
    MPI_Request rq;
    MPI_Ibcast(hdr, n, MPI_INT32_T, 0, tp->comm, &rq);
    if (tp->rank == 0) {
        MPI_Wait(&rq, MPI_STATUS_IGNORE);
        return;
    }
    base_backoff bo; /* a busy stage: the next op is microseconds away; an idle one naps */
    base_backoff_init(&bo, BASE_BACKOFF_DOUBLE, 1999, 1000);
    for (;;) {
        int done = 0;
        MPI_Test(&rq, &done, MPI_STATUS_IGNORE);
        if (done) return;
        base_backoff_wait(&bo);
    }
}

int engine_tp_new(MPI_Comm group, stage_tp **out, char *err, size_t errlen)
{
    *out = NULL;
    engine_tp *tp = calloc(1, sizeof *tp);
    if (!tp) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    MPI_Comm_dup(group, &tp->comm);
    MPI_Comm_size(tp->comm, &tp->K);
    MPI_Comm_rank(tp->comm, &tp->rank);
    tp->counts = malloc((size_t)tp->K * sizeof(int));
    tp->displs = malloc((size_t)tp->K * sizeof(int));
    tp->handle = Csys2blacs_handle(tp->comm);
    tp->ctx = tp->handle;
    Cblacs_gridinit(&tp->ctx, "Row", tp->K, 1);
    int pr, pc, myr, myc;
    Cblacs_gridinfo(tp->ctx, &pr, &pc, &myr, &myc);
    if (!tp->counts || !tp->displs || pr != tp->K || pc != 1 || myr != tp->rank) {
        snprintf(err, errlen,
                 "BLACS grid %d x 1 on the stage's %d ranks failed (got %d x %d, row %d)", tp->K,
                 tp->K, pr, pc, myr);
        engine_tp_free(&tp->ops);
        return -1;
    }
    tp->ops = (stage_tp){.size = tp->K,
                         .rank = tp->rank,
                         .reserve = tp_reserve,
                         .weight_init = tp_weight_init,
                         .matmul = tp_matmul,
                         .bcast = tp_bcast,
                         .bcast_idle = tp_bcast_idle};
    *out = &tp->ops;
    return 0;
}

void engine_tp_free(stage_tp *st)
{
    if (!st) return;
    engine_tp *tp = (engine_tp *)st;
    if (tp->ctx >= 0 && tp->K > 0) Cblacs_gridexit(tp->ctx);
    Cfree_blacs_system_handle(tp->handle);
    MPI_Comm_free(&tp->comm);
    free(tp->xb);
    free(tp->cb);
    free(tp->gb);
    free(tp->counts);
    free(tp->displs);
    free(tp);
}
