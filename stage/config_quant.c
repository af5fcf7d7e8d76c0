/* stage/config_quant.c — config.json's quantization_config: the Q8_0 layout of a `modpipe
 * quantize` directory (docs/SPEC.md §9), read and written in one place.
 *
 * Written (stage_q8_quant_config) in the compressed-tensors convention, which expresses the
 * layout exactly: format "int-quantized" (each quantized Linear's `weight` an int8 tensor and
 * its `weight_scale` beside it, no zero point: symmetric), one config group targeting "Linear"
 * with 8-bit int weights, strategy "group", group_size 32, no activation quantization, and
 * `ignore` naming every Linear module that stays in its dtype. Read: that, or the older
 * {"quant_method": "q8_0", "block_size": 32} of earlier modpipe versions; anything else is
 * refused with the key that differs (another reader's layout would not load anyway).
 */
#include "stage/config.h"
#include "stage/config_json.h"
#include "stage/stage.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CT_METHOD "compressed-tensors"
#define CT_FORMAT "int-quantized"
#define CT_PFX "quantization_config."

/* A string key that must equal want (required: missing is an error too). */
static int want_str(stage_cfg_ctx *c, const cJSON *obj, const char *pfx, const char *key,
                    const char *want, int required, const char *why)
{
    const cJSON *j = stage_cj_opt(obj, key);
    if (!j && !required) return 0;
    if (j && cJSON_IsString(j) && !strcmp(j->valuestring, want)) return 0;
    if (j && cJSON_IsString(j))
        stage_cfg_err(c->err, c->errlen, c->path, "%s%s: \"%s\" is not read (only \"%s\"%s%s)", pfx,
                      key, j->valuestring, want, why ? ": " : "", why ? why : "");
    else
        stage_cfg_err(c->err, c->errlen, c->path, "%s%s: expected \"%s\", got %s", pfx, key, want,
                      j ? stage_cj_type_name(j) : "nothing");
    return -1;
}

/* A key that must be absent or null (a feature modpipe does not read). */
static int want_absent(stage_cfg_ctx *c, const cJSON *obj, const char *pfx, const char *key,
                       const char *what)
{
    if (!stage_cj_opt(obj, key)) return 0;
    stage_cfg_err(c->err, c->errlen, c->path, "%s%s: %s is not supported", pfx, key, what);
    return -1;
}

/* The one weight scheme read: 8-bit symmetric int, groups of 32 along a row, static. */
static int parse_weights(stage_cfg_ctx *c, const cJSON *w, const char *pfx)
{
    if (!w || !cJSON_IsObject(w)) {
        stage_cfg_err(c->err, c->errlen, c->path, "%sweights: expected an object, got %s", pfx,
                      stage_cj_type_name(w));
        return -1;
    }
    int bits = 0, gs = 0, sym = 0, dyn = 0;
    if (stage_cj_int(c, w, pfx, "num_bits", 1, 1, &bits)) return -1;
    if (bits != 8) {
        stage_cfg_err(c->err, c->errlen, c->path, "%snum_bits: %d, expected 8 (Q8_0)", pfx, bits);
        return -1;
    }
    if (want_str(c, w, pfx, "type", "int", 1, "Q8_0 holds integers")) return -1;
    if (want_str(c, w, pfx, "strategy", "group", 1, "one scale per 32 weights of a row")) return -1;
    if (stage_cj_int(c, w, pfx, "group_size", 1, 1, &gs)) return -1;
    if (gs != STAGE_Q8_BLOCK) {
        stage_cfg_err(c->err, c->errlen, c->path, "%sgroup_size: %d, expected %d (Q8_0 blocks)",
                      pfx, gs, STAGE_Q8_BLOCK);
        return -1;
    }
    if (stage_cj_bool(c, w, "symmetric", &sym)) return -1;
    if (!sym) {
        stage_cfg_err(c->err, c->errlen, c->path,
                      "%ssymmetric: must be true (Q8_0 has no zero "
                      "point)",
                      pfx);
        return -1;
    }
    if (stage_cj_bool(c, w, "dynamic", &dyn)) return -1;
    if (dyn) {
        stage_cfg_err(c->err, c->errlen, c->path, "%sdynamic: must be false (stored scales)", pfx);
        return -1;
    }
    return want_absent(c, w, pfx, "actorder", "activation-order group indices");
}

