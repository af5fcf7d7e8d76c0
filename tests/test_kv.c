/* tests/test_kv.c — the paged KV cache (stage/kv.h, docs/SPEC.md §11).
 *
 *   1. the pool: pages taken only when an entry starts one, lowest id first, given back on
 *      clear and by kv_drop_before, KV_FULL / KV_EXHAUSTED leave the sequence unchanged;
 *   2. stage_attend_paged over scattered pages is bit-identical to stage_attend_gqa on the
 *      same entries laid out contiguously;
 *   3. every fixture model through the stage API (three sequences, prompts in one
 *      micro-batch, then interleaved decode steps, a slot reused for a fourth sequence):
 *      the logits of a paged cache (pages of 1, 3, 16 positions; a budget that just fits)
 *      are bit-identical to one page per (layer, slot), which is the contiguous cache of
 *      before; every page is back once every slot is released;
 *   4. a routed layer takes pages only for the rows it keeps; the pool's stats; a budget
 *      too small is a clear error (at init and when pages run out); a dropped prefix frees
 *      its pages.
 * Run from the repository root (tests/fixtures, override: MODPIPE_FIXTURES).
 */
#include "stage/kv.h"
#include "stage/matmul.h"
#include "stage/stage.h"

#include <CUnit/Basic.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/testutil.h"

#define ERRLEN 512

typedef struct {
    const char *name;
    CU_TestFunc fn;
} test_def;

/* uniform in [-1, 1) from a 64-bit LCG (fixed: the test data are the same every run) */
static double rand_sym(uint64_t *r)
{
    *r = *r * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(*r >> 11) / 4503599627370496.0 - 1.0;
}

static const char *fixtures(void)
{
    const char *e = getenv("MODPIPE_FIXTURES");
    return e && *e ? e : "tests/fixtures";
}

/* ---- 1. the pool ----------------------------------------------------------------------------- */

static void test_pool_pages(void)
{
    kv_pool p;
    CU_ASSERT_FATAL(kv_pool_init(&p, 4, 3, 2) == 0);
    int32_t pt_a[3], pt_b[3];
    kv_seq a = {0, 0, pt_a}, b = {0, 0, pt_b};
    float k[2] = {1, 2}, v[2] = {3, 4};
    for (int i = 0; i < 5; i++) CU_ASSERT_EQUAL(kv_append(&p, &a, 3, 10 + i, k, v), i);
    CU_ASSERT_EQUAL(kv_pool_used(&p), 2); /* 5 entries of 4 per page */
    CU_ASSERT_EQUAL(pt_a[0], 0);          /* lowest id first */
    CU_ASSERT_EQUAL(pt_a[1], 1);
    CU_ASSERT_EQUAL(kv_seq_pages(&a, 4), 2);
    CU_ASSERT_EQUAL(kv_pos_at(&p, &a, 4), 14);
    CU_ASSERT_EQUAL(p.k[(size_t)1 * 4 * 2 + 0], 1.0f); /* entry 4: page 1, offset 0 */
    CU_ASSERT_EQUAL(kv_append(&p, &b, 3, 0, k, v), 0);
    CU_ASSERT_EQUAL(pt_b[0], 2);
    CU_ASSERT_EQUAL(kv_pool_used(&p), 3);
    /* a's entries 5..7 fit its second page; entry 8 needs a page the pool no longer has */
    for (int i = 5; i < 8; i++) CU_ASSERT_EQUAL(kv_append(&p, &a, 3, 10 + i, k, v), i);
    CU_ASSERT_EQUAL(kv_append(&p, &a, 3, 18, k, v), KV_EXHAUSTED);
    CU_ASSERT_EQUAL(a.n, 8);
    /* drop: page 0 holds positions 10..13; nothing before 13 frees it, 14 does */
    CU_ASSERT_EQUAL(kv_drop_before(&p, &a, 13), 0);
    CU_ASSERT_EQUAL(kv_drop_before(&p, &a, 14), 1);
    CU_ASSERT_EQUAL(a.lo, 4);
    CU_ASSERT_EQUAL(kv_seq_pages(&a, 4), 1);
    CU_ASSERT_EQUAL(kv_pool_used(&p), 2);
    CU_ASSERT_EQUAL(kv_pos_at(&p, &a, 4), 14); /* still readable */
    CU_ASSERT_EQUAL(kv_append(&p, &a, 3, 18, k, v), 8);
    CU_ASSERT_EQUAL(pt_a[2], 0); /* the freed page is reused */
    /* a full page table: 3 pages x 4 entries */
    for (int i = 9; i < 12; i++) CU_ASSERT_EQUAL(kv_append(&p, &a, 3, 10 + i, k, v), i);
    CU_ASSERT_EQUAL(kv_append(&p, &a, 3, 30, k, v), KV_FULL);
    /* the last page is never dropped while the next entry would go to it */
    kv_seq_clear(&p, &b);
    CU_ASSERT_EQUAL(kv_drop_before(&p, &b, 100), 0);
    kv_seq_clear(&p, &a);
    CU_ASSERT_EQUAL(kv_pool_used(&p), 0);
    CU_ASSERT_EQUAL(p.n_free_min, 0);
    CU_ASSERT_EQUAL(a.n, 0);
    CU_ASSERT_EQUAL(a.lo, 0);
    kv_pool_free(&p);
    /* a pool of no pages (a stage without layers) */
    CU_ASSERT_FATAL(kv_pool_init(&p, 16, 0, 8) == 0);
    CU_ASSERT_EQUAL(kv_append(&p, &a, 1, 0, k, v), KV_EXHAUSTED);
    kv_pool_free(&p);
}

