/* cli/quantize.c — `modpipe quantize`. See quantize.h. */
#include "cli/quantize.h"

#include <cJSON.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "cli/files.h"
#include "cli/opts.h"
#include "stage/config.h"
#include "stage/safetensors.h"
#include "stage/stage.h"

/* The pass a tensor's bytes go out in: 0 f32, 1 16-bit (the scales too), 2 int8. */
static int pass_of(stage_dtype d) { return d == STAGE_F32 ? 0 : d == STAGE_Q8_0 ? 2 : 1; }

/* The projections --skip keeps as stored: module names ("lm_head"), NUL-separated. */
typedef struct {
    char *names; /* owned */
    size_t len;
} skip_set;

static int is_quantized(const char *name, const st_tensor *t, const skip_set *k)
{
    return t->ndim == 2 && stage_q8_quantizes(name) &&
           !stage_q8_module_listed(k->names, k->len, name);
}

/* --skip values (each a comma-separated list of module or tensor names) into k, each checked
 * against the model: a name that is not one of its quantized projections is an error. */
static int parse_skip(const char *const *vals, int nv, st_model *in, skip_set *k, char *err,
                      size_t errlen)
{
    size_t cap = 0;
    for (int i = 0; i < nv; i++) cap += strlen(vals[i]) + 1;
    k->names = cap ? malloc(cap) : NULL;
    k->len = 0;
    if (cap && !k->names) return (snprintf(err, errlen, "out of memory"), -1);
    for (int i = 0; i < nv; i++)
        for (const char *p = vals[i]; *p;) {
            size_t n = strcspn(p, ",");
            char mod[480], tn[512];
            if (n == 0 || n >= sizeof mod) {
                snprintf(err, errlen, "--skip %s: %s", vals[i],
                         n ? "a name too long" : "an empty name (NAME,NAME,...)");
                return -1;
            }
            memcpy(mod, p, n);
            mod[n] = 0;
            if (n > 7 && !strcmp(mod + n - 7, ".weight")) mod[n - 7] = 0;
            snprintf(tn, sizeof tn, "%s.weight", mod);
            st_tensor t;
            int f = st_find(in, tn, &t, err, errlen);
            if (f < 0) return -1;
            if (f == 0 || t.ndim != 2 || !stage_q8_quantizes(tn)) {
                snprintf(err, errlen,
                         "--skip %s: %s %s%s (projections: the attention, MLP and expert "
                         "matrices and an untied lm_head, e.g. model.layers.0.mlp.down_proj)",
                         mod, f == 0 ? "no tensor" : "tensor", tn,
                         f == 0 ? " in the model" : " is not a projection this command quantizes");
                return -1;
            }
            size_t ml = strlen(mod) + 1;
            memcpy(k->names + k->len, mod, ml);
            k->len += ml;
            p += n + (p[n] == ',');
        }
    return 0;
}

/* Rows of tensor t through Q8_0, writing the q rows (part 2) or the scale rows (part 1). */
static int write_q8(st_stream *s, const char *name, const st_tensor *t, int part, float *row,
                    int8_t *q, uint16_t *d, char *err, size_t errlen)
{
    const size_t rows = (size_t)t->shape[0], cols = (size_t)t->shape[1];
    const size_t nb = (size_t)stage_q8_blocks((int)cols), es = stage_dtype_size(t->dtype);
    for (size_t r = 0; r < rows; r++) {
        stage_dtype_to_f32(t->dtype, (const char *)t->data + r * cols * es, row, cols);
        if (stage_q8_quantize_row(row, (int)cols, q, d)) {
            snprintf(err, errlen, "%s: tensor %s: a non-finite value in row %zu cannot be q8_0",
                     t->file, name, r);
            return -1;
        }
        if (part == 2 ? st_stream_write(s, q, cols, err, errlen)
                      : st_stream_write(s, d, nb * sizeof *d, err, errlen))
            return -1;
    }
    return 0;
}

/* config.json: src's with the quantization_config of docs/SPEC.md §9, whose ignore list names
 * every Linear module left in its dtype (routers, the MoE gate, the --skip projections): the
 * 2-D NAME.weight tensors not quantized, the embedding aside. */
