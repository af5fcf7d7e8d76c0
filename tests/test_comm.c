/* tests/test_comm.c — the packet layer of comm/ (comm.h, docs/SPEC.md §4): bitmasks, wire
 * dtypes, pack -> unpack -> scatter round trips with exact byte sizes, pack errors. Hostile
 * input to the unpacker: tests/test_comm_unpack.c; shared helpers: tests/comm_util.h. */
#include "tests/comm_util.h"

/* ---- bitmasks -------------------------------------------------------------------------------- */

static void test_mask(void)
{
    CU_ASSERT_EQUAL(comm_mask_bytes(0), 0);
    CU_ASSERT_EQUAL(comm_mask_bytes(1), 1);
    CU_ASSERT_EQUAL(comm_mask_bytes(8), 1);
    CU_ASSERT_EQUAL(comm_mask_bytes(9), 2);
    uint8_t m[3] = {0};
    comm_mask_set(m, 0);
    comm_mask_set(m, 7);
    comm_mask_set(m, 8);
    comm_mask_set(m, 17);
    CU_ASSERT_EQUAL(m[0], 0x81);
    CU_ASSERT_EQUAL(m[1], 0x01);
    CU_ASSERT_EQUAL(m[2], 0x02);
    CU_ASSERT_EQUAL(comm_mask_get(m, 0), 1);
    CU_ASSERT_EQUAL(comm_mask_get(m, 1), 0);
    CU_ASSERT_EQUAL(comm_mask_get(m, 7), 1);
    CU_ASSERT_EQUAL(comm_mask_get(m, 8), 1);
    CU_ASSERT_EQUAL(comm_mask_get(m, 16), 0);
    CU_ASSERT_EQUAL(comm_mask_get(m, 17), 1);
    CU_ASSERT_EQUAL(comm_mask_count(m, 18), 4);
    CU_ASSERT_EQUAL(comm_mask_count(m, 17), 3); /* bit 17 is past n */
    CU_ASSERT_EQUAL(comm_mask_count(m, 8), 2);
    CU_ASSERT_EQUAL(comm_mask_count(m, 1), 1);
    CU_ASSERT_EQUAL(comm_mask_count(m, 0), 0);
    m[2] |= 0x80; /* a bit past n never counts */
    CU_ASSERT_EQUAL(comm_mask_count(m, 18), 4);
    uint8_t full[4] = {0xff, 0xff, 0xff, 0xff};
    CU_ASSERT_EQUAL(comm_mask_count(full, 32), 32);
    CU_ASSERT_EQUAL(comm_mask_count(full, 27), 27);
}

/* ---- wire dtypes ----------------------------------------------------------------------------- */

static void test_wire_names(void)
{
    CU_ASSERT_EQUAL(stage_dtype_size(STAGE_F32), 4);
    CU_ASSERT_EQUAL(stage_dtype_size(STAGE_BF16), 2);
    CU_ASSERT_EQUAL(stage_dtype_size(STAGE_F16), 2);
    CU_ASSERT_STRING_EQUAL(stage_dtype_name(STAGE_F32), "f32");
    CU_ASSERT_STRING_EQUAL(stage_dtype_name(STAGE_BF16), "bf16");
    CU_ASSERT_STRING_EQUAL(stage_dtype_name(STAGE_F16), "f16");
    stage_dtype d = STAGE_F32;
    CU_ASSERT_EQUAL(stage_dtype_parse("bf16", &d), 0);
    CU_ASSERT_EQUAL(d, STAGE_BF16);
    CU_ASSERT_EQUAL(stage_dtype_parse("f16", &d), 0);
    CU_ASSERT_EQUAL(d, STAGE_F16);
    CU_ASSERT_EQUAL(stage_dtype_parse("f32", &d), 0);
    CU_ASSERT_EQUAL(d, STAGE_F32);
    CU_ASSERT_EQUAL(stage_dtype_parse("f64", &d), -1);
    CU_ASSERT_EQUAL(stage_dtype_parse("", &d), -1);
    CU_ASSERT_EQUAL(stage_dtype_parse("bf16 ", &d), -1);
    CU_ASSERT_EQUAL(stage_dtype_parse(NULL, &d), -1);
    CU_ASSERT_EQUAL(d, STAGE_F32); /* untouched on failure */
}

static void test_wire_f32(void)
{
    const float v[] = {0.0f,   -0.0f,           1.0f,     -2.5f,     0.1f, 3.4028235e38f,
                       1e-45f, 1.17549435e-38f, INFINITY, -INFINITY, NAN};
    const size_t n = sizeof v / sizeof v[0];
    uint8_t raw[4 * 16 + 1];
    float back[16];
    stage_dtype_from_f32(STAGE_F32, v, raw + 1, n); /* odd offset: payloads are unaligned */
    stage_dtype_to_f32(STAGE_F32, raw + 1, back, n);
    for (size_t i = 0; i < n; i++) CU_ASSERT_EQUAL(f32_bits(back[i]), f32_bits(v[i]));
    /* little-endian: 1.0f = 0x3f800000 at bytes 8..11 */
    CU_ASSERT_EQUAL(raw[1 + 8], 0x00);
    CU_ASSERT_EQUAL(raw[1 + 9], 0x00);
    CU_ASSERT_EQUAL(raw[1 + 10], 0x80);
    CU_ASSERT_EQUAL(raw[1 + 11], 0x3f);
}

