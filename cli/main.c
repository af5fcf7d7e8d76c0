/* cli/main.c — the modpipe command line.
 *
 *   modpipe generate | eval    (under mpirun: one rank per pipeline stage; -np 1 works too)
 *   modpipe partition          (no MPI: print the stage plan)
 *   modpipe init-model         (no MPI: write a random model from a YAML spec)
 *   modpipe quantize           (no MPI: a copy with Q8_0 projections, cli/quantize.h)
 *   modpipe router-tune        (under mpirun, data-parallel: cli/routertune.h)
 *   modpipe tokenize | detokenize (no MPI: text <-> ids, cli/tokenize.h)
 *   modpipe serve              (under mpirun: OpenAI-compatible HTTP server, cli/serve.h)
 *
 * Options of generate / eval may also come from a YAML file (--config F.yaml: keys are the
 * option names without "--"); flags given on the command line override it.
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/err.h"
#include "cli/initmodel.h"
#include "cli/modelspec.h"
#include "cli/quantize.h"
#include "engine/partition.h"
#include "engine/topo.h"
#include "engine/batch.h"
#include "cli/routertune.h"
#include "cli/tokenize.h"
#include "cli/serve.h"
#include "cli/yamlcfg.h"
#include "comm/comm.h"
#include "stage/config.h"
#include "stage/kernels.h"
#include "stage/matmul.h"
#include "tok/tok.h"

#define MODPIPE_VERSION "0.1.0"

/* ========================================================================================
 * Options
 * ===================================================================================== */

enum { C_GEN = 1, C_EVAL = 2, C_PART = 4, C_INIT = 8, C_QUANT = 16 };

typedef struct {
    const char *name;    /* without "--" */
    const char *metavar; /* NULL: a switch */
    int cmds;            /* C_* mask */
    int repeat;          /* may be given several times */
    const char *help;
} opt_def;

