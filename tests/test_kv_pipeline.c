/* tests/test_kv_pipeline.c — the paged KV cache through `modpipe generate` / `eval` under
 * mpirun (docs/SPEC.md §11):
 *   1. every fixture (tests/fixtures and tests/fixtures/arch, docs/SPEC.md §10): logits
 *      (--dump-logits) with pages of one position, at -np 1 and -np 3, are byte-identical to
 *      one page per (layer, slot) (--kv-page = --ctx: the contiguous cache), for generate and
 *      eval;
 *   2. --stats: the pool's pages, the peak, and no page held once every slot was released,
 *      on every stage; a routed model's peak below a dense one's; a sliding window gives its
 *      pages back as decoding moves on (§10.4); without --kv-mem the pool is what
 *      --mem-per-rank leaves after the stage's weights and workspace, else every position;
 *   3. refusals: a --kv-mem too small for the run (pool exhausted, at -np 1 and -np 3), one
 *      below a page, an unparsable size.
 * Needs build/modpipe (MODPIPE) and tests/fixtures (MODPIPE_FIXTURES).
 */
#include <CUnit/Basic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

static const char *BIN, *FIX;
static char TMP[256];
static const char *PROMPTS =
    "--prompt-ids 3,14,15,92,65,35 --prompt-ids 89,79 --prompt-ids 32,38,46,26";
/* the arch fixtures' prompts (tests/fixtures/README.md): 12 + 5 - 1 = 16 positions, longer
 * than every window there */
static const char *ARCH_PROMPTS =
    "--prompt-ids 3,14,15,92,65,35,89,79,32,38,46,26 --prompt-ids 89,79 --prompt-ids 32,38,46,26";
#define MPIRUN TU_MPIRUN

static char OUT[1 << 16];
#define run(secs, ...) tu_run(OUT, sizeof OUT, (secs), __VA_ARGS__)

#define files_identical tu_files_identical

static const char *GEN_MODELS[] = {
    "dense", "mod", "mod_all", "mod_predictor", "mode_staged", "mode_integrated", "mindskip",
    "mindskip_token", "mixed",
    /* llama3 RoPE scaling and biases, windows (mistral: every layer; qwen2 / qwen3_mode: some),
     * q/k norms, routed layers of each family */
    "arch/llama3", "arch/llama3_mod", "arch/mistral", "arch/mistral_mod", "arch/qwen2",
    "arch/qwen2_mindskip", "arch/qwen3", "arch/qwen3_mod", "arch/qwen3_mode",
    "arch/llama3_mindskip"};
static const char *EVAL_MODELS[] = {"dense", "mod", "mod_topk", "mixed"};

/* --ctx 16: the contiguous reference is --kv-page 16 (one page per layer and slot). */
static void check_one(const char *model, int gen)
{
    char ref[512], got[512], what[512], file[64];
    const int arch = !strncmp(model, "arch/", 5);
    snprintf(file, sizeof file, "%s", arch ? model + 5 : model);
    if (gen)
        snprintf(what, sizeof what, "generate --model %s/%s %s --max-new 5", FIX, model,
                 arch ? ARCH_PROMPTS : PROMPTS);
    else
        snprintf(what, sizeof what,
                 "eval --model %s/%s --tokens-file %s/eval_tokens.txt --micro-batch 8", FIX, model,
                 FIX);
    snprintf(ref, sizeof ref, "%s/%s-%d-contig.npy", TMP, file, gen);
    int rc = run(120, "%s -np 1 %s %s --ctx 16 --kv-page 16 --quiet --dump-logits %s", MPIRUN, BIN,
                 what, ref);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    for (int np = 1; np <= 3; np += 2) {
        snprintf(got, sizeof got, "%s/%s-%d-page1-np%d.npy", TMP, file, gen, np);
        rc = run(120, "%s -np %d %s %s --ctx 16 --kv-page 1 --quiet --dump-logits %s", MPIRUN, np,
                 BIN, what, got);
        CU_ASSERT_EQUAL(rc, 0);
        int same = files_identical(ref, got);
        if (!same)
            fprintf(stderr, "\n  %s %s -np %d: pages of 1 differ from the contiguous cache\n",
                    gen ? "generate" : "eval", model, np);
        CU_ASSERT(same);
    }
}

static void test_generate_paged_exact(void)
{
    for (size_t i = 0; i < sizeof GEN_MODELS / sizeof *GEN_MODELS; i++) check_one(GEN_MODELS[i], 1);
}

