/* stage/stage.h — the model math of one pipeline stage (docs/SPEC.md §2).
 *
 * A stage owns a contiguous layer range [first, last] of a model, plus the embedding when
 * it is stage 0 and model.norm + lm_head when it is the head. Router (and predictor) weights
 * of *every* routed layer are loaded on every stage: they are small, and the stage holding a
 * row must decide which later stages will compute on it (docs/SPEC.md §4).
 *
 * Work comes as micro-batches (stage_batch, stage/batch.h): n rows, each (slot, pos, token,
 * flags; the stage reads only these four columns). The
 * caller keeps the residual stream x [n][D] and a present[n] mask (which rows this stage
 * holds). stage_forward runs the stage's layers on the present rows; each layer computes on
 * the compacted set of rows it selects, always in micro-batch order, so a layer's GEMMs see
 * exactly the same rows whatever stage split the run uses — which is what makes an N-rank run
 * bit-identical to a 1-rank run.
 *
 * KV cache: paged (docs/SPEC.md §11). Per attention layer and sequence slot, only the
 * positions that layer attended with (routed / kept rows), in position order, at most `ctx`
 * (max_seq) of them, in pages of `page` positions taken from one pool per stage with a byte
 * budget: a layer takes a page only when one of its kept rows starts one. The pool is
 * allocated by stage_state_init(_kv): nothing grows at run time; a row past the slot's ctx,
 * or one that needs a page when the pool has none, is an error. A prompt row at position 0
 * resets its slot on every layer of the stage (stage_state_slot_reset: a new sequence);
 * stage_state_slot_release ends a sequence — rows for that slot are then rejected until a
 * reset (a position-0 prompt row or an explicit reset). At init every slot is empty and usable.
 *
 * Ownership: stage_model owns its weights: the weight matrices stay in their checkpoint
 * dtype inside the mmap'd st_model (no f32 copies; stage_model_load_dtype may convert at
 * load), norms and router vectors (tiny) are f32;
 * stage_state owns caches and workspace sized at init (no allocation per token).
 * Errors: non-zero return + one line in err (missing tensor, shape mismatch, a row the
 * workspace cannot hold, a top-k model asked to decode, ...). *_free(NULL) is a no-op.
 */
#ifndef STAGE_STAGE_H
#define STAGE_STAGE_H

#include <stddef.h>
#include <stdint.h>

#include "stage/batch.h"
#include "stage/config.h"
#include "stage/dtype.h"

/* KV caches hold K and V in this dtype. */
#define STAGE_KV_DTYPE STAGE_F32

typedef struct stage_model stage_model;
typedef struct stage_state stage_state;
typedef struct stage_tp stage_tp; /* stage/tp.h */

typedef struct {
    int first, last; /* inclusive layer range (first > last: no layers) */
    int embed;       /* load model.embed_tokens (stage 0) */
    int head;        /* load model.norm + lm_head (last stage) */
} stage_range;

/* ---- model ----------------------------------------------------------------------------------- */
int stage_model_load(const char *dir, const stage_config *cfg, stage_range range, stage_model **out,
                     char *err, size_t errlen);
/* The same with the weight matrices held in dtype `weights_dtype` (a stage_dtype; -1: as
 * stored). Converting at load (e.g. an f32 checkpoint to bf16) makes an owned copy in that
 * dtype; as stored they are zero-copy views of the mmap'd safetensors. STAGE_Q8_0 quantizes
 * every weight matrix at load, row by row (docs/SPEC.md §9), except the embedding and the MoE
 * gate, which keep their dtype (norms and routers are f32 always); a matrix with a non-finite
 * value is an error. */
/* 1 when q8_0 weights quantize the tensor of this name: the projections of attention, MLP and
 * experts (model.layers.*_proj.weight, *.w1/w2/w3.weight) and lm_head.weight; not the
 * embedding, the MoE gate (a router), norms, routers and predictors (docs/SPEC.md §9). */
int stage_q8_quantizes(const char *name);
int stage_model_load_dtype(const char *dir, const stage_config *cfg, stage_range range,
                           int weights_dtype, stage_model **out, char *err, size_t errlen);
