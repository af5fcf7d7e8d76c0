/* stage/tp.c — the MPI-free part of a tensor-parallel stage: the feature split and the
 * weight slices' memory. See stage/tp.h; the operations are engine/tp.c's. */
#include "stage/tp.h"

#include <stdlib.h>

int stage_tp_split_of(int n, int K, int p, int *off)
{
    const int mb = (n + K - 1) / K;
    *off = p * mb;
    const int left = n - p * mb;
    return left < 0 ? 0 : left < mb ? left : mb;
}

void stage_tp_weight_free(stage_tp_weight *w)
{
    if (!w) return;
    free(w->a);
    w->a = NULL;
}