/* Sharing the first entries of a sequence (prefix reuse): full pages by reference, the
 * partial last page copied; a page goes back when its last holder lets go. */
static const float *entry_k(const kv_pool *p, const kv_seq *c, int e)
{
    return p->k + ((size_t)c->pt[e / p->page] * p->page + e % p->page) * p->kvd;
}

static void test_pool_share(void)
{
    kv_pool p;
    CU_ASSERT_FATAL(kv_pool_init(&p, 4, 6, 2) == 0);
    int32_t pt_a[4], pt_b[4], pt_c[4];
    kv_seq a = {0, 0, pt_a}, b = {0, 0, pt_b}, c = {0, 0, pt_c};
    for (int i = 0; i < 10; i++) {
        float k[2] = {(float)i, -(float)i}, v[2] = {2.0f * i, 1};
        CU_ASSERT_EQUAL(kv_append(&p, &a, 4, 3 * i, k, v), i); /* positions 0, 3, .. 27 */
    }
    CU_ASSERT_EQUAL(kv_pool_used(&p), 3);
    CU_ASSERT_EQUAL(kv_entries_before(&p, &a, 18), 6);
    CU_ASSERT_EQUAL(kv_entries_before(&p, &a, 17), 6);
    CU_ASSERT_EQUAL(kv_entries_before(&p, &a, 0), 0);
    CU_ASSERT_EQUAL(kv_entries_before(&p, &a, 1000), 10);
    /* b: a's first 6 entries = page 0 shared + entries 4, 5 copied into a page of its own */
    CU_ASSERT_EQUAL(kv_share(&p, &a, 6, &b), 0);
    CU_ASSERT_EQUAL(b.n, 6);
    CU_ASSERT_EQUAL(pt_b[0], pt_a[0]);
    CU_ASSERT(pt_b[1] != pt_a[1]);
    CU_ASSERT_EQUAL(kv_pool_used(&p), 4);
    for (int e = 0; e < 6; e++) {
        CU_ASSERT_EQUAL(kv_pos_at(&p, &b, e), 3 * e);
        CU_ASSERT_EQUAL(memcmp(entry_k(&p, &b, e), entry_k(&p, &a, e), 2 * sizeof(float)), 0);
    }
    /* b appends after its copy; a's entries 6, 7 (the same page offsets in a's page) stay */
    float k9[2] = {99, 99};
    CU_ASSERT_EQUAL(kv_append(&p, &b, 4, 100, k9, k9), 6);
    CU_ASSERT_EQUAL(kv_pos_at(&p, &a, 6), 18);
    CU_ASSERT_EQUAL(entry_k(&p, &a, 6)[0], 6.0f);
    /* a page-aligned share copies nothing */
    CU_ASSERT_EQUAL(kv_share(&p, &a, 8, &c), 0);
    CU_ASSERT_EQUAL(kv_pool_used(&p), 4);
    /* a lets go: pages 0 and 1 are still held (by b, c), a's last page goes back */
    kv_seq_clear(&p, &a);
    CU_ASSERT_EQUAL(kv_pool_used(&p), 3);
    CU_ASSERT_EQUAL(kv_pos_at(&p, &c, 7), 21);
    kv_seq_clear(&p, &c);
    CU_ASSERT_EQUAL(kv_pool_used(&p), 2);
    /* a copy the pool has no page for: KV_EXHAUSTED, nothing shared */
    for (int i = 0; i < 16; i++) kv_append(&p, &a, 4, i, k9, k9); /* 4 more pages: full */
    CU_ASSERT_EQUAL(kv_pool_used(&p), 6);
    CU_ASSERT_EQUAL(kv_share(&p, &a, 5, &c), KV_EXHAUSTED);
    CU_ASSERT_EQUAL(c.n, 0);
    kv_seq_clear(&p, &a);
    kv_seq_clear(&p, &b);
    CU_ASSERT_EQUAL(kv_pool_used(&p), 0);
    for (int i = 0; i < 6; i++) CU_ASSERT_EQUAL(p.ref[i], 0);
    kv_pool_free(&p);
}

