/* engine/stats.h — the pipeline's counters, each declared once.
 *
 * Three X-macro lists declare every field: X(name, json, what). From each list come the
 * struct (all doubles, so a record is a plain run of MPI_DOUBLEs), its field count (the MPI
 * gather's count, checked against the struct by _Static_assert) and the JSON writer
 * (engine_stats_*_json adds every field with json = 1 under its own name; json = 0 fields are
 * inputs of derived numbers the caller writes, e.g. participation = active_rows / rows).
 *   ENGINE_LINK_STATS   one link from this rank to rank t (comm/link.h counters)
 *   ENGINE_RANK_STATS   one rank at the end of a run
 *   ENGINE_LAYER_STATS  one layer, on the rank of the stage that holds it
 * ENGINE_REPORT_STATS is the serve loop's periodic link report (rank > 0 -> 0, tag 4,
 * docs/SPEC.md §4.10): the same links plus a few counters, as uint64 on the wire, in list order.
 *
 * engine_stats_gather collects every rank's record on rank 0 (collective over comm).
 * Ownership: engine_stats owns its arrays (engine_stats_free). Threads: the caller's.
 */
#ifndef ENGINE_STATS_H
#define ENGINE_STATS_H

#include <cJSON.h>
#include <mpi.h>
#include <stdint.h>

#define ENGINE_LINK_STATS(X)                                                                       \
    X(packets, 1, "packets sent")                                                                  \
    X(header_bytes, 1, "descriptor and mask bytes")                                                \
    X(payload_bytes, 1, "activation (or token) bytes")                                             \
    X(rows, 1, "rows sent")

#define ENGINE_RANK_STATS(X)                                                                       \
    X(dense_rows, 0, "rows a dense pipeline sends on link rank -> rank+1")                         \
    X(busy_s, 1, "seconds computing")                                                              \
    X(wait_s, 1, "seconds waiting on links")                                                       \
    X(weight_bytes, 1, "bytes of the stage's weights as held")                                     \
    X(kv_bytes_allocated, 1, "KV pool bytes allocated at start")                                   \
    X(kv_page_positions, 1, "positions per KV page")                                               \
    X(kv_pages_total, 1, "pages in the KV pool")                                                   \
    X(kv_pages_peak, 1, "most pages held at once")                                                 \
    X(kv_pages_used_at_end, 1, "pages still held once every slot was released (0 unless lost)")    \
    X(kv_page_bytes, 0, "bytes of one page (kv_bytes_peak = kv_pages_peak x this)")                \
    X(peak_rss_bytes, 1, "peak resident set of the rank, mmap'd weights included")                 \
    X(huge_page_bytes, 1, "weight bytes on 2 MiB pages at the end (--huge-pages)")                 \
    X(tp_io_bytes, 1, "bytes moved inside the stage's TP group outside the layers")                \
    X(nll_sum, 0, "summed NLL of the scored tokens (the head)")                                    \
    X(nll_count, 0, "scored tokens (the head)")

#define ENGINE_LAYER_STATS(X)                                                                      \
    X(rows, 1, "rows that reached the layer")                                                      \
    X(active_rows, 1, "rows the layer computed on")                                                \
    X(kv_entries, 0, "K/V positions written (kv_bytes = this x kv_heads x head_dim x 2 x 4)")      \
    X(flops, 1, "FLOPs spent")                                                                     \
    X(flops_dense, 1, "FLOPs a dense layer would spend on the same rows")                          \
    X(seconds, 1, "seconds in the layer")                                                          \
    X(tp_bytes, 1, "bytes moved inside the TP group by the layer")

/* the link report's counters after the links (uint64 on the wire) */
#define ENGINE_REPORT_STATS(X)                                                                     \
    X(dense_rows, 0, "as in ENGINE_RANK_STATS")                                                    \
    X(final, 0, "1: the rank's last report")                                                       \
    X(kv_pages_total, 0, "stage_kv_stats")                                                         \
    X(kv_pages_used, 0, "")                                                                        \
    X(kv_pages_peak, 0, "")                                                                        \
    X(kv_page_bytes, 0, "")                                                                        \
    X(kv_bytes_dense, 0, "")                                                                       \
    X(kv_pages_routed, 0, "")                                                                      \
    X(kv_pages_skip, 0, "")                                                                        \
    X(kv_pages_full, 0, "")                                                                        \
    X(kv_page, 0, "positions per page")                                                            \
    X(kv_layers, 0, "layers holding pages")                                                        \
    X(kv_pages_cached, 0, "of kv_pages_used, held by parked sequences only (prefix cache)")        \
    X(kv_entries_live, 0, "entries of the running sequences, every layer")                         \
    X(kv_positions_live, 0, "positions they reached x layers (every row kept)")                    \
    X(mb_done, 0, "micro-batches the stage finished and handed on (stage 0: issued)")

#define ENGINE_STATS_DOUBLE(name, json, what) double name;
#define ENGINE_STATS_U64(name, json, what) uint64_t name;
#define ENGINE_STATS_COUNT(name, json, what) +1

typedef struct {
    ENGINE_LINK_STATS(ENGINE_STATS_DOUBLE)
} engine_link_stat;
typedef struct {
    ENGINE_RANK_STATS(ENGINE_STATS_DOUBLE)
} engine_rank_stat;
typedef struct {
    ENGINE_LAYER_STATS(ENGINE_STATS_DOUBLE)
} engine_layer_stat;

enum {
    ENGINE_LINK_STAT_N = 0 ENGINE_LINK_STATS(ENGINE_STATS_COUNT),
    ENGINE_RANK_STAT_N = 0 ENGINE_RANK_STATS(ENGINE_STATS_COUNT),
    ENGINE_LAYER_STAT_N = 0 ENGINE_LAYER_STATS(ENGINE_STATS_COUNT),
    ENGINE_REPORT_STAT_N = 0 ENGINE_REPORT_STATS(ENGINE_STATS_COUNT),
};

/* A link report: [S] links as uint64, then the counters above. */
typedef struct {
    ENGINE_LINK_STATS(ENGINE_STATS_U64)
} engine_link_report;
typedef struct {
    ENGINE_REPORT_STATS(ENGINE_STATS_U64)
} engine_report_tail;

/* Rank 0 after engine_stats_gather: every rank's record. */
typedef struct {
    int n_ranks, n_layers;
    engine_rank_stat *rank;   /* [n_ranks] */
    engine_link_stat *link;   /* [n_ranks][n_ranks]: from, to */
    engine_layer_stat *layer; /* [n_ranks][n_layers]: a layer's numbers are on its stage's row */
} engine_stats;

/* Collective: every rank passes its record (links [n_ranks], layers [n_layers]); rank 0 gets
 * all of them in *all (other ranks: *all zeroed). 0, or -1 when rank 0 is out of memory. */
int engine_stats_gather(MPI_Comm comm, const engine_rank_stat *mine, const engine_link_stat *links,
                        const engine_layer_stat *layers, int n_layers, engine_stats *all);
void engine_stats_free(engine_stats *s);

/* Add every json = 1 field to o under its own name. */
void engine_stats_link_json(cJSON *o, const engine_link_stat *s);
void engine_stats_rank_json(cJSON *o, const engine_rank_stat *s);
void engine_stats_layer_json(cJSON *o, const engine_layer_stat *s);

#endif