/* A stage spread over a tensor-parallel group (stage/tp.h; tp NULL or of one rank: exactly
 * stage_model_load_dtype). Every rank of the group loads with the same range, except that
 * only the group leader (rank 0) gets range.embed. Each rank holds its row slice of every
 * big matrix (q/k/v/o, gate/up/down, experts, lm_head) as f32 — 1/K of them; the embedding
 * (a lookup, leader only), norms, routers, predictors and the MoE gate (small) whole.
 * weights_dtype applies to the embedding only then (psgemm multiplies f32; STAGE_Q8_0 with K > 1
 * is an error). num_attention_heads
 * and num_key_value_heads must be multiples of K (error otherwise). tp is not owned. */
int stage_model_load_tp(const char *dir, const stage_config *cfg, stage_range range,
                        int weights_dtype, stage_tp *tp, stage_model **out, char *err,
                        size_t errlen);
void stage_model_free(stage_model *m);
const stage_config *stage_model_config(const stage_model *m);
stage_range stage_model_range(const stage_model *m);
size_t stage_model_weight_bytes(const stage_model *m); /* bytes this stage holds, in their dtypes */
/* Of those, the bytes copied to 2 MiB pages (stage_wmem_set_huge, stage/wmem.h) and how many
 * of them the kernel holds on huge pages now (*backed); 0 when the weights are read in place. */
size_t stage_model_huge_bytes(const stage_model *m, size_t *backed);

/* x [n][D] = embedding rows of tokens (stage 0 only). Tokens must be in [0, vocab). */
int stage_embed(const stage_model *m, const int32_t *tokens, int n, float *x, char *err,
                size_t errlen);

/* Does any layer in [first, last] compute on a row whose residual is x [D]? Dense, mindskip
 * and mode_integrated layers need every row; with topk routing every row is needed; a
 * threshold / predictor routed layer needs it iff its router selects x (evaluated in order:
 * while no routed layer selects the row its x does not change). */
int stage_range_needs_row(const stage_model *m, int first, int last, const float *x);

/* Causal router decision of routed layer l on x [D] (threshold / predictor), and the score
 * r = w.x + b that scales the block's output. */
int stage_router_selects(const stage_model *m, int layer, const float *x);
float stage_router_score(const stage_model *m, int layer, const float *x);

/* Router calibration (init-model): the logit the threshold is applied to (r for threshold
 * routing, the predictor's pre-sigmoid output for predictor routing), and a shift of the
 * bias behind it (router.bias or router_predictor.fc2.bias). */
float stage_router_logit(const stage_model *m, int layer, const float *x);
void stage_router_shift(stage_model *m, int layer, float delta);
float stage_router_bias(const stage_model *m, int layer);

/* ---- per-stage state: KV caches, workspace, stats -------------------------------------------- */
/* n_slots: sequence slots; max_rows: the most rows a micro-batch will have; max_seq: positions
 * per slot (ctx: prompt + new tokens of the longest sequence). */
stage_state *stage_state_init(const stage_model *m, int n_slots, int max_rows, int max_seq,
                              char *err, size_t errlen);
/* KV pool options (docs/SPEC.md §11). page: positions per page (0: 16). mem_bytes: the pool's
 * budget on this rank (0: room for every position of every slot on every layer, the most
 * the cache can use); a budget above that is cut to it, one below a page is an error. */
typedef struct {
    int page;
    size_t mem_bytes;
    int holders; /* sequences after the n_slots ones that only hold cached prefixes (serve,
                  * docs/SPEC.md §11): ids n_slots .. n_slots + holders - 1 for shares and
                  * releases, never for rows; they do not enlarge the default pool */
} stage_kv_opts;
/* stage_state_init with KV pool options (NULL: the defaults). */
stage_state *stage_state_init_kv(const stage_model *m, int n_slots, int max_rows, int max_seq,
                                 const stage_kv_opts *kv, char *err, size_t errlen);
void stage_state_free(stage_state *s);

