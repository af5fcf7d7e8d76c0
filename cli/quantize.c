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

static int is_quantized(const char *name, const st_tensor *t)
{
    return t->ndim == 2 && stage_q8_quantizes(name);
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

static int write_config(const char *src, const char *dst, char *err, size_t errlen)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/config.json", src);
    char *text = base_read_file(path, 0, NULL, NULL, 0);
    cJSON *root = text ? cJSON_Parse(text) : NULL;
    free(text);
    if (!root) {
        snprintf(err, errlen, "cannot read %s as JSON", path);
        return -1;
    }
    cJSON_DeleteItemFromObjectCaseSensitive(root, "quantization_config");
    cJSON *q = cJSON_AddObjectToObject(root, "quantization_config");
    char *out = q && cJSON_AddStringToObject(q, "quant_method", "q8_0") &&
                        cJSON_AddNumberToObject(q, "block_size", STAGE_Q8_BLOCK)
                    ? cJSON_Print(root)
                    : NULL;
    cJSON_Delete(root);
    if (!out) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    snprintf(path, sizeof path, "%s/config.json", dst);
    int rc = cli_write_text(path, out, err, errlen);
    free(out);
    return rc;
}

int cli_quantize(const char *src, const char *dst, FILE *log, char *err, size_t errlen)
{
    stage_config cfg;
    err[0] = 0;
    if (stage_config_load(src, &cfg, err, errlen)) return -1;
    int already = cfg.q8_0;
    stage_config_free(&cfg);
    if (already) {
        snprintf(err, errlen, "%s: already quantized (quantization_config q8_0)", src);
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
            } else if (is_quantized(name, &t)) {
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
            if (is_quantized(name, &t)) {
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
    st_close(in);
    if (!rc) rc = write_config(src, dst, err, errlen);
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
            "same bits as --weights-dtype q8_0 on the original. No MPI needed.\n",
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
    FILE *log = !rc && cli_opt_has(&o, "quiet") ? NULL : stderr;
    if (!rc) rc = cli_quantize(model, out, log, err, sizeof err);
    if (rc)
        fprintf(stderr, "modpipe quantize: %s\n", err);
    else if (log)
        fprintf(log, "quantize: wrote %s\n", out);
    cli_opts_free(&o);
    return rc ? 1 : 0;
}
