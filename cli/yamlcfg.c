/* cli/yamlcfg.c — YAML files flattened to located key/value entries (see yamlcfg.h). */
#include "cli/yamlcfg.h"
#include "base/err.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

static char *dup_str(const char *s)
{
    size_t n = strlen(s);
    char *d = malloc(n + 1);
    if (d) memcpy(d, s, n + 1);
    return d;
}

/* Line/column (1-based) of a byte offset, for reader errors (which carry no mark). */
static void offset_to_pos(const char *text, size_t len, size_t off, int *line, int *col)
{
    int l = 1, c = 1;
    for (size_t i = 0; i < off && i < len; i++) {
        if (text[i] == '\n') {
            l++;
            c = 1;
        } else {
            c++;
        }
    }
    *line = l;
    *col = c;
}

/* libyaml's own diagnosis, converted to "path:line:col: problem (context)". */
static void parser_err(const yaml_parser_t *p, const char *text, size_t len, const char *path,
                       char *err, size_t errlen)
{
    if (p->error == YAML_MEMORY_ERROR) {
        base_set_err(err, errlen, "%s: out of memory while parsing YAML", path);
        return;
    }
    int line, col;
    if (p->error == YAML_READER_ERROR) {
        /* reader errors (bad encoding) have an offset, not a mark */
        offset_to_pos(text, len, p->problem_offset, &line, &col);
    } else {
        line = (int)p->problem_mark.line + 1;
        col = (int)p->problem_mark.column + 1;
    }
    const char *problem = p->problem ? p->problem : "invalid YAML";
    if (p->context && p->error != YAML_READER_ERROR)
        base_set_err(err, errlen, "%s:%d:%d: %s (%s at %d:%d)", path, line, col, problem,
                     p->context, (int)p->context_mark.line + 1, (int)p->context_mark.column + 1);
    else
        base_set_err(err, errlen, "%s:%d:%d: %s", path, line, col, problem);
}

static int node_err(const char *path, const yaml_node_t *n, char *err, size_t errlen,
                    const char *what)
{
    base_set_err(err, errlen, "%s:%d:%d: %s", path, (int)n->start_mark.line + 1,
                 (int)n->start_mark.column + 1, what);
    return -1;
}

/* Growable entry list while flattening. */
typedef struct {
    cli_yaml *y;
    int cap;
    const char *path;
    yaml_document_t *doc;
    char *err;
    size_t errlen;
} flat_ctx;

static cli_yaml_entry *new_entry(flat_ctx *c, const char *key, const yaml_node_t *kn,
                                 const yaml_node_t *vn)
{
    cli_yaml *y = c->y;
    for (int i = 0; i < y->n; i++) {
        if (strcmp(y->e[i].key, key) == 0) {
            base_set_err(c->err, c->errlen, "%s:%d:%d: key %s given twice (first value at %d:%d)",
                         c->path, (int)kn->start_mark.line + 1, (int)kn->start_mark.column + 1, key,
                         y->e[i].line, y->e[i].col);
            return NULL;
        }
    }
    if (y->n == c->cap) {
        int ncap = c->cap ? 2 * c->cap : 16;
        cli_yaml_entry *ne = realloc(y->e, (size_t)ncap * sizeof *ne);
        if (!ne) goto oom;
        y->e = ne;
        c->cap = ncap;
    }
    cli_yaml_entry *e = &y->e[y->n];
    memset(e, 0, sizeof *e);
    e->key = dup_str(key);
    if (!e->key) goto oom;
    e->line = (int)vn->start_mark.line + 1;
    e->col = (int)vn->start_mark.column + 1;
    y->n++;
    return e;
oom:
    base_set_err(c->err, c->errlen, "%s: out of memory", c->path);
    return NULL;
}

static int flatten_map(flat_ctx *c, const yaml_node_t *map, const char *prefix);