/* ---- 2. the kernel over pages ---------------------------------------------------------------- */

static void test_attend_paged(void)
{
    enum { HD = 20, NQ = 3, NC = 23, PG = 5, NPG = 8 };
    const size_t stride = 2 * HD; /* two KV heads per entry: read head 1 */
    float *cont_k = malloc((size_t)NC * stride * sizeof(float));
    float *cont_v = malloc((size_t)NC * stride * sizeof(float));
    float *pool_k = calloc((size_t)NPG * PG * stride, sizeof(float));
    float *pool_v = calloc((size_t)NPG * PG * stride, sizeof(float));
    float q[NQ * HD], pr[NQ * NC], o1[NQ * HD], o2[NQ * HD];
    const int32_t pages[5] = {6, 1, 7, 0, 3}; /* scattered, out of order */
    uint64_t r = 12345;
    for (int i = 0; i < NQ * HD; i++) q[i] = (float)rand_sym(&r);
    for (int t = 0; t < NC; t++)
        for (size_t i = 0; i < stride; i++) {
            float kk = (float)rand_sym(&r), vv = (float)rand_sym(&r);
            cont_k[t * stride + i] = kk;
            cont_v[t * stride + i] = vv;
            size_t at = ((size_t)pages[t / PG] * PG + t % PG) * stride + i;
            pool_k[at] = kk;
            pool_v[at] = vv;
        }
    const stage_isa was = stage_matmul_isa();
    for (int isa = STAGE_ISA_C; isa <= STAGE_ISA_AVX512BF16; isa++)
        for (int t0 = 0; t0 < 12 && stage_isa_supported((stage_isa)isa); t0 += 11) {
            /* every variant, from the start and from inside page 2 */
            stage_matmul_force_isa((stage_isa)isa);
            stage_attend_gqa(q, NQ, cont_k + t0 * stride + HD, cont_v + t0 * stride + HD, stride,
                             NC - t0, HD, 0.3f, pr, o1);
            stage_kv_view kv = {pool_k + HD, pool_v + HD,         pages, PG,
                                t0,          (size_t)PG * stride, stride};
            stage_attend_paged(q, NQ, &kv, NC - t0, HD, 0.3f, pr, o2);
            CU_ASSERT(memcmp(o1, o2, sizeof o1) == 0);
        }
    stage_matmul_force_isa(was);
    free(cont_k);
    free(cont_v);
    free(pool_k);
    free(pool_v);
}

/* ---- 3. fixtures: paged vs one page per (layer, slot) ---------------------------------------- */

typedef tu_model fxm;

static int fx_open(const char *name, fxm *f)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/%s", fixtures(), name);
    return tu_model_open(dir, f);
}

#define fx_close tu_model_close

enum { NSEQ = 4, NSLOT = 3, NNEW = 6, CTX = 24, MAXROWS = 24 };
static const int32_t PROMPTS[NSEQ][7] = {
    {3, 14, 15, 92, 65, 35, 89}, {79, 32}, {38, 46, 26, 43, 38}, {27, 95}};
static const int PLEN[NSEQ] = {7, 2, 5, 2};

/* One forward of n rows (every row present), logits of the NEED_LOGITS rows appended to
 * *out. Returns 0, or -1 with err. */
static int fwd(stage_state *st, const stage_model *m, int n, const int32_t *slot,
               const int32_t *pos, const int32_t *tok, const uint8_t *flags, float **out, char *err,
               size_t errlen)
{
    const stage_config *c = stage_model_config(m);
    float x[MAXROWS * 128];
    uint8_t present[MAXROWS];
    int rows[MAXROWS], nl = 0;
    if (c->hidden > 128) {
        snprintf(err, errlen, "fixture hidden size %d > 128", c->hidden);
        return -1;
    }
    memset(present, 1, sizeof present);
    for (int i = 0; i < n; i++)
        if (flags[i] & STAGE_ROW_NEED_LOGITS) rows[nl++] = i;
    /* a read-only view of the caller's rows (the stage does not write them) */
    stage_batch b = {.n = n,
                     .slot = (int32_t *)slot,
                     .pos = (int32_t *)pos,
                     .token = (int32_t *)tok,
                     .flags = (uint8_t *)flags};
    if (stage_embed(m, tok, n, x, err, errlen) || stage_forward(st, &b, x, present, err, errlen) ||
        stage_head_logits(st, x, rows, nl, *out, err, errlen))
        return -1;
    *out += (size_t)nl * c->vocab;
    return 0;
}

