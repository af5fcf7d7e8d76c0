/* stage/safetensors.c — safetensors reading (mmap, lazy shards) and writing. See safetensors.h.
 *
 * File layout: [u64 little-endian N][N bytes JSON header][data region]. Header entries are
 * name -> {"dtype", "shape", "data_offsets": [begin, end]} with offsets relative to the data
 * region at 8 + N; "__metadata__" is skipped. We assume a little-endian host (as the tensors
 * are stored little-endian and handed out zero-copy).
 *
 * Not thread-safe: st_find / st_get_f32 may open shards and fill caches.
 */
#include "stage/safetensors.h"

#include "base/err.h"
#include "stage/convert.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian and handed out zero-copy: little-endian hosts only"
#endif

/* Offsets and dims are JSON numbers (doubles): integers above 2^53 cannot be exact. */
#define ST_MAX_JSON_INT 9007199254740992.0
/* An index file is a name -> file map; anything larger than this is not one. */
#define ST_MAX_INDEX_BYTES (1L << 30)

#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"

/* ---- helpers --------------------------------------------------------------------------------- */

static char *st_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* dir + "/" + name (no doubled slash); malloc'd. */
static char *path_join(const char *dir, const char *name)
{
    size_t dl = strlen(dir), nl = strlen(name);
    int slash = dl > 0 && dir[dl - 1] != '/';
    char *p = malloc(dl + (size_t)slash + nl + 1);
    if (!p) return NULL;
    memcpy(p, dir, dl);
    if (slash) p[dl] = '/';
    memcpy(p + dl + (size_t)slash, name, nl + 1);
    return p;
}