struct wire_case {
    float in;
    uint16_t bits; /* expected wire value */
    float out;     /* expected decoded value */
};

static void check_wire_cases(stage_dtype d, const struct wire_case *c, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint8_t raw[3];
        float back;
        stage_dtype_from_f32(d, &c[i].in, raw + 1, 1);
        uint16_t bits = (uint16_t)(raw[1] | raw[2] << 8);
        if (bits != c[i].bits)
            fprintf(stderr, "\n  %s(%.9g): got 0x%04x want 0x%04x\n", stage_dtype_name(d),
                    (double)c[i].in, bits, c[i].bits);
        CU_ASSERT_EQUAL(bits, c[i].bits);
        stage_dtype_to_f32(d, raw + 1, &back, 1);
        CU_ASSERT_EQUAL(f32_bits(back), f32_bits(c[i].out));
    }
}

static void test_wire_bf16(void)
{
    const struct wire_case c[] = {
        {1.0f, 0x3f80, 1.0f},
        {-2.5f, 0xc020, -2.5f},
        {0.0f, 0x0000, 0.0f},
        {-0.0f, 0x8000, -0.0f},
        {65504.0f, 0x4780, 65536.0f},                        /* 0x477fe000 rounds up */
        {1.0f + 0x1p-8f, 0x3f80, 1.0f},                      /* tie -> even (down) */
        {1.0f + 3 * 0x1p-8f, 0x3f82, 1.0f + 0x1p-6f},        /* tie -> even (up) */
        {1.0f + 0x1p-8f + 0x1p-20f, 0x3f81, 1.0f + 0x1p-7f}, /* just above the tie */
        {3.4028235e38f, 0x7f80, INFINITY},                   /* max float overflows */
        {INFINITY, 0x7f80, INFINITY},
        {-INFINITY, 0xff80, -INFINITY},
    };
    check_wire_cases(STAGE_BF16, c, sizeof c / sizeof c[0]);
    uint8_t raw[2];
    float nan = NAN, back;
    stage_dtype_from_f32(STAGE_BF16, &nan, raw, 1);
    stage_dtype_to_f32(STAGE_BF16, raw, &back, 1);
    CU_ASSERT(isnan(back));
    /* byte order: 1.0 is 0x3f80 -> 80 3f */
    float one = 1.0f;
    stage_dtype_from_f32(STAGE_BF16, &one, raw, 1);
    CU_ASSERT(raw[0] == 0x80 && raw[1] == 0x3f);
}

static void test_wire_f16(void)
{
    const struct wire_case c[] = {
        {1.0f, 0x3c00, 1.0f},
        {-2.5f, 0xc100, -2.5f},
        {65504.0f, 0x7bff, 65504.0f}, /* f16 max */
        {65519.0f, 0x7bff, 65504.0f}, /* below the overflow tie */
        {65520.0f, 0x7c00, INFINITY}, /* the tie rounds to inf */
        {-1e6f, 0xfc00, -INFINITY},
        {0x1p-14f, 0x0400, 0x1p-14f}, /* smallest normal */
        {0x1p-24f, 0x0001, 0x1p-24f}, /* smallest subnormal */
        {1e-8f, 0x0000, 0.0f},        /* < half the smallest subnormal */
        {-1e-8f, 0x8000, -0.0f},
        {6e-8f, 0x0001, 0x1p-24f},
        {1e-7f, 0x0002, 0x1p-23f},
        {1e-5f, 0x00a8, 168 * 0x1p-24f},               /* subnormal 168 x 2^-24 */
        {0x1p-25f, 0x0000, 0.0f},                      /* tie 0 | 1 -> even 0 */
        {3 * 0x1p-25f, 0x0002, 0x1p-23f},              /* tie 1 | 2 -> even 2 */
        {1.0f + 0x1p-11f, 0x3c00, 1.0f},               /* tie -> even (down) */
        {1.0f + 3 * 0x1p-11f, 0x3c02, 1.0f + 0x1p-9f}, /* tie -> even (up) */
        {2049.0f, 0x6800, 2048.0f},
        {2051.0f, 0x6802, 2052.0f},
        {0x1p-14f - 0x1p-25f, 0x0400, 0x1p-14f}, /* subnormal rounds up to normal */
    };
    check_wire_cases(STAGE_F16, c, sizeof c / sizeof c[0]);
    uint8_t raw[2];
    float nan = NAN, back;
    stage_dtype_from_f32(STAGE_F16, &nan, raw, 1);
    stage_dtype_to_f32(STAGE_F16, raw, &back, 1);
    CU_ASSERT(isnan(back));
    float v = -2.5f;
    stage_dtype_from_f32(STAGE_F16, &v, raw, 1);
    CU_ASSERT(raw[0] == 0x00 && raw[1] == 0xc1);
}

