/* cli/run.h — `modpipe generate` and `modpipe eval`: the batch job (engine/batch.h) over the
 * pipeline, under mpirun (one rank per stage, -np 1 works too).
 *
 * cmd is CLI_GENERATE or CLI_EVAL (cli/opts.h); argv excludes the command name. Calls MPI_Init /
 * MPI_Finalize itself. Every rank parses the same options; the ranks agree on a start-up
 * failure, which the lowest failing rank prints as one line "modpipe CMD: ...". Rank 0 prints
 * the results on stdout. Returns the exit status (0, or 1 on any error).
 */
#ifndef CLI_RUN_H
#define CLI_RUN_H

int cli_run_main(int cmd, int argc, char **argv);

#endif
