/* tests/test_comm_unpack.c — the unpacker of comm/ (comm.h, docs/SPEC.md §4) on hostile input:
 * bad headers, an exhausted arena, every truncation, random byte flips and random bytes (each
 * a one-line error, never a crash), and the descriptor's sampling state. Shared helpers:
 * tests/comm_util.h. */
#include "tests/comm_util.h"

/* ---- hostile input --------------------------------------------------------------------------- */

/* [u32 H][header][payload_len bytes 0x5a]; the header built directly with protobuf-c. */
static size_t raw_packet(const Modpipe__PacketHeader *h, size_t payload_len, uint8_t *buf,
                         size_t cap)
{
    size_t H = modpipe__packet_header__get_packed_size(h);
    CU_ASSERT_FATAL(4 + H + payload_len <= cap);
    put_u32le(buf, (uint32_t)H);
    modpipe__packet_header__pack(h, buf + 4);
    memset(buf + 4 + H, 0x5a, payload_len);
    return 4 + H + payload_len;
}

/* Unpack a copy in a buffer of exactly len bytes (so ASan sees any over-read). */
static int unpack_exact(comm_unpacker *u, const uint8_t *src, size_t len, int D, comm_packet *q,
                        char *err, size_t errlen)
{
    uint8_t *b = malloc(len ? len : 1);
    memcpy(b, src, len);
    int rc = comm_unpack(u, b, len, D, q, err, errlen);
    free(b);
    return rc;
}

static void expect_unpack_fail(comm_unpacker *u, const uint8_t *buf, size_t len, int D,
                               const char *what)
{
    char err[256] = "";
    comm_packet q;
    int rc = unpack_exact(u, buf, len, D, &q, err, sizeof err);
    CU_ASSERT(rc != 0);
    CU_ASSERT(err[0] != 0);
    if (rc == 0 || !strstr(err, what))
        fprintf(stderr, "\n  unpack rc %d: want \"%s\" in \"%s\"\n", rc, what, err);
    CU_ASSERT(strstr(err, what) != NULL);
}

/* A valid chain header (1 -> 2, 10 rows, rows {0,3,4,9}) that the cases then break. */
typedef struct {
    Modpipe__PacketHeader h;
    Modpipe__BatchDesc d;
    Modpipe__Bypass b[3];
    Modpipe__Bypass *bp[3];
    uint8_t present[2], flags[MB10];
    int32_t slot[MB10], pos[MB10], token[MB10];
} raw_hdr;

static void raw_init(raw_hdr *r)
{
    fixture f;
    fixture_init(&f, STAGE_F32);
    modpipe__packet_header__init(&r->h);
    modpipe__batch_desc__init(&r->d);
    memcpy(r->present, f.present, sizeof r->present);
    memcpy(r->flags, f.flags, sizeof r->flags);
    memcpy(r->slot, f.slot, sizeof r->slot);
    memcpy(r->pos, f.pos, sizeof r->pos);
    memcpy(r->token, f.token, sizeof r->token);
    r->h.kind = MODPIPE__PACKET_KIND__ROWS;
    r->h.mb = 42;
    r->h.sender = 1;
    r->h.receiver = 2;
    r->h.mb_rows = MB10;
    r->h.n_rows = 4;
    r->h.dtype = MODPIPE__WIRE_DTYPE__F32;
    r->h.present.len = 2;
    r->h.present.data = r->present;
    r->d.n_slot = r->d.n_pos = r->d.n_token = MB10;
    r->d.slot = r->slot;
    r->d.pos = r->pos;
    r->d.token = r->token;
    r->d.flags.len = MB10;
    r->d.flags.data = r->flags;
    r->h.desc = &r->d;
    const uint32_t pairs[3][2] = {{0, 2}, {0, 3}, {1, 3}};
    for (int k = 0; k < 3; k++) {
        modpipe__bypass__init(&r->b[k]);
        r->b[k].from_stage = pairs[k][0];
        r->b[k].to_stage = pairs[k][1];
        r->bp[k] = &r->b[k];
    }
    r->h.n_bypass = 3;
    r->h.bypass = r->bp;
}

enum { RAW_CAP = 8192, ROWB = D5 * 4 /* f32 row bytes */ };