static int write_config(const char *src, const char *dst, st_model *in, const skip_set *k,
                        char *err, size_t errlen)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/config.json", src);
    char *text = base_read_file(path, 0, NULL, NULL, 0);
    if (!text) {
        snprintf(err, errlen, "cannot read %s", path);
        return -1;
    }
    const size_t n = st_count(in);
    char **ig = calloc(n ? n : 1, sizeof *ig);
    int ni = 0, rc = ig ? 0 : -1;
    for (size_t i = 0; i < n && !rc; i++) {
        const char *name = st_name_at(in, i);
        st_tensor t;
        size_t l = strlen(name);
        if (l <= 7 || strcmp(name + l - 7, ".weight") || !strcmp(name, "model.embed_tokens.weight"))
            continue;
        if (st_find(in, name, &t, err, errlen) != 1) {
            rc = -1;
            break;
        }
        if (t.ndim != 2 || is_quantized(name, &t, k)) continue;
        ig[ni] = strndup(name, l - 7);
        rc = ig[ni++] ? 0 : -1;
    }
    char *out = rc ? NULL : stage_q8_quant_config_json((const char *const *)ig, ni, text);
    for (int i = 0; i < ni; i++) free(ig[i]);
    free(ig);
    free(text);
    if (!out) {
        if (!err[0]) snprintf(err, errlen, "%s: cannot write its quantization_config", path);
        return -1;
    }
    snprintf(path, sizeof path, "%s/config.json", dst);
    rc = cli_write_text(path, out, err, errlen);
    free(out);
    return rc;
}

int cli_quantize(const char *src, const char *dst, const char *const *skip, int n_skip, FILE *log,
                 char *err, size_t errlen)
{
    stage_config cfg;
    err[0] = 0;
    if (stage_config_load(src, &cfg, err, errlen)) return -1;
    int already = cfg.q8_0;
    stage_config_free(&cfg);
    if (already) {
        snprintf(err, errlen,
                 "%s: already quantized (its config.json has a q8_0 "
                 "quantization_config)",
                 src);
        return -1;
    }
    char path[PATH_MAX];
    if (cli_mkdir_p(dst, err, errlen)) return -1;
    snprintf(path, sizeof path, "%s/model.safetensors", dst);
    char *rs = realpath(src, NULL), *rd = realpath(dst, NULL);
    int same = rs && rd && !strcmp(rs, rd);
    free(rs);
    free(rd);
    if (same || cli_file_exists(path)) {
        snprintf(err, errlen, "%s: %s; use a fresh --out", dst,
                 same ? "is the source directory" : "holds a model.safetensors already");
        return -1;
    }
    st_model *in = NULL;
    if (st_open(src, &in, err, errlen)) return -1;
    skip_set k = {NULL, 0};
    if (parse_skip(skip, n_skip, in, &k, err, errlen)) {
        free(k.names);
        st_close(in);
        return -1;
    }
    st_stream *s = st_stream_new();
    const size_t n = st_count(in);
    size_t maxcols = 1, n_q = 0;
    int rc = s ? 0 : (snprintf(err, errlen, "out of memory"), -1);
    /* declare: three passes by element size, so every tensor lands aligned to its size */
    for (int pass = 0; pass < 3 && !rc; pass++)
        for (size_t i = 0; i < n && !rc; i++) {
            const char *name = st_name_at(in, i);
            st_tensor t;
            if (st_find(in, name, &t, err, errlen) != 1) {
                rc = -1;
                break;
            }
            if (t.dtype == STAGE_Q8_0) {
                snprintf(err, errlen, "%s: tensor %s is I8 already", t.file, name);
                rc = -1;
            } else if (is_quantized(name, &t, &k)) {
                if ((size_t)t.shape[1] > maxcols) maxcols = (size_t)t.shape[1];
                char sname[512];
                snprintf(sname, sizeof sname, "%s_scale", name);
                int64_t ss[2] = {t.shape[0], stage_q8_blocks((int)t.shape[1])};
                if (pass == 1) rc = st_stream_declare(s, sname, STAGE_F16, 2, ss);
                if (pass == 2) rc = st_stream_declare(s, name, STAGE_Q8_0, 2, t.shape);
                n_q += pass == 2;
            } else if (pass_of(t.dtype) == pass) {
                rc = st_stream_declare(s, name, t.dtype, t.ndim, t.shape);
            }
            if (rc && !err[0]) snprintf(err, errlen, "%s: cannot declare tensor %s", src, name);
        }
    float *row = malloc(maxcols * sizeof *row);
    int8_t *q = malloc(maxcols);
    uint16_t *d = malloc((size_t)stage_q8_blocks((int)maxcols) * sizeof *d);
    if (!rc && (!row || !q || !d)) rc = (snprintf(err, errlen, "out of memory"), -1);
    if (!rc) rc = st_stream_begin(s, dst, 1, err, errlen);
    if (!rc && log)
        fprintf(log, "quantize: %zu tensors, %zu of them to q8_0, %.1f MiB -> %s\n", n, n_q,
                (double)st_stream_total_bytes(s) / (1024.0 * 1024.0), path);
    for (int pass = 0; pass < 3 && !rc; pass++)
        for (size_t i = 0; i < n && !rc; i++) {
            const char *name = st_name_at(in, i);
            st_tensor t;
            rc = st_find(in, name, &t, err, errlen) == 1 ? 0 : -1;
            if (rc) break;
            if (is_quantized(name, &t, &k)) {
                if (pass > 0) rc = write_q8(s, name, &t, pass, row, q, d, err, errlen);
            } else if (pass_of(t.dtype) == pass) {
                rc = st_stream_write(s, t.data, t.nbytes, err, errlen);
            }
        }
    if (!rc) rc = st_stream_finish(s, err, errlen);
    free(row);
    free(q);
    free(d);
    st_stream_free(s); /* removes the files of an unfinished stream */
    if (!rc) rc = write_config(src, dst, in, &k, err, errlen);
    st_close(in);
    free(k.names);
    if (!rc) rc = cli_copy_side_files(src, dst, err, errlen);
    return rc;
}

