/* cli/opts.c — the option table and its parser (cli/opts.h). */
#include "cli/opts.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "base/err.h"

enum {
    RUN = CLI_GENERATE | CLI_EVAL,       /* the pipeline's batch commands */
    PIPE = RUN | CLI_SERVE,              /* everything that runs the pipeline */
    PLAN = PIPE | CLI_PARTITION,         /* everything that plans stages */
    TOK = CLI_TOKENIZE | CLI_DETOKENIZE, /* the tokenizer commands */
    MPI_CMDS = PIPE | CLI_ROUTER_TUNE,   /* under mpirun */
    ALL = PLAN | CLI_INIT_MODEL | CLI_ROUTER_TUNE | TOK | CLI_QUANTIZE,
};

static const cli_opt_def OPTS[] = {
    /* ---- what to run on ---------------------------------------------------------------------- */
    {"model", "DIR", PLAN | CLI_ROUTER_TUNE | TOK | CLI_QUANTIZE, CLI_ONCE,
     "model directory: config.json + model.safetensors (or sharded with its index), and "
     "tokenizer.json for text"},
    {"tokenizer", "PATH", CLI_SERVE | TOK, CLI_ONCE,
     "tokenizer.json or its directory (default: the model directory)"},
    {"config", "FILE.yaml", PLAN | CLI_ROUTER_TUNE, CLI_ONCE,
     "read options from a YAML file (keys = option names without --); flags override it"},
    /* ---- generate / eval inputs -------------------------------------------------------------- */
    {"prompt-ids", "IDS", CLI_GENERATE, CLI_REPEAT,
     "a prompt as token ids, e.g. 1,2,3 (repeat for more sequences)"},
    {"prompt", "TEXT", CLI_GENERATE, CLI_REPEAT,
     "a prompt as text, tokenized with the model's tokenizer.json (BOS added); its output line "
     "is 'text: ' and the generated text (EOS dropped; newline written \\n, backslash \\\\). "
     "Repeat for more sequences; mixes with --prompt-ids"},
    {"prompts-file", "FILE", CLI_GENERATE, CLI_ONCE,
     "prompts, one per line, ids separated by commas or spaces"},
    {"max-new", "N", CLI_GENERATE, CLI_ONCE,
     "new tokens per sequence at most (default 16; fewer when EOS comes first)"},
    {"temperature", "T", CLI_GENERATE, CLI_ONCE,
     "sampling temperature; 0 or absent: greedy (lowest id wins ties)"},
    {"top-p", "P", CLI_GENERATE, CLI_ONCE,
     "nucleus sampling: keep the smallest set of tokens with mass >= P (default 1)"},
    {"seed", "S", CLI_GENERATE | CLI_INIT_MODEL | CLI_ROUTER_TUNE, CLI_ONCE,
     "the seed (default 0): generate: sampling (new token j of sequence i: a generator seeded "
     "from (S, i, j), whatever the batching or -np); init-model: the weights; router-tune: the "
     "router init and the batch order"},
    {"tokens-file", "FILE", CLI_EVAL, CLI_ONCE,
     "eval: one sequence per line (ids separated by commas or spaces), any lengths"},
    {"text-file", "FILE", CLI_EVAL | CLI_TOKENIZE, CLI_ONCE,
     "text from a file: eval: perplexity of its documents (separated by blank lines, each "
     "tokenized with the model's tokenizer.json, BOS added; with --tokens-file too, its lines "
     "come first); tokenize: the whole file, bytes as they are"},
    {"ignore-eos", NULL, CLI_GENERATE, CLI_ONCE,
     "do not stop at the model's EOS token (config.json eos_token_id): always max-new tokens"},
    {"groups", "G", CLI_GENERATE, CLI_ONCE,
     "decode groups: sequences are split into G groups, each decode step of a group is one "
     "micro-batch (at most R sequences a group). Default: one stage ceil(n/R) (every "
     "sequence in one decode micro-batch when they fit: weights read once a step); several "
     "stages max(ceil(n/R), min(8, floor(n/8))), at least 1: decode micro-batches of >= 8 rows "
     "once there are 8 sequences. With few sequences per stage raise G (>= stages keeps every "
     "stage busy)"},
    /* ---- the plan: stages, ranks, memory ----------------------------------------------------- */
    {"n", "N", CLI_PARTITION, CLI_ONCE, "partition: number of stages (ranks)"},
    {"stages", "auto|A-B,...", PLAN, CLI_YAML_LIST,
     "layer range of each stage, e.g. 0-3,4-7 (one per stage), or auto (default); A-B:K gives "
     "that stage K ranks (YAML: stages: [{layers: \"0-3\", ranks: 2}, ...])"},
    {"tp", "K", PLAN, CLI_ONCE,
     "tensor parallelism: every stage spans K ranks (-np = stages x K; ScaLAPACK inside a "
     "stage, only each stage's first rank sends pipeline packets). Default 1"},
    {"mem-per-rank", "SIZE", PLAN, CLI_ONCE,
     "memory a rank may use, e.g. 6G or 5000M: the auto plan only uses stages that fit (weights "
     "in the checkpoint dtype + KV cache + workspace), an explicit plan that does not is refused"},
    {"micro-batch", "R", PLAN, CLI_ONCE,
     "most rows per micro-batch (default 32); runs with the same R give the same bits at any -np"},
    {"slots", "N", PLAN, CLI_ONCE,
     "KV cache slots (sequences held at once; memory for slots x ctx positions is allocated "
     "at start). Default: generate/eval the number of sequences (fewer: groups wait for free "
     "slots); serve 8; partition (the slots its memory plan sizes the KV cache for) 1"},
    {"ctx", "N", PLAN, CLI_ONCE,
     "positions per slot. Default: generate/eval the longest need (prompt + max-new - 1 or the "
     "longest line; a sequence that needs more is an error); serve the model's "
     "max_position_embeddings, at most 4096 (prompt + generated); partition "
     "max_position_embeddings"},
    {"kv-page", "N", PIPE, CLI_ONCE, "KV cache positions per page (default 16)"},
    {"kv-mem", "SIZE", PIPE, CLI_ONCE,
     "KV page pool per rank, e.g. 512M (generate / eval: a run that needs more pages is an "
     "error; serve admits requests by it and preempts under pressure). Default: what "
     "--mem-per-rank leaves after the stage's weights and workspace, else every position of "
     "every slot on every layer"},
    /* ---- how the pipeline runs --------------------------------------------------------------- */
    {"max-in-flight", "K", PIPE, CLI_ONCE, "micro-batches in flight at once (default 2 x stages)"},
    {"decode-groups", "G", CLI_SERVE, CLI_ONCE,
     "split the decoding requests into G groups, one micro-batch each (default: the stage "
     "count, so every stage has a decode micro-batch)"},
    {"weights-dtype", "f32|bf16|f16|q8_0", PIPE, CLI_ONCE,
     "hold the weight matrices in this dtype, converting at load (e.g. an f32 checkpoint as "
     "bf16: half the memory and bytes read per token; q8_0: int8 blocks of 32 with an f16 "
     "scale, 1.06 bytes a weight, embedding and MoE gate kept as stored); default: as stored"},
    {"matmul", "exact|fast", PIPE, CLI_ONCE,
     "how f32 activations meet bf16 / q8_0 weights. exact (default): bf16 products as exact as "
     "f32 (oneDNN: each activation split into two bf16 parts). fast: activations rounded to bf16 "
     "once (bf16 weights: vdpbf16ps where the CPU has AVX512-BF16, and oneDNN's bf16 matmul) or "
     "quantized to int8 per 32 values (q8_0 weights, AVX-512 VNNI: "
     "an int8 dot): half the arithmetic, lossy (held-out NLL +0.002% bf16, +0.0014% over exact "
     "q8_0; speed: docs/BENCH.md)"},
    {"huge-pages", NULL, PIPE, CLI_ONCE,
     "copy the stage's weight matrices at load onto 2 MiB pages (transparent huge pages) "
     "instead of reading them in place from the mmap: one copy still (the mmap'd pages are let "
     "go), the same results, a longer load, faster decode (docs/BENCH.md)"},
    {"wire-dtype", "f32|bf16|f16", PIPE, CLI_ONCE,
     "activation dtype between ranks: f32 exact (default); bf16/f16 halve bytes, lossy"},
    {"transport", "sparse|dense", PIPE, CLI_ONCE,
     "sparse (default): rows go only to stages that compute on them; dense: every row on every "
     "link, the baseline a conventional pipeline pays (same compute, same results)"},
    {"timeout", "SEC", PIPE, CLI_ONCE,
     "abort when a peer rank sends nothing for SEC seconds while work is pending (default 300)"},
    {"threads", "N", MPI_CMDS | CLI_INIT_MODEL, CLI_ONCE,
     "compute threads per rank (default 1): the kernels split a matmul's output columns between "
     "them, so results are the same for any N; with several ranks per node keep N x ranks <= "
     "cores"},
    {"dump-logits", "F.npy", RUN, CLI_ONCE,
     "write logits as float32 .npy: generate [seqs, max_new, vocab] (row j: the logits new "
     "token j was drawn from; NaN rows after a sequence stopped at EOS), eval [seqs, Tmax, "
     "vocab] (NaN past a line's end)"},
    {"stats", "F.json", RUN, CLI_ONCE,
     "write per-link bytes (vs a dense pipeline), per-layer participation, KV and FLOP "
     "savings, per-stage busy/wait time, tokens/s"},
    /* ---- serve: the HTTP side ---------------------------------------------------------------- */
    {"host", "ADDR", CLI_SERVE, CLI_ONCE,
     "address to listen on (default 127.0.0.1; 0.0.0.0 or :: for all)"},
    {"port", "N", CLI_SERVE, CLI_ONCE,
     "TCP port (default 8080; 0: any free port, printed at start)"},
    {"no-prefix-reuse", NULL, CLI_SERVE, CLI_ONCE,
     "compute every prompt in full (default: a prompt whose first 16k positions a running "
     "request or a finished one's parked slot holds starts from its KV pages; causal routing "
     "only)"},
    {"queue", "N", CLI_SERVE, CLI_ONCE,
     "requests waiting for a slot at most; beyond: 503 + Retry-After (default 64)"},
    {"api-key-file", "PATH", CLI_SERVE, CLI_ONCE,
     "require 'Authorization: Bearer KEY' (all routes but GET /health), KEY = the file's first "
     "line (default: $MODPIPE_API_KEY if set; never on the command line)"},
    {"api-key", "KEY", CLI_SERVE, CLI_ONCE, NULL}, /* refused with a pointer to api-key-file */
    {"max-connections", "N", CLI_SERVE, CLI_ONCE,
     "HTTP connections served at once; beyond: 503 (default 256)"},
    {"idle-timeout", "SEC", CLI_SERVE, CLI_ONCE,
     "close a connection idle this long (before its request, or kept alive); 0: never "
     "(default 30)"},
    {"chat-template", "NAME", CLI_SERVE, CLI_ONCE,
     "chat template: chatml, llama2, llama3, mistral, zephyr, plain, or auto (default: from "
     "tokenizer_config.json, else plain)"},
    {"name", "ID", CLI_SERVE, CLI_ONCE,
     "model id in /v1/models and responses (default: the directory's name)"},
    {"shutdown-grace", "SEC", CLI_SERVE, CLI_ONCE,
     "on SIGTERM, running requests get this long to finish (default 30)"},
    /* ---- serve: the front that starts and restarts the MPI job (serve/front.h) --------------- */
    {"ranks", "N", CLI_SERVE, CLI_ONCE,
     "run the pipeline as an MPI job of N ranks that this process starts (mpirun) and restarts "
     "when it dies or stalls; running requests are replayed (N = 1 without --hostfile / "
     "--mpi-args: in this process)"},
    {"hostfile", "FILE", CLI_SERVE, CLI_ONCE,
     "with --ranks: mpirun --hostfile FILE (its first host must be this one: rank 0 runs there)"},
    {"spare-hosts", "FILE", CLI_SERVE, CLI_ONCE,
     "with --hostfile: hosts (a hostfile) to restart on when the job fails (or a stall names a "
     "rank) on a host of the plan; "
     "that host is dropped and, when the slots left are fewer, the job re-partitioned on fewer "
     "ranks (docs/SERVE.md §5)"},
    {"mpi-args", "'ARGS'", CLI_SERVE, CLI_ONCE,
     "with --ranks: more mpirun options, split at spaces"},
    {"stall-timeout", "SEC", CLI_SERVE, CLI_ONCE,
     "with --ranks: a job silent this long (or without a result while work is in flight) is "
     "stuck: restart; the log and /metrics name the stuck rank and host (default 5)"},
    {"max-restarts", "N", CLI_SERVE, CLI_ONCE,
     "with --ranks: restarts in a row before giving up (exit 1; a job that ran 60 s resets the "
     "count; default 3)"},
    {"job", "SOCK", CLI_SERVE, CLI_ONCE, NULL}, /* internal: rank 0 of a job the front started */
    /* ---- init-model -------------------------------------------------------------------------- */
    {"spec", "FILE.yaml", CLI_INIT_MODEL, CLI_ONCE,
     "init-model: the model spec (see configs/models/)"},
    {"out", "DIR", CLI_INIT_MODEL | CLI_ROUTER_TUNE | CLI_QUANTIZE, CLI_ONCE,
     "output model directory (created if missing; router-tune: must not hold a "
     "model.safetensors)"},
    {"dtype", "f32|bf16|f16|q8_0", CLI_INIT_MODEL | CLI_QUANTIZE, CLI_ONCE,
     "the dtype of the weights written. init-model: f32, bf16 or f16 (overrides output.dtype); "
     "quantize: q8_0 (the default and only one)"},
    {"skip", "NAMES", CLI_QUANTIZE, CLI_REPEAT,
     "quantize: projections to keep in their dtype, module or tensor names separated by commas "
     "(e.g. lm_head,model.layers.0.mlp.down_proj); repeatable; listed in quantization_config's "
     "ignore"},
    {"shards", "N", CLI_INIT_MODEL, CLI_ONCE,
     "init-model: number of safetensors shards (overrides output.shards)"},
    {"calibrate", NULL, CLI_INIT_MODEL, CLI_ONCE,
     "init-model: calibrate router biases to the capacity (overrides the spec)"},
    {"no-calibrate", NULL, CLI_INIT_MODEL, CLI_ONCE, "init-model: do not calibrate"},
    /* ---- router-tune ------------------------------------------------------------------------- */
    {"data", "FILE", CLI_ROUTER_TUNE, CLI_ONCE,
     "training text: documents separated by blank lines, tokenized with DIR's tokenizer.json"},
    {"data-ids", "FILE", CLI_ROUTER_TUNE, CLI_ONCE,
     "training data already tokenized: one document per line, ids separated by commas or spaces"},
    {"layers", "A-B,...", CLI_ROUTER_TUNE, CLI_ONCE,
     "layers that get a router, e.g. 1-3 or 1,3 (default: every layer but the first)"},
    {"granularity", "token|sequence", CLI_ROUTER_TUNE, CLI_ONCE,
     "MindSkip granularity (default sequence, the paper's)"},
    {"target-skip", "F", CLI_ROUTER_TUNE, CLI_ONCE,
     "fraction of attention to skip, 0 <= F < 1 (default 0.3): the penalty drives the kept "
     "fraction to 1 - F"},
    {"threshold", "TAU", CLI_ROUTER_TUNE, CLI_ONCE,
     "inference threshold written to config.json; the STE gate uses it too (default 0.5)"},
    {"gate", "ste|soft", CLI_ROUTER_TUNE, CLI_ONCE,
     "training gate: ste (paper: hard 0/1 forward, straight-through gradient; default) or soft "
     "(sigmoid score)"},
    {"penalty", "global|layer", CLI_ROUTER_TUNE, CLI_ONCE,
     "kept-fraction penalty over all routed layers together (default) or per layer (paper's code)"},
    {"lambda", "L", CLI_ROUTER_TUNE, CLI_ONCE, "penalty weight (default 1)"},
    {"seq-len", "T", CLI_ROUTER_TUNE, CLI_ONCE, "tokens per training sequence (default 128)"},
    {"batch", "B", CLI_ROUTER_TUNE, CLI_ONCE,
     "sequences per step, split over the ranks (default 16; >= ranks)"},
    {"steps", "N", CLI_ROUTER_TUNE, CLI_ONCE, "optimizer steps (default 200)"},
    {"lr", "LR", CLI_ROUTER_TUNE, CLI_ONCE, "AdamW learning rate (default 0.01)"},
    {"lr-decay", "linear|none", CLI_ROUTER_TUNE, CLI_ONCE,
     "learning-rate schedule: linear decay to 0 over --steps (default, as HF Trainer) or constant"},
    {"weight-decay", "WD", CLI_ROUTER_TUNE, CLI_ONCE,
     "AdamW decoupled weight decay of router weights, not biases (default 0)"},
    {"init-bias", "B0", CLI_ROUTER_TUNE, CLI_ONCE,
     "initial router bias (default 0.5: with w ~ N(0, 0.01^2) every gate starts open, sigmoid ~ "
     "0.62, close enough to the threshold to move in tens of steps)"},
    {"eval-data", "FILE", CLI_ROUTER_TUNE, CLI_ONCE,
     "held-out text (same format as --data) evaluated every --eval-every steps; the best routers "
     "by held-out loss are written"},
    {"eval-data-ids", "FILE", CLI_ROUTER_TUNE, CLI_ONCE,
     "held-out data already tokenized (same format as --data-ids)"},
    {"eval-every", "N", CLI_ROUTER_TUNE, CLI_ONCE,
     "steps between held-out evaluations (default 25)"},
    {"log-every", "N", CLI_ROUTER_TUNE, CLI_ONCE, "steps between progress lines (default 10)"},
    {"dump-sequences", "FILE", CLI_ROUTER_TUNE, CLI_ONCE,
     "write the held-out sequences (else the training ones) as id lines for 'modpipe eval "
     "--tokens-file' and exit"},
    {"resume", NULL, CLI_ROUTER_TUNE, CLI_ONCE,
     "continue from the routers the model (a MindSkip one) already has on --layers"},
    {"random-skip", "F,F,...", CLI_ROUTER_TUNE, CLI_ONCE,
     "no training: write RANDOM routers (w ~ N(0, 1/D)) whose biases are calibrated on --data so "
     "that routed layer i skips fraction F_i (one F per --layers entry): the baseline a trained "
     "router must beat"},
    /* ---- tokenize / detokenize --------------------------------------------------------------- */
    {"text", "S", CLI_TOKENIZE, CLI_ONCE, "the text (UTF-8)"},
    {"no-special", NULL, CLI_TOKENIZE, CLI_ONCE,
     "plain text: no BOS/template tokens, and special tokens written in the text (e.g. \"<s>\") "
     "are ordinary text"},
    {"ids", "\"1 2 3\"", CLI_DETOKENIZE, CLI_ONCE,
     "the ids, separated by spaces, commas or newlines"},
    {"ids-file", "F", CLI_DETOKENIZE, CLI_ONCE, "the ids from a file (same separators)"},
    {"skip-special", NULL, CLI_DETOKENIZE, CLI_ONCE, "drop special tokens (BOS, EOS, ...)"},
    /* ---- everywhere -------------------------------------------------------------------------- */
    {"quiet", NULL, MPI_CMDS | CLI_INIT_MODEL | CLI_QUANTIZE, CLI_ONCE,
     "no progress or log lines on stderr"},
    {"help", NULL, ALL, CLI_ONCE, "this help"},
};
#define N_OPTS ((int)(sizeof OPTS / sizeof OPTS[0]))

