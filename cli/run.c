/* cli/run.c — `modpipe generate` and `modpipe eval` (cli/run.h). */
#include "cli/run.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/err.h"
#include "base/ids.h"
#include "cli/opts.h"
#include "cli/plan.h"
#include "cli/start.h"
#include "comm/link.h"
#include "engine/batch.h"
#include "engine/partition.h"
#include "stage/config.h"
#include "tok/tok.h"

static void usage(int cmd)
{
    if (cmd == CLI_GENERATE)
        cli_opts_usage(
            stdout, cmd,
            "modpipe generate: greedy or sampled continuation of prompts (ids or text).\n"
            "Prints one line per sequence: 'generated ID,ID,...' for id prompts (the EOS id\n"
            "included when it stopped the sequence), 'text: ...' for text prompts, then the\n"
            "wire summary. Sequences: --prompt-ids, then --prompts-file, then --prompt.\n"
            "A sequence stops at --max-new tokens or at the model's EOS (not with --ignore-eos).\n",
            "  mpirun --oversubscribe -np 4 modpipe generate --model demo-model --prompt-ids 1,2,3 "
            "--max-new 16 --micro-batch 8 --stats stats.json\n");
    else
        cli_opts_usage(
            stdout, cmd,
            "modpipe eval: teacher-forced forward of each sequence (any lengths); prints the\n"
            "mean NLL over every token but each sequence's first, and the perplexity.\n"
            "topk routing (non-causal) is exact here: a sequence is never split.\n",
            "  mpirun --oversubscribe -np 4 modpipe eval --model demo-model --tokens-file "
            "tokens.txt --micro-batch 8 --stats stats.json\n");
}

/* ---- Token lists ----------------------------------------------------------------------------- */

/* Parse "1,2,3" / "1 2 3" (base/ids.h) into a malloc'd array; an empty list is an error. */
static int parse_ids(const char *s, int vocab, int32_t **out, int *n, const char *where, char *err,
                     size_t errlen)
{
    base_ids ids = {0};
    *out = NULL;
    *n = 0;
    if (base_ids_parse(s, vocab, &ids, where, err, errlen)) {
        base_ids_free(&ids);
        return -1;
    }
    if (ids.n == 0) {
        base_set_err(err, errlen, "%s: empty sequence", where);
        base_ids_free(&ids);
        return -1;
    }
    *out = ids.v;
    *n = (int)ids.n;
    return 0;
}

typedef struct {
    int32_t **tok; /* [n][len[i]] */
    int *len;
    uint8_t *text; /* [n] 1: came from text (generate prints text) */
    int n, cap;
} seqs;

static void seqs_free(seqs *s)
{
    for (int i = 0; i < s->n; i++) free(s->tok[i]);
    free(s->tok);
    free(s->len);
    free(s->text);
}

static int seqs_add(seqs *s, const char *text, int vocab, const char *where, char *err,
                    size_t errlen)
{
    if (s->n == s->cap) {
        int cap = s->cap ? s->cap * 2 : 8;
        int32_t **t = realloc(s->tok, (size_t)cap * sizeof *t);
        if (t) s->tok = t;
        int *l = realloc(s->len, (size_t)cap * sizeof *l);
        if (l) s->len = l;
        uint8_t *x = realloc(s->text, (size_t)cap);
        if (x) s->text = x;
        if (!t || !l || !x) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        s->cap = cap;
    }
    if (parse_ids(text, vocab, &s->tok[s->n], &s->len[s->n], where, err, errlen)) return -1;
    s->text[s->n++] = 0;
    return 0;
}

/* Text -> a sequence: the tokenizer's post-processor (add_special), and BOS in front when
 * the tokenizer has one and did not put it there. */
static int seqs_add_text(seqs *s, const tok_tokenizer *t, const char *text, size_t len, int vocab,
                         const char *where, char *err, size_t errlen)
{
    if (seqs_add(s, "0", vocab, where, err, errlen)) return -1; /* a slot, refilled below */
    int k = s->n - 1;
    free(s->tok[k]);
    s->tok[k] = NULL;
    int32_t *ids = NULL;
    int n = 0;
    char e2[512];
    if (tok_encode(t, text, len, 1, &ids, &n, e2, sizeof e2)) {
        snprintf(err, errlen, "%s: %s", where, e2);
        s->n--;
        return -1;
    }
    int bos = tok_bos(t);
    if (bos >= 0 && (n == 0 || ids[0] != bos)) {
        int32_t *x = realloc(ids, (size_t)(n + 1) * sizeof *x);
        if (!x) {
            free(ids);
            s->n--;
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        ids = x;
        memmove(ids + 1, ids, (size_t)n * sizeof *ids);
        ids[0] = bos;
        n++;
    }
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab) {
            snprintf(err, errlen, "%s: the tokenizer gives id %d, outside the model's vocab %d",
                     where, ids[i], vocab);
            free(ids);
            s->n--;
            return -1;
        }
    if (n == 0) {
        snprintf(err, errlen, "%s: no tokens (empty text and no BOS)", where);
        free(ids);
        s->n--;
        return -1;
    }
    s->tok[k] = ids;
    s->len[k] = n;
    s->text[k] = 1;
    return 0;
}