/* ---- round trips ----------------------------------------------------------------------------- */

static void roundtrip_rows(const fixture *f, int D, int n_stages)
{
    const comm_packet *p = &f->p;
    size_t cap = comm_packet_max_bytes(p->mb_rows, D, n_stages);
    CU_ASSERT_FATAL(cap > 0);
    uint8_t *buf = malloc(cap);
    char err[256] = "";
    size_t hb = 0, pb = 0;
    size_t total = comm_pack(p, f->x, D, NULL, buf, cap, &hb, &pb, err, sizeof err);
    if (!total) fprintf(stderr, "\n  pack: %s\n", err);
    CU_ASSERT_FATAL(total > 0);
    size_t ws = stage_dtype_size(p->dtype);
    CU_ASSERT_EQUAL(pb, (size_t)p->n_rows * (size_t)D * ws);
    CU_ASSERT_EQUAL(hb, 4 + (size_t)get_u32le(buf));
    CU_ASSERT_EQUAL(hb, 4 + reference_header_size(buf, total));
    CU_ASSERT_EQUAL(total, hb + pb);
    CU_ASSERT(total <= cap);

    comm_unpacker *u = comm_unpacker_init(16, n_stages);
    CU_ASSERT_FATAL(u != NULL);
    comm_packet q;
    int rc = comm_unpack(u, buf, total, D, &q, err, sizeof err);
    if (rc) fprintf(stderr, "\n  unpack: %s\n", err);
    CU_ASSERT_FATAL(rc == 0);
    assert_same_header(p, &q);
    CU_ASSERT_PTR_EQUAL(q.payload, buf + hb);
    CU_ASSERT_EQUAL(q.payload_bytes, pb);
    if (!p->has_desc) {
        CU_ASSERT_PTR_NULL(q.rows.slot);
        CU_ASSERT_PTR_NULL(q.bypass);
    }

    float *y = malloc((size_t)p->mb_rows * (size_t)D * sizeof *y); /* [mb_rows][D] */
    for (int i = 0; i < p->mb_rows * D; i++) y[i] = 777.0f;
    comm_scatter_rows(&q, D, y);
    for (int i = 0; i < p->mb_rows; i++)
        for (int j = 0; j < D; j++) {
            float v = f->x[i * D + j], want = 777.0f;
            if (comm_mask_get(p->present, i)) {
                switch (p->dtype) {
                case STAGE_F32: want = v; break;
                case STAGE_BF16: want = stage_bf16_to_f32(stage_f32_to_bf16(v)); break;
                case STAGE_F16: want = stage_f16_to_f32(stage_f32_to_f16(v)); break;
                case STAGE_Q8_0: break; /* a weight dtype, never on the wire */
                }
            }
            CU_ASSERT_EQUAL(f32_bits(y[i * D + j]), f32_bits(want));
        }
    free(y);
    comm_unpacker_free(u);
    free(buf);
}

static void test_rows_chain(void)
{
    const stage_dtype d[] = {STAGE_F32, STAGE_BF16, STAGE_F16};
    for (int k = 0; k < 3; k++) {
        fixture f;
        fixture_init(&f, d[k]);
        roundtrip_rows(&f, D5, S4);
    }
}

static void test_rows_non_chain(void)
{
    const stage_dtype d[] = {STAGE_F32, STAGE_BF16, STAGE_F16};
    for (int k = 0; k < 3; k++) {
        fixture f;
        fixture_init(&f, d[k]);
        f.p.sender = 0;
        f.p.receiver = 3; /* a bypass packet: no descriptor, no bypass list */
        f.p.has_desc = 0;
        f.p.rows.slot = f.p.rows.pos = f.p.rows.token = NULL;
        f.p.rows.flags = NULL;
        f.p.n_bypass = 0;
        f.p.bypass = NULL;
        roundtrip_rows(&f, D5, S4);
    }
}

/* The exact header of an empty chain packet of 8 rows, computed by hand:
 * 7 required varint fields of 1-byte values (2 bytes each) = 14, present (tag, len, 1) = 3,
 * desc (tag, len) = 2 + 3 packed arrays of 8 one-byte values (tag, len, 8) = 30 + flags
 * (tag, len, 8) = 10 -> 59 bytes, plus the 4-byte prefix = 63. */
