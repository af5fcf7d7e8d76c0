/* cluster/partition.h — layers -> pipeline stages (SPEC §4, issue 3).
 *
 * A plan is S contiguous, non-empty layer ranges covering 0..n_layers-1. Stage 0 also owns
 * the embedding, the last stage (the head) owns model.norm + lm_head.
 *
 * Cost model (expected FLOPs per token, f32 weight bytes): attention and MLP projections,
 * a routed layer (mod, mode_staged) times its capacity, experts times experts_per_token
 * (integrated: the expected share of real experts E/(E+N_noop)), mindskip attention at full
 * cost (its skip rate is not known ahead), embedding by size (a lookup: memory, no compute),
 * the LM head by size (2*D*vocab per token).
 *
 * cluster_partition_auto: minimises the most expensive stage; among plans within 10% of
 * that optimum it prefers the one with the most boundaries that can carry fewer rows than
 * dense (the next stage starts with, and only has, routed layers), then lower memory spread.
 * cluster_partition_explicit: ranges like "0-3", "4" (one layer), validated: parseable,
 * in range, contiguous, covering all layers, non-empty; the count must equal n_stages.
 *
 * Errors: non-zero + one line in err ("stages: 2 ranges given but the job has 3 ranks", ...).
 * Ownership: plan->st is malloc'd; cluster_plan_free(NULL-safe).
 */
#ifndef CLUSTER_PARTITION_H
#define CLUSTER_PARTITION_H

#include <stdio.h>
#include "stage/config.h"

typedef struct {
    int first, last;        /* inclusive layer range */
    int ranks;              /* MPI ranks of this stage (tensor-parallel group, cluster/topo.h);
                               0 or 1: one rank */
    double cost;            /* expected FLOPs per token of this stage */
    double compute_share;   /* cost / total cost */
    size_t weight_bytes;    /* f32 bytes of this stage's weights (incl. embedding / head) */
    int sparse_in;          /* 1: the boundary into this stage can carry fewer rows than dense */
    char why[200];          /* for sparse_in == 0 (stage > 0): the reason, e.g.
                               "stage 2 has dense layers: every row must reach it" */
} cluster_stage_plan;

typedef struct {
    int n_stages;
    cluster_stage_plan *st; /* [n_stages] */
} cluster_plan;

int cluster_partition_auto(const stage_config *cfg, int n_stages, cluster_plan *plan,
                           char *err, size_t errlen);
int cluster_partition_explicit(const stage_config *cfg, const char *const *ranges, int n_ranges,
                               int n_stages, cluster_plan *plan, char *err, size_t errlen);
/* The human-readable table `modpipe partition` prints. */
void cluster_plan_print(const stage_config *cfg, const cluster_plan *plan, FILE *out);
void cluster_plan_free(cluster_plan *plan);

/* Expected FLOPs per token of one layer under the cost model above (used by stats too). */
double cluster_layer_cost(const stage_config *cfg, int layer);
size_t cluster_layer_weight_bytes(const stage_config *cfg, int layer);

#endif