static const char *const CMD_NAMES[] = {"generate",   "eval",       "partition",
                                        "init-model", "serve",      "router-tune",
                                        "tokenize",   "detokenize", "quantize"};

const char *cli_cmd_name(int cmd)
{
    for (int i = 0; i < (int)(sizeof CMD_NAMES / sizeof CMD_NAMES[0]); i++)
        if (cmd == 1 << i) return CMD_NAMES[i];
    return "?";
}

static int opt_index(const char *name)
{
    for (int i = 0; i < N_OPTS; i++)
        if (!strcmp(OPTS[i].name, name)) return i;
    return -1;
}

const cli_opt_val *cli_opt(const cli_opts *o, const char *name)
{
    int i = opt_index(name);
    if (i < 0) abort(); /* a name missing from the table: a bug in the caller */
    return &o->v[i];
}

const char *cli_opt_str(const cli_opts *o, const char *name)
{
    const cli_opt_val *v = cli_opt(o, name);
    return v->n ? v->vals[0] : NULL;
}

int cli_opt_has(const cli_opts *o, const char *name) { return cli_opt(o, name)->n > 0; }

const char *cli_opt_origin(const cli_opts *o, const char *name)
{
    const cli_opt_val *v = cli_opt(o, name);
    return v->n ? v->origin : "";
}

