/* cli/tokenize.c — `modpipe tokenize` / `modpipe detokenize` (tokcli.h). */
#include "cli/tokenize.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "modpipe %s: %s: %s\n", cmd, path, strerror(errno));
        return NULL;
    }
    size_t cap = 65536, n = 0, r;
    char *buf = malloc(cap + 1);
    while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *nb = realloc(buf, 2 * cap + 1);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    int bad = !buf || ferror(f);
    fclose(f);
    if (bad) {
        fprintf(stderr, "modpipe %s: %s: read error\n", cmd, path);
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
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

/* Ids separated by spaces, commas or newlines. */
static int cli_tok_parse_ids(const char *s, int32_t **out, int *n)
{
    size_t cap = 64;
    int32_t *ids = malloc(cap * sizeof *ids);
    *n = 0;
    if (!ids) {
        fprintf(stderr, "modpipe detokenize: out of memory\n");
        return -1;
    }
    for (const char *p = s;;) {
        while (*p == ' ' || *p == ',' || *p == '\n' || *p == '\r' || *p == '\t') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX ||
            (*end && *end != ' ' && *end != ',' && *end != '\n' && *end != '\r' && *end != '\t')) {
            int w = 0;
            while (p[w] && p[w] != ' ' && p[w] != ',' && p[w] != '\n' && w < 40) w++;
            fprintf(stderr, "modpipe detokenize: id %d: '%.*s' is not a token id (>= 0)\n", *n + 1,
                    w, p);
            free(ids);
            return -1;
        }
        if ((size_t)*n == cap) {
            int32_t *ni = realloc(ids, 2 * cap * sizeof *ni);
            if (!ni) {
                free(ids);
                fprintf(stderr, "modpipe detokenize: out of memory\n");
                return -1;
            }
            ids = ni;
            cap *= 2;
        }
        ids[(*n)++] = (int32_t)v;
        p = end;
    }
    *out = ids;
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
    if (cli_tok_parse_ids(src, &ids, &n)) {
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