static const opt_def OPTS[] = {
    {"model", "DIR", C_GEN | C_EVAL | C_PART | C_QUANT, 0,
     "model directory: config.json + model.safetensors (or sharded with its index)"},
    {"config", "FILE.yaml", C_GEN | C_EVAL, 0,
     "read options from a YAML file (keys = option names without --); flags override it"},
    {"prompt-ids", "IDS", C_GEN, 1,
     "a prompt as token ids, e.g. 1,2,3 (repeat for more sequences)"},
    {"prompt", "TEXT", C_GEN, 1,
     "a prompt as text, tokenized with the model's tokenizer.json (BOS added); its output line "
     "is 'text: ' and the generated text (EOS dropped; newline written \\n, backslash \\\\). "
     "Repeat for more sequences; mixes with --prompt-ids"},
    {"prompts-file", "FILE", C_GEN, 0, "prompts, one per line, ids separated by commas or spaces"},
    {"max-new", "N", C_GEN, 0,
     "new tokens per sequence at most (default 16; fewer when EOS comes first)"},
    {"temperature", "T", C_GEN, 0,
     "sampling temperature; 0 or absent: greedy (lowest id wins ties)"},
    {"top-p", "P", C_GEN, 0,
     "nucleus sampling: keep the smallest set of tokens with mass >= P (default 1)"},
    {"seed", "S", C_GEN | C_INIT, 0,
     "generate: sampling seed (new token j of sequence i: a generator seeded from (S, i, j), "
     "whatever the batching or -np); init-model: weight seed"},
    {"tokens-file", "FILE", C_EVAL, 0,
     "eval: one sequence per line (ids separated by commas or spaces), any lengths"},
    {"text-file", "FILE", C_EVAL, 0,
     "eval: perplexity of text: documents separated by blank lines, each tokenized with the "
     "model's tokenizer.json (BOS added); with --tokens-file too, its lines come first"},
    {"micro-batch", "R", C_GEN | C_EVAL | C_PART, 0,
     "most rows per micro-batch (default 32); runs with the same R give the same bits at any -np"},
    {"groups", "G", C_GEN, 0,
     "decode groups: sequences are split into G groups, each decode step of a group is one "
     "micro-batch (at most R sequences a group). Default max(ceil(n/R), min(8, floor(n/8))), "
     "at least 1: decode micro-batches of >= 8 rows once there are 8 sequences, the same at "
     "any -np. With few sequences per stage raise G (>= stages keeps every stage busy)"},
    {"slots", "N", C_GEN | C_EVAL | C_PART, 0,
     "KV cache slots (sequences held at once; memory for slots x ctx positions is allocated "
     "at start). Default: the number of sequences; fewer: groups wait for free slots. "
     "partition: the slots its memory plan sizes the KV cache for (default 1)"},
    {"ctx", "N", C_GEN | C_EVAL | C_PART, 0,
     "positions per slot (default: the longest need, prompt + max-new - 1 or the longest line); "
     "a sequence that needs more is an error. partition: default max_position_embeddings"},
    {"kv-page", "N", C_GEN | C_EVAL, 0, "KV cache positions per page (default 16)"},
    {"kv-mem", "SIZE", C_GEN | C_EVAL, 0,
     "KV page pool per rank, e.g. 512M; a run that needs more pages is an error. Default: "
     "what --mem-per-rank leaves after the stage's weights and workspace, else every position "
     "of every slot on every layer"},
    {"ignore-eos", NULL, C_GEN, 0,
     "do not stop at the model's EOS token (config.json eos_token_id): always max-new tokens"},
    {"threads", "N", C_GEN | C_EVAL | C_INIT, 0,
     "compute threads per rank (default 1): the kernels split a matmul's output columns between "
     "them, so results are the same for any N; with several ranks per node keep N x ranks <= "
     "cores"},
    {"max-in-flight", "K", C_GEN | C_EVAL, 0,
     "micro-batches in flight at once (default 2 x stages)"},
    {"stages", "auto|A-B,...", C_GEN | C_EVAL | C_PART, 0,
     "layer range of each stage, e.g. 0-3,4-7 (one per stage), or auto (default); A-B:K gives "
     "that stage K ranks (YAML: stages: [{layers: \"0-3\", ranks: 2}, ...])"},
    {"tp", "K", C_GEN | C_EVAL | C_PART, 0,
     "tensor parallelism: every stage spans K ranks (-np = stages x K; ScaLAPACK inside a "
     "stage, only each stage's first rank sends pipeline packets). Default 1"},
    {"weights-dtype", "f32|bf16|f16|q8_0", C_GEN | C_EVAL, 0,
     "hold the weight matrices in this dtype, converting at load (e.g. an f32 checkpoint as "
     "bf16: half the memory and bytes read per token; q8_0: int8 blocks of 32 with an f16 "
     "scale, 1.06 bytes a weight, embedding and MoE gate kept as stored); default: as stored"},
    {"wire-dtype", "f32|bf16|f16", C_GEN | C_EVAL, 0,
     "activation dtype between ranks: f32 exact (default); bf16/f16 halve bytes, lossy"},
    {"transport", "sparse|dense", C_GEN | C_EVAL, 0,
     "sparse (default): rows go only to stages that compute on them; dense: every row on every "
     "link, the baseline a conventional pipeline pays (same compute, same results)"},
    {"dump-logits", "F.npy", C_GEN | C_EVAL, 0,
     "write logits as float32 .npy: generate [seqs, max_new, vocab] (row j: the logits new "
     "token j was drawn from; NaN rows after a sequence stopped at EOS), eval [seqs, Tmax, "
     "vocab] (NaN past a line's end)"},
    {"stats", "F.json", C_GEN | C_EVAL, 0,
     "write per-link bytes (vs a dense pipeline), per-layer participation, KV and FLOP "
     "savings, per-stage busy/wait time, tokens/s"},
    {"timeout", "SEC", C_GEN | C_EVAL, 0,
     "abort the job when a peer rank sends nothing for SEC seconds (default 300)"},
    {"quiet", NULL, C_GEN | C_EVAL | C_INIT | C_QUANT, 0, "no progress lines on stderr"},
    {"n", "N", C_PART, 0, "partition: number of stages (ranks)"},
    {"mem-per-rank", "SIZE", C_GEN | C_EVAL | C_PART, 0,
     "memory a rank may use, e.g. 6G or 5000M: the auto plan only uses stages that fit (weights "
     "in the checkpoint dtype + KV cache + workspace), an explicit plan that does not is refused"},
    {"spec", "FILE.yaml", C_INIT, 0, "init-model: the model spec (see configs/models/)"},
    {"out", "DIR", C_INIT | C_QUANT, 0,
     "init-model, quantize: output directory (created if missing)"},
    {"dtype", "f32|bf16|f16", C_INIT, 0, "init-model: weight dtype (overrides output.dtype)"},
    {"shards", "N", C_INIT, 0,
     "init-model: number of safetensors shards (overrides output.shards)"},
    {"calibrate", NULL, C_INIT, 0,
     "init-model: calibrate router biases to the capacity (overrides the spec)"},
    {"no-calibrate", NULL, C_INIT, 0, "init-model: do not calibrate"},
    {"help", NULL, C_GEN | C_EVAL | C_PART | C_INIT | C_QUANT, 0, "this help"},
};
#define N_OPTS ((int)(sizeof OPTS / sizeof OPTS[0]))

typedef struct {
    char **vals; /* [n] */
    int n;
    char origin
        [512]; /* where it came from, for messages: "--micro-batch" or "f.yaml:3:14: micro-batch" */
} opt_val;

typedef struct {
    int cmd;
    opt_val v[N_OPTS];
    cli_yaml yaml;
    int have_yaml;
} opts;

static int opt_index(const char *name)
{
    for (int i = 0; i < N_OPTS; i++)
        if (!strcmp(OPTS[i].name, name)) return i;
    return -1;
}

static void opts_free(opts *o)
{
    for (int i = 0; i < N_OPTS; i++) free(o->v[i].vals);
    if (o->have_yaml) cli_yaml_free(&o->yaml);
}

static int push(opt_val *v, char *s)
{
    char **nv = realloc(v->vals, (size_t)(v->n + 1) * sizeof *nv);
    if (!nv) return -1;
    v->vals = nv;
    v->vals[v->n++] = s;
    return 0;
}

static const char *cmd_name(int cmd)
{
    return cmd == C_GEN    ? "generate"
           : cmd == C_EVAL ? "eval"
           : cmd == C_PART ? "partition"
           : cmd == C_INIT ? "init-model"
                           : "quantize";
}