static int argmax(const float *l, int V)
{
    int b = 0;
    for (int i = 1; i < V; i++)
        if (l[i] > l[b]) b = i;
    return b;
}

/* Sequences 0..2 in slots 0..2: prompts in one micro-batch, then decode steps of every live
 * sequence (top-k models: prompts only); sequence 1 is released after its prompt and
 * sequence 3 starts in its slot. logits: room for NSEQ * NNEW rows. Returns the logits rows
 * written, or -1 with err. Every slot is released at the end. */
static int drive(stage_state *st, const stage_model *m, float *logits, char *err, size_t errlen)
{
    const stage_config *c = stage_model_config(m);
    const int V = c->vocab, decode = c->mod_routing != STAGE_ROUTING_TOPK;
    int32_t sl[MAXROWS], ps[MAXROWS], tk[MAXROWS], last[NSEQ], len[NSEQ];
    uint8_t fl[MAXROWS];
    float *out = logits;
    int n = 0;
    for (int s = 0; s < 3; s++)
        for (int i = 0; i < PLEN[s]; i++, n++) {
            sl[n] = s;
            ps[n] = i;
            tk[n] = PROMPTS[s][i];
            fl[n] = STAGE_ROW_PROMPT | (i == PLEN[s] - 1 ? STAGE_ROW_NEED_LOGITS : 0);
        }
    if (fwd(st, m, n, sl, ps, tk, fl, &out, err, errlen)) return -1;
    for (int s = 0; s < 3; s++) {
        last[s] = argmax(logits + (size_t)s * V, V);
        len[s] = PLEN[s];
    }
    stage_state_slot_release(st, 1);
    /* sequence 3 takes slot 1: its prompt and sequence 0's and 2's decode rows together */
    n = 0;
    for (int i = 0; i < PLEN[3]; i++, n++) {
        sl[n] = 1;
        ps[n] = i;
        tk[n] = PROMPTS[3][i];
        fl[n] = STAGE_ROW_PROMPT | (i == PLEN[3] - 1 ? STAGE_ROW_NEED_LOGITS : 0);
    }
    len[1] = PLEN[3];
    if (!decode) {
        if (fwd(st, m, n, sl, ps, tk, fl, &out, err, errlen)) return -1;
        for (int s = 0; s < NSLOT; s++) stage_state_slot_release(st, s);
        return (int)((out - logits) / V);
    }
    for (int step = 0; step < NNEW; step++) {
        for (int s = 0; s < NSLOT; s++) {
            if (s == 1 && step == 0) continue; /* slot 1 is prefilling above */
            sl[n] = s;
            ps[n] = len[s];
            tk[n] = last[s];
            fl[n] = STAGE_ROW_NEED_LOGITS;
            n++;
        }
        float *first = out;
        if (fwd(st, m, n, sl, ps, tk, fl, &out, err, errlen)) return -1;
        for (int i = 0, j = 0; i < n; i++) {
            if (!(fl[i] & STAGE_ROW_NEED_LOGITS)) continue;
            last[sl[i]] = argmax(first + (size_t)j++ * V, V);
            if (!(fl[i] & STAGE_ROW_PROMPT)) len[sl[i]]++;
        }
        n = 0;
    }
    for (int s = 0; s < NSLOT; s++) stage_state_slot_release(st, s);
    return (int)((out - logits) / V);
}

static stage_state *state_kv(const stage_model *m, int page, size_t mem, char *err, size_t el)
{
    stage_kv_opts o = {.page = page, .mem_bytes = mem};
    return stage_state_init_kv(m, NSLOT, MAXROWS, CTX, &o, err, el);
}