static int is_regular_file(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

static uint64_t read_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void write_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* A JSON number that is an exact non-negative integer we can hold. */
static int json_uint(const cJSON *j, uint64_t *out)
{
    if (!cJSON_IsNumber(j)) return 0;
    double v = j->valuedouble;
    if (!(v >= 0.0) || v > ST_MAX_JSON_INT || v != (double)(uint64_t)v) return 0;
    *out = (uint64_t)v;
    return 1;
}

/* "[64, 32]" into buf. */
static void shape_str(char *buf, size_t len, int ndim, const int64_t *shape)
{
    size_t o = 0;
    if (len == 0) return;
    buf[0] = '\0';
    o += (size_t)snprintf(buf + o, len - o, "[");
    for (int i = 0; i < ndim && o < len; i++)
        o += (size_t)snprintf(buf + o, len - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (o < len) snprintf(buf + o, len - o, "]");
}

/* ---- dtypes ---------------------------------------------------------------------------------- */

/* The header's dtype strings are exact upper case (safetensors spec). "I8" is the int8 q of
 * a Q8_0 matrix (docs/SPEC.md §9), read as STAGE_Q8_0 with 1-byte elements; its scales are
 * a tensor of their own (F16). */
static int dtype_from_header(const char *s, stage_dtype *out)
{
    if (strcmp(s, "I8") == 0) {
        *out = STAGE_Q8_0;
        return 0;
    }
    for (int d = 0; d < STAGE_N_DTYPES; d++)
        if (strcmp(s, stage_dtype_st_name((stage_dtype)d)) == 0) {
            *out = (stage_dtype)d;
            return 0;
        }
    return -1;
}
static const char *dtype_header_name(stage_dtype d)
{
    return d == STAGE_Q8_0 ? "I8" : stage_dtype_st_name(d);
}
/* bytes of one element in a file: 4, 2, 2; 1 for the I8 of Q8_0 */
static size_t file_esize(stage_dtype d) { return d == STAGE_Q8_0 ? 1 : stage_dtype_size(d); }

/* ---- reading: one file ----------------------------------------------------------------------- */

typedef struct {
    char *path;       /* dir/name: what messages and st_tensor.file show */
    char *wm_name;    /* sharded: the file name as the weight_map spells it */
    char *first_user; /* sharded: first tensor the index maps here (for messages) */
    int state;        /* 0 not opened yet, 1 open, -1 failed (fail_msg says why) */
    char *fail_msg;
    void *map;
    size_t map_len;
    const uint8_t *data; /* data region: map + 8 + N */
    size_t data_len;
} st_file;

/* One tensor of a parsed header. */
typedef struct {
    char *name;
    stage_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    size_t begin, nbytes; /* within the data region */
} st_hdr_ent;

static void hdr_free(st_hdr_ent *h, size_t n)
{
    if (!h) return;
    for (size_t i = 0; i < n; i++) free(h[i].name);
    free(h);
}

static int hdr_cmp_name(const void *a, const void *b)
{
    return strcmp(((const st_hdr_ent *)a)->name, ((const st_hdr_ent *)b)->name);
}

static int hdr_cmp_begin(const void *a, const void *b)
{
    const st_hdr_ent *x = *(const st_hdr_ent *const *)a, *y = *(const st_hdr_ent *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return (x->nbytes > y->nbytes) - (x->nbytes < y->nbytes);
}

/* Validate one header entry into *e (name not set). */
static int parse_entry(const char *path, const char *name, const cJSON *j, size_t data_len,
                       st_hdr_ent *e, char *err, size_t errlen)
{
    if (!cJSON_IsObject(j)) {
        base_set_err(err, errlen, "%s: tensor %s: entry is not an object", path, name);
        return -1;
    }
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(j, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(j, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(j, "data_offsets");
    if (!dt || !sh || !off) {
        base_set_err(err, errlen, "%s: tensor %s: missing %s", path, name,
                     !dt   ? "dtype"
                     : !sh ? "shape"
                           : "data_offsets");
        return -1;
    }
    if (!cJSON_IsString(dt)) {
        base_set_err(err, errlen, "%s: tensor %s: dtype is not a string", path, name);
        return -1;
    }
    if (dtype_from_header(dt->valuestring, &e->dtype)) {
        base_set_err(err, errlen,
                     "%s: tensor %s: unsupported dtype \"%s\" (only F32, F16, BF16; I8 of q8_0)",
                     path, name, dt->valuestring);
        return -1;
    }
    if (!cJSON_IsArray(sh)) {
        base_set_err(err, errlen, "%s: tensor %s: shape is not a list", path, name);
        return -1;
    }
    int nd = cJSON_GetArraySize(sh);
    if (nd > ST_MAX_DIMS) {
        base_set_err(err, errlen, "%s: tensor %s: %d dims (at most %d)", path, name, nd,
                     ST_MAX_DIMS);
        return -1;
    }
    e->ndim = nd;
    uint64_t esz = file_esize(e->dtype), nbytes = esz;
    int i = 0;
    const cJSON *d;
    cJSON_ArrayForEach(d, sh)
    {
        uint64_t v;
        if (!json_uint(d, &v)) {
            base_set_err(err, errlen, "%s: tensor %s: shape[%d] is not a non-negative integer",
                         path, name, i);
            return -1;
        }
        if (v != 0 && nbytes > (uint64_t)SIZE_MAX / v) {
            base_set_err(err, errlen, "%s: tensor %s: shape too large", path, name);
            return -1;
        }
        nbytes *= v;
        e->shape[i++] = (int64_t)v;
    }
    uint64_t b, en;
    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 ||
        !json_uint(cJSON_GetArrayItem(off, 0), &b) || !json_uint(cJSON_GetArrayItem(off, 1), &en)) {
        base_set_err(err, errlen,
                     "%s: tensor %s: data_offsets is not [begin, end] (non-negative integers)",
                     path, name);
        return -1;
    }
    if (en < b) {
        base_set_err(err, errlen, "%s: tensor %s: data_offsets end %llu < begin %llu", path, name,
                     (unsigned long long)en, (unsigned long long)b);
        return -1;
    }
    if (en > data_len) {
        base_set_err(err, errlen,
                     "%s: tensor %s: data_offsets [%llu, %llu] past the end of the data region "
                     "(%zu bytes)",
                     path, name, (unsigned long long)b, (unsigned long long)en, data_len);
        return -1;
    }
    if (en - b != nbytes) {
        base_set_err(err, errlen,
                     "%s: tensor %s: data_offsets give %llu bytes but shape and dtype need %llu",
                     path, name, (unsigned long long)(en - b), (unsigned long long)nbytes);
        return -1;
    }
    e->begin = (size_t)b;
    e->nbytes = (size_t)nbytes;
    return 0;
}

/* Parse and validate the header text (N bytes, NUL-terminated copy). */
static int parse_header(const char *path, const char *text, size_t n, size_t data_len,
                        st_hdr_ent **out, size_t *n_out, char *err, size_t errlen)
{
    *out = NULL;
    *n_out = 0;
    if (memchr(text, '\0', n)) {
        base_set_err(err, errlen, "%s: header is not JSON (contains a NUL byte)", path);
        return -1;
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, n, &end, 0);
    if (!root) {
        size_t at = (end && end >= text) ? (size_t)(end - text) : 0;
        base_set_err(err, errlen, "%s: header is not valid JSON (near header byte %zu of %zu)",
                     path, at, n);
        return -1;
    }
    /* Only whitespace padding may follow the JSON value. */
    for (const char *p = end; p && p < text + n; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            base_set_err(err, errlen, "%s: header has junk after the JSON (header byte %zu of %zu)",
                         path, (size_t)(p - text), n);
            cJSON_Delete(root);
            return -1;
        }
    }
    if (!cJSON_IsObject(root)) {
        base_set_err(err, errlen, "%s: header is not a JSON object", path);
        cJSON_Delete(root);
        return -1;
    }

    size_t cap = (size_t)cJSON_GetArraySize(root);
    st_hdr_ent *h = calloc(cap ? cap : 1, sizeof *h); /* [tensors in header] */
    st_hdr_ent **by_off = NULL;
    size_t cnt = 0;
    if (!h) goto oom;
    const cJSON *it;
    cJSON_ArrayForEach(it, root)
    {
        const char *name = it->string ? it->string : "";
        if (strcmp(name, "__metadata__") == 0) continue;
        if (parse_entry(path, name, it, data_len, &h[cnt], err, errlen)) goto fail;
        h[cnt].name = st_strdup(name);
        if (!h[cnt].name) goto oom;
        cnt++;
    }

    /* Overlap: sorted by begin, each non-empty range must start at/after every earlier end. */
    by_off = malloc((cnt ? cnt : 1) * sizeof *by_off);
    if (!by_off) goto oom;
    for (size_t i = 0; i < cnt; i++) by_off[i] = &h[i];
    qsort(by_off, cnt, sizeof *by_off, hdr_cmp_begin);
    const st_hdr_ent *far = NULL; /* the range reaching furthest so far */
    for (size_t i = 0; i < cnt; i++) {
        const st_hdr_ent *e = by_off[i];
        if (e->nbytes == 0) continue;
        if (far && e->begin < far->begin + far->nbytes) {
            base_set_err(err, errlen, "%s: tensors %s and %s overlap in the data region", path,
                         far->name, e->name);
            goto fail;
        }
        if (!far || e->begin + e->nbytes > far->begin + far->nbytes) far = e;
    }
    free(by_off);
    by_off = NULL;

    /* Sorted by name for bsearch; duplicates are an error. */
    qsort(h, cnt, sizeof *h, hdr_cmp_name);
    for (size_t i = 1; i < cnt; i++) {
        if (strcmp(h[i - 1].name, h[i].name) == 0) {
            base_set_err(err, errlen, "%s: tensor %s appears twice in the header", path, h[i].name);
            goto fail;
        }
    }
    cJSON_Delete(root);
    *out = h;
    *n_out = cnt;
    return 0;

oom:
    base_set_err(err, errlen, "%s: out of memory reading the header", path);
fail:
    free(by_off);
    hdr_free(h, cnt);
    cJSON_Delete(root);
    return -1;
}

static void file_unmap(st_file *f)
{
    if (f->map) munmap(f->map, f->map_len);
    f->map = NULL;
    f->map_len = 0;
    f->data = NULL;
    f->data_len = 0;
}

/* mmap + validate f->path; on success the sorted header entries are returned. */
static int file_open(st_file *f, st_hdr_ent **hdr, size_t *n_hdr, char *err, size_t errlen)
{
    *hdr = NULL;
    *n_hdr = 0;
    int fd = open(f->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        base_set_err(err, errlen, "%s: cannot open: %s", f->path, strerror(errno));
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        base_set_err(err, errlen, "%s: not a regular file", f->path);
        close(fd);
        return -1;
    }
    uint64_t size = (uint64_t)sb.st_size;
    if (size < 8) {
        base_set_err(err, errlen, "%s: file is %llu bytes, too short for a safetensors header",
                     f->path, (unsigned long long)size);
        close(fd);
        return -1;
    }
    if (size > SIZE_MAX) {
        base_set_err(err, errlen, "%s: file too large to map", f->path);
        close(fd);
        return -1;
    }
    void *map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd); /* the mapping keeps the file */
    if (map == MAP_FAILED) {
        base_set_err(err, errlen, "%s: mmap failed: %s", f->path, strerror(errno));
        return -1;
    }
    f->map = map;
    f->map_len = (size_t)size;

    uint64_t n = read_le64(map);
    if (n > size - 8) {
        base_set_err(err, errlen,
                     "%s: header length %llu runs past the end of the file (%llu bytes)", f->path,
                     (unsigned long long)n, (unsigned long long)size);
        goto fail;
    }
    f->data = (const uint8_t *)map + 8 + n;
    f->data_len = (size_t)(size - 8 - n);

    /* cJSON wants a terminated buffer; the header is small next to the weights. */
    char *text = malloc((size_t)n + 1);
    if (!text) {
        base_set_err(err, errlen, "%s: out of memory for a %llu-byte header", f->path,
                     (unsigned long long)n);
        goto fail;
    }
    memcpy(text, (const uint8_t *)map + 8, (size_t)n);
    text[n] = '\0';
    int rc = parse_header(f->path, text, (size_t)n, f->data_len, hdr, n_hdr, err, errlen);
    free(text);
    if (rc) goto fail;
    f->state = 1;
    return 0;

fail:
    file_unmap(f);
    return -1;
}

/* ---- reading: the model ---------------------------------------------------------------------- */

typedef struct {
    char *name;
    int file;  /* index into m->files */
    int known; /* dtype/shape/offsets filled from the file's header */
    stage_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    size_t begin, nbytes;
    const float *f32;       /* handed out by st_get_f32 (zero-copy or == owned) */
    float *owned;           /* converted copy [numel], freed by st_close */
    const void *wdata;      /* handed out by st_get_weight (zero-copy or == wowned) */
    void *wowned;           /* aligned / converted copy [numel] in wdtype, freed by st_close */
    const uint16_t *wscale; /* Q8_0: the scales handed out with wdata (inside wowned) */
    stage_dtype wdtype;
} st_entry;

struct st_model {
    char *dir;
    char *label; /* model.safetensors or the index: "FILE" of missing-tensor errors */
    int sharded;
    st_file *files;
    int n_files;
    st_entry *ents; /* sorted by name */
    size_t n_ents;
    size_t loaded_bytes;
};

static int ent_cmp(const void *a, const void *b)
{
    return strcmp(((const st_entry *)a)->name, ((const st_entry *)b)->name);
}

static int ent_key_cmp(const void *key, const void *b)
{
    return strcmp((const char *)key, ((const st_entry *)b)->name);
}

static st_entry *ent_lookup(st_model *m, const char *name)
{
    if (m->n_ents == 0) return NULL;
    return bsearch(name, m->ents, m->n_ents, sizeof *m->ents, ent_key_cmp);
}

static void fill_entry(st_entry *e, const st_hdr_ent *h)
{
    e->dtype = h->dtype;
    e->ndim = h->ndim;
    memcpy(e->shape, h->shape, sizeof e->shape);
    e->begin = h->begin;
    e->nbytes = h->nbytes;
    e->known = 1;
}

void st_close(st_model *m)
{
    if (!m) return;
    for (size_t i = 0; i < m->n_ents; i++) {
        free(m->ents[i].name);
        free(m->ents[i].owned);
        free(m->ents[i].wowned);
    }
    free(m->ents);
    for (int i = 0; i < m->n_files; i++) {
        file_unmap(&m->files[i]);
        free(m->files[i].path);
        free(m->files[i].wm_name);
        free(m->files[i].first_user);
        free(m->files[i].fail_msg);
    }
    free(m->files);
    free(m->dir);
    free(m->label);
    free(m);
}

/* Single file: open and validate it now; its header is the tensor table. */
static int open_single(st_model *m, char *err, size_t errlen)
{
    m->files = calloc(1, sizeof *m->files);
    if (!m->files) goto oom;
    m->n_files = 1;
    m->files[0].path = st_strdup(m->label);
    if (!m->files[0].path) goto oom;
    st_hdr_ent *h;
    size_t n;
    if (file_open(&m->files[0], &h, &n, err, errlen)) return -1;
    m->ents = calloc(n ? n : 1, sizeof *m->ents);
    if (!m->ents) {
        hdr_free(h, n);
        goto oom;
    }
    /* h is sorted by name already; names move over to the entries. */
    for (size_t i = 0; i < n; i++) {
        m->ents[i].name = h[i].name;
        h[i].name = NULL;
        m->ents[i].file = 0;
        fill_entry(&m->ents[i], &h[i]);
    }
    m->n_ents = n;
    hdr_free(h, n);
    return 0;
oom:
    base_set_err(err, errlen, "%s: out of memory", m->label);
    return -1;
}

static char *read_small_file(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        base_set_err(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    long sz = -1;
    if (fseek(f, 0, SEEK_END) == 0) sz = ftell(f);
    if (sz < 0 || sz > ST_MAX_INDEX_BYTES) {
        base_set_err(err, errlen, "%s: cannot read (size %ld)", path, sz);
        goto out;
    }
    rewind(f);
    buf = malloc((size_t)sz + 1);
    if (!buf) {
        base_set_err(err, errlen, "%s: out of memory", path);
        goto out;
    }
    if (fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
        base_set_err(err, errlen, "%s: short read", path);
        free(buf);
        buf = NULL;
        goto out;
    }
    buf[sz] = '\0';
    *len = (size_t)sz;
out:
    fclose(f);
    return buf;
}

/* Find or add the shard file `name`; returns its index or -1 (OOM). */
static int shard_index(st_model *m, const char *name, const char *user, int *cap, int *last)
{
    /* names repeat in runs: try the last hit first */
    if (*last >= 0 && strcmp(m->files[*last].wm_name, name) == 0) return *last;
    for (int i = 0; i < m->n_files; i++)
        if (strcmp(m->files[i].wm_name, name) == 0) return *last = i;
    if (m->n_files == *cap) {
        int nc = *cap ? *cap * 2 : 8;
        st_file *nf = realloc(m->files, (size_t)nc * sizeof *nf);
        if (!nf) return -1;
        m->files = nf;
        *cap = nc;
    }
    st_file *f = &m->files[m->n_files];
    memset(f, 0, sizeof *f);
    /* A shard may live outside the directory (a router-tuned model references its base
     * model's files): absolute names as they are, relative ones (../x too) from the dir. */
    f->path = name[0] == '/' ? st_strdup(name) : path_join(m->dir, name);
    f->wm_name = st_strdup(name);
    f->first_user = st_strdup(user);
    m->n_files++; /* st_close frees whatever was allocated */
    if (!f->path || !f->wm_name || !f->first_user) return -1;
    return *last = m->n_files - 1;
}

/* Sharded: read the index now; shard files are only checked for existence. */
static int open_index(st_model *m, char *err, size_t errlen)
{
    size_t len = 0;
    char *text = read_small_file(m->label, &len, err, errlen);
    if (!text) return -1;
    int rc = -1;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!root) {
        base_set_err(err, errlen, "%s: not valid JSON (near byte %zu)", m->label,
                     (end && end >= text) ? (size_t)(end - text) : (size_t)0);
        goto out;
    }
    const cJSON *wm =
        cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
    if (!cJSON_IsObject(wm)) {
        base_set_err(err, errlen, "%s: no \"weight_map\" object", m->label);
        goto out;
    }
    size_t n = (size_t)cJSON_GetArraySize(wm);
    m->ents = calloc(n ? n : 1, sizeof *m->ents);
    if (!m->ents) goto oom;
    int cap = 0, last = -1;
    const cJSON *it;
    cJSON_ArrayForEach(it, wm)
    {
        const char *name = it->string ? it->string : "";
        if (!cJSON_IsString(it) || it->valuestring[0] == '\0') {
            base_set_err(err, errlen,
                         "%s: weight_map: tensor %s: file name is not a non-empty string", m->label,
                         name);
            goto out;
        }
        st_entry *e = &m->ents[m->n_ents];
        e->name = st_strdup(name);
        if (!e->name) goto oom;
        m->n_ents++;
        e->file = shard_index(m, it->valuestring, name, &cap, &last);
        if (e->file < 0) goto oom;
    }
    qsort(m->ents, m->n_ents, sizeof *m->ents, ent_cmp);
    for (size_t i = 1; i < m->n_ents; i++) {
        if (strcmp(m->ents[i - 1].name, m->ents[i].name) == 0) {
            base_set_err(err, errlen, "%s: weight_map: tensor %s appears twice", m->label,
                         m->ents[i].name);
            goto out;
        }
    }
    for (int i = 0; i < m->n_files; i++) {
        if (!is_regular_file(m->files[i].path)) {
            base_set_err(err, errlen, "%s: shard file %s (holding tensor %s) does not exist",
                         m->label, m->files[i].path, m->files[i].first_user);
            goto out;
        }
    }
    rc = 0;
    goto out;
oom:
    base_set_err(err, errlen, "%s: out of memory", m->label);
out:
    cJSON_Delete(root);
    free(text);
    return rc;
}

int st_open(const char *dir, st_model **out, char *err, size_t errlen)
{
    if (out) *out = NULL;
    if (!dir || !out) {
        base_set_err(err, errlen, "st_open: no directory or output");
        return -1;
    }
    struct stat sb;
    if (stat(dir, &sb) != 0) {
        base_set_err(err, errlen, "%s: %s", dir, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(sb.st_mode)) {
        base_set_err(err, errlen, "%s: not a directory", dir);
        return -1;
    }
    st_model *m = calloc(1, sizeof *m);
    if (!m || !(m->dir = st_strdup(dir))) {
        free(m);
        base_set_err(err, errlen, "%s: out of memory", dir);
        return -1;
    }
    int rc;
    char *single = path_join(dir, ST_SINGLE_NAME);
    char *index = path_join(dir, ST_INDEX_NAME);
    if (!single || !index) {
        base_set_err(err, errlen, "%s: out of memory", dir);
        rc = -1;
    } else if (is_regular_file(single)) { /* the single file wins over a (stale) index */
        m->label = single;
        single = NULL;
        rc = open_single(m, err, errlen);
    } else if (is_regular_file(index)) {
        m->label = index;
        index = NULL;
        m->sharded = 1;
        rc = open_index(m, err, errlen);
    } else {
        base_set_err(err, errlen, "%s: no " ST_SINGLE_NAME " or " ST_INDEX_NAME, dir);
        rc = -1;
    }
    free(single);
    free(index);
    if (rc) {
        st_close(m);
        return -1;
    }
    *out = m;
    return 0;
}

/* Open shard `fi` on first use and fill the entries the index maps to it. */
static int shard_ensure(st_model *m, int fi, char *err, size_t errlen)
{
    st_file *f = &m->files[fi];
    if (f->state == 1) return 0;
    if (f->state == -1) {
        base_set_err(err, errlen, "%s", f->fail_msg ? f->fail_msg : "shard failed to open");
        return -1;
    }
    st_hdr_ent *h;
    size_t n;
    if (file_open(f, &h, &n, err, errlen)) {
        f->state = -1;
        f->fail_msg = st_strdup(err && errlen ? err : "shard failed to open");
        return -1;
    }
    /* The index decides which file holds a name; other names in the shard are ignored. */
    for (size_t i = 0; i < n; i++) {
        st_entry *e = ent_lookup(m, h[i].name);
        if (e && e->file == fi) fill_entry(e, &h[i]);
    }
    hdr_free(h, n);
    return 0;
}

int st_find(st_model *m, const char *name, st_tensor *t, char *err, size_t errlen)
{
    if (!m || !name) {
        base_set_err(err, errlen, "st_find: no model or name");
        return -1;
    }
    st_entry *e = ent_lookup(m, name);
    if (!e) return 0;
    if (shard_ensure(m, e->file, err, errlen)) return -1;
    const st_file *f = &m->files[e->file];
    if (!e->known) {
        base_set_err(err, errlen, "%s: missing tensor %s (%s maps it to this file)", f->path, name,
                     ST_INDEX_NAME);
        return -1;
    }
    if (t) {
        t->dtype = e->dtype;
        t->ndim = e->ndim;
        memcpy(t->shape, e->shape, sizeof t->shape);
        t->data = f->data + e->begin;
        t->nbytes = e->nbytes;
        t->file = f->path;
    }
    return 1;
}

/* Look `name` up and check it has exactly the expected shape. Returns its entry (and *t), or
 * NULL with "FILE: missing tensor NAME" / "FILE: tensor NAME has shape [..], expected [..]". */
static st_entry *get_checked(st_model *m, const char *name, int ndim, const int64_t *shape,
                             st_tensor *t, char *err, size_t errlen)
{
    if (!m || !name) {
        base_set_err(err, errlen, "safetensors: no model or tensor name");
        return NULL;
    }
    if (ndim < 0 || ndim > ST_MAX_DIMS || (ndim > 0 && !shape)) {
        base_set_err(err, errlen, "%s: tensor %s: bad expected shape (ndim %d)", m->label, name,
                     ndim);
        return NULL;
    }
    int r = st_find(m, name, t, err, errlen);
    if (r == 0) base_set_err(err, errlen, "%s: missing tensor %s", m->label, name);
    if (r <= 0) return NULL;
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
    if (!same) {
        char have[192], want[192];
        shape_str(have, sizeof have, t->ndim, t->shape);
        shape_str(want, sizeof want, ndim, shape);
        base_set_err(err, errlen, "%s: tensor %s has shape %s, expected %s", t->file, name, have,
                     want);
        return NULL;
    }
    return ent_lookup(m, name);
}

const float *st_get_f32(st_model *m, const char *name, int ndim, const int64_t *shape, char *err,
                        size_t errlen)
{
    st_tensor t;
    st_entry *e = get_checked(m, name, ndim, shape, &t, err, errlen);
    if (!e) return NULL;
    if (e->f32) return e->f32;
    if (t.dtype == STAGE_Q8_0) {
        base_set_err(err, errlen, "%s: tensor %s is I8 (q8_0), expected a float tensor", t.file,
                     name);
        return NULL;
    }
    size_t numel = t.nbytes / stage_dtype_size(t.dtype);
    if (t.dtype == STAGE_F32 && ((uintptr_t)t.data & 3u) == 0) {
        e->f32 = (const float *)t.data; /* zero-copy into the mmap */
    } else {
        e->owned = malloc((numel ? numel : 1) * sizeof(float)); /* [numel] */
        if (!e->owned) {
            base_set_err(err, errlen, "%s: out of memory converting tensor %s (%zu values)", t.file,
                         name, numel);
            return NULL;
        }
        stage_dtype_to_f32(t.dtype, t.data, e->owned, numel);
        e->f32 = e->owned;
    }
    m->loaded_bytes += numel * sizeof(float);
    return e->f32;
}

/* Q8_0 at load: row by row from the mmap'd tensor through one f32 row (never an f32 copy of
 * the tensor) into one owned buffer, int8 q [rows][cols] then f16 d [rows][blocks]. */
static int quantize_q8(st_model *m, st_entry *e, const st_tensor *t, const char *name,
                       stage_weight *out, char *err, size_t errlen)
{
    if (e->wowned) {
        base_set_err(err, errlen, "%s: tensor %s asked for in two dtypes", t->file, name);
        return -1;
    }
    const size_t rows = (size_t)out->rows, cols = (size_t)out->cols;
    const size_t nb = (size_t)stage_q8_blocks(out->cols), qbytes = (rows * cols + 63) / 64 * 64;
    const size_t total = qbytes + rows * nb * 2;
    e->wowned = aligned_alloc(64, (total + 63) / 64 * 64);
    float *row = malloc((cols ? cols : 1) * sizeof *row);
    if (!e->wowned || !row) {
        free(row);
        base_set_err(err, errlen, "%s: out of memory quantizing tensor %s to q8_0", t->file, name);
        return -1;
    }
    int8_t *q = e->wowned;
    uint16_t *d = (uint16_t *)((char *)e->wowned + qbytes);
    const size_t ses = stage_dtype_size(t->dtype);
    for (size_t r = 0; r < rows; r++) {
        stage_dtype_to_f32(t->dtype, (const char *)t->data + r * cols * ses, row, cols);
        if (stage_q8_quantize_row(row, (int)cols, q + r * cols, d + r * nb)) {
            base_set_err(err, errlen, "%s: tensor %s: a non-finite value in row %zu cannot be q8_0",
                         t->file, name, r);
            free(row);
            return -1;
        }
    }
    free(row);
    e->wdata = q;
    e->wscale = d;
    e->wdtype = STAGE_Q8_0;
    out->data = q;
    out->scale = d;
    m->loaded_bytes += stage_weight_bytes(out);
    return 0;
}

/* A matrix stored as Q8_0 (an I8 tensor NAME and its F16 scales NAME_scale, docs/SPEC.md §9):
 * both in place inside the mapping (the scales copied only when misaligned); never converted
 * to another dtype. */
static int stored_q8(st_model *m, st_entry *e, const st_tensor *t, const char *name, int want,
                     stage_weight *out, char *err, size_t errlen)
{
    if (want >= 0 && want != STAGE_Q8_0) {
        base_set_err(err, errlen,
                     "%s: tensor %s is stored as q8_0: --weights-dtype %s would need a dequantized "
                     "copy (not supported; use q8_0 or leave it out)",
                     t->file, name, stage_wdtype_name((stage_dtype)want));
        return -1;
    }
    out->dtype = STAGE_Q8_0;
    out->rows = (int)t->shape[0];
    out->cols = (int)t->shape[1];
    if (e->wdata) {
        out->data = e->wdata;
        out->scale = e->wscale;
        return 0;
    }
    char sname[512];
    if ((size_t)snprintf(sname, sizeof sname, "%s_scale", name) >= sizeof sname) {
        base_set_err(err, errlen, "%s: tensor name %s too long", t->file, name);
        return -1;
    }
    int64_t sshape[2] = {t->shape[0], stage_q8_blocks(out->cols)};
    st_tensor ts;
    if (!get_checked(m, sname, 2, sshape, &ts, err, errlen)) return -1;
    if (ts.dtype != STAGE_F16) {
        base_set_err(err, errlen, "%s: tensor %s: the scales of a q8_0 matrix are F16, not %s",
                     ts.file, sname, dtype_header_name(ts.dtype));
        return -1;
    }
    const uint16_t *d = ts.data;
    if ((uintptr_t)ts.data % 2) { /* misaligned in the file: an aligned copy */
        if (!(e->wowned = aligned_alloc(64, (ts.nbytes + 63) / 64 * 64 + 64))) {
            base_set_err(err, errlen, "%s: out of memory loading tensor %s", ts.file, sname);
            return -1;
        }
        memcpy(e->wowned, ts.data, ts.nbytes);
        d = e->wowned;
    }
    e->wdata = t->data; /* int8: any address */
    e->wscale = d;
    e->wdtype = STAGE_Q8_0;
    out->data = e->wdata;
    out->scale = d;
    m->loaded_bytes += stage_weight_bytes(out);
    return 0;
}

int st_get_weight(st_model *m, const char *name, int64_t rows, int64_t cols, int want,
                  stage_weight *out, char *err, size_t errlen)
{
    int64_t shape[2] = {rows, cols};
    st_tensor t;
    st_entry *e = get_checked(m, name, 2, shape, &t, err, errlen);
    if (!e) return -1;
    if (rows > INT32_MAX || cols > INT32_MAX) {
        base_set_err(err, errlen, "%s: tensor %s: dimensions beyond 2^31", t.file, name);
        return -1;
    }
    if (t.dtype == STAGE_Q8_0) return stored_q8(m, e, &t, name, want, out, err, errlen);
    stage_dtype dt = want >= 0 ? (stage_dtype)want : t.dtype;
    size_t es = stage_dtype_size(dt), numel = t.nbytes / stage_dtype_size(t.dtype);
    out->dtype = dt;
    out->rows = (int)rows;
    out->cols = (int)cols;
    out->scale = NULL;
    if (e->wdata && e->wdtype == dt) {
        out->data = e->wdata;
        out->scale = e->wscale;
        return 0;
    }
    if (dt == STAGE_Q8_0) return quantize_q8(m, e, &t, name, out, err, errlen);
    if (dt == t.dtype && ((uintptr_t)t.data % es) == 0) {
        e->wdata = t.data; /* zero-copy into the mmap */
    } else {               /* misaligned in the file, or converted at load (--weights-dtype) */
        if (e->wowned) {
            base_set_err(err, errlen, "%s: tensor %s asked for in two dtypes", t.file, name);
            return -1;
        }
        e->wowned = aligned_alloc(64, (numel * es + 63) / 64 * 64 + 64); /* [numel] in dt */
        if (!e->wowned) {
            base_set_err(err, errlen, "%s: out of memory loading tensor %s (%zu values)", t.file,
                         name, numel);
            return -1;
        }
        if (dt == t.dtype) {
            memcpy(e->wowned, t.data, numel * es);
        } else {
            float row[1024]; /* convert through a small f32 buffer: no f32 copy of the tensor */
            const uint8_t *src = t.data;
            size_t ses = stage_dtype_size(t.dtype);
            for (size_t i = 0; i < numel; i += 1024) {
                size_t n = numel - i < 1024 ? numel - i : 1024;
                stage_dtype_to_f32(t.dtype, src + i * ses, row, n);
                stage_dtype_from_f32(dt, row, (uint8_t *)e->wowned + i * es, n);
            }
        }
        e->wdata = e->wowned;
    }
    e->wdtype = dt;
    m->loaded_bytes += numel * es;
    out->data = e->wdata;
    return 0;
}

size_t st_count(const st_model *m) { return m ? m->n_ents : 0; }
const char *st_name_at(const st_model *m, size_t i)
{
    return m && i < m->n_ents ? m->ents[i].name : NULL;
}

size_t st_loaded_bytes(const st_model *m) { return m ? m->loaded_bytes : 0; }

/* ---- writing: the streaming writer, st_writer on top of it, patching ------------------------- */

typedef struct {
    char *name;
    stage_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    uint64_t nbytes;
    uint64_t offset; /* within its file's data region */
    int file;        /* index into st_stream.files */
} st_stensor;

typedef struct {
    char *path;    /* dir/name */
    char name[64]; /* the name the index's weight_map gives */
    int created;   /* exists on disk: removed when the stream fails */
} st_sfile;

/* f32 values converted per call of st_stream_write_f32 at most (the conversion buffer). */
#define ST_CVT_N 65536

struct st_stream {
    st_stensor *t; /* [n] declaration order = file order */
    size_t n, cap;
    int state;       /* 0 declaring, 1 writing, 2 finished, -1 failed */
    st_sfile *files; /* [n_files] */
    int n_files, sharded;
    char *index_path; /* sharded: dir/model.safetensors.index.json */
    int index_created;
    FILE *cur; /* the open file (files[cur_file]) or NULL */
    int cur_file;
    size_t ti;       /* tensor the next byte belongs to */
    uint64_t t_done; /* bytes of tensor ti written */
    uint64_t total, written;
    uint8_t *cvt; /* [ST_CVT_N * 4] f32 -> dtype conversion buffer */
};

st_stream *st_stream_new(void)
{
    st_stream *s = calloc(1, sizeof *s);
    if (s) s->cur_file = -1;
    return s;
}

/* Remove everything written so far; the stream cannot be used after this. */
static void stream_fail(st_stream *s)
{
    if (s->cur) fclose(s->cur);
    s->cur = NULL;
    for (int i = 0; i < s->n_files; i++)
        if (s->files[i].created) unlink(s->files[i].path);
    if (s->index_created) unlink(s->index_path);
    s->state = -1;
}

void st_stream_free(st_stream *s)
{
    if (!s) return;
    if (s->state == 1) stream_fail(s); /* never finished: leave no partial model behind */
    for (size_t i = 0; i < s->n; i++) free(s->t[i].name);
    free(s->t);
    for (int i = 0; i < s->n_files; i++) free(s->files[i].path);
    free(s->files);
    free(s->index_path);
    free(s->cvt);
    free(s);
}

/* numel of a shape the writers accept (every dim an exact JSON integer, numel * 4 fits
 * size_t); -1 when it is not. */
static int shape_numel(int ndim, const int64_t *shape, size_t *numel)
{
    size_t ne = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (double)shape[i] > ST_MAX_JSON_INT) return -1;
        if (shape[i] != 0 && ne > SIZE_MAX / 4 / (size_t)shape[i]) return -1;
        ne *= (size_t)shape[i];
    }
    *numel = ne;
    return 0;
}

int st_stream_declare(st_stream *s, const char *name, stage_dtype dt, int ndim,
                      const int64_t *shape)
{
    size_t numel;
    if (!s || s->state != 0 || !name || ndim < 0 || ndim > ST_MAX_DIMS || (ndim > 0 && !shape) ||
        file_esize(dt) == 0 || strcmp(name, "__metadata__") == 0 ||
        shape_numel(ndim, shape, &numel))
        return -1;
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 64;
        st_stensor *nt = realloc(s->t, nc * sizeof *nt);
        if (!nt) return -1;
        s->t = nt;
        s->cap = nc;
    }
    st_stensor *t = &s->t[s->n];
    memset(t, 0, sizeof *t);
    if (!(t->name = st_strdup(name))) return -1;
    t->dtype = dt;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->nbytes = (uint64_t)numel * file_esize(dt);
    s->total += t->nbytes;
    s->n++;
    return 0;
}