/* Per-row sampling state and slot releases: round trip, defaults, and what is rejected. */
static void test_sampling_desc(void)
{
    fixture f;
    fixture_init(&f, STAGE_F32);
    float temp[MB10], top_p[MB10];
    uint64_t seed[MB10], seq[MB10];
    uint32_t step[MB10];
    int32_t target[MB10], rel[3] = {7, 0, 300000};
    uint8_t fl[MB10];
    for (int i = 0; i < MB10; i++) {
        temp[i] = 0.25f * (float)i;
        top_p[i] = 1.0f - 0.05f * (float)i;
        seed[i] = 0xfedcba9876543210ull + (uint64_t)i;
        seq[i] = (uint64_t)i * 1000003u;
        step[i] = (uint32_t)(i * 300);
        target[i] = i % 3 == 0 ? -1 : 50 * i;
        fl[i] = (uint8_t)(i % 2 ? STAGE_ROW_NEED_LOGITS | STAGE_ROW_SAMPLE : STAGE_ROW_PROMPT);
    }
    comm_packet p = f.p;
    p.rows.flags = fl;
    p.rows.temperature = temp;
    p.rows.top_p = top_p;
    p.rows.seed = seed;
    p.rows.seq = seq;
    p.rows.step = step;
    p.rows.target = target;
    p.rows.n_release = 3;
    p.rows.release = rel;
    size_t cap = comm_packet_max_bytes(MB10, D5, S4);
    uint8_t *buf = malloc(cap);
    char err[256] = "";
    size_t hb, pb;
    size_t n = comm_pack(&p, f.x, D5, NULL, buf, cap, &hb, &pb, err, sizeof err);
    if (!n) fprintf(stderr, "\n  pack: %s\n", err);
    CU_ASSERT_FATAL(n > 0);
    CU_ASSERT_EQUAL(hb, 4 + reference_header_size(buf, n));
    comm_unpacker *u = comm_unpacker_init(16, S4);
    comm_packet q;
    CU_ASSERT_EQUAL_FATAL(comm_unpack(u, buf, n, D5, &q, err, sizeof err), 0);
    assert_same_header(&p, &q);
    for (int i = 0; i < MB10; i++) {
        CU_ASSERT_EQUAL(f32_bits(q.rows.temperature[i]), f32_bits(temp[i]));
        CU_ASSERT_EQUAL(f32_bits(q.rows.top_p[i]), f32_bits(top_p[i]));
        CU_ASSERT_EQUAL(q.rows.seed[i], seed[i]);
        CU_ASSERT_EQUAL(q.rows.seq[i], seq[i]);
        CU_ASSERT_EQUAL(q.rows.step[i], step[i]);
        CU_ASSERT_EQUAL(q.rows.target[i], target[i]);
    }
    CU_ASSERT_EQUAL(q.rows.n_release, 3);
    CU_ASSERT(q.rows.n_release == 3 && q.rows.release[0] == 7 && q.rows.release[1] == 0 &&
              q.rows.release[2] == 300000);

    /* absent arrays: every row gets the default, and the header is smaller */
    size_t hb_full = hb;
    p = f.p;
    n = comm_pack(&p, f.x, D5, NULL, buf, cap, &hb, &pb, err, sizeof err);
    CU_ASSERT_FATAL(n > 0);
    CU_ASSERT(hb < hb_full);
    CU_ASSERT_EQUAL_FATAL(comm_unpack(u, buf, n, D5, &q, err, sizeof err), 0);
    for (int i = 0; i < MB10; i++) {
        CU_ASSERT(q.rows.temperature[i] == 0.0f && q.rows.top_p[i] == 1.0f && q.rows.seed[i] == 0 &&
                  q.rows.seq[i] == 0 && q.rows.step[i] == 0 && q.rows.target[i] == -1);
    }
    CU_ASSERT_EQUAL(q.rows.n_release, 0);

    /* pack rejects */
    uint8_t bad_fl[MB10] = {0};
    bad_fl[4] = STAGE_ROW_SAMPLE;
    p = f.p;
    p.rows.flags = bad_fl;
    expect_pack_fail(&p, f.x, D5, NULL, "row 4 samples without logits");
    float nan_t[MB10];
    memcpy(nan_t, temp, sizeof nan_t);
    nan_t[1] = NAN;
    p = f.p;
    p.rows.flags = fl;
    p.rows.temperature = nan_t;
    expect_pack_fail(&p, f.x, D5, NULL, "row 1 has temperature nan");
    float zero_p[MB10];
    memcpy(zero_p, top_p, sizeof zero_p);
    zero_p[3] = 0.0f;
    p = f.p;
    p.rows.flags = fl;
    p.rows.top_p = zero_p;
    expect_pack_fail(&p, f.x, D5, NULL, "row 3 has temperature");
    int32_t bad_t[MB10];
    memcpy(bad_t, target, sizeof bad_t);
    bad_t[5] = -2;
    p = f.p;
    p.rows.target = bad_t;
    expect_pack_fail(&p, f.x, D5, NULL, "row 5 has target -2");
    int32_t dup[2] = {4, 4}, negr[1] = {-1};
    p = f.p;
    p.rows.release = dup;
    p.rows.n_release = 2;
    expect_pack_fail(&p, f.x, D5, NULL, "slot 4 released twice");
    p = f.p;
    p.rows.release = negr;
    p.rows.n_release = 1;
    expect_pack_fail(&p, f.x, D5, NULL, "release of slot -1");
    static int32_t many[STAGE_MAX_RELEASE + 1];
    for (int k = 0; k <= STAGE_MAX_RELEASE; k++) many[k] = k;
    p = f.p;
    p.rows.release = many;
    p.rows.n_release = STAGE_MAX_RELEASE + 1;
    expect_pack_fail(&p, f.x, D5, NULL, "slot releases (limit");
    p = f.p;
    p.rows.release = many;
    p.rows.n_release = STAGE_MAX_RELEASE; /* the limit itself fits */
    CU_ASSERT(comm_pack(&p, f.x, D5, NULL, buf, cap, &hb, &pb, err, sizeof err) > 0);
    CU_ASSERT_EQUAL(comm_unpack(u, buf,
                                comm_pack(&p, f.x, D5, NULL, buf, cap, &hb, &pb, err, sizeof err),
                                D5, &q, err, sizeof err),
                    0);
    CU_ASSERT_EQUAL(q.rows.n_release, STAGE_MAX_RELEASE);

    /* unpack rejects a sampling array of the wrong length and too many releases */
    static uint8_t rbuf[RAW_CAP];
    raw_hdr r;
    raw_init(&r);
    r.d.n_temperature = 9;
    r.d.temperature = temp;
    n = raw_packet(&r.h, 4 * ROWB, rbuf, RAW_CAP);
    expect_unpack_fail(u, rbuf, n, D5, "9 temperatures");
    raw_init(&r);
    r.d.n_target = 11;
    int32_t t11[11] = {0};
    r.d.target = t11;
    n = raw_packet(&r.h, 4 * ROWB, rbuf, RAW_CAP);
    expect_unpack_fail(u, rbuf, n, D5, "11 targets");
    raw_init(&r);
    r.d.n_release = STAGE_MAX_RELEASE + 1;
    r.d.release = many;
    n = raw_packet(&r.h, 4 * ROWB, rbuf, RAW_CAP);
    expect_unpack_fail(u, rbuf, n, D5, "slot releases (limit");
    free(buf);
    comm_unpacker_free(u);
}

