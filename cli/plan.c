/* cli/plan.c — the shared pipeline options (cli/plan.h). */
#include "cli/plan.h"

#include <stdlib.h>
#include <string.h>

#include "base/err.h"
#include "stage/matmul.h"
#include "stage/wmem.h"

static int read_dtype(const cli_opts *o, const char *name, int *out, char *err, size_t errlen)
{
    const char *s = cli_opt_str(o, name);
    stage_dtype d;
    if (!s) return 0;
    if (stage_dtype_parse(s, &d)) {
        base_set_err(err, errlen, "%s: expected f32, bf16 or f16, got '%s'",
                     cli_opt_origin(o, name), s);
        return -1;
    }
    *out = (int)d;
    return 0;
}

int cli_pipe_opts_read(const cli_opts *o, engine_pipe_opts *p, char *err, size_t errlen)
{
    long mb, inflight, threads;
    double tmo;
    if (cli_opt_long(o, "micro-batch", 1, 1 << 20, 32, &mb, err, errlen)) return -1;
    if (cli_opt_long(o, "max-in-flight", 1, 4096, 0, &inflight, err, errlen)) return -1;
    if (cli_opt_double(o, "timeout", 1.0, 1e7, 0, 300.0, &tmo, err, errlen)) return -1;
    if (cli_opt_long(o, "threads", 1, 1024, 1, &threads, err, errlen)) return -1;
    if (stage_threads_init((int)threads, err, errlen)) return -1;
    p->micro_batch = (int)mb;
    p->max_in_flight = inflight == 0 ? 0 : inflight < 2 ? 2 : (int)inflight;
    p->timeout_s = tmo;
    int wire = STAGE_F32;
    p->weights_dtype = -1;
    if (read_dtype(o, "wire-dtype", &wire, err, errlen)) return -1;
    const char *wts = cli_opt_str(o, "weights-dtype");
    stage_dtype wdt;
    if (wts && stage_wdtype_parse(wts, &wdt)) {
        base_set_err(err, errlen, "%s: expected f32, bf16, f16 or q8_0, got '%s'",
                     cli_opt_origin(o, "weights-dtype"), wts);
        return -1;
    }
    if (wts) p->weights_dtype = (int)wdt;
    p->wire = (stage_dtype)wire;
    static const char *const matmuls[] = {"exact", "fast", NULL};
    int fast;
    if (cli_opt_choice(o, "matmul", matmuls, 0, &fast, err, errlen)) return -1;
    stage_matmul_set_mode(fast ? STAGE_MATMUL_FAST : STAGE_MATMUL_EXACT);
    char thp[160];
    if (cli_opt_has(o, "huge-pages") && !stage_wmem_thp_state(thp, sizeof thp)) {
        base_set_err(err, errlen, "%s: this kernel cannot put memory on huge pages (%s)",
                     cli_opt_origin(o, "huge-pages"), thp);
        return -1;
    }
    stage_wmem_set_huge(cli_opt_has(o, "huge-pages"));
    static const char *const transports[] = {"sparse", "dense", NULL};
    if (cli_opt_choice(o, "transport", transports, 0, &p->dense_transport, err, errlen)) return -1;
    p->progress = !cli_opt_has(o, "quiet");
    long kvp;
    if (cli_opt_long(o, "kv-page", 1, 1 << 20, 16, &kvp, err, errlen)) return -1;
    p->kv = (stage_kv_opts){.page = (int)kvp};
    const char *km = cli_opt_str(o, "kv-mem");
    if (km && (engine_parse_size(km, &p->kv.mem_bytes) || p->kv.mem_bytes == 0)) {
        base_set_err(err, errlen, "%s: expected a size like 512M or 2G, got '%s'",
                     cli_opt_origin(o, "kv-mem"), km);
        return -1;
    }
    return 0;
}

int cli_mem_opts(const cli_opts *o, const char *model, engine_mem_opts *m, char *err, size_t errlen)
{
    memset(m, 0, sizeof *m);
    const char *lim = cli_opt_str(o, "mem-per-rank");
    if (lim && (engine_parse_size(lim, &m->mem_per_rank) || m->mem_per_rank == 0)) {
        base_set_err(err, errlen, "%s: expected a size like 6G, 5000M or 1.5GiB, got '%s'",
                     cli_opt_origin(o, "mem-per-rank"), lim);
        return -1;
    }
    if (engine_weight_dtype(model, &m->weight_dtype, err, errlen)) return -1;
    return engine_keep_dtype(model, &m->keep_dtype, err, errlen);
}

