/* stage/safetensors_write.c — safetensors writing: the streaming writer (st_stream), the
 * in-memory writer on top of it (st_writer) and patching one tensor in place. See
 * safetensors.h; the file layout is the one safetensors.c reads (docs/SPEC.md §3).
 */
#include "stage/safetensors.h"
#include "stage/safetensors_impl.h"

#include "base/err.h"
#include "stage/convert.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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
        st_file_esize(dt) == 0 || strcmp(name, "__metadata__") == 0 ||
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
    t->nbytes = (uint64_t)numel * st_file_esize(dt);
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
        if (!e || !cJSON_AddStringToObject(e, "dtype", st_dtype_header_name(t->dtype))) goto oom;
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
        st_write_le64((uint8_t *)h, (uint64_t)(jl + pad));
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
        if (!(s->files[i].path = st_path_join(dir, s->files[i].name))) {
            base_set_err(err, errlen, "%s: out of memory", dir);
            return -1;
        }
    }
    if (s->sharded) {
        char *single = st_path_join(dir, ST_SINGLE_NAME);
        s->index_path = st_path_join(dir, ST_INDEX_NAME);
        if (!single || !s->index_path) {
            free(single);
            base_set_err(err, errlen, "%s: out of memory", dir);
            return -1;
        }
        /* Readers prefer model.safetensors: a stale one would hide the shards we write. */
        int stale = st_is_regular_file(single);
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
        off_t off = (off_t)st_file_offset(m, name, t.data);
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