static void test_unpack_bad_headers(void)
{
    comm_unpacker *u = comm_unpacker_init(16, S4);
    static uint8_t buf[RAW_CAP];
    raw_hdr r;
    size_t n;
    char err[256];
    comm_packet q;

    raw_init(&r);
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    CU_ASSERT_EQUAL(unpack_exact(u, buf, n, D5, &q, err, sizeof err), 0); /* the baseline */

    /* short buffers and a header length past the end */
    for (size_t l = 0; l < 4; l++) expect_unpack_fail(u, buf, l, D5, "shorter than");
    size_t H = get_u32le(buf);
    put_u32le(buf, (uint32_t)(n - 4 + 1));
    expect_unpack_fail(u, buf, n, D5, "past the end");
    put_u32le(buf, 0xffffffffu);
    expect_unpack_fail(u, buf, n, D5, "header length 4294967295 past the end");
    put_u32le(buf, (uint32_t)H - 1); /* header cut short by one byte */
    expect_unpack_fail(u, buf, n, D5, "does not decode");
    put_u32le(buf, 0); /* empty header: required fields missing */
    {
        char want[128];
        snprintf(want, sizeof want, "does not decode (header 0 bytes, packet %zu bytes)", n);
        expect_unpack_fail(u, buf, n, D5, want);
    }

    /* payload length */
    raw_init(&r);
    n = raw_packet(&r.h, 4 * ROWB + 1, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "payload 81 bytes, want 80");
    n = raw_packet(&r.h, 4 * ROWB - 1, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "payload 79 bytes, want 80");
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5 + 1, "want 96"); /* the receiver expects a wider row */
    expect_unpack_fail(u, buf, n, 0, "row width");
    r.h.dtype = MODPIPE__WIRE_DTYPE__BF16; /* bf16 rows are half as long */
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "payload 80 bytes, want 40");

    /* popcount */
    raw_init(&r);
    r.h.n_rows = 3;
    n = raw_packet(&r.h, 3 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "mask has 4 rows, n_rows says 3");
    r.h.n_rows = 11;
    n = raw_packet(&r.h, 11 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "n_rows 11 > mb_rows 10");

    /* mask bits past mb_rows, mask of the wrong length */
    raw_init(&r);
    r.present[1] |= 0x04; /* bit 10 */
    r.h.n_rows = 5;
    n = raw_packet(&r.h, 5 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "bits past mb_rows");
    raw_init(&r);
    r.h.present.len = 1;
    r.h.n_rows = 3;
    n = raw_packet(&r.h, 3 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "mask of 1 bytes for 10 rows");
    raw_init(&r);
    uint8_t m3[3] = {0x19, 0x02, 0x00};
    r.h.present.len = 3;
    r.h.present.data = m3;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "mask of 3 bytes");

    /* mb_rows over the limit (the descriptor grows with it, to be consistent otherwise) */
    {
        raw_init(&r);
        int32_t z[17] = {0};
        uint8_t zf[17] = {0}, m[3] = {0x19, 0x02, 0};
        r.h.mb_rows = 17;
        r.h.present.len = 3;
        r.h.present.data = m;
        r.d.n_slot = r.d.n_pos = r.d.n_token = 17;
        r.d.slot = r.d.pos = r.d.token = z;
        r.d.flags.len = 17;
        r.d.flags.data = zf;
        n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
        expect_unpack_fail(u, buf, n, D5, "mb_rows 17 above the limit 16");
        r.h.mb_rows = 0xffffffffu;
        n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
        expect_unpack_fail(u, buf, n, D5, "above the limit");
    }

    /* stage indices */
    raw_init(&r);
    r.h.receiver = 4;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "stage 1 -> 4 out of range (4 stages)");
    raw_init(&r);
    r.h.sender = 0xffffffffu;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "out of range");
    raw_init(&r);
    r.b[1].to_stage = 9;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "bypass 0 -> 9 out of range");
    raw_init(&r);
    r.b[1].from_stage = 3;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "bypass 3 -> 3");
    raw_init(&r);
    r.b[2].from_stage = 0;
    r.b[2].to_stage = 2;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "listed twice");
    raw_init(&r);
    r.h.sender = 2;
    r.h.receiver = 1;
    r.h.desc = NULL;
    r.h.n_bypass = 0;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "rows go forward");

    /* kind and dtype */
    raw_init(&r);
    r.h.dtype = (Modpipe__WireDtype)7;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "unknown wire dtype 7");
    raw_init(&r);
    r.h.kind = (Modpipe__PacketKind)5;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "unknown kind 5");
    r.h.kind = (Modpipe__PacketKind)-1; /* a 10-byte varint */
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "unknown kind -1");

    /* descriptor */
    raw_init(&r);
    r.d.n_pos = 9;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "descriptor has 10 slots, 9 positions");
    raw_init(&r);
    r.d.flags.len = 11;
    uint8_t fl11[11] = {0};
    r.d.flags.data = fl11;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "11 flags for 10 rows");
    raw_init(&r);
    r.slot[3] = -1;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "row 3 has slot -1");
    raw_init(&r);
    r.token[9] = INT32_MIN;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "negative");
    raw_init(&r);
    r.flags[0] = 0x80;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "unknown flags 0x80");
    raw_init(&r);
    r.h.desc = NULL;
    r.h.n_bypass = 0;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "chain packet without a descriptor");
    raw_init(&r);
    r.h.receiver = 3;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "non-chain packet with a descriptor");
    raw_init(&r);
    r.h.receiver = 3;
    r.h.desc = NULL;
    n = raw_packet(&r.h, 4 * ROWB, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "bypass list on a non-chain packet");

    /* TOKENS and END payloads */
    raw_init(&r);
    r.h.kind = MODPIPE__PACKET_KIND__TOKENS;
    r.h.sender = 3;
    r.h.receiver = 0;
    r.h.desc = NULL;
    r.h.n_bypass = 0;
    n = raw_packet(&r.h, 16, buf, RAW_CAP);
    CU_ASSERT_EQUAL(unpack_exact(u, buf, n, D5, &q, err, sizeof err), 0);
    n = raw_packet(&r.h, 15, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "TOKENS payload 15 bytes, want 16");
    n = raw_packet(&r.h, 16, buf, RAW_CAP);
    buf[n - 1] = 0x80; /* last token negative */
    expect_unpack_fail(u, buf, n, D5, "token 3 is negative");
    raw_init(&r);
    r.h.kind = MODPIPE__PACKET_KIND__END;
    r.h.desc = NULL;
    r.h.n_bypass = 0;
    r.h.n_rows = 0;
    r.present[0] = r.present[1] = 0;
    n = raw_packet(&r.h, 0, buf, RAW_CAP);
    CU_ASSERT_EQUAL(unpack_exact(u, buf, n, D5, &q, err, sizeof err), 0);
    n = raw_packet(&r.h, 4, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "END payload 4 bytes, want 0");
    r.present[0] = 1;
    r.h.n_rows = 1;
    n = raw_packet(&r.h, 0, buf, RAW_CAP);
    expect_unpack_fail(u, buf, n, D5, "END packet with 1 rows");

    /* an unknown field (field 15, varint 1) appended to a valid header */
    raw_init(&r);
    n = raw_packet(&r.h, 0, buf, RAW_CAP);
    H = n - 4;
    buf[4 + H] = (15 << 3) | 0;
    buf[4 + H + 1] = 1;
    put_u32le(buf, (uint32_t)(H + 2));
    memset(buf + 4 + H + 2, 0, 4 * ROWB);
    expect_unpack_fail(u, buf, n + 2 + 4 * ROWB, D5, "1 unknown fields");

    comm_unpacker_free(u);
}

