/* tests/test_http.c — the HTTP layer (serve/): request parser, chat templates, and the
 * server over a raw-socket HTTP client, against test doubles of the queue and tokenizer
 * (tests/serve/double_*.c: the queue echoes the prompt bytes, one token per step). The
 * end-to-end test with the real engine and real clients is tests/serve/run.sh. */
#include <CUnit/Basic.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "serve/serve.h"
#include "tests/testutil.h"

void srvq_double_set_step(srvq *q, unsigned us); /* tests/serve/double_srvq.c */

static int has(const char *hay, const char *needle);

/* ---- parser ---------------------------------------------------------------------------------- */

static int parse(serve_req_kind k, const char *json, serve_request *r, char *param, char *err)
{
    return serve_request_parse(k, json, strlen(json), 258, r, param, 96, err, 512);
}

static void expect_bad(serve_req_kind k, const char *json, const char *field)
{
    serve_request r;
    char param[96], err[512];
    int rc = parse(k, json, &r, param, err);
    CU_ASSERT_NOT_EQUAL(rc, 0);
    CU_ASSERT_STRING_EQUAL(param, field);
    if (strcmp(param, field))
        fprintf(stderr, "\n  %s: param '%s', want '%s' (%s)\n", json, param, field, err);
    CU_ASSERT(err[0] != 0);
    CU_ASSERT_PTR_NULL(r.prompt_text);
    CU_ASSERT_PTR_NULL(r.msgs);
    serve_request_free(&r);
}

static void test_parse_completion(void)
{
    serve_request r;
    char param[96], err[512];
    CU_ASSERT_EQUAL(
        parse(SERVE_REQ_COMPLETION,
              "{\"model\":\"m\",\"prompt\":\"Once\",\"max_tokens\":7,\"temperature\":0,"
              "\"top_p\":0.5,\"seed\":42,\"stop\":[\"a\",\"\",\"bc\"],\"stream\":true,"
              "\"stream_options\":{\"include_usage\":true},\"n\":1,\"frequency_penalty\":0}",
              &r, param, err),
        0);
    CU_ASSERT_STRING_EQUAL(r.model, "m");
    CU_ASSERT_STRING_EQUAL(r.prompt_text, "Once");
    CU_ASSERT_EQUAL(r.max_tokens, 7);
    CU_ASSERT_EQUAL(r.temperature, 0.0f);
    CU_ASSERT_EQUAL(r.top_p, 0.5f);
    CU_ASSERT(r.has_seed && r.seed == 42);
    CU_ASSERT_EQUAL(r.n_stop, 2); /* the empty one is dropped */
    CU_ASSERT_STRING_EQUAL(r.stop[1], "bc");
    CU_ASSERT(r.stream && r.include_usage);
    serve_request_free(&r);

    CU_ASSERT_EQUAL(parse(SERVE_REQ_COMPLETION, "{\"prompt\":[1,2,257]}", &r, param, err), 0);
    CU_ASSERT_EQUAL(r.n_prompt_ids, 3);
    CU_ASSERT_EQUAL(r.prompt_ids[2], 257);
    CU_ASSERT_EQUAL(r.temperature, 1.0f); /* OpenAI's default */
    CU_ASSERT_EQUAL(r.max_tokens, 0);
    CU_ASSERT_EQUAL(r.n_stop, 0);
    serve_request_free(&r);
    CU_ASSERT_EQUAL(
        parse(SERVE_REQ_COMPLETION, "{\"prompt\":[[5,6]],\"stop\":\"x\"}", &r, param, err), 0);
    CU_ASSERT_EQUAL(r.n_prompt_ids, 2);
    CU_ASSERT_STRING_EQUAL(r.stop[0], "x");
    serve_request_free(&r);
    CU_ASSERT_EQUAL(parse(SERVE_REQ_COMPLETION, "{\"prompt\":[\"hi\"]}", &r, param, err), 0);
    CU_ASSERT_STRING_EQUAL(r.prompt_text, "hi");
    serve_request_free(&r);
    serve_request_free(NULL);
}