/* Documents of a text file: separated by blank (whitespace-only) lines; a document keeps its
 * inner newlines, not the last one. */
static int seqs_from_text_file(seqs *s, const tok_tokenizer *t, const char *path, int vocab,
                               char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    char *line = NULL, *doc = NULL;
    size_t cap = 0, dlen = 0, dcap = 0;
    ssize_t got;
    int ln = 0, first = 0, rc = 0, before = s->n;
    for (;;) {
        got = getline(&line, &cap, f);
        int blank = 1;
        for (ssize_t i = 0; i < got; i++)
            if (!isspace((unsigned char)line[i])) blank = 0;
        if (got >= 0) ln++;
        if ((got < 0 || blank) && dlen > 0) {
            if (doc[dlen - 1] == '\n') dlen--;
            char where[600];
            snprintf(where, sizeof where, "%s:%d", path, first);
            if ((rc = seqs_add_text(s, t, doc, dlen, vocab, where, err, errlen))) break;
            dlen = 0;
        }
        if (got < 0) break;
        if (blank) continue;
        if (dlen == 0) first = ln;
        if (dlen + (size_t)got + 1 > dcap) {
            dcap = (dlen + (size_t)got + 1) * 2;
            char *x = realloc(doc, dcap);
            if (!x) {
                snprintf(err, errlen, "out of memory");
                rc = -1;
                break;
            }
            doc = x;
        }
        memcpy(doc + dlen, line, (size_t)got);
        dlen += (size_t)got;
    }
    free(line);
    free(doc);
    fclose(f);
    if (!rc && s->n == before) {
        snprintf(err, errlen, "%s: no documents", path);
        rc = -1;
    }
    return rc;
}

static int seqs_from_file(seqs *s, const char *path, int vocab, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    int ln = 0, rc = 0;
    while (getline(&line, &cap, f) >= 0) {
        ln++;
        const char *p = line;
        while (*p && isspace((unsigned char)*p)) p++;
        if (!*p || *p == '#') continue;
        char where[600];
        snprintf(where, sizeof where, "%s:%d", path, ln);
        if ((rc = seqs_add(s, line, vocab, where, err, errlen))) break;
    }
    free(line);
    fclose(f);
    if (!rc && s->n == 0) {
        snprintf(err, errlen, "%s: no sequences", path);
        rc = -1;
    }
    return rc;
}

/* ---- generate / eval ------------------------------------------------------------------------- */

typedef struct {
    stage_config cfg;
    int have_cfg;
    engine_plan plan;
    int have_plan;
    seqs sq;
    tok_tokenizer *tok; /* loaded when a text option needs it */
    engine_run_opts ro;
} run_setup;

static void run_setup_free(run_setup *r)
{
    if (r->have_plan) engine_plan_free(&r->plan);
    if (r->have_cfg) stage_config_free(&r->cfg);
    seqs_free(&r->sq);
    tok_free(r->tok);
}

static int need_tok(run_setup *r, const char *model, char *err, size_t errlen)
{
    if (r->tok) return 0;
    char e2[900];
    if (tok_load(model, &r->tok, e2, sizeof e2)) {
        snprintf(err, errlen, "text needs the model's tokenizer: %s", e2);
        return -1;
    }
    return 0;
}

