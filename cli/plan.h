/* cli/plan.h — the options every pipeline command shares, read once from the option table
 * (cli/opts.h): the stage plan (--stages, --tp, --mem-per-rank) and how the pipeline runs
 * (--micro-batch, --max-in-flight, --timeout, --threads, --wire-dtype, --weights-dtype,
 * --transport, --kv-page, --kv-mem). generate, eval, serve and partition read them through these functions, so an
 * option means the same in each.
 *
 * Errors: non-zero + one line in err naming the option where it came from ("--tp: ...",
 * "f.yaml:3:9: stages: ..."). No MPI.
 */
#ifndef CLI_PLAN_H
#define CLI_PLAN_H

#include <stddef.h>

#include "cli/opts.h"
#include "engine/partition.h"
#include "engine/pipeline.h"
#include "stage/config.h"
#include "stage/dtype.h"
#include "stage/stage.h"

/* Reads the options above into p's option fields (micro_batch, max_in_flight: 0 when absent,
 * the caller uses 2 x stages; timeout_s, wire, weights_dtype, dense_transport, progress, kv)
 * and starts the compute threads (--threads, stage_threads_init). model_dir, cfg and plan are
 * the caller's: left as they are. */
int cli_pipe_opts_read(const cli_opts *o, engine_pipe_opts *p, char *err, size_t errlen);

/* --mem-per-rank (0 when absent) and the checkpoint's dtype for memory planning; the caller
 * fills slots, ctx and micro_batch. */
int cli_mem_opts(const cli_opts *o, const char *model, engine_mem_opts *m, char *err,
                 size_t errlen);

/* The plan from --stages (explicit ranges or auto) and the ranks of each stage (--tp K, or per
 * stage: "0-2:2" on the command line, {layers: "0-2", ranks: 2} in YAML, which the YAML reader
 * hands over as "layers=0-2 ranks=2"). part_n > 0 (partition -n N): N stages of K ranks; else
 * the stages come from the job's `world` ranks: world / K, or one per range when the ranges
 * give their own ranks (a stage without one gets K). mem: --mem-per-rank planning (NULL: none);
 * it plans each stage as if it were one rank (a K-rank stage needs ~1/K). */
int cli_make_plan(const cli_opts *o, const stage_config *cfg, int world, int part_n,
                  const engine_mem_opts *mem, engine_plan *plan, char *err, size_t errlen);

#endif