int stage_state_slots(const stage_state *s);
int stage_state_ctx(const stage_state *s);
/* Empty `slot` on every layer of the stage (a new sequence starts there). */
void stage_state_slot_reset(stage_state *s, int slot);
/* The slot's sequence is over: empty it and reject rows for it until the next reset. */
void stage_state_slot_release(stage_state *s, int slot);
/* Soft mode (the server, docs/SPEC.md §11 "running out"): a row that needs a page when the pool
 * has none does not fail the micro-batch; its slot's sequence is lost on this stage instead —
 * every page it holds here goes back, its rows (in this and later micro-batches) are computed
 * on without attention and add nothing to the cache, until the slot's next reset or release.
 * A row whose flags carry STAGE_ROW_KV_LOST (lost on an earlier stage) loses its slot here
 * too. The caller marks the rows of lost slots STAGE_ROW_KV_LOST before passing them on, and
 * the head answers a lost SAMPLE row with no token; the scheduler recomputes the sequence.
 * Every rank of a tensor-parallel group must set the same mode. Off by default (an error). */
void stage_state_kv_soft(stage_state *s, int on);
/* 1 when slot's sequence was lost on this stage (soft mode) and not reset since. */
int stage_state_slot_lost(const stage_state *s, int slot);
/* Positions the slot holds on this stage (last cached position + 1, 0 when empty). */
int stage_state_slot_len(const stage_state *s, int slot);
/* Sliding windows: positions before `pos` of `slot` are no longer needed on `layer` (one of
 * the stage's layers): the pages holding only such positions go back to the pool (never the
 * page the next entry goes to). Attention then starts at the first entry still held. Returns
 * the pages freed (0 for a layer / slot out of range). */
int stage_state_slot_drop_before(stage_state *s, int layer, int slot, int pos);

/* Prefix reuse (docs/SPEC.md §11): slot dst's sequence becomes the positions < pos of slot
 * src's, on every layer of the stage, without computing them: each layer's entries before pos
 * are shared page by page (the partial last page copied), so both read the same K/V and go on
 * appending independently; src is unchanged. dst is reset first; its next row has position
 * >= pos. Meant for causal routing only (a layer's kept rows of a prefix must not depend on
 * what follows it: threshold / predictor MoD, token MindSkip, dense). Returns 0, or -1 (out
 * of range, src released / lost / with dropped positions, or no page for a copy: dst is then
 * empty, and lost in soft mode so that its rows are recomputed, not run on an empty cache).
 * A sliding-window layer shares from the first entry src still holds, which must be at or
 * before the first one a row at pos sees.
 * src == dst **parks** src (pos unused): its sequence is over and no row will come for it,
 * but its pages stay for later shares from it (the cache of finished prefixes); they count
 * as cached in stage_state_kv_stats until the slot's next reset or release. Parking a
 * released or lost slot does nothing (-1). */
int stage_state_slot_share(stage_state *s, int src, int dst, int pos);

/* Run the stage's layers on the present rows of x [b->n][D] (present [b->n] 0/1), in place. */
int stage_forward(stage_state *s, const stage_batch *b, float *x, const uint8_t *present, char *err,
                  size_t errlen);
/* The same for a sub-range [first, last] of the stage's layers (router calibration). The slot
 * reset of position-0 prompt rows happens only when first is the stage's first layer. */
int stage_forward_range(stage_state *s, const stage_batch *b, float *x, const uint8_t *present,
                        int first, int last, char *err, size_t errlen);
/* Called between layers (MPI progress polling while sends are in flight). */
void stage_state_set_progress(stage_state *s, void (*fn)(void *), void *arg);

/* Head: logits [n_rows][vocab] of rows `rows` [n_rows] of x [*][D] (final norm + lm_head),
 * computed in one GEMM over exactly those rows. */
int stage_head_logits(stage_state *s, const float *x, const int *rows, int n_rows, float *logits,
                      char *err, size_t errlen);

/* ---- tensor-parallel stages (a model loaded by stage_model_load_tp with K > 1) -------------
 * The leader (group rank 0) is driven by the pipeline as usual: stage_forward(_range),
 * stage_head_logits, stage_state_slot_reset / _release each first broadcast the operation
 * (descriptor, present mask and present rows; the rows for the head) to the group. Every rank
 * then runs the same layer code on the same replicated rows: norms, routers, top-k and
 * mindskip decisions are computed identically on every rank (same bytes in, same code), so
 * no decision is sent; only the big matmuls are distributed (stage/tp.h), and each rank keeps
 * the KV cache of its own heads. A follower calls stage_state_tp_follow, which repeats the
 * leader's operations until the leader calls stage_state_tp_stop (0), or fails (-1, err: the
 * leader hits the same error at the same point). Results (x, logits) are the leader's; with
 * K > 1 they match one rank to ~1e-6 relative, not bit for bit (different reduction order). */
