/* engine/pipeline_stats.c — the loop's counters: this rank's record, and on rank 0 the
 * gathered records as the --stats JSON and the summary (engine/pipeline_impl.h). */
#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "engine/pipeline_impl.h"
#include "engine/topo.h"
#include "comm/link.h"
#include "stage/stage.h"

/* ---- Stats: gathered on rank 0, written as JSON, one summary line. --------------------------- */

/* This rank's record (engine/stats.h): links [S], layers [n_layers] (zero off the stage). */
void engine_loop_stats_fill(engine_loop *c, engine_rank_stat *r, engine_link_stat *links,
                            engine_layer_stat *layers)
{
    for (int t = 0; t < c->S; t++) {
        const comm_link_stats *ls = comm_links_stats(c->links, t);
        links[t] = (engine_link_stat){.packets = (double)ls->packets,
                                      .rows = (double)ls->rows,
                                      .header_bytes = (double)ls->header_bytes,
                                      .payload_bytes = (double)ls->payload_bytes};
    }
    struct rusage ru; /* peak resident set of this rank (Linux: KiB), mmap'd weights included */
    stage_kv_stats ks;
    stage_state_kv_stats(c->st, &ks);
    size_t huge = 0;
    stage_model_huge_bytes(c->m, &huge);
    *r = (engine_rank_stat){
        .dense_rows = c->dense_rows,
        .busy_s = c->busy_s,
        .wait_s = comm_links_wait_seconds(c->links),
        .weight_bytes = (double)stage_model_weight_bytes(c->m),
        .kv_bytes_allocated = (double)stage_state_kv_alloc_bytes(c->st),
        .kv_page_positions = ks.page,
        .kv_pages_total = ks.pages_total,
        .kv_pages_peak = ks.pages_peak,
        .kv_pages_used_at_end = ks.pages_used,
        .kv_page_bytes = (double)ks.page_bytes,
        .peak_rss_bytes = getrusage(RUSAGE_SELF, &ru) == 0 ? (double)ru.ru_maxrss * 1024.0 : 0.0,
        .tp_io_bytes = stage_state_tp_io_bytes(c->st),
        .huge_page_bytes = (double)huge,
        .nll_sum = c->nll_sum,
        .nll_count = (double)c->nll_count,
    };
    memset(layers, 0, (size_t)c->o.pipe.cfg->n_layers * sizeof *layers);
    stage_range rg = stage_model_range(c->m);
    for (int l = rg.first; l <= rg.last; l++) {
        const stage_layer_stats *ls = stage_state_layer_stats(c->st, l);
        layers[l] = (engine_layer_stat){.rows = (double)ls->rows,
                                        .active_rows = (double)ls->active,
                                        .kv_entries = (double)ls->kv_entries,
                                        .flops = ls->flops,
                                        .flops_dense = ls->flops_dense,
                                        .seconds = ls->seconds,
                                        .tp_bytes = ls->tp_bytes};
    }
}

