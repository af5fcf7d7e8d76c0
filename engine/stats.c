/* engine/stats.c — gather and JSON of the typed counters (engine/stats.h). */
#include "engine/stats.h"

#include <stdlib.h>
#include <string.h>

/* A record is a run of doubles: the gather counts come from the lists. */
_Static_assert(sizeof(engine_link_stat) == ENGINE_LINK_STAT_N * sizeof(double), "link stats");
_Static_assert(sizeof(engine_rank_stat) == ENGINE_RANK_STAT_N * sizeof(double), "rank stats");
_Static_assert(sizeof(engine_layer_stat) == ENGINE_LAYER_STAT_N * sizeof(double), "layer stats");
_Static_assert(sizeof(engine_link_report) == ENGINE_LINK_STAT_N * sizeof(uint64_t), "report");
_Static_assert(sizeof(engine_report_tail) == ENGINE_REPORT_STAT_N * sizeof(uint64_t), "report");

int engine_stats_gather(MPI_Comm comm, const engine_rank_stat *mine, const engine_link_stat *links,
                        const engine_layer_stat *layers, int n_layers, engine_stats *all)
{
    int rank, S;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &S);
    memset(all, 0, sizeof *all);
    int ok = 1;
    if (rank == 0) {
        all->n_ranks = S;
        all->n_layers = n_layers;
        all->rank = calloc((size_t)S, sizeof *all->rank);
        all->link = calloc((size_t)S * S, sizeof *all->link);
        all->layer = calloc((size_t)S * (n_layers > 0 ? n_layers : 1), sizeof *all->layer);
        ok = all->rank && all->link && all->layer;
    }
    /* every rank takes part even when rank 0 is out of memory (it then gathers nothing) */
    int ok_all = ok;
    MPI_Bcast(&ok_all, 1, MPI_INT, 0, comm);
    if (!ok_all) {
        engine_stats_free(all);
        return -1;
    }
    MPI_Gather(mine, ENGINE_RANK_STAT_N, MPI_DOUBLE, all->rank, ENGINE_RANK_STAT_N, MPI_DOUBLE, 0,
               comm);
    MPI_Gather(links, S * ENGINE_LINK_STAT_N, MPI_DOUBLE, all->link, S * ENGINE_LINK_STAT_N,
               MPI_DOUBLE, 0, comm);
    MPI_Gather(layers, n_layers * ENGINE_LAYER_STAT_N, MPI_DOUBLE, all->layer,
               n_layers * ENGINE_LAYER_STAT_N, MPI_DOUBLE, 0, comm);
    return 0;
}

void engine_stats_free(engine_stats *s)
{
    if (!s) return;
    free(s->rank);
    free(s->link);
    free(s->layer);
    memset(s, 0, sizeof *s);
}

#define ADD_JSON(name, json, what)                                                                 \
    if (json) cJSON_AddNumberToObject(o, #name, s->name);

void engine_stats_link_json(cJSON *o, const engine_link_stat *s) { ENGINE_LINK_STATS(ADD_JSON) }
void engine_stats_rank_json(cJSON *o, const engine_rank_stat *s) { ENGINE_RANK_STATS(ADD_JSON) }
void engine_stats_layer_json(cJSON *o, const engine_layer_stat *s) { ENGINE_LAYER_STATS(ADD_JSON) }