static void test_empty_chain(void)
{
    uint8_t present[1] = {0}, flags[8];
    int32_t slot[8], pos[8], token[8];
    for (int i = 0; i < 8; i++) {
        slot[i] = i;
        pos[i] = i;
        token[i] = i + 1;
        flags[i] = STAGE_ROW_PROMPT;
    }
    comm_packet p = {.kind = COMM_PKT_ROWS,
                     .mb = 1,
                     .sender = 0,
                     .receiver = 1,
                     .mb_rows = 8,
                     .n_rows = 0,
                     .dtype = STAGE_F32,
                     .present = present,
                     .has_desc = 1,
                     .rows.slot = slot,
                     .rows.pos = pos,
                     .rows.token = token,
                     .rows.flags = flags};
    uint8_t buf[512];
    char err[256] = "";
    size_t hb, pb;
    size_t total = comm_pack(&p, NULL, 16, NULL, buf, sizeof buf, &hb, &pb, err, sizeof err);
    CU_ASSERT_EQUAL(total, 63);
    CU_ASSERT_EQUAL(hb, 63);
    CU_ASSERT_EQUAL(pb, 0);
    CU_ASSERT_EQUAL(hb, 4 + reference_header_size(buf, total));
    comm_unpacker *u = comm_unpacker_init(8, 2);
    comm_packet q;
    CU_ASSERT_FATAL(comm_unpack(u, buf, total, 16, &q, err, sizeof err) == 0);
    assert_same_header(&p, &q);
    CU_ASSERT_EQUAL(q.payload_bytes, 0);
    float y[8 * 16];
    for (int i = 0; i < 8 * 16; i++) y[i] = 5.0f;
    comm_scatter_rows(&q, 16, y); /* nothing present: nothing written */
    for (int i = 0; i < 8 * 16; i++) CU_ASSERT_EQUAL(y[i], 5.0f);

    /* mb_rows 0: an empty micro-batch still decodes, with non-NULL (empty) arrays */
    comm_packet e = {.kind = COMM_PKT_ROWS,
                     .mb = 2,
                     .sender = 0,
                     .receiver = 1,
                     .mb_rows = 0,
                     .n_rows = 0,
                     .dtype = STAGE_BF16,
                     .has_desc = 1};
    total = comm_pack(&e, NULL, 16, NULL, buf, sizeof buf, &hb, &pb, err, sizeof err);
    CU_ASSERT_FATAL(total > 0);
    CU_ASSERT_EQUAL(hb, 4 + reference_header_size(buf, total));
    CU_ASSERT_EQUAL(pb, 0);
    CU_ASSERT_FATAL(comm_unpack(u, buf, total, 16, &q, err, sizeof err) == 0);
    CU_ASSERT_EQUAL(q.mb_rows, 0);
    CU_ASSERT_EQUAL(q.has_desc, 1);
    CU_ASSERT(q.present && q.rows.slot && q.rows.pos && q.rows.token && q.rows.flags);
    printf("\n  empty chain packet, 8 rows: %zu header bytes; 0 rows: %zu\n", (size_t)63, hb);
    comm_unpacker_free(u);
}

static void test_tokens(void)
{
    uint8_t present[1] = {0};
    comm_mask_set(present, 0);
    comm_mask_set(present, 2);
    comm_mask_set(present, 5);
    const int32_t tok[3] = {5, 0, 2147483647};
    comm_packet p = {.kind = COMM_PKT_TOKENS,
                     .mb = 9,
                     .sender = 2,
                     .receiver = 0,
                     .mb_rows = 6,
                     .n_rows = 3,
                     .present = present};
    uint8_t buf[256];
    char err[256] = "";
    size_t hb, pb;
    size_t total = comm_pack(&p, NULL, 0, tok, buf, sizeof buf, &hb, &pb, err, sizeof err);
    CU_ASSERT_FATAL(total > 0);
    CU_ASSERT_EQUAL(pb, 12);
    CU_ASSERT(total <= comm_packet_max_bytes(6, 0, 3)); /* D 0: a tokens-only buffer */
    CU_ASSERT_EQUAL(hb, 4 + reference_header_size(buf, total));
    CU_ASSERT_EQUAL(total, hb + pb);
    CU_ASSERT(buf[hb] == 5 && buf[hb + 1] == 0 && buf[hb + 2] == 0 && buf[hb + 3] == 0);
    comm_unpacker *u = comm_unpacker_init(8, 3);
    comm_packet q;
    int rc = comm_unpack(u, buf, total, 123 /* D: ignored for TOKENS */, &q, err, sizeof err);
    CU_ASSERT_FATAL(rc == 0);
    assert_same_header(&p, &q);
    CU_ASSERT_EQUAL(q.payload_bytes, 12);
    for (int k = 0; k < 3; k++) CU_ASSERT_EQUAL(comm_packet_token(&q, k), tok[k]);
    int32_t all[6] = {-1, -1, -1, -1, -1, -1};
    comm_scatter_tokens(&q, all);
    const int32_t want[6] = {5, -1, 0, -1, -1, 2147483647};
    CU_ASSERT_EQUAL(memcmp(all, want, sizeof want), 0);
    comm_unpacker_free(u);
}

