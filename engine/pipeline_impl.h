/* engine/pipeline_impl.h — the pipeline loop's state (engine/pipeline.h), shared by
 * pipeline.c (the loop) and pipeline_stats.c (its counters). Private to engine/.
 *
 * One engine_loop per rank, owned by the loop (engine_loop_open .. _close); buffers are
 * allocated at open, never per token. Not thread-safe: the loop's thread only.
 */
#ifndef ENGINE_PIPELINE_IMPL_H
#define ENGINE_PIPELINE_IMPL_H

#include <mpi.h>
#include <stdint.h>

#include "engine/pipeline.h"
#include "engine/stats.h"
#include "comm/comm.h"
#include "comm/link.h"
#include "stage/stage.h"
#include "stage/tp.h"

struct engine_loop {
    engine_loop_opts o; /* copy; pointers inside stay the caller's */
    const engine_sched_ops *ops;
    void *self;
    MPI_Comm comm;     /* the stage leaders (rank = stage); MPI_COMM_NULL on a follower */
    int rank, S, head; /* rank: this stage; head: stage S-1 */
    /* tensor-parallel stages (engine/topo.h): all MPI_COMM_NULL / NULL / 0 without */
    MPI_Comm world;          /* the caller's communicator: every rank of the job */
    MPI_Comm group, leaders; /* this stage's ranks; the leaders (owned, freed at close) */
    stage_tp *tp;            /* this stage's BLACS grid (K > 1) */
    int follower;            /* 1: not the group leader: repeats its leader's stage ops */
    int D, V, R;             /* width, vocab, max rows of a micro-batch */
    stage_model *m;
    stage_state *st;
    comm_links *links;
    comm_unpacker *unp;
    size_t pkt_max;

    stage_batch d;       /* the micro-batch being processed (cap R) */
    float *x;            /* [R][D] residual rows of the micro-batch */
    uint8_t *present;    /* [R] rows this stage holds */
    int *dest;           /* [R] next stage of each row, -1: journey ends */
    uint8_t *masks;      /* [S][mask_bytes(R)] per-destination present masks */
    comm_bypass *byp_in; /* [S*S] announced bypass packets (to >= this stage) */
    int n_byp_in;
    comm_bypass *byp_out; /* [S*S] */

    uint8_t *rbuf[2]; /* [pkt_max] chain receive, double-buffered */
    MPI_Request rreq[2];
    uint8_t *bbuf; /* [pkt_max] bypass receive */
    uint8_t *tbuf; /* [pkt_max] tokens receive (stage 0) */
    MPI_Request treq;

    /* head */
    int *lrows;    /* [R] rows needing logits */
    int *srows;    /* [R] rows sampled */
    int32_t *ltok; /* [R] sampled tokens, by srows */
    float *logits; /* [R][V] */
    void *scratch; /* [2V] sampling */
    float *dump;   /* [dump_seqs][dump_len][V] */
    double nll_sum;
    long nll_count;

    /* stage 0 */
    stage_batch *fl; /* [max_in_flight] FIFO of issued micro-batches (cap R) */
    int fl_head, fl_n;
    int32_t *tok_by_row; /* [R] */
    uint64_t next_mb;
    long tokens_done, mb_done;
    double t_tokens; /* last time a micro-batch came back (timeout) */
    int finished;

    /* link reports (serve): rank s > 0 -> 0, rep_len uint64 each */
    int rep_len;                 /* S x engine_link_report + engine_report_tail, in uint64s */
    uint64_t *rep_in;            /* rank 0: [S][rep_len] receive buffers */
    uint64_t *rep_tab;           /* rank 0: [S][rep_len] latest report of each rank */
    MPI_Request *rep_req;        /* rank 0: [S] */
    uint64_t rep_packets;        /* ranks > 0: packets counted at the last report */
    double rep_t;                /* last report sent (ranks > 0) / handed to ops->links (0) */
    engine_link_bytes *lb;       /* rank 0: [S*S] */
    engine_kv_report *kvr;       /* rank 0: [S] */
    engine_stage_progress *prog; /* rank 0: [S] */
    double *rep_at;              /* rank 0: [S] when each stage's last report came (0: none) */
    int *leader;                 /* rank 0: [S] the job's rank leading each stage */
    uint64_t mb_passed;          /* ranks > 0: micro-batches finished and handed on */

    /* accounting */
    double dense_rows; /* rows a dense pipeline sends on link rank -> rank+1 */
    double busy_s;
    double t_start, t_last_progress;
};

/* This rank's record (engine/stats.h): links [S], layers [n_layers] (zero off the stage). */
void engine_loop_stats_fill(engine_loop *c, engine_rank_stat *r, engine_link_stat *links,
                            engine_layer_stat *layers);
/* Rank 0: the gathered records `all` as --stats JSON (o.stats_path) and the summary in res. */
void engine_loop_report(engine_loop *c, const engine_stats *all, double seconds,
                        engine_loop_result *res);

#endif
