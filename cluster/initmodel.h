/* cluster/initmodel.h — `modpipe init-model`: a random model in the SPEC §3 format.
 *
 * cluster_init_model() draws every tensor from a seeded generator (embedding ~ N(0,1),
 * projections ~ N(0, init_std^2), norms ~ 1 + N(0, 0.05^2), routers ~ N(0, router_std^2 / D)),
 * writes DIR/config.json and the safetensors file(s) in spec->dtype, and — when
 * spec->calibrate — sets each threshold / predictor router's bias so that the share of rows
 * it selects on random prompts is the configured capacity (layer by layer, each on the
 * residual stream the earlier, already calibrated layers produce), then rewrites the model
 * and measures participation on fresh random prompts. Progress goes to `log` (may be NULL).
 * Errors: non-zero + one line in err. DIR is created if missing.
 */
#ifndef CLUSTER_INITMODEL_H
#define CLUSTER_INITMODEL_H

#include <stdio.h>
#include "cluster/modelspec.h"

int cluster_init_model(const cluster_model_spec *spec, const char *dir, FILE *log, char *err,
                       size_t errlen);

#endif
