/* cli/routertune.c — `modpipe router-tune` (see routertune.h). */
#include "cli/routertune.h"

#include <cJSON.h>
#include <cblas.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <mpi.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/clock.h"
#include "base/file.h"
#include "base/ids.h"
#include "cli/opts.h"
#include "cli/routertune_out.h"
#include "cli/start.h"
#include "comm/link.h"
#include "cli/files.h"
#include "stage/config.h"
#include "stage/kernels.h"
#include "stage/safetensors.h"
#include "tok/tok.h"
#include "train/train.h"

#define RT_ERR 1024

/* Error lines quote paths of up to PATH_MAX bytes into RT_ERR-sized buffers: a cut message is
 * acceptable, so GCC's truncation warning is off in this file. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

/* ---- Options (the table: cli/opts.c) --------------------------------------------------------- */

static void rt_usage(int cmd)
{
    (void)cmd;
    cli_opts_usage(
        stdout, CLI_ROUTER_TUNE,
        "modpipe router-tune: turn a dense checkpoint into a MindSkip model by training only\n"
        "its routers (Router-Tuning, He et al. 2024; docs/ROUTER-TUNING.md has the equations).\n"
        "Data-parallel under mpirun: each rank computes a shard of every batch.\n\n"
        "usage: mpirun -np K modpipe router-tune --model DIR --data FILE --out DIR [options]\n",
        "  mpirun -np 2 modpipe router-tune --model stories260K --data train.txt "
        "--eval-data heldout.txt --out stories260K-ms --layers 1-4 --target-skip 0.3\n");
}

/* "1-3,5" -> sorted distinct layer list. */
static int parse_layers(const char *s, int n_layers, int **out, int *n, char *err, size_t errlen)
{
    int *mark = calloc((size_t)n_layers, sizeof *mark);
    if (!mark) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    const char *p = s;
    int rc = 0;
    while (*p && !rc) {
        char *end;
        long a = strtol(p, &end, 10), b;
        if (end == p) {
            rc = -1;
            break;
        }
        p = end;
        b = a;
        if (*p == '-') {
            const char *q = p + 1;
            b = strtol(q, &end, 10);
            if (end == q) {
                rc = -1;
                break;
            }
            p = end;
        }
        if (a > b) {
            rc = -1;
            break;
        }
        if (a < 0 || b >= n_layers) {
            snprintf(err, errlen,
                     "--layers %s: layer %ld is out of range (the model has layers 0-%d)", s,
                     a < 0 ? a : b, n_layers - 1);
            free(mark);
            return -1;
        }
        for (long l = a; l <= b; l++) mark[l] = 1;
        if (*p == ',')
            p++;
        else if (*p)
            rc = -1;
    }
    if (rc) {
        snprintf(err, errlen, "--layers %s: expected ranges like 1-3,5", s);
        free(mark);
        return -1;
    }
    int cnt = 0;
    for (int l = 0; l < n_layers; l++) cnt += mark[l];
    if (!cnt) {
        snprintf(err, errlen, "--layers %s: no layer", s);
        free(mark);
        return -1;
    }
    *out = malloc((size_t)cnt * sizeof **out);
    if (!*out) {
        free(mark);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    *n = 0;
    for (int l = 0; l < n_layers; l++)
        if (mark[l]) (*out)[(*n)++] = l;
    free(mark);
    return 0;
}

/* ---- Data ------------------------------------------------------------------------------------ */

typedef struct {
    int32_t *tok; /* [n][T] */
    int n, T;
    long n_tokens; /* in the stream before cutting */
} rt_seqs;

/* One document per line of ids (base/ids.h). */
static int read_ids_stream(const char *path, int vocab, int32_t **out, long *n_out, char *err,
                           size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    base_ids ids = {0};
    char *line = NULL;
    size_t lcap = 0;
    int ln = 0, rc = 0;
    while (!rc && getline(&line, &lcap, f) >= 0) {
        char where[600];
        snprintf(where, sizeof where, "%s:%d", path, ++ln);
        rc = base_ids_parse(line, vocab, &ids, where, err, errlen);
    }
    free(line);
    fclose(f);
    if (rc) {
        base_ids_free(&ids);
        return -1;
    }
    *out = ids.v;
    *n_out = ids.n;
    return 0;
}

/* Text: documents separated by blank lines (lines of only white space), each tokenized with
 * the model's tokenizer (special tokens on: the post-processor's BOS starts every document). */
static int read_text_stream(const char *path, const char *model_dir, int vocab, int32_t **out,
                            long *n_out, char *err, size_t errlen)
{
    tok_tokenizer *tk = NULL;
    char e2[512];
    if (tok_load(model_dir, &tk, e2, sizeof e2)) {
        snprintf(err, errlen, "--data is text and needs the model's tokenizer: %s", e2);
        return -1;
    }
    if (tok_vocab_size(tk) > vocab) {
        snprintf(err, errlen, "%s: tokenizer has %d ids, the model's vocab_size is %d", model_dir,
                 tok_vocab_size(tk), vocab);
        tok_free(tk);
        return -1;
    }
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
        tok_free(tk);
        return -1;
    }
    base_ids all = {0};
    char *line = NULL, *doc = NULL;
    size_t lcap = 0, dlen = 0, dcap = 0;
    int rc = 0, eof = 0;
    while (!rc && !eof) {
        ssize_t got = getline(&line, &lcap, f);
        eof = got < 0;
        int blank = 1;
        for (ssize_t i = 0; i < got; i++) blank &= isspace((unsigned char)line[i]) != 0;
        if (!eof && !blank) { /* append the line to the document */
            if (dlen + (size_t)got + 1 > dcap) {
                size_t nc = (dlen + (size_t)got + 1) * 2;
                char *nd = realloc(doc, nc);
                if (!nd) {
                    snprintf(err, errlen, "out of memory reading %s", path);
                    rc = -1;
                    break;
                }
                doc = nd;
                dcap = nc;
            }
            memcpy(doc + dlen, line, (size_t)got);
            dlen += (size_t)got;
            continue;
        }
        if (!dlen) continue;
        while (dlen && (doc[dlen - 1] == '\n' || doc[dlen - 1] == '\r')) dlen--;
        int32_t *ids = NULL;
        int nid = 0;
        if (tok_encode(tk, doc, dlen, 1, &ids, &nid, e2, sizeof e2)) {
            snprintf(err, errlen, "%s: %s", path, e2);
            rc = -1;
            break;
        }
        for (int i = 0; i < nid && !rc; i++)
            if (base_ids_push(&all, ids[i])) {
                snprintf(err, errlen, "out of memory");
                rc = -1;
            }
        free(ids);
        dlen = 0;
    }
    free(line);
    free(doc);
    fclose(f);
    tok_free(tk);
    if (rc) {
        base_ids_free(&all);
        return -1;
    }
    *out = all.v;
    *n_out = all.n;
    return 0;
}

