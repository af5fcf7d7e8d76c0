/* stage/stage_impl.h — the structs behind stage.h, shared by the stage's own files:
 * model.c (weights, routers), state.c (KV caches, workspace, slots, the tensor-parallel group
 * protocol) and layers.c (the layer math). Not for use outside stage/. */
#ifndef STAGE_STAGE_IMPL_H
#define STAGE_STAGE_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "stage/kv.h"
#include "stage/matmul.h"
#include "stage/safetensors.h"
#include "stage/stage.h"
#include "stage/tp.h"

typedef struct {
    stage_kind kind;
    int loaded;             /* weights of this layer live on this stage */
    const float *ln1, *ln2; /* [D] input_layernorm, post_attention_layernorm (f32: tiny) */
    /* matrices stay in the checkpoint dtype (or --weights-dtype), inside the mmap */
    stage_weight wq;           /* [n_heads*hd][D] */
    stage_weight wk, wv;       /* [n_kv*hd][D] */
    stage_weight wo;           /* [D][n_heads*hd] */
    stage_weight w_gate, w_up; /* [I][D] dense MLP */
    stage_weight w_down;       /* [D][I] */
    /* block-variant vectors (f32, NULL when the config has none: docs/SPEC.md §10) */
    const float *bq, *bk, *bv;  /* [n_heads*hd], [n_kv*hd], [n_kv*hd] q/k/v_proj.bias */
    const float *bo;            /* [D] o_proj.bias */
    const float *bgate, *bup;   /* [I] gate/up_proj.bias */
    const float *bdown;         /* [D] down_proj.bias */
    const float *qnorm, *knorm; /* [hd] per-head RMSNorm of q and k (Qwen3) */
    stage_weight moe_gate;      /* [n_gate][D]: E (staged) or E + N_noop (integrated) */
    int n_gate;
    stage_weight *ew1, *ew3; /* [E] -> [Ie][D] */
    stage_weight *ew2;       /* [E] -> [D][Ie] */
    /* router: routed layers on every stage, mindskip layers on their own stage */
    const float *router_w; /* [D] */
    float router_b;        /* 0 when absent */
    const float *pred_w1;  /* [pred_h][D] */
    const float *pred_b1;  /* [pred_h] or NULL */
    const float *pred_w2;  /* [pred_h] */
    float pred_b2;
    int pred_h;
    /* tensor-parallel stage (m->tp): this rank's slices of the big matrices (stage/tp.h);
     * the stage_weight fields above then only carry the shapes (data NULL) */
    stage_tp_weight tq, tk, tv, to, tgate, tup, tdown;
    stage_tp_weight *tew1, *tew2, *tew3; /* [E] */
} layer_w;

struct stage_model {
    stage_config cfg; /* own copy; cfg.layer_kind owned */
    stage_range range;
    st_model *st;
    layer_w *layers;      /* [n_layers] */
    stage_weight embed;   /* [vocab][D] (data NULL: not on this stage) */
    const float *norm;    /* [D] */
    stage_weight lm_head; /* [vocab][D] (the embedding when tied; data NULL: not the head) */
    float *inv_freq;      /* [head_dim/2] */
    int weights_dtype;    /* -1: as stored, else the stage_dtype matrices are held in */
    stage_tp *tp;         /* the stage's rank group (K > 1), NULL on one rank; not owned */
    int has_head;         /* model.norm + lm_head live here */
    stage_tp_weight tlm;  /* [vocab][D] slice of lm_head (tp) */
    size_t weight_bytes;  /* bytes of the tensors this stage holds, in their dtype */
};

