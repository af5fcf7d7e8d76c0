/* stage/matmul.h — y = x W^T with W in its checkpoint dtype (interim: convert + sgemm;
 * the dispatching kernels replace this file). */
#ifndef STAGE_MATMUL_H
#define STAGE_MATMUL_H

#include "stage/dtype.h"

/* y [m][w->rows] = x [m][w->cols] · W^T. m == 0 is a no-op. */
void stage_matmul_w(const float *x, int m, const stage_weight *w, float *y);

#endif
