/* fuzz/make_seeds.c — writes the comm_unpack seed corpus: real packets packed by comm_pack
 * (ROWS chain packets with a descriptor and bypass list in each wire dtype, one with the
 * per-row sampling state and slot releases, a non-chain ROWS packet, TOKENS, END, an empty
 * chain packet) and the input the fuzz run found (a TOKENS
 * packet whose payload is one int32 short of n_rows * 4). Each file is [D - 1][packet].
 *
 *   build-fuzz/make_seeds fuzz/corpus/comm_unpack      (make fuzz-seeds)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"

static const char *OUT;
static int n_written;

static void put(const char *name, int D, const uint8_t *buf, size_t len)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", OUT, name);
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        exit(1);
    }
    uint8_t d = (uint8_t)(D - 1);
    fwrite(&d, 1, 1, f);
    fwrite(buf, 1, len, f);
    fclose(f);
    n_written++;
}

static size_t pack(const comm_packet *p, const float *x, int D, const int32_t *tok, uint8_t *buf,
                   size_t cap)
{
    char err[256];
    size_t hb, pb;
    size_t n = comm_pack(p, x, D, tok, buf, cap, &hb, &pb, err, sizeof err);
    if (!n) {
        fprintf(stderr, "make_seeds: %s\n", err);
        exit(1);
    }
    return n;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: make_seeds DIR\n");
        return 2;
    }
    OUT = argv[1];
    enum { D = 4, R = 5 };
    float x[R * D];
    for (int i = 0; i < R * D; i++) x[i] = (float)(i - 7) * 0.375f;
    uint8_t present[1] = {0};
    comm_mask_set(present, 0);
    comm_mask_set(present, 2);
    comm_mask_set(present, 3);
    int32_t slot[R] = {0, 1, 2, 3, 4}, pos[R] = {7, 7, 8, 0, 100},
            token[R] = {1, 403, 407, 261, 378};
    uint8_t flags[R] = {STAGE_ROW_PROMPT, 0, STAGE_ROW_NEED_LOGITS,
                        STAGE_ROW_PROMPT | STAGE_ROW_NEED_LOGITS, 0};
    comm_bypass bp[2] = {{0, 2}, {1, 3}};
    uint8_t buf[4096];
    static const char *dt_name[3] = {"f32", "bf16", "f16"};
    for (int dt = 0; dt < 3; dt++) {
        comm_packet p = {.kind = COMM_PKT_ROWS,
                         .mb = 42,
                         .sender = 0,
                         .receiver = 1,
                         .mb_rows = R,
                         .n_rows = 3,
                         .dtype = (stage_dtype)dt,
                         .present = present,
                         .has_desc = 1,
                         .rows.slot = slot,
                         .rows.pos = pos,
                         .rows.token = token,
                         .rows.flags = flags,
                         .n_bypass = 2,
                         .bypass = bp};
        char name[64];
        snprintf(name, sizeof name, "rows-chain-%s", dt_name[dt]);
        put(name, D, buf, pack(&p, x, D, NULL, buf, sizeof buf));
    }
    comm_packet nc = {.kind = COMM_PKT_ROWS,
                      .mb = 3,
                      .sender = 0,
                      .receiver = 2,
                      .mb_rows = R,
                      .n_rows = 3,
                      .dtype = STAGE_F32,
                      .present = present};
    put("rows-bypass", D, buf, pack(&nc, x, D, NULL, buf, sizeof buf));
    /* a chain packet with the per-row sampling state and slot releases (the server's) */
    {
        float temp[R] = {0, 0.7f, 1.0f, 0, 2.5f}, top_p[R] = {1, 0.9f, 1, 1, 0.5f};
        uint64_t seed[R] = {0, 42, 7, 0, UINT64_MAX}, seq[R] = {0, 1, 2, 3, 4};
        uint32_t step[R] = {0, 3, 0, 9, 1};
        int32_t target[R] = {-1, 403, -1, 2, 511};
        uint8_t sflags[R] = {STAGE_ROW_PROMPT, STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE,
                             STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE,
                             STAGE_ROW_PROMPT | STAGE_ROW_NEED_LOGITS, 0};
        int32_t rel[3] = {5, 0, 17};
        comm_packet sp = {.kind = COMM_PKT_ROWS,
                          .mb = 1000,
                          .sender = 0,
                          .receiver = 1,
                          .mb_rows = R,
                          .n_rows = 3,
                          .dtype = STAGE_BF16,
                          .present = present,
                          .has_desc = 1,
                          .rows.slot = slot,
                          .rows.pos = pos,
                          .rows.token = token,
                          .rows.flags = sflags,
                          .rows.temperature = temp,
                          .rows.top_p = top_p,
                          .rows.seed = seed,
                          .rows.seq = seq,
                          .rows.step = step,
                          .rows.target = target,
                          .rows.n_release = 3,
                          .rows.release = rel};
        put("rows-chain-sampling", D, buf, pack(&sp, x, D, NULL, buf, sizeof buf));
    }
    uint8_t none[1] = {0};
    comm_packet empty = {.kind = COMM_PKT_ROWS,
                         .mb = 4,
                         .sender = 1,
                         .receiver = 2,
                         .mb_rows = 0,
                         .n_rows = 0,
                         .present = none,
                         .has_desc = 1,
                         .rows.slot = slot,
                         .rows.pos = pos,
                         .rows.token = token,
                         .rows.flags = flags};
    put("rows-empty-chain", D, buf, pack(&empty, x, D, NULL, buf, sizeof buf));
    const int32_t tok[3] = {5, 0, 2147483647};
    comm_packet tp = {.kind = COMM_PKT_TOKENS,
                      .mb = 9,
                      .sender = 2,
                      .receiver = 0,
                      .mb_rows = R,
                      .n_rows = 3,
                      .present = present};
    size_t n = pack(&tp, NULL, 0, tok, buf, sizeof buf);
    put("tokens", 1, buf, n);
    /* the bug: a TOKENS packet whose payload is shorter than n_rows * 4 */
    put("tokens-short-payload", 1, buf, n - 4);
    comm_packet end = {.kind = COMM_PKT_END,
                       .mb = 77,
                       .sender = 0,
                       .receiver = 1,
                       .mb_rows = 3,
                       .n_rows = 0,
                       .present = none};
    put("end", 1, buf, pack(&end, NULL, 0, NULL, buf, sizeof buf));
    printf("make_seeds: wrote %d seeds to %s\n", n_written, OUT);
    return 0;
}