/* argv, then --config YAML for options the command line did not give. */
static int opts_parse(opts *o, int cmd, int argc, char **argv, char *err, size_t errlen)
{
    memset(o, 0, sizeof *o);
    o->cmd = cmd;
    for (int a = 0; a < argc; a++) {
        const char *arg = argv[a];
        const char *name = NULL;
        if (!strcmp(arg, "-n"))
            name = "n";
        else if (!strcmp(arg, "-h"))
            name = "help";
        else if (!strncmp(arg, "--", 2))
            name = arg + 2;
        if (!name) {
            snprintf(err, errlen, "unexpected argument '%s' (see modpipe %s --help)", arg,
                     cmd_name(cmd));
            return -1;
        }
        char namebuf[64];
        const char *eq = strchr(name, '=');
        const char *inline_val = NULL;
        if (eq && (size_t)(eq - name) < sizeof namebuf) {
            memcpy(namebuf, name, (size_t)(eq - name));
            namebuf[eq - name] = 0;
            inline_val = eq + 1;
            name = namebuf;
        }
        int i = opt_index(name);
        if (i < 0 || !(OPTS[i].cmds & cmd)) {
            snprintf(err, errlen, "unknown option '%s' for %s (see modpipe %s --help)", arg,
                     cmd_name(cmd), cmd_name(cmd));
            return -1;
        }
        opt_val *v = &o->v[i];
        if (v->n && !OPTS[i].repeat) {
            snprintf(err, errlen, "--%s given twice", OPTS[i].name);
            return -1;
        }
        snprintf(v->origin, sizeof v->origin, "--%s", OPTS[i].name);
        if (!OPTS[i].metavar) {
            if (inline_val) {
                snprintf(err, errlen, "--%s takes no value", OPTS[i].name);
                return -1;
            }
            if (push(v, "1")) goto oom;
            continue;
        }
        const char *val = inline_val;
        if (!val) {
            if (a + 1 >= argc) {
                snprintf(err, errlen, "--%s needs a value (%s)", OPTS[i].name, OPTS[i].metavar);
                return -1;
            }
            val = argv[++a];
        }
        if (push(v, (char *)val)) goto oom;
    }
    int ci = opt_index("config");
    if (o->v[ci].n) {
        if (cli_yaml_load(o->v[ci].vals[0], &o->yaml, err, errlen)) return -1;
        o->have_yaml = 1;
        for (int k = 0; k < o->yaml.n; k++) {
            const cli_yaml_entry *e = &o->yaml.e[k];
            int i = opt_index(e->key);
            if (i < 0 || !(OPTS[i].cmds & cmd) || !strcmp(e->key, "config") ||
                !strcmp(e->key, "help")) {
                snprintf(err, errlen, "%s:%d:%d: unknown key '%s' for %s", o->yaml.path, e->line,
                         e->col, e->key, cmd_name(cmd));
                return -1;
            }
            opt_val *v = &o->v[i];
            if (v->n) continue; /* the command line wins */
            snprintf(v->origin, sizeof v->origin, "%s:%d:%d: %s", o->yaml.path, e->line, e->col,
                     e->key);
            if (e->is_list && !OPTS[i].repeat && strcmp(e->key, "stages")) {
                snprintf(err, errlen, "%s: expected a single value, not a list", v->origin);
                return -1;
            }
            if (!OPTS[i].metavar) {
                int b = 0;
                if (cli_yaml_bool(&o->yaml, e, &b, err, errlen)) return -1;
                if (b && push(v, "1")) goto oom;
                continue;
            }
            for (int u = 0; u < e->n_vals; u++)
                if (push(v, e->vals[u])) goto oom;
        }
    }
    return 0;
oom:
    snprintf(err, errlen, "out of memory");
    return -1;
}

static const char *opt_str(const opts *o, const char *name)
{
    const opt_val *v = &o->v[opt_index(name)];
    return v->n ? v->vals[0] : NULL;
}
static int opt_has(const opts *o, const char *name) { return o->v[opt_index(name)].n > 0; }

static int opt_long(const opts *o, const char *name, long lo, long hi, long dflt, long *out,
                    char *err, size_t errlen)
{
    const opt_val *v = &o->v[opt_index(name)];
    *out = dflt;
    if (!v->n) return 0;
    char *end;
    errno = 0;
    long x = strtol(v->vals[0], &end, 10);
    if (errno || end == v->vals[0] || *end || x < lo || x > hi) {
        snprintf(err, errlen, "%s: expected an integer in [%ld, %ld], got '%s'", v->origin, lo, hi,
                 v->vals[0]);
        return -1;
    }
    *out = x;
    return 0;
}

static int opt_double(const opts *o, const char *name, double lo, double hi, double dflt,
                      double *out, char *err, size_t errlen)
{
    const opt_val *v = &o->v[opt_index(name)];
    *out = dflt;
    if (!v->n) return 0;
    char *end;
    errno = 0;
    double x = strtod(v->vals[0], &end);
    if (errno || end == v->vals[0] || *end || !(x >= lo && x <= hi)) {
        snprintf(err, errlen, "%s: expected a number in [%g, %g], got '%s'", v->origin, lo, hi,
                 v->vals[0]);
        return -1;
    }
    *out = x;
    return 0;
}

/* ========================================================================================
 * Help
 * ===================================================================================== */