static void test_end(void)
{
    uint8_t present[1] = {0};
    comm_packet p = {.kind = COMM_PKT_END,
                     .mb = 77,
                     .sender = 0,
                     .receiver = 1,
                     .mb_rows = 3,
                     .n_rows = 0,
                     .present = present};
    uint8_t buf[128];
    char err[256] = "";
    size_t hb, pb;
    size_t total = comm_pack(&p, NULL, 0, NULL, buf, sizeof buf, &hb, &pb, err, sizeof err);
    CU_ASSERT_FATAL(total > 0);
    CU_ASSERT_EQUAL(pb, 0);
    CU_ASSERT_EQUAL(total, hb);
    CU_ASSERT_EQUAL(hb, 4 + reference_header_size(buf, total));
    comm_unpacker *u = comm_unpacker_init(4, 2);
    comm_packet q;
    CU_ASSERT_FATAL(comm_unpack(u, buf, total, 8, &q, err, sizeof err) == 0);
    assert_same_header(&p, &q);
    CU_ASSERT_EQUAL(q.payload_bytes, 0);
    /* an END with no rows at all */
    comm_packet e = {.kind = COMM_PKT_END, .sender = 1, .receiver = 0};
    total = comm_pack(&e, NULL, 0, NULL, buf, sizeof buf, &hb, &pb, err, sizeof err);
    CU_ASSERT_FATAL(total > 0);
    CU_ASSERT_EQUAL(total, 4 + 14 + 2); /* 7 one-byte varint fields + empty present */
    CU_ASSERT_FATAL(comm_unpack(u, buf, total, 8, &q, err, sizeof err) == 0);
    CU_ASSERT_EQUAL(q.kind, COMM_PKT_END);
    comm_unpacker_free(u);
}

/* comm.h: a failed comm_unpack zeroes *out. The fuzzer found TOKENS packets with a payload
 * shorter than n_rows * 4 leaving kind, mb, n_rows and present set: check that case (the
 * header decodes and passes every header check; only the payload length is wrong) and every
 * other truncation, starting from a packet filled with garbage. */
static int packet_is_zero(const comm_packet *q)
{
    comm_packet z;
    memset(&z, 0, sizeof z);
    return memcmp(q, &z, sizeof z) == 0;
}

static void test_unpack_failure_zeroes(void)
{
    uint8_t present[1] = {0};
    comm_mask_set(present, 0);
    comm_mask_set(present, 3);
    const int32_t tok[2] = {7, 11};
    comm_packet p = {.kind = COMM_PKT_TOKENS,
                     .mb = 42,
                     .sender = 1,
                     .receiver = 0,
                     .mb_rows = 5,
                     .n_rows = 2,
                     .present = present};
    uint8_t buf[128];
    char err[256] = "";
    size_t hb, pb;
    size_t total = comm_pack(&p, NULL, 0, tok, buf, sizeof buf, &hb, &pb, err, sizeof err);
    CU_ASSERT_FATAL(total > 0 && pb == 8);
    comm_unpacker *u = comm_unpacker_init(8, 2);
    CU_ASSERT_FATAL(u != NULL);
    comm_packet q;
    /* payload one int32 short: 2 rows, 4 bytes */
    memset(&q, 0xAB, sizeof q);
    CU_ASSERT(comm_unpack(u, buf, total - 4, 0, &q, err, sizeof err) != 0);
    ASSERT_HAS(err, "TOKENS payload 4 bytes, want 8");
    CU_ASSERT(packet_is_zero(&q));
    CU_ASSERT_EQUAL(q.kind, 0);
    CU_ASSERT_EQUAL(q.mb, 0);
    CU_ASSERT_EQUAL(q.n_rows, 0);
    CU_ASSERT_PTR_NULL(q.present);
    /* every other truncation and one byte too many */
    for (size_t len = 0; len < total; len++) {
        memset(&q, 0xAB, sizeof q);
        CU_ASSERT(comm_unpack(u, buf, len, 0, &q, err, sizeof err) != 0);
        CU_ASSERT(packet_is_zero(&q));
    }
    uint8_t longer[129];
    memcpy(longer, buf, total);
    longer[total] = 0;
    memset(&q, 0xAB, sizeof q);
    CU_ASSERT(comm_unpack(u, longer, total + 1, 0, &q, err, sizeof err) != 0);
    CU_ASSERT(packet_is_zero(&q));
    /* a negative token id in the payload fails after the payload pointer was set */
    uint8_t neg[128];
    memcpy(neg, buf, total);
    put_u32le(neg + hb, 0xFFFFFFFEu); /* -2 (-1 is STAGE_TOKEN_KV_LOST) */
    memset(&q, 0xAB, sizeof q);
    CU_ASSERT(comm_unpack(u, neg, total, 0, &q, err, sizeof err) != 0);
    ASSERT_HAS(err, "negative");
    CU_ASSERT(packet_is_zero(&q));
    /* and the intact packet still decodes */
    CU_ASSERT_FATAL(comm_unpack(u, buf, total, 0, &q, err, sizeof err) == 0);
    CU_ASSERT_EQUAL(q.n_rows, 2);
    CU_ASSERT_EQUAL(comm_packet_token(&q, 1), 11);
    comm_unpacker_free(u);
}

