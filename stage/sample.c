/* stage/sample.c — per-sequence generators, greedy / temperature / top-p sampling, NLL. */
#include <math.h>
#include <stdlib.h>

#include "stage/stage.h"

/* ---- xoshiro256** seeded by splitmix64 ------------------------------------------------------- */
static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void stage_rng_seed(stage_rng *r, uint64_t seed, uint64_t index)
{
    /* Mix seed and sequence index so neighbouring sequences get unrelated streams. */
    uint64_t x = seed ^ (index * 0xD1B54A32D192ED03ull + 0x8CB92BA72F3D8DD7ull);
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

void stage_rng_seed_draw(stage_rng *r, uint64_t seed, uint64_t seq, uint64_t step)
{
    /* splitmix64 of step, xor-ed into the (seed, seq) stream key: distinct steps give
     * unrelated generators, and step 0 of (seed, seq) differs from stage_rng_seed's. */
    uint64_t x = step ^ 0x6A09E667F3BCC909ull;
    uint64_t h = splitmix64(&x);
    stage_rng_seed(r, seed ^ h, seq);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

double stage_rng_uniform(stage_rng *r)
{
    uint64_t *s = r->s;
    uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return (double)(out >> 11) * 0x1.0p-53;
}

/* ---- sampling -------------------------------------------------------------------------------- */
typedef struct {
    float p;
    int id;
} cand;

static int cand_cmp(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id); /* ties: lower id first, deterministic */
}

int stage_sample(const float *logits, int vocab, float temperature, float top_p, stage_rng *r,
                 void *scratch)
{
    int best = 0;
    for (int i = 1; i < vocab; i++)
        if (logits[i] > logits[best]) best = i; /* strict: lowest id among equal maxima */
    if (!(temperature > 0.0f)) return best;

    cand *c = scratch; /* [vocab] */
    double sum = 0.0, mx = logits[best];
    for (int i = 0; i < vocab; i++) {
        double e = exp(((double)logits[i] - mx) / temperature);
        c[i].p = (float)e;
        c[i].id = i;
        sum += e;
    }
    int n = vocab;
    double total = sum;
    if (top_p > 0.0f && top_p < 1.0f) {
        qsort(c, (size_t)vocab, sizeof *c, cand_cmp);
        double cum = 0.0;
        for (n = 0; n < vocab; n++) {
            cum += c[n].p;
            if (cum >= top_p * sum) {
                n++;
                break;
            }
        }
        if (n > vocab) n = vocab;
        total = 0.0;
        for (int i = 0; i < n; i++) total += c[i].p;
    }
    double u = stage_rng_uniform(r) * total, acc = 0.0;
    for (int i = 0; i < n; i++) {
        acc += c[i].p;
        if (u < acc) return c[i].id;
    }
    return c[n - 1].id;
}

double stage_nll(const float *logits, int vocab, int target)
{
    double mx = logits[0];
    for (int i = 1; i < vocab; i++)
        if (logits[i] > mx) mx = logits[i];
    double sum = 0.0;
    for (int i = 0; i < vocab; i++) sum += exp((double)logits[i] - mx);
    return -(((double)logits[target] - mx) - log(sum));
}