static void usage_main(FILE *f)
{
    fprintf(
        f,
        "modpipe %s — pipeline-parallel inference for dynamic-depth transformers\n"
        "(Mixture-of-Depths, MoDE, MindSkip): between MPI ranks only the rows a stage\n"
        "computes on travel, with a bitmask of which rows they are.\n\n"
        "usage:\n"
        "  mpirun -np N modpipe generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) "
        "[options]\n"
        "  mpirun -np N modpipe eval --model DIR (--tokens-file F | --text-file F) [options]\n"
        "  modpipe partition --model DIR -n N [--stages ...]\n"
        "  modpipe init-model --spec F.yaml --out DIR [options]\n"
        "  modpipe quantize --model DIR --out DIR      (Q8_0 projections, docs/SPEC.md §9)\n"
        "  mpirun -np K modpipe router-tune --model DIR --data FILE --out DIR [options]\n"
        "  mpirun -np N modpipe serve --model DIR [--port 8080] [options]   (HTTP, OpenAI API)\n"
        "  modpipe tokenize --model DIR --text S [--no-special]\n"
        "  modpipe detokenize --model DIR --ids \"1 2 3\" [--skip-special]\n"
        "  modpipe COMMAND --help      options of a command\n"
        "  modpipe --version\n\n"
        "One MPI rank is one pipeline stage; -np 1 runs the whole model in one process.\n",
        MODPIPE_VERSION);
}

static void usage_cmd(FILE *f, int cmd)
{
    static const char *intro[] = {
        [C_GEN] =
            "modpipe generate: greedy or sampled continuation of prompts (ids or text).\n"
            "Prints one line per sequence: 'generated ID,ID,...' for id prompts (the EOS id\n"
            "included when it stopped the sequence), 'text: ...' for text prompts, then the\n"
            "wire summary. Sequences: --prompt-ids, then --prompts-file, then --prompt.\n"
            "A sequence stops at --max-new tokens or at the model's EOS (not with --ignore-eos).\n",
        [C_EVAL] =
            "modpipe eval: teacher-forced forward of each sequence (any lengths); prints the\n"
            "mean NLL over every token but each sequence's first, and the perplexity.\n"
            "topk routing (non-causal) is exact here: a sequence is never split.\n",
        [C_PART] =
            "modpipe partition: print the stage plan (layers, compute share, memory per stage:\n"
            "weights in the checkpoint dtype, KV cache, workspace; which boundaries can carry\n"
            "fewer rows than dense and why). No MPI needed.\n",
        [C_INIT] =
            "modpipe init-model: write a random model in the SPEC format (config.json +\n"
            "safetensors) from a YAML spec, streamed to disk with a progress line (any size:\n"
            "memory stays small); optionally calibrate router biases, layer by layer from the\n"
            "written files, so that measured participation matches the configured capacity.\n",
        [C_QUANT] =
            "modpipe quantize: write a copy of a model with its projections (attention, MLP,\n"
            "experts, untied lm_head) stored as Q8_0 (int8 blocks of 32 + an f16 scale,\n"
            "docs/SPEC.md §9), the embedding, MoE gate, norms and routers as stored. The\n"
            "result loads in place (no conversion, no --weights-dtype needed) and computes the\n"
            "same bits as --weights-dtype q8_0 on the original. No MPI needed.\n",
    };
    fprintf(f, "%s\noptions:\n", intro[cmd]);
    for (int i = 0; i < N_OPTS; i++) {
        if (!(OPTS[i].cmds & cmd)) continue;
        char left[64];
        snprintf(left, sizeof left, "--%s%s%s", OPTS[i].name, OPTS[i].metavar ? " " : "",
                 OPTS[i].metavar ? OPTS[i].metavar : "");
        if (!strcmp(OPTS[i].name, "n")) snprintf(left, sizeof left, "-n N");
        fprintf(f, "  %-26s %s\n", left, OPTS[i].help);
    }
    if (cmd == C_GEN || cmd == C_EVAL)
        fprintf(f,
                "\nexample:\n  mpirun --oversubscribe -np 4 modpipe %s --model demo-model %s "
                "--micro-batch 8 --stats stats.json\n",
                cmd_name(cmd),
                cmd == C_GEN ? "--prompt-ids 1,2,3 --max-new 16" : "--tokens-file tokens.txt");
}

/* ========================================================================================
 * Token lists
 * ===================================================================================== */

/* Parse "1,2,3" / "1 2 3" into a malloc'd array. */
static int parse_ids(const char *s, int vocab, int32_t **out, int *n, const char *where, char *err,
                     size_t errlen)
{
    *out = NULL;
    *n = 0;
    int cap = 16;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    if (!ids) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    const char *p = s;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == ',' || *p == '\r' || *p == '\n') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || (*end && !strchr(" \t,\r\n", *end))) {
            snprintf(err, errlen, "%s: '%.20s' is not a token id", where, p);
            free(ids);
            return -1;
        }
        if (v < 0 || v >= vocab) {
            snprintf(err, errlen, "%s: token id %ld out of range [0, %d)", where, v, vocab);
            free(ids);
            return -1;
        }
        if (*n == cap) {
            cap *= 2;
            int32_t *t = realloc(ids, (size_t)cap * sizeof *t);
            if (!t) {
                free(ids);
                snprintf(err, errlen, "out of memory");
                return -1;
            }
            ids = t;
        }
        ids[(*n)++] = (int32_t)v;
        p = end;
    }
    if (*n == 0) {
        snprintf(err, errlen, "%s: empty sequence", where);
        free(ids);
        return -1;
    }
    *out = ids;
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

