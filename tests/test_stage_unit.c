/* tests/test_stage_unit.c — the stage module's units without fixtures:
 *   1. kernels (matmul, rmsnorm, rope, softmax, swiglu, dot) and f32 <-> bf16 / f16
 *      conversions against hand values and independent naive loops;
 *   5. sampling (greedy ties, seeded reproducibility, top-p, frequencies) and NLL;
 *   6. error paths (missing tensor, token out of range, slot out of range).
 * (tests/test_stage.c has 2 and 4, tests/test_layers.c 3.)
 * Run from the repository root. MODPIPE_TEST_VERBOSE=1 prints the measured errors.
 */
#include "tests/stage_util.h"

/* ---- 1. kernels ------------------------------------------------------------------------------ */

static void check_matmul_shape(int m, int k, int n)
{
    float *x = malloc((size_t)m * k * sizeof *x), *w = malloc((size_t)n * k * sizeof *w);
    float *y = malloc((size_t)m * n * sizeof *y);
    CU_ASSERT_FATAL(x && w && y);
    for (int i = 0; i < m * k; i++) x[i] = rnd_unit();
    for (int i = 0; i < n * k; i++) w[i] = rnd_unit();
    stage_matmul(x, m, k, w, n, y);
    int bad = 0;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0.0, mag = 0.0;
            for (int t = 0; t < k; t++) {
                s += (double)x[i * k + t] * w[j * k + t];
                mag += fabs((double)x[i * k + t] * w[j * k + t]);
            }
            if (fabs(y[i * n + j] - s) > 1e-5 * (1.0 + mag)) {
                if (!bad)
                    fprintf(stderr, "\n  matmul %dx%dx%d [%d][%d]: %g vs %g\n", m, k, n, i, j,
                            y[i * n + j], s);
                bad++;
            }
        }
    CU_ASSERT_EQUAL(bad, 0);
    free(x);
    free(w);
    free(y);
}

static void test_matmul(void)
{
    g_lcg = 1;
    check_matmul_shape(1, 1, 1);
    check_matmul_shape(1, 64, 97); /* one decode row through lm_head */
    check_matmul_shape(3, 5, 7);
    check_matmul_shape(17, 64, 128); /* m > 16: OpenBLAS switches kernels there */
    check_matmul_shape(40, 33, 19);
    /* hand case: x = [[1,2],[3,4]], W = [[1,0],[0,1],[1,1]] -> [[1,2,3],[3,4,7]] */
    float x[4] = {1, 2, 3, 4}, w[6] = {1, 0, 0, 1, 1, 1}, y[6];
    stage_matmul(x, 2, 2, w, 3, y);
    float want[6] = {1, 2, 3, 3, 4, 7};
    CU_ASSERT(memcmp(y, want, sizeof y) == 0);
    /* m == 0 is a no-op */
    float keep[3] = {42, 43, 44};
    stage_matmul(x, 0, 2, w, 3, keep);
    CU_ASSERT(keep[0] == 42 && keep[1] == 43 && keep[2] == 44);
}

static void test_rmsnorm(void)
{
    /* x = [1,2,3,4]: mean(x^2) = 7.5 */
    float x[8] = {1, 2, 3, 4, -2, 0, 0, 0}, w[4] = {1, 1, 2, 0.5f}, y[8];
    stage_rmsnorm(x, 2, 4, w, 0.0f, y);
    double inv = 1.0 / sqrt(7.5);
    ASSERT_NEAR(y[0], 1 * inv, 1e-6, "rmsnorm y0");
    ASSERT_NEAR(y[1], 2 * inv, 1e-6, "rmsnorm y1");
    ASSERT_NEAR(y[2], 3 * inv * 2, 1e-6, "rmsnorm y2");
    ASSERT_NEAR(y[3], 4 * inv * 0.5, 1e-6, "rmsnorm y3");
    /* second row [-2,0,0,0]: mean(x^2) = 1 -> [-2,0,0,0] * w */
    ASSERT_NEAR(y[4], -2.0, 1e-6, "rmsnorm row 2");
    CU_ASSERT(y[5] == 0 && y[6] == 0 && y[7] == 0);
    /* eps enters inside the sqrt: x = [1,1,1,1], eps = 3 -> 1/sqrt(4) = 0.5 */
    float o[4] = {1, 1, 1, 1}, ones[4] = {1, 1, 1, 1};
    stage_rmsnorm(o, 1, 4, ones, 3.0f, o); /* in place */
    for (int i = 0; i < 4; i++) ASSERT_NEAR(o[i], 0.5, 1e-7, "rmsnorm eps / in place");
}