static int st_cmp_name_ptr(const void *a, const void *b)
{
    return strcmp((*(const st_stensor *const *)a)->name, (*(const st_stensor *const *)b)->name);
}

static int write_all(FILE *f, const void *p, size_t n)
{
    return n == 0 || fwrite(p, 1, n, f) == n ? 0 : -1;
}

/* The header of file fi: [u64 N][N bytes JSON], JSON space-padded so the data region starts
 * at a multiple of 8; tensors packed back to back (the reference loader rejects gaps). */
static char *stream_header(const st_stream *s, int fi, size_t *len)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
    if (!root || !meta || !cJSON_AddStringToObject(meta, "format", "pt")) goto oom;
    for (size_t i = 0; i < s->n; i++) {
        const st_stensor *t = &s->t[i];
        if (t->file != fi) continue;
        cJSON *e = cJSON_AddObjectToObject(root, t->name);
        if (!e || !cJSON_AddStringToObject(e, "dtype", dtype_header_name(t->dtype))) goto oom;
        cJSON *sh = cJSON_AddArrayToObject(e, "shape");
        cJSON *of = cJSON_AddArrayToObject(e, "data_offsets");
        if (!sh || !of) goto oom;
        for (int d = 0; d < t->ndim; d++)
            if (!cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t->shape[d]))) goto oom;
        if (!cJSON_AddItemToArray(of, cJSON_CreateNumber((double)t->offset)) ||
            !cJSON_AddItemToArray(of, cJSON_CreateNumber((double)(t->offset + t->nbytes))))
            goto oom;
    }
    char *json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!json) return NULL;
    size_t jl = strlen(json), pad = (8 - (8 + jl) % 8) % 8;
    char *h = malloc(8 + jl + pad);
    if (h) {
        write_le64((uint8_t *)h, (uint64_t)(jl + pad));
        memcpy(h + 8, json, jl);
        memset(h + 8 + jl, ' ', pad);
        *len = 8 + jl + pad;
    }
    free(json);
    return h;