int cli_quantize_main(int argc, char **argv)
{
    char err[1024];
    cli_opts o;
    int rc = cli_opts_parse(&o, CLI_QUANTIZE, argc, argv, err, sizeof err);
    if (!rc && cli_opt_has(&o, "help")) {
        cli_opts_usage(
            stdout, CLI_QUANTIZE,
            "modpipe quantize: write a copy of a model with its projections (attention, MLP,\n"
            "experts, untied lm_head) stored as Q8_0 (int8 blocks of 32 + an f16 scale,\n"
            "docs/SPEC.md §9), the embedding, MoE gate, norms and routers as stored. The\n"
            "result loads in place (no conversion, no --weights-dtype needed) and computes the\n"
            "same bits as --weights-dtype q8_0 on the original (--skip: those projections stay\n"
            "as stored). config.json gets a compressed-tensors quantization_config (format\n"
            "int-quantized, 8-bit groups of 32). No MPI needed.\n",
            NULL);
        cli_opts_free(&o);
        return 0;
    }
    const char *model = rc ? NULL : cli_opt_str(&o, "model"),
               *out = rc ? NULL : cli_opt_str(&o, "out");
    if (!rc && (!model || !out)) {
        snprintf(err, sizeof err, "--model DIR and --out DIR are required");
        rc = -1;
    }
    static const char *const dtypes[] = {"q8_0", NULL};
    int dt = 0;
    if (!rc && cli_opt_has(&o, "dtype") &&
        cli_opt_choice(&o, "dtype", dtypes, 0, &dt, err, sizeof err))
        rc = -1;
    FILE *log = !rc && cli_opt_has(&o, "quiet") ? NULL : stderr;
    const cli_opt_val *sk = rc ? NULL : cli_opt(&o, "skip");
    if (!rc)
        rc = cli_quantize(model, out, (const char *const *)sk->vals, sk->n, log, err, sizeof err);
    if (rc)
        fprintf(stderr, "modpipe quantize: %s\n", err);
    else if (log)
        fprintf(log, "quantize: wrote %s\n", out);
    cli_opts_free(&o);
    return rc ? 1 : 0;
}
