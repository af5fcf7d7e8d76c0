/* cli/start.h — the start-up every MPI command shares (generate, eval, serve, router-tune).
 *
 * cli_mpi_start: MPI_Init (MPI_Init_thread with MPI_THREAD_FUNNELED when `funneled`: serve's
 * HTTP threads never call MPI), this rank and the job's size into *rank / *size, argv (without
 * the command name) parsed against cmd's options into *o. --help: `usage(cmd)` on rank 0, o
 * freed, MPI finalized, returns 1 (the command then exits 0). Otherwise returns 0 with *parsed
 * = cli_opts_parse's result (non-zero: one line in err, o needs no cli_opts_free); a parse error
 * is not reported here: the command agrees on it with the other ranks (comm_first_failed)
 * like on any start-up failure. Called once per process, from main's thread.
 */
#ifndef CLI_START_H
#define CLI_START_H

#include <stddef.h>

#include "cli/opts.h"

int cli_mpi_start(int cmd, int argc, char **argv, int funneled, void (*usage)(int cmd), cli_opts *o,
                  int *rank, int *size, int *parsed, char *err, size_t errlen);

#endif