/* ignore: module names; a projection named there stays in its stored dtype (cfg->q8_keep). */
static int parse_ignore(stage_cfg_ctx *c, const cJSON *q, stage_config *cfg)
{
    const cJSON *ig = stage_cj_opt(q, "ignore");
    if (!ig) return 0;
    if (!cJSON_IsArray(ig)) {
        stage_cfg_err(c->err, c->errlen, c->path, CT_PFX "ignore: expected a list, got %s",
                      stage_cj_type_name(ig));
        return -1;
    }
    size_t len = 0;
    int i = 0;
    for (const cJSON *e = ig->child; e; e = e->next, i++) {
        if (!cJSON_IsString(e) || !e->valuestring[0]) {
            stage_cfg_err(c->err, c->errlen, c->path,
                          CT_PFX "ignore[%d]: expected a module name, got %s", i,
                          cJSON_IsString(e) ? "an empty string" : stage_cj_type_name(e));
            return -1;
        }
        if (!strncmp(e->valuestring, "re:", 3)) {
            stage_cfg_err(c->err, c->errlen, c->path,
                          CT_PFX "ignore[%d]: \"%s\": patterns are not read (list the modules)", i,
                          e->valuestring);
            return -1;
        }
        char t[512];
        if (snprintf(t, sizeof t, "%s.weight", e->valuestring) >= (int)sizeof t) {
            stage_cfg_err(c->err, c->errlen, c->path, CT_PFX "ignore[%d]: name too long", i);
            return -1;
        }
        if (stage_q8_quantizes(t)) len += strlen(e->valuestring) + 1;
    }
    if (!len) return 0;
    cfg->q8_keep = malloc(len);
    if (!cfg->q8_keep) {
        stage_cfg_err(c->err, c->errlen, c->path, "out of memory (" CT_PFX "ignore)");
        return -1;
    }
    cfg->q8_keep_len = len;
    char *p = cfg->q8_keep;
    for (const cJSON *e = ig->child; e; e = e->next) {
        char t[512];
        snprintf(t, sizeof t, "%s.weight", e->valuestring);
        if (!stage_q8_quantizes(t)) continue; /* a router, a gate: stored as is anyway */
        size_t n = strlen(e->valuestring) + 1;
        memcpy(p, e->valuestring, n);
        p += n;
    }
    return 0;
}

static int parse_ct(stage_cfg_ctx *c, const cJSON *q, stage_config *cfg)
{
    if (want_str(c, q, CT_PFX, "format", CT_FORMAT, 1,
                 "int8 weights and their scales stored as tensors"))
        return -1;
    if (want_str(c, q, CT_PFX, "quantization_status", "compressed", 0,
                 "the weights stored quantized"))
        return -1;
    if (want_absent(c, q, CT_PFX, "kv_cache_scheme", "KV-cache quantization") ||
        want_absent(c, q, CT_PFX, "sparsity_config", "sparse compression") ||
        want_absent(c, q, CT_PFX, "transform_config", "a weight transform"))
        return -1;
    const cJSON *groups = stage_cj_opt(q, "config_groups");
    if (!groups || !cJSON_IsObject(groups) || !groups->child || groups->child->next) {
        stage_cfg_err(c->err, c->errlen, c->path,
                      CT_PFX "config_groups: expected an object with one group, got %s",
                      !groups || !cJSON_IsObject(groups) ? stage_cj_type_name(groups)
                      : !groups->child                   ? "none"
                                                         : "several");
        return -1;
    }
    const cJSON *g = groups->child;
    char pfx[192];
    snprintf(pfx, sizeof pfx, CT_PFX "config_groups.%.100s.", g->string ? g->string : "?");
    if (!cJSON_IsObject(g)) {
        stage_cfg_err(c->err, c->errlen, c->path, "%.*s: expected an object, got %s",
                      (int)strlen(pfx) - 1, pfx, stage_cj_type_name(g));
        return -1;
    }
    const cJSON *tg = stage_cj_opt(g, "targets");
    if (!tg || !cJSON_IsArray(tg) || cJSON_GetArraySize(tg) != 1 || !cJSON_IsString(tg->child) ||
        strcmp(tg->child->valuestring, "Linear")) {
        stage_cfg_err(c->err, c->errlen, c->path,
                      "%stargets: expected [\"Linear\"] (every projection but those in ignore)",
                      pfx);
        return -1;
    }
    if (want_absent(c, g, pfx, "input_activations",
                    "activation quantization (activations stay f32; --matmul fast rounds them "
                    "itself)") ||
        want_absent(c, g, pfx, "output_activations", "output quantization"))
        return -1;
    char wp[224];
    snprintf(wp, sizeof wp, "%sweights.", pfx);
    if (parse_weights(c, stage_cj_opt(g, "weights"), wp)) return -1;
    return parse_ignore(c, q, cfg);
}

/* modpipe's earlier form: {"quant_method": "q8_0", "block_size": 32}. */
static int parse_legacy(stage_cfg_ctx *c, const cJSON *q)
{
    int bs = STAGE_Q8_BLOCK;
    if (stage_cj_int(c, q, CT_PFX, "block_size", 0, 1, &bs)) return -1;
    if (bs != STAGE_Q8_BLOCK) {
        stage_cfg_err(c->err, c->errlen, c->path,
                      CT_PFX "block_size: %d, expected %d (Q8_0 blocks)", bs, STAGE_Q8_BLOCK);
        return -1;
    }
    return 0;
}