/* A header far larger than the unpacker's arena fails cleanly (no crash, no malloc). */
static void test_unpack_arena_exhausted(void)
{
    enum { NB = 3000 };
    static Modpipe__Bypass b[NB];
    static Modpipe__Bypass *bp[NB];
    static uint8_t buf[64 * 1024];
    raw_hdr r;
    raw_init(&r);
    for (int k = 0; k < NB; k++) {
        modpipe__bypass__init(&b[k]);
        b[k].from_stage = 0;
        b[k].to_stage = 1;
        bp[k] = &b[k];
    }
    r.h.sender = 0;
    r.h.receiver = 1;
    r.h.n_bypass = NB;
    r.h.bypass = bp;
    size_t n = raw_packet(&r.h, 4 * ROWB, buf, sizeof buf);
    comm_unpacker *u = comm_unpacker_init(16, 2);
    expect_unpack_fail(u, buf, n, D5, "decode arena");
    /* still usable afterwards */
    fixture f;
    fixture_init(&f, STAGE_F32);
    f.p.sender = 0;
    f.p.receiver = 1;
    f.p.n_bypass = 0;
    char err[256];
    size_t len = comm_pack(&f.p, f.x, D5, NULL, buf, sizeof buf, NULL, NULL, err, sizeof err);
    comm_packet q;
    CU_ASSERT_EQUAL(comm_unpack(u, buf, len, D5, &q, err, sizeof err), 0);
    comm_unpacker_free(u);
}