static int setup_run(const cli_opts *o, int cmd, int n_ranks, run_setup *r, char *err,
                     size_t errlen)
{
    memset(r, 0, sizeof *r);
    const char *model = cli_opt_str(o, "model");
    if (!model) {
        snprintf(err, errlen, "--model DIR is required (see modpipe %s --help)", cli_cmd_name(cmd));
        return -1;
    }
    if (stage_config_load(model, &r->cfg, err, errlen)) return -1;
    r->have_cfg = 1;
    const stage_config *cfg = &r->cfg;
    engine_run_opts *ro = &r->ro;
    ro->pipe.model_dir = model;
    ro->pipe.cfg = cfg;
    ro->command = cli_cmd_name(cmd);
    ro->kind = cmd == CLI_GENERATE ? ENGINE_RUN_GENERATE : ENGINE_RUN_EVAL;

    int topk = 0;
    for (int l = 0; l < cfg->n_layers; l++)
        topk |= stage_kind_is_routed(cfg->layer_kind[l]) && cfg->mod_routing == STAGE_ROUTING_TOPK;

    if (cmd == CLI_GENERATE) {
        if (topk) {
            snprintf(err, errlen,
                     "%s uses topk routing, which is non-causal (it needs the whole "
                     "sequence): it cannot decode token by token. Use 'modpipe eval'.",
                     model);
            return -1;
        }
        const cli_opt_val *pv = cli_opt(o, "prompt-ids");
        for (int i = 0; i < pv->n; i++) {
            char where[600];
            snprintf(where, sizeof where, pv->n > 1 ? "%s #%d" : "%s", pv->origin, i + 1);
            if (seqs_add(&r->sq, pv->vals[i], cfg->vocab, where, err, errlen)) return -1;
        }
        const char *pf = cli_opt_str(o, "prompts-file");
        if (pf && seqs_from_file(&r->sq, pf, cfg->vocab, err, errlen)) return -1;
        const cli_opt_val *tv = cli_opt(o, "prompt");
        if (tv->n && need_tok(r, model, err, errlen)) return -1;
        for (int i = 0; i < tv->n; i++) {
            char where[600];
            snprintf(where, sizeof where, tv->n > 1 ? "%s #%d" : "%s", tv->origin, i + 1);
            if (seqs_add_text(&r->sq, r->tok, tv->vals[i], strlen(tv->vals[i]), cfg->vocab, where,
                              err, errlen))
                return -1;
        }
        if (r->sq.n == 0) {
            snprintf(err, errlen, "no prompts: give --prompt, --prompt-ids or --prompts-file");
            return -1;
        }
        long mn;
        double t, p;
        if (cli_opt_long(o, "max-new", 1, 1 << 20, 16, &mn, err, errlen)) return -1;
        if (cli_opt_double(o, "temperature", 0.0, 1e6, 0, 0.0, &t, err, errlen)) return -1;
        if (cli_opt_double(o, "top-p", 0.0, 1.0, 0, 1.0, &p, err, errlen)) return -1;
        long seed, groups;
        if (cli_opt_long(o, "seed", 0, 0x7fffffffffffffffL, 0, &seed, err, errlen)) return -1;
        if (cli_opt_long(o, "groups", 1, 1 << 20, 0, &groups, err, errlen)) return -1;
        ro->eos = cfg->eos_token_id;
        ro->ignore_eos = cli_opt_has(o, "ignore-eos");
        ro->max_new = (int)mn;
        ro->temperature = (float)t;
        ro->top_p = (float)p;
        ro->seed = (uint64_t)seed;
        ro->groups = (int)groups;
    } else {
        const char *tf = cli_opt_str(o, "tokens-file"), *xf = cli_opt_str(o, "text-file");
        if (!tf && !xf) {
            snprintf(err, errlen, "--tokens-file FILE or --text-file FILE is required");
            return -1;
        }
        if (tf && seqs_from_file(&r->sq, tf, cfg->vocab, err, errlen)) return -1;
        if (xf && (need_tok(r, model, err, errlen) ||
                   seqs_from_text_file(&r->sq, r->tok, xf, cfg->vocab, err, errlen)))
            return -1;
    }
    long slots, ctxn;
    if (cli_opt_long(o, "slots", 1, 1 << 20, 0, &slots, err, errlen)) return -1;
    if (cli_opt_long(o, "ctx", 1, 1 << 24, 0, &ctxn, err, errlen)) return -1;
    ro->slots = (int)slots;
    ro->ctx = (int)ctxn;
    ro->n_seqs = r->sq.n;
    ro->seq_tokens = r->sq.tok;
    ro->seq_len = r->sq.len;

    if (cli_pipe_opts_read(o, &ro->pipe, err, errlen)) return -1;
    ro->dump_path = cli_opt_str(o, "dump-logits");
    ro->stats_path = cli_opt_str(o, "stats");
    engine_mem_opts mem;
    int plan_mem = cli_opt_has(o, "mem-per-rank");
    if (plan_mem) {
        if (cli_mem_opts(o, model, &mem, err, errlen)) return -1;
        if (ro->pipe.weights_dtype >= 0) mem.weight_dtype = (stage_dtype)ro->pipe.weights_dtype;
        mem.slots = ro->slots > 0 ? ro->slots : r->sq.n;
        mem.micro_batch = ro->pipe.micro_batch;
        for (int i = 0; i < r->sq.n; i++) {
            int len = r->sq.len[i] + (cmd == CLI_GENERATE ? ro->max_new : 0);
            if (len > mem.ctx) mem.ctx = len;
        }
        if (ro->ctx > 0) mem.ctx = ro->ctx;
    }
    if (cli_make_plan(o, cfg, n_ranks, 0, plan_mem ? &mem : NULL, &r->plan, err, errlen)) return -1;
    r->have_plan = 1;
    ro->pipe.plan = &r->plan;
    if (!ro->pipe.max_in_flight)
        ro->pipe.max_in_flight = 2 * r->plan.n_stages; /* default 2 x stages */
    return 0;
}