/* The worst valid packet fits comm_packet_max_bytes and the unpacker's arena: every row
 * present with the largest descriptor values, every stage pair in the bypass list. */
static void test_limits(void)
{
    enum { S = 32, R = 64, D = 3 };
    uint8_t present[R / 8], flags[R];
    int32_t big[R];
    float x[R * D];
    static comm_bypass bp[COMM_MAX_BYPASS + 1];
    memset(present, 0xff, sizeof present);
    for (int i = 0; i < R; i++) {
        big[i] = INT32_MAX;
        flags[i] = STAGE_ROW_NEED_LOGITS | STAGE_ROW_PROMPT;
    }
    for (int i = 0; i < R * D; i++) x[i] = (float)i;
    int nb = 0;
    for (int a = 0; a < S; a++)
        for (int b = a + 1; b < S; b++) bp[nb++] = (comm_bypass){a, b};
    CU_ASSERT_EQUAL(nb, S * (S - 1) / 2);
    comm_packet p = {.kind = COMM_PKT_ROWS,
                     .mb = UINT64_MAX,
                     .sender = S - 2,
                     .receiver = S - 1,
                     .mb_rows = R,
                     .n_rows = R,
                     .dtype = STAGE_F32,
                     .present = present,
                     .has_desc = 1,
                     .rows.slot = big,
                     .rows.pos = big,
                     .rows.token = big,
                     .rows.flags = flags,
                     .n_bypass = nb,
                     .bypass = bp};
    size_t cap = comm_packet_max_bytes(R, D, S);
    uint8_t *buf = malloc(cap);
    char err[256] = "";
    size_t hb, pb;
    size_t total = comm_pack(&p, x, D, NULL, buf, cap, &hb, &pb, err, sizeof err);
    if (!total) fprintf(stderr, "\n  pack: %s\n", err);
    CU_ASSERT_FATAL(total > 0);
    CU_ASSERT(total <= cap);
    CU_ASSERT_EQUAL(pb, (size_t)R * D * 4);
    printf("\n  worst packet %d rows, %d stages: %zu bytes (bound %zu)\n", R, S, total, cap);

    comm_unpacker *u = comm_unpacker_init(R, S);
    comm_packet q;
    int rc = comm_unpack(u, buf, total, D, &q, err, sizeof err);
    if (rc) fprintf(stderr, "\n  unpack: %s\n", err);
    CU_ASSERT_FATAL(rc == 0);
    assert_same_header(&p, &q);
    comm_unpacker_free(u);

    /* one row over the unpacker's limit */
    u = comm_unpacker_init(R - 1, S);
    rc = comm_unpack(u, buf, total, D, &q, err, sizeof err);
    CU_ASSERT(rc != 0 && strstr(err, "above the limit"));
    comm_unpacker_free(u);
    /* fewer stages than the packet names */
    u = comm_unpacker_init(R, S - 1);
    rc = comm_unpack(u, buf, total, D, &q, err, sizeof err);
    CU_ASSERT(rc != 0 && strstr(err, "out of range"));
    comm_unpacker_free(u);

    /* more bypass entries than comm_pack's stack scratch */
    for (int k = 0; k <= COMM_MAX_BYPASS; k++) bp[k] = (comm_bypass){k, k + 1};
    p.n_bypass = COMM_MAX_BYPASS + 1;
    err[0] = 0;
    CU_ASSERT_EQUAL(comm_pack(&p, x, D, NULL, buf, cap, &hb, &pb, err, sizeof err), 0);
    CU_ASSERT(strstr(err, "bypass") != NULL);
    free(buf);

    CU_ASSERT_EQUAL(comm_packet_max_bytes(-1, 4, 2), 0);
    CU_ASSERT_PTR_NULL(comm_unpacker_init(-1, 2));
    CU_ASSERT_PTR_NULL(comm_unpacker_init(8, 0));
    comm_unpacker_free(NULL);
}

/* The decoded packet stays valid until the next comm_unpack on the same unpacker, and two
 * unpackers do not share state. */