void cli_opts_free(cli_opts *o)
{
    if (o->v)
        for (int i = 0; i < N_OPTS; i++) free(o->v[i].vals);
    free(o->v);
    o->v = NULL;
    if (o->have_yaml) cli_yaml_free(&o->yaml);
    o->have_yaml = 0;
}

static int push(cli_opt_val *v, char *s)
{
    char **nv = realloc(v->vals, (size_t)(v->n + 1) * sizeof *nv);
    if (!nv) return -1;
    v->vals = nv;
    v->vals[v->n++] = s;
    return 0;
}

/* --config: the options the command line did not give. */
static int parse_yaml(cli_opts *o, int cmd, char *err, size_t errlen)
{
    if (cli_yaml_load(cli_opt_str(o, "config"), &o->yaml, err, errlen)) return -1;
    o->have_yaml = 1;
    for (int k = 0; k < o->yaml.n; k++) {
        const cli_yaml_entry *e = &o->yaml.e[k];
        int i = opt_index(e->key);
        if (i < 0 || !(OPTS[i].cmds & cmd) || !strcmp(e->key, "config") ||
            !strcmp(e->key, "help")) {
            base_set_err(err, errlen, "%s:%d:%d: unknown key '%s' for %s", o->yaml.path, e->line,
                         e->col, e->key, cli_cmd_name(cmd));
            return -1;
        }
        cli_opt_val *v = &o->v[i];
        if (v->n) continue; /* the command line wins */
        snprintf(v->origin, sizeof v->origin, "%s:%d:%d: %s", o->yaml.path, e->line, e->col,
                 e->key);
        if (e->is_list && OPTS[i].repeat == CLI_ONCE) {
            base_set_err(err, errlen, "%s: expected a single value, not a list", v->origin);
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
    return 0;
oom:
    base_set_err(err, errlen, "out of memory");
    return -1;
}

int cli_opts_parse(cli_opts *o, int cmd, int argc, char **argv, char *err, size_t errlen)
{
    memset(o, 0, sizeof *o);
    o->cmd = cmd;
    const char *cn = cli_cmd_name(cmd);
    if (!(o->v = calloc((size_t)N_OPTS, sizeof *o->v))) goto oom;
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
            base_set_err(err, errlen, "unexpected argument '%s' (see modpipe %s --help)", arg, cn);
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
            base_set_err(err, errlen, "unknown option '%s' for %s (see modpipe %s --help)", arg, cn,
                         cn);
            return -1;
        }
        cli_opt_val *v = &o->v[i];
        if (v->n && OPTS[i].repeat != CLI_REPEAT) {
            base_set_err(err, errlen, "--%s given twice", OPTS[i].name);
            return -1;
        }
        snprintf(v->origin, sizeof v->origin, "--%s", OPTS[i].name);
        if (!OPTS[i].metavar) {
            if (inline_val) {
                base_set_err(err, errlen, "--%s takes no value", OPTS[i].name);
                return -1;
            }
            if (push(v, "1")) goto oom;
            continue;
        }
        const char *val = inline_val;
        if (!val) {
            if (a + 1 >= argc) {
                base_set_err(err, errlen, "--%s needs a value (%s)", OPTS[i].name, OPTS[i].metavar);
                return -1;
            }
            val = argv[++a];
        }
        if (push(v, (char *)val)) goto oom;
    }
    if (cli_opt_has(o, "config") && !cli_opt_has(o, "help")) return parse_yaml(o, cmd, err, errlen);
    return 0;
oom:
    base_set_err(err, errlen, "out of memory");
    return -1;
}