oom:
    cJSON_Delete(root);
    return NULL;
}

static int stream_close_cur(st_stream *s, char *err, size_t errlen)
{
    if (!s->cur) return 0;
    FILE *f = s->cur;
    s->cur = NULL;
    if (fclose(f) != 0) {
        base_set_err(err, errlen, "%s: write failed: %s", s->files[s->cur_file].path,
                     strerror(errno));
        return -1;
    }
    return 0;
}

/* Make file fi the open one: close the previous, create fi and write its header. */
static int stream_open(st_stream *s, int fi, char *err, size_t errlen)
{
    if (s->cur && s->cur_file == fi) return 0;
    if (stream_close_cur(s, err, errlen)) return -1;
    st_sfile *f = &s->files[fi];
    size_t hl = 0;
    char *h = stream_header(s, fi, &hl);
    if (!h) {
        base_set_err(err, errlen, "%s: out of memory building the header", f->path);
        return -1;
    }
    s->cur = fopen(f->path, "wb");
    s->cur_file = fi;
    if (!s->cur) {
        base_set_err(err, errlen, "%s: cannot create: %s", f->path, strerror(errno));
        free(h);
        return -1;
    }
    f->created = 1;
    int bad = write_all(s->cur, h, hl);
    free(h);
    if (bad) {
        base_set_err(err, errlen, "%s: write failed: %s", f->path, strerror(errno));
        return -1;
    }
    return 0;
}

