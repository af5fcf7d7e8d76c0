/* train/train.h — Router-Tuning core (docs/SPEC.md §2.4): train only MindSkip routers of a
 * frozen dense checkpoint of any block family stage/ computes (docs/SPEC.md §10: biases, q/k
 * norms, RoPE scaling and sliding windows are part of the frozen forward). Pure C, no MPI:
 * the data-parallel driver (cli/routertune.c) splits a batch over ranks and sums what this
 * module returns.
 *
 * Model: train_model_load() reads DIR/config.json (stage/config.h) and every frozen tensor as
 * f32 through stage/safetensors.h st_get_f32 (embedding, norms, attention, MLP, model.norm,
 * lm_head or the tied embedding). Router tensors in the checkpoint are not loaded here (the
 * driver reads them for --resume). Layers must be dense or mindskip (the MLP always runs);
 * MoD / MoDE layers are a clear error.
 *
 * Training forward (one sequence = T tokens at positions 0..T-1, every row a prompt row), on the
 * routed layers R (train_setup.layers), with h = rmsnorm(x, input_layernorm):
 *   sequence granularity: z_s = w . mean_t(h_t) + b, one gate g_s per sequence;
 *   token granularity:    z_t = w . h_t + b, one gate g_t per row;
 *   gate: STE (paper):  g = [sigmoid(z) > threshold] in the forward, dg/dz := sigmoid'(z);
 *         soft:         g = sigmoid(z) (+ a fixed offset, the gradient-check hook below).
 *   x' = x + g * Attn(h)        (the attention output scaled by the gate)
 *   token granularity also weights the KEYS: row i attends key j < i with weight g_j (its own
 *   key with weight 1): p_ij = g_j e^{s_ij} / sum_k g_k e^{s_ik}. With 0/1 gates this is
 *   exactly the engine's inference (a skipped row writes no K/V, kept rows attend kept rows).
 * Loss = (1/N_targets) sum NLL(next token) + P, the kept fraction k_l = mean of g over the
 * gates of routed layer l (whole batch, all ranks), K = mean_l k_l, k* = 1 - target_skip:
 *   penalty global: P = lambda * max(0, K - k*);   layer: P = lambda/|R| * sum_l max(0, k_l - k*).
 * Backward: exact gradients of that loss with respect to the router parameters (w [D], b) of
 * every routed layer ONLY, through the frozen final norm, LM head, MLPs, attention and norms
 * (including the routers' own inputs h). No weight gradient is computed or stored. Only layers
 * from the first routed layer on keep activations (earlier layers get no gradient).
 *
 * Precision: f32 (cblas_sgemm) for training, or f64 (cblas_dgemm, the same code compiled for
 * double, weights converted) for the gradient check. Router parameters and gradients are
 * double in the API in both cases.
 *
 * Ownership: train_model owns its st_model (mmap) and converted copies; train_ws owns every
 * activation buffer, sized once for max_seqs sequences of seq_len tokens (no allocation per
 * step). Errors: non-zero return + one line in err. *_free(NULL) is a no-op.
 */
#ifndef TRAIN_TRAIN_H
#define TRAIN_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "stage/config.h"

typedef struct train_model train_model;
typedef struct train_ws train_ws;

typedef enum { TRAIN_GATE_STE = 0, TRAIN_GATE_SOFT = 1 } train_gate;
typedef enum { TRAIN_PENALTY_GLOBAL = 0, TRAIN_PENALTY_LAYER = 1 } train_penalty;

typedef struct {
    int n_routed;      /* |R| >= 1 */
    const int *layers; /* [n_routed] routed layer indices, strictly increasing */
    stage_granularity gran;
    train_gate gate;
    train_penalty penalty;
    double threshold;   /* inference threshold tau (STE forward uses it too) */
    double target_keep; /* k* = 1 - target_skip */
    double lambda;      /* penalty weight */
} train_setup;

/* What one forward measured on its sequences (arrays owned by the workspace, [n_routed]). */
typedef struct {
    double nll_sum;         /* sum of -log p(next token) over the targets */
    long n_targets;         /* n_seq * (T - 1) */
    const double *gate_sum; /* sum of the gates g per routed layer */
    const double *sig_sum;  /* sum of sigmoid(z) per routed layer (soft score) */
    long n_gates;           /* gates per routed layer: n_seq (sequence) or n_seq * T (token) */
} train_stats;

int train_model_load(const char *dir, train_model **out, char *err, size_t errlen);
void train_model_free(train_model *m);
const stage_config *train_model_config(const train_model *m);

/* Workspace for batches of at most max_seqs sequences of seq_len tokens (seq_len >= 2,
 * <= max_position_embeddings). use_double: the f64 variant (gradient checks). */
train_ws *train_ws_new(train_model *m, const train_setup *s, int max_seqs, int seq_len,
                       int use_double, char *err, size_t errlen);
void train_ws_free(train_ws *ws);

/* Forward of tokens [n_seq][seq_len] with routers w [n_routed][D], b [n_routed]; keeps what
 * the backward needs and already computes dLoss/dlogits with weight inv_ntok per target
 * (1 / targets of the WHOLE batch over all ranks). gate_offset: NULL, or (soft gate only)
 * [n_routed][n_gates] constants added to sigmoid(z): with offset = hard - sigmoid at a point,
 * the soft forward equals the STE forward there and its exact gradient is the STE gradient.
 * Returns 0, or -1 (token out of range, n_seq too large) with err. */
int train_forward(train_ws *ws, const int32_t *tokens, int n_seq, const double *w, const double *b,
                  double inv_ntok, const double *gate_offset, char *err, size_t errlen);
const train_stats *train_ws_stats(const train_ws *ws);
/* Switch the gate of later forwards (held-out evaluation uses the STE forward = inference). */
void train_ws_set_gate(train_ws *ws, train_gate gate);
/* The last forward's per-gate values of routed layer ri ([n_gates] each): z, sigmoid(z), g. */
void train_ws_gates(const train_ws *ws, int ri, double *z, double *sig, double *g);

/* dP/dg for the gates of each routed layer, from the batch totals gate_sum [n_routed] and
 * n_gates (per layer, whole batch): coef [n_routed]. Returns P. */
double train_penalty_coef(const train_setup *s, const double *gate_sum, double n_gates,
                          double *coef);

/* Backward of the last forward: ADDS dLoss/dw into grad_w [n_routed][D] and dLoss/db into
 * grad_b [n_routed] (LM part with the forward's inv_ntok, penalty part with coef). */
void train_backward(train_ws *ws, const double *coef, double *grad_w, double *grad_b);

/* ---- AdamW on a flat double parameter vector ------------------------------------------------- */
typedef struct {
    int n;
    long t;        /* steps taken */
    double *m, *v; /* [n] moments */
} train_adamw;
int train_adamw_init(train_adamw *o, int n);
void train_adamw_free(train_adamw *o);
/* theta -= lr * (mhat / (sqrt(vhat) + eps) + wd_mask[i] * wd * theta), beta1 0.9, beta2
 * 0.999, eps 1e-8 (decoupled weight decay; wd_mask NULL: decay everything). */
void train_adamw_step(train_adamw *o, double *theta, const double *grad, double lr, double wd,
                      const uint8_t *wd_mask);

#endif
