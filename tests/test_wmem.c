/* tests/test_wmem.c — weights on 2 MiB pages (stage/wmem.h, `--huge-pages`):
 *   1. the arena: 64-byte aligned, zero-filled, disjoint blocks; a block larger than a chunk
 *      gets a chunk of its own; the bytes handed out are counted;
 *   2. a copied file mapping's pages let go (stage_wmem_release_source) read back the same;
 *      the kernel's THP setting read as the option needs it (always / madvise: yes; never or
 *      no file: no, with the reason);
 *   3. `modpipe generate --huge-pages` at -np 3 gives the logits of -np 1 without it, bit for
 *      bit, and --stats counts every stage's weight bytes on huge pages (where the kernel
 *      cannot give huge pages, the option is refused with the reason instead).
 * (Same bits on every fixture's weights in every dtype, and the bytes copied: test_stage.)
 * Needs build/modpipe (MODPIPE) and tests/fixtures (MODPIPE_FIXTURES).
 */
#include <CUnit/Basic.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cJSON.h>

#include "stage/wmem.h"
#include "testutil.h"

static const char *BIN, *FIX;
static char TMP[256];
static char OUT[1 << 16];
#define run(secs, ...) tu_run(OUT, sizeof OUT, (secs), __VA_ARGS__)

static void test_arena(void)
{
    stage_wmem *a = stage_wmem_new();
    CU_ASSERT_FATAL(a != NULL);
    CU_ASSERT_PTR_NULL(stage_wmem_alloc(a, 0));
    const size_t sizes[] = {1, 100, 4096, 3 << 20, (size_t)300 << 20, 64};
    unsigned char *p[6];
    size_t want = 0;
    for (int i = 0; i < 6; i++) {
        p[i] = stage_wmem_alloc(a, sizes[i]);
        CU_ASSERT_FATAL(p[i] != NULL);
        CU_ASSERT_EQUAL((uintptr_t)p[i] % 64, 0);
        want += (sizes[i] + 63) / 64 * 64;
        if (sizes[i] < (1u << 24)) { /* written: zero on arrival, then ours alone */
            size_t nz = 0;
            for (size_t k = 0; k < sizes[i]; k++) nz += p[i][k] != 0;
            CU_ASSERT_EQUAL(nz, 0);
            memset(p[i], 0xA0 + i, sizes[i]);
        }
    }
    for (int i = 0; i < 6; i++) {
        size_t bad = 0;
        for (size_t k = 0; sizes[i] < (1u << 24) && k < sizes[i]; k++) bad += p[i][k] != 0xA0 + i;
        CU_ASSERT_EQUAL(bad, 0);
    }
    for (int i = 0; i < 6; i++) /* disjoint */
        for (int j = 0; j < 6; j++)
            if (i != j) CU_ASSERT(p[i] + sizes[i] <= p[j] || p[j] + sizes[j] <= p[i]);
    CU_ASSERT_EQUAL(stage_wmem_used(a), want);
    CU_ASSERT(stage_wmem_huge_bytes(a) <= want + (2u << 20));
    stage_wmem_free(a);
    stage_wmem_free(NULL);
    CU_ASSERT_EQUAL(stage_wmem_used(NULL), 0);
}