static void check_paged(const char *name)
{
    fxm f;
    char err[ERRLEN] = "";
    if (fx_open(name, &f)) {
        CU_FAIL("fixture");
        return;
    }
    const int V = f.cfg.vocab;
    const size_t cap = (size_t)NSEQ * (NNEW + 1) * V;
    float *ref = malloc(cap * sizeof(float)), *got = malloc(cap * sizeof(float));
    /* one page per (layer, slot): the contiguous layout of an unpaged cache */
    stage_state *st = state_kv(f.m, CTX, 0, err, sizeof err);
    int nref = st ? drive(st, f.m, ref, err, sizeof err) : -1;
    if (nref < 0) fprintf(stderr, "\n  %s contiguous: %s\n", name, err);
    CU_ASSERT_FATAL(nref > 0);
    stage_kv_stats ks;
    stage_state_kv_stats(st, &ks);
    CU_ASSERT_EQUAL(ks.pages_used, 0);
    stage_state_free(st);
    const int pages[] = {1, 3, 16};
    for (int pi = 0; pi < 3; pi++) {
        st = state_kv(f.m, pages[pi], 0, err, sizeof err);
        int n = st ? drive(st, f.m, got, err, sizeof err) : -1;
        if (n < 0) fprintf(stderr, "\n  %s page %d: %s\n", name, pages[pi], err);
        CU_ASSERT_EQUAL(n, nref);
        int same = n == nref && !memcmp(got, ref, (size_t)n * V * sizeof(float));
        if (!same) fprintf(stderr, "\n  %s page %d: logits differ\n", name, pages[pi]);
        CU_ASSERT(same);
        stage_state_kv_stats(st, &ks);
        CU_ASSERT_EQUAL(ks.pages_used, 0); /* every page back */
        CU_ASSERT(ks.pages_peak > 0);
        CU_ASSERT(ks.pages_peak <= ks.pages_total);
        int peak = ks.pages_peak;
        stage_state_free(st);
        /* a budget of exactly the peak is enough, and gives the same bits */
        st = state_kv(f.m, pages[pi], (size_t)peak * ks.page_bytes, err, sizeof err);
        n = st ? drive(st, f.m, got, err, sizeof err) : -1;
        if (n < 0) fprintf(stderr, "\n  %s page %d, %d pages: %s\n", name, pages[pi], peak, err);
        CU_ASSERT(n == nref && !memcmp(got, ref, (size_t)nref * V * sizeof(float)));
        stage_state_free(st);
        /* one page less runs out, with a message naming the pool */
        if (peak > 1) {
            st = state_kv(f.m, pages[pi], (size_t)(peak - 1) * ks.page_bytes, err, sizeof err);
            CU_ASSERT_FATAL(st != NULL);
            err[0] = 0;
            CU_ASSERT_EQUAL(drive(st, f.m, got, err, sizeof err), -1);
            CU_ASSERT(strstr(err, "KV pool exhausted") != NULL);
            stage_state_free(st);
        }
    }
    free(ref);
    free(got);
    fx_close(&f);
}

#define PAGED_TEST(n)                                                                              \
    static void test_paged_##n(void) { check_paged(#n); }
PAGED_TEST(dense)
PAGED_TEST(mod)
PAGED_TEST(mod_all)
PAGED_TEST(mod_predictor)
PAGED_TEST(mod_topk)
PAGED_TEST(mode_staged)
PAGED_TEST(mode_integrated)
PAGED_TEST(mindskip)
PAGED_TEST(mindskip_token)
PAGED_TEST(mixed)

/* ---- 4. pages follow the router; stats; refusals; dropping a prefix -------------------------- */

/* One prompt of 16 rows in slot 0 with pages of one position: each layer holds one page per
 * row it keeps. */
