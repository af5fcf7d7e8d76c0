/* stage/config_json.h — the JSON key readers config.c and arch.c share (not for use outside
 * stage/). Each reader takes an optional key (JSON null counts as absent) and, on a bad value,
 * writes one line "PATH: key: what" into the context's err and returns -1.
 * `pfx` is prepended to key names in messages ("mod." for keys inside the "mod" object). */
#ifndef STAGE_CONFIG_JSON_H
#define STAGE_CONFIG_JSON_H

#include <cJSON.h>
#include <stddef.h>

typedef struct {
    const char *path; /* config.json's path, for messages */
    char *err;
    size_t errlen;
} stage_cfg_ctx;

void stage_cfg_err(char *err, size_t errlen, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
const char *stage_cj_type_name(const cJSON *j);
/* The item, present and not null, else NULL. */
const cJSON *stage_cj_opt(const cJSON *obj, const char *key);
int stage_cj_is_int(const cJSON *j);
/* Integer >= min; required: missing is an error, else *out keeps its value. */
int stage_cj_int(stage_cfg_ctx *c, const cJSON *obj, const char *pfx, const char *key, int required,
                 int min, int *out);
/* Number in (lo or [lo, hi]; *out keeps its value when absent. */
int stage_cj_double(stage_cfg_ctx *c, const cJSON *obj, const char *pfx, const char *key, double lo,
                    int lo_open, double hi, double *out);
int stage_cj_float(stage_cfg_ctx *c, const cJSON *obj, const char *pfx, const char *key, double lo,
                   int lo_open, double hi, float *out);
int stage_cj_bool(stage_cfg_ctx *c, const cJSON *obj, const char *key, int *out);

/* stage/arch.c's part of the parse (declared here so config.c need not include arch.h):
 * the block-variant keys into cfg (n_layers and head_dim already set; see arch.h), and
 * whether a layer_types list is Hugging Face's ("full_attention" / "sliding_attention"
 * entries) rather than modpipe's layer kinds. */
struct stage_config;
int stage_arch_parse(stage_cfg_ctx *c, const cJSON *root, struct stage_config *cfg);
int stage_arch_hf_layer_types(const cJSON *list);

/* stage/config_quant.c: quantization_config into cfg->q8_0 and cfg->q8_keep. */
int stage_parse_quant(stage_cfg_ctx *c, const cJSON *root, struct stage_config *cfg);

#endif
