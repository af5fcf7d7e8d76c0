/* tests/comm_util.h — what the packet tests share (tests/test_comm.c: bitmasks, wire dtypes,
 * round trips, pack errors; tests/test_comm_unpack.c: hostile input): little-endian helpers,
 * a deterministic generator, the packet fixture (10 rows, rows {0,3,4,9} present) and the
 * pack-failure expectation. Static inline: each test takes what it uses.
 */
#ifndef TESTS_COMM_UTIL_H
#define TESTS_COMM_UTIL_H

#include <CUnit/Basic.h>
#include <malloc.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm/comm.h"
#include "modpipe.pb-c.h"
#include "stage/convert.h"
#include "tests/testutil.h"

static inline uint32_t get_u32le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline void put_u32le(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Deterministic generator for the fuzz loops (xorshift64*). */
static uint64_t rng_state;
static inline uint64_t rng_next(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

/* ---- packet builders ------------------------------------------------------------------------- */

enum { S4 = 4, MB10 = 10, D5 = 5 };

/* One micro-batch of 10 rows with a descriptor; rows {0,3,4,9} present. */
typedef struct {
    uint8_t present[2];
    int32_t slot[MB10], pos[MB10], token[MB10];
    uint8_t flags[MB10];
    comm_bypass bypass[3];
    float x[MB10 * D5]; /* [mb_rows][D] */
    comm_packet p;
} fixture;

static inline void fixture_init(fixture *f, stage_dtype dtype)
{
    memset(f, 0, sizeof *f);
    const int rows[] = {0, 3, 4, 9};
    for (int k = 0; k < 4; k++) comm_mask_set(f->present, rows[k]);
    for (int i = 0; i < MB10; i++) {
        f->slot[i] = i % 3;
        f->pos[i] = 100 + 37 * i; /* some two-byte varints */
        f->token[i] = 1000 * i + 7;
        f->flags[i] = (uint8_t)(i % 4);
        for (int j = 0; j < D5; j++) f->x[i * D5 + j] = 0.37f * (float)(i * D5 + j) - 3.1f;
    }
    f->bypass[0] = (comm_bypass){0, 2};
    f->bypass[1] = (comm_bypass){0, 3};
    f->bypass[2] = (comm_bypass){1, 3};
    comm_packet *p = &f->p;
    p->kind = COMM_PKT_ROWS;
    p->mb = 42;
    p->sender = 1;
    p->receiver = 2;
    p->mb_rows = MB10;
    p->n_rows = 4;
    p->dtype = dtype;
    p->present = f->present;
    p->has_desc = 1;
    p->rows.slot = f->slot;
    p->rows.pos = f->pos;
    p->rows.token = f->token;
    p->rows.flags = f->flags;
    p->n_bypass = 3;
    p->bypass = f->bypass;
}

/* The protobuf packed size of the header inside a packed packet, measured independently
 * (system allocator: this is the test, not the engine). */
static inline size_t reference_header_size(const uint8_t *buf, size_t len)
{
    size_t H = get_u32le(buf);
    Modpipe__PacketHeader *h = modpipe__packet_header__unpack(NULL, H, buf + 4);
    if (!h) return 0;
    size_t n = modpipe__packet_header__get_packed_size(h);
    modpipe__packet_header__free_unpacked(h, NULL);
    (void)len;
    return n;
}

static inline void assert_same_header(const comm_packet *a, const comm_packet *b)
{
    CU_ASSERT_EQUAL(a->kind, b->kind);
    CU_ASSERT_EQUAL(a->mb, b->mb);
    CU_ASSERT_EQUAL(a->sender, b->sender);
    CU_ASSERT_EQUAL(a->receiver, b->receiver);
    CU_ASSERT_EQUAL(a->mb_rows, b->mb_rows);
    CU_ASSERT_EQUAL(a->n_rows, b->n_rows);
    CU_ASSERT_EQUAL(a->dtype, b->dtype);
    CU_ASSERT_EQUAL(memcmp(a->present, b->present, comm_mask_bytes(a->mb_rows)), 0);
    CU_ASSERT_EQUAL(a->has_desc, b->has_desc);
    if (a->has_desc && b->has_desc) {
        size_t r = (size_t)a->mb_rows;
        CU_ASSERT_EQUAL(memcmp(a->rows.slot, b->rows.slot, r * 4), 0);
        CU_ASSERT_EQUAL(memcmp(a->rows.pos, b->rows.pos, r * 4), 0);
        CU_ASSERT_EQUAL(memcmp(a->rows.token, b->rows.token, r * 4), 0);
        CU_ASSERT_EQUAL(memcmp(a->rows.flags, b->rows.flags, r), 0);
    }
    CU_ASSERT_EQUAL(a->n_bypass, b->n_bypass);
    if (a->n_bypass == b->n_bypass)
        for (int k = 0; k < a->n_bypass; k++) {
            CU_ASSERT_EQUAL(a->bypass[k].from, b->bypass[k].from);
            CU_ASSERT_EQUAL(a->bypass[k].to, b->bypass[k].to);
        }
}

/* ---- pack errors: the expectation both test files use ---------------------------------------- */

static inline void expect_pack_fail(const comm_packet *p, const float *x, int D, const int32_t *tok,
                                    const char *what)
{
    uint8_t buf[4096];
    char err[256] = "";
    size_t hb = 1, pb = 1;
    size_t n = comm_pack(p, x, D, tok, buf, sizeof buf, &hb, &pb, err, sizeof err);
    CU_ASSERT_EQUAL(n, 0);
    CU_ASSERT(err[0] != 0);
    if (!strstr(err, what)) fprintf(stderr, "\n  pack: want \"%s\" in \"%s\"\n", what, err);
    CU_ASSERT(strstr(err, what) != NULL);
}

#endif
