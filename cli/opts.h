/* cli/opts.h — the one option table of every modpipe command, its parser and its --help.
 *
 * Each option is declared once in cli/opts.c (name, metavar, the commands it applies to, help);
 * an option shared by several commands has one spelling and one meaning in all of them.
 * cli_opts_parse reads argv ("--name VALUE", "--name=VALUE", switches "--name", "-n N" for
 * partition's stage count, "-h"), then, for commands that take --config, a YAML file whose keys
 * are option names without "--" (cli/yamlcfg.h); the command line wins over the file. Each value
 * remembers where it came from ("--micro-batch" or "f.yaml:3:14: micro-batch") so that every
 * later complaint names it.
 *
 * Errors (non-zero, one line in err): an argument that is not an option, an option the command
 * does not take, a value missing or given to a switch, an option given twice (unless it may
 * repeat), a YAML key the command does not take or a list for a single value, a bad YAML file.
 * The typed getters fail with "ORIGIN: expected ..., got 'VALUE'".
 *
 * Ownership: cli_opts points into argv and into its YAML document; cli_opts_free releases the
 * latter (safe after a failed parse). No threads, no MPI.
 */
#ifndef CLI_OPTS_H
#define CLI_OPTS_H

#include <stddef.h>
#include <stdio.h>

#include "cli/yamlcfg.h"

/* The commands (bit masks of the table's `cmds`). */
enum {
    CLI_GENERATE = 1 << 0,
    CLI_EVAL = 1 << 1,
    CLI_PARTITION = 1 << 2,
    CLI_INIT_MODEL = 1 << 3,
    CLI_SERVE = 1 << 4,
    CLI_ROUTER_TUNE = 1 << 5,
    CLI_TOKENIZE = 1 << 6,
    CLI_DETOKENIZE = 1 << 7,
    CLI_QUANTIZE = 1 << 8,
};

typedef struct {
    const char *name;    /* without "--" */
    const char *metavar; /* NULL: a switch */
    int cmds;            /* CLI_* mask */
    int repeat;          /* CLI_ONCE, CLI_REPEAT (given several times), CLI_YAML_LIST */
    const char *help;    /* NULL: accepted but not listed in --help */
} cli_opt_def;

enum { CLI_ONCE = 0, CLI_REPEAT = 1, CLI_YAML_LIST = 2 /* once; in YAML a list of items */ };

typedef struct {
    char **vals; /* [n] argv strings or YAML scalars */
    int n;
    char origin[512]; /* "--micro-batch" or "f.yaml:3:14: micro-batch" */
} cli_opt_val;

typedef struct {
    int cmd;
    cli_opt_val *v; /* [cli_n_opts()] */
    cli_yaml yaml;
    int have_yaml;
} cli_opts;

/* "generate", "eval", ... */
const char *cli_cmd_name(int cmd);

int cli_opts_parse(cli_opts *o, int cmd, int argc, char **argv, char *err, size_t errlen);
void cli_opts_free(cli_opts *o);

/* The value of `name` (which must be in the table; an unknown name aborts, a bug). */
const cli_opt_val *cli_opt(const cli_opts *o, const char *name);
const char *cli_opt_str(const cli_opts *o, const char *name); /* first value or NULL */
int cli_opt_has(const cli_opts *o, const char *name);
const char *cli_opt_origin(const cli_opts *o, const char *name);

/* Typed reads: `dflt` when absent; out of [lo, hi] (hi_open: [lo, hi)) is an error. */
int cli_opt_long(const cli_opts *o, const char *name, long lo, long hi, long dflt, long *out,
                 char *err, size_t errlen);
int cli_opt_double(const cli_opts *o, const char *name, double lo, double hi, int hi_open,
                   double dflt, double *out, char *err, size_t errlen);
/* One of `choices` (NULL-terminated): its index in *out; `dflt` when absent. */
int cli_opt_choice(const cli_opts *o, const char *name, const char *const *choices, int dflt,
                   int *out, char *err, size_t errlen);

/* `modpipe CMD --help`: intro (ends with a newline), the command's options, the example
 * (may be NULL). */
void cli_opts_usage(FILE *f, int cmd, const char *intro, const char *example);

#endif
