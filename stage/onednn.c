/* stage/onednn.c — see onednn.h: cached oneDNN matmul primitives for the large path's tiles. */
#include "stage/onednn.h"

#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IMPL_LEN 64
#define N_ARGS 4 /* src, weights, dst, scratchpad */

typedef struct {
    int valid;  /* the slot holds a shape */
    int usable; /* 0: oneDNN has no (non-reference) kernel for it: the caller's own path */
    stage_dnnl_shape s;
    int nthr;
    dnnl_primitive_t prim;
    size_t scratch;     /* bytes */
    dnnl_memory_t *mem; /* [nthr][N_ARGS] memory objects without a handle (set per tile) */
    char impl[IMPL_LEN];
    unsigned long used; /* LRU tick */
} entry;

static struct {
    int state; /* 0 untried, 1 engine ready, -1 oneDNN unavailable */
    dnnl_engine_t eng;
    dnnl_stream_t *st; /* [n_st] one stream per pool thread */
    int n_st;
    void **scr;    /* [n_scr] per-thread scratchpad */
    size_t *scr_c; /* [n_scr] its capacity in bytes */
    int n_scr;
    entry e[STAGE_DNNL_CACHE];
    unsigned long tick;
} D;

void stage_dnnl_thread_init(void)
{
    /* OpenMP's nthreads-var is per thread for threads OpenMP did not start: 1 here means oneDNN
     * runs this thread's primitives inline, never in a team of its own. */
    if (omp_get_max_threads() != 1) omp_set_num_threads(1);
}

static int engine_ready(void)
{
    if (D.state == 0) D.state = dnnl_engine_create(&D.eng, dnnl_cpu, 0) == dnnl_success ? 1 : -1;
    return D.state == 1;
}

static void entry_drop(entry *en)
{
    if (en->mem)
        for (int i = 0; i < en->nthr * N_ARGS; i++)
            if (en->mem[i]) dnnl_memory_destroy(en->mem[i]);
    free(en->mem);
    if (en->prim) dnnl_primitive_destroy(en->prim);
    memset(en, 0, sizeof *en);
}

/* Streams and scratchpads for nthr threads (grown, never shrunk). */
static int per_thread_ready(int nthr, size_t scratch)
{
    if (D.n_st < nthr) {
        dnnl_stream_t *ns = realloc(D.st, (size_t)nthr * sizeof *ns);
        if (!ns) return -1;
        D.st = ns;
        for (; D.n_st < nthr; D.n_st++)
            if (dnnl_stream_create(&D.st[D.n_st], D.eng, dnnl_stream_default_flags) != dnnl_success)
                return -1;
    }
    if (D.n_scr < nthr) {
        void **np = realloc(D.scr, (size_t)nthr * sizeof *np);
        if (!np) return -1;
        D.scr = np;
        size_t *nc = realloc(D.scr_c, (size_t)nthr * sizeof *nc);
        if (!nc) return -1;
        D.scr_c = nc;
        for (; D.n_scr < nthr; D.n_scr++) {
            D.scr[D.n_scr] = NULL;
            D.scr_c[D.n_scr] = 0;
        }
    }
    for (int t = 0; t < nthr; t++) {
        if (D.scr_c[t] >= scratch) continue;
        void *p = NULL;
        if (posix_memalign(&p, 64, scratch)) return -1;
        free(D.scr[t]);
        D.scr[t] = p;
        D.scr_c[t] = scratch;
    }
    return 0;
}

/* The primitive descriptor of a tile; NULL when oneDNN cannot take it. */
static dnnl_primitive_desc_t make_pd(const stage_dnnl_shape *s)
{
    dnnl_memory_desc_t sd, wd, dd;
    dnnl_dims_t sdim = {s->m, s->k}, sstr = {s->ldx, 1};
    dnnl_dims_t wdim = {s->k, s->n}, wstr = {1, s->ldw}; /* W^T: "ba" over W [n][k] */
    dnnl_dims_t ddim = {s->m, s->n}, dstr = {s->ldy, 1};
    const dnnl_data_type_t in = s->bf16 ? dnnl_bf16 : dnnl_f32;
    if (dnnl_memory_desc_init_by_strides(&sd, 2, sdim, in, sstr) != dnnl_success ||
        dnnl_memory_desc_init_by_strides(&wd, 2, wdim, in, wstr) != dnnl_success ||
        dnnl_memory_desc_init_by_strides(&dd, 2, ddim, dnnl_f32, dstr) != dnnl_success)
        return NULL;
    dnnl_matmul_desc_t md;
    if (dnnl_matmul_desc_init(&md, &sd, &wd, NULL, &dd) != dnnl_success) return NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd = NULL;
    int ok =
        dnnl_primitive_attr_create(&attr) == dnnl_success &&
        dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user) == dnnl_success;
    if (ok && s->acc)
        ok = dnnl_post_ops_create(&po) == dnnl_success &&
             dnnl_post_ops_append_sum(po, 1.0f) == dnnl_success &&
             dnnl_primitive_attr_set_post_ops(attr, po) == dnnl_success;
    if (ok && dnnl_primitive_desc_create(&pd, &md, attr, D.eng, NULL) != dnnl_success) pd = NULL;
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    return pd;
}

/* The ISA oneDNN dispatches to (after ONEDNN_MAX_CPU_ISA). */
static const char *isa_name(void)
{
    switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    default: return "other";
    }
}

