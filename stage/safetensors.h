/* stage/safetensors.h — reading and writing safetensors model files (docs/SPEC.md §3).
 *
 * Reading: st_open() takes a model directory holding either `model.safetensors` or
 * `model.safetensors.index.json` (+ the shard files its weight_map names). Shard files are
 * opened, validated and mmap'd lazily, the first time one of their tensors is asked for, so a
 * pipeline stage only touches the shards holding its own layers.
 *
 * Validation of every opened file (each failure is one line naming the file, and the tensor
 * where there is one): file shorter than 8 bytes; header length past the end of file; header
 * not JSON / not an object; an entry without dtype/shape/data_offsets or with wrong types;
 * unknown dtype (only F32, F16, BF16 are accepted, and I8: the q of a Q8_0 matrix, read as
 * STAGE_Q8_0 with 1-byte elements, its F16 scales in NAME_scale, docs/SPEC.md §9); data_offsets out of the data region, end
 * < begin, or length != numel * dtype size; two tensors' byte ranges overlapping. For the index:
 * not JSON, no weight_map, a shard file that does not exist.
 *
 * Ownership: everything returned points into the st_model (the mmap or converted copies it
 * owns); it stays valid until st_close(). st_close(NULL) is a no-op.
 *
 * Writing, streaming (st_stream): declare every tensor (name, dtype, shape) first;
 * st_stream_begin() then fixes the file split and every header from that list alone, and the
 * tensors' bytes follow in declaration order, in chunks of any size (st_stream_write: raw
 * little-endian bytes of the tensors' dtypes; st_stream_write_f32: f32 values converted to the
 * dtype of the tensor they land in; a chunk may span tensors). Memory: the tensor list and a
 * 256 KiB conversion buffer, never the data. Output: `model.safetensors`, or N shards
 * `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json` (tensors split in
 * declaration order, balanced by bytes). On any error, and on st_stream_free() of an
 * unfinished stream, the files written so far are removed (no partial model is left).
 *
 * Writing, in memory (st_writer): collects f32 tensors, converts them to the requested dtype
 * and saves them through an st_stream — the same bytes as streaming the same tensors.
 *
 * Patching: st_patch_f32() overwrites one tensor's bytes in place (pwrite at its offset in
 * its file), converting f32 values to the file's dtype (router bias calibration of a model
 * that was streamed to disk).
 */
#ifndef STAGE_SAFETENSORS_H
#define STAGE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "stage/dtype.h"

#define ST_MAX_DIMS 8

typedef struct {
    stage_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data; /* raw bytes in the file's dtype (inside the mmap) */
    size_t nbytes;
    const char *file; /* path of the file that holds it */
} st_tensor;

typedef struct st_model st_model;

/* Open a model directory. Returns 0, or non-zero with a message in err. */
int st_open(const char *dir, st_model **out, char *err, size_t errlen);
void st_close(st_model *m);

/* Weight matrices handed out by st_get_weight from now on are copies on 2 MiB pages
 * (stage/wmem.h), the mmap'd source pages released, instead of views into the mmap. Same
 * bytes. st_huge_bytes: bytes copied so far (*backed, when not NULL: how many of them the
 * kernel holds on huge pages now). */
void st_set_huge(st_model *m, int on);
size_t st_huge_bytes(const st_model *m, size_t *backed);

/* Look a tensor up. Returns 1 and fills *t when present, 0 when the model has no such
 * tensor, -1 on an error (a malformed shard file) with the message in err. */
int st_find(st_model *m, const char *name, st_tensor *t, char *err, size_t errlen);

/* The tensor as f32 with exactly the expected shape (ndim dims). Returns a pointer owned by
 * m (zero-copy into the mmap for aligned F32 data, else a converted copy), or NULL with a
 * message: "FILE: missing tensor NAME", "FILE: tensor NAME has shape [..], expected [..]". */
const float *st_get_f32(st_model *m, const char *name, int ndim, const int64_t *shape, char *err,
                        size_t errlen);

/* A 2-D weight [rows][cols] in its checkpoint dtype (want < 0) or converted to dtype `want`
 * (e.g. f32 -> bf16 at load, or quantized to STAGE_Q8_0 row by row): zero-copy into the mmap
 * when stored in that dtype and aligned to its element size, else an aligned copy owned by m
 * (converted through a small buffer: never an f32 copy of the tensor). A matrix stored as
 * Q8_0 (I8 + NAME_scale) comes in place, q and scales; asking it for another dtype is an
 * error. Errors as st_get_f32. Returns 0 or -1. */
int st_get_weight(st_model *m, const char *name, int64_t rows, int64_t cols, int want,
                  stage_weight *out, char *err, size_t errlen);

/* The model's tensor names, sorted (i < st_count; NULL past the end). */
size_t st_count(const st_model *m);
const char *st_name_at(const st_model *m, size_t i);

/* Bytes handed out so far by st_get_f32 (as f32) and st_get_weight (in their dtype). */
size_t st_loaded_bytes(const st_model *m);

/* ---- writing --------------------------------------------------------------------------------- */
typedef struct st_stream st_stream;
st_stream *st_stream_new(void); /* NULL: out of memory */
/* Before st_stream_begin. dt STAGE_Q8_0 declares an I8 tensor (bytes via st_stream_write
 * only). -1: bad arguments (ndim > ST_MAX_DIMS, negative dim, unknown dtype,
 * the name "__metadata__", numel * 4 overflowing size_t) or out of memory. */
int st_stream_declare(st_stream *s, const char *name, stage_dtype dt, int ndim,
                      const int64_t *shape);
/* Into existing directory `dir`; n_shards <= 1: model.safetensors, else at most one shard per
 * tensor. Checks: no name declared twice, at most 99999 shards, no stale model.safetensors
 * beside new shards; creates the first file. 0, or -1 with "PATH: cannot create: ..." etc. */
int st_stream_begin(st_stream *s, const char *dir, int n_shards, char *err, size_t errlen);
int st_stream_write(st_stream *s, const void *bytes, size_t n, char *err, size_t errlen);
int st_stream_write_f32(st_stream *s, const float *v, size_t n, char *err, size_t errlen);
/* Every declared byte must have come; closes the files, writes the index. 0 or -1. */
int st_stream_finish(st_stream *s, char *err, size_t errlen);
uint64_t st_stream_total_bytes(const st_stream *s);   /* data bytes of the declared tensors */
uint64_t st_stream_written_bytes(const st_stream *s); /* of those, written so far */
void st_stream_free(st_stream *s);

typedef struct st_writer st_writer;
st_writer *st_writer_new(void);
/* Copies `data` (f32, numel = prod(shape)) and converts it to dt. Returns 0 or -1 (OOM). */
int st_writer_add(st_writer *w, const char *name, stage_dtype dt, int ndim, const int64_t *shape,
                  const float *data);
/* Writes into existing directory `dir` (as st_stream_begin). */
int st_writer_save(st_writer *w, const char *dir, int n_shards, char *err, size_t errlen);
void st_writer_free(st_writer *w);

/* Overwrite tensor `name` of the model in `dir` with n f32 values (converted to its dtype).
 * 1 patched, 0 the model has no such tensor, -1 error (n differs from its size, I/O). */
int st_patch_f32(const char *dir, const char *name, const float *v, size_t n, char *err,
                 size_t errlen);

#endif