static void test_parse_errors(void)
{
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":", "");
    expect_bad(SERVE_REQ_COMPLETION, "[1,2]", "");
    expect_bad(SERVE_REQ_COMPLETION, "", "");
    expect_bad(SERVE_REQ_COMPLETION, "{}", "prompt");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":3}", "prompt");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":[1,-2]}", "prompt");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":[1,2.5]}", "prompt");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":[1,258]}", "prompt"); /* vocab 258 */
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":[]}", "prompt");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":[\"a\",\"b\"]}", "prompt");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"max_tokens\":0}", "max_tokens");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"max_tokens\":\"5\"}", "max_tokens");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"temperature\":2.5}", "temperature");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"temperature\":\"hot\"}", "temperature");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"top_p\":0}", "top_p");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"seed\":-1}", "seed");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"stop\":5}", "stop");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"stop\":[\"a\",1]}", "stop");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}",
               "stop");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"stream\":1}", "stream");
    expect_bad(SERVE_REQ_COMPLETION,
               "{\"prompt\":\"a\",\"stream_options\":{\"include_usage\":\"y\"}}",
               "stream_options.include_usage");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"n\":2}", "n");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"echo\":true}", "echo");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"logprobs\":3}", "logprobs");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"model\":5}", "model");
    expect_bad(SERVE_REQ_CHAT, "{\"messages\":[]}", "messages");
    expect_bad(SERVE_REQ_CHAT, "{\"prompt\":\"a\"}", "messages");
    expect_bad(SERVE_REQ_CHAT,
               "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"bot\",\"content\":"
               "\"b\"}]}",
               "messages[1].role");
    expect_bad(SERVE_REQ_CHAT, "{\"messages\":[{\"role\":\"user\"}]}", "messages[0].content");
    expect_bad(SERVE_REQ_CHAT, "{\"messages\":[\"hi\"]}", "messages[0].role");
    expect_bad(SERVE_REQ_TOKENIZE, "{\"text\":\"a\"}", "content");
    expect_bad(SERVE_REQ_TOKENIZE, "{\"content\":\"a\",\"add_special\":1}", "add_special");
    expect_bad(SERVE_REQ_DETOKENIZE, "{\"tokens\":\"1 2\"}", "tokens");
    expect_bad(SERVE_REQ_DETOKENIZE, "{\"tokens\":[1,999]}", "tokens");
    /* bytes after the object */
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\"} x", "");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\"}{}", "");
    /* a NUL would end the C string: refused, naming the field */
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"ab\\u0000cd\"}", "prompt");
    expect_bad(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"stop\":[\"x\",\"\\u0000\"]}", "stop[1]");
    expect_bad(SERVE_REQ_CHAT,
               "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"user\","
               "\"content\":[{\"type\":\"text\",\"text\":\"b\\u0000\"}]}]}",
               "messages[1].content[0].text");
    expect_bad(SERVE_REQ_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"\\u0000\"}]}",
               "messages[0].content");
    expect_bad(SERVE_REQ_TOKENIZE, "{\"content\":\"\\u0000\"}", "content");
    /* a top_p that single precision makes 0 */
    serve_request r;
    char param[96], err[512];
    CU_ASSERT_NOT_EQUAL(
        parse(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\",\"top_p\":1e-300}", &r, param, err), 0);
    CU_ASSERT_STRING_EQUAL(param, "top_p");
    CU_ASSERT(has(err, "1e-300"));
    /* what is not a NUL passes */
    CU_ASSERT_EQUAL(
        parse(SERVE_REQ_COMPLETION, "{\"prompt\":\"a\\\\u0000\\u0001\"} \n", &r, param, err), 0);
    CU_ASSERT_STRING_EQUAL(r.prompt_text, "a\\u0000\x01");
    serve_request_free(&r);
    const char *vals = "{\"a\":[1,2,3],\"b\":\"[,{\"}";
    CU_ASSERT_EQUAL(serve_json_values(vals, strlen(vals)), 6);
}

static void test_parse_chat(void)
{
    serve_request r;
    char param[96], err[512];
    CU_ASSERT_EQUAL(parse(SERVE_REQ_CHAT,
                          "{\"messages\":[{\"role\":\"developer\",\"content\":\"be brief\"},"
                          "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"he\"},"
                          "{\"type\":\"text\",\"text\":\"llo\"}]}],\"max_completion_tokens\":3}",
                          &r, param, err),
                    0);
    CU_ASSERT_EQUAL(r.n_msgs, 2);
    CU_ASSERT_STRING_EQUAL(r.msgs[0].role, "system");
    CU_ASSERT_STRING_EQUAL(r.msgs[1].content, "hello");
    CU_ASSERT_EQUAL(r.max_tokens, 3);
    serve_request_free(&r);
    CU_ASSERT_EQUAL(
        parse(SERVE_REQ_TOKENIZE, "{\"content\":\"x\",\"with_pieces\":true}", &r, param, err), 0);
    CU_ASSERT(r.with_pieces && !r.add_special);
    serve_request_free(&r);
}

static void test_chat_templates(void)
{
    serve_msg m[3] = {{"system", "S"}, {"user", "U"}, {"assistant", "A"}};
    serve_msg m2[4] = {{"system", "S"}, {"user", "U"}, {"assistant", "A"}, {"user", "V"}};
    struct {
        const char *name;
        serve_msg *m;
        int n;
        const char *want;
    } cases[] = {
        {"chatml", m, 2,
         "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"},
        {"llama3", m, 2,
         "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user"
         "<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
        {"zephyr", m, 2, "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n"},
        {"llama2", m, 2, "[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST]"},
        {"llama2", m2, 4, "[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s><s>[INST] V [/INST]"},
        {"mistral", m2, 4, "[INST] S\n\nU [/INST]A</s>[INST] V [/INST]"},
        {"mistral", m + 1, 1, "[INST] U [/INST]"},
        {"plain", m, 3, "S\nU\nA"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const serve_chat_template *t = serve_chat_find(cases[i].name);
        CU_ASSERT_PTR_NOT_NULL_FATAL(t);
        char *p = serve_chat_apply(t, cases[i].m, cases[i].n);
        CU_ASSERT_STRING_EQUAL(p, cases[i].want);
        if (strcmp(p, cases[i].want)) fprintf(stderr, "\n  %s: got [%s]\n", cases[i].name, p);
        free(p);
    }
    CU_ASSERT_PTR_NULL(serve_chat_find("vicuna"));
    CU_ASSERT_STRING_EQUAL(serve_chat_end_marker(serve_chat_find("chatml")), "<|im_end|>");
    /* detection from tokenizer_config.json */
    char *dir = make_tmpdir_tagged("chat");
    char path[256];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    FILE *f = fopen(path, "w");
    fputs("{\"chat_template\":\"{% for m in messages %}<|im_start|>{{m.role}}{% endfor %}\"}", f);
    fclose(f);
    CU_ASSERT_STRING_EQUAL(serve_chat_name(serve_chat_detect(dir)), "chatml");
    CU_ASSERT_STRING_EQUAL(serve_chat_name(serve_chat_detect("/nonexistent")), "plain");
    /* Mistral's template has [INST] without Llama 2's <<SYS>> */
    f = fopen(path, "w");
    fputs("{\"chat_template\":\"{{ bos_token }}{% for message in messages %}{{ '[INST] ' + "
          "message['content'] + ' [/INST]' }}{% endfor %}\"}",
          f);
    fclose(f);
    CU_ASSERT_STRING_EQUAL(serve_chat_name(serve_chat_detect(dir)), "mistral");
    f = fopen(path, "w");
    fputs("{\"chat_template\":\"[INST] <<SYS>>\\n{{ system }}\"}", f);
    fclose(f);
    CU_ASSERT_STRING_EQUAL(serve_chat_name(serve_chat_detect(dir)), "llama2");
    rm_tmpdir(dir);
}

/* ---- a raw HTTP/1.1 client ------------------------------------------------------------------- */

typedef struct {
    int status;
    char *head; /* headers, NUL-terminated */
    char *body; /* de-chunked */
    size_t body_len;
} http_resp;

static void resp_free(http_resp *r)
{
    free(r->head);
    free(r->body);
    memset(r, 0, sizeof *r);
}

static int g_port;

static int dial(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)g_port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a)) {
        close(fd);
        return -1;
    }
    return fd;
}