int stage_state_tp_follow(stage_state *s, char *err, size_t errlen);
void stage_state_tp_stop(stage_state *s); /* leader, once; a no-op elsewhere */
/* Group bytes outside the layers: micro-batches handed to the group, the LM head. */
double stage_state_tp_io_bytes(const stage_state *s);

/* ---- stats ----------------------------------------------------------------------------------- */
typedef struct {
    uint64_t rows;   /* micro-batch rows that passed this layer (present or not) */
    uint64_t active; /* rows the layer computed on (routed: selected; mindskip: attention kept) */
    uint64_t kv_entries; /* K/V entries written */
    double flops;        /* executed */
    double flops_dense;  /* had every row computed the whole layer (dense equivalent) */
    double seconds;      /* wall time inside this layer */
    double tp_bytes;     /* bytes moved inside the stage's rank group by this layer (tp.h) */
} stage_layer_stats;

/* Stats of layer l (must be in the stage's range). */
const stage_layer_stats *stage_state_layer_stats(const stage_state *s, int layer);
/* K/V bytes allocated by this stage's pool (pages x page bytes). */
size_t stage_state_kv_alloc_bytes(const stage_state *s);

/* The KV pool now (docs/SPEC.md §11). */
typedef struct {
    int page;               /* positions per page */
    int kv_layers;          /* layers of the stage with a KV cache (each takes its own pages) */
    int pages_total;        /* pages in the pool */
    int pages_used;         /* pages held by sequences now (cached ones included) */
    int pages_cached;       /* of them, pages held by parked sequences only (prefix cache) */
    int64_t entries_live;   /* entries (rows kept) of the running (not parked) sequences, on
                           * every layer of the stage */
    int64_t positions_live; /* positions those sequences reached x the stage's layers: had
                             * every layer kept every row, entries_live would be this */
    int pages_peak;         /* most pages held at once since init */
    size_t page_bytes;      /* bytes of one page (K + V + positions) */
    size_t bytes_used;      /* pages_used x page_bytes */
    size_t bytes_dense;     /* what a contiguous dense cache would hold for the running sequences:
                            * every layer of the stage, every position reached, K + V +
                            * position per entry */
    int64_t pages_routed;   /* pages held by routed (mod / mode_staged) layers */
    int64_t pages_skip;     /* by mindskip layers */
    int64_t pages_full;     /* by dense / mode_integrated layers */
} stage_kv_stats;
void stage_state_kv_stats(const stage_state *s, stage_kv_stats *out);
/* Pages layer `layer` holds now (-1 outside the stage). */
int64_t stage_state_kv_layer_pages(const stage_state *s, int layer);

/* ---- sampling -------------------------------------------------------------------------------- */
typedef struct {
    uint64_t s[4];
} stage_rng;
/* The generator of sequence `index` under `seed` (independent of batching and ranks). */
void stage_rng_seed(stage_rng *r, uint64_t seed, uint64_t index);
double stage_rng_uniform(stage_rng *r); /* [0, 1) */
/* The generator of draw `step` (0: the first new token) of sequence `seq` under `seed`. The
 * pipeline seeds one per sampled token, so a draw depends on (seed, seq, step) only — not on
 * batching, rank count, or what the head sampled before. */
void stage_rng_seed_draw(stage_rng *r, uint64_t seed, uint64_t seq, uint64_t step);

/* Greedy (temperature <= 0: argmax, lowest id among equal maxima) or temperature / top-p
 * sampling. scratch: room for 2 * vocab floats (caller-owned; sized once). */
int stage_sample(const float *logits, int vocab, float temperature, float top_p, stage_rng *r,
                 void *scratch);

/* -log softmax(logits)[target], computed in double. */
double stage_nll(const float *logits, int vocab, int target);

#endif
