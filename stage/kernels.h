/* stage/kernels.h — the numeric building blocks of stage/ (fp32).
 * Row-major everywhere. Weights are HF nn.Linear [out][in], so y = x W^T. No allocation.
 */
#ifndef STAGE_KERNELS_H
#define STAGE_KERNELS_H

/* y [m][n] = x [m][k] · W^T, W [n][k] (cblas_sgemm). m == 0 is a no-op. */
void stage_matmul(const float *x, int m, int k, const float *w, int n, float *y);

/* y [m][d] = x / sqrt(mean(x^2) + eps) * w, row by row (y may equal x). */
void stage_rmsnorm(const float *x, int m, int d, const float *w, float eps, float *y);

/* Rotate one token's heads in place, HF "rotate_half" convention:
 * v [n_heads][head_dim]; pairs (i, i + head_dim/2) rotated by pos * inv_freq[i]. */
void stage_rope(float *v, int n_heads, int head_dim, int pos, const float *inv_freq);
/* inv_freq [head_dim/2] = 1 / theta^(2i / head_dim), as HF computes it (float32). */
void stage_rope_inv_freq(float theta, int head_dim, float *inv_freq);

static inline float stage_sigmoid(float x) { return 1.0f / (1.0f + __builtin_expf(-x)); }
static inline float stage_silu(float x) { return x / (1.0f + __builtin_expf(-x)); }

/* a [n] = silu(a) * b, element-wise. */
void stage_swiglu(float *a, const float *b, long n);

/* In-place softmax of v [n] (max-subtracted). */
void stage_softmax(float *v, int n);

/* Dot product in a fixed order (routers: the holder and the receiver must agree bit for bit). */
float stage_dot(const float *a, const float *b, int n);

#endif
