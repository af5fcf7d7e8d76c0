/* comm/packet.c — the packet layer of comm.h (docs/SPEC.md §4): bitmasks, wire dtypes, pack/unpack.
 *
 * Wire: [u32 LE H][H bytes modpipe.PacketHeader][payload]. The header goes through
 * protobuf-c; the payload never does (it is written and read in place).
 *
 * No allocation per packet: comm_pack builds the protobuf-c structs on its stack (hence
 * COMM_MAX_BYPASS), and comm_unpack hands protobuf-c an allocator backed by a fixed arena
 * owned by the unpacker.
 */
#include "comm/comm.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/err.h"
#include "modpipe.pb-c.h"
#include "stage/convert.h"

/* The descriptor goes on the wire as protobuf-c arrays that point at the batch's own columns
 * (no copy), so each column's element type must be the protobuf field's; the flags byte
 * carries the STAGE_ROW_* bits with the values proto/modpipe.proto documents. */
#define COMM_SAME_ELEM(f)                                                                          \
    _Static_assert(sizeof *((Modpipe__BatchDesc *)0)->f == sizeof *((stage_batch *)0)->f,          \
                   "wire column " #f " differs from stage_batch's")
COMM_SAME_ELEM(slot);
COMM_SAME_ELEM(pos);
COMM_SAME_ELEM(token);
COMM_SAME_ELEM(temperature);
COMM_SAME_ELEM(top_p);
COMM_SAME_ELEM(seed);
COMM_SAME_ELEM(seq);
COMM_SAME_ELEM(step);
COMM_SAME_ELEM(target);
COMM_SAME_ELEM(release);
COMM_SAME_ELEM(share);
#undef COMM_SAME_ELEM
_Static_assert(sizeof *((stage_batch *)0)->flags == 1 && STAGE_ROW_ALL <= 0xff,
               "one flags byte per row on the wire");
_Static_assert(STAGE_ROW_NEED_LOGITS == 1 && STAGE_ROW_PROMPT == 2 && STAGE_ROW_SAMPLE == 4,
               "flag bits as proto/modpipe.proto documents them");

#define COMM_PREFIX_BYTES 4

/* ---- bitmasks -------------------------------------------------------------------------------- */

int comm_mask_count(const uint8_t *m, int n)
{
    if (!m || n <= 0) return 0;
    int full = n / 8, c = 0;
    for (int b = 0; b < full; b++) c += __builtin_popcount(m[b]);
    if (n % 8) /* only bits below n count, whatever the trailing bits hold */
        c += __builtin_popcount((unsigned)m[full] & ((1u << (n % 8)) - 1u));
    return c;
}

/* Byte-wise little-endian access: payloads sit at any offset after the header, so a
 * uint16_t / float pointer into them would be misaligned. */
static inline void comm_put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
static inline uint32_t comm_get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ---- size bounds ----------------------------------------------------------------------------- */

/* a * b, or SIZE_MAX on overflow (callers treat SIZE_MAX as "too big"). */
static size_t comm_mul(size_t a, size_t b)
{
    if (a != 0 && b > SIZE_MAX / a) return SIZE_MAX;
    return a * b;
}
static size_t comm_add(size_t a, size_t b) { return a > SIZE_MAX - b ? SIZE_MAX : a + b; }

/* Bypass entries a valid packet can hold: distinct pairs from < to < n_stages, and no more
 * than comm_pack's stack scratch. */
static size_t comm_bypass_limit(int n_stages)
{
    size_t s = n_stages > 0 ? (size_t)n_stages : 0;
    size_t pairs = s > 0 ? s * (s - 1) / 2 : 0;
    return pairs < COMM_MAX_BYPASS ? pairs : COMM_MAX_BYPASS;
}

/* Worst-case protobuf bytes: a tag is 1 byte (fields 1..15), a varint of uint32 <= 5 bytes,
 * of uint64 / enum / negative int32 <= 10, a length prefix <= 5. */
size_t comm_packet_max_bytes(int mb_rows, int D, int n_stages)
{
    if (mb_rows < 0 || D < 0 || n_stages < 0) return 0;
    size_t r = (size_t)mb_rows, s = (size_t)n_stages;
    size_t nb = comm_mul(s, s); /* any pair list the sender may send; pack caps it */
    if (nb > COMM_MAX_BYPASS) nb = COMM_MAX_BYPASS;

    size_t h = 0;
    h += 1 + 10;                           /* kind (enum: int32 varint) */
    h += 1 + 10;                           /* mb */
    h += 4 * (1 + 5);                      /* sender, receiver, mb_rows, n_rows */
    h += 1 + 10;                           /* dtype */
    h += 1 + 5 + comm_mask_bytes(mb_rows); /* present */
    /* desc: tag + length, three packed int32 arrays (10 bytes a value if negative), flags;
     * per row temperature, top_p (4 + 4), seed, seq (10 + 10), step, target (5 + 5); the
     * release list (10 a value) */
    size_t desc = comm_add(10 * (1 + 5) + (1 + 5), comm_add(comm_mul(r, 3 * 10 + 38), r));
    desc = comm_add(desc, (size_t)(STAGE_MAX_RELEASE + 3 * STAGE_MAX_SHARE) * 10);
    h = comm_add(h, comm_add(1 + 5, desc));
    /* bypass entry: tag + 1-byte length + 2 x (tag + uint32 varint) = 14 */
    h = comm_add(h, comm_mul(nb, 14));

    size_t w = D > 0 ? (size_t)D : 1;             /* a TOKENS payload is one int32 a row */
    size_t payload = comm_mul(comm_mul(r, w), 4); /* f32 rows or int32 tokens */
    size_t total = comm_add(comm_add(COMM_PREFIX_BYTES, h), payload);
    return total == SIZE_MAX ? 0 : total;
}

/* ---- consistency ----------------------------------------------------------------------------- */

/* What a packet must satisfy on both sides of the wire. n_stages <= 0: not known (pack). */
static int comm_check(const comm_packet *p, int n_stages, char *err, size_t errlen)
{
    unsigned long long mb = (unsigned long long)p->mb;
    char lim[32] = ""; /* " (S stages)" when known */
    if (n_stages > 0) snprintf(lim, sizeof lim, " (%d stages)", n_stages);
    if ((int)p->kind < COMM_PKT_ROWS || (int)p->kind > COMM_PKT_END) {
        base_set_err(err, errlen, "packet mb %llu: unknown kind %d", mb, (int)p->kind);
        return -1;
    }
    if (!stage_dtype_valid((int)p->dtype)) {
        base_set_err(err, errlen, "packet mb %llu: unknown wire dtype %d", mb, (int)p->dtype);
        return -1;
    }
    if (p->sender < 0 || p->receiver < 0 ||
        (n_stages > 0 && (p->sender >= n_stages || p->receiver >= n_stages))) {
        base_set_err(err, errlen, "packet mb %llu: stage %d -> %d out of range%s", mb, p->sender,
                     p->receiver, lim);
        return -1;
    }
    if (p->mb_rows < 0 || p->n_rows < 0 || p->n_rows > p->mb_rows) {
        base_set_err(err, errlen, "packet mb %llu %d->%d: n_rows %d, mb_rows %d", mb, p->sender,
                     p->receiver, p->n_rows, p->mb_rows);
        return -1;
    }
    if (p->mb_rows > 0 && !p->present) {
        base_set_err(err, errlen, "packet mb %llu %d->%d: no present mask", mb, p->sender,
                     p->receiver);
        return -1;
    }
    if (p->mb_rows % 8 && (p->present[p->mb_rows / 8] >> (p->mb_rows % 8)) != 0) {
        base_set_err(err, errlen, "packet mb %llu %d->%d: mask has bits past mb_rows %d", mb,
                     p->sender, p->receiver, p->mb_rows);
        return -1;
    }
    int pop = comm_mask_count(p->present, p->mb_rows);
    if (pop != p->n_rows) {
        base_set_err(err, errlen, "packet mb %llu %d->%d: mask has %d rows, n_rows says %d", mb,
                     p->sender, p->receiver, pop, p->n_rows);
        return -1;
    }
    if (p->kind == COMM_PKT_END && p->n_rows != 0) {
        base_set_err(err, errlen, "packet mb %llu %d->%d: END packet with %d rows", mb, p->sender,
                     p->receiver, p->n_rows);
        return -1;
    }
    if (p->kind == COMM_PKT_ROWS && p->sender >= p->receiver) {
        base_set_err(err, errlen, "packet mb %llu: rows go forward, not %d -> %d", mb, p->sender,
                     p->receiver);
        return -1;
    }
    /* The descriptor rides exactly on chain links, so every receiver gets it once. */
    int chain = p->kind == COMM_PKT_ROWS && p->receiver == p->sender + 1;
    if (!!p->has_desc != chain) {
        base_set_err(err, errlen, "packet mb %llu %d->%d: %s packet %s a descriptor", mb, p->sender,
                     p->receiver, chain ? "chain" : "non-chain", chain ? "without" : "with");
        return -1;
    }
    if (p->has_desc) {
        if (p->mb_rows > 0 && (!p->rows.slot || !p->rows.pos || !p->rows.token || !p->rows.flags)) {
            base_set_err(err, errlen, "packet mb %llu %d->%d: descriptor arrays missing", mb,
                         p->sender, p->receiver);
            return -1;
        }
        for (int i = 0; i < p->mb_rows; i++) {
            if ((p->rows.flags[i] & STAGE_ROW_SAMPLE) &&
                !(p->rows.flags[i] & STAGE_ROW_NEED_LOGITS)) {
                base_set_err(err, errlen, "packet mb %llu %d->%d: row %d samples without logits",
                             mb, p->sender, p->receiver, i);
                return -1;
            }
            float temp = p->rows.temperature ? p->rows.temperature[i] : 0.0f;
            float top_p = p->rows.top_p ? p->rows.top_p[i] : 1.0f;
            if ((p->rows.flags[i] & STAGE_ROW_SAMPLE) &&
                (!isfinite(temp) || !(top_p > 0.0f && top_p <= 1.0f))) {
                base_set_err(err, errlen,
                             "packet mb %llu %d->%d: row %d has temperature %g, top_p %g", mb,
                             p->sender, p->receiver, i, (double)temp, (double)top_p);
                return -1;
            }
            if (p->rows.target && p->rows.target[i] < -1) {
                base_set_err(err, errlen, "packet mb %llu %d->%d: row %d has target %d", mb,
                             p->sender, p->receiver, i, (int)p->rows.target[i]);
                return -1;
            }
            if (p->rows.slot[i] < 0 || p->rows.pos[i] < 0 || p->rows.token[i] < 0) {
                base_set_err(err, errlen,
                             "packet mb %llu %d->%d: row %d has slot %d pos %d token %d (negative)",
                             mb, p->sender, p->receiver, i, (int)p->rows.slot[i],
                             (int)p->rows.pos[i], (int)p->rows.token[i]);
                return -1;
            }
            if (p->rows.flags[i] & ~STAGE_ROW_ALL) {
                base_set_err(err, errlen, "packet mb %llu %d->%d: row %d has unknown flags 0x%02x",
                             mb, p->sender, p->receiver, i, (unsigned)p->rows.flags[i]);
                return -1;
            }
        }
    }
    if (p->rows.n_release < 0 || p->rows.n_release > STAGE_MAX_RELEASE ||
        (p->rows.n_release > 0 && !p->rows.release) || (p->rows.n_release > 0 && !p->has_desc)) {
        base_set_err(err, errlen,
                     "packet mb %llu %d->%d: %d slot releases (limit %d, descriptor only)", mb,
                     p->sender, p->receiver, p->rows.n_release, STAGE_MAX_RELEASE);
        return -1;
    }
    for (int k = 0; k < p->rows.n_release; k++) {
        if (p->rows.release[k] < 0) {
            base_set_err(err, errlen, "packet mb %llu %d->%d: release of slot %d", mb, p->sender,
                         p->receiver, (int)p->rows.release[k]);
            return -1;
        }
        for (int j = 0; j < k; j++) /* n_release <= STAGE_MAX_RELEASE: quadratic is fine */
            if (p->rows.release[j] == p->rows.release[k]) {
                base_set_err(err, errlen, "packet mb %llu %d->%d: slot %d released twice", mb,
                             p->sender, p->receiver, (int)p->rows.release[k]);
                return -1;
            }
    }
    if (p->rows.n_share < 0 || p->rows.n_share > STAGE_MAX_SHARE ||
        (p->rows.n_share > 0 && (!p->rows.share || !p->has_desc))) {
        base_set_err(err, errlen,
                     "packet mb %llu %d->%d: %d prefix shares (limit %d, descriptor only)", mb,
                     p->sender, p->receiver, p->rows.n_share, STAGE_MAX_SHARE);
        return -1;
    }
    for (int k = 0; k < p->rows.n_share; k++) {
        const int32_t *t = p->rows.share + 3 * k;
        /* src == dst: a park (stage_state_slot_share) */
        if (t[0] < 0 || t[1] < 0 || t[2] < 1) {
            base_set_err(err, errlen,
                         "packet mb %llu %d->%d: share of slot %d's %d positions to %d", mb,
                         p->sender, p->receiver, (int)t[0], (int)t[2], (int)t[1]);
            return -1;
        }
    }
    if (p->n_bypass < 0 || p->n_bypass > COMM_MAX_BYPASS || (p->n_bypass > 0 && !p->bypass)) {
        base_set_err(err, errlen, "packet mb %llu %d->%d: %d bypass entries (limit %d)", mb,
                     p->sender, p->receiver, p->n_bypass, COMM_MAX_BYPASS);
        return -1;
    }
    if (p->n_bypass > 0 && !p->has_desc) {
        base_set_err(err, errlen, "packet mb %llu %d->%d: bypass list on a non-chain packet", mb,
                     p->sender, p->receiver);
        return -1;
    }
    for (int k = 0; k < p->n_bypass; k++) {
        const comm_bypass *b = &p->bypass[k];
        if (b->from < 0 || b->to <= b->from || (n_stages > 0 && b->to >= n_stages)) {
            base_set_err(err, errlen, "packet mb %llu %d->%d: bypass %d -> %d out of range%s", mb,
                         p->sender, p->receiver, b->from, b->to, lim);
            return -1;
        }
        for (int j = 0; j < k; j++) /* n_bypass <= COMM_MAX_BYPASS: quadratic is fine */
            if (p->bypass[j].from == b->from && p->bypass[j].to == b->to) {
                base_set_err(err, errlen, "packet mb %llu %d->%d: bypass %d -> %d listed twice", mb,
                             p->sender, p->receiver, b->from, b->to);
                return -1;
            }
    }
    return 0;
}

/* Payload bytes a packet must carry; SIZE_MAX if the size overflows. */
static size_t comm_payload_bytes(const comm_packet *p, int D)
{
    switch (p->kind) {
    case COMM_PKT_ROWS:
        return comm_mul(comm_mul((size_t)p->n_rows, (size_t)D), stage_dtype_size(p->dtype));
    case COMM_PKT_TOKENS: return comm_mul((size_t)p->n_rows, 4);
    case COMM_PKT_END: return 0;
    }
    return SIZE_MAX;
}

/* ---- pack ------------------------------------------------------------------------------------ */

size_t comm_pack(const comm_packet *hdr, const float *x, int D, const int32_t *tokens, uint8_t *buf,
                 size_t cap, size_t *hdr_bytes, size_t *payload_bytes, char *err, size_t errlen)
{
    if (hdr_bytes) *hdr_bytes = 0;
    if (payload_bytes) *payload_bytes = 0;
    if (!hdr || (!buf && cap > 0)) {
        base_set_err(err, errlen, "comm_pack: no header or buffer");
        return 0;
    }
    if (comm_check(hdr, 0, err, errlen)) return 0;
    unsigned long long mb = (unsigned long long)hdr->mb;
    if (hdr->kind == COMM_PKT_ROWS && (D <= 0 || (hdr->n_rows > 0 && !x))) {
        base_set_err(err, errlen, "comm_pack mb %llu %d->%d: ROWS packet needs x and D > 0 (D %d)",
                     mb, hdr->sender, hdr->receiver, D);
        return 0;
    }
    if (hdr->kind == COMM_PKT_TOKENS) {
        if (hdr->n_rows > 0 && !tokens) {
            base_set_err(err, errlen, "comm_pack mb %llu %d->%d: TOKENS packet without tokens", mb,
                         hdr->sender, hdr->receiver);
            return 0;
        }
        for (int k = 0; k < hdr->n_rows; k++)
            if (tokens[k] < 0 && tokens[k] != STAGE_TOKEN_KV_LOST) {
                base_set_err(err, errlen, "comm_pack mb %llu %d->%d: token %d is negative (%d)", mb,
                             hdr->sender, hdr->receiver, k, (int)tokens[k]);
                return 0;
            }
    }

    /* protobuf-c structs on the stack; the arrays point at the caller's (pack only reads). */
    Modpipe__PacketHeader h = MODPIPE__PACKET_HEADER__INIT;
    Modpipe__BatchDesc desc = MODPIPE__BATCH_DESC__INIT;
    Modpipe__Bypass bp[COMM_MAX_BYPASS]; /* ~20 KB of stack: why COMM_MAX_BYPASS is bounded */
    Modpipe__Bypass *bpp[COMM_MAX_BYPASS];
    h.kind = (Modpipe__PacketKind)hdr->kind;
    h.mb = hdr->mb;
    h.sender = (uint32_t)hdr->sender;
    h.receiver = (uint32_t)hdr->receiver;
    h.mb_rows = (uint32_t)hdr->mb_rows;
    h.n_rows = (uint32_t)hdr->n_rows;
    h.dtype = (Modpipe__WireDtype)hdr->dtype;
    h.present.len = comm_mask_bytes(hdr->mb_rows);
    h.present.data = (uint8_t *)hdr->present;
    if (hdr->has_desc) {
        size_t r = (size_t)hdr->mb_rows;
        desc.n_slot = desc.n_pos = desc.n_token = r;
        desc.slot = hdr->rows.slot;
        desc.pos = hdr->rows.pos;
        desc.token = hdr->rows.token;
        desc.flags.len = r;
        desc.flags.data = hdr->rows.flags;
        /* an absent sampling array means "every row has the default" (comm.h) */
        desc.n_temperature = hdr->rows.temperature ? r : 0;
        desc.n_top_p = hdr->rows.top_p ? r : 0;
        desc.n_seed = hdr->rows.seed ? r : 0;
        desc.n_seq = hdr->rows.seq ? r : 0;
        desc.n_step = hdr->rows.step ? r : 0;
        desc.n_target = hdr->rows.target ? r : 0;
        desc.temperature = hdr->rows.temperature;
        desc.top_p = hdr->rows.top_p;
        desc.seed = hdr->rows.seed;
        desc.seq = hdr->rows.seq;
        desc.step = hdr->rows.step;
        desc.target = hdr->rows.target;
        desc.n_release = (size_t)hdr->rows.n_release;
        desc.release = hdr->rows.release;
        desc.n_share = (size_t)hdr->rows.n_share * 3;
        desc.share = hdr->rows.share;
        h.desc = &desc;
    }
    for (int k = 0; k < hdr->n_bypass; k++) {
        modpipe__bypass__init(&bp[k]);
        bp[k].from_stage = (uint32_t)hdr->bypass[k].from;
        bp[k].to_stage = (uint32_t)hdr->bypass[k].to;
        bpp[k] = &bp[k];
    }
    h.n_bypass = (size_t)hdr->n_bypass;
    h.bypass = hdr->n_bypass > 0 ? bpp : NULL;

    size_t H = modpipe__packet_header__get_packed_size(&h);
    size_t P = comm_payload_bytes(hdr, D);
    size_t total = comm_add(comm_add(COMM_PREFIX_BYTES, H), P);
    if (H > UINT32_MAX || total == SIZE_MAX) {
        base_set_err(err, errlen, "comm_pack mb %llu %d->%d: packet too large (header %zu bytes)",
                     mb, hdr->sender, hdr->receiver, H);
        return 0;
    }
    if (total > cap) {
        base_set_err(err, errlen,
                     "comm_pack mb %llu %d->%d: packet needs %zu bytes (header %zu + payload %zu), "
                     "buffer has %zu",
                     mb, hdr->sender, hdr->receiver, total, COMM_PREFIX_BYTES + H, P, cap);
        return 0;
    }
    comm_put_u32(buf, (uint32_t)H);
    if (modpipe__packet_header__pack(&h, buf + COMM_PREFIX_BYTES) != H) {
        base_set_err(err, errlen, "comm_pack mb %llu %d->%d: protobuf-c packed a different size",
                     mb, hdr->sender, hdr->receiver);
        return 0;
    }

    uint8_t *out = buf + COMM_PREFIX_BYTES + H; /* [n_rows][D] wire dtype, or [n_rows] int32 */
    if (hdr->kind == COMM_PKT_ROWS) {
        size_t row = (size_t)D * stage_dtype_size(hdr->dtype);
        for (int i = 0; i < hdr->mb_rows; i++)
            if (comm_mask_get(hdr->present, i)) {
                stage_dtype_from_f32(hdr->dtype, x + (size_t)i * (size_t)D, out, (size_t)D);
                out += row;
            }
    } else if (hdr->kind == COMM_PKT_TOKENS) {
        for (int k = 0; k < hdr->n_rows; k++)
            comm_put_u32(out + 4 * (size_t)k, (uint32_t)tokens[k]);
    }
    if (hdr_bytes) *hdr_bytes = COMM_PREFIX_BYTES + H;
    if (payload_bytes) *payload_bytes = P;
    return total;
}

/* ---- unpack ---------------------------------------------------------------------------------- */

#define COMM_ARENA_ALIGN 16 /* >= alignof(max_align_t) on the targets here */

struct comm_unpacker {
    int max_mb_rows, n_stages;
    ProtobufCAllocator pb_alloc; /* protobuf-c allocates from the arena through this */
    uint8_t *arena;              /* [arena_cap] */
    size_t arena_cap, arena_used;
    int arena_exhausted; /* set when an allocation did not fit (for the message) */
    /* [max_mb_rows + 1] each: what an absent sampling array decodes to */
    float *def_zero_f32, *def_one_f32;
    uint64_t *def_zero_u64;
    uint32_t *def_zero_u32;
    int32_t *def_minus1_i32;
};

static void *comm_arena_alloc(void *data, size_t size)
{
    comm_unpacker *u = data;
    size_t off = (u->arena_used + COMM_ARENA_ALIGN - 1) & ~(size_t)(COMM_ARENA_ALIGN - 1);
    if (size == 0) size = 1;
    if (off > u->arena_cap || size > u->arena_cap - off) {
        u->arena_exhausted = 1;
        return NULL; /* protobuf-c fails the unpack cleanly */
    }
    u->arena_used = off + size;
    return u->arena + off;
}

/* Nothing to free one by one: the arena is reset at the next comm_unpack. */
static void comm_arena_free(void *data, void *ptr)
{
    (void)data;
    (void)ptr;
}

/* Arena bytes for the largest valid header: every block protobuf-c allocates while decoding
 * it, plus our comm_bypass copy. */
static size_t comm_arena_bytes(int max_mb_rows, int n_stages)
{
    size_t r = (size_t)max_mb_rows, nb = comm_bypass_limit(n_stages);
    /* protobuf-c scans fields into slabs of 16, 32, 64, ... members beyond the 16 on its
     * stack (members of 32 bytes on LP64; bound 64): at most 2 x the member count. */
    size_t members = 16 + nb;
    size_t a = 0;
    a = comm_add(a, sizeof(Modpipe__PacketHeader) + sizeof(Modpipe__BatchDesc));
    a = comm_add(a, comm_mask_bytes(max_mb_rows));         /* present */
    a = comm_add(a, comm_mul(r, 3 * sizeof(int32_t) + 1)); /* slot, pos, token, flags */
    a = comm_add(a, comm_mul(r, 2 * sizeof(float) + 2 * sizeof(uint64_t) + 2 * sizeof(int32_t)));
    a = comm_add(a, (size_t)(STAGE_MAX_RELEASE + 3 * STAGE_MAX_SHARE) * sizeof(int32_t));
    a = comm_add(
        a, comm_mul(nb, sizeof(Modpipe__Bypass *) + sizeof(Modpipe__Bypass) + sizeof(comm_bypass)));
    a = comm_add(a, comm_mul(2 * members, 64));           /* scan slabs */
    a = comm_add(a, comm_mul(64 + nb, COMM_ARENA_ALIGN)); /* per-block padding */
    return comm_add(a, 4096);                             /* slack */
}

comm_unpacker *comm_unpacker_init(int max_mb_rows, int n_stages)
{
    if (max_mb_rows < 0 || n_stages < 1) return NULL;
    size_t cap = comm_arena_bytes(max_mb_rows, n_stages);
    if (cap == SIZE_MAX) return NULL;
    comm_unpacker *u = calloc(1, sizeof *u);
    if (!u) return NULL;
    u->arena = malloc(cap); /* malloc's alignment >= COMM_ARENA_ALIGN */
    if (!u->arena) {
        free(u);
        return NULL;
    }
    size_t nd = (size_t)max_mb_rows + 1;
    u->def_zero_f32 = calloc(nd, sizeof(float));
    u->def_one_f32 = malloc(nd * sizeof(float));
    u->def_zero_u64 = calloc(nd, sizeof(uint64_t));
    u->def_zero_u32 = calloc(nd, sizeof(uint32_t));
    u->def_minus1_i32 = malloc(nd * sizeof(int32_t));
    if (!u->def_zero_f32 || !u->def_one_f32 || !u->def_zero_u64 || !u->def_zero_u32 ||
        !u->def_minus1_i32) {
        comm_unpacker_free(u);
        return NULL;
    }
    for (size_t i = 0; i < nd; i++) {
        u->def_one_f32[i] = 1.0f;
        u->def_minus1_i32[i] = -1;
    }
    u->max_mb_rows = max_mb_rows;
    u->n_stages = n_stages;
    u->arena_cap = cap;
    u->pb_alloc.alloc = comm_arena_alloc;
    u->pb_alloc.free = comm_arena_free;
    u->pb_alloc.allocator_data = u;
    return u;
}

void comm_unpacker_free(comm_unpacker *u)
{
    if (!u) return;
    free(u->arena);
    free(u->def_zero_f32);
    free(u->def_one_f32);
    free(u->def_zero_u64);
    free(u->def_zero_u32);
    free(u->def_minus1_i32);
    free(u);
}

/* Stand-ins for empty arrays, so a valid packet never has NULL pointers. */
/* Targets of empty arrays in a decoded packet (never written: the views are read only). */
static uint8_t comm_empty_u8[8];
static int32_t comm_empty_i32[1];

/* The decoder proper; it fills *out as it checks, so comm_unpack zeroes *out when it fails
 * (the contract in comm.h: a caller never sees a half-filled packet). */
static int comm_unpack_fill(comm_unpacker *u, const uint8_t *buf, size_t len, int D,
                            comm_packet *out, char *err, size_t errlen)
{
    if (len < COMM_PREFIX_BYTES) {
        base_set_err(err, errlen, "packet: %zu bytes, shorter than the 4-byte length prefix", len);
        return -1;
    }
    size_t H = comm_get_u32(buf);
    if (H > len - COMM_PREFIX_BYTES) {
        base_set_err(err, errlen, "packet: header length %zu past the end (packet %zu bytes)", H,
                     len);
        return -1;
    }

    /* Reset here, not after: the previous packet stays valid until now. */
    u->arena_used = 0;
    u->arena_exhausted = 0;
    Modpipe__PacketHeader *h =
        modpipe__packet_header__unpack(&u->pb_alloc, H, buf + COMM_PREFIX_BYTES);
    if (!h) {
        if (u->arena_exhausted)
            base_set_err(err, errlen,
                         "packet: header needs more than the %zu-byte decode arena (header %zu "
                         "bytes, packet %zu bytes)",
                         u->arena_cap, H, len);
        else
            base_set_err(err, errlen,
                         "packet: header does not decode (header %zu bytes, packet %zu "
                         "bytes)",
                         H, len);
        return -1;
    }
    unsigned long long mb = (unsigned long long)h->mb;

    /* Unknown fields: the peer was built from another modpipe.proto. */
    size_t n_unknown = h->base.n_unknown_fields + (h->desc ? h->desc->base.n_unknown_fields : 0);
    for (size_t k = 0; k < h->n_bypass; k++) n_unknown += h->bypass[k]->base.n_unknown_fields;
    if (n_unknown) {
        base_set_err(err, errlen,
                     "packet mb %llu: header has %zu unknown fields (header %zu bytes)", mb,
                     n_unknown, H);
        return -1;
    }
    /* Range checks before narrowing the uint32 fields to int. */
    if (h->mb_rows > (uint32_t)u->max_mb_rows) {
        base_set_err(err, errlen, "packet mb %llu: mb_rows %u above the limit %d", mb,
                     (unsigned)h->mb_rows, u->max_mb_rows);
        return -1;
    }
    if (h->sender >= (uint32_t)u->n_stages || h->receiver >= (uint32_t)u->n_stages) {
        base_set_err(err, errlen, "packet mb %llu: stage %u -> %u out of range (%d stages)", mb,
                     (unsigned)h->sender, (unsigned)h->receiver, u->n_stages);
        return -1;
    }
    if (h->n_rows > h->mb_rows) {
        base_set_err(err, errlen, "packet mb %llu %u->%u: n_rows %u > mb_rows %u", mb,
                     (unsigned)h->sender, (unsigned)h->receiver, (unsigned)h->n_rows,
                     (unsigned)h->mb_rows);
        return -1;
    }
    if (h->present.len != comm_mask_bytes((int)h->mb_rows)) {
        base_set_err(err, errlen, "packet mb %llu %u->%u: mask of %zu bytes for %u rows (want %zu)",
                     mb, (unsigned)h->sender, (unsigned)h->receiver, h->present.len,
                     (unsigned)h->mb_rows, comm_mask_bytes((int)h->mb_rows));
        return -1;
    }
    if (h->desc) {
        const Modpipe__BatchDesc *d = h->desc;
#define COMM_OPT_LEN(n) ((n) != 0 && (n) != h->mb_rows)
        if (COMM_OPT_LEN(d->n_temperature) || COMM_OPT_LEN(d->n_top_p) || COMM_OPT_LEN(d->n_seed) ||
            COMM_OPT_LEN(d->n_seq) || COMM_OPT_LEN(d->n_step) || COMM_OPT_LEN(d->n_target)) {
#undef COMM_OPT_LEN
            base_set_err(
                err, errlen,
                "packet mb %llu %u->%u: descriptor has %zu temperatures, %zu top_p, %zu seeds, "
                "%zu seqs, %zu steps, %zu targets for %u rows",
                mb, (unsigned)h->sender, (unsigned)h->receiver, d->n_temperature, d->n_top_p,
                d->n_seed, d->n_seq, d->n_step, d->n_target, (unsigned)h->mb_rows);
            return -1;
        }
        if (d->n_release > STAGE_MAX_RELEASE) {
            base_set_err(err, errlen, "packet mb %llu: %zu slot releases (limit %d)", mb,
                         d->n_release, STAGE_MAX_RELEASE);
            return -1;
        }
        if (d->n_share % 3 || d->n_share > 3 * STAGE_MAX_SHARE) {
            base_set_err(err, errlen, "packet mb %llu: %zu share values (triples, limit %d)", mb,
                         d->n_share, STAGE_MAX_SHARE);
            return -1;
        }
        if (d->n_slot != h->mb_rows || d->n_pos != h->mb_rows || d->n_token != h->mb_rows ||
            d->flags.len != h->mb_rows) {
            base_set_err(err, errlen,
                         "packet mb %llu %u->%u: descriptor has %zu slots, %zu positions, %zu "
                         "tokens, %zu flags for %u rows",
                         mb, (unsigned)h->sender, (unsigned)h->receiver, d->n_slot, d->n_pos,
                         d->n_token, d->flags.len, (unsigned)h->mb_rows);
            return -1;
        }
    }
    if (h->n_bypass > COMM_MAX_BYPASS) {
        base_set_err(err, errlen, "packet mb %llu: %zu bypass entries (limit %d)", mb, h->n_bypass,
                     COMM_MAX_BYPASS);
        return -1;
    }

    out->kind = (comm_pkt_kind)h->kind;
    out->mb = h->mb;
    out->sender = (int)h->sender;
    out->receiver = (int)h->receiver;
    out->mb_rows = (int)h->mb_rows;
    out->n_rows = (int)h->n_rows;
    out->dtype = (stage_dtype)h->dtype;
    out->present = h->present.data ? h->present.data : comm_empty_u8;
    if (h->desc) {
        out->has_desc = 1;
        out->rows.n = out->mb_rows;
        out->rows.id = out->mb;
        out->rows.slot = h->desc->slot ? h->desc->slot : comm_empty_i32;
        out->rows.pos = h->desc->pos ? h->desc->pos : comm_empty_i32;
        out->rows.token = h->desc->token ? h->desc->token : comm_empty_i32;
        out->rows.flags = h->desc->flags.data ? h->desc->flags.data : comm_empty_u8;
        const Modpipe__BatchDesc *d = h->desc;
        out->rows.temperature = d->n_temperature ? d->temperature : u->def_zero_f32;
        out->rows.top_p = d->n_top_p ? d->top_p : u->def_one_f32;
        out->rows.seed = d->n_seed ? d->seed : u->def_zero_u64;
        out->rows.seq = d->n_seq ? d->seq : u->def_zero_u64;
        out->rows.step = d->n_step ? d->step : u->def_zero_u32;
        out->rows.target = d->n_target ? d->target : u->def_minus1_i32;
        out->rows.n_release = (int)d->n_release;
        out->rows.release = d->release ? d->release : comm_empty_i32;
        out->rows.n_share = (int)(d->n_share / 3);
        out->rows.share = d->share ? d->share : comm_empty_i32;
    }
    if (h->n_bypass > 0) {
        /* [n_bypass] in the arena, like the rest of the decoded header */
        comm_bypass *bp = comm_arena_alloc(u, h->n_bypass * sizeof *bp);
        if (!bp) {
            base_set_err(err, errlen,
                         "packet mb %llu: %zu bypass entries do not fit the decode arena", mb,
                         h->n_bypass);
            return -1;
        }
        for (size_t k = 0; k < h->n_bypass; k++) {
            uint32_t f = h->bypass[k]->from_stage, t = h->bypass[k]->to_stage;
            if (f >= (uint32_t)u->n_stages || t >= (uint32_t)u->n_stages) {
                base_set_err(err, errlen,
                             "packet mb %llu: bypass %u -> %u out of range (%d stages)", mb,
                             (unsigned)f, (unsigned)t, u->n_stages);
                return -1;
            }
            bp[k].from = (int)f;
            bp[k].to = (int)t;
        }
        out->n_bypass = (int)h->n_bypass;
        out->bypass = bp;
    }
    if (comm_check(out, u->n_stages, err, errlen)) return -1;

    if (out->kind == COMM_PKT_ROWS && D <= 0) {
        base_set_err(err, errlen, "packet mb %llu: row width D %d", mb, D);
        return -1;
    }
    size_t have = len - COMM_PREFIX_BYTES - H;
    size_t want = comm_payload_bytes(out, D);
    if (have != want) {
        if (out->kind == COMM_PKT_ROWS)
            base_set_err(err, errlen,
                         "packet mb %llu %d->%d: payload %zu bytes, want %zu (%d rows x D %d x %s) "
                         "(header %zu bytes, packet %zu bytes)",
                         mb, out->sender, out->receiver, have, want, out->n_rows, D,
                         stage_dtype_name(out->dtype), H, len);
        else
            base_set_err(err, errlen,
                         "packet mb %llu %d->%d: %s payload %zu bytes, want %zu (header %zu bytes, "
                         "packet %zu bytes)",
                         mb, out->sender, out->receiver,
                         out->kind == COMM_PKT_TOKENS ? "TOKENS" : "END", have, want, H, len);
        return -1;
    }
    out->payload = buf + COMM_PREFIX_BYTES + H;
    out->payload_bytes = have;
    if (out->kind == COMM_PKT_TOKENS)
        for (int k = 0; k < out->n_rows; k++) {
            int32_t t = comm_packet_token(out, k);
            if (t < 0 && t != STAGE_TOKEN_KV_LOST) {
                base_set_err(err, errlen, "packet mb %llu %d->%d: token %d is negative (%d)", mb,
                             out->sender, out->receiver, k, (int)t);
                return -1;
            }
        }
    return 0;
}

int comm_unpack(comm_unpacker *u, const uint8_t *buf, size_t len, int D, comm_packet *out,
                char *err, size_t errlen)
{
    if (!u || !out || (!buf && len > 0)) {
        base_set_err(err, errlen, "packet: no unpacker, buffer or output");
        if (out) memset(out, 0, sizeof *out);
        return -1;
    }
    memset(out, 0, sizeof *out);
    int rc = comm_unpack_fill(u, buf, len, D, out, err, errlen);
    if (rc) memset(out, 0, sizeof *out);
    return rc;
}

/* ---- payload access -------------------------------------------------------------------------- */

void comm_scatter_rows(const comm_packet *p, int D, float *x)
{
    if (!p || !x || p->kind != COMM_PKT_ROWS || D <= 0) return;
    size_t row = (size_t)D * stage_dtype_size(p->dtype); /* bytes of one payload row */
    const uint8_t *src = p->payload;                     /* [n_rows][D] wire dtype */
    for (int i = 0; i < p->mb_rows; i++)
        if (comm_mask_get(p->present, i)) {
            stage_dtype_to_f32(p->dtype, src, x + (size_t)i * (size_t)D, (size_t)D);
            src += row;
        }
}

int32_t comm_packet_token(const comm_packet *p, int k)
{
    return (int32_t)comm_get_u32(p->payload + 4 * (size_t)k);
}

void comm_scatter_tokens(const comm_packet *p, int32_t *tok)
{
    if (!p || !tok || p->kind != COMM_PKT_TOKENS) return;
    int k = 0;
    for (int i = 0; i < p->mb_rows; i++)
        if (comm_mask_get(p->present, i)) tok[i] = comm_packet_token(p, k++);
}