static void send_req(int fd, const char *method, const char *path, const char *body,
                     const char *extra)
{
    char head[1024];
    size_t bl = body ? strlen(body) : 0;
    int k = snprintf(head, sizeof head,
                     "%s %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n%s%s"
                     "Content-Length: %zu\r\n\r\n",
                     method, path, body ? "Content-Type: application/json\r\n" : "",
                     extra ? extra : "", bl);
    if (write(fd, head, (size_t)k) < 0) return;
    if (bl && write(fd, body, bl) < 0) return;
}

static int http(const char *method, const char *path, const char *body, const char *extra,
                http_resp *r)
{
    memset(r, 0, sizeof *r);
    int fd = dial();
    if (fd < 0) return -1;
    send_req(fd, method, path, body, extra);
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (n + 1024 > cap) buf = realloc(buf, cap *= 2);
        ssize_t k = read(fd, buf + n, cap - n - 1);
        if (k <= 0) break;
        n += (size_t)k;
    }
    close(fd);
    buf[n] = 0;
    char *sep = strstr(buf, "\r\n\r\n");
    if (!sep || sscanf(buf, "HTTP/1.%*d %d", &r->status) != 1) {
        free(buf);
        return -1;
    }
    *sep = 0;
    r->head = strdup(buf);
    char *b = sep + 4;
    size_t blen = n - (size_t)(b - buf);
    r->body = malloc(blen + 1);
    if (strcasestr(r->head, "Transfer-Encoding: chunked")) {
        size_t o = 0;
        char *p = b;
        for (;;) {
            unsigned long cl = strtoul(p, &p, 16);
            p = strstr(p, "\r\n");
            if (!p || !cl) break;
            p += 2;
            memcpy(r->body + o, p, cl);
            o += cl;
            p += cl + 2;
        }
        r->body_len = o;
    } else {
        memcpy(r->body, b, blen);
        r->body_len = blen;
    }
    r->body[r->body_len] = 0;
    free(buf);
    return 0;
}

/* The concatenated "text" (or delta "content") of an SSE body; *done: ended with [DONE]. */
static char *sse_text(const char *body, int *done, int *chunks, char *finish, int *usage_total)
{
    size_t cap = strlen(body) + 1, n = 0;
    char *out = calloc(1, cap);
    *done = 0;
    *chunks = 0;
    finish[0] = 0;
    *usage_total = -1;
    for (const char *p = body; (p = strstr(p, "data: ")); p += 6) {
        if (!strncmp(p + 6, "[DONE]", 6)) {
            *done = 1;
            continue;
        }
        (*chunks)++;
        const char *key = strstr(p, "\"text\":\"") ? "\"text\":\"" : "\"content\":\"";
        const char *end = strstr(p, "\n\n");
        const char *t = strstr(p, key);
        if (t && (!end || t < end)) {
            t += strlen(key);
            while (*t && *t != '"') {
                if (*t == '\\') {
                    t++;
                    out[n++] = *t == 'n' ? '\n' : *t;
                    t++;
                } else
                    out[n++] = *t++;
            }
        }
        const char *f = strstr(p, "\"finish_reason\":\"");
        if (f && (!end || f < end)) sscanf(f + 17, "%15[a-z]", finish);
        const char *u = strstr(p, "\"total_tokens\":");
        if (u && (!end || u < end)) *usage_total = atoi(u + 15);
    }
    return out;
}

/* All ids of every "token_ids":[...] in body, comma-separated, into out. */
static void all_ids(const char *body, char *out, size_t n)
{
    out[0] = 0;
    size_t k = 0;
    for (const char *p = body; (p = strstr(p, "\"token_ids\":["));) {
        p += 13;
        const char *e = strchr(p, ']');
        if (!e) break;
        if (e > p && k + (size_t)(e - p) + 2 < n) {
            if (k) out[k++] = ',';
            memcpy(out + k, p, (size_t)(e - p));
            k += (size_t)(e - p);
            out[k] = 0;
        }
        p = e;
    }
}

