/* cli/initmodel.c — see initmodel.h. */
#include "cli/initmodel.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/clock.h"
#include "cli/opts.h"
#include "stage/arch.h"
#include "stage/kernels.h"
#include "stage/matmul.h"
#include "stage/safetensors.h"
#include "stage/stage.h"

/* ---- the tensor list: names, shapes and distributions; values are drawn while writing -------- */
typedef struct {
    char name[160];
    int ndim;
    int64_t shape[2];
    double mean, std; /* every element ~ mean + std * N(0,1) */
} tensor;

typedef struct {
    tensor *t; /* [n] in file order = draw order */
    int n, cap;
} tensor_list;

/* Element i of the stream is mean + std * g with g = sqrt(-2 ln u1) cos(2 pi u2), u1 and u2
 * the generator's next two uniforms (Box-Muller, one output per pair). The uniforms are drawn
 * serially; the transform, the expensive part, is split over threads: same bytes for any
 * thread count. */
static float gauss_of(double u1, double u2, double mean, double std)
{
    if (u1 < 1e-300) u1 = 1e-300;
    return (float)(mean + std * (sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2)));
}

typedef struct {
    const double *u; /* [2n] uniform pairs */
    float *out;      /* [n] */
    size_t n;
    double mean, std;
} draw_job;

static void *draw_run(void *arg)
{
    const draw_job *j = arg;
    for (size_t i = 0; i < j->n; i++)
        j->out[i] = gauss_of(j->u[2 * i], j->u[2 * i + 1], j->mean, j->std);
    return NULL;
}

/* out [n] = the next n values of the stream; T threads (the caller is one of them). */
static void draw(stage_rng *r, double *u, float *out, size_t n, double mean, double std, int T)
{
    for (size_t i = 0; i < 2 * n; i++) u[i] = stage_rng_uniform(r);
    draw_job jobs[16];
    pthread_t tid[16];
    int started[16] = {0};
    if (T > 16) T = 16;
    if (T < 1 || n < 4096) T = 1;
    size_t per = (n + (size_t)T - 1) / (size_t)T;
    for (int t = 0; t < T; t++) {
        size_t lo = per * (size_t)t, hi = lo + per < n ? lo + per : n;
        jobs[t] = (draw_job){u + 2 * lo, out + lo, hi > lo ? hi - lo : 0, mean, std};
        if (t > 0) started[t] = pthread_create(&tid[t], NULL, draw_run, &jobs[t]) == 0;
    }
    draw_run(&jobs[0]);
    for (int t = 1; t < T; t++) {
        if (started[t])
            pthread_join(tid[t], NULL);
        else
            draw_run(&jobs[t]); /* no thread: do its share here */
    }
}