int st_stream_begin(st_stream *s, const char *dir, int n_shards, char *err, size_t errlen)
{
    if (!s || !dir || s->state != 0) {
        base_set_err(err, errlen, "st_stream_begin: no stream or directory, or begun twice");
        return -1;
    }
    s->state = -1; /* until everything below succeeded */
    /* Duplicate names would make an unreadable file. */
    if (s->n > 1) {
        const st_stensor **p = malloc(s->n * sizeof *p);
        if (!p) {
            base_set_err(err, errlen, "%s: out of memory", dir);
            return -1;
        }
        for (size_t i = 0; i < s->n; i++) p[i] = &s->t[i];
        qsort(p, s->n, sizeof *p, st_cmp_name_ptr);
        for (size_t i = 1; i < s->n; i++) {
            if (strcmp(p[i - 1]->name, p[i]->name) == 0) {
                base_set_err(err, errlen, "%s: tensor %s was added twice", dir, p[i]->name);
                free(p);
                return -1;
            }
        }
        free(p);
    }
    /* More shards than tensors would leave empty files: cap at one tensor per shard. */
    int ns = n_shards;
    if ((size_t)(ns > 0 ? ns : 0) > s->n) ns = (int)s->n;
    if (ns > 99999) {
        base_set_err(err, errlen, "%s: %d shards is more than the 5-digit file names allow", dir,
                     ns);
        return -1;
    }
    s->sharded = ns > 1;
    s->n_files = s->sharded ? ns : 1;
    s->files = calloc((size_t)s->n_files, sizeof *s->files);
    s->cvt = malloc((size_t)ST_CVT_N * 4);
    if (!s->files || !s->cvt) {
        base_set_err(err, errlen, "%s: out of memory", dir);
        return -1;
    }
    for (int i = 0; i < s->n_files; i++) {
        if (s->sharded)
            snprintf(s->files[i].name, sizeof s->files[i].name, "model-%05d-of-%05d.safetensors",
                     i + 1, ns);
        else
            snprintf(s->files[i].name, sizeof s->files[i].name, "%s", ST_SINGLE_NAME);
        if (!(s->files[i].path = path_join(dir, s->files[i].name))) {
            base_set_err(err, errlen, "%s: out of memory", dir);
            return -1;
        }
    }
    if (s->sharded) {
        char *single = path_join(dir, ST_SINGLE_NAME);
        s->index_path = path_join(dir, ST_INDEX_NAME);
        if (!single || !s->index_path) {
            free(single);
            base_set_err(err, errlen, "%s: out of memory", dir);
            return -1;
        }
        /* Readers prefer model.safetensors: a stale one would hide the shards we write. */
        int stale = is_regular_file(single);
        free(single);
        if (stale) {
            base_set_err(err, errlen,
                         "%s: already holds " ST_SINGLE_NAME
                         " (readers would use it instead of the shards); remove it first",
                         dir);
            return -1;
        }
        /* Balanced by bytes in declaration order: tensor i goes to the next shard once the
         * bytes before its midpoint pass that shard's share; every shard gets a tensor. */
        double total = (double)s->total, acc = 0;
        int f = 0;
        size_t in_f = 0;
        for (size_t i = 0; i < s->n; i++) {
            if (f < ns - 1 && in_f > 0) {
                size_t left_t = s->n - i;             /* tensors not yet placed, i included */
                size_t left_f = (size_t)(ns - 1 - f); /* shards after f */
                double mid = acc + 0.5 * (double)s->t[i].nbytes;
                if (left_t <= left_f || mid > total * (double)(f + 1) / (double)ns) {
                    f++;
                    in_f = 0;
                }
            }
            s->t[i].file = f;
            in_f++;
            acc += (double)s->t[i].nbytes;
        }
    }
    uint64_t off = 0;
    for (size_t i = 0; i < s->n; i++) {
        if (i > 0 && s->t[i].file != s->t[i - 1].file) off = 0;
        s->t[i].offset = off;
        off += s->t[i].nbytes;
    }
    s->state = 1;
    /* the first file now: a directory we cannot write to fails here, before any data */
    if (stream_open(s, 0, err, errlen)) {
        stream_fail(s);
        return -1;
    }
    return 0;
}

