/* serve/request.c — JSON request bodies -> serve_request (pure; see serve.h). */
#include <cjson/cJSON.h>
#include <ctype.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve/serve.h"

#define FAIL(field, ...)                                                                           \
    do {                                                                                           \
        snprintf(param, paramlen, "%s", (field));                                                  \
        snprintf(err, errlen, __VA_ARGS__);                                                        \
        goto fail;                                                                                 \
    } while (0)

void serve_request_free(serve_request *r)
{
    if (!r) return;
    free(r->model);
    free(r->prompt_text);
    free(r->prompt_ids);
    for (int i = 0; i < r->n_msgs; i++) {
        free(r->msgs[i].role);
        free(r->msgs[i].content);
    }
    free(r->msgs);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    memset(r, 0, sizeof *r);
}

long serve_json_values(const char *json, size_t len)
{
    long n = 1;
    int in_str = 0;
    for (size_t i = 0; i < len; i++) {
        char c = json[i];
        if (in_str) {
            if (c == '\\')
                i++;
            else if (c == '"')
                in_str = 0;
        } else if (c == '"') {
            in_str = 1;
        } else if (c == ',' || c == '[' || c == '{') {
            n++;
        }
    }
    return n;
}

/* The JSON path ("messages[1].content", "stop[0]") of the first string holding an escaped
 * NUL (\u0000) in json[0..len), which cJSON has already accepted as an object. cJSON decodes
 * the escape into a 0 byte, so every C string after it would silently end there. Returns 1
 * with the path, 0 when there is none. Only the first levels are named (deeper: "..."). */
#define NUL_DEPTH 16
static int find_nul(const char *json, size_t len, char *path, size_t pathlen)
{
    struct {
        int obj, idx;
        const char *key; /* obj: the current member's name (raw, between the quotes) */
        int key_len;
    } st[NUL_DEPTH];
    int depth = 0, want_key = 0;
    for (size_t i = 0; i < len; i++) {
        char c = json[i];
        if (c == '{' || c == '[') {
            if (depth < NUL_DEPTH) {
                st[depth].obj = c == '{';
                st[depth].idx = 0;
                st[depth].key = "";
                st[depth].key_len = 0;
            }
            depth++;
            want_key = c == '{';
        } else if (c == '}' || c == ']') {
            depth--;
        } else if (c == ',') {
            if (depth > 0 && depth <= NUL_DEPTH && !st[depth - 1].obj) st[depth - 1].idx++;
            want_key = depth > 0 && depth <= NUL_DEPTH && st[depth - 1].obj;
        } else if (c == '"') {
            size_t s0 = ++i;
            int nul = 0;
            for (; i < len && json[i] != '"'; i++)
                if (json[i] == '\\') {
                    if (i + 5 < len && json[i + 1] == 'u' && !memcmp(json + i + 2, "0000", 4))
                        nul = 1;
                    i++;
                }
            if (want_key) {
                if (depth > 0 && depth <= NUL_DEPTH) {
                    st[depth - 1].key = json + s0;
                    st[depth - 1].key_len = (int)(i - s0);
                }
                want_key = 0;
            }
            if (!nul) continue;
            size_t at = 0;
            if (pathlen) path[0] = 0;
            for (int d = 0; d < depth && d < NUL_DEPTH && at < pathlen; d++) {
                int k = st[d].obj ? snprintf(path + at, pathlen - at, "%s%.*s", d ? "." : "",
                                             st[d].key_len, st[d].key)
                                  : snprintf(path + at, pathlen - at, "[%d]", st[d].idx);
                if (k > 0) at += (size_t)k;
            }
            if (depth > NUL_DEPTH && at < pathlen) snprintf(path + at, pathlen - at, "...");
            return 1;
        }
    }
    return 0;
}

/* An integer-valued JSON number in [lo, hi]. */
static int get_int(const cJSON *v, double lo, double hi, double *out)
{
    if (!cJSON_IsNumber(v)) return -1;
    double d = v->valuedouble;
    if (!isfinite(d) || d != floor(d) || d < lo || d > hi) return -1;
    *out = d;
    return 0;
}

