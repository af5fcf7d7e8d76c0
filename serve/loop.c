/* serve/loop.c — see serve_loop.h. */
#include "serve/loop.h"

#include <stdio.h>
#include <string.h>

#include "engine/pipeline.h"
#include "serve/queue_sched.h"

static int needs_whole_prompts(const stage_config *c, int *topk)
{
    int whole = 0;
    *topk = 0;
    for (int l = 0; l < c->n_layers; l++) {
        stage_kind k = c->layer_kind[l];
        if (k == STAGE_KIND_MINDSKIP && c->ms_granularity == STAGE_GRAN_SEQUENCE) whole = 1;
        if (stage_kind_is_routed(k) && c->mod_routing == STAGE_ROUTING_TOPK) *topk = 1;
    }
    return whole;
}

int serve_loop_rows(const serve_loop_opts *o, int *whole)
{
    int topk = 0;
    *whole = needs_whole_prompts(o->pipe.cfg, &topk);
    return *whole && o->ctx > o->pipe.micro_batch ? o->ctx : o->pipe.micro_batch;
}

int serve_loop_run(MPI_Comm comm, const serve_loop_opts *o, srvq *q, void (*ready)(void *),
                   void *arg, char *err, size_t errlen)
{
    int rank;
    MPI_Comm_rank(comm, &rank);
    int whole, max_rows = serve_loop_rows(o, &whole);
    const char *bad = NULL;
    char why[256] = "";
    srvq_stats st;
    if (rank == 0) {
        if (!q)
            bad = "rank 0 needs the request queue";
        else {
            srvq_get_stats(q, &st);
            if (st.slots != o->slots) {
                snprintf(why, sizeof why, "the queue has %d slots, the pipeline %d", st.slots,
                         o->slots);
                bad = why;
            } else if (srvq_sched_config(q, o->pipe.micro_batch, whole, max_rows)) {
                bad = "out of memory";
            } else {
                srvq_sched_groups(q,
                                  o->decode_groups > 0 ? o->decode_groups : o->pipe.plan->n_stages);
            }
        }
    }
    int rc = serve_loop_run_ops(comm, o, bad, &srvq_sched_ops, q, ready, arg, err, errlen);
    if (rc && rank == 0 && q) srvq_fail_all(q, err);
    return rc;
}

int serve_loop_run_ops(MPI_Comm comm, const serve_loop_opts *o, const char *bad0,
                       const engine_sched_ops *ops, void *self, void (*ready)(void *), void *arg,
                       char *err, size_t errlen)
{
    int rank;
    MPI_Comm_rank(comm, &rank);
    int topk = 0, whole;
    needs_whole_prompts(o->pipe.cfg, &topk);
    int max_rows = serve_loop_rows(o, &whole);
    /* every rank checks the same options: the errors agree */
    const char *bad = bad0;
    char why[256] = "";
    if (!bad && topk)
        bad = "the model uses topk routing, which is non-causal: it cannot decode token by token";
    else if (!bad &&
             (o->slots < 1 || o->ctx < 2 || o->pipe.micro_batch < 1 || o->pipe.max_in_flight < 1)) {
        snprintf(why, sizeof why,
                 "slots %d, ctx %d, micro-batch %d, max-in-flight %d: slots, "
                 "micro-batch and max-in-flight must be >= 1, ctx >= 2",
                 o->slots, o->ctx, o->pipe.micro_batch, o->pipe.max_in_flight);
        bad = why;
    }
    engine_loop_opts lo = {
        .pipe = o->pipe,
        .slots = o->slots,
        .ctx = o->ctx,
        .max_rows = max_rows,
        .serve = 1,
        .command = "serve",
        .progress_tokens = 1,
    };
    lo.pipe.progress = 0; /* a server logs requests, not a batch job's progress lines */
    engine_loop *L = NULL;
    int rc;
    if (bad) {
        /* still collective: the other ranks must not wait in engine_loop_open */
        int one = 1, any = 0;
        MPI_Allreduce(&one, &any, 1, MPI_INT, MPI_MAX, comm);
        snprintf(err, errlen, "%s", bad);
        rc = rank == 0 ? -1 : -2;
    } else {
        int zero = 0, any = 0;
        MPI_Allreduce(&zero, &any, 1, MPI_INT, MPI_MAX, comm);
        if (any) {
            snprintf(err, errlen, "another rank failed to start");
            rc = -2;
        } else {
            rc = engine_loop_open(comm, &lo, ops, self, &L, err, errlen);
        }
    }
    if (rc) return rc;
    if (rank == 0 && ready) ready(arg);
    while (engine_loop_step(L)) {}
    return engine_loop_close(L, NULL, err, errlen);
}
