/* fuzz/fuzz_safetensors.c — libFuzzer target: the safetensors header parser
 * (stage/safetensors.h: st_open validates a single model.safetensors at open).
 *
 * The input is the whole file, written to a private directory under /dev/shm (or TMPDIR)
 * each run, so the real reading path (open, fstat, mmap, header checks) is what runs; no
 * in-memory entry point is needed. Checked beyond "no crash": when st_open accepts the
 * file, every tensor the header names (read here with cJSON) is found and all of its bytes
 * can be read (a range outside the map faults); a rejected file gives a message.
 */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz/fuzz_util.h"
#include "stage/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[256], file[320];

static void setup(void)
{
    const char *base =
        access("/dev/shm", W_OK) == 0 ? "/dev/shm" : (getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    snprintf(dir, sizeof dir, "%s/modpipe-fuzz-st-XXXXXX", base);
    FUZZ_CHECK(mkdtemp(dir) != NULL);
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
}

static void cleanup(void)
{
    unlink(file);
    rmdir(dir);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!dir[0]) {
        setup();
        atexit(cleanup);
    }
    FILE *f = fopen(file, "wb");
    FUZZ_CHECK(f != NULL);
    FUZZ_CHECK(size == 0 || fwrite(data, 1, size, f) == size);
    FUZZ_CHECK(fclose(f) == 0);

    st_model *m = NULL;
    char err[512] = "";
    if (st_open(dir, &m, err, sizeof err)) {
        FUZZ_CHECK(err[0] != 0);
        return 0;
    }
    /* the header as the harness reads it: [u64 LE n][n bytes JSON] */
    FUZZ_CHECK(size >= 8);
    uint64_t n = 0;
    for (int i = 0; i < 8; i++) n |= (uint64_t)data[i] << (8 * i);
    FUZZ_CHECK(n <= size - 8);
    cJSON *root = cJSON_ParseWithLength((const char *)data + 8, (size_t)n);
    FUZZ_CHECK(cJSON_IsObject(root));
    const cJSON *it;
    cJSON_ArrayForEach(it, root)
    {
        if (!strcmp(it->string, "__metadata__")) continue;
        st_tensor t;
        FUZZ_CHECK(st_find(m, it->string, &t, err, sizeof err) == 1);
        FUZZ_CHECK(t.ndim >= 0 && t.ndim <= ST_MAX_DIMS);
        volatile uint8_t sum = 0;
        for (size_t b = 0; b < t.nbytes; b++) sum ^= ((const uint8_t *)t.data)[b];
        (void)sum;
    }
    FUZZ_CHECK(st_find(m, "no such tensor \x01", &(st_tensor){0}, err, sizeof err) == 0);
    cJSON_Delete(root);
    st_close(m);
    return 0;
}