int cli_make_plan(const cli_opts *o, const stage_config *cfg, int world, int part_n,
                  const engine_mem_opts *mem, engine_plan *plan, char *err, size_t errlen)
{
    const cli_opt_val *v = cli_opt(o, "stages");
    long tp;
    if (cli_opt_long(o, "tp", 1, 64, 1, &tp, err, errlen)) return -1;
    char *ranges[256] = {0};
    int ks[256] = {0}, nr = 0, any_k = 0, rc = 0;
    char buf[4096];
    int is_auto = !v->n || (v->n == 1 && !strcmp(v->vals[0], "auto"));
    for (int i = 0; !is_auto && !rc && i < v->n; i++) {
        snprintf(buf, sizeof buf, "%s", v->vals[i]);
        if (strchr(buf, '=')) { /* a YAML mapping item */
            char *lay = NULL;
            long k = 0;
            for (char *t = strtok(buf, " "); t && !rc; t = strtok(NULL, " ")) {
                char *eq = strchr(t, '='), *end = NULL;
                *eq = 0;
                if (!strcmp(t, "layers"))
                    lay = eq + 1;
                else if (!strcmp(t, "ranks") &&
                         (k = strtol(eq + 1, &end, 10), *end || k < 1 || k > 64)) {
                    base_set_err(err, errlen, "%s: stage %d: ranks must be 1..64, got '%s'",
                                 v->origin, nr + 1, eq + 1);
                    rc = -1;
                } else if (strcmp(t, "ranks")) {
                    base_set_err(err, errlen, "%s: stage %d: unknown key '%s' (layers, ranks)",
                                 v->origin, nr + 1, t);
                    rc = -1;
                }
            }
            if (!rc && !lay) {
                base_set_err(err, errlen, "%s: stage %d has no layers", v->origin, nr + 1);
                rc = -1;
            }
            if (!rc && nr < 256) {
                ks[nr] = (int)k;
                any_k |= k > 0;
                ranges[nr++] = strdup(lay);
            }
            continue;
        }
        for (char *t = strtok(buf, ", "); t && nr < 256 && !rc; t = strtok(NULL, ", ")) {
            char *colon = strchr(t, ':'), *end = NULL;
            if (colon) {
                long k = strtol(colon + 1, &end, 10);
                if (*end || k < 1 || k > 64) {
                    base_set_err(err, errlen, "%s: '%s': ranks after ':' must be 1..64", v->origin,
                                 t);
                    rc = -1;
                }
                *colon = 0;
                ks[nr] = (int)k;
                any_k = 1;
            }
            ranges[nr++] = strdup(t);
        }
    }
    int n = part_n;
    if (!rc && n <= 0) {
        if (any_k)
            n = nr;
        else if (world % tp) {
            base_set_err(err, errlen,
                         "-np %d is not a multiple of --tp %ld (every stage spans %ld ranks)",
                         world, tp, tp);
            rc = -1;
        } else
            n = world / (int)tp;
    }
    if (!rc && is_auto) {
        rc = engine_partition_auto_mem(cfg, n, mem, plan, err, errlen);
        if (rc && mem && mem->mem_per_rank) { /* name where the limit came from */
            char e3[1024];
            snprintf(e3, sizeof e3, "%s", err);
            const char *origin = cli_opt_origin(o, "mem-per-rank");
            const char *at = strstr(e3, "--mem-per-rank");
            if (at && strcmp(origin, "--mem-per-rank"))
                base_set_err(err, errlen, "%.*s%s%s", (int)(at - e3), e3, origin, at + 14);
        }
    } else if (!rc) {
        char e2[512];
        rc = engine_partition_explicit_mem(cfg, (const char *const *)ranges, nr, n, mem, plan, e2,
                                           sizeof e2);
        if (rc)
            base_set_err(err, errlen, "%s: %s", v->origin,
                         strncmp(e2, "stages: ", 8) ? e2 : e2 + 8);
    }
    for (int s = 0; !rc && s < plan->n_stages; s++) plan->st[s].ranks = ks[s] > 0 ? ks[s] : (int)tp;
    for (int i = 0; i < nr; i++) free(ranges[i]);
    return rc;
}
