/* cli/routertune_out.c — router-tune's output directory (cli/routertune_out.h). */
#include "cli/routertune_out.h"

#include <cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/file.h"
#include "cli/files.h"
#include "stage/config.h"
#include "stage/safetensors.h"

/* Error lines quote paths of up to PATH_MAX bytes into the caller's buffer: a cut message is
 * acceptable, so GCC's truncation warning is off in this file. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

/* Path of `target` relative to directory `from` (both made absolute); malloc'd. */
static char *relpath(const char *target, const char *from)
{
    char t[PATH_MAX], f[PATH_MAX];
    if (!realpath(target, t) || !realpath(from, f)) return NULL;
    size_t i = 0, last = 0;
    while (t[i] && f[i] && t[i] == f[i]) {
        if (t[i] == '/') last = i;
        i++;
    }
    if (!f[i] && t[i] == '/') last = i; /* from is a prefix directory of target */
    if (!f[i] && !t[i]) last = i;
    int ups = 0;
    for (size_t j = last; f[j]; j++)
        if (f[j] == '/' && (j > last || f[last] == '/')) ups++;
    if (f[last] == 0) ups = 0;
    size_t need = (size_t)ups * 3 + strlen(t + last) + 2;
    char *r = malloc(need);
    if (!r) return NULL;
    r[0] = 0;
    for (int u = 0; u < ups; u++) strcat(r, "../");
    strcat(r, t[last] == '/' ? t + last + 1 : t + last);
    return r;
}

/* name -> absolute file of every tensor of the model in dir. */
typedef struct {
    char **name, **file;
    int n;
} tensor_map;

static void tensor_map_free(tensor_map *m)
{
    for (int i = 0; i < m->n; i++) {
        free(m->name[i]);
        free(m->file[i]);
    }
    free(m->name);
    free(m->file);
    memset(m, 0, sizeof *m);
}

static int tensor_map_add(tensor_map *m, const char *name, const char *file)
{
    char **nn = realloc(m->name, (size_t)(m->n + 1) * sizeof *nn);
    if (!nn) return -1;
    m->name = nn;
    char **nf = realloc(m->file, (size_t)(m->n + 1) * sizeof *nf);
    if (!nf) return -1;
    m->file = nf;
    m->name[m->n] = strdup(name);
    m->file[m->n] = strdup(file);
    m->n++;
    return m->name[m->n - 1] && m->file[m->n - 1] ? 0 : -1;
}

static int model_tensor_map(const char *dir, tensor_map *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    char single[PATH_MAX], index[PATH_MAX], abs[PATH_MAX];
    snprintf(single, sizeof single, "%s/model.safetensors", dir);
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);
    if (cli_file_exists(single)) {
        FILE *f = fopen(single, "rb");
        uint8_t hb[8];
        if (!f || fread(hb, 1, 8, f) != 8) {
            if (f) fclose(f);
            snprintf(err, errlen, "%s: cannot read the header", single);
            return -1;
        }
        uint64_t hl = 0;
        for (int i = 7; i >= 0; i--) hl = hl << 8 | hb[i];
        char *h = hl < (1u << 28) ? malloc(hl + 1) : NULL;
        if (!h || fread(h, 1, hl, f) != hl) {
            fclose(f);
            free(h);
            snprintf(err, errlen, "%s: cannot read the header", single);
            return -1;
        }
        fclose(f);
        h[hl] = 0;
        cJSON *root = cJSON_Parse(h);
        free(h);
        if (!realpath(single, abs) || !cJSON_IsObject(root)) {
            cJSON_Delete(root);
            snprintf(err, errlen, "%s: header is not JSON", single);
            return -1;
        }
        const cJSON *it;
        cJSON_ArrayForEach(it, root)
        {
            if (!strcmp(it->string, "__metadata__")) continue;
            if (tensor_map_add(out, it->string, abs)) {
                cJSON_Delete(root);
                snprintf(err, errlen, "out of memory");
                return -1;
            }
        }
        cJSON_Delete(root);
        return 0;
    }
    char *text = base_read_file(index, 0, NULL, NULL, 0);
    cJSON *root = text ? cJSON_Parse(text) : NULL;
    free(text);
    const cJSON *wm = root ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
    if (!cJSON_IsObject(wm)) {
        cJSON_Delete(root);
        snprintf(err, errlen, "%s: no model.safetensors and no readable index", dir);
        return -1;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, wm)
    {
        char p[PATH_MAX];
        if (!cJSON_IsString(it)) continue;
        if (it->valuestring[0] == '/')
            snprintf(p, sizeof p, "%s", it->valuestring);
        else
            snprintf(p, sizeof p, "%s/%s", dir, it->valuestring);
        if (!realpath(p, abs)) {
            cJSON_Delete(root);
            tensor_map_free(out);
            snprintf(err, errlen, "%s: shard %s does not exist", index, p);
            return -1;
        }
        if (tensor_map_add(out, it->string, abs)) {
            cJSON_Delete(root);
            snprintf(err, errlen, "out of memory");
            return -1;
        }
    }
    cJSON_Delete(root);
    return 0;
}