static int has(const char *hay, const char *needle)
{
    int ok = hay && strstr(hay, needle) != NULL;
    if (!ok) fprintf(stderr, "\n  expected '%s' in '%s'\n", needle, hay ? hay : "(null)");
    return ok;
}

/* ---- server fixtures ------------------------------------------------------------------------- */

static srvq *g_q;
static serve_server *g_s;
static tok_tokenizer *g_tok;

static int g_max_conns, g_idle; /* serve_opts for the next start() (0: defaults) */

static int start(int slots, int ctx, int queue, const char *key, const char *chat, double grace)
{
    char err[256];
    tok_load("double", &g_tok, err, sizeof err);
    g_q = srvq_new(slots, ctx, queue, tok_vocab_size(g_tok), tok_eos(g_tok));
    serve_opts o = {.host = "127.0.0.1",
                    .port = 0,
                    .api_key = key,
                    .model_name = "echo",
                    .chat = serve_chat_find(chat),
                    .ctx = ctx,
                    .shutdown_grace_s = grace,
                    .max_connections = g_max_conns,
                    .idle_timeout_s = g_idle,
                    .quiet = 1};
    if (serve_server_start(&o, g_q, g_tok, &g_s, err, sizeof err)) {
        fprintf(stderr, "\n  serve_server_start: %s\n", err);
        return -1;
    }
    g_port = serve_server_port(g_s);
    return 0;
}

static void stop(void)
{
    serve_server_shutdown(g_s);
    serve_server_free(g_s);
    srvq_free(g_q);
    tok_free(g_tok);
    g_s = NULL;
    g_q = NULL;
}

static long metric(const char *name)
{
    http_resp r;
    if (http("GET", "/metrics", NULL, NULL, &r)) return -1;
    const char *p = strstr(r.body, name);
    long v = -1;
    while (p && p > r.body && p[-1] != '\n') p = strstr(p + 1, name);
    if (p) v = atol(p + strlen(name) + 1);
    resp_free(&r);
    return v;
}

/* ---- server tests ---------------------------------------------------------------------------- */