/* Every truncation of a valid packet fails with a message; only the full length decodes. */
static void test_unpack_truncations(void)
{
    const stage_dtype d[] = {STAGE_F32, STAGE_BF16, STAGE_F16};
    comm_unpacker *u = comm_unpacker_init(16, S4);
    for (int k = 0; k < 3; k++) {
        fixture f;
        fixture_init(&f, d[k]);
        size_t cap = comm_packet_max_bytes(MB10, D5, S4);
        uint8_t *buf = malloc(cap);
        char err[256];
        size_t len = comm_pack(&f.p, f.x, D5, NULL, buf, cap, NULL, NULL, err, sizeof err);
        CU_ASSERT_FATAL(len > 0);
        int bad = 0;
        for (size_t l = 0; l < len; l++) {
            comm_packet q;
            err[0] = 0;
            if (unpack_exact(u, buf, l, D5, &q, err, sizeof err) == 0 || err[0] == 0) bad++;
        }
        CU_ASSERT_EQUAL(bad, 0);
        comm_packet q;
        CU_ASSERT_EQUAL(unpack_exact(u, buf, len, D5, &q, err, sizeof err), 0);
        free(buf);
    }
    comm_unpacker_free(u);
}

/* A packet that decoded must be consistent with itself and with the buffer. */
static void check_self_consistent(const comm_packet *q, const uint8_t *buf, size_t len, int D,
                                  int max_rows, int n_stages)
{
    CU_ASSERT((int)q->kind >= 0 && (int)q->kind <= 2);
    CU_ASSERT((int)q->dtype >= 0 && (int)q->dtype <= 2);
    CU_ASSERT(q->mb_rows >= 0 && q->mb_rows <= max_rows);
    CU_ASSERT(q->sender >= 0 && q->sender < n_stages);
    CU_ASSERT(q->receiver >= 0 && q->receiver < n_stages);
    CU_ASSERT_EQUAL(comm_mask_count(q->present, q->mb_rows), q->n_rows);
    size_t H = get_u32le(buf);
    CU_ASSERT_PTR_EQUAL(q->payload, buf + 4 + H);
    CU_ASSERT_EQUAL(4 + H + q->payload_bytes, len);
    size_t want = q->kind == COMM_PKT_ROWS     ? (size_t)q->n_rows * D * stage_dtype_size(q->dtype)
                  : q->kind == COMM_PKT_TOKENS ? (size_t)q->n_rows * 4
                                               : 0;
    CU_ASSERT_EQUAL(q->payload_bytes, want);
    CU_ASSERT_EQUAL(q->has_desc, q->kind == COMM_PKT_ROWS && q->receiver == q->sender + 1);
    for (int i = 0; q->has_desc && i < q->mb_rows; i++)
        CU_ASSERT(q->rows.slot[i] >= 0 && q->rows.pos[i] >= 0 && q->rows.token[i] >= 0 &&
                  q->rows.flags[i] <= STAGE_ROW_ALL);
    for (int k = 0; k < q->n_bypass; k++)
        CU_ASSERT(q->bypass[k].from >= 0 && q->bypass[k].from < q->bypass[k].to &&
                  q->bypass[k].to < n_stages);
}

