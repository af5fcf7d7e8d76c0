/* cli/routertune_out.h — the output directory of `modpipe router-tune` (cli/routertune.h
 * "Output"): config.json with the routed layers as mindskip and the "router_tuning" record,
 * routers.safetensors (F32 weight [1, D] and bias [1] per routed layer), an index mapping the
 * routers to it and every original tensor to its original file by relative path (nothing
 * copied), and copies of the tokenizer files.
 *
 * Rank 0 only; no MPI. Errors: -1 with one line in err (an existing model.safetensors in
 * out, unreadable source, a failed write). w: [n_routed][D], b: [n_routed] (double; written
 * as f32).
 */
#ifndef CLI_ROUTERTUNE_OUT_H
#define CLI_ROUTERTUNE_OUT_H

#include <cJSON.h>
#include <stddef.h>

#include "stage/config.h"

typedef struct {
    const char *model, *out;
    const int *layers;
    int n_routed, D;
    stage_granularity gran;
    double threshold;
    cJSON *record; /* "router_tuning" object (referenced: the caller frees it) */
} rt_out;

int cli_rt_write_output(const rt_out *o, const double *w, const double *b, char *err,
                        size_t errlen);

#endif
