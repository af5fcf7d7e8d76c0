/* cli/serve_pipeline.c — the default pipeline side of `modpipe serve`: serve_loop_run
 * (serve/loop.h, the pipeline loop with the request queue as its scheduler). */
#include "serve/loop.h"
#include "cli/serve.h"

int serve_pipeline_run(MPI_Comm comm, const serve_pipeline *p, char *err, size_t errlen)
{
    return serve_loop_run(comm, &p->loop, p->q, p->on_ready, p->ready_arg, err, errlen);
}

int serve_pipeline_run_job(MPI_Comm comm, const serve_pipeline *p, int fd, char *err, size_t errlen)
{
    return serve_loop_run_job(comm, &p->loop, fd, err, errlen);
}