int cli_run_main(int cmd, int argc, char **argv)
{
    char err[1024] = "";
    cli_opts o;
    int rank, size, rc;
    if (cli_mpi_start(cmd, argc, argv, 0, usage, &o, &rank, &size, &rc, err, sizeof err)) return 0;
    run_setup r;
    memset(&r, 0, sizeof r);
    if (!rc) rc = setup_run(&o, cmd, size, &r, err, sizeof err);
    /* every rank parsed the same input; still agree, so no rank runs on alone */
    int first_bad = comm_first_failed(MPI_COMM_WORLD, rc != 0);
    if (first_bad >= 0) {
        if (rank == first_bad) fprintf(stderr, "modpipe %s: %s\n", cli_cmd_name(cmd), err);
        run_setup_free(&r);
        cli_opts_free(&o);
        MPI_Finalize();
        return 1;
    }
    if (rank == 0 && r.ro.pipe.progress) {
        int ns = r.plan.n_stages;
        fprintf(stderr, "modpipe %s: %d stage%s [", cli_cmd_name(cmd), ns, ns > 1 ? "s" : "");
        for (int s = 0; s < ns; s++)
            fprintf(stderr, "%s%d-%d", s ? " | " : "", r.plan.st[s].first, r.plan.st[s].last);
        fprintf(stderr, "], %d sequences, micro-batch %d, wire %s\n", r.ro.n_seqs,
                r.ro.pipe.micro_batch, stage_dtype_name(r.ro.pipe.wire));
    }
    engine_run_result res;
    rc = engine_run(MPI_COMM_WORLD, &r.ro, &res, err, sizeof err);
    if (rc) {
        if (rc == -1) fprintf(stderr, "modpipe %s: %s\n", cli_cmd_name(cmd), err);
    } else if (rank == 0) {
        if (cmd == CLI_GENERATE) {
            for (int s = 0; s < r.ro.n_seqs; s++) {
                const int32_t *g = res.generated + (size_t)s * r.ro.max_new;
                if (r.sq.text[s]) {
                    char *txt = NULL;
                    size_t len = 0;
                    char e2[512];
                    if (tok_decode(r.tok, g, res.n_generated[s], 1, &txt, &len, e2, sizeof e2)) {
                        fprintf(stderr, "modpipe generate: sequence %d: %s\n", s + 1, e2);
                        rc = 1;
                        continue;
                    }
                    printf("text: ");
                    for (size_t k = 0; k < len; k++) {
                        if (txt[k] == '\n')
                            fputs("\\n", stdout);
                        else if (txt[k] == '\\')
                            fputs("\\\\", stdout);
                        else
                            putchar(txt[k]);
                    }
                    printf("\n");
                    free(txt);
                    continue;
                }
                printf("generated ");
                for (int j = 0; j < res.n_generated[s]; j++) printf("%s%d", j ? "," : "", g[j]);
                printf("\n");
            }
        } else {
            double mean = res.nll_count ? res.nll_sum / res.nll_count : 0.0;
            long tokens = 0;
            for (int s = 0; s < r.ro.n_seqs; s++) tokens += r.ro.seq_len[s];
            printf("eval: %d sequences, %ld tokens, %ld scored, mean NLL %.6f, perplexity %.4f\n",
                   r.ro.n_seqs, tokens, res.nll_count, mean, exp(mean));
        }
        if (r.plan.n_stages > 1) {
            char w[32], d[32], p[32], h[32];
            base_human_bytes(res.wire_bytes, w, sizeof w);
            base_human_bytes(res.dense_bytes, d, sizeof d);
            base_human_bytes(res.payload_bytes, p, sizeof p);
            base_human_bytes(res.header_bytes, h, sizeof h);
            printf("wire %s vs dense %s (%.1f%%): payload %s (%.1f%% of dense), headers %s\n", w, d,
                   res.dense_bytes > 0 ? 100.0 * res.wire_bytes / res.dense_bytes : 0.0, p,
                   res.dense_bytes > 0 ? 100.0 * res.payload_bytes / res.dense_bytes : 0.0, h);
        } else {
            printf("wire 0 B: one stage, nothing crosses ranks (run under mpirun -np N to split "
                   "it)\n");
        }
        fflush(stdout);
        engine_run_result_free(&res);
    }
    run_setup_free(&r);
    cli_opts_free(&o);
    MPI_Finalize();
    return rc ? 1 : 0;
}