/* Skip empty tensors at the write position. */
static void stream_skip_empty(st_stream *s)
{
    while (s->ti < s->n && s->t[s->ti].nbytes == 0) s->ti++;
}

int st_stream_write(st_stream *s, const void *bytes, size_t n, char *err, size_t errlen)
{
    if (!s || s->state != 1 || (n > 0 && !bytes)) {
        base_set_err(err, errlen,
                     "st_stream_write: stream not writable (not begun, failed or finished)");
        return -1;
    }
    const uint8_t *p = bytes;
    while (n > 0) {
        stream_skip_empty(s);
        if (s->ti == s->n) {
            base_set_err(err, errlen, "%s: %zu bytes more than the declared tensors hold",
                         s->files[s->n_files - 1].path, n);
            stream_fail(s);
            return -1;
        }
        st_stensor *t = &s->t[s->ti];
        if (stream_open(s, t->file, err, errlen)) {
            stream_fail(s);
            return -1;
        }
        uint64_t left = t->nbytes - s->t_done;
        size_t k = n < left ? n : (size_t)left;
        if (write_all(s->cur, p, k)) {
            base_set_err(err, errlen, "%s: write failed: %s", s->files[t->file].path,
                         strerror(errno));
            stream_fail(s);
            return -1;
        }
        p += k;
        n -= k;
        s->written += k;
        s->t_done += k;
        if (s->t_done == t->nbytes) {
            s->ti++;
            s->t_done = 0;
        }
    }
    return 0;
}

