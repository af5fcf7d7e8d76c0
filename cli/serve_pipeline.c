/* cli/serve_pipeline.c — the default pipeline side of `modpipe serve`: serve_loop_run
 * (serve/loop.h, the pipeline loop with the request queue as its scheduler). */
#include "serve/loop.h"
#include "cli/serve.h"

void serve_pipeline_loop_opts(const serve_pipeline *p, serve_loop_opts *out)
{
    serve_loop_opts o = {
        .model_dir = p->model_dir,
        .cfg = p->cfg,
        .plan = p->plan,
        .slots = p->slots,
        .ctx = p->ctx,
        .kv = p->kv,
        .micro_batch = p->micro_batch,
        .max_in_flight = p->max_in_flight,
        .wire = p->wire,
        .weights_dtype = p->weights_dtype,
        .dense_transport = p->dense_transport,
        .timeout_s = p->timeout_s,
    };
    *out = o;
}

int serve_pipeline_run(MPI_Comm comm, const serve_pipeline *p, char *err, size_t errlen)
{
    serve_loop_opts o;
    serve_pipeline_loop_opts(p, &o);
    return serve_loop_run(comm, &o, p->q, p->on_ready, p->ready_arg, err, errlen);
}

int serve_pipeline_run_job(MPI_Comm comm, const serve_pipeline *p, int fd, char *err, size_t errlen)
{
    serve_loop_opts o;
    serve_pipeline_loop_opts(p, &o);
    return serve_loop_run_job(comm, &o, fd, err, errlen);
}