static int load_seqs(const char *text_path, const char *ids_path, const char *model_dir, int vocab,
                     int T, rt_seqs *s, char *err, size_t errlen)
{
    memset(s, 0, sizeof *s);
    int32_t *stream = NULL;
    long n = 0;
    int rc = ids_path ? read_ids_stream(ids_path, vocab, &stream, &n, err, errlen)
                      : read_text_stream(text_path, model_dir, vocab, &stream, &n, err, errlen);
    if (rc) return -1;
    s->T = T;
    s->n = (int)(n / T);
    s->n_tokens = n;
    s->tok = stream;
    return 0;
}

/* ---- Training -------------------------------------------------------------------------------- */

static volatile sig_atomic_t g_stop;
static void on_signal(int sig) { g_stop = sig; }

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double unif(uint64_t *s) { return (double)(splitmix(s) >> 11) / 9007199254740992.0; }

/* Fisher-Yates permutation of 0..n-1 */
static void shuffle(int *p, int n, uint64_t *s)
{
    for (int i = 0; i < n; i++) p[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(unif(s) * (i + 1));
        int t = p[i];
        p[i] = p[j];
        p[j] = t;
    }
}

typedef struct {
    int rank, size;
    train_setup setup;
    int n_routed, D, T, B;
    train_ws *ws;
    int32_t *shard; /* [max_local][T] */
    int max_local;
} rt_ctx;

/* Rank r's contiguous part [lo, hi) of n items. */
static void share(int n, int rank, int size, int *lo, int *hi)
{
    *lo = (int)((long)n * rank / size);
    *hi = (int)((long)n * (rank + 1) / size);
}

/* Forward (+ backward when grad_w) of the sequences idx [n] of s, split over the ranks. On
 * return every rank holds the batch totals: *nll (mean per target), *pen, kept [n_routed]
 * (gate mean), soft [n_routed] (sigmoid mean); grads summed over ranks (when requested).
 * Held-out batches (no backward) may exceed the workspace: they run in chunks. */