static void test_pages_follow_router(void)
{
    fxm d, m;
    char err[ERRLEN] = "";
    CU_ASSERT_FATAL(fx_open("dense", &d) == 0);
    CU_ASSERT_FATAL(fx_open("mod_all", &m) == 0);
    int32_t sl[16], ps[16], tk[16];
    uint8_t fl[16];
    for (int i = 0; i < 16; i++) {
        sl[i] = 0;
        ps[i] = i;
        tk[i] = (7 * i + 3) % d.cfg.vocab;
        fl[i] = STAGE_ROW_PROMPT | (i == 15 ? STAGE_ROW_NEED_LOGITS : 0);
    }
    float *lg = malloc((size_t)(d.cfg.vocab > m.cfg.vocab ? d.cfg.vocab : m.cfg.vocab) * 4);
    stage_state *sd = state_kv(d.m, 1, 0, err, sizeof err);
    stage_state *sm = state_kv(m.m, 1, 0, err, sizeof err);
    CU_ASSERT_FATAL(sd && sm);
    float *o = lg;
    CU_ASSERT_EQUAL_FATAL(fwd(sd, d.m, 16, sl, ps, tk, fl, &o, err, sizeof err), 0);
    o = lg;
    CU_ASSERT_EQUAL_FATAL(fwd(sm, m.m, 16, sl, ps, tk, fl, &o, err, sizeof err), 0);
    stage_kv_stats kd, km;
    stage_state_kv_stats(sd, &kd);
    stage_state_kv_stats(sm, &km);
    CU_ASSERT_EQUAL(kd.pages_used, 16 * d.cfg.n_layers);
    CU_ASSERT_EQUAL(kd.pages_full, 16 * d.cfg.n_layers);
    CU_ASSERT_EQUAL(kd.bytes_used, kd.bytes_dense);
    int64_t kept = 0;
    for (int l = 0; l < m.cfg.n_layers; l++) {
        const stage_layer_stats *ls = stage_state_layer_stats(sm, l);
        CU_ASSERT_EQUAL(stage_state_kv_layer_pages(sm, l), (int64_t)ls->kv_entries);
        kept += (int64_t)ls->kv_entries;
    }
    CU_ASSERT_EQUAL(km.pages_used, kept);
    CU_ASSERT_EQUAL(km.pages_routed, kept);
    CU_ASSERT(km.pages_used < kd.pages_used); /* the routers keep fewer rows */
    CU_ASSERT_EQUAL(km.bytes_dense, kd.bytes_dense);
    CU_ASSERT(km.bytes_used < km.bytes_dense);
    CU_ASSERT_EQUAL(stage_state_kv_layer_pages(sm, m.cfg.n_layers), -1);
    /* the slot's first 10 positions are not needed on layer 0 any more: 10 pages back */
    CU_ASSERT_EQUAL(stage_state_slot_drop_before(sd, 0, 0, 10), 10);
    CU_ASSERT_EQUAL(stage_state_kv_layer_pages(sd, 0), 6);
    CU_ASSERT_EQUAL(stage_state_slot_drop_before(sd, 0, 0, 10), 0);
    CU_ASSERT_EQUAL(stage_state_slot_drop_before(sd, 99, 0, 10), 0);
    /* a decode row still runs (attending from position 10 on layer 0) */
    int32_t s1 = 0, p1 = 16, t1 = 5;
    uint8_t f1 = STAGE_ROW_NEED_LOGITS;
    o = lg;
    CU_ASSERT_EQUAL(fwd(sd, d.m, 1, &s1, &p1, &t1, &f1, &o, err, sizeof err), 0);
    stage_state_slot_release(sd, 0);
    stage_state_slot_release(sm, 0);
    stage_state_kv_stats(sd, &kd);
    stage_state_kv_stats(sm, &km);
    CU_ASSERT_EQUAL(kd.pages_used, 0);
    CU_ASSERT_EQUAL(km.pages_used, 0);
    CU_ASSERT_EQUAL(kd.bytes_dense, 0);
    stage_state_free(sd);
    stage_state_free(sm);
    /* a budget below one page is refused at init */
    stage_state *bad = state_kv(d.m, 16, 100, err, sizeof err);
    CU_ASSERT(bad == NULL);
    CU_ASSERT(strstr(err, "holds no KV page (a page of 16 positions is") != NULL);
    free(lg);
    fx_close(&d);
    fx_close(&m);
}

/* Soft mode (the server): a sequence the pool runs out under is lost on the stage — its
 * pages come back, its later rows are dropped without an error until its slot is reset — and
 * the other sequences' results do not change. A row flagged STAGE_ROW_KV_LOST (lost on an
 * earlier stage) loses its slot on this one too. */