static int is_router_of(const char *name, const int *layers, int n)
{
    for (int i = 0; i < n; i++) {
        char a[128], b[128];
        snprintf(a, sizeof a, "model.layers.%d.router.weight", layers[i]);
        snprintf(b, sizeof b, "model.layers.%d.router.bias", layers[i]);
        if (!strcmp(name, a) || !strcmp(name, b)) return 1;
    }
    return 0;
}

int cli_rt_write_output(const rt_out *o, const double *w, const double *b, char *err, size_t errlen)
{
    char path[PATH_MAX], tmp[PATH_MAX];
    if (cli_mkdir_p(o->out, err, errlen)) return -1;
    snprintf(path, sizeof path, "%s/model.safetensors", o->out);
    if (cli_file_exists(path)) {
        snprintf(err, errlen,
                 "%s exists: it would hide the index that references the original "
                 "weights; use a fresh --out",
                 path);
        return -1;
    }
    /* 1. routers.safetensors (st_writer writes model.safetensors: into a temp dir, renamed) */
    snprintf(tmp, sizeof tmp, "%s/.routers.tmp", o->out);
    if (cli_mkdir_p(tmp, err, errlen)) return -1;
    st_writer *sw = st_writer_new();
    if (!sw) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    int rc = 0;
    float *fw = malloc((size_t)o->D * sizeof *fw);
    for (int i = 0; i < o->n_routed && fw && !rc; i++) {
        char name[128];
        for (int c = 0; c < o->D; c++) fw[c] = (float)w[(size_t)i * o->D + c];
        float fb = (float)b[i];
        int64_t s2[2] = {1, o->D}, s1[1] = {1};
        snprintf(name, sizeof name, "model.layers.%d.router.weight", o->layers[i]);
        rc |= st_writer_add(sw, name, STAGE_F32, 2, s2, fw);
        snprintf(name, sizeof name, "model.layers.%d.router.bias", o->layers[i]);
        rc |= st_writer_add(sw, name, STAGE_F32, 1, s1, &fb);
    }
    if (!fw) rc = -1;
    free(fw);
    if (rc) snprintf(err, errlen, "out of memory");
    if (!rc) rc = st_writer_save(sw, tmp, 1, err, errlen);
    st_writer_free(sw);
    char st_tmp[PATH_MAX + 32], st_final[PATH_MAX];
    snprintf(st_tmp, sizeof st_tmp, "%s/model.safetensors", tmp);
    snprintf(st_final, sizeof st_final, "%s/routers.safetensors", o->out);
    if (!rc && rename(st_tmp, st_final)) {
        snprintf(err, errlen, "cannot write %s: %s", st_final, strerror(errno));
        rc = -1;
    }
    rmdir(tmp);
    if (rc) return -1;

    /* 2. the index: routers here, every other tensor in its original file */
    tensor_map tm;
    if (model_tensor_map(o->model, &tm, err, errlen)) return -1;
    cJSON *root = cJSON_CreateObject(), *meta = cJSON_CreateObject(), *wm = cJSON_CreateObject();
    cJSON_AddItemToObject(root, "metadata", meta);
    cJSON_AddStringToObject(meta, "note",
                            "routers trained by modpipe router-tune; other tensors "
                            "are read from the original model's files");
    cJSON_AddItemToObject(root, "weight_map", wm);
    for (int i = 0; i < tm.n && !rc; i++) {
        if (is_router_of(tm.name[i], o->layers, o->n_routed)) continue;
        char *rel = relpath(tm.file[i], o->out);
        if (!rel) {
            snprintf(err, errlen, "cannot resolve %s", tm.file[i]);
            rc = -1;
            break;
        }
        cJSON_AddStringToObject(wm, tm.name[i], rel);
        free(rel);
    }
    tensor_map_free(&tm);
    for (int i = 0; i < o->n_routed && !rc; i++) {
        char name[128];
        snprintf(name, sizeof name, "model.layers.%d.router.weight", o->layers[i]);
        cJSON_AddStringToObject(wm, name, "routers.safetensors");
        snprintf(name, sizeof name, "model.layers.%d.router.bias", o->layers[i]);
        cJSON_AddStringToObject(wm, name, "routers.safetensors");
    }
    char *txt = rc ? NULL : cJSON_Print(root);
    cJSON_Delete(root);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", o->out);
    if (!rc)
        rc = txt ? cli_write_text(path, txt, err, errlen)
                 : (snprintf(err, errlen, "out of memory"), -1);
    free(txt);
    if (rc) return -1;

    /* 3. config.json */
    snprintf(path, sizeof path, "%s/config.json", o->model);
    char *ctext = base_read_file(path, 0, NULL, NULL, 0);
    cJSON *cfg = ctext ? cJSON_Parse(ctext) : NULL;
    free(ctext);
    if (!cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        snprintf(err, errlen, "%s: cannot read", path);
        return -1;
    }
    stage_config sc;
    if (stage_config_load(o->model, &sc, err, errlen)) {
        cJSON_Delete(cfg);
        return -1;
    }
    cJSON *lt = cJSON_CreateArray();
    for (int l = 0; l < sc.n_layers; l++) {
        int routed = 0;
        for (int i = 0; i < o->n_routed; i++) routed |= o->layers[i] == l;
        cJSON_AddItemToArray(
            lt, cJSON_CreateString(routed ? "mindskip" : stage_kind_name(sc.layer_kind[l])));
    }
    stage_config_free(&sc);
    /* Router-Tuning's own keys would now disagree with layer_types */
    cJSON_DeleteItemFromObjectCaseSensitive(cfg, "is_mindskip");
    cJSON_DeleteItemFromObjectCaseSensitive(cfg, "layer_types");
    cJSON_DeleteItemFromObjectCaseSensitive(cfg, "mindskip");
    cJSON_DeleteItemFromObjectCaseSensitive(cfg, "router_tuning");
    cJSON_AddItemToObject(cfg, "layer_types", lt);
    cJSON *ms = cJSON_CreateObject();
    cJSON_AddStringToObject(ms, "granularity", o->gran == STAGE_GRAN_TOKEN ? "token" : "sequence");
    cJSON_AddNumberToObject(ms, "threshold", o->threshold);
    cJSON_AddItemToObject(cfg, "mindskip", ms);
    cJSON_AddItemReferenceToObject(cfg, "router_tuning", o->record);
    txt = cJSON_Print(cfg);
    cJSON_Delete(cfg);
    snprintf(path, sizeof path, "%s/config.json", o->out);
    rc =
        txt ? cli_write_text(path, txt, err, errlen) : (snprintf(err, errlen, "out of memory"), -1);
    free(txt);
    if (rc) return -1;

    /* 4. tokenizer and generation files (small) */
    if (cli_copy_side_files(o->model, o->out, err, errlen)) return -1;
    return 0;
}
