/* cli/yamlcfg.h — YAML files (libyaml document API) as flat, located key/value entries.
 *
 * A YAML file whose root is a mapping is flattened: nested mappings give dotted keys
 * ("mod.capacity"); a value is a scalar or a sequence of scalars. A sequence item may also
 * be a flat mapping of plain values ({layers: "0-5", ranks: 2}): it becomes the one string
 * "layers=0-5 ranks=2" (keys in file order; '=' and spaces inside them are an error). Each entry remembers its
 * 1-based line and column so every later complaint can say "file:line:col: ...".
 * An empty file is an empty mapping.
 *
 * Errors (return non-zero, one line in err, always "path:line:col: what"): file unreadable
 * (path only), YAML syntax errors (libyaml's problem at problem_mark, converted to 1-based),
 * root not a mapping, a non-scalar key, a sequence holding a sequence (or a nested mapping), a key given
 * twice, aliases/anchors.
 *
 * Ownership: cli_yaml owns all strings; cli_yaml_free(NULL) is a no-op.
 */
#ifndef CLI_YAMLCFG_H
#define CLI_YAMLCFG_H

#include <stddef.h>

typedef struct {
    char *key;   /* dotted path */
    char **vals; /* [n_vals] scalar strings */
    int n_vals;
    int is_list;   /* 1 for a sequence (n_vals may be 0), 0 for a scalar (n_vals == 1) */
    int line, col; /* 1-based position of the value */
} cli_yaml_entry;

typedef struct {
    char *path;
    cli_yaml_entry *e; /* [n] in file order */
    int n;
} cli_yaml;

int cli_yaml_load(const char *path, cli_yaml *out, char *err, size_t errlen);
/* Same, from text in memory (tests); `path` is used in messages. */
int cli_yaml_parse(const char *text, size_t len, const char *path, cli_yaml *out, char *err,
                   size_t errlen);
void cli_yaml_free(cli_yaml *y);
const cli_yaml_entry *cli_yaml_get(const cli_yaml *y, const char *key);

/* Typed reads of a scalar entry; on failure "path:line:col: KEY: expected ..." in err. */
int cli_yaml_int(const cli_yaml *y, const cli_yaml_entry *e, long lo, long hi, long *out, char *err,
                 size_t errlen);
int cli_yaml_double(const cli_yaml *y, const cli_yaml_entry *e, double lo, double hi, double *out,
                    char *err, size_t errlen);
int cli_yaml_bool(const cli_yaml *y, const cli_yaml_entry *e, int *out, char *err, size_t errlen);
/* Fails for keys not in `allowed` (NULL-terminated): "path:line:col: unknown key KEY". */
int cli_yaml_check_keys(const cli_yaml *y, const char *const *allowed, char *err, size_t errlen);

#endif