static void test_soft_lost(void)
{
    fxm d;
    char err[ERRLEN] = "";
    CU_ASSERT_FATAL(fx_open("dense", &d) == 0);
    const int L = d.cfg.n_layers, V = d.cfg.vocab;
    const size_t pb = kv_page_bytes(1, (size_t)d.cfg.n_kv_heads * d.cfg.head_dim);
    stage_state *ref = state_kv(d.m, 1, 0, err, sizeof err);
    stage_state *soft = state_kv(d.m, 1, (size_t)(4 * L + 6) * pb, err, sizeof err);
    CU_ASSERT_FATAL(ref && soft);
    stage_state_kv_soft(soft, 1);
    stage_state_kv_soft(ref, 1);
    float *lr = malloc((size_t)V * 4 * 4), *ls = malloc((size_t)V * 4 * 4), *o;
    /* slot 0: a prompt of 4 rows (4 L pages); slot 1: a prompt of 12 rows (12 L: too many) */
    int32_t sl[12], ps[12], tk[12];
    uint8_t fl[12];
    for (int i = 0; i < 12; i++) {
        sl[i] = i < 4 ? 0 : 1;
        ps[i] = i < 4 ? i : i - 4;
        tk[i] = (5 * i + 2) % V;
        fl[i] = STAGE_ROW_PROMPT | (i == 3 || i == 11 ? STAGE_ROW_NEED_LOGITS : 0);
    }
    stage_state *st[2] = {ref, soft};
    float *lg[2] = {lr, ls};
    for (int k = 0; k < 2; k++) {
        o = lg[k];
        CU_ASSERT_EQUAL_FATAL(fwd(st[k], d.m, 4, sl, ps, tk, fl, &o, err, sizeof err), 0);
        CU_ASSERT_EQUAL_FATAL(
            fwd(st[k], d.m, 8, sl + 4, ps + 4, tk + 4, fl + 4, &o, err, sizeof err), 0);
    }
    CU_ASSERT_EQUAL(stage_state_slot_lost(ref, 1), 0);
    CU_ASSERT_EQUAL(stage_state_slot_lost(soft, 1), 1);
    CU_ASSERT_EQUAL(stage_state_slot_lost(soft, 0), 0);
    stage_kv_stats k;
    stage_state_kv_stats(soft, &k);
    CU_ASSERT_EQUAL(k.pages_used, 4 * L); /* slot 1 gave every page back */
    CU_ASSERT_EQUAL(memcmp(lr, ls, (size_t)V * 4), 0);
    /* decode rows of both slots: slot 0's logits are the reference's, slot 1's row is dropped */
    int32_t s2[2] = {0, 1}, p2[2] = {4, 8}, t2[2] = {7, 9};
    uint8_t f2[2] = {STAGE_ROW_NEED_LOGITS, STAGE_ROW_NEED_LOGITS};
    o = lr;
    CU_ASSERT_EQUAL_FATAL(fwd(ref, d.m, 2, s2, p2, t2, f2, &o, err, sizeof err), 0);
    o = ls;
    CU_ASSERT_EQUAL_FATAL(fwd(soft, d.m, 2, s2, p2, t2, f2, &o, err, sizeof err), 0);
    CU_ASSERT_EQUAL(memcmp(lr, ls, (size_t)V * 4), 0);
    stage_state_kv_stats(soft, &k);
    CU_ASSERT_EQUAL(k.pages_used, 5 * L);
    /* a row flagged lost on an earlier stage: ref loses slot 1 too, its pages come back */
    f2[1] |= STAGE_ROW_KV_LOST;
    p2[0] = 5;
    p2[1] = 9;
    o = lr;
    CU_ASSERT_EQUAL_FATAL(fwd(ref, d.m, 2, s2, p2, t2, f2, &o, err, sizeof err), 0);
    CU_ASSERT_EQUAL(stage_state_slot_lost(ref, 1), 1);
    stage_state_kv_stats(ref, &k);
    CU_ASSERT_EQUAL(k.pages_used, 6 * L);
    /* the slot's next sequence (a position-0 prompt row) starts clean */
    stage_state_slot_release(soft, 0);
    int32_t s3 = 1, p3 = 0, t3 = 4;
    uint8_t f3 = STAGE_ROW_PROMPT | STAGE_ROW_NEED_LOGITS;
    o = ls;
    CU_ASSERT_EQUAL_FATAL(fwd(soft, d.m, 1, &s3, &p3, &t3, &f3, &o, err, sizeof err), 0);
    CU_ASSERT_EQUAL(stage_state_slot_lost(soft, 1), 0);
    stage_state_kv_stats(soft, &k);
    CU_ASSERT_EQUAL(k.pages_used, L);
    for (int s = 0; s < NSLOT; s++) {
        stage_state_slot_release(ref, s);
        stage_state_slot_release(soft, s);
    }
    stage_state_kv_stats(soft, &k);
    CU_ASSERT_EQUAL(k.pages_used, 0);
    stage_state_kv_stats(ref, &k);
    CU_ASSERT_EQUAL(k.pages_used, 0);
    stage_state_free(ref);
    stage_state_free(soft);
    free(lr);
    free(ls);
    fx_close(&d);
}

/* Prefix reuse on one stage: slot 1 takes the first 8 positions of slot 0's prompt by
 * stage_state_slot_share and computes only the rest; its last row's logits are those of the
 * whole prompt computed in slot 0 (causal routing: a prefix's kept rows do not depend on what
 * follows). Pages of 3 positions: shared pages are counted once, a partial one copied. */