static int add_value(flat_ctx *c, const char *key, const yaml_node_t *kn, const yaml_node_t *vn)
{
    if (vn->type == YAML_MAPPING_NODE) return flatten_map(c, vn, key);

    cli_yaml_entry *e = new_entry(c, key, kn, vn);
    if (!e) return -1;
    if (vn->type == YAML_SCALAR_NODE) {
        e->is_list = 0;
        e->vals = malloc(sizeof *e->vals);
        if (!e->vals) goto oom;
        e->vals[0] = dup_str((const char *)vn->data.scalar.value);
        if (!e->vals[0]) goto oom;
        e->n_vals = 1;
        return 0;
    }
    /* sequence of scalars */
    e->is_list = 1;
    int n = (int)(vn->data.sequence.items.top - vn->data.sequence.items.start);
    if (n > 0) {
        e->vals = calloc((size_t)n, sizeof *e->vals);
        if (!e->vals) goto oom;
    }
    for (int i = 0; i < n; i++) {
        const yaml_node_t *item = yaml_document_get_node(c->doc, vn->data.sequence.items.start[i]);
        if (item->type == YAML_MAPPING_NODE) { /* a flat mapping: "k=v k=v" (cli/yamlcfg.h) */
            char flat[1024] = "";
            size_t len = 0;
            for (yaml_node_pair_t *pr = item->data.mapping.pairs.start;
                 pr < item->data.mapping.pairs.top; pr++) {
                const yaml_node_t *k = yaml_document_get_node(c->doc, pr->key);
                const yaml_node_t *val = yaml_document_get_node(c->doc, pr->value);
                if (k->type != YAML_SCALAR_NODE || val->type != YAML_SCALAR_NODE ||
                    strpbrk((const char *)k->data.scalar.value, "= ") ||
                    strpbrk((const char *)val->data.scalar.value, "= ")) {
                    char what[300];
                    snprintf(what, sizeof what,
                             "%s: item %d: a mapping in a list may only hold "
                             "plain key: value pairs without '=' or spaces",
                             key, i + 1);
                    return node_err(c->path, item, c->err, c->errlen, what);
                }
                len +=
                    (size_t)snprintf(flat + len, len < sizeof flat ? sizeof flat - len : 0,
                                     "%s%s=%s", len ? " " : "", (const char *)k->data.scalar.value,
                                     (const char *)val->data.scalar.value);
            }
            if (len >= sizeof flat)
                return node_err(c->path, item, c->err, c->errlen, "list item too long");
            e->vals[i] = dup_str(flat);
            if (!e->vals[i]) goto oom;
            e->n_vals = i + 1;
            continue;
        }
        if (item->type != YAML_SCALAR_NODE) {
            char what[300];
            snprintf(what, sizeof what,
                     "%s: item %d is a %s; only lists of plain values are "
                     "supported",
                     key, i + 1, item->type == YAML_MAPPING_NODE ? "mapping" : "list");
            return node_err(c->path, item, c->err, c->errlen, what);
        }
        e->vals[i] = dup_str((const char *)item->data.scalar.value);
        if (!e->vals[i]) goto oom;
        e->n_vals = i + 1;
    }
    return 0;
oom:
    base_set_err(c->err, c->errlen, "%s: out of memory", c->path);
    return -1;
}

static int flatten_map(flat_ctx *c, const yaml_node_t *map, const char *prefix)
{
    for (yaml_node_pair_t *pr = map->data.mapping.pairs.start; pr < map->data.mapping.pairs.top;
         pr++) {
        const yaml_node_t *kn = yaml_document_get_node(c->doc, pr->key);
        const yaml_node_t *vn = yaml_document_get_node(c->doc, pr->value);
        if (kn->type != YAML_SCALAR_NODE)
            return node_err(c->path, kn, c->err, c->errlen,
                            "a key must be a plain value, not a list or mapping");
        const char *k = (const char *)kn->data.scalar.value;
        if (k[0] == '\0') return node_err(c->path, kn, c->err, c->errlen, "empty key");
        size_t need = (prefix ? strlen(prefix) + 1 : 0) + strlen(k) + 1;
        char *full = malloc(need);
        if (!full) {
            base_set_err(c->err, c->errlen, "%s: out of memory", c->path);
            return -1;
        }
        if (prefix)
            snprintf(full, need, "%s.%s", prefix, k);
        else
            snprintf(full, need, "%s", k);
        int rc = add_value(c, full, kn, vn);
        free(full);
        if (rc) return rc;
    }
    return 0;
}

