/* stage/npy.h — float32 .npy files (NumPy format 1.0), for --dump-logits and fixtures.
 * npy_write_f32: C order, little-endian '<f4'. npy_read_f32: accepts '<f4' C-order arrays of
 * up to 8 dims; *data is malloc'd (caller frees). Errors: non-zero + one line in err. */
#ifndef STAGE_NPY_H
#define STAGE_NPY_H

#include <stddef.h>
#include <stdint.h>

int npy_write_f32(const char *path, const float *data, int ndim, const int64_t *shape, char *err,
                  size_t errlen);
int npy_read_f32(const char *path, float **data, int *ndim, int64_t shape[8], char *err,
                 size_t errlen);

#endif