static void test_release_source(void)
{
    char path[300];
    snprintf(path, sizeof path, "%s/src.bin", TMP);
    const size_t n = 5 * 4096 + 123;
    unsigned char *buf = malloc(n), *copy = malloc(n);
    for (size_t i = 0; i < n; i++) buf[i] = (unsigned char)(i * 7 + 3);
    FILE *f = fopen(path, "wb");
    CU_ASSERT_FATAL(f && fwrite(buf, 1, n, f) == n);
    fclose(f);
    int fd = open(path, O_RDONLY);
    CU_ASSERT_FATAL(fd >= 0);
    const unsigned char *map = mmap(NULL, n, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    CU_ASSERT_FATAL(map != MAP_FAILED);
    memcpy(copy, map + 100, n - 200);
    stage_wmem_release_source(map + 100, n - 200); /* pages 1..4 let go */
    CU_ASSERT(memcmp(map, buf, n) == 0);           /* faulted back in, the same */
    CU_ASSERT(memcmp(copy, buf + 100, n - 200) == 0);
    munmap((void *)map, n);
    free(buf);
    free(copy);
}

/* what the kernel's THP setting allows, and why, from a file of that format */
static void test_thp_state(void)
{
    static const struct {
        const char *text;
        int ok;
    } cases[] = {{"always [madvise] never\n", 1},
                 {"[always] madvise never\n", 1},
                 {"always madvise [never]\n", 0},
                 {"", 0}};
    char path[300], why[160];
    snprintf(path, sizeof path, "%s/enabled", TMP);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        FILE *f = fopen(path, "w");
        CU_ASSERT_FATAL(f != NULL);
        fputs(cases[i].text, f);
        fclose(f);
        CU_ASSERT_EQUAL(stage_wmem_thp_state_at(path, why, sizeof why), cases[i].ok);
        if (i == 2) ASSERT_HAS(why, "transparent_hugepage/enabled: always madvise [never]");
    }
    snprintf(path, sizeof path, "%s/none", TMP);
    CU_ASSERT_EQUAL(stage_wmem_thp_state_at(path, why, sizeof why), 0);
    ASSERT_HAS(why, "no transparent huge pages in this kernel");
}

/* every stage's huge_page_bytes from a --stats file; -1 when unreadable */
static int stats_huge(const char *path, double *out, int max)
{
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    static char text[1 << 20];
    size_t k = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[k] = 0;
    cJSON *j = cJSON_Parse(text);
    cJSON *st = cJSON_GetObjectItem(j, "stages");
    int n = 0;
    for (cJSON *e = st ? st->child : NULL; e && n < max; e = e->next) {
        cJSON *h = cJSON_GetObjectItem(e, "huge_page_bytes");
        out[n++] = cJSON_IsNumber(h) ? h->valuedouble : -1;
    }
    cJSON_Delete(j);
    return n;
}

static void test_generate(void)
{
    char a[400], b[400], s[400], thp[160];
    snprintf(a, sizeof a, "%s/np1.npy", TMP);
    snprintf(b, sizeof b, "%s/np3-huge.npy", TMP);
    snprintf(s, sizeof s, "%s/np3-huge.json", TMP);
    const char *what = "generate --model %s/mixed --prompt-ids 3,14,15,92,65,35 --prompt-ids 89,79 "
                       "--max-new 5 --quiet";
    char cmd[1024];
    snprintf(cmd, sizeof cmd, what, FIX);
    CU_ASSERT_EQUAL_FATAL(run(120, "%s -np 1 %s %s --dump-logits %s", TU_MPIRUN, BIN, cmd, a), 0);
    int rc = run(120, "%s -np 3 %s %s --huge-pages --dump-logits %s --stats %s", TU_MPIRUN, BIN,
                 cmd, b, s);
    if (!stage_wmem_thp_state(thp, sizeof thp)) { /* this kernel: refused, saying why */
        CU_ASSERT_NOT_EQUAL(rc, 0);
        ASSERT_HAS(OUT, "--huge-pages: this kernel cannot put memory on huge pages");
        return;
    }
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    CU_ASSERT(tu_files_identical(a, b));
    double h[8];
    CU_ASSERT_EQUAL(stats_huge(s, h, 8), 3);
    for (int i = 0; i < 3; i++) CU_ASSERT(h[i] > 0);
}

int main(void)
{
    BIN = getenv("MODPIPE") ? getenv("MODPIPE") : "build/modpipe";
    FIX = getenv("MODPIPE_FIXTURES") ? getenv("MODPIPE_FIXTURES") : "tests/fixtures";
    snprintf(TMP, sizeof TMP, "/tmp/modpipe-wmem-XXXXXX");
    if (!mkdtemp(TMP)) {
        perror("mkdtemp");
        return 1;
    }
    if (tu_mpi_env("test_wmem", BIN)) return 1;
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("wmem", NULL, NULL);
    CU_add_test(s, "the arena", test_arena);
    CU_add_test(s, "a copied mapping let go reads back the same", test_release_source);
    CU_add_test(s, "the kernel's THP setting", test_thp_state);
    CU_add_test(s, "generate --huge-pages: -np 3 == -np 1 without, --stats", test_generate);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    char *t = strdup(TMP);
    rm_tmpdir(t);
    return fails ? 1 : 0;
}