int st_stream_write_f32(st_stream *s, const float *v, size_t n, char *err, size_t errlen)
{
    if (!s || s->state != 1 || (n > 0 && !v)) {
        base_set_err(err, errlen,
                     "st_stream_write_f32: stream not writable (not begun, failed or "
                     "finished)");
        return -1;
    }
    while (n > 0) {
        stream_skip_empty(s);
        if (s->ti == s->n) return st_stream_write(s, v, n * 4, err, errlen); /* says how many */
        const st_stensor *t = &s->t[s->ti];
        if (t->dtype == STAGE_Q8_0) {
            base_set_err(err, errlen,
                         "st_stream_write_f32: tensor %s is I8 (q8_0): write its bytes", t->name);
            return -1;
        }
        size_t es = stage_dtype_size(t->dtype);
        uint64_t left = (t->nbytes - s->t_done) / es;
        size_t k = n < left ? n : (size_t)left;
        if (k > ST_CVT_N) k = ST_CVT_N;
        const void *src = v;
        if (t->dtype != STAGE_F32) {
            stage_dtype_from_f32(t->dtype, v, s->cvt, k);
            src = s->cvt;
        }
        if (st_stream_write(s, src, k * es, err, errlen)) return -1;
        v += k;
        n -= k;
    }
    return 0;
}