void engine_loop_report(engine_loop *c, const engine_stats *all, double seconds,
                        engine_loop_result *res)
{
    const engine_loop_opts *o = &c->o;
    const stage_config *cfg = o->pipe.cfg;
    const int S = c->S, L = cfg->n_layers, D = c->D;
    const double ws = (double)stage_dtype_size(o->pipe.wire);
    const double kvd = (double)cfg->n_kv_heads * cfg->head_dim;
    const double kvs = (double)stage_dtype_size(STAGE_KV_DTYPE); /* bytes of a K or V value */
    double hdr = 0, pay = 0, tok_bytes = 0, dense = 0, rows_total = 0, tp_total = 0;

    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "command", o->command ? o->command : "");
    cJSON_AddStringToObject(j, "model", o->pipe.model_dir);
    cJSON_AddNumberToObject(j, "ranks", S);
    cJSON_AddStringToObject(j, "wire_dtype", stage_dtype_name(o->pipe.wire));
    cJSON_AddStringToObject(j, "weights_dtype",
                            o->pipe.weights_dtype < 0
                                ? "checkpoint"
                                : stage_wdtype_name((stage_dtype)o->pipe.weights_dtype));
    cJSON_AddStringToObject(j, "transport", o->pipe.dense_transport ? "dense" : "sparse");
    cJSON_AddNumberToObject(j, "micro_batch", o->pipe.micro_batch);
    cJSON_AddNumberToObject(j, "max_in_flight", o->pipe.max_in_flight);
    cJSON_AddNumberToObject(j, "hidden_size", D);
    cJSON_AddNumberToObject(j, "micro_batches", (double)c->next_mb);

    cJSON *stages = cJSON_AddArrayToObject(j, "stages");
    for (int s = 0; s < S; s++) {
        const engine_rank_stat *f = &all->rank[s];
        cJSON *e = cJSON_CreateObject();
        char r[32];
        snprintf(r, sizeof r, "%d-%d", o->pipe.plan->st[s].first, o->pipe.plan->st[s].last);
        cJSON_AddNumberToObject(e, "stage", s);
        cJSON_AddStringToObject(e, "layers", r);
        /* the page pool: its size, the most pages held at once, pages still held once every
         * slot was released at the end (0 unless the accounting lost pages); tensor
         * parallelism: the bytes moved inside the stage's group outside the layers
         * (micro-batches handed to the group, LM head); weight, KV and RSS bytes are the
         * leader's (each rank of the group holds about as much) */
        engine_stats_rank_json(e, f);
        cJSON_AddNumberToObject(e, "busy_fraction", seconds > 0 ? f->busy_s / seconds : 0);
        cJSON_AddNumberToObject(e, "kv_bytes_peak", f->kv_pages_peak * f->kv_page_bytes);
        cJSON_AddNumberToObject(e, "ranks", engine_stage_ranks(&o->pipe.plan->st[s]));
        tp_total += f->tp_io_bytes;
        cJSON_AddItemToArray(stages, e);
    }
    if (o->stats_path && o->pipe.progress) {
        fprintf(stderr, "[modpipe] peak RSS per stage:");
        for (int s = 0; s < S; s++) {
            const engine_rank_stat *f = &all->rank[s];
            fprintf(stderr, "%s %d: %.1f MiB (weights %.1f MiB, KV %.1f MiB)", s ? "," : "", s,
                    f->peak_rss_bytes / 1048576.0, f->weight_bytes / 1048576.0,
                    f->kv_bytes_allocated / 1048576.0);
        }
        fprintf(stderr, "\n");
    }

    cJSON *links = cJSON_AddArrayToObject(j, "links");
    for (int s = 0; s < S; s++) {
        const double dense_rows = all->rank[s].dense_rows;
        for (int t = 0; t < S; t++) {
            const engine_link_stat *ls = &all->link[(size_t)s * S + t];
            int chain = t == s + 1;
            if (ls->packets == 0 && !chain) continue;
            cJSON *e = cJSON_CreateObject();
            char name[32];
            snprintf(name, sizeof name, "%d->%d", s, t);
            const char *kind = chain ? "chain" : (t > s ? "bypass" : "tokens");
            cJSON_AddStringToObject(e, "link", name);
            cJSON_AddNumberToObject(e, "from", s);
            cJSON_AddNumberToObject(e, "to", t);
            cJSON_AddStringToObject(e, "kind", kind);
            engine_stats_link_json(e, ls);
            cJSON_AddNumberToObject(e, "dense_rows", chain ? dense_rows : 0);
            cJSON_AddNumberToObject(e, "dense_bytes", chain ? dense_rows * D * ws : 0);
            cJSON_AddItemToArray(links, e);
            hdr += ls->header_bytes;
            if (t > s)
                pay += ls->payload_bytes;
            else
                tok_bytes += ls->payload_bytes;
            if (chain) dense += dense_rows * D * ws;
        }
    }

    cJSON *layers = cJSON_AddArrayToObject(j, "layers");
    double kv = 0, kv_dense = 0, fl = 0, fl_dense = 0;
    for (int l = 0; l < L; l++) {
        int s = 0;
        while (s < S - 1 && l > o->pipe.plan->st[s].last) s++;
        const engine_layer_stat *e = &all->layer[(size_t)s * L + l];
        cJSON *x = cJSON_CreateObject();
        cJSON_AddNumberToObject(x, "layer", l);
        cJSON_AddStringToObject(x, "type", stage_kind_name(cfg->layer_kind[l]));
        cJSON_AddNumberToObject(x, "stage", s);
        engine_stats_layer_json(x, e); /* tp_bytes: inside the stage's rank group */
        cJSON_AddNumberToObject(x, "participation", e->rows > 0 ? e->active_rows / e->rows : 0);
        cJSON_AddNumberToObject(x, "kv_bytes", e->kv_entries * kvd * 2 * kvs);
        cJSON_AddNumberToObject(x, "kv_bytes_dense", e->rows * kvd * 2 * kvs);
        tp_total += e->tp_bytes;
        cJSON_AddItemToArray(layers, x);
        kv += e->kv_entries * kvd * 2 * kvs;
        kv_dense += e->rows * kvd * 2 * kvs;
        fl += e->flops;
        fl_dense += e->flops_dense;
        if (l == 0) rows_total = e->rows;
    }
    double wire = hdr + pay + tok_bytes;
    cJSON *tot = cJSON_AddObjectToObject(j, "total");
    cJSON_AddNumberToObject(tot, "header_bytes", hdr);
    cJSON_AddNumberToObject(tot, "payload_bytes", pay);
    cJSON_AddNumberToObject(tot, "token_bytes", tok_bytes);
    cJSON_AddNumberToObject(tot, "wire_bytes", wire);
    cJSON_AddNumberToObject(tot, "dense_bytes", dense);
    cJSON_AddNumberToObject(tot, "payload_ratio", dense > 0 ? pay / dense : 0);
    cJSON_AddNumberToObject(tot, "ratio", dense > 0 ? wire / dense : 0);
    /* bytes moved inside tensor-parallel stage groups (not on pipeline links; 0 without) */
    cJSON_AddNumberToObject(tot, "tp_bytes", tp_total);
    cJSON_AddNumberToObject(j, "kv_bytes", kv);
    cJSON_AddNumberToObject(j, "kv_bytes_dense", kv_dense);
    cJSON_AddNumberToObject(j, "flops", fl);
    cJSON_AddNumberToObject(j, "flops_dense", fl_dense);
    cJSON_AddNumberToObject(j, "rows", rows_total);
    double ntok = o->progress_tokens ? (double)c->tokens_done : rows_total;
    cJSON_AddNumberToObject(j, "tokens", ntok);
    cJSON_AddNumberToObject(j, "seconds", seconds);
    cJSON_AddNumberToObject(j, "tokens_per_s", seconds > 0 ? ntok / seconds : 0);

    double nll = 0, nn = 0;
    for (int s = 0; s < S; s++) {
        nll += all->rank[s].nll_sum;
        nn += all->rank[s].nll_count;
    }
    if (o->report_nll) {
        cJSON_AddNumberToObject(j, "mean_nll", nn > 0 ? nll / nn : 0);
        cJSON_AddNumberToObject(j, "perplexity", nn > 0 ? exp(nll / nn) : 0);
    }
    res->nll_sum = nll;
    res->nll_count = (long)nn;
    res->wire_bytes = wire;
    res->dense_bytes = dense;
    res->payload_bytes = pay;
    res->header_bytes = hdr;

    if (o->stats_path) {
        char *txt = cJSON_Print(j);
        FILE *f = fopen(o->stats_path, "w");
        if (!f || !txt || fputs(txt, f) < 0 || fputc('\n', f) == EOF)
            fprintf(stderr, "modpipe: cannot write stats file %s\n", o->stats_path);
        if (f) fclose(f);
        free(txt);
    }
    cJSON_Delete(j);
}