int cli_opt_long(const cli_opts *o, const char *name, long lo, long hi, long dflt, long *out,
                 char *err, size_t errlen)
{
    const cli_opt_val *v = cli_opt(o, name);
    *out = dflt;
    if (!v->n) return 0;
    char *end;
    errno = 0;
    long x = strtol(v->vals[0], &end, 10);
    if (errno || end == v->vals[0] || *end || x < lo || x > hi) {
        base_set_err(err, errlen, "%s: expected an integer in [%ld, %ld], got '%s'", v->origin, lo,
                     hi, v->vals[0]);
        return -1;
    }
    *out = x;
    return 0;
}

int cli_opt_double(const cli_opts *o, const char *name, double lo, double hi, int hi_open,
                   double dflt, double *out, char *err, size_t errlen)
{
    const cli_opt_val *v = cli_opt(o, name);
    *out = dflt;
    if (!v->n) return 0;
    char *end;
    errno = 0;
    double x = strtod(v->vals[0], &end);
    if (errno || end == v->vals[0] || *end || !(x >= lo) || (hi_open ? !(x < hi) : !(x <= hi))) {
        base_set_err(err, errlen, "%s: expected a number in [%g, %g%s, got '%s'", v->origin, lo, hi,
                     hi_open ? ")" : "]", v->vals[0]);
        return -1;
    }
    *out = x;
    return 0;
}