static void check_share(const char *name, int split)
{
    fxm f;
    char err[ERRLEN] = "";
    CU_ASSERT_FATAL(fx_open(name, &f) == 0);
    const int V = f.cfg.vocab;
    stage_state *st = state_kv(f.m, 3, 0, err, sizeof err);
    CU_ASSERT_FATAL(st != NULL);
    float *ref = malloc((size_t)V * 4), *got = malloc((size_t)V * 4), *o;
    int32_t sl[12], ps[12], tk[12];
    uint8_t fl[12];
    for (int i = 0; i < 12; i++) {
        sl[i] = 0;
        ps[i] = i;
        tk[i] = (11 * i + 5) % V;
        fl[i] = STAGE_ROW_PROMPT | (i == 11 ? STAGE_ROW_NEED_LOGITS : 0);
    }
    o = ref;
    if (split) { /* two micro-batches: a sliding window drops slot 0's first pages at row 8 */
        float *o8 = got;
        CU_ASSERT_EQUAL_FATAL(fwd(st, f.m, 8, sl, ps, tk, fl, &o8, err, sizeof err), 0);
        CU_ASSERT_EQUAL_FATAL(fwd(st, f.m, 4, sl + 8, ps + 8, tk + 8, fl + 8, &o, err, sizeof err),
                              0);
    } else {
        CU_ASSERT_EQUAL_FATAL(fwd(st, f.m, 12, sl, ps, tk, fl, &o, err, sizeof err), 0);
    }
    stage_kv_stats k0, k1;
    stage_state_kv_stats(st, &k0);
    CU_ASSERT_EQUAL(k0.pages_cached, 0);
    /* slot 0's sequence is over: parked (src == dst), every page it holds is cached */
    CU_ASSERT_EQUAL(stage_state_slot_share(st, 0, 0, 12), 0);
    stage_state_kv_stats(st, &k1);
    CU_ASSERT(k1.pages_used == k0.pages_used && k1.pages_cached == k0.pages_used);
    CU_ASSERT_EQUAL(stage_state_slot_share(st, 0, NSLOT, 8), -1);
    CU_ASSERT_EQUAL_FATAL(stage_state_slot_share(st, 0, 1, 8), 0);
    stage_state_kv_stats(st, &k1);
    CU_ASSERT(k1.pages_used - k0.pages_used <= f.cfg.n_layers); /* at most a copy a layer */
    CU_ASSERT(k1.pages_cached < k0.pages_used); /* the shared ones are in use by slot 1 */
    stage_state_slot_release(st, 0);            /* the shared pages stay with slot 1 */
    stage_state_kv_stats(st, &k1);
    CU_ASSERT_EQUAL(k1.pages_cached, 0);
    for (int i = 0; i < 4; i++) sl[8 + i] = 1;
    o = got;
    CU_ASSERT_EQUAL_FATAL(fwd(st, f.m, 4, sl + 8, ps + 8, tk + 8, fl + 8, &o, err, sizeof err), 0);
    CU_ASSERT_EQUAL(memcmp(ref, got, (size_t)V * 4), 0);
    CU_ASSERT_EQUAL(stage_state_slot_share(st, 1, 1, 12), 0); /* parked, then evicted */
    stage_state_kv_stats(st, &k1);
    CU_ASSERT(k1.pages_used > 0 && k1.pages_cached == k1.pages_used);
    stage_state_slot_release(st, 1);
    stage_state_kv_stats(st, &k1);
    CU_ASSERT(k1.pages_used == 0 && k1.pages_cached == 0);
    CU_ASSERT_EQUAL(stage_state_slot_share(st, 1, 2, 8), -1); /* a released source */
    CU_ASSERT_EQUAL(stage_state_slot_share(st, 1, 1, 8), -1); /* parking a released slot */
    stage_state_free(st);
    free(ref);
    free(got);
    fx_close(&f);
}
static void test_share_dense(void) { check_share("dense", 0); }
static void test_share_mod(void) { check_share("mod", 0); }
static void test_share_mod_predictor(void) { check_share("mod_predictor", 0); }
static void test_share_mindskip_token(void) { check_share("mindskip_token", 0); }
static void test_share_mode_staged(void) { check_share("mode_staged", 0); }
static void test_share_window(void) { check_share("arch/mistral", 1); }
static void test_share_window_mod(void) { check_share("arch/mistral_mod", 1); }

#define T_(f)                                                                                      \
    {                                                                                              \
#f, f                                                                                      \
    }

int main(void)
{
    static const test_def tests[] = {
        T_(test_pool_pages),
        T_(test_pool_share),
        T_(test_share_dense),
        T_(test_share_mod),
        T_(test_share_mod_predictor),
        T_(test_share_mindskip_token),
        T_(test_share_mode_staged),
        T_(test_share_window),
        T_(test_share_window_mod),
        T_(test_attend_paged),
        T_(test_paged_dense),
        T_(test_paged_mod),
        T_(test_paged_mod_all),
        T_(test_paged_mod_predictor),
        T_(test_paged_mod_topk),
        T_(test_paged_mode_staged),
        T_(test_paged_mode_integrated),
        T_(test_paged_mindskip),
        T_(test_paged_mindskip_token),
        T_(test_paged_mixed),
        T_(test_pages_follow_router),
        T_(test_soft_lost),
    };
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("kv", NULL, NULL);
    for (size_t i = 0; s && i < sizeof tests / sizeof tests[0]; i++)
        if (!CU_add_test(s, tests[i].name, tests[i].fn)) s = NULL;
    if (!s) {
        CU_cleanup_registry();
        return 1;
    }
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    return fails ? 1 : 0;
}