static void test_lifetime(void)
{
    fixture f, g;
    fixture_init(&f, STAGE_F32);
    fixture_init(&g, STAGE_BF16);
    g.p.mb = 43;
    g.slot[0] = 99;
    size_t cap = comm_packet_max_bytes(MB10, D5, S4);
    uint8_t *a = malloc(cap), *b = malloc(cap);
    char err[256];
    size_t la = comm_pack(&f.p, f.x, D5, NULL, a, cap, NULL, NULL, err, sizeof err);
    size_t lb = comm_pack(&g.p, g.x, D5, NULL, b, cap, NULL, NULL, err, sizeof err);
    CU_ASSERT_FATAL(la && lb);
    comm_unpacker *u1 = comm_unpacker_init(MB10, S4), *u2 = comm_unpacker_init(MB10, S4);
    comm_packet p1, p2, p3;
    CU_ASSERT_FATAL(comm_unpack(u1, a, la, D5, &p1, err, sizeof err) == 0);
    CU_ASSERT_FATAL(comm_unpack(u2, b, lb, D5, &p2, err, sizeof err) == 0);
    assert_same_header(&f.p, &p1); /* u2's decode left u1's packet alone */
    assert_same_header(&g.p, &p2);
    CU_ASSERT_FATAL(comm_unpack(u1, b, lb, D5, &p3, err, sizeof err) == 0);
    assert_same_header(&g.p, &p3);
    CU_ASSERT_EQUAL(p3.rows.slot[0], 99);
    comm_unpacker_free(u1);
    comm_unpacker_free(u2);
    free(a);
    free(b);
}

/* Decoding does not touch the heap (glibc's counters; ASan's allocator reports zeros, which
 * trivially passes). */
static void test_no_malloc(void)
{
    fixture f;
    fixture_init(&f, STAGE_F16);
    size_t cap = comm_packet_max_bytes(MB10, D5, S4);
    uint8_t *buf = malloc(cap);
    char err[256];
    size_t len = comm_pack(&f.p, f.x, D5, NULL, buf, cap, NULL, NULL, err, sizeof err);
    comm_unpacker *u = comm_unpacker_init(MB10, S4);
    comm_packet q;
    CU_ASSERT_FATAL(comm_unpack(u, buf, len, D5, &q, err, sizeof err) == 0);
    struct mallinfo2 before = mallinfo2();
    int fails = 0;
    for (int k = 0; k < 1000; k++) {
        fails += comm_unpack(u, buf, len, D5, &q, err, sizeof err) != 0;
        fails += comm_unpack(u, buf, len - 1, D5, &q, err, sizeof err) == 0;
        fails += comm_pack(&f.p, f.x, D5, NULL, buf, cap, NULL, NULL, err, sizeof err) != len;
    }
    struct mallinfo2 after = mallinfo2();
    CU_ASSERT_EQUAL(fails, 0);
    CU_ASSERT_EQUAL(before.uordblks, after.uordblks);
    CU_ASSERT_EQUAL(before.hblkhd, after.hblkhd);
    comm_unpacker_free(u);
    free(buf);
}

/* ---- pack errors ----------------------------------------------------------------------------- */

