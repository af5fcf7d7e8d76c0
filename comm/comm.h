/* comm/comm.h — moving rows between pipeline stages (docs/SPEC.md §4).
 *
 * A packet on the wire is one contiguous buffer:
 *
 *     [u32 little-endian H][H bytes: protobuf-c modpipe.PacketHeader][payload]
 *
 * payload = the present rows packed in micro-batch order, [n_rows][D] in the wire dtype for
 * COMM_PKT_ROWS; int32 little-endian token ids [n_rows] for COMM_PKT_TOKENS; empty for
 * COMM_PKT_END. Activations are never protobuf repeated floats: they stay raw after the header.
 *
 * The present-rows bitmask covers the micro-batch's mb_rows rows, bit i = byte i/8, bit i%8
 * (LSB first); trailing bits past mb_rows are zero.
 *
 * Ownership: comm_pack writes into a caller buffer. comm_unpack decodes into a comm_unpacker,
 * which owns a fixed arena sized at init (protobuf-c allocates from it, so decoding a packet
 * does no malloc); the comm_packet it fills points into that arena and into the input buffer
 * and stays valid until the next comm_unpack on the same unpacker.
 *
 * Errors: return non-zero with one line in err. comm_unpack rejects anything inconsistent —
 * short buffer, header length past the end, protobuf failure (protobuf-c says nothing; the
 * message gives the lengths), unknown kind or dtype, mask of the wrong length or with bits
 * past mb_rows, popcount != n_rows, payload length != n_rows * row bytes, descriptor arrays of
 * the wrong length, bypass stages out of range, mb_rows above the unpacker's limit.
 * Also (comm_pack checks the same, except stage < n_stages which it cannot know): unknown
 * protobuf fields; sender/receiver >= n_stages; ROWS going backwards (sender >= receiver);
 * a descriptor on anything but a ROWS chain packet, or a ROWS chain packet without one; a
 * bypass list without a descriptor; bypass entries not from < to, or listed twice; negative
 * slot/pos/token ids; flags bits other than STAGE_ROW_*; SAMPLE without NEED_LOGITS; a SAMPLE
 * row whose temperature is not finite or whose top_p is not in (0, 1]; target < -1; more than
 * STAGE_MAX_RELEASE releases, negative or repeated ones; END with rows; more than
 * COMM_MAX_BYPASS entries. A failed comm_unpack zeroes *out (and, having reset the arena,
 * ends the previous packet's lifetime too).
 */
#ifndef COMM_COMM_H
#define COMM_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "stage/batch.h"
#include "stage/dtype.h"

/* ---- present-rows bitmasks ------------------------------------------------------------------- */
static inline size_t comm_mask_bytes(int n) { return (size_t)(n + 7) / 8; }
static inline void comm_mask_set(uint8_t *m, int i) { m[i >> 3] |= (uint8_t)(1u << (i & 7)); }
static inline int comm_mask_get(const uint8_t *m, int i) { return (m[i >> 3] >> (i & 7)) & 1; }
int comm_mask_count(const uint8_t *m, int n);

/* ---- wire dtypes: the dtype table of stage/dtype.h (f32 exact; bf16 / f16 lossy) ------------- */
/* ---- packets --------------------------------------------------------------------------------- */
typedef enum { COMM_PKT_ROWS = 0, COMM_PKT_TOKENS = 1, COMM_PKT_END = 2 } comm_pkt_kind;

/* Per-row flags on the wire: STAGE_ROW_* (stage/batch.h); slot releases per descriptor: at
 * most STAGE_MAX_RELEASE. */

typedef struct {
    int from, to; /* stage `from` sent a bypass packet for this micro-batch to stage `to` */
} comm_bypass;

/* Most bypass entries one packet may list (comm_pack builds the protobuf-c structs on its
 * stack, ~40 bytes an entry). Entries are distinct pairs from < to, so 512 covers every pair
 * of a 32-stage pipeline. */
#define COMM_MAX_BYPASS 512

typedef struct {
    comm_pkt_kind kind;
    uint64_t mb;            /* micro-batch id */
    int sender, receiver;   /* stage indices */
    int mb_rows;            /* rows in the micro-batch (bits in `present`) */
    int n_rows;             /* rows carried = popcount(present) */
    stage_dtype dtype;      /* payload dtype of ROWS packets */
    const uint8_t *present; /* [comm_mask_bytes(mb_rows)] */

    /* Chain packets (sender + 1 == receiver) carry the descriptor; else has_desc = 0.
     * rows: the micro-batch's row descriptor (stage/batch.h) as a view; its n and id are
     * mb_rows and mb (comm_pack reads those two from the header fields above), its tag is
     * not sent (NULL after comm_unpack). comm_pack: slot, pos, token and flags are required;
     * a NULL sampling / scoring column (temperature, top_p, seed, seq, step, target) is left
     * off the wire and means every row has its default (stage/batch.h); comm_unpack always
     * sets all of them (into its arena or at shared defaults: read only). */
    int has_desc;
    stage_batch rows;
    int n_bypass;
    const comm_bypass *bypass; /* [n_bypass] */

    /* Set by comm_unpack: the raw payload inside the input buffer. */
    const uint8_t *payload;
    size_t payload_bytes;
} comm_packet;

/* Upper bound of a packed packet for a micro-batch of mb_rows rows, width D, n_stages. */
size_t comm_packet_max_bytes(int mb_rows, int D, int n_stages);

/* Pack a ROWS packet: rows of x [mb_rows][D] whose bit is set in hdr->present, in order,
 * converted to hdr->dtype. hdr->n_rows must equal popcount(present).
 * TOKENS packet: `tokens` [n_rows] int32 is the payload (x ignored). END: no payload.
 * Writes *hdr_bytes (4 + H) and *payload_bytes; returns total length, or 0 on error (cap too
 * small, inconsistent header) with a message in err. */
size_t comm_pack(const comm_packet *hdr, const float *x, int D, const int32_t *tokens, uint8_t *buf,
                 size_t cap, size_t *hdr_bytes, size_t *payload_bytes, char *err, size_t errlen);

typedef struct comm_unpacker comm_unpacker;
/* max_mb_rows bounds the micro-batch size accepted; n_stages bounds stage indices. */
comm_unpacker *comm_unpacker_init(int max_mb_rows, int n_stages);
void comm_unpacker_free(comm_unpacker *u);
/* Decode buf[0..len). D is the row width expected for ROWS packets. */
int comm_unpack(comm_unpacker *u, const uint8_t *buf, size_t len, int D, comm_packet *out,
                char *err, size_t errlen);

/* Scatter the payload rows of a ROWS packet into x [mb_rows][D] at the present rows
 * (decoding the wire dtype). */
void comm_scatter_rows(const comm_packet *p, int D, float *x);

/* TOKENS packets: the k-th carried token id, k < n_rows (the payload is int32 LE and may be
 * unaligned, so read it through this). */
int32_t comm_packet_token(const comm_packet *p, int k);
/* Scatter a TOKENS packet's ids into tok [mb_rows] at the present rows. */
void comm_scatter_tokens(const comm_packet *p, int32_t *tok);

#endif