static void test_rope(void)
{
    float inv[2];
    stage_rope_inv_freq(10000.0f, 4, inv);
    ASSERT_NEAR(inv[0], 1.0, 0, "inv_freq[0]");
    ASSERT_NEAR(inv[1], 0.01, 1e-9, "inv_freq[1] = 10000^(-2/4)");
    float inv8[4];
    stage_rope_inv_freq(100.0f, 8, inv8);
    for (int i = 0; i < 4; i++)
        ASSERT_NEAR(inv8[i], pow(100.0, -2.0 * i / 8.0), 1e-7, "inv_freq hd 8");

    /* head_dim 4, two heads, pos 2: pairs (0,2) angle 2*1, (1,3) angle 2*0.01 */
    float v[8] = {1, 2, 3, 4, -1, 0.5f, 2, -3};
    float v0[8];
    memcpy(v0, v, sizeof v);
    stage_rope(v, 2, 4, 2, inv);
    for (int h = 0; h < 2; h++) {
        const float *p = v0 + 4 * h;
        double c0 = cos(2.0), s0 = sin(2.0), c1 = cos(0.02), s1 = sin(0.02);
        ASSERT_NEAR(v[4 * h + 0], p[0] * c0 - p[2] * s0, 1e-6, "rope i=0");
        ASSERT_NEAR(v[4 * h + 2], p[2] * c0 + p[0] * s0, 1e-6, "rope i=2");
        ASSERT_NEAR(v[4 * h + 1], p[1] * c1 - p[3] * s1, 1e-6, "rope i=1");
        ASSERT_NEAR(v[4 * h + 3], p[3] * c1 + p[1] * s1, 1e-6, "rope i=3");
    }
    /* hand numbers for head 0: cos 2 = -0.4161468, sin 2 = 0.9092974 */
    ASSERT_NEAR(v[0], -0.4161468 - 3 * 0.9092974, 1e-6, "rope hand v0");
    ASSERT_NEAR(v[2], 3 * -0.4161468 + 0.9092974, 1e-6, "rope hand v2");
    /* position 0 is the identity */
    memcpy(v, v0, sizeof v);
    stage_rope(v, 2, 4, 0, inv);
    CU_ASSERT(memcmp(v, v0, sizeof v) == 0);
    /* rotation keeps each pair's norm */
    memcpy(v, v0, sizeof v);
    stage_rope(v, 2, 4, 37, inv);
    ASSERT_NEAR(v[0] * v[0] + v[2] * v[2], 1 + 9, 1e-5, "rope keeps norm");
}

static void test_softmax_swiglu_dot(void)
{
    float a[3] = {1, 2, 3};
    stage_softmax(a, 3);
    double z = exp(1) + exp(2) + exp(3);
    ASSERT_NEAR(a[0], exp(1) / z, 1e-7, "softmax 0");
    ASSERT_NEAR(a[1], exp(2) / z, 1e-7, "softmax 1");
    ASSERT_NEAR(a[2], exp(3) / z, 1e-7, "softmax 2");
    /* max-subtracted: huge logits do not overflow; 1000 vs 1000 - ln 2 -> 2/3, 1/3 */
    float b[2] = {1000.0f, 1000.0f - (float)log(2.0)};
    stage_softmax(b, 2);
    ASSERT_NEAR(b[0], 2.0 / 3.0, 1e-5, "softmax large 0");
    ASSERT_NEAR(b[1], 1.0 / 3.0, 1e-5, "softmax large 1");
    float one[1] = {-7};
    stage_softmax(one, 1);
    CU_ASSERT(one[0] == 1.0f);
    float m[3] = {-INFINITY, 0, 0};
    stage_softmax(m, 3);
    CU_ASSERT(m[0] == 0.0f);
    ASSERT_NEAR(m[1], 0.5, 1e-7, "softmax -inf");

    /* swiglu: silu(a) * b, silu(x) = x / (1 + e^-x) */
    float g[4] = {0, 1, -1, 2}, u[4] = {3, 2, 1, 0.5f};
    stage_swiglu(g, u, 4);
    ASSERT_NEAR(g[0], 0.0, 0, "swiglu 0");
    ASSERT_NEAR(g[1], 1.0 / (1 + exp(-1.0)) * 2, 1e-6, "swiglu 1");
    ASSERT_NEAR(g[2], -1.0 / (1 + exp(1.0)) * 1, 1e-6, "swiglu 2");
    ASSERT_NEAR(g[3], 2.0 / (1 + exp(-2.0)) * 0.5, 1e-6, "swiglu 3");
    ASSERT_NEAR(stage_silu(1.0f), 0.7310586, 1e-6, "silu(1)");
    ASSERT_NEAR(stage_sigmoid(0.0f), 0.5, 0, "sigmoid(0)");
    ASSERT_NEAR(stage_sigmoid(2.0f), 0.8807971, 1e-6, "sigmoid(2)");

    float p[3] = {1, 2, 3}, q[3] = {4, 5, 6};
    CU_ASSERT(stage_dot(p, q, 3) == 32.0f);
    CU_ASSERT(stage_dot(p, q, 0) == 0.0f);
    g_lcg = 7;
    float *r = malloc(1000 * sizeof *r), *s = malloc(1000 * sizeof *s);
    double ref = 0.0, mag = 0.0;
    for (int i = 0; i < 1000; i++) {
        r[i] = rnd_unit();
        s[i] = rnd_unit();
        ref += (double)r[i] * s[i];
        mag += fabs((double)r[i] * s[i]);
    }
    ASSERT_NEAR(stage_dot(r, s, 1000), ref, 1e-6 * mag, "dot 1000");
    /* fixed order: the same inputs give the same bits */
    CU_ASSERT(bits_of(stage_dot(r, s, 1000)) == bits_of(stage_dot(r, s, 1000)));
    free(r);
    free(s);
}

