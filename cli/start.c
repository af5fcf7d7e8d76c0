/* cli/start.c — see cli/start.h. */
#include "cli/start.h"

#include <mpi.h>

int cli_mpi_start(int cmd, int argc, char **argv, int funneled, void (*usage)(int cmd), cli_opts *o,
                  int *rank, int *size, int *parsed, char *err, size_t errlen)
{
    if (funneled) {
        int prov = 0;
        MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &prov);
    } else {
        MPI_Init(NULL, NULL);
    }
    MPI_Comm_rank(MPI_COMM_WORLD, rank);
    MPI_Comm_size(MPI_COMM_WORLD, size);
    *parsed = cli_opts_parse(o, cmd, argc, argv, err, errlen);
    if (*parsed || !cli_opt_has(o, "help")) return 0;
    if (*rank == 0) usage(cmd);
    cli_opts_free(o);
    MPI_Finalize();
    return 1;
}