int cli_opt_choice(const cli_opts *o, const char *name, const char *const *choices, int dflt,
                   int *out, char *err, size_t errlen)
{
    const cli_opt_val *v = cli_opt(o, name);
    *out = dflt;
    if (!v->n) return 0;
    int n = 0;
    for (; choices[n]; n++)
        if (!strcmp(choices[n], v->vals[0])) {
            *out = n;
            return 0;
        }
    char list[256] = "";
    size_t used = 0;
    for (int i = 0; i < n && used < sizeof list; i++)
        used += (size_t)snprintf(list + used, sizeof list - used, "%s%s",
                                 i == 0       ? ""
                                 : i == n - 1 ? " or "
                                              : ", ",
                                 choices[i]);
    base_set_err(err, errlen, "%s: expected %s, got '%s'", v->origin, list, v->vals[0]);
    return -1;
}

void cli_opts_usage(FILE *f, int cmd, const char *intro, const char *example)
{
    fprintf(f, "%s\noptions:\n", intro);
    for (int i = 0; i < N_OPTS; i++) {
        if (!(OPTS[i].cmds & cmd) || !OPTS[i].help) continue;
        char left[64];
        if (!strcmp(OPTS[i].name, "n"))
            snprintf(left, sizeof left, "-n N");
        else
            snprintf(left, sizeof left, "--%s%s%s", OPTS[i].name, OPTS[i].metavar ? " " : "",
                     OPTS[i].metavar ? OPTS[i].metavar : "");
        fprintf(f, "  %-26s %s\n", left, OPTS[i].help);
    }
    if (example) fprintf(f, "\nexample:\n%s", example);
}