static void test_convert_bf16(void)
{
    CU_ASSERT_EQUAL(stage_f32_to_bf16(1.0f), 0x3f80);
    CU_ASSERT_EQUAL(stage_f32_to_bf16(-1.5f), 0xbfc0);
    CU_ASSERT_EQUAL(stage_f32_to_bf16(0.0f), 0x0000);
    CU_ASSERT_EQUAL(stage_f32_to_bf16(-0.0f), 0x8000);
    /* round to nearest even: exactly half way goes to the even mantissa */
    CU_ASSERT_EQUAL(stage_f32_to_bf16(f_of(0x3f808000u)), 0x3f80); /* tie, 0x3f80 even */
    CU_ASSERT_EQUAL(stage_f32_to_bf16(f_of(0x3f818000u)), 0x3f82); /* tie, 0x3f81 odd -> up */
    CU_ASSERT_EQUAL(stage_f32_to_bf16(f_of(0x3f808001u)), 0x3f81); /* above half */
    CU_ASSERT_EQUAL(stage_f32_to_bf16(f_of(0x3f807fffu)), 0x3f80); /* below half */
    CU_ASSERT_EQUAL(stage_f32_to_bf16(f_of(0xbf818000u)), 0xbf82); /* negative tie */
    CU_ASSERT_EQUAL(stage_f32_to_bf16(f_of(0x3fffffffu)), 0x4000); /* carry into exponent */
    /* inf, overflow, NaN (a signalling NaN must not become inf by truncation) */
    CU_ASSERT_EQUAL(stage_f32_to_bf16(INFINITY), 0x7f80);
    CU_ASSERT_EQUAL(stage_f32_to_bf16(-INFINITY), 0xff80);
    CU_ASSERT_EQUAL(stage_f32_to_bf16(FLT_MAX), 0x7f80);
    CU_ASSERT(isnan(stage_bf16_to_f32(stage_f32_to_bf16(NAN))));
    CU_ASSERT(isnan(stage_bf16_to_f32(stage_f32_to_bf16(f_of(0x7f800001u)))));
    CU_ASSERT(isnan(stage_bf16_to_f32(stage_f32_to_bf16(f_of(0xff800001u)))));
    /* subnormals */
    CU_ASSERT_EQUAL(stage_f32_to_bf16(f_of(0x00010000u)), 0x0001);
    CU_ASSERT_EQUAL(stage_f32_to_bf16(f_of(0x00008000u)), 0x0000); /* tie -> even 0 */
    CU_ASSERT_EQUAL(stage_f32_to_bf16(f_of(0x00018000u)), 0x0002); /* tie -> even 2 */
    CU_ASSERT_EQUAL(stage_f32_to_bf16(f_of(0x00000001u)), 0x0000);
    CU_ASSERT_EQUAL(bits_of(stage_bf16_to_f32(0x0001)), 0x00010000u);
    /* bf16 -> f32 is exact: 1.0, -2.0, 0.333984375 */
    CU_ASSERT(stage_bf16_to_f32(0x3f80) == 1.0f);
    CU_ASSERT(stage_bf16_to_f32(0xc000) == -2.0f);
    CU_ASSERT(stage_bf16_to_f32(0x3eab) == 0.333984375f);
    CU_ASSERT(isinf(stage_bf16_to_f32(0x7f80)));
    /* every non-NaN bf16 survives the round trip */
    int bad = 0;
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = stage_bf16_to_f32((uint16_t)h);
        if (isnan(f)) continue;
        if (stage_f32_to_bf16(f) != h) bad++;
    }
    CU_ASSERT_EQUAL(bad, 0);
    /* array forms agree with the scalar ones */
    float src[5] = {1.0f, f_of(0x3f818000u), -INFINITY, 3.14159f, -1e-30f};
    uint16_t d[5];
    float back[5];
    stage_f32_to_bf16_n(src, d, 5);
    stage_bf16_to_f32_n(d, back, 5);
    for (int i = 0; i < 5; i++) {
        CU_ASSERT_EQUAL(d[i], stage_f32_to_bf16(src[i]));
        CU_ASSERT(bits_of(back[i]) == bits_of(stage_bf16_to_f32(d[i])));
    }
}