static void test_health_models_tokenize(void)
{
    CU_ASSERT_EQUAL_FATAL(start(4, 128, 8, NULL, "plain", 1), 0);
    http_resp r;
    CU_ASSERT_EQUAL(http("GET", "/health", NULL, NULL, &r), 0);
    CU_ASSERT_EQUAL(r.status, 503);
    resp_free(&r);
    http("POST", "/v1/completions", "{\"prompt\":\"a\"}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 503); /* loading */
    resp_free(&r);
    serve_server_set_ready(g_s);
    http("GET", "/health", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(has(r.body, "\"status\":\"ok\""));
    resp_free(&r);
    http("GET", "/v1/models", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(has(r.body, "\"object\":\"list\""));
    CU_ASSERT(has(r.body, "\"id\":\"echo\""));
    resp_free(&r);
    http("POST", "/tokenize", "{\"content\":\"hi\",\"add_special\":true}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_STRING_EQUAL(r.body, "{\"tokens\":[256,104,105]}");
    resp_free(&r);
    http("POST", "/tokenize", "{\"content\":\"h\\\"\",\"with_pieces\":true}", NULL, &r);
    CU_ASSERT_STRING_EQUAL(
        r.body, "{\"tokens\":[{\"id\":104,\"piece\":\"h\"},{\"id\":34,\"piece\":\"\\\"\"}]}");
    resp_free(&r);
    http("POST", "/detokenize", "{\"tokens\":[104,105,10]}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT_STRING_EQUAL(r.body, "{\"content\":\"hi\\n\"}");
    resp_free(&r);
    stop();
}

static void test_completion(void)
{
    CU_ASSERT_EQUAL_FATAL(start(4, 128, 8, NULL, "plain", 1), 0);
    serve_server_set_ready(g_s);
    http_resp r;
    /* the double echoes "hello " -> "hello hell" in 10 tokens */
    http("POST", "/v1/completions", "{\"prompt\":\"hello \",\"max_tokens\":10,\"temperature\":0}",
         NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(has(r.body, "\"text\":\"hello hell\""));
    CU_ASSERT(has(r.body, "\"finish_reason\":\"length\""));
    CU_ASSERT(has(r.body,
                  "\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":10,\"total_tokens\":17}"));
    CU_ASSERT(has(r.body, "\"token_ids\":[104,101,108,108,111,32,104,101,108,108]"));
    CU_ASSERT(has(r.body, "\"object\":\"text_completion\""));
    resp_free(&r);
    /* ids prompt; EOS echoed -> finish stop, EOS not in the text */
    http("POST", "/completions", "{\"prompt\":[256,120,121,257],\"max_tokens\":10}", NULL, &r);
    CU_ASSERT(has(r.body, "\"text\":\"xy\""));
    CU_ASSERT(has(r.body, "\"finish_reason\":\"stop\""));
    resp_free(&r);
    /* ignore_eos keeps going */
    http("POST", "/completions", "{\"prompt\":[256,120,257],\"max_tokens\":4,\"ignore_eos\":true}",
         NULL, &r);
    CU_ASSERT(has(r.body, "\"text\":\"xx\""));
    CU_ASSERT(has(r.body, "\"finish_reason\":\"length\""));
    resp_free(&r);
    /* stop strings: the earliest match wins, nothing of it is returned */
    http("POST", "/v1/completions",
         "{\"prompt\":\"hello \",\"max_tokens\":40,\"stop\":[\"o h\",\"lo \"]}", NULL, &r);
    CU_ASSERT(has(r.body, "\"text\":\"hel\""));
    CU_ASSERT(has(r.body, "\"finish_reason\":\"stop\""));
    CU_ASSERT(has(r.body, "\"completion_tokens\":6"));
    resp_free(&r);
    /* UTF-8: a 2-byte character arrives as two tokens and is never split */
    http("POST", "/v1/completions", "{\"prompt\":\"\xc3\xa9t\xc3\xa9\",\"max_tokens\":5}", NULL,
         &r);
    CU_ASSERT(has(r.body, "\"text\":\"\xc3\xa9t\xc3\xa9\""));
    resp_free(&r);
    /* chat with the plain template */
    http("POST", "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":\"ab\"}],\"max_tokens\":3}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(has(r.body, "\"message\":{\"role\":\"assistant\",\"content\":\"aba\"}"));
    CU_ASSERT(has(r.body, "\"object\":\"chat.completion\""));
    resp_free(&r);
    stop();
}

static void test_streaming(void)
{
    CU_ASSERT_EQUAL_FATAL(start(4, 128, 8, NULL, "plain", 1), 0);
    serve_server_set_ready(g_s);
    http_resp r;
    int done, chunks, total;
    char fin[16];
    http("POST", "/v1/completions",
         "{\"prompt\":\"hello "
         "\",\"max_tokens\":10,\"stream\":true,\"stream_options\":{\"include_usage\":true}}",
         NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    CU_ASSERT(has(r.head, "text/event-stream"));
    char *t = sse_text(r.body, &done, &chunks, fin, &total);
    CU_ASSERT_STRING_EQUAL(t, "hello hell");
    CU_ASSERT(done);
    CU_ASSERT(chunks >= 10); /* one per token, a final one, the usage one */
    CU_ASSERT_STRING_EQUAL(fin, "length");
    CU_ASSERT_EQUAL(total, 17);
    CU_ASSERT(has(r.body, "\"choices\":[],\"usage\""));
    free(t);
    resp_free(&r);
    /* stop string held back: no chunk carries any part of it */
    http("POST", "/v1/completions?return_token_ids=1",
         "{\"prompt\":\"abcabd\",\"max_tokens\":40,\"stream\":true,\"stop\":\"abd\"}", NULL, &r);
    t = sse_text(r.body, &done, &chunks, fin, &total);
    CU_ASSERT_STRING_EQUAL(t, "abc");
    CU_ASSERT_STRING_EQUAL(fin, "stop");
    CU_ASSERT_EQUAL(total, -1); /* no include_usage */
    CU_ASSERT(!strstr(r.body, "\"text\":\"ab\"") && !strstr(r.body, "abd"));
    char ids[512];
    all_ids(r.body, ids, sizeof ids);
    CU_ASSERT_STRING_EQUAL(ids, "97,98,99,97,98,100"); /* every token once, up to the stop */
    CU_ASSERT_EQUAL(chunks, 6); /* a, b (held), "abc", a, b (held), final with d */
    free(t);
    resp_free(&r);
    /* chat stream: a role chunk first, deltas, finish */
    http("POST", "/v1/chat/completions",
         "{\"messages\":[{\"role\":\"user\",\"content\":\"xy\"}],\"max_tokens\":4,\"stream\":true}",
         NULL, &r);
    CU_ASSERT(has(r.body, "\"delta\":{\"role\":\"assistant\",\"content\":\"\"}"));
    CU_ASSERT(has(r.body, "chat.completion.chunk"));
    t = sse_text(r.body, &done, &chunks, fin, &total);
    CU_ASSERT_STRING_EQUAL(t, "xyxy");
    CU_ASSERT(done);
    free(t);
    resp_free(&r);
    stop();
}

static void test_errors(void)
{
    CU_ASSERT_EQUAL_FATAL(start(1, 32, 1, "sekrit", "plain", 1), 0);
    serve_server_set_ready(g_s);
    const char *auth = "Authorization: Bearer sekrit\r\n";
    http_resp r;
    http("POST", "/v1/completions", "{\"prompt\":\"a\"}", NULL, &r);
    CU_ASSERT_EQUAL(r.status, 401);
    CU_ASSERT(has(r.body, "\"type\":\"authentication_error\""));
    resp_free(&r);
    http("POST", "/v1/completions", "{\"prompt\":\"a\"}", "Authorization: Bearer wrong\r\n", &r);
    CU_ASSERT_EQUAL(r.status, 401);
    CU_ASSERT(has(r.body, "incorrect API key"));
    resp_free(&r);
    http("GET", "/health", NULL, NULL, &r); /* open without a key */
    CU_ASSERT_EQUAL(r.status, 200);
    resp_free(&r);
    http("POST", "/v1/completions", "{\"prompt\":", auth, &r);
    CU_ASSERT_EQUAL(r.status, 400);
    CU_ASSERT(has(r.body, "{\"error\":{\"message\":\"the request body is not valid JSON\","
                          "\"type\":\"invalid_request_error\",\"param\":null,\"code\":null}}"));
    resp_free(&r);
    http("POST", "/v1/completions", "{\"prompt\":\"a\",\"top_p\":7}", auth, &r);
    CU_ASSERT_EQUAL(r.status, 400);
    CU_ASSERT(has(r.body, "\"param\":\"top_p\""));
    resp_free(&r);
    http("POST", "/v1/completions", "{\"prompt\":\"0123456789012345678901234567890123456789\"}",
         auth, &r);
    CU_ASSERT_EQUAL(r.status, 400);
    CU_ASSERT(has(r.body, "\"code\":\"context_length_exceeded\""));
    CU_ASSERT(has(r.body, "\"param\":\"prompt\""));
    resp_free(&r);
    http("GET", "/v2/nothing", NULL, auth, &r);
    CU_ASSERT_EQUAL(r.status, 404);
    resp_free(&r);
    http("GET", "/v1/completions", NULL, auth, &r);
    CU_ASSERT_EQUAL(r.status, 405);
    CU_ASSERT(has(r.head, "Allow: POST"));
    resp_free(&r);
    http("DELETE", "/health", NULL, auth, &r);
    CU_ASSERT_EQUAL(r.status, 405);
    resp_free(&r);
    /* queue full: 1 slot + 1 waiting; a slow step keeps them busy */
    srvq_double_set_step(g_q, 20000);
    int fd1 = dial(), fd2 = dial();
    send_req(fd1, "POST", "/v1/completions", "{\"prompt\":\"a\",\"max_tokens\":20,\"stream\":true}",
             auth);
    usleep(100000);
    send_req(fd2, "POST", "/v1/completions", "{\"prompt\":\"a\",\"max_tokens\":20,\"stream\":true}",
             auth);
    usleep(100000);
    http("POST", "/v1/completions", "{\"prompt\":\"a\",\"max_tokens\":2}", auth, &r);
    CU_ASSERT_EQUAL(r.status, 503);
    CU_ASSERT(has(r.head, "Retry-After: 1"));
    resp_free(&r);
    close(fd1);
    close(fd2);
    srvq_double_set_step(g_q, 2000);
    /* the counters saw them */
    http("GET", "/metrics", NULL, auth, &r);
    CU_ASSERT(has(r.body, "modpipe_requests_total{status=\"401\"} 2\n"));
    CU_ASSERT(has(r.body, "modpipe_requests_total{status=\"404\"} 1\n"));
    CU_ASSERT(has(r.body, "modpipe_requests_total{status=\"405\"} 2\n"));
    CU_ASSERT(has(r.body, "modpipe_requests_total{status=\"503\"} 1\n"));
    CU_ASSERT(has(r.body, "modpipe_requests_total{status=\"400\"} 3\n"));
    CU_ASSERT(has(r.body, "# TYPE modpipe_ttft_seconds histogram"));
    CU_ASSERT(has(r.body, "modpipe_link_dense_bytes_total{from=\"0\",to=\"1\"}"));
    resp_free(&r);
    stop();
}

static void test_disconnect_frees_slot(void)
{
    CU_ASSERT_EQUAL_FATAL(start(2, 4096, 8, NULL, "plain", 1), 0);
    serve_server_set_ready(g_s);
    srvq_double_set_step(g_q, 10000);
    /* a streaming and a non-streaming request, each hung up on mid-generation */
    int fds[2] = {dial(), dial()};
    send_req(fds[0], "POST", "/v1/completions",
             "{\"prompt\":\"a\",\"max_tokens\":3000,\"stream\":true}", NULL);
    send_req(fds[1], "POST", "/v1/completions", "{\"prompt\":\"b\",\"max_tokens\":3000}", NULL);
    char buf[256];
    CU_ASSERT(read(fds[0], buf, sizeof buf) > 0); /* the stream started */
    long used = -1;
    for (int i = 0; i < 100 && used != 2; i++) {
        usleep(20000);
        used = metric("modpipe_slots_in_use");
    }
    CU_ASSERT_EQUAL(used, 2);
    close(fds[0]);
    close(fds[1]);
    for (int i = 0; i < 200 && used != 0; i++) {
        usleep(20000);
        used = metric("modpipe_slots_in_use");
    }
    CU_ASSERT_EQUAL(used, 0);
    CU_ASSERT(metric("modpipe_generated_tokens_total") < 2000);
    stop();
}

typedef struct {
    int i;
    char *text;
    int status;
} conc_arg;

static void *conc_worker(void *p)
{
    conc_arg *a = p;
    char body[256];
    snprintf(body, sizeof body,
             "{\"prompt\":\"req%02d-\",\"max_tokens\":24,\"stream\":%s,\"temperature\":0}", a->i,
             a->i % 2 ? "true" : "false");
    http_resp r;
    if (http("POST", "/v1/completions", body, NULL, &r)) return NULL;
    a->status = r.status;
    if (a->i % 2) {
        int done, chunks, total;
        char fin[16];
        a->text = sse_text(r.body, &done, &chunks, fin, &total);
    } else {
        const char *t = strstr(r.body, "\"text\":\"");
        a->text = t ? strndup(t + 8, 24) : NULL;
    }
    resp_free(&r);
    return NULL;
}

static void test_concurrent(void)
{
    CU_ASSERT_EQUAL_FATAL(start(8, 256, 64, NULL, "plain", 1), 0);
    serve_server_set_ready(g_s);
    pthread_t th[32];
    conc_arg a[32];
    for (int i = 0; i < 32; i++) {
        a[i] = (conc_arg){.i = i};
        pthread_create(&th[i], NULL, conc_worker, &a[i]);
    }
    for (int i = 0; i < 32; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 32; i++) {
        char want[64];
        snprintf(want, sizeof want, "req%02d-req%02d-req%02d-req%02d-", i, i, i, i);
        CU_ASSERT_EQUAL(a[i].status, 200);
        CU_ASSERT(a[i].text && !strcmp(a[i].text, want));
        if (a[i].text && strcmp(a[i].text, want))
            fprintf(stderr, "\n  #%d: got [%s]\n", i, a[i].text);
        free(a[i].text);
    }
    stop();
}

/* Read what the server sends on fd until it closes (or `secs` pass); returns the bytes. */
static char *read_all(int fd, double secs, size_t *n_out)
{
    struct timeval tv = {.tv_sec = (long)secs, .tv_usec = (long)((secs - (long)secs) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (n + 1024 > cap) buf = realloc(buf, cap *= 2);
        ssize_t k = read(fd, buf + n, cap - n - 1);
        if (k <= 0) break;
        n += (size_t)k;
    }
    buf[n] = 0;
    if (n_out) *n_out = n;
    return buf;
}

static double mono(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Raw request text on a new connection; the reply (until close or 5 s). */
static char *raw(const char *req)
{
    int fd = dial();
    if (fd < 0) return strdup("");
    if (write(fd, req, strlen(req)) < 0) {}
    char *r = read_all(fd, 5, NULL);
    close(fd);
    return r;
}

/* Holes an attacker found: each is refused before it costs memory or locks clients out. */
/* One request; asserts its status and that the body holds want and want2 (NULL: skip). */
static void expect_http(const char *method, const char *path, const char *body, const char *extra,
                        int status, const char *want, const char *want2)
{
    http_resp r;
    http(method, path, body, extra, &r);
    CU_ASSERT_EQUAL(r.status, status);
    if (r.status != status)
        fprintf(stderr, "\n  %s %s: %d, want %d\n", method, path, r.status, status);
    if (want) CU_ASSERT(has(r.body, want));
    if (want2) CU_ASSERT(has(r.body, want2));
    resp_free(&r);
}

static void test_hardening(void)
{
    CU_ASSERT_EQUAL_FATAL(start(1, 32, 1, "sekrit", "plain", 1), 0);
    serve_server_set_ready(g_s);
    const char *auth = "Authorization: Bearer sekrit\r\n";
    /* the key comes before 404 / 405: routes are not shown without it */
    expect_http("GET", "/v2/nothing", NULL, NULL, 401, NULL, NULL);
    expect_http("GET", "/v1/completions", NULL, NULL, 401, NULL, NULL);
    expect_http("DELETE", "/health", NULL, NULL, 401, NULL, NULL);
    expect_http("HEAD", "/health", NULL, NULL, 200, NULL, NULL);
    /* ... and before the body: a 1000 MiB upload is answered at once, nothing read */
    double t0 = mono();
    char *x = raw("POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  "Content-Length: 1048576000\r\n\r\n{\"prompt\":");
    CU_ASSERT(has(x, "HTTP/1.1 401"));
    free(x);
    x = raw("POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sekrit\r\n"
            "Content-Type: application/json\r\nContent-Length: 1048576000\r\n\r\n{\"prompt\":");
    CU_ASSERT(has(x, "HTTP/1.1 413"));
    CU_ASSERT(has(x, "Content-Length 1048576000"));
    free(x);
    CU_ASSERT(mono() - t0 < 3.0);
    /* a chunked body is cut where it passes the limit: the connection closes */
    {
        int fd = dial();
        const char *h = "POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
                        "sekrit\r\nTransfer-Encoding: chunked\r\n\r\n";
        CU_ASSERT(write(fd, h, strlen(h)) > 0);
        static char chunk[65536 + 16];
        int hl = snprintf(chunk, sizeof chunk, "10000\r\n");
        memset(chunk + hl, ' ', 65536);
        memcpy(chunk + hl + 65536, "\r\n", 2);
        size_t sent = 0;
        signal(SIGPIPE, SIG_IGN);
        while (sent < (64u << 20)) {
            ssize_t k = write(fd, chunk, (size_t)hl + 65536 + 2);
            if (k <= 0) break;
            sent += (size_t)k;
        }
        CU_ASSERT(sent < (64u << 20)); /* refused well before 64 MiB */
        close(fd);
    }
    /* two different Content-Length headers */
    x = raw("POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sekrit\r\n"
            "Content-Length: 14\r\nContent-Length: 4\r\n\r\n{\"prompt\":\"a\"}");
    CU_ASSERT(has(x, "HTTP/1.1 400"));
    CU_ASSERT(has(x, "two different Content-Length headers (14 and 4)"));
    free(x);
    /* a prompt too long for the context is refused before it is tokenized or parsed */
    char *big = malloc(1 << 16);
    snprintf(big, 64, "{\"prompt\":\"");
    size_t at = strlen(big);
    memset(big + at, 'x', 20000);
    snprintf(big + at + 20000, 8, "\"}");
    expect_http("POST", "/v1/completions", big, auth, 400,
                "the prompt is 20000 bytes; the context holds 32 tokens",
                "\"code\":\"context_length_exceeded\"");
    snprintf(big, 64, "{\"prompt\":[");
    at = strlen(big);
    for (int i = 0; i < 5000; i++) at += (size_t)snprintf(big + at, 8, "%s7", i ? "," : "");
    snprintf(big + at, 8, "]}");
    expect_http("POST", "/v1/completions", big, auth, 400, "the request holds 5002 JSON values",
                "\"param\":\"prompt\"");
    free(big);
    /* NUL and trailing bytes through the server */
    expect_http("POST", "/v1/completions", "{\"prompt\":\"a\",\"stop\":\"b\\u0000\"}", auth, 400,
                "\"param\":\"stop\"", NULL);
    expect_http("POST", "/v1/completions", "{\"prompt\":\"a\"}garbage", auth, 400,
                "goes on after the JSON object", NULL);
    expect_http("POST", "/v1/completions", "{\"prompt\":\"a\",\"top_p\":1e-300}", auth, 400,
                "\"param\":\"top_p\"", "1e-300");
    stop();
}

/* Idle connections time out and the ones beyond the limit get a 503, so idle keep-alive
 * connections cannot lock clients out; a generation itself is never cut by the timeout. */
static void test_connection_limits(void)
{
    g_max_conns = 4;
    g_idle = 1;
    CU_ASSERT_EQUAL_FATAL(start(1, 4096, 8, NULL, "plain", 1), 0);
    g_max_conns = g_idle = 0;
    serve_server_set_ready(g_s);
    int idle[4];
    for (int i = 0; i < 4; i++) idle[i] = dial();
    usleep(100000);
    http_resp r;
    http("GET", "/health", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 503);
    CU_ASSERT(has(r.body, "too many connections: 5 open, at most 4 are served"));
    CU_ASSERT(has(r.head, "Retry-After: 1"));
    resp_free(&r);
    /* after the idle timeout the silent ones are closed and clients are served again */
    double t0 = mono();
    char buf[16];
    for (int i = 0; i < 4; i++) {
        struct timeval tv = {.tv_sec = 5};
        setsockopt(idle[i], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        CU_ASSERT(read(idle[i], buf, sizeof buf) <= 0);
        close(idle[i]);
    }
    CU_ASSERT(mono() - t0 < 4.0);
    usleep(100000);
    http("GET", "/health", NULL, NULL, &r);
    CU_ASSERT_EQUAL(r.status, 200);
    resp_free(&r);
    /* generations longer than the timeout: a plain one (1.5 s) and a stream that waits in the
     * queue behind it for as long before its first token */
    srvq_double_set_step(g_q, 15000);
    int a = dial(), b = dial();
    send_req(a, "POST", "/v1/completions", "{\"prompt\":\"a\",\"max_tokens\":100}", NULL);
    usleep(50000);
    send_req(b, "POST", "/v1/completions", "{\"prompt\":\"b\",\"max_tokens\":5,\"stream\":true}",
             NULL);
    char *ra = read_all(a, 10, NULL), *rb = read_all(b, 10, NULL);
    CU_ASSERT(has(ra, "HTTP/1.1 200"));
    CU_ASSERT(has(ra, "\"finish_reason\":\"length\""));
    CU_ASSERT(has(rb, "data: [DONE]"));
    free(ra);
    free(rb);
    close(a);
    close(b);
    stop();
}

static void *shutdown_thread(void *p)
{
    (void)p;
    return (void *)(long)serve_server_shutdown(g_s);
}

static void test_shutdown(void)
{
    CU_ASSERT_EQUAL_FATAL(start(2, 4096, 8, NULL, "plain", 0.3), 0);
    serve_server_set_ready(g_s);
    srvq_double_set_step(g_q, 5000);
    int quick = dial(), slow = dial();
    send_req(quick, "POST", "/v1/completions", "{\"prompt\":\"q\",\"max_tokens\":10}", NULL);
    send_req(slow, "POST", "/v1/completions",
             "{\"prompt\":\"s\",\"max_tokens\":3000,\"stream\":true}", NULL);
    usleep(30000);
    pthread_t th;
    pthread_create(&th, NULL, shutdown_thread, NULL);
    usleep(50000);
    http_resp r;
    CU_ASSERT_NOT_EQUAL(http("GET", "/health", NULL, NULL, &r), 0); /* no longer accepting */
    resp_free(&r);
    void *ret;
    pthread_join(th, &ret);
    CU_ASSERT_EQUAL((long)ret, 1); /* only the long one was cut */
    char buf[65536];
    ssize_t n = 0, k;
    while ((k = read(quick, buf + n, sizeof buf - 1 - (size_t)n)) > 0) n += k;
    buf[n] = 0;
    CU_ASSERT(has(buf, "\"text\":\"qqqqqqqqqq\""));
    n = 0;
    while ((k = read(slow, buf + n, sizeof buf - 1 - (size_t)n)) > 0) n += k;
    buf[n] = 0;
    CU_ASSERT(has(buf, "\"finish_reason\":\"length\""));
    CU_ASSERT(has(buf, "data: [DONE]"));
    close(quick);
    close(slow);
    CU_ASSERT(srvq_idle(g_q));
    stop();
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("serve", NULL, NULL);
    CU_add_test(s, "request parser: completion", test_parse_completion);
    CU_add_test(s, "request parser: errors name the field", test_parse_errors);
    CU_add_test(s, "request parser: chat, tokenize", test_parse_chat);
    CU_add_test(s, "chat templates", test_chat_templates);
    CU_add_test(s, "health, models, tokenize", test_health_models_tokenize);
    CU_add_test(s, "completions", test_completion);
    CU_add_test(s, "streaming", test_streaming);
    CU_add_test(s, "errors and metrics", test_errors);
    CU_add_test(s, "hardening: key, sizes, NUL, trailing bytes, top_p", test_hardening);
    CU_add_test(s, "connection limit and idle timeout", test_connection_limits);
    CU_add_test(s, "disconnect frees the slot", test_disconnect_frees_slot);
    CU_add_test(s, "32 concurrent requests", test_concurrent);
    CU_add_test(s, "graceful shutdown", test_shutdown);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned fails = CU_get_number_of_failures();
    CU_cleanup_registry();
    return fails ? 1 : 0;
}