/* The document API resolves aliases silently, so find anchors/aliases with an event pass. */
static int reject_anchors(const char *text, size_t len, const char *path, char *err, size_t errlen)
{
    yaml_parser_t p;
    if (!yaml_parser_initialize(&p)) {
        base_set_err(err, errlen, "%s: out of memory", path);
        return -1;
    }
    yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
    int rc = 0;
    for (;;) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&p, &ev)) {
            parser_err(&p, text, len, path, err, errlen);
            rc = -1;
            break;
        }
        const char *what = NULL;
        if (ev.type == YAML_ALIAS_EVENT)
            what = "aliases (*name) are not supported";
        else if ((ev.type == YAML_SCALAR_EVENT && ev.data.scalar.anchor) ||
                 (ev.type == YAML_SEQUENCE_START_EVENT && ev.data.sequence_start.anchor) ||
                 (ev.type == YAML_MAPPING_START_EVENT && ev.data.mapping_start.anchor))
            what = "anchors (&name) are not supported";
        int end = ev.type == YAML_STREAM_END_EVENT;
        if (what) {
            base_set_err(err, errlen, "%s:%d:%d: %s", path, (int)ev.start_mark.line + 1,
                         (int)ev.start_mark.column + 1, what);
            rc = -1;
        }
        yaml_event_delete(&ev);
        if (what || end) break;
    }
    yaml_parser_delete(&p);
    return rc;
}

int cli_yaml_parse(const char *text, size_t len, const char *path, cli_yaml *out, char *err,
                   size_t errlen)
{
    if (!out) return -1;
    memset(out, 0, sizeof *out);
    if (!path) path = "<yaml>";
    out->path = dup_str(path);
    if (!out->path) {
        base_set_err(err, errlen, "%s: out of memory", path);
        return -1;
    }
    if (!text) len = 0;

    yaml_parser_t p;
    if (!yaml_parser_initialize(&p)) {
        base_set_err(err, errlen, "%s: out of memory", path);
        cli_yaml_free(out);
        return -1;
    }
    yaml_parser_set_input_string(&p, (const unsigned char *)(text ? text : ""), len);

    yaml_document_t doc;
    int rc = 0;
    if (!yaml_parser_load(&p, &doc)) {
        parser_err(&p, text, len, path, err, errlen);
        yaml_parser_delete(&p);
        cli_yaml_free(out);
        return -1;
    }
    const yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (root) {
        if (root->type != YAML_MAPPING_NODE) {
            rc = node_err(path, root, err, errlen,
                          "the top level must be a mapping of key: value lines");
        } else {
            flat_ctx c = {out, 0, path, &doc, err, errlen};
            rc = flatten_map(&c, root, NULL);
        }
    }
    yaml_document_delete(&doc);

    /* A second document ("---") would silently be ignored: refuse it. */
    if (rc == 0 && root) {
        yaml_document_t doc2;
        if (!yaml_parser_load(&p, &doc2)) {
            parser_err(&p, text, len, path, err, errlen);
            rc = -1;
        } else {
            const yaml_node_t *r2 = yaml_document_get_root_node(&doc2);
            if (r2)
                rc = node_err(path, r2, err, errlen,
                              "a second YAML document; one document per file");
            yaml_document_delete(&doc2);
        }
    }
    yaml_parser_delete(&p);

    if (rc == 0 && len > 0) rc = reject_anchors(text, len, path, err, errlen);
    if (rc) cli_yaml_free(out);
    return rc;
}

