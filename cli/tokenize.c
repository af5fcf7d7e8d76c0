/* cli/tokenize.c — `modpipe tokenize` / `modpipe detokenize` (tokcli.h). */
#include "cli/tokenize.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "base/ids.h"
#include "cli/opts.h"
#include "tok/tok.h"

typedef struct {
    const char *model, *tokenizer, *text, *text_file, *ids, *ids_file;
    int no_special, skip_special, help;
} cli_tok_opts;

static void cli_tok_usage(int detok)
{
    if (!detok)
        cli_opts_usage(stdout, CLI_TOKENIZE,
                       "modpipe tokenize: text -> token ids with a Hugging Face tokenizer.json.\n"
                       "Prints the ids space-separated on one line.\n\n"
                       "usage: modpipe tokenize (--model DIR | --tokenizer F) (--text S | "
                       "--text-file F) [--no-special]\n",
                       "  modpipe tokenize --model tests/fixtures/stories260K --text "
                       "\"Once upon a time\"\n");
    else
        cli_opts_usage(stdout, CLI_DETOKENIZE,
                       "modpipe detokenize: token ids -> text with a Hugging Face "
                       "tokenizer.json.\nPrints the text, then a newline.\n\n"
                       "usage: modpipe detokenize (--model DIR | --tokenizer F) (--ids \"1 2 3\" | "
                       "--ids-file F) [--skip-special]\n",
                       "  modpipe detokenize --model tests/fixtures/stories260K --ids "
                       "\"1 403 407 261 378\"\n");
}

/* The options (the table: cli/opts.c), then the pairs of which exactly one is needed. */
static int cli_tok_parse(int argc, char **argv, int detok, cli_tok_opts *o)
{
    memset(o, 0, sizeof *o);
    const char *cmd = detok ? "detokenize" : "tokenize";
    cli_opts a;
    char err[1024];
    if (cli_opts_parse(&a, detok ? CLI_DETOKENIZE : CLI_TOKENIZE, argc, argv, err, sizeof err)) {
        fprintf(stderr, "modpipe %s: %s\n", cmd, err);
        cli_opts_free(&a);
        return -1;
    }
    o->help = cli_opt_has(&a, "help");
    o->model = cli_opt_str(&a, "model");
    o->tokenizer = cli_opt_str(&a, "tokenizer");
    if (detok) {
        o->ids = cli_opt_str(&a, "ids");
        o->ids_file = cli_opt_str(&a, "ids-file");
        o->skip_special = cli_opt_has(&a, "skip-special");
    } else {
        o->text = cli_opt_str(&a, "text");
        o->text_file = cli_opt_str(&a, "text-file");
        o->no_special = cli_opt_has(&a, "no-special");
    }
    cli_opts_free(&a); /* the strings point into argv (no --config here) */
    if (o->help) return 0;
    if (!o->model == !o->tokenizer) {
        fprintf(stderr, "modpipe %s: give exactly one of --model DIR or --tokenizer F\n", cmd);
        return -1;
    }
    const char *in1 = detok ? o->ids : o->text, *in2 = detok ? o->ids_file : o->text_file;
    if (!in1 == !in2) {
        fprintf(stderr, "modpipe %s: give exactly one of %s\n", cmd,
                detok ? "--ids or --ids-file" : "--text or --text-file");
        return -1;
    }
    return 0;
}

static char *cli_tok_read(const char *cmd, const char *path, size_t *len)
{
    char err[1024];
    char *buf = base_read_file(path, 0, len, err, sizeof err);
    if (!buf) fprintf(stderr, "modpipe %s: %s\n", cmd, err);
    return buf;
}

static tok_tokenizer *cli_tok_load(const char *cmd, const cli_tok_opts *o)
{
    char err[512];
    tok_tokenizer *t;
    if (tok_load(o->model ? o->model : o->tokenizer, &t, err, sizeof err)) {
        fprintf(stderr, "modpipe %s: %s\n", cmd, err);
        return NULL;
    }
    return t;
}

int cli_tok_tokenize(int argc, char **argv)
{
    cli_tok_opts o;
    if (cli_tok_parse(argc, argv, 0, &o)) return 2;
    if (o.help) {
        cli_tok_usage(0);
        return 0;
    }
    tok_tokenizer *t = cli_tok_load("tokenize", &o);
    if (!t) return 2;
    size_t len = 0;
    char *file = NULL;
    const char *text = o.text;
    if (o.text_file) {
        if (!(file = cli_tok_read("tokenize", o.text_file, &len))) {
            tok_free(t);
            return 2;
        }
        text = file;
    } else {
        len = strlen(text);
    }
    int32_t *ids;
    int n;
    char err[512];
    int rc = 0;
    if (tok_encode(t, text, len, !o.no_special, &ids, &n, err, sizeof err)) {
        fprintf(stderr, "modpipe tokenize: %s\n", err);
        rc = 2;
    } else {
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", (int)ids[i]);
        printf("\n");
        free(ids);
    }
    free(file);
    tok_free(t);
    return rc;
}

/* Ids separated by spaces, commas or newlines (base/ids.h). */
static int cli_tok_parse_ids(const char *s, const char *where, int32_t **out, int *n)
{
    base_ids ids = {0};
    char err[512];
    if (base_ids_parse(s, (long)INT32_MAX + 1, &ids, where, err, sizeof err)) {
        fprintf(stderr, "modpipe detokenize: %s\n", err);
        base_ids_free(&ids);
        return -1;
    }
    if (!ids.v && base_ids_push(&ids, 0) == 0) ids.n = 0; /* no ids: still an array */
    if (!ids.v) {
        fprintf(stderr, "modpipe detokenize: out of memory\n");
        return -1;
    }
    *out = ids.v;
    *n = (int)ids.n;
    return 0;
}

int cli_tok_detokenize(int argc, char **argv)
{
    cli_tok_opts o;
    if (cli_tok_parse(argc, argv, 1, &o)) return 2;
    if (o.help) {
        cli_tok_usage(1);
        return 0;
    }
    tok_tokenizer *t = cli_tok_load("detokenize", &o);
    if (!t) return 2;
    char *file = NULL;
    const char *src = o.ids;
    size_t flen;
    if (o.ids_file) {
        if (!(file = cli_tok_read("detokenize", o.ids_file, &flen))) {
            tok_free(t);
            return 2;
        }
        if (memchr(file, 0, flen)) {
            fprintf(stderr, "modpipe detokenize: %s: NUL byte in the id list\n", o.ids_file);
            free(file);
            tok_free(t);
            return 2;
        }
        src = file;
    }
    int32_t *ids;
    int n, rc = 0;
    if (cli_tok_parse_ids(src, o.ids_file ? o.ids_file : "--ids", &ids, &n)) {
        free(file);
        tok_free(t);
        return 2;
    }
    char *text, err[512];
    size_t len;
    if (tok_decode(t, ids, n, o.skip_special, &text, &len, err, sizeof err)) {
        fprintf(stderr, "modpipe detokenize: %s\n", err);
        rc = 2;
    } else {
        fwrite(text, 1, len, stdout);
        printf("\n");
        free(text);
    }
    free(ids);
    free(file);
    tok_free(t);
    return rc;
}