static int pd_impl(dnnl_primitive_desc_t pd, char *impl)
{
    const char *name = NULL;
    if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name) != dnnl_success || !name)
        return -1;
    snprintf(impl, IMPL_LEN, "%s isa=%s", name, isa_name());
    return strncmp(name, "ref", 3) ? 0 : -1; /* reference kernels: far too slow to use */
}

static int same(const stage_dnnl_shape *a, const stage_dnnl_shape *b)
{
    return a->m == b->m && a->n == b->n && a->k == b->k && a->ldx == b->ldx && a->ldw == b->ldw &&
           a->ldy == b->ldy && a->acc == b->acc && a->bf16 == b->bf16;
}

static int fill(entry *en, const stage_dnnl_shape *s, int nthr)
{
    en->valid = 1;
    en->s = *s;
    en->nthr = nthr;
    dnnl_primitive_desc_t pd = make_pd(s);
    if (!pd) return 0;
    int ok = pd_impl(pd, en->impl) == 0;
    const dnnl_memory_desc_t *md[N_ARGS] = {
        dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0),
        dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0),
        dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0),
        dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0)};
    if (ok) en->scratch = md[3] ? dnnl_memory_desc_get_size(md[3]) : 0;
    ok = ok && per_thread_ready(nthr, en->scratch) == 0 &&
         dnnl_primitive_create(&en->prim, pd) == dnnl_success;
    if (ok) ok = (en->mem = calloc((size_t)nthr * N_ARGS, sizeof *en->mem)) != NULL;
    for (int t = 0; ok && t < nthr; t++)
        for (int a = 0; ok && a < N_ARGS; a++)
            ok = dnnl_memory_create(&en->mem[t * N_ARGS + a], md[a], D.eng, DNNL_MEMORY_NONE) ==
                 dnnl_success;
    dnnl_primitive_desc_destroy(pd);
    if (!ok) {
        char impl[IMPL_LEN];
        memcpy(impl, en->impl, sizeof impl);
        entry_drop(en);
        en->valid = 1;
        en->s = *s;
        en->nthr = nthr;
        memcpy(en->impl, impl, sizeof impl);
        return 0;
    }
    en->usable = 1;
    return 0;
}

int stage_dnnl_prepare(const stage_dnnl_shape *s, int nthreads)
{
    stage_dnnl_thread_init();
    if (!engine_ready()) return -1;
    entry *lru = &D.e[0];
    for (int i = 0; i < STAGE_DNNL_CACHE; i++) {
        entry *en = &D.e[i];
        if (en->valid && en->nthr == nthreads && same(&en->s, s)) {
            en->used = ++D.tick;
            return en->usable ? i : -1;
        }
        if (!en->valid || (lru->valid && en->used < lru->used)) lru = en;
    }
    if (lru->valid) entry_drop(lru);
    fill(lru, s, nthreads);
    lru->used = ++D.tick;
    return lru->usable ? (int)(lru - D.e) : -1;
}

void stage_dnnl_tile(int handle, int tid, const void *x, const void *w, float *y)
{
    entry *en = &D.e[handle];
    dnnl_memory_t *m = en->mem + (size_t)tid * N_ARGS;
    dnnl_memory_set_data_handle(m[0], (void *)x);
    dnnl_memory_set_data_handle(m[1], (void *)w);
    dnnl_memory_set_data_handle(m[2], y);
    dnnl_memory_set_data_handle(m[3], D.scr[tid]);
    dnnl_exec_arg_t args[N_ARGS] = {{DNNL_ARG_SRC, m[0]},
                                    {DNNL_ARG_WEIGHTS, m[1]},
                                    {DNNL_ARG_DST, m[2]},
                                    {DNNL_ARG_SCRATCHPAD, m[3]}};
    dnnl_primitive_execute(en->prim, D.st[tid], N_ARGS, args);
    dnnl_stream_wait(D.st[tid]);
}

int stage_dnnl_preferred(void)
{
    /* an ISA value is a bit set including every ISA below it (dnnl_types.h) */
    const unsigned core = dnnl_cpu_isa_avx512_core;
    return ((unsigned)dnnl_get_effective_cpu_isa() & core) == core;
}

int stage_dnnl_bf16(void)
{
    const unsigned bf16 = dnnl_cpu_isa_avx512_core_bf16;
    return ((unsigned)dnnl_get_effective_cpu_isa() & bf16) == bf16;
}

int stage_dnnl_amx(void)
{
    const unsigned amx = dnnl_cpu_isa_avx512_core_amx;
    return ((unsigned)dnnl_get_effective_cpu_isa() & amx) == amx;
}

const char *stage_dnnl_impl(const stage_dnnl_shape *s)
{
    int h = stage_dnnl_prepare(s, 1);
    return h >= 0 ? D.e[h].impl : NULL;
}

int stage_dnnl_cached(void)
{
    int n = 0;
    for (int i = 0; i < STAGE_DNNL_CACHE; i++) n += D.e[i].valid;
    return n;
}

void stage_dnnl_free(void)
{
    for (int i = 0; i < STAGE_DNNL_CACHE; i++)
        if (D.e[i].valid) entry_drop(&D.e[i]);
    for (int t = 0; t < D.n_st; t++) dnnl_stream_destroy(D.st[t]);
    for (int t = 0; t < D.n_scr; t++) free(D.scr[t]);
    free(D.st);
    free(D.scr);
    free(D.scr_c);
    D.st = NULL;
    D.scr = NULL;
    D.scr_c = NULL;
    D.n_st = D.n_scr = 0;
    D.tick = 0;
    /* the engine stays: creating it again costs, and it holds no per-shape state */
}