/* ========================================================================================
 * generate / eval
 * ===================================================================================== */

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

/* Plan from --stages (explicit ranges or auto) and the ranks of each stage (--tp K, or per
 * stage: "0-2:2" on the command line, {layers: "0-2", ranks: 2} in YAML, which the YAML
 * reader hands over as "layers=0-2 ranks=2"). part_n > 0 (partition -n N): N stages of K
 * ranks; else the stages come from the job's `world` ranks: world / K, or one per range when
 * the ranges give their own ranks (a stage without one gets K). mem: --mem-per-rank planning
 * (NULL: none); it plans each stage as if it were one rank (a K-rank stage needs ~1/K). */
static int make_plan(const opts *o, const stage_config *cfg, int world, int part_n,
                     const engine_mem_opts *mem, engine_plan *plan, char *err, size_t errlen)
{
    const opt_val *v = &o->v[opt_index("stages")];
    long tp;
    if (opt_long(o, "tp", 1, 64, 1, &tp, err, errlen)) return -1;
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
                    snprintf(err, errlen, "%s: stage %d: ranks must be 1..64, got '%s'", v->origin,
                             nr + 1, eq + 1);
                    rc = -1;
                } else if (strcmp(t, "ranks")) {
                    snprintf(err, errlen, "%s: stage %d: unknown key '%s' (layers, ranks)",
                             v->origin, nr + 1, t);
                    rc = -1;
                }
            }
            if (!rc && !lay) {
                snprintf(err, errlen, "%s: stage %d has no layers", v->origin, nr + 1);
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
                    snprintf(err, errlen, "%s: '%s': ranks after ':' must be 1..64", v->origin, t);
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
            snprintf(err, errlen,
                     "-np %d is not a multiple of --tp %ld (every stage spans %ld ranks)", world,
                     tp, tp);
            rc = -1;
        } else
            n = world / (int)tp;
    }
    if (!rc && is_auto) {
        rc = engine_partition_auto_mem(cfg, n, mem, plan, err, errlen);
        if (rc && mem && mem->mem_per_rank) { /* name where the limit came from */
            char e3[1024];
            snprintf(e3, sizeof e3, "%s", err);
            const char *origin = o->v[opt_index("mem-per-rank")].origin;
            const char *at = strstr(e3, "--mem-per-rank");
            if (at && strcmp(origin, "--mem-per-rank"))
                snprintf(err, errlen, "%.*s%s%s", (int)(at - e3), e3, origin, at + 14);
        }
    } else if (!rc) {
        char e2[512];
        rc = engine_partition_explicit_mem(cfg, (const char *const *)ranges, nr, n, mem, plan, e2,
                                           sizeof e2);
        if (rc)
            snprintf(err, errlen, "%s: %s", v->origin, strncmp(e2, "stages: ", 8) ? e2 : e2 + 8);
    }
    for (int s = 0; !rc && s < plan->n_stages; s++) plan->st[s].ranks = ks[s] > 0 ? ks[s] : (int)tp;
    for (int i = 0; i < nr; i++) free(ranges[i]);
    return rc;
}

/* --mem-per-rank (0 when absent) and the checkpoint dtype for memory planning. */
static int mem_opts(const opts *o, const char *model, engine_mem_opts *m, char *err, size_t errlen)
{
    memset(m, 0, sizeof *m);
    const char *lim = opt_str(o, "mem-per-rank");
    if (lim && (engine_parse_size(lim, &m->mem_per_rank) || m->mem_per_rank == 0)) {
        snprintf(err, errlen, "%s: expected a size like 6G, 5000M or 1.5GiB, got '%s'",
                 o->v[opt_index("mem-per-rank")].origin, lim);
        return -1;
    }
    if (engine_weight_dtype(model, &m->weight_dtype, err, errlen)) return -1;
    return engine_keep_dtype(model, &m->keep_dtype, err, errlen);
}