static void test_pack_errors(void)
{
    fixture f;
    fixture_init(&f, STAGE_BF16);
    /* every capacity short of the packet fails, the exact one succeeds */
    size_t cap = comm_packet_max_bytes(MB10, D5, S4);
    uint8_t *buf = malloc(cap);
    char err[256];
    size_t need = comm_pack(&f.p, f.x, D5, NULL, buf, cap, NULL, NULL, err, sizeof err);
    CU_ASSERT_FATAL(need > 0);
    for (size_t c = 0; c < need; c++) {
        uint8_t *b = malloc(c ? c : 1);
        err[0] = 0;
        CU_ASSERT_EQUAL(comm_pack(&f.p, f.x, D5, NULL, b, c, NULL, NULL, err, sizeof err), 0);
        CU_ASSERT(strstr(err, "buffer has") != NULL);
        free(b);
    }
    uint8_t *b = malloc(need);
    CU_ASSERT_EQUAL(comm_pack(&f.p, f.x, D5, NULL, b, need, NULL, NULL, err, sizeof err), need);
    CU_ASSERT_EQUAL(memcmp(b, buf, need), 0);
    free(b);
    free(buf);

    comm_packet p;
    p = f.p;
    p.n_rows = 3;
    expect_pack_fail(&p, f.x, D5, NULL, "n_rows says");
    p = f.p;
    p.n_rows = 11;
    expect_pack_fail(&p, f.x, D5, NULL, "n_rows 11");
    p = f.p;
    p.has_desc = 0;
    expect_pack_fail(&p, f.x, D5, NULL, "without a descriptor");
    p = f.p;
    p.receiver = 3;
    expect_pack_fail(&p, f.x, D5, NULL, "with a descriptor");
    p = f.p;
    p.receiver = 0;
    expect_pack_fail(&p, f.x, D5, NULL, "forward");
    p = f.p;
    p.sender = -1;
    expect_pack_fail(&p, f.x, D5, NULL, "out of range");
    p = f.p;
    p.dtype = (stage_dtype)3;
    expect_pack_fail(&p, f.x, D5, NULL, "dtype");
    p = f.p;
    p.kind = (comm_pkt_kind)3;
    expect_pack_fail(&p, f.x, D5, NULL, "kind");
    p = f.p;
    expect_pack_fail(&p, f.x, 0, NULL, "D > 0");
    p = f.p;
    expect_pack_fail(&p, NULL, D5, NULL, "needs x");
    p = f.p;
    p.n_bypass = -1;
    expect_pack_fail(&p, f.x, D5, NULL, "bypass");
    int32_t neg[MB10];
    memcpy(neg, f.pos, sizeof neg);
    neg[9] = -5;
    p = f.p;
    p.rows.pos = neg;
    expect_pack_fail(&p, f.x, D5, NULL, "negative");
    uint8_t fl[MB10] = {0};
    fl[2] = 16;
    p = f.p;
    p.rows.flags = fl;
    expect_pack_fail(&p, f.x, D5, NULL, "flags");
    int32_t sh[3] = {1, 2, 0}; /* a prefix share of no position */
    p = f.p;
    p.rows.n_share = 1;
    p.rows.share = sh;
    expect_pack_fail(&p, f.x, D5, NULL, "share of slot 1");
    p.rows.n_share = STAGE_MAX_SHARE + 1;
    expect_pack_fail(&p, f.x, D5, NULL, "prefix shares");
    comm_bypass dup[2] = {{0, 2}, {0, 2}}, back[1] = {{2, 1}};
    p = f.p;
    p.bypass = dup;
    p.n_bypass = 2;
    expect_pack_fail(&p, f.x, D5, NULL, "twice");
    p = f.p;
    p.bypass = back;
    p.n_bypass = 1;
    expect_pack_fail(&p, f.x, D5, NULL, "bypass 2 -> 1");
    uint8_t trail[2] = {0x19, 0x06}; /* rows 0,3,4 + bit 9 + bit 10 (past mb_rows 10) */
    p = f.p;
    p.present = trail;
    p.n_rows = 5;
    expect_pack_fail(&p, f.x, D5, NULL, "past mb_rows");
    p = f.p;
    p.present = NULL;
    expect_pack_fail(&p, f.x, D5, NULL, "mask");

    uint8_t m1[1] = {0x03};
    comm_packet t = {.kind = COMM_PKT_TOKENS,
                     .sender = 3,
                     .receiver = 0,
                     .mb_rows = 2,
                     .n_rows = 2,
                     .present = m1};
    const int32_t badtok[2] = {1, -2}, losttok[2] = {STAGE_TOKEN_KV_LOST, 3};
    expect_pack_fail(&t, NULL, 0, NULL, "without tokens");
    expect_pack_fail(&t, NULL, 0, badtok, "negative");
    { /* the head's "KV lost" answer is the one negative id that travels */
        uint8_t tb[256];
        size_t hb2 = 0, pb2 = 0;
        CU_ASSERT(comm_pack(&t, NULL, 0, losttok, tb, sizeof tb, &hb2, &pb2, err, sizeof err) > 0);
    }
    comm_packet e = {
        .kind = COMM_PKT_END, .sender = 0, .receiver = 1, .mb_rows = 2, .n_rows = 2, .present = m1};
    expect_pack_fail(&e, NULL, 0, NULL, "END packet with 2 rows");
    expect_pack_fail(NULL, NULL, 0, NULL, "no header");
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    CU_pSuite s = CU_add_suite("comm_packet", NULL, NULL);
    if (!s) return 2;
    CU_add_test(s, "mask set/get/count", test_mask);
    CU_add_test(s, "wire names, sizes, parse", test_wire_names);
    CU_add_test(s, "wire f32 exact", test_wire_f32);
    CU_add_test(s, "wire bf16 known values", test_wire_bf16);
    CU_add_test(s, "wire f16 known values", test_wire_f16);
    CU_add_test(s, "ROWS chain round trip", test_rows_chain);
    CU_add_test(s, "ROWS non-chain round trip", test_rows_non_chain);
    CU_add_test(s, "empty chain packet", test_empty_chain);
    CU_add_test(s, "TOKENS round trip", test_tokens);
    CU_add_test(s, "END round trip", test_end);
    CU_add_test(s, "size bound and arena limits", test_limits);
    CU_add_test(s, "decoded packet lifetime", test_lifetime);
    CU_add_test(s, "no malloc per packet", test_no_malloc);
    CU_add_test(s, "pack errors", test_pack_errors);
    CU_add_test(s, "unpack: a failure zeroes the packet", test_unpack_failure_zeroes);
    return tu_cunit_run();
}