static int stream_write_index(st_stream *s, char *err, size_t errlen)
{
    int rc = -1;
    char *json = NULL;
    cJSON *root = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(root, "metadata");
    cJSON *wm = cJSON_AddObjectToObject(root, "weight_map");
    if (!root || !meta || !wm || !cJSON_AddNumberToObject(meta, "total_size", (double)s->total))
        goto oom;
    for (size_t i = 0; i < s->n; i++)
        if (!cJSON_AddStringToObject(wm, s->t[i].name, s->files[s->t[i].file].name)) goto oom;
    if (!(json = cJSON_Print(root))) goto oom;
    FILE *f = fopen(s->index_path, "wb");
    if (!f) {
        base_set_err(err, errlen, "%s: cannot create: %s", s->index_path, strerror(errno));
        goto out;
    }
    s->index_created = 1;
    int bad = write_all(f, json, strlen(json)) || write_all(f, "\n", 1);
    if (fclose(f) != 0) bad = 1;
    if (bad) {
        base_set_err(err, errlen, "%s: write failed: %s", s->index_path, strerror(errno));
        goto out;
    }
    rc = 0;
    goto out;
oom:
    base_set_err(err, errlen, "%s: out of memory building the index", s->index_path);
out:
    cJSON_Delete(root);
    free(json);
    return rc;
}

int st_stream_finish(st_stream *s, char *err, size_t errlen)
{
    if (!s || s->state != 1) {
        base_set_err(err, errlen,
                     "st_stream_finish: stream not writable (not begun, failed or finished)");
        return -1;
    }
    stream_skip_empty(s);
    if (s->ti < s->n) {
        base_set_err(err, errlen,
                     "%s: tensor %s incomplete: %llu of %llu bytes of the model written",
                     s->files[s->t[s->ti].file].path, s->t[s->ti].name,
                     (unsigned long long)s->written, (unsigned long long)s->total);
        stream_fail(s);
        return -1;
    }
    /* files whose tensors are all empty have not been opened yet */
    for (int i = 0; i < s->n_files; i++) {
        if (!s->files[i].created && stream_open(s, i, err, errlen)) {
            stream_fail(s);
            return -1;
        }
    }
    if (stream_close_cur(s, err, errlen) || (s->sharded && stream_write_index(s, err, errlen))) {
        stream_fail(s);
        return -1;
    }
    s->state = 2;
    return 0;
}

uint64_t st_stream_total_bytes(const st_stream *s) { return s ? s->total : 0; }

uint64_t st_stream_written_bytes(const st_stream *s) { return s ? s->written : 0; }

/* ---- st_writer: collect, then stream out ----------------------------------------------------- */

typedef struct {
    char *name;
    stage_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    void *bytes; /* [nbytes] in dtype, little-endian */
    size_t nbytes;
} st_wtensor;

struct st_writer {
    st_wtensor *t; /* insertion order */
    size_t n, cap;
};

st_writer *st_writer_new(void) { return calloc(1, sizeof(st_writer)); }

void st_writer_free(st_writer *w)
{
    if (!w) return;
    for (size_t i = 0; i < w->n; i++) {
        free(w->t[i].name);
        free(w->t[i].bytes);
    }
    free(w->t);
    free(w);
}

int st_writer_add(st_writer *w, const char *name, stage_dtype dt, int ndim, const int64_t *shape,
                  const float *data)
{
    size_t numel;
    if (!w || !name || ndim < 0 || ndim > ST_MAX_DIMS || (ndim > 0 && !shape) ||
        stage_dtype_size(dt) == 0 || strcmp(name, "__metadata__") == 0 ||
        shape_numel(ndim, shape, &numel))
        return -1;
    if (numel > 0 && !data) return -1;
    if (w->n == w->cap) {
        size_t nc = w->cap ? w->cap * 2 : 64;
        st_wtensor *nt = realloc(w->t, nc * sizeof *nt);
        if (!nt) return -1;
        w->t = nt;
        w->cap = nc;
    }
    st_wtensor *t = &w->t[w->n];
    memset(t, 0, sizeof *t);
    t->nbytes = numel * stage_dtype_size(dt);
    t->name = st_strdup(name);
    t->bytes = malloc(t->nbytes ? t->nbytes : 1);
    if (!t->name || !t->bytes) {
        free(t->name);
        free(t->bytes);
        return -1;
    }
    t->dtype = dt;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    if (numel > 0) stage_dtype_from_f32(dt, data, t->bytes, numel); /* data may be NULL if empty */
    w->n++;
    return 0;
}

int st_writer_save(st_writer *w, const char *dir, int n_shards, char *err, size_t errlen)
{
    if (!w || !dir) {
        base_set_err(err, errlen, "st_writer_save: no writer or directory");
        return -1;
    }
    st_stream *s = st_stream_new();
    int rc = s ? 0 : -1;
    for (size_t i = 0; !rc && i < w->n; i++)
        rc = st_stream_declare(s, w->t[i].name, w->t[i].dtype, w->t[i].ndim, w->t[i].shape);
    if (rc) {
        base_set_err(err, errlen, "%s: out of memory", dir);
    } else {
        rc = st_stream_begin(s, dir, n_shards, err, errlen);
        for (size_t i = 0; !rc && i < w->n; i++)
            rc = st_stream_write(s, w->t[i].bytes, w->t[i].nbytes, err, errlen);
        if (!rc) rc = st_stream_finish(s, err, errlen);
    }
    st_stream_free(s);
    return rc ? -1 : 0;
}

/* ---- patching a tensor in place -------------------------------------------------------------- */

int st_patch_f32(const char *dir, const char *name, const float *v, size_t n, char *err,
                 size_t errlen)
{
    st_model *m = NULL;
    if (!name || (n > 0 && !v) || st_open(dir, &m, err, errlen)) {
        if (!name || (n > 0 && !v))
            base_set_err(err, errlen, "st_patch_f32: no tensor name or values");
        return -1;
    }
    st_tensor t;
    int rc = st_find(m, name, &t, err, errlen);
    size_t es = rc > 0 ? stage_dtype_size(t.dtype) : 0;
    void *buf = NULL;
    if (rc > 0 && t.dtype == STAGE_Q8_0) {
        base_set_err(err, errlen, "%s: tensor %s is I8 (q8_0), not patchable as f32", t.file, name);
        rc = -1;
    }
    if (rc > 0 && t.nbytes != n * es) {
        base_set_err(err, errlen, "%s: tensor %s holds %zu values, %zu given", t.file, name,
                     t.nbytes / es, n);
        rc = -1;
    }
    if (rc > 0 && !(buf = malloc(n * es + 1))) {
        base_set_err(err, errlen, "%s: out of memory", t.file);
        rc = -1;
    }
    if (rc > 0) {
        const st_file *f = &m->files[ent_lookup(m, name)->file];
        off_t off = (off_t)((const uint8_t *)t.data - (const uint8_t *)f->map);
        stage_dtype_from_f32(t.dtype, v, buf, n);
        int fd = open(t.file, O_WRONLY | O_CLOEXEC);
        ssize_t wr = fd >= 0 ? pwrite(fd, buf, n * es, off) : -1;
        int saved = errno;
        if (fd >= 0 && close(fd) != 0 && wr == (ssize_t)(n * es)) {
            wr = -1;
            saved = errno;
        }
        if (wr != (ssize_t)(n * es)) {
            base_set_err(err, errlen, "%s: cannot patch tensor %s: %s", t.file, name,
                         wr < 0 ? strerror(saved) : "short write");
            rc = -1;
        }
    }
    free(buf);
    st_close(m);
    return rc;
}