static int setup_run(const opts *o, int cmd, int n_ranks, run_setup *r, char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    const char *model = opt_str(o, "model");
    if (!model) {
        snprintf(err, errlen, "--model DIR is required (see modpipe %s --help)", cmd_name(cmd));
        return -1;
    }
    if (stage_config_load(model, &r->cfg, err, errlen)) return -1;
    r->have_cfg = 1;
    const stage_config *cfg = &r->cfg;
    engine_run_opts *ro = &r->ro;
    ro->model_dir = model;
    ro->cfg = cfg;
    ro->command = cmd_name(cmd);
    ro->kind = cmd == C_GEN ? ENGINE_RUN_GENERATE : ENGINE_RUN_EVAL;

    int topk = 0;
    for (int l = 0; l < cfg->n_layers; l++)
        topk |= stage_kind_is_routed(cfg->layer_kind[l]) && cfg->mod_routing == STAGE_ROUTING_TOPK;

    if (cmd == C_GEN) {
        if (topk) {
            snprintf(err, errlen,
                     "%s uses topk routing, which is non-causal (it needs the whole "
                     "sequence): it cannot decode token by token. Use 'modpipe eval'.",
                     model);
            return -1;
        }
        const opt_val *pv = &o->v[opt_index("prompt-ids")];
        for (int i = 0; i < pv->n; i++) {
            char where[600];
            snprintf(where, sizeof where, pv->n > 1 ? "%s #%d" : "%s", pv->origin, i + 1);
            if (seqs_add(&r->sq, pv->vals[i], cfg->vocab, where, err, errlen)) return -1;
        }
        const char *pf = opt_str(o, "prompts-file");
        if (pf && seqs_from_file(&r->sq, pf, cfg->vocab, err, errlen)) return -1;
        const opt_val *tv = &o->v[opt_index("prompt")];
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
        if (opt_long(o, "max-new", 1, 1 << 20, 16, &mn, err, errlen)) return -1;
        if (opt_double(o, "temperature", 0.0, 1e6, 0.0, &t, err, errlen)) return -1;
        if (opt_double(o, "top-p", 0.0, 1.0, 1.0, &p, err, errlen)) return -1;
        long seed, groups;
        if (opt_long(o, "seed", 0, 0x7fffffffffffffffL, 0, &seed, err, errlen)) return -1;
        if (opt_long(o, "groups", 1, 1 << 20, 0, &groups, err, errlen)) return -1;
        ro->eos = cfg->eos_token_id;
        ro->ignore_eos = opt_has(o, "ignore-eos");
        ro->max_new = (int)mn;
        ro->temperature = (float)t;
        ro->top_p = (float)p;
        ro->seed = (uint64_t)seed;
        ro->groups = (int)groups;
    } else {
        const char *tf = opt_str(o, "tokens-file"), *xf = opt_str(o, "text-file");
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
    if (opt_long(o, "slots", 1, 1 << 20, 0, &slots, err, errlen)) return -1;
    if (opt_long(o, "ctx", 1, 1 << 24, 0, &ctxn, err, errlen)) return -1;
    ro->slots = (int)slots;
    ro->ctx = (int)ctxn;
    long kvp;
    if (opt_long(o, "kv-page", 1, 1 << 20, 16, &kvp, err, errlen)) return -1;
    ro->kv.page = (int)kvp;
    const char *km = opt_str(o, "kv-mem");
    if (km && (engine_parse_size(km, &ro->kv.mem_bytes) || ro->kv.mem_bytes == 0)) {
        snprintf(err, errlen, "%s: expected a size like 512M or 2G, got '%s'",
                 o->v[opt_index("kv-mem")].origin, km);
        return -1;
    }
    ro->n_seqs = r->sq.n;
    ro->seq_tokens = r->sq.tok;
    ro->seq_len = r->sq.len;

    long mb, inflight;
    double tmo;
    if (opt_long(o, "micro-batch", 1, 1 << 20, 32, &mb, err, errlen)) return -1;
    if (opt_long(o, "max-in-flight", 1, 4096, 0, &inflight, err, errlen)) return -1;
    if (opt_double(o, "timeout", 1.0, 1e7, 300.0, &tmo, err, errlen)) return -1;
    long threads;
    if (opt_long(o, "threads", 1, 1024, 1, &threads, err, errlen)) return -1;
    if (stage_threads_init((int)threads, err, errlen)) return -1;
    ro->micro_batch = (int)mb;
    ro->max_in_flight = (int)(inflight < 2 ? 2 : inflight);
    ro->timeout_s = tmo;
    const char *wd = opt_str(o, "wire-dtype");
    ro->wire = STAGE_F32;
    if (wd && stage_dtype_parse(wd, &ro->wire)) {
        snprintf(err, errlen, "%s: expected f32, bf16 or f16, got '%s'",
                 o->v[opt_index("wire-dtype")].origin, wd);
        return -1;
    }
    const char *wts = opt_str(o, "weights-dtype");
    stage_dtype wdt;
    ro->weights_dtype = -1;
    if (wts && stage_wdtype_parse(wts, &wdt)) {
        snprintf(err, errlen, "%s: expected f32, bf16, f16 or q8_0, got '%s'",
                 o->v[opt_index("weights-dtype")].origin, wts);
        return -1;
    }
    if (wts) ro->weights_dtype = (int)wdt;
    const char *tr = opt_str(o, "transport");
    if (tr && strcmp(tr, "sparse") && strcmp(tr, "dense")) {
        snprintf(err, errlen, "%s: expected sparse or dense, got '%s'",
                 o->v[opt_index("transport")].origin, tr);
        return -1;
    }
    ro->dense_transport = tr && !strcmp(tr, "dense");
    ro->dump_path = opt_str(o, "dump-logits");
    ro->stats_path = opt_str(o, "stats");
    ro->progress = !opt_has(o, "quiet");
    engine_mem_opts mem;
    int plan_mem = opt_has(o, "mem-per-rank");
    if (plan_mem) {
        if (mem_opts(o, model, &mem, err, errlen)) return -1;
        if (ro->weights_dtype >= 0) mem.weight_dtype = (stage_dtype)ro->weights_dtype;
        mem.slots = ro->slots > 0 ? ro->slots : r->sq.n;
        mem.micro_batch = ro->micro_batch;
        for (int i = 0; i < r->sq.n; i++) {
            int len = r->sq.len[i] + (cmd == C_GEN ? ro->max_new : 0);
            if (len > mem.ctx) mem.ctx = len;
        }
        if (ro->ctx > 0) mem.ctx = ro->ctx;
    }
    if (make_plan(o, cfg, n_ranks, 0, plan_mem ? &mem : NULL, &r->plan, err, errlen)) return -1;
    r->have_plan = 1;
    ro->plan = &r->plan;
    if (!inflight) ro->max_in_flight = 2 * r->plan.n_stages; /* default 2 x stages */
    return 0;
}

static int cmd_run(int cmd, int argc, char **argv)
{
    MPI_Init(NULL, NULL);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);

    char err[1024] = "";
    opts o;
    run_setup r;
    memset(&r, 0, sizeof r);
    int rc = opts_parse(&o, cmd, argc, argv, err, sizeof err);
    if (!rc && opt_has(&o, "help")) {
        if (rank == 0) usage_cmd(stdout, cmd);
        opts_free(&o);
        MPI_Finalize();
        return 0;
    }
    if (!rc) rc = setup_run(&o, cmd, size, &r, err, sizeof err);
    /* every rank parsed the same input; still agree, so no rank runs on alone */
    int bad = rc ? rank : size, first_bad = size;
    MPI_Allreduce(&bad, &first_bad, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (first_bad < size) {
        if (rank == first_bad)
            fprintf(stderr, "modpipe %s: %s%s\n", cmd_name(cmd), size > 1 ? "" : "", err);
        run_setup_free(&r);
        opts_free(&o);
        MPI_Finalize();
        return 1;
    }
    if (rank == 0 && r.ro.progress) {
        int ns = r.plan.n_stages;
        fprintf(stderr, "modpipe %s: %d stage%s [", cmd_name(cmd), ns, ns > 1 ? "s" : "");
        for (int s = 0; s < ns; s++)
            fprintf(stderr, "%s%d-%d", s ? " | " : "", r.plan.st[s].first, r.plan.st[s].last);
        fprintf(stderr, "], %d sequences, micro-batch %d, wire %s\n", r.ro.n_seqs, r.ro.micro_batch,
                stage_dtype_name(r.ro.wire));
    }
    engine_run_result res;
    rc = engine_run(MPI_COMM_WORLD, &r.ro, &res, err, sizeof err);
    if (rc) {
        if (rc == -1) fprintf(stderr, "modpipe %s: %s\n", cmd_name(cmd), err);
    } else if (rank == 0) {
        if (cmd == C_GEN) {
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
    opts_free(&o);
    MPI_Finalize();
    return rc ? 1 : 0;
}

/* ========================================================================================
 * partition / init-model (no MPI)
 * ===================================================================================== */

static int cmd_partition(int argc, char **argv)
{
    char err[1024];
    opts o;
    int rc = opts_parse(&o, C_PART, argc, argv, err, sizeof err);
    if (!rc && opt_has(&o, "help")) {
        usage_cmd(stdout, C_PART);
        opts_free(&o);
        return 0;
    }
    stage_config cfg;
    memset(&cfg, 0, sizeof cfg);
    engine_plan plan;
    long n = 0;
    const char *model = rc ? NULL : opt_str(&o, "model");
    if (!rc && !model) {
        snprintf(err, sizeof err, "--model DIR is required");
        rc = -1;
    }
    if (!rc && !opt_has(&o, "n")) {
        snprintf(err, sizeof err, "-n N (number of stages) is required");
        rc = -1;
    }
    if (!rc) rc = opt_long(&o, "n", 1, 4096, 1, &n, err, sizeof err);
    if (!rc) rc = stage_config_load(model, &cfg, err, sizeof err);
    engine_mem_opts mem;
    long slots = 1, ctx = 1, mb = 32;
    if (!rc) rc = mem_opts(&o, model, &mem, err, sizeof err);
    if (!rc) rc = opt_long(&o, "slots", 1, 1 << 20, 1, &slots, err, sizeof err);
    if (!rc) rc = opt_long(&o, "ctx", 1, 1 << 24, cfg.max_pos, &ctx, err, sizeof err);
    if (!rc) rc = opt_long(&o, "micro-batch", 1, 1 << 20, 32, &mb, err, sizeof err);
    mem.slots = (int)slots;
    mem.ctx = (int)ctx;
    mem.micro_batch = (int)mb;
    if (!rc) rc = make_plan(&o, &cfg, 0, (int)n, &mem, &plan, err, sizeof err);
    if (!rc) {
        int world = 0;
        for (int s = 0; s < plan.n_stages; s++) world += engine_stage_ranks(&plan.st[s]);
        engine_topo topo; /* K must split the heads */
        rc = engine_topo_init(&topo, &plan, world, &cfg, err, sizeof err);
        engine_topo_free(&topo);
        if (rc) engine_plan_free(&plan);
    }
    if (!rc) {
        engine_plan_print(&cfg, &plan, stdout);
        engine_plan_free(&plan);
    } else {
        fprintf(stderr, "modpipe partition: %s\n", err);
    }
    stage_config_free(&cfg);
    opts_free(&o);
    return rc ? 1 : 0;
}

static int cmd_quantize(int argc, char **argv)
{
    char err[1024];
    opts o;
    int rc = opts_parse(&o, C_QUANT, argc, argv, err, sizeof err);
    if (!rc && opt_has(&o, "help")) {
        usage_cmd(stdout, C_QUANT);
        opts_free(&o);
        return 0;
    }
    const char *model = rc ? NULL : opt_str(&o, "model"), *out = rc ? NULL : opt_str(&o, "out");
    if (!rc && (!model || !out)) {
        snprintf(err, sizeof err, "--model DIR and --out DIR are required");
        rc = -1;
    }
    FILE *log = !rc && opt_has(&o, "quiet") ? NULL : stderr;
    if (!rc) rc = cli_quantize(model, out, log, err, sizeof err);
    if (rc)
        fprintf(stderr, "modpipe quantize: %s\n", err);
    else if (log)
        fprintf(log, "quantize: wrote %s\n", out);
    opts_free(&o);
    return rc ? 1 : 0;
}

static int cmd_init_model(int argc, char **argv)
{
    char err[1024];
    opts o;
    cli_model_spec spec;
    memset(&spec, 0, sizeof spec);
    int have_spec = 0;
    int rc = opts_parse(&o, C_INIT, argc, argv, err, sizeof err);
    if (!rc && opt_has(&o, "help")) {
        usage_cmd(stdout, C_INIT);
        opts_free(&o);
        return 0;
    }
    const char *sp = rc ? NULL : opt_str(&o, "spec"), *out = rc ? NULL : opt_str(&o, "out");
    if (!rc && (!sp || !out)) {
        snprintf(err, sizeof err, "--spec F.yaml and --out DIR are required");
        rc = -1;
    }
    if (!rc) rc = cli_model_spec_load(sp, &spec, err, sizeof err);
    have_spec = !rc;
    long v;
    if (!rc && opt_has(&o, "seed")) {
        rc = opt_long(&o, "seed", 0, 0x7fffffffffffffffL, 0, &v, err, sizeof err);
        spec.seed = (unsigned long)v;
    }
    if (!rc && opt_has(&o, "shards")) {
        rc = opt_long(&o, "shards", 1, 9999, 1, &v, err, sizeof err);
        spec.shards = (int)v;
    }
    if (!rc && opt_has(&o, "dtype") && stage_dtype_parse(opt_str(&o, "dtype"), &spec.dtype)) {
        snprintf(err, sizeof err, "--dtype: expected f32, bf16 or f16, got '%s'",
                 opt_str(&o, "dtype"));
        rc = -1;
    }
    if (!rc) {
        rc = opt_long(&o, "threads", 1, 1024, 1, &v, err, sizeof err);
        if (!rc) rc = stage_threads_init((int)v, err, sizeof err);
        spec.threads = (int)v;
    }
    if (!rc && opt_has(&o, "calibrate")) spec.calibrate = 1;
    if (!rc && opt_has(&o, "no-calibrate")) spec.calibrate = 0;
    FILE *log = opt_has(&o, "quiet") ? NULL : stderr;
    if (!rc) {
        if (log)
            fprintf(log, "init-model: %d layers, hidden %d, vocab %d, %s, %d shard%s -> %s\n",
                    spec.cfg.n_layers, spec.cfg.hidden, spec.cfg.vocab,
                    stage_dtype_st_name(spec.dtype), spec.shards, spec.shards > 1 ? "s" : "", out);
        rc = cli_init_model(&spec, out, log, err, sizeof err);
    }
    if (rc)
        fprintf(stderr, "modpipe init-model: %s\n", err);
    else if (log)
        fprintf(log, "init-model: wrote %s\n", out);
    if (have_spec) cli_model_spec_free(&spec);
    opts_free(&o);
    return rc ? 1 : 0;
}

/* OpenBLAS picks its kernels when the library loads; on a CPU id it does not know (VMs) it
 * falls back to SSE3 kernels, 4x slower (stage/matmul.h). Only a fresh process image can fix
 * that, so set OPENBLAS_CORETYPE and exec ourselves once, before MPI_Init. */
static void fix_blas_coretype(char **argv)
{
    const char *core = stage_blas_coretype_hint();
    if (!core || getenv("MODPIPE_BLAS_REEXEC")) return;
    setenv("OPENBLAS_CORETYPE", core, 1);
    setenv("MODPIPE_BLAS_REEXEC", "1", 1);
    execv("/proc/self/exe", argv);
    /* exec failed: carry on with the slow kernels (results are the same) */
}

int main(int argc, char **argv)
{
    fix_blas_coretype(argv);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
        !strcmp(argv[1], "help")) {
        usage_main(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("modpipe %s\n", MODPIPE_VERSION);
        return 0;
    }
    if (!strcmp(argv[1], "generate")) return cmd_run(C_GEN, argc - 2, argv + 2);
    if (!strcmp(argv[1], "eval")) return cmd_run(C_EVAL, argc - 2, argv + 2);
    if (!strcmp(argv[1], "partition")) return cmd_partition(argc - 2, argv + 2);
    if (!strcmp(argv[1], "init-model")) return cmd_init_model(argc - 2, argv + 2);
    if (!strcmp(argv[1], "quantize")) return cmd_quantize(argc - 2, argv + 2);
    if (!strcmp(argv[1], "router-tune")) return cli_routertune_main(argc - 2, argv + 2);
    if (!strcmp(argv[1], "serve")) return cli_serve_main(argc - 2, argv + 2, serve_pipeline_run);
    if (!strcmp(argv[1], "tokenize")) return cli_tok_tokenize(argc - 2, argv + 2);
    if (!strcmp(argv[1], "detokenize")) return cli_tok_detokenize(argc - 2, argv + 2);
    fprintf(stderr, "modpipe: unknown command '%s' (try modpipe --help)\n", argv[1]);
    return 2;
}
