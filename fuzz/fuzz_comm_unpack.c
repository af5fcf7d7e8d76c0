/* fuzz/fuzz_comm_unpack.c — libFuzzer target: the packet unpacker (comm/comm.h).
 *
 * Input: one byte choosing the row width D (1..16), then the packet. Checked beyond "no
 * crash": a failed comm_unpack leaves *out all zero (the contract; a fuzz run found it broken
 * for short TOKENS payloads); a decoded packet scatters inside its buffers, packs again with
 * comm_pack, and that packet decodes to the same fields (descriptor, sampling state, slot
 * releases, bypass list) and, for f32 rows and tokens, the same payload bytes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_ROWS 64
#define N_STAGES 8

static void same_packet(const comm_packet *a, const comm_packet *b)
{
    FUZZ_CHECK(a->kind == b->kind && a->mb == b->mb && a->sender == b->sender &&
               a->receiver == b->receiver && a->mb_rows == b->mb_rows && a->n_rows == b->n_rows &&
               a->has_desc == b->has_desc && a->n_bypass == b->n_bypass);
    if (a->kind == COMM_PKT_ROWS) FUZZ_CHECK(a->dtype == b->dtype);
    size_t r = (size_t)a->mb_rows;
    FUZZ_CHECK(memcmp(a->present, b->present, comm_mask_bytes(a->mb_rows)) == 0);
    if (a->has_desc) {
        FUZZ_CHECK(memcmp(a->rows.slot, b->rows.slot, r * 4) == 0 &&
                   memcmp(a->rows.pos, b->rows.pos, r * 4) == 0 &&
                   memcmp(a->rows.token, b->rows.token, r * 4) == 0 &&
                   memcmp(a->rows.flags, b->rows.flags, r) == 0);
        /* comm_unpack sets all six sampling arrays on a descriptor */
        FUZZ_CHECK(a->rows.temperature && a->rows.top_p && a->rows.seed && a->rows.seq &&
                   a->rows.step && a->rows.target);
        FUZZ_CHECK(memcmp(a->rows.temperature, b->rows.temperature, r * 4) == 0 &&
                   memcmp(a->rows.top_p, b->rows.top_p, r * 4) == 0 &&
                   memcmp(a->rows.seed, b->rows.seed, r * 8) == 0 &&
                   memcmp(a->rows.seq, b->rows.seq, r * 8) == 0 &&
                   memcmp(a->rows.step, b->rows.step, r * 4) == 0 &&
                   memcmp(a->rows.target, b->rows.target, r * 4) == 0);
        FUZZ_CHECK(a->rows.n_release == b->rows.n_release &&
                   (a->rows.n_release == 0 ||
                    memcmp(a->rows.release, b->rows.release, (size_t)a->rows.n_release * 4) == 0));
    }
    for (int k = 0; k < a->n_bypass; k++)
        FUZZ_CHECK(a->bypass[k].from == b->bypass[k].from && a->bypass[k].to == b->bypass[k].to);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static comm_unpacker *u, *u2;
    if (!u) {
        u = comm_unpacker_init(MAX_ROWS, N_STAGES);
        u2 = comm_unpacker_init(MAX_ROWS, N_STAGES);
        FUZZ_CHECK(u && u2);
    }
    if (size < 1) return 0;
    int D = 1 + data[0] % 16;
    const uint8_t *buf = data + 1;
    size_t len = size - 1;
    comm_packet p;
    memset(&p, 0xA5, sizeof p);
    char err[512];
    if (comm_unpack(u, buf, len, D, &p, err, sizeof err)) {
        comm_packet z;
        memset(&z, 0, sizeof z);
        FUZZ_CHECK(memcmp(&p, &z, sizeof p) == 0);
        return 0;
    }
    FUZZ_CHECK(p.mb_rows <= MAX_ROWS && p.n_rows == comm_mask_count(p.present, p.mb_rows));
    static float x[MAX_ROWS * 16];
    static int32_t tokv[MAX_ROWS];
    memset(x, 0, sizeof x);
    if (p.kind == COMM_PKT_ROWS) comm_scatter_rows(&p, D, x);
    if (p.kind == COMM_PKT_TOKENS) {
        comm_scatter_tokens(&p, tokv);
        for (int k = 0; k < p.n_rows; k++) tokv[k] = comm_packet_token(&p, k);
    }
    /* pack again: F32 rows and tokens must come out byte for byte */
    static uint8_t out[1 << 16];
    size_t hb, pb;
    size_t total = comm_pack(&p, x, D, tokv, out, sizeof out, &hb, &pb, err, sizeof err);
    FUZZ_CHECK(total > 0);
    FUZZ_CHECK(pb == p.payload_bytes);
    comm_packet q;
    FUZZ_CHECK(comm_unpack(u2, out, total, D, &q, err, sizeof err) == 0);
    same_packet(&p, &q);
    if (p.kind == COMM_PKT_TOKENS || (p.kind == COMM_PKT_ROWS && p.dtype == STAGE_F32))
        FUZZ_CHECK(memcmp(p.payload, q.payload, pb) == 0);
    return 0;
}