/* ids from a JSON array of integers; -1 with err on a bad element. */
static int get_ids(const cJSON *arr, int vocab, int32_t **ids, int *n, const char *field,
                   char *param, size_t paramlen, char *err, size_t errlen)
{
    int cnt = cJSON_GetArraySize(arr);
    *ids = malloc((size_t)(cnt ? cnt : 1) * sizeof **ids);
    if (!*ids) FAIL(field, "out of memory");
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)
    {
        double d;
        if (get_int(e, 0, 2147483647.0, &d))
            FAIL(field,
                 "'%s' must be a string or an array of token ids (non-negative integers); "
                 "element %d is not",
                 field, i);
        if (vocab > 0 && d >= vocab)
            FAIL(field, "'%s': token id %.0f at index %d is out of range [0, %d)", field, d, i,
                 vocab);
        (*ids)[i++] = (int32_t)d;
    }
    *n = i;
    return 0;
fail:
    free(*ids);
    *ids = NULL;
    *n = 0;
    return -1;
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s);
    char *d = malloc(n + 1);
    if (d) memcpy(d, s, n + 1);
    return d;
}

/* "content": a string, or an array of {"type": "text", "text": str} parts (joined). */
static char *message_text(const cJSON *c)
{
    if (cJSON_IsString(c)) return dup_str(c->valuestring);
    if (!cJSON_IsArray(c)) return NULL;
    size_t len = 0;
    const cJSON *p;
    cJSON_ArrayForEach(p, c)
    {
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(p, "type");
        const cJSON *tx = cJSON_GetObjectItemCaseSensitive(p, "text");
        if (!cJSON_IsObject(p) || !cJSON_IsString(ty) || strcmp(ty->valuestring, "text") ||
            !cJSON_IsString(tx))
            return NULL;
        len += strlen(tx->valuestring);
    }
    char *out = malloc(len + 1);
    if (!out) return NULL;
    size_t at = 0;
    cJSON_ArrayForEach(p, c)
    {
        const char *s = cJSON_GetObjectItemCaseSensitive(p, "text")->valuestring;
        size_t n = strlen(s);
        memcpy(out + at, s, n);
        at += n;
    }
    out[at] = 0;
    return out;
}