struct stage_state {
    const stage_model *m;
    /* tensor parallelism (m->tp): this rank's share of the heads and features; on one rank
     * these are the model's own numbers, so the single-rank arithmetic is unchanged */
    stage_tp *tp;       /* m->tp: NULL on one rank */
    int nh_l, nkv_l;    /* query / KV heads on this rank */
    int ff_l, fe_l;     /* intermediate / expert-intermediate features on this rank */
    int q_off, kv_off;  /* this rank's first q / k-v feature (bias slices), 0 on one rank */
    int ff_off;         /* this rank's first intermediate feature */
    double tp_io_bytes; /* group bytes outside the layers (micro-batch in, LM head) */
    int tp_stopped;     /* leader: STOP was sent */
    /* follower copies of what the leader broadcasts */
    int32_t *f_i32;  /* [3][max_rows] slot, pos, token */
    uint8_t *f_u8;   /* [2][max_rows] flags, present */
    float *f_x;      /* [max_rows][D] */
    float *f_logits; /* [max_rows][vocab] (head) */
    uint8_t *f_buf;  /* [op_bytes] broadcast payload */
    size_t op_bytes;
    int n_layers;                   /* layers in range */
    int n_slots, max_rows, max_seq; /* max_seq: positions per slot (--ctx) */
    /* paged KV cache (stage/kv.h, docs/SPEC.md §11): one pool for every layer of the stage */
    kv_pool pool;
    int kv_max_pages;         /* pages a (layer, slot) cache may hold: ceil(max_seq / page) */
    kv_seq *kv;               /* [n_layers][n_slots] page tables into pool */
    int32_t *kv_pt;           /* [n_layers][n_slots][kv_max_pages] the page tables' storage */
    int32_t *kv_seen;         /* [n_slots] positions the slot's sequence has reached here */
    uint8_t *released;        /* [n_slots] 1: no sequence holds the slot (until a reset) */
    uint8_t *lost;            /* [n_slots] 1: the pool ran out under the slot's sequence (soft
                               * mode): its pages are back, its rows are dropped until a reset */
    uint8_t *parked;          /* [n_slots] 1: the sequence is over, kept for prefix reuse (its
                               * pages count as cached, stage_state_slot_share) */
    uint8_t *pg_mark;         /* [n_pages] scratch of stage_state_kv_stats (pages in use) */
    int kv_soft;              /* running out of pages loses the sequence instead of failing */
    int8_t *ms_keep;          /* [n_layers][n_slots] mindskip sequence decision: -1 undecided */
    stage_layer_stats *stats; /* [n_layers] */
    /* workspace, all [max_rows][...] unless noted */
    int *act;                 /* [max_rows] active rows (micro-batch indices) */
    int *act2;                /* [max_rows] second index list (mindskip kept rows) */
    int *ent;                 /* [max_rows] cache index of each active row's own entry */
    float *score;             /* [max_rows] router score */
    float *xin;               /* [max_rows][D] gathered residual */
    float *h;                 /* [max_rows][D] normed */
    float *q;                 /* [max_rows][n_heads*hd] */
    float *k, *v;             /* [max_rows][kv_dim] */
    float *att;               /* [max_rows][n_heads*hd] attention output before o_proj */
    stage_attend_job *ajob;   /* [max_rows][n_kv_heads] one attention job per row x KV head */
    float *a;                 /* [max_rows][D] attention block output */
    float *x2;                /* [max_rows][D] x + a */
    float *h2;                /* [max_rows][D] */
    float *f1, *f3;           /* [max_rows][max(I, Ie)] */
    float *mo;                /* [max_rows][D] MLP / MoE output */
    float *ex;                /* [max_rows][D] rows routed to one expert */
    float *eo;                /* [max_rows][D] that expert's output */
    float *gate;              /* [max_rows][n_gate] */
    int *sel_e;               /* [max_rows][experts_per_token] chosen experts */
    float *sel_w;             /* [max_rows][experts_per_token] their weights */
    int *erow;                /* [max_rows] rows of the current expert (compact indices) */
    float *probs;             /* [n_heads/n_kv_heads][max_seq] attention weights of a GQA group */
    float *mean;              /* [D] */
    void (*progress)(void *); /* called between layers */
    void *progress_arg;
};

static inline kv_seq *kv_at(stage_state *s, int li, int slot)
{
    return &s->kv[(size_t)li * s->n_slots + slot];
}

/* layers.c: the layers [first, last] on the present rows / the head's logits (the work each
 * rank of a tensor-parallel group repeats; state.c's public entry points broadcast first). */
int stage_forward_impl(stage_state *s, const stage_batch *b, float *x, const uint8_t *present,
                       int first, int last, char *err, size_t errlen);
int stage_head_impl(stage_state *s, const float *x, const int *rows, int n_rows, float *logits,
                    char *err, size_t errlen);
/* state.c: empty a slot on every layer of the stage (a new sequence) */
void stage_slot_reset_impl(stage_state *s, int slot);
/* state.c: soft mode: slot's sequence is lost here (its pages go back, its rows are dropped) */
void stage_slot_lose_impl(stage_state *s, int slot);

#endif