int stage_parse_quant(stage_cfg_ctx *c, const cJSON *root, stage_config *cfg)
{
    const cJSON *q = stage_cj_opt(root, "quantization_config");
    if (!q) return 0;
    if (!cJSON_IsObject(q)) {
        stage_cfg_err(c->err, c->errlen, c->path, "quantization_config: expected an object, got %s",
                      stage_cj_type_name(q));
        return -1;
    }
    const cJSON *m = stage_cj_opt(q, "quant_method");
    const char *mv = m && cJSON_IsString(m) ? m->valuestring : NULL;
    int rc;
    if (mv && !strcmp(mv, CT_METHOD))
        rc = parse_ct(c, q, cfg);
    else if (mv && !strcmp(mv, "q8_0"))
        rc = parse_legacy(c, q);
    else {
        stage_cfg_err(c->err, c->errlen, c->path,
                      CT_PFX "quant_method: %s%s%s is not supported (only \"" CT_METHOD
                             "\" with format \"" CT_FORMAT "\" and 8-bit groups of 32, as modpipe "
                             "quantize writes, or its earlier \"q8_0\")",
                      mv ? "\"" : "",
                      mv   ? mv
                      : !m ? "missing"
                           : stage_cj_type_name(m),
                      mv ? "\"" : "");
        rc = -1;
    }
    if (rc) {
        free(cfg->q8_keep);
        cfg->q8_keep = NULL;
        cfg->q8_keep_len = 0;
        return -1;
    }
    cfg->q8_0 = 1;
    return 0;
}

int stage_q8_module_listed(const char *names, size_t len, const char *tensor)
{
    size_t tl = strlen(tensor), sl = strlen(".weight");
    if (!names || tl <= sl || strcmp(tensor + tl - sl, ".weight")) return 0;
    for (const char *p = names; p < names + len; p += strlen(p) + 1)
        if (strlen(p) == tl - sl && !strncmp(p, tensor, tl - sl)) return 1;
    return 0;
}

int stage_q8_kept(const stage_config *cfg, const char *tensor)
{
    return stage_q8_module_listed(cfg->q8_keep, cfg->q8_keep_len, tensor);
}

char *stage_q8_quant_config_json(const char *const *ignore, int n_ignore, const char *config_text)
{
    cJSON *root = cJSON_Parse(config_text);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return NULL;
    }
    cJSON_DeleteItemFromObjectCaseSensitive(root, "quantization_config");
    cJSON *q = cJSON_AddObjectToObject(root, "quantization_config");
    int ok = q && cJSON_AddStringToObject(q, "quant_method", CT_METHOD) &&
             cJSON_AddStringToObject(q, "format", CT_FORMAT) &&
             cJSON_AddStringToObject(q, "quantization_status", "compressed");
    cJSON *groups = ok ? cJSON_AddObjectToObject(q, "config_groups") : NULL;
    cJSON *g = groups ? cJSON_AddObjectToObject(groups, "group_0") : NULL;
    cJSON *w = g ? cJSON_CreateObject() : NULL;
    const char *lin = "Linear";
    cJSON *tg = g ? cJSON_CreateStringArray(&lin, 1) : NULL;
    cJSON *ig = cJSON_CreateArray();
    ok = g && w && tg && ig && cJSON_AddItemToObject(g, "targets", tg);
    if (!ok) cJSON_Delete(tg);
    ok = ok && cJSON_AddItemToObject(g, "weights", w);
    if (!ok) cJSON_Delete(w);
    ok = ok && cJSON_AddNumberToObject(w, "num_bits", 8) &&
         cJSON_AddStringToObject(w, "type", "int") && cJSON_AddBoolToObject(w, "symmetric", 1) &&
         cJSON_AddStringToObject(w, "strategy", "group") &&
         cJSON_AddNumberToObject(w, "group_size", STAGE_Q8_BLOCK) &&
         cJSON_AddBoolToObject(w, "dynamic", 0) && cJSON_AddNullToObject(g, "input_activations") &&
         cJSON_AddNullToObject(g, "output_activations");
    for (int i = 0; ok && i < n_ignore; i++) {
        cJSON *s = cJSON_CreateString(ignore[i]);
        ok = s && cJSON_AddItemToArray(ig, s);
        if (!ok) cJSON_Delete(s);
    }
    ok = ok && cJSON_AddItemToObject(q, "ignore", ig);
    if (!ok) cJSON_Delete(ig);
    char *out = ok ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    return out;
}
