/* stage/kernels.c — see kernels.h. */
#include "stage/kernels.h"

#include <cblas.h>
#include <math.h>

void stage_matmul(const float *x, int m, int k, const float *w, int n, float *y)
{
    if (m <= 0 || n <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, k, w, k, 0.0f, y, n);
}

void stage_rmsnorm(const float *x, int m, int d, const float *w, float eps, float *y)
{
    for (int i = 0; i < m; i++) {
        const float *xi = x + (long)i * d;
        float *yi = y + (long)i * d;
        double ss = 0.0;
        for (int j = 0; j < d; j++) ss += (double)xi[j] * xi[j];
        float inv = (float)(1.0 / sqrt(ss / d + (double)eps));
        for (int j = 0; j < d; j++) yi[j] = xi[j] * inv * w[j];
    }
}

void stage_rope_inv_freq(float theta, int head_dim, float *inv_freq)
{
    for (int i = 0; i < head_dim / 2; i++)
        inv_freq[i] = (float)(1.0 / pow((double)theta, (double)(2 * i) / (double)head_dim));
}

void stage_rope(float *v, int n_heads, int head_dim, int pos, const float *inv_freq)
{
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        float ang = (float)pos * inv_freq[i]; /* float product, as HF's float32 freqs */
        float c = (float)cos((double)ang), s = (float)sin((double)ang);
        for (int h = 0; h < n_heads; h++) {
            float *p = v + (long)h * head_dim;
            float a = p[i], b = p[i + half];
            p[i] = a * c - b * s;
            p[i + half] = b * c + a * s;
        }
    }
}

void stage_swiglu(float *a, const float *b, long n)
{
    for (long i = 0; i < n; i++) a[i] = stage_silu(a[i]) * b[i];
}

void stage_softmax(float *v, int n)
{
    float mx = v[0];
    for (int i = 1; i < n; i++)
        if (v[i] > mx) mx = v[i];
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        v[i] = expf(v[i] - mx);
        sum += v[i];
    }
    float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++) v[i] *= inv;
}

float stage_dot(const float *a, const float *b, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; i++) s += (double)a[i] * b[i];
    return (float)s;
}