int serve_request_parse(serve_req_kind kind, const char *json, size_t len, int vocab,
                        serve_request *out, char *param, size_t paramlen, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    out->kind = kind;
    out->temperature = 1.0f;
    out->top_p = 1.0f;
    out->add_special = 1;
    if (paramlen) param[0] = 0;
    if (errlen) err[0] = 0;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    const cJSON *v;
    if (!root) FAIL("", "the request body is not valid JSON");
    if (!cJSON_IsObject(root)) FAIL("", "the request body must be a JSON object");
    while (end < json + len && isspace((unsigned char)*end)) end++;
    if (end < json + len)
        FAIL("", "the request body goes on after the JSON object (byte %zu of %zu)",
             (size_t)(end - json), len);
    char nul[96];
    if (find_nul(json, len, nul, sizeof nul))
        FAIL(nul, "'%s' contains a NUL character (\\u0000), which is not allowed", nul);

    if (kind == SERVE_REQ_TOKENIZE) {
        v = cJSON_GetObjectItemCaseSensitive(root, "content");
        if (!v) FAIL("content", "'content' is required");
        if (!cJSON_IsString(v)) FAIL("content", "'content' must be a string");
        if (!(out->prompt_text = dup_str(v->valuestring))) FAIL("content", "out of memory");
        out->add_special = 0; /* llama.cpp's default for /tokenize */
        if ((v = cJSON_GetObjectItemCaseSensitive(root, "add_special"))) {
            if (!cJSON_IsBool(v)) FAIL("add_special", "'add_special' must be a boolean");
            out->add_special = cJSON_IsTrue(v);
        }
        if ((v = cJSON_GetObjectItemCaseSensitive(root, "with_pieces"))) {
            if (!cJSON_IsBool(v)) FAIL("with_pieces", "'with_pieces' must be a boolean");
            out->with_pieces = cJSON_IsTrue(v);
        }
        cJSON_Delete(root);
        return 0;
    }
    if (kind == SERVE_REQ_DETOKENIZE) {
        v = cJSON_GetObjectItemCaseSensitive(root, "tokens");
        if (!v) FAIL("tokens", "'tokens' is required");
        if (!cJSON_IsArray(v)) FAIL("tokens", "'tokens' must be an array of token ids");
        if (get_ids(v, vocab, &out->prompt_ids, &out->n_prompt_ids, "tokens", param, paramlen, err,
                    errlen))
            goto fail;
        cJSON_Delete(root);
        return 0;
    }

    if ((v = cJSON_GetObjectItemCaseSensitive(root, "model"))) {
        if (!cJSON_IsString(v)) FAIL("model", "'model' must be a string");
        if (!(out->model = dup_str(v->valuestring))) FAIL("model", "out of memory");
    }

    if (kind == SERVE_REQ_COMPLETION) {
        v = cJSON_GetObjectItemCaseSensitive(root, "prompt");
        if (!v) FAIL("prompt", "'prompt' is required");
        /* a one-element batch ["text"] or [[ids]] is the same as its element */
        if (cJSON_IsArray(v) && cJSON_GetArraySize(v) == 1 &&
            (cJSON_IsString(v->child) || cJSON_IsArray(v->child)))
            v = v->child;
        if (cJSON_IsString(v)) {
            if (!(out->prompt_text = dup_str(v->valuestring))) FAIL("prompt", "out of memory");
        } else if (cJSON_IsArray(v)) {
            if (cJSON_GetArraySize(v) == 0) FAIL("prompt", "'prompt' must not be empty");
            if (cJSON_IsString(v->child) || cJSON_IsArray(v->child))
                FAIL("prompt", "'prompt': batches of several prompts are not supported; send one "
                               "request per prompt");
            if (get_ids(v, vocab, &out->prompt_ids, &out->n_prompt_ids, "prompt", param, paramlen,
                        err, errlen))
                goto fail;
        } else {
            FAIL("prompt", "'prompt' must be a string or an array of token ids");
        }
    } else {
        v = cJSON_GetObjectItemCaseSensitive(root, "messages");
        if (!v) FAIL("messages", "'messages' is required");
        if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) == 0)
            FAIL("messages", "'messages' must be a non-empty array of {role, content} objects");
        int n = cJSON_GetArraySize(v);
        out->msgs = calloc((size_t)n, sizeof *out->msgs);
        if (!out->msgs) FAIL("messages", "out of memory");
        const cJSON *m;
        int i = 0;
        cJSON_ArrayForEach(m, v)
        {
            char field[64];
            snprintf(field, sizeof field, "messages[%d].role", i);
            if (!cJSON_IsObject(m)) FAIL(field, "'messages[%d]' must be an object", i);
            const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
            if (!cJSON_IsString(role) ||
                (strcmp(role->valuestring, "system") && strcmp(role->valuestring, "user") &&
                 strcmp(role->valuestring, "assistant") && strcmp(role->valuestring, "developer")))
                FAIL(field, "'%s' must be \"system\", \"developer\", \"user\" or \"assistant\"",
                     field);
            const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
            snprintf(field, sizeof field, "messages[%d].content", i);
            char *text = content ? message_text(content) : NULL;
            if (!text) FAIL(field, "'%s' must be a string (or an array of text parts)", field);
            out->msgs[i].content = text;
            /* "developer" is OpenAI's new name for "system" */
            out->msgs[i].role =
                dup_str(strcmp(role->valuestring, "developer") ? role->valuestring : "system");
            out->n_msgs = ++i;
            if (!out->msgs[i - 1].role) FAIL(field, "out of memory");
        }
    }

    double d;
    const char *mt =
        kind == SERVE_REQ_CHAT && cJSON_GetObjectItemCaseSensitive(root, "max_completion_tokens")
            ? "max_completion_tokens"
            : "max_tokens";
    if ((v = cJSON_GetObjectItemCaseSensitive(root, mt)) && !cJSON_IsNull(v)) {
        if (get_int(v, 1, 2147483647.0, &d)) FAIL(mt, "'%s' must be an integer >= 1", mt);
        out->max_tokens = (int)d;
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "temperature")) && !cJSON_IsNull(v)) {
        if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0 && v->valuedouble <= 2))
            FAIL("temperature", "'temperature' must be a number in [0, 2]");
        out->temperature = (float)v->valuedouble;
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "top_p")) && !cJSON_IsNull(v)) {
        if (!cJSON_IsNumber(v) || !(v->valuedouble > 0 && v->valuedouble <= 1))
            FAIL("top_p", "'top_p' must be a number in (0, 1]");
        out->top_p = (float)v->valuedouble;
        /* sampling works in single precision: a positive top_p below its range would be 0 */
        if (!(out->top_p > 0))
            FAIL("top_p", "'top_p' %g is below the smallest usable value %g (single precision)",
                 v->valuedouble, (double)FLT_TRUE_MIN);
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "seed")) && !cJSON_IsNull(v)) {
        /* doubles hold integers exactly up to 2^53 */
        if (get_int(v, 0, 9007199254740992.0, &d))
            FAIL("seed", "'seed' must be a non-negative integer");
        out->seed = (uint64_t)d;
        out->has_seed = 1;
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "stop")) && !cJSON_IsNull(v)) {
        if (cJSON_IsString(v)) {
            if (v->valuestring[0] && !(out->stop[out->n_stop++] = dup_str(v->valuestring)))
                FAIL("stop", "out of memory");
        } else if (cJSON_IsArray(v)) {
            if (cJSON_GetArraySize(v) > SERVE_MAX_STOP)
                FAIL("stop", "'stop' may hold at most %d strings", SERVE_MAX_STOP);
            const cJSON *s;
            cJSON_ArrayForEach(s, v)
            {
                if (!cJSON_IsString(s))
                    FAIL("stop", "'stop' must be a string or an array of strings");
                if (!s->valuestring[0]) continue; /* an empty stop matches nothing */
                if (!(out->stop[out->n_stop++] = dup_str(s->valuestring)))
                    FAIL("stop", "out of memory");
            }
        } else {
            FAIL("stop", "'stop' must be a string or an array of strings");
        }
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "stream")) && !cJSON_IsNull(v)) {
        if (!cJSON_IsBool(v)) FAIL("stream", "'stream' must be a boolean");
        out->stream = cJSON_IsTrue(v);
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "stream_options")) && !cJSON_IsNull(v)) {
        if (!cJSON_IsObject(v)) FAIL("stream_options", "'stream_options' must be an object");
        const cJSON *u = cJSON_GetObjectItemCaseSensitive(v, "include_usage");
        if (u && !cJSON_IsBool(u))
            FAIL("stream_options.include_usage",
                 "'stream_options.include_usage' must be a boolean");
        out->include_usage = cJSON_IsTrue(u);
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "ignore_eos")) && !cJSON_IsNull(v)) {
        if (!cJSON_IsBool(v)) FAIL("ignore_eos", "'ignore_eos' must be a boolean");
        out->ignore_eos = cJSON_IsTrue(v);
    }
    /* fields we cannot honour are refused rather than silently ignored */
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "n")) && !cJSON_IsNull(v)) {
        if (get_int(v, 1, 1, &d)) FAIL("n", "'n' must be 1 (one choice per request)");
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "best_of")) && !cJSON_IsNull(v)) {
        if (get_int(v, 1, 1, &d)) FAIL("best_of", "'best_of' must be 1");
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "echo")) && !cJSON_IsNull(v)) {
        if (!cJSON_IsBool(v) || cJSON_IsTrue(v))
            FAIL("echo", "'echo' is not supported (must be false)");
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "logprobs")) && !cJSON_IsNull(v)) {
        if (!(cJSON_IsBool(v) && cJSON_IsFalse(v))) FAIL("logprobs", "'logprobs' is not supported");
    }
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "suffix")) && !cJSON_IsNull(v))
        FAIL("suffix", "'suffix' is not supported");
    cJSON_Delete(root);
    return 0;
fail:
    cJSON_Delete(root);
    serve_request_free(out);
    return -1;
}