/* Random byte flips (seeded): never a crash; a packet that still decodes is self-consistent,
 * scatters, and re-packs to a packet that decodes to the same header. */
static void test_unpack_flips(void)
{
    enum { ITER = 6000, MAXR = 16 };
    rng_state = 0x9e3779b97f4a7c15ULL;
    comm_unpacker *u = comm_unpacker_init(MAXR, S4), *u2 = comm_unpacker_init(MAXR, S4);
    size_t cap = comm_packet_max_bytes(MAXR, D5, S4);
    uint8_t *re = malloc(cap);
    float *y = malloc((size_t)MAXR * D5 * sizeof *y); /* [MAXR][D] */
    int32_t tok[MAXR];
    int ok = 0, failed = 0, silent = 0;
    for (int it = 0; it < ITER; it++) {
        fixture f;
        const stage_dtype dts[] = {STAGE_F32, STAGE_BF16, STAGE_F16};
        fixture_init(&f, dts[it % 3]);
        int32_t tk[4] = {1, 2, 3, 4};
        if (it % 5 == 4) { /* some TOKENS packets too */
            f.p.kind = COMM_PKT_TOKENS;
            f.p.sender = 3;
            f.p.receiver = 0;
            f.p.has_desc = 0;
            f.p.n_bypass = 0;
        }
        uint8_t pk[1024];
        char err[256];
        size_t len = comm_pack(&f.p, f.x, D5, tk, pk, sizeof pk, NULL, NULL, err, sizeof err);
        CU_ASSERT_FATAL(len > 0);
        size_t H = get_u32le(pk);
        int flips = 1 + (int)(rng_next() % 3);
        for (int k = 0; k < flips; k++) {
            /* mostly inside the header, where the structure is */
            size_t at = rng_next() % 4 ? rng_next() % (4 + H) : rng_next() % len;
            pk[at] ^= (uint8_t)(1 + rng_next() % 255);
        }
        size_t l = len;
        if (rng_next() % 8 == 0) l = rng_next() % (len + 1); /* and some truncations */
        uint8_t *b = malloc(l ? l : 1);
        memcpy(b, pk, l);
        comm_packet q;
        err[0] = 0;
        if (comm_unpack(u, b, l, D5, &q, err, sizeof err) != 0) {
            failed++;
            if (err[0] == 0) silent++;
        } else {
            ok++;
            check_self_consistent(&q, b, l, D5, MAXR, S4);
            comm_scatter_rows(&q, D5, y);
            comm_scatter_tokens(&q, tok);
            /* re-pack what was decoded (rows re-encoded from the scattered values) */
            int32_t t[MAXR];
            for (int k = 0; q.kind == COMM_PKT_TOKENS && k < q.n_rows; k++)
                t[k] = comm_packet_token(&q, k);
            size_t rl = comm_pack(&q, y, D5, t, re, cap, NULL, NULL, err, sizeof err);
            CU_ASSERT(rl > 0);
            comm_packet q2;
            if (rl > 0) {
                CU_ASSERT_EQUAL(comm_unpack(u2, re, rl, D5, &q2, err, sizeof err), 0);
                assert_same_header(&q, &q2);
            }
        }
        free(b);
    }
    printf("\n  %d flipped packets: %d rejected, %d still valid\n", ITER, failed, ok);
    CU_ASSERT_EQUAL(silent, 0);
    CU_ASSERT(failed > ITER / 4);
    free(y);
    free(re);
    comm_unpacker_free(u);
    comm_unpacker_free(u2);
}