static int add(tensor_list *tl, const char *name, int64_t d0, int64_t d1, double mean, double std)
{
    if (tl->n == tl->cap) {
        int cap = tl->cap ? tl->cap * 2 : 64;
        tensor *t = realloc(tl->t, (size_t)cap * sizeof *t);
        if (!t) return -1;
        tl->t = t;
        tl->cap = cap;
    }
    tensor *t = &tl->t[tl->n++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = d1 > 0 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->mean = mean;
    t->std = std;
    return 0;
}

static size_t numel(const tensor *t)
{
    return (size_t)t->shape[0] * (size_t)(t->ndim == 2 ? t->shape[1] : 1);
}

#define ADD(...)                                                                                   \
    do {                                                                                           \
        if (add(__VA_ARGS__)) goto oom;                                                            \
    } while (0)

static int plan_tensors(const cli_model_spec *sp, tensor_list *tl, char *err, size_t errlen)
{
    const stage_config *c = &sp->cfg;
    const int64_t D = c->hidden, qd = (int64_t)c->n_heads * c->head_dim;
    const int64_t kvd = (int64_t)c->n_kv_heads * c->head_dim;
    const double sd = sp->init_std, rsd = sp->router_std / sqrt((double)D);
    char n[160];
    ADD(tl, "model.embed_tokens.weight", c->vocab, D, 0.0, 1.0);
    for (int l = 0; l < c->n_layers; l++) {
        stage_kind k = c->layer_kind[l];
#define LN(suffix) (snprintf(n, sizeof n, "model.layers.%d.%s", l, suffix), n)
        ADD(tl, LN("input_layernorm.weight"), D, 0, 1.0, 0.05);
        ADD(tl, LN("self_attn.q_proj.weight"), qd, D, 0.0, sd);
        ADD(tl, LN("self_attn.k_proj.weight"), kvd, D, 0.0, sd);
        ADD(tl, LN("self_attn.v_proj.weight"), kvd, D, 0.0, sd);
        ADD(tl, LN("self_attn.o_proj.weight"), D, qd, 0.0, sd);
        ADD(tl, LN("post_attention_layernorm.weight"), D, 0, 1.0, 0.05);
        if (c->qkv_bias) { /* docs/SPEC.md §10 */
            ADD(tl, LN("self_attn.q_proj.bias"), qd, 0, 0.0, sd);
            ADD(tl, LN("self_attn.k_proj.bias"), kvd, 0, 0.0, sd);
            ADD(tl, LN("self_attn.v_proj.bias"), kvd, 0, 0.0, sd);
        }
        if (c->o_bias) ADD(tl, LN("self_attn.o_proj.bias"), D, 0, 0.0, sd);
        if (c->qk_norm) {
            ADD(tl, LN("self_attn.q_norm.weight"), c->head_dim, 0, 1.0, 0.05);
            ADD(tl, LN("self_attn.k_norm.weight"), c->head_dim, 0, 1.0, 0.05);
        }
        if (k == STAGE_KIND_MODE_STAGED || k == STAGE_KIND_MODE_INTEGRATED) {
            int G = c->n_experts + (k == STAGE_KIND_MODE_INTEGRATED ? c->n_noop_experts : 0);
            ADD(tl, LN("block_sparse_moe.gate.weight"), G, D, 0.0, sd);
            for (int e = 0; e < c->n_experts; e++) {
                snprintf(n, sizeof n, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l,
                         e);
                ADD(tl, n, c->expert_inter, D, 0.0, sd);
                snprintf(n, sizeof n, "model.layers.%d.block_sparse_moe.experts.%d.w2.weight", l,
                         e);
                ADD(tl, n, D, c->expert_inter, 0.0, sd);
                snprintf(n, sizeof n, "model.layers.%d.block_sparse_moe.experts.%d.w3.weight", l,
                         e);
                ADD(tl, n, c->expert_inter, D, 0.0, sd);
            }
        } else {
            ADD(tl, LN("mlp.gate_proj.weight"), c->inter, D, 0.0, sd);
            ADD(tl, LN("mlp.up_proj.weight"), c->inter, D, 0.0, sd);
            ADD(tl, LN("mlp.down_proj.weight"), D, c->inter, 0.0, sd);
            if (c->mlp_bias) {
                ADD(tl, LN("mlp.gate_proj.bias"), c->inter, 0, 0.0, sd);
                ADD(tl, LN("mlp.up_proj.bias"), c->inter, 0, 0.0, sd);
                ADD(tl, LN("mlp.down_proj.bias"), D, 0, 0.0, sd);
            }
        }
        if (stage_kind_is_routed(k) || k == STAGE_KIND_MINDSKIP) {
            ADD(tl, LN("router.weight"), 1, D, 0.0, rsd);
            if (stage_kind_is_routed(k) && sp->router_bias)
                ADD(tl, LN("router.bias"), 1, 0, 0.0, 0.0);
        }
        if (stage_kind_is_routed(k) && c->mod_routing == STAGE_ROUTING_PREDICTOR) {
            int64_t H = sp->predictor_hidden;
            ADD(tl, LN("router_predictor.fc1.weight"), H, D, 0.0, 1.0 / sqrt((double)D));
            ADD(tl, LN("router_predictor.fc1.bias"), H, 0, 0.0, 0.0);
            ADD(tl, LN("router_predictor.fc2.weight"), 1, H, 0.0, 1.0 / sqrt((double)H));
            ADD(tl, LN("router_predictor.fc2.bias"), 1, 0, 0.0, 0.0);
        }
#undef LN
    }
    ADD(tl, "model.norm.weight", D, 0, 1.0, 0.05);
    if (!c->tie_embeddings) ADD(tl, "lm_head.weight", c->vocab, D, 0.0, sd);
    return 0;
oom:
    snprintf(err, errlen, "out of memory listing the tensors");
    return -1;
}

/* ---- progress on the log: in place on a terminal, else a line every few seconds -------------- */
typedef struct {
    FILE *log;
    int tty;
    double t0, last;
} progress;

static void progress_init(progress *p, FILE *log)
{
    p->log = log;
    p->tty = log && isatty(fileno(log));
    p->t0 = p->last = base_now_s();
}

static void progress_bytes(progress *p, uint64_t done, uint64_t total, int final)
{
    if (!p->log) return;
    double now = base_now_s();
    if (!final && now - p->last < (p->tty ? 0.5 : 5.0)) return;
    p->last = now;
    double el = now - p->t0, rate = el > 0 ? (double)done / el : 0;
    double eta = rate > 0 ? (double)(total - done) / rate : 0;
    double unit = total >= 1e9 ? 1e9 : 1e6;
    fprintf(p->log, "%sinit-model: %.2f / %.2f %s written, %.0f MB/s, %s %.0f s%s",
            p->tty ? "\r" : "", (double)done / unit, (double)total / unit,
            unit == 1e9 ? "GB" : "MB", rate / 1e6, final ? "took" : "ETA", final ? el : eta,
            p->tty && !final ? "   " : "\n");
    fflush(p->log);
}

/* ---- writing: stream every tensor, drawn in chunks from one generator ------------------------ */

/* Values come from one stream seeded by (seed, "modpip"), drawn in file order, element by
 * element: the same bytes as drawing each whole tensor in f32 and writing it afterwards. */
#define DRAW_CHUNK (1u << 19) /* values per draw: 2 MiB of floats, 8 MiB of uniforms */

static int write_weights(const cli_model_spec *sp, const tensor_list *tl, const char *dir,
                         FILE *log, char *err, size_t errlen)
{
    st_stream *s = st_stream_new();
    float *buf = malloc(DRAW_CHUNK * sizeof *buf);  /* [DRAW_CHUNK] */
    double *u = malloc(2 * DRAW_CHUNK * sizeof *u); /* [DRAW_CHUNK][2] */
    int rc = s && buf && u ? 0 : -1;
    for (int i = 0; !rc && i < tl->n; i++)
        rc = st_stream_declare(s, tl->t[i].name, sp->dtype, tl->t[i].ndim, tl->t[i].shape);
    if (rc) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    if ((rc = st_stream_begin(s, dir, sp->shards, err, errlen))) goto out;
    progress pg;
    progress_init(&pg, log);
    stage_rng rng;
    stage_rng_seed(&rng, sp->seed, 0x6d6f64706970ull);
    const uint64_t total = st_stream_total_bytes(s);
    for (int i = 0; !rc && i < tl->n; i++) {
        const tensor *t = &tl->t[i];
        for (size_t off = 0, ne = numel(t); !rc && off < ne; off += DRAW_CHUNK) {
            size_t k = ne - off < DRAW_CHUNK ? ne - off : DRAW_CHUNK;
            draw(&rng, u, buf, k, t->mean, t->std, sp->threads);
            rc = st_stream_write_f32(s, buf, k, err, errlen);
            if (!rc) progress_bytes(&pg, st_stream_written_bytes(s), total, 0);
        }
    }
    if (!rc) rc = st_stream_finish(s, err, errlen);
    if (!rc) progress_bytes(&pg, total, total, 1);
out:
    st_stream_free(s); /* removes the files when rc != 0 */
    free(buf);
    free(u);
    return rc;
}

/* ---- config.json ----------------------------------------------------------------------------- */
static int write_config(const cli_model_spec *sp, const char *dir, char *err, size_t errlen)
{
    cJSON *j = cli_model_spec_config_json(sp);
    char *txt = cJSON_Print(j);
    cJSON_Delete(j);
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    int ok = f && txt && fputs(txt, f) >= 0 && fputc('\n', f) != EOF;
    if (f && fclose(f)) ok = 0;
    free(txt);
    if (!ok) {
        snprintf(err, errlen, "%s: cannot write: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* ---- calibration ----------------------------------------------------------------------------- */
typedef struct {
    int n;
    stage_batch rows; /* n rows: the calibration prompts, every row a prompt row */
    uint8_t *present; /* [n] */
    float *x;         /* [n][D] */
} calib_batch;

static int batch_init(calib_batch *b, const stage_config *c, int prompts, int len, uint64_t seed)
{
    b->n = prompts * len;
    if (stage_batch_init(&b->rows, b->n)) return -1;
    b->present = malloc((size_t)b->n);
    b->x = malloc((size_t)b->n * c->hidden * sizeof(float));
    if (!b->present || !b->x) return -1;
    stage_rng r;
    stage_rng_seed(&r, seed, 0x63616c6962ull);
    for (int i = 0; i < b->n; i++) {
        stage_batch_add(&b->rows, i / len, i % len, (int32_t)(stage_rng_uniform(&r) * c->vocab),
                        STAGE_ROW_PROMPT, 0, 0);
        b->present[i] = 1;
    }
    return 0;
}

static void batch_free(calib_batch *b)
{
    stage_batch_free(&b->rows);
    free(b->present);
    free(b->x);
}

static int cmp_desc(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* x [n][D] = the embedding rows of the batch's tokens, read from the written file: only
 * those rows are touched (the matrix is never copied). */
static int embed_rows(const char *dir, const stage_config *c, calib_batch *b, char *err,
                      size_t errlen)
{
    st_model *st = NULL;
    if (st_open(dir, &st, err, errlen)) return -1;
    st_tensor t;
    const char *name = "model.embed_tokens.weight";
    int r = st_find(st, name, &t, err, errlen);
    if (r == 0) snprintf(err, errlen, "%s: missing tensor %s", dir, name);
    if (r > 0 && (t.ndim != 2 || t.shape[0] != c->vocab || t.shape[1] != c->hidden)) {
        snprintf(err, errlen, "%s: tensor %s is not [%d, %d]", t.file, name, c->vocab, c->hidden);
        r = -1;
    }
    if (r > 0) {
        const size_t D = (size_t)c->hidden, row = D * stage_dtype_size(t.dtype);
        for (int i = 0; i < b->n; i++)
            stage_dtype_to_f32(t.dtype, (const uint8_t *)t.data + (size_t)b->rows.token[i] * row,
                               b->x + (size_t)i * D, D);
    }
    st_close(st);
    return r > 0 ? 0 : -1;
}

/* Runs the written model on random prompts, one layer at a time: each layer is loaded alone
 * (its weights, as mmap'd by the loader, plus every router), run on the residual stream the
 * earlier layers produced, and freed — so calibration holds one layer, never the model. With
 * `adjust`, each calibratable router is first shifted so that round(capacity * rows) rows
 * clear the threshold, and the new bias is written into the file in place. Fills part[l] and
 * bias[l] (routed layers). */
static int run_layers(const cli_model_spec *sp, const char *dir, uint64_t seed, int adjust,
                      double *part, float *bias, FILE *msg, char *err, size_t errlen)
{
    const stage_config *c = &sp->cfg;
    const int D = c->hidden, L = c->n_layers;
    calib_batch b;
    memset(&b, 0, sizeof b);
    float *v = NULL;
    stage_model *m = NULL;
    stage_state *st = NULL;
    int rc = -1;
    if (batch_init(&b, c, sp->calib_prompts, sp->calib_length, seed) ||
        !(v = malloc((size_t)b.n * sizeof *v))) {
        snprintf(err, errlen, "out of memory (calibration batch)");
        goto out;
    }
    if (embed_rows(dir, c, &b, err, errlen)) goto out;
    const double thr_logit = log(c->mod_threshold / (1.0 - c->mod_threshold));
    progress pg;
    progress_init(&pg, msg);
    for (int l = 0; l < L; l++) {
        stage_range r = {l, l, 0, 0};
        if (stage_model_load(dir, c, r, &m, err, errlen)) goto out;
        st = stage_state_init(m, sp->calib_prompts, b.n, sp->calib_length, err, errlen);
        if (!st) goto out;
        int routed = stage_kind_is_routed(c->layer_kind[l]);
        if (adjust && routed && c->mod_routing != STAGE_ROUTING_TOPK) {
            for (int i = 0; i < b.n; i++) v[i] = stage_router_logit(m, l, b.x + (size_t)i * D);
            qsort(v, (size_t)b.n, sizeof *v, cmp_desc);
            int k = (int)lround(c->mod_capacity * b.n);
            if (k < 1) k = 1;
            /* put the threshold half-way between the k-th and (k+1)-th largest logits */
            double cut = k < b.n ? 0.5 * ((double)v[k - 1] + v[k]) : (double)v[b.n - 1] - 1.0;
            stage_router_shift(m, l, (float)(thr_logit - cut));
        }
        if (stage_forward_range(st, &b.rows, b.x, b.present, l, l, err, errlen)) goto out;
        const stage_layer_stats *ls = stage_state_layer_stats(st, l);
        part[l] = ls->rows ? (double)ls->active / (double)ls->rows : 0.0;
        if (routed) {
            bias[l] = stage_router_bias(m, l);
            char n[160];
            snprintf(n, sizeof n,
                     c->mod_routing == STAGE_ROUTING_PREDICTOR
                         ? "model.layers.%d.router_predictor.fc2.bias"
                         : "model.layers.%d.router.bias",
                     l);
            if (adjust && st_patch_f32(dir, n, &bias[l], 1, err, errlen) < 0) goto out;
        }
        stage_state_free(st);
        st = NULL;
        stage_model_free(m);
        m = NULL;
        if (pg.log && base_now_s() - pg.last >= 5.0) {
            pg.last = base_now_s();
            fprintf(pg.log, "init-model: %s: layer %d of %d done, %.0f s\n",
                    adjust ? "calibrating" : "measuring", l + 1, L, pg.last - pg.t0);
        }
    }
    rc = 0;
out:
    stage_state_free(st);
    stage_model_free(m);
    free(v);
    batch_free(&b);
    return rc;
}

int cli_init_model(const cli_model_spec *sp, const char *dir, FILE *log, char *err, size_t errlen)
{
    const stage_config *c = &sp->cfg;
    if (mkdir(dir, 0755) && errno != EEXIST) {
        snprintf(err, errlen, "%s: cannot create directory: %s", dir, strerror(errno));
        return -1;
    }
    tensor_list tl;
    memset(&tl, 0, sizeof tl);
    int rc = plan_tensors(sp, &tl, err, errlen);
    if (!rc) rc = write_weights(sp, &tl, dir, log, err, errlen);
    if (!rc) rc = write_config(sp, dir, err, errlen);
    free(tl.t);
    int want = 0;
    for (int l = 0; l < c->n_layers; l++)
        want |= stage_kind_is_routed(c->layer_kind[l]) && c->mod_routing != STAGE_ROUTING_TOPK;
    if (rc || !sp->calibrate || !want) return rc;
    if (c->mod_routing == STAGE_ROUTING_THRESHOLD && !sp->router_bias) {
        snprintf(err, errlen, "calibration shifts router.bias: set mod.router_bias: true");
        return -1;
    }
    double *part = calloc((size_t)c->n_layers, sizeof *part);
    float *bias = calloc((size_t)c->n_layers, sizeof *bias);
    if (!part || !bias) {
        snprintf(err, errlen, "out of memory");
        rc = -1;
    }
    if (!rc && log)
        fprintf(log, "init-model: calibrating routers on %d random prompts of %d tokens\n",
                sp->calib_prompts, sp->calib_length);
    /* calibrate (patching the biases into the files), then measure on fresh prompts */
    if (!rc) rc = run_layers(sp, dir, sp->seed, 1, part, bias, log, err, errlen);
    if (!rc) rc = run_layers(sp, dir, sp->seed + 1, 0, part, bias, log, err, errlen);
    for (int l = 0; !rc && log && l < c->n_layers; l++)
        if (stage_kind_is_routed(c->layer_kind[l]))
            fprintf(log,
                    "init-model: layer %2d %-11s bias %+.4f  participation %.3f on fresh "
                    "prompts (capacity %.3f)\n",
                    l, stage_kind_name(c->layer_kind[l]), bias[l], part[l], c->mod_capacity);
    free(part);
    free(bias);
    return rc;
}

/* ---- the command ----------------------------------------------------------------------------- */

int cli_init_model_main(int argc, char **argv)
{
    char err[1024];
    cli_opts o;
    cli_model_spec spec;
    memset(&spec, 0, sizeof spec);
    int have_spec = 0;
    int rc = cli_opts_parse(&o, CLI_INIT_MODEL, argc, argv, err, sizeof err);
    if (!rc && cli_opt_has(&o, "help")) {
        cli_opts_usage(
            stdout, CLI_INIT_MODEL,
            "modpipe init-model: write a random model in the SPEC format (config.json +\n"
            "safetensors) from a YAML spec, streamed to disk with a progress line (any size:\n"
            "memory stays small); optionally calibrate router biases, layer by layer from the\n"
            "written files, so that measured participation matches the configured capacity.\n",
            NULL);
        cli_opts_free(&o);
        return 0;
    }
    const char *sp = rc ? NULL : cli_opt_str(&o, "spec"), *out = rc ? NULL : cli_opt_str(&o, "out");
    if (!rc && (!sp || !out)) {
        snprintf(err, sizeof err, "--spec F.yaml and --out DIR are required");
        rc = -1;
    }
    if (!rc) rc = cli_model_spec_load(sp, &spec, err, sizeof err);
    have_spec = !rc;
    long v;
    if (!rc && cli_opt_has(&o, "seed")) {
        rc = cli_opt_long(&o, "seed", 0, 0x7fffffffffffffffL, 0, &v, err, sizeof err);
        spec.seed = (unsigned long)v;
    }
    if (!rc && cli_opt_has(&o, "shards")) {
        rc = cli_opt_long(&o, "shards", 1, 9999, 1, &v, err, sizeof err);
        spec.shards = (int)v;
    }
    if (!rc && cli_opt_has(&o, "dtype") &&
        stage_dtype_parse(cli_opt_str(&o, "dtype"), &spec.dtype)) {
        snprintf(err, sizeof err, "--dtype: expected f32, bf16 or f16, got '%s'%s",
                 cli_opt_str(&o, "dtype"),
                 strcmp(cli_opt_str(&o, "dtype"), "q8_0")
                     ? ""
                     : " (for q8_0, modpipe quantize the model it writes)");
        rc = -1;
    }
    if (!rc) {
        rc = cli_opt_long(&o, "threads", 1, 1024, 1, &v, err, sizeof err);
        if (!rc) rc = stage_threads_init((int)v, err, sizeof err);
        spec.threads = (int)v;
    }
    if (!rc && cli_opt_has(&o, "calibrate")) spec.calibrate = 1;
    if (!rc && cli_opt_has(&o, "no-calibrate")) spec.calibrate = 0;
    FILE *log = cli_opt_has(&o, "quiet") ? NULL : stderr;
    if (!rc) {
        if (log)
            fprintf(log, "init-model: %d layers, hidden %d, vocab %d, %s, %d shard%s -> %s\n",
                    spec.cfg.n_layers, spec.cfg.hidden, spec.cfg.vocab,
                    stage_dtype_st_name(spec.dtype), spec.shards, spec.shards > 1 ? "s" : "", out);
        rc = cli_init_model(&spec, out, log, err, sizeof err);
    }
    if (rc)
        fprintf(stderr, "modpipe init-model: %s\n", err);
    else if (log)
        fprintf(log, "init-model: wrote %s\n", out);
    if (have_spec) cli_model_spec_free(&spec);
    cli_opts_free(&o);
    return rc ? 1 : 0;
}
