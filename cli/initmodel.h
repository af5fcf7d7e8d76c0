/* cli/initmodel.h — `modpipe init-model`: a random model in the docs/SPEC.md §3 format.
 *
 * cli_init_model() draws every tensor from one seeded generator in file order
 * (embedding ~ N(0,1), projections ~ N(0, init_std^2), norms ~ 1 + N(0, 0.05^2), routers ~
 * N(0, router_std^2 / D)) and streams it to DIR in spec->dtype (st_stream: model.safetensors
 * or spec->shards shards + index) chunk by chunk, so memory stays a few MiB whatever the
 * model's size; then it writes DIR/config.json. Progress (bytes written / total, MB/s, ETA)
 * goes to `log` (may be NULL): in place on a terminal, else a line every 5 s and a last one.
 *
 * With spec->calibrate, each threshold / predictor router's bias is then set so that the
 * share of rows it selects on random prompts is the configured capacity: the written model is
 * run one layer at a time (each layer loaded alone from the files, on the residual stream the
 * earlier, already calibrated layers produced), and each new bias is patched into its file in
 * place (st_patch_f32); a second pass on fresh prompts measures participation (logged). Peak
 * memory: one layer's weights as the loader holds them, plus the calibration batch.
 *
 * Errors: non-zero + one line in err (a partly written model's weight files are removed).
 * DIR is created if missing.
 */
#ifndef CLI_INITMODEL_H
#define CLI_INITMODEL_H

#include <stdio.h>
#include "cli/modelspec.h"

int cli_init_model(const cli_model_spec *spec, const char *dir, FILE *log, char *err,
                   size_t errlen);

/* `modpipe init-model --spec F.yaml --out DIR [options]` (argv excludes the command name): the
 * options override the spec's; errors print one line "modpipe init-model: ...". No MPI.
 * Returns the exit status (0, or 1 on any error). */
int cli_init_model_main(int argc, char **argv);

#endif