static void test_eval_paged_exact(void)
{
    for (size_t i = 0; i < sizeof EVAL_MODELS / sizeof *EVAL_MODELS; i++)
        check_one(EVAL_MODELS[i], 0);
}

/* Peak pages of the run summed over stages; every stage must end with none held. */
static double pages_peak(const char *model, int np)
{
    char stats[512];
    const int arch = !strncmp(model, "arch/", 5);
    snprintf(stats, sizeof stats, "%s/%s-np%d-stats.json", TMP, arch ? model + 5 : model, np);
    int rc = run(120,
                 "%s -np %d %s generate --model %s/%s %s --max-new 5 --kv-page 1 --quiet "
                 "--stats %s",
                 MPIRUN, np, BIN, FIX, model, arch ? ARCH_PROMPTS : PROMPTS, stats);
    CU_ASSERT_EQUAL(rc, 0);
    cJSON *j = tu_read_json(stats);
    CU_ASSERT_PTR_NOT_NULL_FATAL(j);
    double peak = 0;
    int n = 0;
    const cJSON *s;
    cJSON_ArrayForEach(s, cJSON_GetObjectItemCaseSensitive(j, "stages"))
    {
        CU_ASSERT_EQUAL(tu_jnum(s, "kv_pages_used_at_end"), 0);
        CU_ASSERT_EQUAL(tu_jnum(s, "kv_page_positions"), 1);
        CU_ASSERT(tu_jnum(s, "kv_pages_peak") <= tu_jnum(s, "kv_pages_total"));
        CU_ASSERT(tu_jnum(s, "kv_bytes_allocated") > 0);
        peak += tu_jnum(s, "kv_pages_peak");
        n++;
    }
    CU_ASSERT_EQUAL(n, np);
    cJSON_Delete(j);
    return peak;
}

static void test_stats_pages(void)
{
    double d1 = pages_peak("dense", 1), d3 = pages_peak("dense", 3);
    double m1 = pages_peak("mod_all", 1), m3 = pages_peak("mod_all", 3);
    /* dense: 6 layers x (6 + 4 + 2 prompt + 3 x 4 decode positions, the last token is not fed) */
    CU_ASSERT_EQUAL(d1, 6 * (10 + 6 + 8));
    CU_ASSERT_EQUAL(d3, d1);
    CU_ASSERT_EQUAL(m3, m1);
    CU_ASSERT(m1 < d1); /* the routers keep fewer rows: fewer pages */
    /* mistral: a window of 4 on each of its 4 layers. The three prompts (12 + 2 + 4 rows, one
     * micro-batch) take 18 pages a layer; each decode row first gives back its sequence's
     * pages before its window, so the 3 x 4 decode rows take none beyond them: 4 x 18, not
     * the 4 x 30 positions fed. */
    CU_ASSERT_EQUAL(pages_peak("arch/mistral", 1), 4 * 18);
    CU_ASSERT_EQUAL(pages_peak("arch/mistral", 3), 4 * 18);
}

/* Pages of each stage's pool (--stats kv_pages_total) of a generate run on mod with slots of
 * 256 positions in pages of 1, and more options; returns the stages. */
static int pool_pages(int np, const char *opts, double *pages)
{
    char stats[512];
    snprintf(stats, sizeof stats, "%s/pool-np%d.json", TMP, np);
    int rc = run(120,
                 "%s -np %d %s generate --model %s/mod %s --max-new 5 --kv-page 1 --ctx 256 "
                 "--slots %d --quiet --stats %s %s",
                 MPIRUN, np, BIN, FIX, PROMPTS, 3 * np, stats, opts);
    CU_ASSERT_EQUAL(rc, 0);
    cJSON *j = rc ? NULL : tu_read_json(stats);
    if (!j) return 0;
    int n = 0;
    const cJSON *s;
    cJSON_ArrayForEach(s, cJSON_GetObjectItemCaseSensitive(j, "stages"))
    {
        if (n < 3) pages[n] = tu_jnum(s, "kv_pages_total");
        n++;
    }
    cJSON_Delete(j);
    return n;
}

/* The pool's size (docs/SPEC.md §11). A page of 1 position on mod is 260 bytes (2 KV heads x
 * 16 floats, K and V, + a position); every position of 3 slots on its 6 layers is 4608 pages,
 * and at -np 3 (2 layers a stage) of 9 slots too. M bytes per rank (42 MiB, at -np 3 41.4 MiB:
 * just above what the planner needs) leave part of that after each stage's weights and
 * workspace, and 26000 bytes more are exactly 100 pages more on every stage; --kv-mem
 * overrides it. */
