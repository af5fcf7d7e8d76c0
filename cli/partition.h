/* cli/partition.h — `modpipe partition`: print the stage plan (engine/partition.h) for -n N
 * stages, with its memory per stage; no MPI. argv excludes the command name. Errors: one line
 * "modpipe partition: ..." on stderr. Returns the exit status (0, or 1 on any error).
 */
#ifndef CLI_PARTITION_H
#define CLI_PARTITION_H

int cli_partition_main(int argc, char **argv);

#endif
