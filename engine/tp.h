/* engine/tp.h — the tensor-parallel operations of a stage spread over a group of ranks
 * (stage/tp.h: the interface the layer math calls), built on ScaLAPACK (BLACS + PBLAS psgemm)
 * and MPI on the group's communicator. docs/SPEC.md §5.
 *
 * engine_tp_new is collective over `group` (every rank of it); it dups the communicator and
 * builds a K x 1 BLACS grid on it. Returns 0 and *out, or non-zero with one line in err.
 * engine_tp_free (NULL: no-op) after every stage model that uses it is freed.
 * Threads: the stage's one thread.
 */
#ifndef ENGINE_TP_H
#define ENGINE_TP_H

#include <mpi.h>
#include <stddef.h>

#include "stage/tp.h"

int engine_tp_new(MPI_Comm group, stage_tp **out, char *err, size_t errlen);
void engine_tp_free(stage_tp *tp);

#endif
