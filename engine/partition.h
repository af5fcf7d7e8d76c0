/* engine/partition.h — layers -> pipeline stages (docs/SPEC.md §4).
 *
 * A plan is S contiguous, non-empty layer ranges covering 0..n_layers-1. Stage 0 also owns
 * the embedding, the last stage (the head) owns model.norm + lm_head.
 *
 * Cost model (expected FLOPs per token, weight bytes in the checkpoint dtype): attention and MLP projections,
 * a routed layer (mod, mode_staged) times its capacity, experts times experts_per_token
 * (integrated: the expected share of real experts E/(E+N_noop)), mindskip attention at full
 * cost (its skip rate is not known ahead), embedding by size (a lookup: memory, no compute),
 * the LM head by size (2*D*vocab per token).
 *
 * engine_partition_auto: minimises the most expensive stage; among plans within 10% of
 * that optimum it prefers the one with the most boundaries that can carry fewer rows than
 * dense (the next stage starts with, and only has, routed layers), then lower memory spread.
 * engine_partition_explicit: ranges like "0-3", "4" (one layer), validated: parseable,
 * in range, contiguous, covering all layers, non-empty; the count must equal n_stages.
 *
 * Memory (engine_mem_opts, the *_mem variants): each stage's weights in the checkpoint
 * dtype (weight_dtype; the plain variants assume f32), the KV pages it is expected to hold
 * for `slots` sequences of `ctx` positions (f32 K and V; attention layers every position,
 * routed layers about 1.25 x capacity of them + 8: threshold routing may keep more; without
 * --kv-mem the pool gets what --mem-per-rank leaves, docs/SPEC.md §11), and a workspace
 * estimate (the stage's per-micro-batch buffers for
 * `micro_batch` rows, the head's logits, the routers of every routed layer, which each stage
 * loads as f32, and ENGINE_RUNTIME_BYTES for MPI / BLAS / libc). With mem_per_rank > 0 the
 * auto partitioner only considers stages that fit (else: "no split ... fits", naming what the
 * best plan needs), and an explicit plan whose stage does not fit is refused, naming it.
 *
 * Errors: non-zero + one line in err ("stages: 2 ranges given but the job has 3 ranks", ...).
 * Ownership: plan->st is malloc'd; engine_plan_free(NULL-safe).
 */
#ifndef ENGINE_PARTITION_H
#define ENGINE_PARTITION_H

#include <stdio.h>
#include "stage/config.h"
#include "stage/dtype.h"

/* MPI, OpenBLAS and libc resident memory of a rank beyond its own buffers (an estimate). */
#define ENGINE_RUNTIME_BYTES ((size_t)40 << 20)

typedef struct {
    stage_dtype weight_dtype; /* dtype the weight matrices are held in (checkpoint's or
                                 --weights-dtype, q8_0 included) */
    size_t mem_per_rank;      /* bytes a rank may use; 0: no limit */
    int slots;                /* sequences with a KV cache */
    int ctx;                  /* positions per sequence (prompt + new tokens) */
    int micro_batch;          /* rows per micro-batch */
    stage_dtype keep_dtype;   /* weight_dtype q8_0: the dtype the embedding and the MoE gate
                                 keep (the checkpoint's, docs/SPEC.md §9); else unused */
} engine_mem_opts;

typedef struct {
    int first, last;      /* inclusive layer range */
    int ranks;            /* MPI ranks of this stage (tensor-parallel group, engine/topo.h);
                               0 or 1: one rank */
    double cost;          /* expected FLOPs per token of this stage */
    double compute_share; /* cost / total cost */
    size_t weight_bytes;  /* bytes of this stage's weights in the checkpoint dtype (incl.
                               embedding / head) */
    size_t kv_bytes;      /* _mem variants: KV cache as reserved at start */
    size_t work_bytes;    /* _mem variants: workspace estimate (see above) */
    size_t mem_bytes;     /* weight_bytes + kv_bytes + work_bytes */
    int sparse_in;        /* 1: the boundary into this stage can carry fewer rows than dense */
    char why[200];        /* for sparse_in == 0 (stage > 0): the reason, e.g.
                               "stage 2 has dense layers: every row must reach it" */
} engine_stage_plan;

typedef struct {
    int n_stages;
    engine_stage_plan *st; /* [n_stages] */
    int have_mem;          /* made by a _mem variant: mem / kv / work filled */
    engine_mem_opts mem;   /* what it was made with (weight_dtype f32 otherwise) */
} engine_plan;

int engine_partition_auto(const stage_config *cfg, int n_stages, engine_plan *plan, char *err,
                          size_t errlen);
int engine_partition_explicit(const stage_config *cfg, const char *const *ranges, int n_ranges,
                              int n_stages, engine_plan *plan, char *err, size_t errlen);
/* The same with memory planning (mem may be NULL: as the plain variants). */
int engine_partition_auto_mem(const stage_config *cfg, int n_stages, const engine_mem_opts *mem,
                              engine_plan *plan, char *err, size_t errlen);
int engine_partition_explicit_mem(const stage_config *cfg, const char *const *ranges, int n_ranges,
                                  int n_stages, const engine_mem_opts *mem, engine_plan *plan,
                                  char *err, size_t errlen);
/* The checkpoint dtype of the model in `dir`, from its safetensors headers (the dtype of
 * layer 0's q_proj, else of the embedding): what is in the files, whatever config.json's
 * torch_dtype says. 0, or -1 with the loader's message. */
int engine_weight_dtype(const char *dir, stage_dtype *out, char *err, size_t errlen);
/* The dtype of the embedding in `dir`: what q8_0 weights keep it (and the MoE gate) in. */
int engine_keep_dtype(const char *dir, stage_dtype *out, char *err, size_t errlen);
/* "6G", "5000M", "512k", "1.5GiB", plain bytes: K/M/G/T are powers of 1024. 0 or -1. */
int engine_parse_size(const char *s, size_t *out);
/* The human-readable table `modpipe partition` prints. */
void engine_plan_print(const stage_config *cfg, const engine_plan *plan, FILE *out);
void engine_plan_free(engine_plan *plan);

/* Expected FLOPs per token of one layer under the cost model above (used by stats too). */
double engine_layer_cost(const stage_config *cfg, int layer);
/* Bytes of layer `layer`'s own tensors: matrices in wd, the MoE gate in kd (wd q8_0: the
 * checkpoint's dtype; else pass wd), vectors f32. */
size_t engine_layer_weight_bytes(const stage_config *cfg, int layer, stage_dtype wd,
                                 stage_dtype kd);

#endif