/* Random bytes behind a plausible length prefix. */
static void test_unpack_random(void)
{
    rng_state = 12345;
    comm_unpacker *u = comm_unpacker_init(64, 8);
    int silent = 0;
    for (int it = 0; it < 4000; it++) {
        size_t len = rng_next() % 300;
        uint8_t *b = malloc(len ? len : 1);
        for (size_t i = 0; i < len; i++) b[i] = (uint8_t)rng_next();
        if (len >= 4 && rng_next() % 4) put_u32le(b, (uint32_t)(rng_next() % (len - 3)));
        comm_packet q;
        char err[256] = "";
        if (comm_unpack(u, b, len, 7, &q, err, sizeof err) != 0) {
            if (err[0] == 0) silent++;
        } else {
            check_self_consistent(&q, b, len, 7, 64, 8);
        }
        free(b);
    }
    CU_ASSERT_EQUAL(silent, 0);
    comm_unpacker_free(u);
}

int main(void)
{
    if (CU_initialize_registry() != CUE_SUCCESS) return 2;
    CU_pSuite s = CU_add_suite("comm_unpack", NULL, NULL);
    if (!s) return 2;
    CU_add_test(s, "descriptor: sampling state and slot releases", test_sampling_desc);
    CU_add_test(s, "unpack: bad headers", test_unpack_bad_headers);
    CU_add_test(s, "unpack: arena exhausted", test_unpack_arena_exhausted);
    CU_add_test(s, "unpack: every truncation", test_unpack_truncations);
    CU_add_test(s, "unpack: random byte flips", test_unpack_flips);
    CU_add_test(s, "unpack: random bytes", test_unpack_random);
    return tu_cunit_run();
}