int cli_yaml_load(const char *path, cli_yaml *out, char *err, size_t errlen)
{
    if (!out) return -1;
    memset(out, 0, sizeof *out);
    FILE *f = fopen(path, "rb");
    if (!f) {
        base_set_err(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    int rc = 0;
    while (buf) {
        if (len == cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (got == 0) break;
    }
    if (!buf) {
        base_set_err(err, errlen, "%s: out of memory", path);
        rc = -1;
    } else if (ferror(f)) {
        base_set_err(err, errlen, "%s: cannot read: %s", path, strerror(errno));
        rc = -1;
    }
    fclose(f);
    if (rc == 0) rc = cli_yaml_parse(buf, len, path, out, err, errlen);
    free(buf);
    return rc;
}

void cli_yaml_free(cli_yaml *y)
{
    if (!y) return;
    for (int i = 0; i < y->n; i++) {
        for (int j = 0; j < y->e[i].n_vals; j++) free(y->e[i].vals[j]);
        free(y->e[i].vals);
        free(y->e[i].key);
    }
    free(y->e);
    free(y->path);
    memset(y, 0, sizeof *y);
}

const cli_yaml_entry *cli_yaml_get(const cli_yaml *y, const char *key)
{
    if (!y || !key) return NULL;
    for (int i = 0; i < y->n; i++)
        if (strcmp(y->e[i].key, key) == 0) return &y->e[i];
    return NULL;
}

static const char *ypath(const cli_yaml *y) { return y && y->path ? y->path : "<yaml>"; }

/* Common checks of the typed getters: present and a single value. */
static int need_scalar(const cli_yaml *y, const cli_yaml_entry *e, const char *what, char *err,
                       size_t errlen)
{
    if (!e) {
        base_set_err(err, errlen, "%s: missing value (expected %s)", ypath(y), what);
        return -1;
    }
    if (e->is_list || e->n_vals != 1) {
        base_set_err(err, errlen, "%s:%d:%d: %s: expected %s, got a list", ypath(y), e->line,
                     e->col, e->key, what);
        return -1;
    }
    return 0;
}

int cli_yaml_int(const cli_yaml *y, const cli_yaml_entry *e, long lo, long hi, long *out, char *err,
                 size_t errlen)
{
    char what[96];
    snprintf(what, sizeof what, "an integer in [%ld, %ld]", lo, hi);
    if (need_scalar(y, e, what, err, errlen)) return -1;
    const char *s = e->vals[0];
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    int bad = (end == s || *end != '\0' || s[0] == ' ' || s[0] == '\t');
    if (bad || errno == ERANGE || v < lo || v > hi) {
        base_set_err(err, errlen, "%s:%d:%d: %s: expected %s, got '%s'", ypath(y), e->line, e->col,
                     e->key, what, s);
        return -1;
    }
    if (out) *out = v;
    return 0;
}

int cli_yaml_double(const cli_yaml *y, const cli_yaml_entry *e, double lo, double hi, double *out,
                    char *err, size_t errlen)
{
    char what[96];
    snprintf(what, sizeof what, "a number in [%g, %g]", lo, hi);
    if (need_scalar(y, e, what, err, errlen)) return -1;
    const char *s = e->vals[0];
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    /* strtod also takes "nan", "inf" and hex floats: a config wants plain finite numbers */
    int bad = (end == s || *end != '\0' || s[0] == ' ' || s[0] == '\t' || !isfinite(v) ||
               strpbrk(s, "xXnN") != NULL);
    if (bad || errno == ERANGE || v < lo || v > hi) {
        base_set_err(err, errlen, "%s:%d:%d: %s: expected %s, got '%s'", ypath(y), e->line, e->col,
                     e->key, what, s);
        return -1;
    }
    if (out) *out = v;
    return 0;
}

int cli_yaml_bool(const cli_yaml *y, const cli_yaml_entry *e, int *out, char *err, size_t errlen)
{
    const char *what = "true or false";
    if (need_scalar(y, e, what, err, errlen)) return -1;
    /* YAML 1.1 spellings, which is what people write in config files */
    static const char *const yes[] = {"true", "yes", "on", NULL};
    static const char *const no[] = {"false", "no", "off", NULL};
    const char *s = e->vals[0];
    for (int i = 0; yes[i]; i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            if (out) *out = 1;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            if (out) *out = 0;
            return 0;
        }
    }
    base_set_err(err, errlen, "%s:%d:%d: %s: expected %s, got '%s'", ypath(y), e->line, e->col,
                 e->key, what, s);
    return -1;
}

int cli_yaml_check_keys(const cli_yaml *y, const char *const *allowed, char *err, size_t errlen)
{
    if (!y) return 0;
    for (int i = 0; i < y->n; i++) {
        int ok = 0;
        for (int j = 0; allowed && allowed[j]; j++) {
            if (strcmp(y->e[i].key, allowed[j]) == 0) {
                ok = 1;
                break;
            }
        }
        if (!ok) {
            base_set_err(err, errlen, "%s:%d:%d: unknown key %s", ypath(y), y->e[i].line,
                         y->e[i].col, y->e[i].key);
            return -1;
        }
    }
    return 0;
}
