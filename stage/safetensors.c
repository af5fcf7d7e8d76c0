/* stage/safetensors.c — safetensors reading (mmap, lazy shards, index shards) and the helpers
 * both sides share (safetensors_impl.h); writing and patching are in safetensors_write.c. See
 * safetensors.h.
 *
 * File layout: [u64 little-endian N][N bytes JSON header][data region]. Header entries are
 * name -> {"dtype", "shape", "data_offsets": [begin, end]} with offsets relative to the data
 * region at 8 + N; "__metadata__" is skipped. We assume a little-endian host (as the tensors
 * are stored little-endian and handed out zero-copy).
 *
 * Not thread-safe: st_find / st_get_f32 may open shards and fill caches.
 */
#include "stage/safetensors.h"
#include "stage/safetensors_impl.h"

#include "base/err.h"
#include "stage/convert.h"
#include "stage/wmem.h"

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

/* ---- helpers --------------------------------------------------------------------------------- */

char *st_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* dir + "/" + name (no doubled slash); malloc'd. */
char *st_path_join(const char *dir, const char *name)
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

int st_is_regular_file(const char *path)
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

void st_write_le64(uint8_t *p, uint64_t v)
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
const char *st_dtype_header_name(stage_dtype d)
{
    return d == STAGE_Q8_0 ? "I8" : stage_dtype_st_name(d);
}
/* bytes of one element in a file: 4, 2, 2; 1 for the I8 of Q8_0 */
size_t st_file_esize(stage_dtype d) { return d == STAGE_Q8_0 ? 1 : stage_dtype_size(d); }

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
    uint64_t esz = st_file_esize(e->dtype), nbytes = esz;
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
    int in_arena; /* wowned is a block of m->arena (freed with it) */
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
    int huge;          /* st_set_huge: weight matrices copied into the arena */
    stage_wmem *arena; /* those copies (stage/wmem.h), made on first use */
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
        if (!m->ents[i].in_arena) free(m->ents[i].wowned);
    }
    stage_wmem_free(m->arena);
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
    f->path = name[0] == '/' ? st_strdup(name) : st_path_join(m->dir, name);
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
        if (!st_is_regular_file(m->files[i].path)) {
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
    char *single = st_path_join(dir, ST_SINGLE_NAME);
    char *index = st_path_join(dir, ST_INDEX_NAME);
    if (!single || !index) {
        base_set_err(err, errlen, "%s: out of memory", dir);
        rc = -1;
    } else if (st_is_regular_file(single)) { /* the single file wins over a (stale) index */
        m->label = single;
        single = NULL;
        rc = open_single(m, err, errlen);
    } else if (st_is_regular_file(index)) {
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

void st_set_huge(st_model *m, int on)
{
    if (m) m->huge = on != 0;
}

size_t st_huge_bytes(const st_model *m, size_t *backed)
{
    if (backed) *backed = m ? stage_wmem_huge_bytes(m->arena) : 0;
    return m ? stage_wmem_used(m->arena) : 0;
}

/* e->wowned = memory for a weight copy of `bytes`: a block of the huge-page arena when the
 * model copies its weights there, else 64-byte aligned heap; one spare 64-byte line either
 * way (masked tail loads stay inside). NULL when out of memory. */
static void *own_block(st_model *m, st_entry *e, size_t bytes)
{
    if (!m->huge) return e->wowned = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    if (!m->arena && !(m->arena = stage_wmem_new())) return NULL;
    e->in_arena = 1;
    return e->wowned = stage_wmem_alloc(m->arena, bytes + 64);
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
    own_block(m, e, total);
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
    if (m->huge) stage_wmem_release_source(t->data, t->nbytes);
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
                     ts.file, sname, st_dtype_header_name(ts.dtype));
        return -1;
    }
    const uint16_t *d = ts.data;
    const int8_t *q = t->data; /* int8: any address */
    if (m->huge) {             /* both copied into the arena: q [rows][cols], then the scales */
        const size_t qb = (t->nbytes + 63) / 64 * 64;
        if (!own_block(m, e, qb + ts.nbytes)) {
            base_set_err(err, errlen, "%s: out of memory loading tensor %s", t->file, name);
            return -1;
        }
        memcpy(e->wowned, t->data, t->nbytes);
        memcpy((char *)e->wowned + qb, ts.data, ts.nbytes);
        stage_wmem_release_source(t->data, t->nbytes);
        stage_wmem_release_source(ts.data, ts.nbytes);
        q = e->wowned;
        d = (const uint16_t *)((const char *)e->wowned + qb);
    } else if ((uintptr_t)ts.data % 2) { /* misaligned in the file: an aligned copy */
        if (!own_block(m, e, ts.nbytes)) {
            base_set_err(err, errlen, "%s: out of memory loading tensor %s", ts.file, sname);
            return -1;
        }
        memcpy(e->wowned, ts.data, ts.nbytes);
        d = e->wowned;
    }
    e->wdata = q;
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
    if (dt == t.dtype && ((uintptr_t)t.data % es) == 0 && !m->huge) {
        e->wdata = t.data; /* zero-copy into the mmap */
    } else { /* misaligned in the file, converted at load (--weights-dtype), or to huge pages */
        if (e->wowned) {
            base_set_err(err, errlen, "%s: tensor %s asked for in two dtypes", t.file, name);
            return -1;
        }
        if (!own_block(m, e, numel * es)) { /* [numel] in dt */
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
        if (m->huge) stage_wmem_release_source(t.data, t.nbytes);
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

int64_t st_file_offset(st_model *m, const char *name, const void *data)
{
    const st_file *f = &m->files[ent_lookup(m, name)->file];
    return (int64_t)((const uint8_t *)data - (const uint8_t *)f->map);
}