static void test_convert_f16(void)
{
    CU_ASSERT_EQUAL(stage_f32_to_f16(1.0f), 0x3c00);
    CU_ASSERT_EQUAL(stage_f32_to_f16(-2.0f), 0xc000);
    CU_ASSERT_EQUAL(stage_f32_to_f16(0.5f), 0x3800);
    CU_ASSERT_EQUAL(stage_f32_to_f16(-0.0f), 0x8000);
    CU_ASSERT_EQUAL(stage_f32_to_f16(65504.0f), 0x7bff); /* largest finite */
    /* ties to even in the normal range: 1 + 2^-11 is half way between 0x3c00 and 0x3c01 */
    CU_ASSERT_EQUAL(stage_f32_to_f16(1.0f + 0x1p-11f), 0x3c00);
    CU_ASSERT_EQUAL(stage_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);
    CU_ASSERT_EQUAL(stage_f32_to_f16(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);
    CU_ASSERT_EQUAL(stage_f32_to_f16(f_of(0x3fffffffu)), 0x4000); /* carry into exponent */
    /* overflow: 65519 rounds down to 65504, 65520 (the tie) to inf */
    CU_ASSERT_EQUAL(stage_f32_to_f16(65519.0f), 0x7bff);
    CU_ASSERT_EQUAL(stage_f32_to_f16(65520.0f), 0x7c00);
    CU_ASSERT_EQUAL(stage_f32_to_f16(1e6f), 0x7c00);
    CU_ASSERT_EQUAL(stage_f32_to_f16(-1e6f), 0xfc00);
    CU_ASSERT_EQUAL(stage_f32_to_f16(INFINITY), 0x7c00);
    CU_ASSERT_EQUAL(stage_f32_to_f16(-INFINITY), 0xfc00);
    uint16_t n = stage_f32_to_f16(NAN);
    CU_ASSERT((n & 0x7c00) == 0x7c00 && (n & 0x03ff) != 0);
    n = stage_f32_to_f16(f_of(0x7f800001u)); /* NaN with a payload below f16's mantissa */
    CU_ASSERT((n & 0x7c00) == 0x7c00 && (n & 0x03ff) != 0);
    /* subnormals: 2^-24 is the smallest; 2^-25 is a tie between 0 and it -> 0 (even) */
    CU_ASSERT_EQUAL(stage_f32_to_f16(0x1p-24f), 0x0001);
    CU_ASSERT_EQUAL(stage_f32_to_f16(0x1p-25f), 0x0000);
    CU_ASSERT_EQUAL(stage_f32_to_f16(0x1p-25f * 1.0001f), 0x0001);
    CU_ASSERT_EQUAL(stage_f32_to_f16(3 * 0x1p-25f), 0x0002);       /* tie 1.5 units -> 2 */
    CU_ASSERT_EQUAL(stage_f32_to_f16(5 * 0x1p-25f), 0x0002);       /* tie 2.5 units -> 2 */
    CU_ASSERT_EQUAL(stage_f32_to_f16(1023 * 0x1p-24f), 0x03ff);    /* largest subnormal */
    CU_ASSERT_EQUAL(stage_f32_to_f16(1023.5f * 0x1p-24f), 0x0400); /* tie rounds into normal */
    CU_ASSERT_EQUAL(stage_f32_to_f16(0x1p-14f), 0x0400);           /* smallest normal */
    CU_ASSERT_EQUAL(stage_f32_to_f16(-0x1p-24f), 0x8001);
    CU_ASSERT_EQUAL(stage_f32_to_f16(1e-10f), 0x0000);
    CU_ASSERT_EQUAL(stage_f32_to_f16(FLT_MIN), 0x0000);
    /* f16 -> f32 */
    CU_ASSERT(stage_f16_to_f32(0x0001) == 0x1p-24f);
    CU_ASSERT(stage_f16_to_f32(0x03ff) == 1023 * 0x1p-24f);
    CU_ASSERT(stage_f16_to_f32(0x8001) == -0x1p-24f);
    CU_ASSERT(stage_f16_to_f32(0x0400) == 0x1p-14f);
    CU_ASSERT(stage_f16_to_f32(0x3555) == 0.333251953125f);
    CU_ASSERT(stage_f16_to_f32(0x7bff) == 65504.0f);
    CU_ASSERT(isinf(stage_f16_to_f32(0x7c00)) && stage_f16_to_f32(0x7c00) > 0);
    CU_ASSERT(isinf(stage_f16_to_f32(0xfc00)) && stage_f16_to_f32(0xfc00) < 0);
    CU_ASSERT(isnan(stage_f16_to_f32(0x7e00)));
    CU_ASSERT(isnan(stage_f16_to_f32(0x7c01)));
    CU_ASSERT(bits_of(stage_f16_to_f32(0x8000)) == 0x80000000u);
    /* every non-NaN f16 survives the round trip; and f16 -> f32 matches an independent
     * formula (-1)^s 2^(e-15) (1 + m/1024), subnormal 2^-14 m/1024 */
    int bad = 0, bad_val = 0;
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = stage_f16_to_f32((uint16_t)h);
        int e = (h >> 10) & 0x1f, m = h & 0x3ff;
        double sign = (h & 0x8000) ? -1.0 : 1.0;
        if (e == 31) continue;
        double want = e ? sign * ldexp(1.0 + m / 1024.0, e - 15) : sign * ldexp(m / 1024.0, -14);
        if ((double)f != want) bad_val++;
        if (stage_f32_to_f16(f) != h) bad++;
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(bad_val, 0);
    /* f32 -> f16 against a naive nearest-even search over all finite f16 values */
    g_lcg = 99;
    int bad_rt = 0;
    for (int i = 0; i < 2000; i++) {
        float f = (float)ldexp(rnd_unit(), (int)(lcg() % 40) - 28);
        uint16_t got = stage_f32_to_f16(f);
        /* the nearest among the two f16 values around f (by magnitude, then even) */
        uint16_t lo = 0, top = 0x7bff; /* positive f16 bit patterns are ordered by value */
        while (lo < top) {
            uint16_t mid = (uint16_t)((lo + top + 1) / 2);
            if (stage_f16_to_f32(mid) <= fabsf(f))
                lo = mid;
            else
                top = (uint16_t)(mid - 1);
        }
        uint16_t hi = (uint16_t)(lo + 1);
        double dl = fabs(fabsf(f) - stage_f16_to_f32(lo)),
               dh = fabs(stage_f16_to_f32(hi) - fabsf(f));
        uint16_t want = (dl < dh || (dl == dh && !(lo & 1))) ? lo : hi;
        if (f < 0) want |= 0x8000;
        if (got != want && !(f < 0 && want == 0x8000 && got == 0x8000)) bad_rt++;
    }
    CU_ASSERT_EQUAL(bad_rt, 0);
    float src[4] = {1.0f, 0x1p-25f, -65520.0f, 0.1f};
    uint16_t d[4];
    float back[4];
    stage_f32_to_f16_n(src, d, 4);
    stage_f16_to_f32_n(d, back, 4);
    for (int i = 0; i < 4; i++) {
        CU_ASSERT_EQUAL(d[i], stage_f32_to_f16(src[i]));
        CU_ASSERT(bits_of(back[i]) == bits_of(stage_f16_to_f32(d[i])));
    }
}

/* ---- 5. sampling ----------------------------------------------------------------------------- */

static void test_sample_greedy(void)
{
    stage_rng r;
    stage_rng_seed(&r, 1, 0);
    float scratch[16];
    float a[4] = {1, 3, 3, 2};
    CU_ASSERT_EQUAL(stage_sample(a, 4, 0.0f, 1.0f, &r, scratch), 1);
    float b[3] = {5, 5, 5};
    CU_ASSERT_EQUAL(stage_sample(b, 3, 0.0f, 0.9f, &r, scratch), 0);
    float c[4] = {-INFINITY, -1, 7, 7};
    CU_ASSERT_EQUAL(stage_sample(c, 4, -1.0f, 1.0f, &r, scratch), 2);
    float d[5] = {-3, -2, -1, -0.5f, -0.25f};
    CU_ASSERT_EQUAL(stage_sample(d, 5, 0.0f, 1.0f, &r, scratch), 4);
}

static const float SAMP_LOGITS[8] = {0.5f, 1.0f, -0.3f, 0.9f, 0.0f, 1.1f, -1.0f, 0.7f};

static void draw(uint64_t seed, uint64_t index, float temp, float top_p, int n, int *out)
{
    stage_rng r;
    float scratch[16];
    stage_rng_seed(&r, seed, index);
    for (int i = 0; i < n; i++) out[i] = stage_sample(SAMP_LOGITS, 8, temp, top_p, &r, scratch);
}

static void test_sample_reproducible(void)
{
    int a[64], b[64], c[64], d[64];
    draw(42, 0, 0.8f, 0.95f, 64, a);
    draw(42, 0, 0.8f, 0.95f, 64, b);
    draw(42, 1, 0.8f, 0.95f, 64, c);
    draw(43, 0, 0.8f, 0.95f, 64, d);
    CU_ASSERT(memcmp(a, b, sizeof a) == 0); /* same seed and index: same draws */
    CU_ASSERT(memcmp(a, c, sizeof a) != 0); /* another sequence: another stream */
    CU_ASSERT(memcmp(a, d, sizeof a) != 0); /* another seed: another stream */
    int distinct = 0, seen[8] = {0};
    for (int i = 0; i < 64; i++) seen[a[i]] = 1;
    for (int i = 0; i < 8; i++) distinct += seen[i];
    CU_ASSERT(distinct >= 4); /* it really samples */
    stage_rng r1, r2;
    stage_rng_seed(&r1, 7, 3);
    stage_rng_seed(&r2, 7, 3);
    for (int i = 0; i < 100; i++) {
        double u = stage_rng_uniform(&r1);
        CU_ASSERT(u >= 0.0 && u < 1.0);
        CU_ASSERT(u == stage_rng_uniform(&r2));
    }
    stage_rng_seed(&r1, 7, 3);
    stage_rng_seed(&r2, 7, 4);
    CU_ASSERT(stage_rng_uniform(&r1) != stage_rng_uniform(&r2));
    /* uniform: mean about 1/2 */
    double sum = 0.0;
    stage_rng_seed(&r1, 5, 0);
    for (int i = 0; i < 20000; i++) sum += stage_rng_uniform(&r1);
    ASSERT_NEAR(sum / 20000, 0.5, 0.01, "uniform mean");
}

static void test_sample_top_p(void)
{
    int a[200];
    draw(9, 2, 1.0f, 1e-6f, 200, a);
    int all_argmax = 1;
    for (int i = 0; i < 200; i++) all_argmax &= a[i] == 5;
    CU_ASSERT(all_argmax);
    /* probabilities [.5, .3, .15, .05]: top_p 0.7 keeps {0, 1} -> 0.625 / 0.375 */
    float lg[4] = {(float)log(0.5), (float)log(0.3), (float)log(0.15), (float)log(0.05)};
    stage_rng r;
    float scratch[16];
    stage_rng_seed(&r, 11, 0);
    int cnt[4] = {0};
    const int N = 20000;
    for (int i = 0; i < N; i++) cnt[stage_sample(lg, 4, 1.0f, 0.7f, &r, scratch)]++;
    CU_ASSERT_EQUAL(cnt[2] + cnt[3], 0);
    ASSERT_NEAR((double)cnt[0] / N, 0.625, 0.015, "top-p freq 0");
    ASSERT_NEAR((double)cnt[1] / N, 0.375, 0.015, "top-p freq 1");
}

static void test_sample_frequencies(void)
{
    const int N = 40000;
    for (int ti = 0; ti < 2; ti++) {
        float temp = ti ? 2.0f : 1.0f;
        stage_rng r;
        float scratch[16];
        stage_rng_seed(&r, 1234, (uint64_t)ti);
        int cnt[8] = {0};
        for (int i = 0; i < N; i++) cnt[stage_sample(SAMP_LOGITS, 8, temp, 1.0f, &r, scratch)]++;
        double z = 0.0, p[8];
        for (int i = 0; i < 8; i++) z += (p[i] = exp(SAMP_LOGITS[i] / temp));
        for (int i = 0; i < 8; i++) {
            char what[64];
            snprintf(what, sizeof what, "T=%g freq of %d", temp, i);
            ASSERT_NEAR((double)cnt[i] / N, p[i] / z, 0.012, what);
        }
    }
}

static void test_nll(void)
{
    /* log(e + e^2 + e^3) = 3 + log(1 + e^-1 + e^-2) = 3.4076059644443806 */
    float a[3] = {1, 2, 3};
    ASSERT_NEAR(stage_nll(a, 3, 0), 2.4076059644443806, 1e-9, "nll target 0");
    ASSERT_NEAR(stage_nll(a, 3, 2), 0.4076059644443806, 1e-9, "nll target 2");
    float u[4] = {0.3f, 0.3f, 0.3f, 0.3f};
    ASSERT_NEAR(stage_nll(u, 4, 1), log(4.0), 1e-12, "nll uniform");
    float big[2] = {1000.0f, 1000.0f}; /* no overflow */
    ASSERT_NEAR(stage_nll(big, 2, 0), log(2.0), 1e-12, "nll large");
    float mi[3] = {-INFINITY, 0, 0};
    ASSERT_NEAR(stage_nll(mi, 3, 1), log(2.0), 1e-12, "nll -inf");
}

/* ---- 6. errors ------------------------------------------------------------------------------- */

static void expect_missing(stage_kind kind, const char *routing, const char *omit)
{
    tiny t;
    tiny_model tm;
    char err[ERRLEN] = "";
    tiny_init(&t, kind, 101);
    if (routing) {
        t.routing = routing;
        t.has_pred = !strcmp(routing, "predictor");
    }
    int rc = tiny_load(&t, &tm, omit, err, sizeof err);
    CU_ASSERT_NOT_EQUAL(rc, 0);
    CU_ASSERT(tm.m == NULL);
    ASSERT_HAS(err, omit);
    if (verbose()) fprintf(stderr, "\n    | %s", err);
    tiny_unload(&tm);
}

static void test_err_missing_tensor(void)
{
    expect_missing(STAGE_KIND_DENSE, NULL, "model.layers.0.mlp.up_proj.weight");
    expect_missing(STAGE_KIND_DENSE, NULL, "model.layers.0.self_attn.k_proj.weight");
    expect_missing(STAGE_KIND_DENSE, NULL, "lm_head.weight");
    expect_missing(STAGE_KIND_MOD, NULL, "model.layers.0.router.weight");
    expect_missing(STAGE_KIND_MOD, "predictor", "model.layers.0.router_predictor.fc2.weight");
    expect_missing(STAGE_KIND_MODE_STAGED, NULL,
                   "model.layers.0.block_sparse_moe.experts.2.w3.weight");
    expect_missing(STAGE_KIND_MINDSKIP, NULL, "model.layers.0.router.weight");
}

/* A tensor the engine would not read (a Qwen2 q/k/v bias, Qwen3's q/k norms, a layer past
 * num_hidden_layers, anything unknown) is refused by name: ignoring it changes the math. */
static void test_err_unknown_tensor(void)
{
    static const char *const extras[] = {
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.k_norm.weight",
        "model.layers.0.mlp.down_proj.bias",
        "model.layers.7.input_layernorm.weight",
        "model.rotary.weight",
        "model.layers.0.block_sparse_moe.experts.x.w1.weight",
    };
    for (size_t i = 0; i < sizeof extras / sizeof *extras; i++) {
        tiny t;
        tiny_model tm;
        char err[ERRLEN] = "";
        tiny_init(&t, STAGE_KIND_DENSE, 104);
        t.extra = extras[i];
        CU_ASSERT_NOT_EQUAL(tiny_load(&t, &tm, NULL, err, sizeof err), 0);
        CU_ASSERT(tm.m == NULL);
        ASSERT_HAS(err, extras[i]);
        if (verbose()) fprintf(stderr, "\n    | %s", err);
        tiny_unload(&tm);
    }
    /* the old Llama checkpoints' rotary buffer is accepted (it is rope_theta's inv_freq) */
    tiny t;
    tiny_model tm;
    char err[ERRLEN] = "";
    tiny_init(&t, STAGE_KIND_DENSE, 104);
    t.extra = "model.layers.0.self_attn.rotary_emb.inv_freq";
    CU_ASSERT_EQUAL(tiny_load(&t, &tm, NULL, err, sizeof err), 0);
    tiny_unload(&tm);
}

static void test_err_embed_range(void)
{
    tiny t;
    tiny_model tm;
    tiny_init(&t, STAGE_KIND_DENSE, 102);
    if (load_or_fail(&t, &tm)) return;
    char err[ERRLEN] = "";
    float x[2 * TD];
    int32_t bad[2] = {0, 5}; /* vocab 5 */
    CU_ASSERT_NOT_EQUAL(stage_embed(tm.m, bad, 2, x, err, sizeof err), 0);
    ASSERT_HAS(err, "5");
    int32_t neg[1] = {-3};
    err[0] = 0;
    CU_ASSERT_NOT_EQUAL(stage_embed(tm.m, neg, 1, x, err, sizeof err), 0);
    ASSERT_HAS(err, "-3");
    int32_t ok[1] = {4};
    CU_ASSERT_EQUAL(stage_embed(tm.m, ok, 1, x, err, sizeof err), 0);
    tiny_unload(&tm);
}

static void test_err_slot_range(void)
{
    tiny t;
    tiny_model tm;
    tiny_init(&t, STAGE_KIND_DENSE, 103);
    if (load_or_fail(&t, &tm)) return;
    stage_state *st = state_new(tm.m, 2, 4, 8);
    CU_ASSERT_FATAL(st != NULL);
    char err[ERRLEN] = "";
    float x[2 * TD], x0[2 * TD];
    g_lcg = 3;
    for (int i = 0; i < 2 * TD; i++) x0[i] = x[i] = rnd_unit();
    int32_t slot[2] = {0, 2}, pos[2] = {0, 0};
    uint8_t fl[2] = {STAGE_ROW_PROMPT, STAGE_ROW_PROMPT};
    CU_ASSERT_NOT_EQUAL(fwd_rows(st, 2, slot, pos, fl, x, err, sizeof err), 0);
    ASSERT_HAS(err, "slot 2");
    CU_ASSERT(memcmp(x, x0, sizeof x) == 0); /* nothing computed */
    int32_t slot2[1] = {-1};
    err[0] = 0;
    CU_ASSERT_NOT_EQUAL(fwd_rows(st, 1, slot2, pos, fl, x, err, sizeof err), 0);
    CU_ASSERT(err[0] != 0);
    /* position past the state's max_seq */
    int32_t slot3[1] = {1}, pos3[1] = {8};
    uint8_t fl3[1] = {STAGE_ROW_NEED_LOGITS};
    err[0] = 0;
    CU_ASSERT_NOT_EQUAL(fwd_rows(st, 1, slot3, pos3, fl3, x, err, sizeof err), 0);
    CU_ASSERT(err[0] != 0);
    /* more rows than the workspace */
    int32_t s5[5] = {0, 0, 0, 0, 0}, p5[5] = {0, 1, 2, 3, 4};
    uint8_t f5[5] = {2, 2, 2, 2, 2};
    float x5[5 * TD] = {0};
    err[0] = 0;
    CU_ASSERT_NOT_EQUAL(fwd_rows(st, 5, s5, p5, f5, x5, err, sizeof err), 0);
    CU_ASSERT(err[0] != 0);
    stage_state_free(st);
    tiny_unload(&tm);
}

/* ---- main ------------------------------------------------------------------------------------ */

int main(void)
{
    static const test_def kernels[] = {
        T_(test_matmul),       T_(test_rmsnorm),     T_(test_rope), T_(test_softmax_swiglu_dot),
        T_(test_convert_bf16), T_(test_convert_f16),
    };
    static const test_def sampling[] = {
        T_(test_sample_greedy), T_(test_sample_reproducible),
        T_(test_sample_top_p),  T_(test_sample_frequencies),
        T_(test_nll),
    };
    static const test_def errors[] = {
        T_(test_err_missing_tensor),
        T_(test_err_unknown_tensor),
        T_(test_err_embed_range),
        T_(test_err_slot_range),
    };
    static const suite_def all[] = {
        {"kernels", kernels, N_(kernels)},
        {"sampling", sampling, N_(sampling)},
        {"errors", errors, N_(errors)},
        {NULL, NULL, 0},
    };
    return run_suites(all);
}