static void test_pool_size(void)
{
    for (int np = 1; np <= 3; np += 2) {
        const long m = np == 1 ? 44040192 : 43411866;
        char o[128];
        double all[3] = {0}, a[3] = {0}, b[3] = {0}, k[3] = {0};
        CU_ASSERT_EQUAL_FATAL(pool_pages(np, "", all), np);
        snprintf(o, sizeof o, "--mem-per-rank %ld", m);
        CU_ASSERT_EQUAL_FATAL(pool_pages(np, o, a), np);
        snprintf(o, sizeof o, "--mem-per-rank %ld", m + 26000);
        CU_ASSERT_EQUAL_FATAL(pool_pages(np, o, b), np);
        snprintf(o, sizeof o, "--mem-per-rank %ld --kv-mem 26000", m);
        CU_ASSERT_EQUAL_FATAL(pool_pages(np, o, k), np);
        for (int s = 0; s < np; s++) {
            CU_ASSERT_EQUAL(all[s], 4608);
            CU_ASSERT(a[s] > 144 && a[s] < all[s] - 100); /* the run needs 144 at most */
            CU_ASSERT_EQUAL(b[s], a[s] + 100);
            CU_ASSERT_EQUAL(k[s], 100);
        }
    }
}

static void test_refusals(void)
{
    const char *model = "mod";
    /* 6 pages of 4 positions hold the prompt of one layer and not much more */
    for (int np = 1; np <= 3; np += 2) {
        int rc = run(120,
                     "%s -np %d %s generate --model %s/%s %s --max-new 5 --kv-page 4 "
                     "--kv-mem 3K --quiet",
                     MPIRUN, np, BIN, FIX, model, PROMPTS);
        CU_ASSERT_NOT_EQUAL(rc, 0);
        ASSERT_HAS(OUT, "KV pool exhausted");
        ASSERT_HAS(OUT, "raise --kv-mem");
    }
    CU_ASSERT_NOT_EQUAL(run(60,
                            "%s -np 1 %s eval --model %s/%s --tokens-file %s/eval_tokens.txt "
                            "--kv-mem 3K --kv-page 4 --quiet",
                            MPIRUN, BIN, FIX, model, FIX),
                        0);
    ASSERT_HAS(OUT, "KV pool exhausted");
    CU_ASSERT_NOT_EQUAL(run(60, "%s -np 1 %s generate --model %s/%s %s --kv-mem 100 --quiet",
                            MPIRUN, BIN, FIX, model, PROMPTS),
                        0);
    ASSERT_HAS(OUT, "--kv-mem 100 B holds no KV page (a page of 16 positions is");
    CU_ASSERT_NOT_EQUAL(
        run(60, "%s generate --model %s/%s %s --kv-mem lots --quiet", BIN, FIX, model, PROMPTS), 0);
    ASSERT_HAS(OUT, "--kv-mem: expected a size like 512M or 2G, got 'lots'");
    CU_ASSERT_NOT_EQUAL(
        run(60, "%s generate --model %s/%s %s --kv-page 0 --quiet", BIN, FIX, model, PROMPTS), 0);
    ASSERT_HAS(OUT, "--kv-page");
}

int main(void)
{
    BIN = getenv("MODPIPE") ? getenv("MODPIPE") : "build/modpipe";
    FIX = getenv("MODPIPE_FIXTURES") ? getenv("MODPIPE_FIXTURES") : "tests/fixtures";
    snprintf(TMP, sizeof TMP, "/tmp/modpipe-kv-XXXXXX");
    if (!mkdtemp(TMP)) {
        perror("mkdtemp");
        return 1;
    }
    if (tu_mpi_env("test_kv_pipeline", BIN)) return 1;
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("kv_pipeline", NULL, NULL);
    CU_add_test(s, "generate: pages of 1 == contiguous, np 1 and 3", test_generate_paged_exact);
    CU_add_test(s, "eval: pages of 1 == contiguous, np 1 and 3", test_eval_paged_exact);
    CU_add_test(s, "--stats pages, none held at the end", test_stats_pages);
    CU_add_test(s, "the pool: --kv-mem, else what --mem-per-rank leaves, else every position",
                test_pool_size);
    CU_add_test(s, "refusals", test_refusals);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    char *t = strdup(TMP);
    rm_tmpdir(t);
    return fails ? 1 : 0;
}