static int run_batch(rt_ctx *c, const rt_seqs *s, const int *idx, int n, const double *w,
                     const double *b, double *grad_w, double *grad_b, double *nll, double *pen,
                     double *kept, double *soft, char *err, size_t errlen)
{
    const int nr = c->n_routed, D = c->D, T = c->T;
    int lo, hi;
    share(n, c->rank, c->size, &lo, &hi);
    if (grad_w && hi - lo > c->max_local) {
        snprintf(err, errlen, "internal: shard of %d sequences exceeds the workspace (%d)", hi - lo,
                 c->max_local);
        return -1;
    }
    const double inv = 1.0 / ((double)n * (T - 1));
    const size_t nred = (size_t)2 * nr + 1, ngr = (size_t)nr * D + nr;
    /* loc/tot: [gate_sum nr][sig_sum nr][nll]; g/gt: [grad_w nr*D][grad_b nr] */
    double *loc = calloc(nred, sizeof *loc), *tot = calloc(nred, sizeof *tot);
    double *coef = calloc((size_t)nr, sizeof *coef);
    double *g = calloc(ngr, sizeof *g), *gt = calloc(ngr, sizeof *gt);
    int rc = 0;
    if (!loc || !tot || !coef || !g || !gt) {
        snprintf(err, errlen, "out of memory");
        rc = -1;
    }
    for (int c0 = lo; c0 < hi && !rc; c0 += c->max_local) {
        int m = hi - c0 < c->max_local ? hi - c0 : c->max_local;
        for (int j = 0; j < m; j++)
            memcpy(c->shard + (size_t)j * T, s->tok + (size_t)idx[c0 + j] * T,
                   (size_t)T * sizeof(int32_t));
        if (train_forward(c->ws, c->shard, m, w, b, inv, NULL, err, errlen)) {
            rc = -1;
            break;
        }
        const train_stats *st = train_ws_stats(c->ws);
        for (int i = 0; i < nr; i++) {
            loc[i] += st->gate_sum[i];
            loc[nr + i] += st->sig_sum[i];
        }
        loc[2 * nr] += st->nll_sum;
    }
    if (!rc) {
        /* the penalty's coefficient needs the kept fraction of the whole batch */
        MPI_Allreduce(loc, tot, (int)nred, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        double ng = c->setup.gran == STAGE_GRAN_TOKEN ? (double)n * T : (double)n;
        *pen = train_penalty_coef(&c->setup, tot, ng, coef);
        *nll = tot[2 * nr] * inv;
        for (int i = 0; i < nr; i++) {
            kept[i] = tot[i] / ng;
            soft[i] = tot[nr + i] / ng;
        }
    }
    if (!rc && grad_w) {
        train_backward(c->ws, coef, g, g + (size_t)nr * D);
        MPI_Allreduce(g, gt, (int)ngr, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        memcpy(grad_w, gt, (size_t)nr * D * sizeof *g);
        memcpy(grad_b, gt + (size_t)nr * D, (size_t)nr * sizeof *g);
    }
    free(loc);
    free(tot);
    free(coef);
    free(g);
    free(gt);
    return rc;
}

/* Every rank agrees on a failure (one rank's err is printed). */
static int agree(int rc, char *err)
{
    int first = comm_first_failed(MPI_COMM_WORLD, rc != 0);
    if (first >= 0) {
        MPI_Bcast(err, RT_ERR, MPI_CHAR, first, MPI_COMM_WORLD);
        return -1;
    }
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Random routers, calibrated layer by layer in order (a layer's inputs depend on the gates
 * of the earlier ones): b_i puts the threshold between the skip_i-quantile of w_i.(h | mean h)
 * over every gate of the data and the next value. Single-rank work (each rank does the same). */
static int calibrate_random(rt_ctx *c, const rt_seqs *s, const double *skip, double thr,
                            uint64_t seed, double *w, double *b, char *err, size_t errlen)
{
    const int nr = c->n_routed, D = c->D, T = c->T;
    const long per = c->setup.gran == STAGE_GRAN_TOKEN ? (long)T : 1;
    double *z = malloc((size_t)s->n * per * sizeof *z);
    double *zc = malloc((size_t)c->max_local * T * sizeof *zc);
    if (!z || !zc) {
        free(z);
        free(zc);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    uint64_t rs = seed * 0x9e3779b97f4a7c15ull + 7;
    for (int i = 0; i < nr; i++) {
        for (int k = 0; k < D; k++) {
            double u1 = unif(&rs), u2 = unif(&rs);
            w[(size_t)i * D + k] =
                sqrt(-2.0 * log(u1 + 1e-300)) * cos(2 * M_PI * u2) / sqrt((double)D);
        }
        b[i] = 1e3; /* open until calibrated */
    }
    const double logit_thr = log(thr / (1.0 - thr));
    int rc = 0;
    train_ws_set_gate(c->ws, TRAIN_GATE_STE);
    for (int i = 0; i < nr && !rc; i++) {
        b[i] = 0.0;
        long nz = 0;
        for (int c0 = 0; c0 < s->n && !rc; c0 += c->max_local) {
            int m = s->n - c0 < c->max_local ? s->n - c0 : c->max_local;
            if (train_forward(c->ws, s->tok + (size_t)c0 * T, m, w, b, 1.0, NULL, err, errlen)) {
                rc = -1;
                break;
            }
            long ng = train_ws_stats(c->ws)->n_gates;
            train_ws_gates(c->ws, i, zc, NULL, NULL);
            memcpy(z + nz, zc, (size_t)ng * sizeof *z);
            nz += ng;
        }
        if (rc) break;
        qsort(z, (size_t)nz, sizeof *z, cmp_double);
        long k = (long)floor(skip[i] * nz + 0.5); /* gates to skip */
        double cut = k <= 0 ? z[0] - 1.0 : k >= nz ? z[nz - 1] + 1.0 : 0.5 * (z[k - 1] + z[k]);
        b[i] = logit_thr - cut; /* kept iff z + b > logit(thr) iff z > cut */
    }
    train_ws_set_gate(c->ws, c->setup.gate);
    free(z);
    free(zc);
    return rc;
}

static int quiet_flag(const cli_opts *a) { return cli_opt_str(a, "quiet") != NULL; }

static double mean_of(const double *v, int n)
{
    double s = 0;
    for (int i = 0; i < n; i++) s += v[i];
    return s / n;
}

int cli_routertune_main(int argc, char **argv)
{
    char err[RT_ERR] = "";
    cli_opts a;
    int rank, size, rc;
    if (cli_mpi_start(CLI_ROUTER_TUNE, argc, argv, 0, rt_usage, &a, &rank, &size, &rc, err,
                      sizeof err))
        return 0;
    int exit_code = 1;
    stage_config cfg;
    memset(&cfg, 0, sizeof cfg);
    int have_cfg = 0;
    int *layers = NULL, n_routed = 0;
    rt_seqs tr, ev;
    memset(&tr, 0, sizeof tr);
    memset(&ev, 0, sizeof ev);
    train_model *tm = NULL;
    rt_ctx c;
    memset(&c, 0, sizeof c);
    c.rank = rank;
    c.size = size;
    double *w = NULL, *b = NULL, *gw = NULL, *gb = NULL, *best_w = NULL, *best_b = NULL;
    double *kept = NULL, *soft = NULL;
    int *perm = NULL;
    uint8_t *wd_mask = NULL;
    train_adamw opt;
    memset(&opt, 0, sizeof opt);
    cJSON *record = NULL;

    const char *model = rc ? NULL : cli_opt_str(&a, "model"),
               *out = rc ? NULL : cli_opt_str(&a, "out");
    const char *dump = rc ? NULL : cli_opt_str(&a, "dump-sequences");
    if (!rc && !model) {
        snprintf(err, sizeof err, "--model DIR is required (see modpipe router-tune --help)");
        rc = -1;
    }
    if (!rc && !out && !dump) {
        snprintf(err, sizeof err, "--out DIR is required");
        rc = -1;
    }
    if (!rc && !!cli_opt_str(&a, "data") + !!cli_opt_str(&a, "data-ids") != 1) {
        snprintf(err, sizeof err, "give exactly one of --data FILE and --data-ids FILE");
        rc = -1;
    }
    if (!rc && cli_opt_str(&a, "eval-data") && cli_opt_str(&a, "eval-data-ids")) {
        snprintf(err, sizeof err, "give at most one of --eval-data and --eval-data-ids");
        rc = -1;
    }
    long T = 0, B = 0, steps = 0, seed = 0, eval_every = 0, log_every = 0, threads = 1;
    double tskip = 0, thr = 0, lambda = 0, lr = 0, wd = 0, b0 = 0;
    if (!rc) rc = cli_opt_long(&a, "seq-len", 2, 1 << 20, 128, &T, err, sizeof err);
    if (!rc) rc = cli_opt_long(&a, "batch", 1, 1 << 20, 16, &B, err, sizeof err);
    if (!rc) rc = cli_opt_long(&a, "steps", 0, 100000000, 200, &steps, err, sizeof err);
    if (!rc) rc = cli_opt_long(&a, "seed", 0, LONG_MAX, 0, &seed, err, sizeof err);
    if (!rc) rc = cli_opt_long(&a, "eval-every", 1, 100000000, 25, &eval_every, err, sizeof err);
    if (!rc) rc = cli_opt_long(&a, "log-every", 1, 100000000, 10, &log_every, err, sizeof err);
    if (!rc) rc = cli_opt_long(&a, "threads", 1, 1024, 1, &threads, err, sizeof err);
    if (!rc) rc = cli_opt_double(&a, "target-skip", 0.0, 1.0, 1, 0.3, &tskip, err, sizeof err);
    if (!rc) rc = cli_opt_double(&a, "threshold", 0.0, 1.0, 1, 0.5, &thr, err, sizeof err);
    if (!rc) rc = cli_opt_double(&a, "lambda", 0.0, 1e9, 0, 1.0, &lambda, err, sizeof err);
    if (!rc) rc = cli_opt_double(&a, "lr", 0.0, 1e3, 0, 0.01, &lr, err, sizeof err);
    if (!rc) rc = cli_opt_double(&a, "weight-decay", 0.0, 1e3, 0, 0.0, &wd, err, sizeof err);
    if (!rc) rc = cli_opt_double(&a, "init-bias", -1e3, 1e3, 0, 0.5, &b0, err, sizeof err);
    static const char *const lr_decays[] = {"linear", "none", NULL};
    static const char *const grans[] = {"sequence", "token", NULL};
    static const char *const gates[] = {"ste", "soft", NULL};
    static const char *const pens[] = {"global", "layer", NULL};
    int lrd = 0, gr = 0, gt = 0, pn = 0;
    if (!rc) rc = cli_opt_choice(&a, "lr-decay", lr_decays, 0, &lrd, err, sizeof err);
    if (!rc) rc = cli_opt_choice(&a, "granularity", grans, 0, &gr, err, sizeof err);
    if (!rc) rc = cli_opt_choice(&a, "gate", gates, 0, &gt, err, sizeof err);
    if (!rc) rc = cli_opt_choice(&a, "penalty", pens, 0, &pn, err, sizeof err);
    int lr_linear = lrd == 0;
    stage_granularity gran = gr ? STAGE_GRAN_TOKEN : STAGE_GRAN_SEQUENCE;
    train_gate gate = gt ? TRAIN_GATE_SOFT : TRAIN_GATE_STE;
    train_penalty pen = pn ? TRAIN_PENALTY_LAYER : TRAIN_PENALTY_GLOBAL;
    if (!rc && B < size) {
        snprintf(err, sizeof err,
                 "--batch %ld is smaller than the %d ranks: every rank needs a "
                 "sequence of each batch",
                 B, size);
        rc = -1;
    }
    if (!rc) rc = stage_config_load(model, &cfg, err, sizeof err);
    have_cfg = !rc;
    if (!rc && T > cfg.max_pos) {
        snprintf(err, sizeof err, "--seq-len %ld exceeds the model's max_position_embeddings %d", T,
                 cfg.max_pos);
        rc = -1;
    }
    if (!rc) {
        if (cli_opt_str(&a, "layers"))
            rc = parse_layers(cli_opt_str(&a, "layers"), cfg.n_layers, &layers, &n_routed, err,
                              sizeof err);
        else if (cfg.n_layers < 2) {
            snprintf(err, sizeof err, "the model has one layer: give --layers 0");
            rc = -1;
        } else {
            char def[32];
            snprintf(def, sizeof def, "1-%d", cfg.n_layers - 1);
            rc = parse_layers(def, cfg.n_layers, &layers, &n_routed, err, sizeof err);
        }
    }
    /* existing routers: refuse, or continue from them with --resume */
    st_model *stm = NULL;
    int resume = !rc && cli_opt_str(&a, "resume");
    if (!rc) rc = st_open(model, &stm, err, sizeof err);
    if (!rc) {
        for (int i = 0; i < n_routed && !rc; i++) {
            char name[128];
            st_tensor t;
            snprintf(name, sizeof name, "model.layers.%d.router.weight", layers[i]);
            int has = st_find(stm, name, &t, err, sizeof err);
            if (has < 0) {
                rc = -1;
                break;
            }
            if (has && !resume) {
                snprintf(err, sizeof err,
                         "%s: layer %d already has a router (%s): refusing to "
                         "overwrite it; --resume continues training from it",
                         model, layers[i], name);
                rc = -1;
            } else if (!has && resume) {
                snprintf(err, sizeof err, "--resume: %s has no router on layer %d to continue from",
                         model, layers[i]);
                rc = -1;
            }
        }
    }
    const int D = have_cfg ? cfg.hidden : 0;
    if (!rc) {
        w = calloc((size_t)n_routed * D + n_routed, sizeof *w);
        gw = calloc((size_t)n_routed * D + n_routed, sizeof *gw);
        best_w = calloc((size_t)n_routed * D + n_routed, sizeof *best_w);
        kept = calloc((size_t)n_routed, sizeof *kept);
        soft = calloc((size_t)n_routed, sizeof *soft);
        wd_mask = calloc((size_t)n_routed * D + n_routed, 1);
        if (!w || !gw || !best_w || !kept || !soft || !wd_mask) {
            snprintf(err, sizeof err, "out of memory");
            rc = -1;
        } else {
            b = w + (size_t)n_routed * D;
            gb = gw + (size_t)n_routed * D;
            best_b = best_w + (size_t)n_routed * D;
            memset(wd_mask, 1, (size_t)n_routed * D);
        }
    }
    /* router init: resume from the model's, else w ~ N(0, 0.01^2) and b = init-bias (open) */
    if (!rc) {
        uint64_t rs = (uint64_t)seed * 2654435761u + 1;
        for (int i = 0; i < n_routed && !rc; i++) {
            if (resume) {
                char name[128];
                int64_t shp[2] = {1, D};
                snprintf(name, sizeof name, "model.layers.%d.router.weight", layers[i]);
                const float *pw = st_get_f32(stm, name, 2, shp, err, sizeof err);
                if (!pw) {
                    rc = -1;
                    break;
                }
                for (int c2 = 0; c2 < D; c2++) w[(size_t)i * D + c2] = pw[c2];
                st_tensor t;
                snprintf(name, sizeof name, "model.layers.%d.router.bias", layers[i]);
                int has = st_find(stm, name, &t, err, sizeof err);
                const float *pb = has > 0 ? st_get_f32(stm, name, 1, shp, err, sizeof err) : NULL;
                if (has < 0 || (has > 0 && !pb)) {
                    rc = -1;
                    break;
                }
                b[i] = pb ? pb[0] : 0.0;
            } else {
                for (int c2 = 0; c2 < D; c2++) {
                    double u1 = unif(&rs), u2 = unif(&rs);
                    w[(size_t)i * D + c2] =
                        0.01 * sqrt(-2.0 * log(u1 + 1e-300)) * cos(2 * M_PI * u2);
                }
                b[i] = b0;
            }
        }
    }
    st_close(stm);
    if (!rc)
        rc = load_seqs(cli_opt_str(&a, "data"), cli_opt_str(&a, "data-ids"), model, cfg.vocab,
                       (int)T, &tr, err, sizeof err);
    if (!rc && !dump && tr.n < B) {
        snprintf(err, sizeof err,
                 "%s: %ld tokens make %d sequences of %ld, fewer than one batch "
                 "(--batch %ld needs %ld tokens)",
                 cli_opt_str(&a, "data") ? cli_opt_str(&a, "data") : cli_opt_str(&a, "data-ids"),
                 tr.n_tokens, tr.n, T, B, B * T);
        rc = -1;
    }
    const char *evp = rc                             ? NULL
                      : cli_opt_str(&a, "eval-data") ? cli_opt_str(&a, "eval-data")
                                                     : cli_opt_str(&a, "eval-data-ids");
    if (evp) {
        rc = load_seqs(cli_opt_str(&a, "eval-data"), cli_opt_str(&a, "eval-data-ids"), model,
                       cfg.vocab, (int)T, &ev, err, sizeof err);
        if (!rc && ev.n < size) {
            snprintf(err, sizeof err,
                     "%s: %ld tokens make %d held-out sequences of %ld; need at least "
                     "one per rank (%d)",
                     evp, ev.n_tokens, ev.n, T, size);
            rc = -1;
        }
    }
    if (agree(rc, err)) goto done;

    if (dump) {
        const rt_seqs *ds = evp ? &ev : &tr;
        if (rank == 0) {
            FILE *f = fopen(dump, "w");
            if (!f) {
                snprintf(err, sizeof err, "cannot write %s: %s", dump, strerror(errno));
                goto done_err;
            }
            for (int i = 0; i < ds->n; i++)
                for (int t = 0; t < ds->T; t++)
                    fprintf(f, "%d%c", ds->tok[(size_t)i * ds->T + t], t + 1 < ds->T ? ',' : '\n');
            if (fclose(f)) {
                snprintf(err, sizeof err, "cannot write %s", dump);
                goto done_err;
            }
            fprintf(stderr, "router-tune: wrote %d sequences of %d tokens to %s\n", ds->n, ds->T,
                    dump);
        }
        exit_code = 0;
        goto done;
    }

    openblas_set_num_threads((int)threads); /* the trainer calls cblas_sgemm directly */
    rc = train_model_load(model, &tm, err, sizeof err);
    c.setup = (train_setup){n_routed, layers, gran, gate, pen, thr, 1.0 - tskip, lambda};
    c.n_routed = n_routed;
    c.D = D;
    c.T = (int)T;
    c.B = (int)B;
    {
        int lo, hi, mx = 0;
        for (int r = 0; r < size; r++) {
            share((int)B, r, size, &lo, &hi);
            if (hi - lo > mx) mx = hi - lo;
        }
        c.max_local = mx;
    }
    if (!rc) {
        c.ws = train_ws_new(tm, &c.setup, c.max_local, (int)T, 0, err, sizeof err);
        c.shard = malloc((size_t)c.max_local * T * sizeof *c.shard);
        perm = malloc((size_t)(tr.n > ev.n ? tr.n : ev.n) * sizeof *perm);
        if (!c.ws)
            rc = -1;
        else if (!c.shard || !perm || train_adamw_init(&opt, n_routed * D + n_routed)) {
            snprintf(err, sizeof err, "out of memory");
            rc = -1;
        }
    }
    if (agree(rc, err)) goto done;

    if (cli_opt_str(&a, "random-skip")) {
        double *fr = calloc((size_t)n_routed, sizeof *fr);
        const char *p = cli_opt_str(&a, "random-skip");
        int nf = 0;
        rc = fr ? 0 : -1;
        while (!rc && *p) {
            char *end;
            double v = strtod(p, &end);
            if (end == p || !(v >= 0 && v <= 1) || nf >= n_routed) {
                rc = -1;
                break;
            }
            fr[nf++] = v;
            p = end;
            if (*p == ',') p++;
        }
        if (rc || nf != n_routed) {
            snprintf(err, sizeof err,
                     "--random-skip %s: expected %d fractions in [0, 1] (one per "
                     "routed layer)",
                     cli_opt_str(&a, "random-skip"), n_routed);
            rc = -1;
        }
        if (!rc) rc = calibrate_random(&c, &tr, fr, thr, (uint64_t)seed, w, b, err, sizeof err);
        free(fr);
        if (agree(rc, err)) goto done;
        record = cJSON_CreateObject();
        cJSON_AddStringToObject(
            record, "method",
            "random routers (baseline), biases calibrated by modpipe router-tune --random-skip");
        cJSON_AddStringToObject(record, "random_skip", cli_opt_str(&a, "random-skip"));
        if (rank == 0) {
            rt_out o = {model, out, layers, n_routed, D, gran, thr, record};
            rc = cli_rt_write_output(&o, w, b, err, sizeof err);
            if (!rc && !quiet_flag(&a))
                fprintf(stderr, "router-tune: wrote random routers to %s\n", out);
        }
        MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
        exit_code = rc ? 1 : 0;
        if (rc && rank == 0) fprintf(stderr, "modpipe router-tune: %s\n", err);
        goto cleanup;
    }

    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    const int quiet = cli_opt_str(&a, "quiet") != NULL;
    if (rank == 0 && !quiet) {
        fprintf(stderr, "router-tune: %d rank%s, layers", size, size > 1 ? "s" : "");
        for (int i = 0; i < n_routed; i++) fprintf(stderr, "%s%d", i ? "," : " ", layers[i]);
        fprintf(stderr,
                " (%s, %s gate, %s penalty), target skip %.3f, %d training sequences "
                "of %ld%s, batch %ld, %ld steps\n",
                gran == STAGE_GRAN_TOKEN ? "token" : "sequence",
                gate == TRAIN_GATE_STE ? "STE" : "soft",
                pen == TRAIN_PENALTY_GLOBAL ? "global" : "per-layer", tskip, tr.n, T,
                evp ? ", held-out loss picks the best routers" : "", B, steps);
    }
    uint64_t order = (uint64_t)seed ^ 0x5deece66dull;
    int epoch_pos = tr.n; /* reshuffle at the start */
    double best = INFINITY;
    long best_step = -1, step = 0;
    double t0 = base_now_s(), tlog = t0;
    long tok_log = 0;
    int *bidx = malloc((size_t)B * sizeof *bidx);
    int *eidx = malloc((size_t)(ev.n ? ev.n : 1) * sizeof *eidx);
    if (!bidx || !eidx) {
        rc = -1;
        snprintf(err, sizeof err, "out of memory");
    }
    for (int i = 0; i < ev.n && eidx; i++) eidx[i] = i;
    memcpy(best_w, w, ((size_t)n_routed * D + n_routed) * sizeof *w);
    int interrupted = 0;
    for (step = 0; !rc && step <= steps; step++) {
        /* everyone stops together */
        int stop = g_stop != 0, any = 0;
        MPI_Allreduce(&stop, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        if (any) {
            interrupted = 1;
            break;
        }
        double nll, pl;
        if (evp && (step % eval_every == 0 || step == steps)) {
            /* held-out loss with the inference gate (hard threshold), no backward */
            train_ws_set_gate(c.ws, TRAIN_GATE_STE);
            rc = run_batch(&c, &ev, eidx, ev.n, w, b, NULL, NULL, &nll, &pl, kept, soft, err,
                           sizeof err);
            train_ws_set_gate(c.ws, gate);
            if (rc) break;
            double eb = nll + pl;
            if (eb < best) {
                best = eb;
                best_step = step;
                memcpy(best_w, w, ((size_t)n_routed * D + n_routed) * sizeof *w);
            }
            if (rank == 0 && !quiet)
                fprintf(stderr,
                        "router-tune: step %ld held-out: nll %.4f (ppl %.3f) + penalty %.4f, "
                        "kept %.3f%s\n",
                        step, nll, exp(nll), pl, mean_of(kept, n_routed),
                        best_step == step ? " (best)" : "");
        }
        if (step == steps) break;
        for (int j = 0; j < B; j++) {
            if (epoch_pos >= tr.n) {
                shuffle(perm, tr.n, &order);
                epoch_pos = 0;
            }
            bidx[j] = perm[epoch_pos++];
        }
        memset(gw, 0, ((size_t)n_routed * D + n_routed) * sizeof *gw);
        rc = run_batch(&c, &tr, bidx, (int)B, w, b, gw, gb, &nll, &pl, kept, soft, err, sizeof err);
        if (rc) break;
        double lr_t = lr_linear ? lr * (1.0 - (double)step / (double)steps) : lr;
        train_adamw_step(&opt, w, gw, lr_t, wd, wd_mask);
        MPI_Bcast(w, n_routed * D + n_routed, MPI_DOUBLE, 0, MPI_COMM_WORLD);
        if (!evp) { /* without held-out data the current routers are the result */
            memcpy(best_w, w, ((size_t)n_routed * D + n_routed) * sizeof *w);
            best_step = step + 1;
        }
        tok_log += B * T;
        if (rank == 0 && !quiet && ((step + 1) % log_every == 0 || step + 1 == steps)) {
            double now = base_now_s();
            fprintf(stderr,
                    "router-tune: step %ld/%ld loss %.4f (nll %.4f + penalty %.4f) kept %.3f "
                    "(soft %.3f) %.0f tok/s\n",
                    step + 1, steps, nll + pl, nll, pl, mean_of(kept, n_routed),
                    mean_of(soft, n_routed), tok_log / (now - tlog + 1e-12));
            tlog = now;
            tok_log = 0;
        }
    }
    if (agree(rc, err)) {
        free(bidx);
        free(eidx);
        goto done;
    }
    double secs = base_now_s() - t0;
    record = cJSON_CreateObject();
    cJSON_AddStringToObject(
        record, "method", "Router-Tuning (He et al. 2024, arXiv 2410.13184), modpipe router-tune");
    cJSON_AddStringToObject(record, "gate", gate == TRAIN_GATE_STE ? "ste" : "soft");
    cJSON_AddStringToObject(record, "penalty", pen == TRAIN_PENALTY_GLOBAL ? "global" : "layer");
    cJSON_AddNumberToObject(record, "target_skip", tskip);
    cJSON_AddNumberToObject(record, "lambda", lambda);
    cJSON_AddNumberToObject(record, "lr", lr);
    cJSON_AddStringToObject(record, "lr_decay", lr_linear ? "linear" : "none");
    cJSON_AddNumberToObject(record, "seq_len", (double)T);
    cJSON_AddNumberToObject(record, "batch", (double)B);
    cJSON_AddNumberToObject(record, "steps_done", (double)step);
    cJSON_AddNumberToObject(record, "routers_from_step", (double)best_step);
    if (evp) cJSON_AddNumberToObject(record, "heldout_loss", best);
    cJSON_AddNumberToObject(record, "ranks", size);
    if (rank == 0) {
        rt_out o = {model, out, layers, n_routed, D, gran, thr, record};
        if (cli_rt_write_output(&o, best_w, best_b, err, sizeof err)) rc = -1;
    }
    MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (rc) {
        if (rank == 0) fprintf(stderr, "modpipe router-tune: %s\n", err);
        free(bidx);
        free(eidx);
        goto done;
    }
    if (rank == 0 && !quiet)
        fprintf(stderr,
                "router-tune: %s after %ld steps (%.1f s, %.0f training tok/s): wrote %s "
                "(routers of step %ld)\n",
                interrupted ? "interrupted" : "done", step, secs,
                secs > 0 ? (double)step * B * T / secs : 0.0, out, best_step);
    exit_code = interrupted ? 130 : 0;
    free(bidx);
    free(eidx);
    goto done;
done_err:
    fprintf(stderr, "modpipe router-tune: %s\n", err);
    exit_code = 1;
    goto cleanup;
done:
    if (exit_code == 1 && rank == 0) fprintf(stderr, "modpipe router-tune: %s\n", err);
cleanup:
    cJSON_Delete(record);
    train_adamw_free(&opt);
    train_ws_free(c.ws);
    free(c.shard);
    train_model_free(tm);
    free(tr.tok);
    free(ev.tok);
    free(layers);
    free(w);
    free(gw);
    free(best_w);
    free(kept);
    free(soft);
    free(perm);
    free(wd_mask);
    if (have_cfg) stage_config_free(&cfg);
    cli_opts_free(&a);
    MPI_Finalize();
    return exit_code;
}
