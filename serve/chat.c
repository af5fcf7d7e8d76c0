/* serve/chat.c — named chat templates: messages -> prompt text (see serve.h, README). */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "serve/sbuf.h"
#include "serve/serve.h"

typedef enum { CT_CHATML, CT_LLAMA2, CT_LLAMA3, CT_MISTRAL, CT_ZEPHYR, CT_PLAIN } ct_kind;

struct serve_chat_template {
    const char *name;
    ct_kind kind;
    const char *end_marker; /* a special token that closes a turn (also stops generation) */
    int bos;                /* the model's own template starts with bos_token */
};

static const serve_chat_template TEMPLATES[] = {
    {"chatml", CT_CHATML, "<|im_end|>", 0},
    {"llama2", CT_LLAMA2, NULL, 1}, /* turns end with EOS </s> */
    {"llama3", CT_LLAMA3, "<|eot_id|>", 1},
    {"mistral", CT_MISTRAL, NULL, 1}, /* EOS </s> */
    {"zephyr", CT_ZEPHYR, NULL, 0},   /* turns end with EOS </s> */
    {"plain", CT_PLAIN, NULL, 0},
};
#define N_TEMPLATES ((int)(sizeof TEMPLATES / sizeof TEMPLATES[0]))

const serve_chat_template *serve_chat_find(const char *name)
{
    for (int i = 0; name && i < N_TEMPLATES; i++)
        if (!strcmp(TEMPLATES[i].name, name)) return &TEMPLATES[i];
    return NULL;
}

const char *serve_chat_name(const serve_chat_template *t) { return t ? t->name : "plain"; }
const char *serve_chat_names(void) { return "chatml, llama2, llama3, mistral, zephyr, plain"; }
const char *serve_chat_end_marker(const serve_chat_template *t) { return t ? t->end_marker : NULL; }

int serve_chat_bos(const serve_chat_template *t, const tok_tokenizer *tok, int32_t **ids, int *n,
                   char *err, size_t errlen)
{
    int bos = tok_bos(tok);
    if (!t || !t->bos || bos < 0 || (*n > 0 && (*ids)[0] == bos)) return 0;
    int32_t *v = realloc(*ids, sizeof *v * (size_t)(*n + 1));
    if (!v) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    memmove(v + 1, v, sizeof *v * (size_t)*n);
    v[0] = bos;
    *ids = v;
    (*n)++;
    return 0;
}

const serve_chat_template *serve_chat_detect(const char *model_dir)
{
    const serve_chat_template *plain = serve_chat_find("plain");
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", model_dir);
    size_t n = 0;
    char *buf = base_read_file(path, 0, &n, NULL, 0); /* none: plain */
    if (!buf) return plain;
    const serve_chat_template *t = plain;
    cJSON *root = cJSON_ParseWithLength(buf, n);
    const cJSON *ct = cJSON_GetObjectItemCaseSensitive(root, "chat_template");
    if (cJSON_IsString(ct)) {
        const char *s = ct->valuestring;
        if (strstr(s, "<|im_start|>"))
            t = serve_chat_find("chatml");
        else if (strstr(s, "<|start_header_id|>"))
            t = serve_chat_find("llama3");
        else if (strstr(s, "<|assistant|>"))
            t = serve_chat_find("zephyr");
        else if (strstr(s, "[INST]")) /* Llama 2 wraps the system prompt in <<SYS>>, Mistral not */
            t = serve_chat_find(strstr(s, "<<SYS>>") ? "llama2" : "mistral");
    }
    cJSON_Delete(root);
    free(buf);
    return t;
}

char *serve_chat_apply(const serve_chat_template *t, const serve_msg *m, int n)
{
    sb b = {0};
    sb_str(&b, "");
    ct_kind k = t ? t->kind : CT_PLAIN;
    switch (k) {
    case CT_CHATML:
        for (int i = 0; i < n; i++) {
            sb_str(&b, "<|im_start|>");
            sb_str(&b, m[i].role);
            sb_str(&b, "\n");
            sb_str(&b, m[i].content);
            sb_str(&b, "<|im_end|>\n");
        }
        sb_str(&b, "<|im_start|>assistant\n");
        break;
    case CT_LLAMA3:
        for (int i = 0; i < n; i++) {
            sb_str(&b, "<|start_header_id|>");
            sb_str(&b, m[i].role);
            sb_str(&b, "<|end_header_id|>\n\n");
            sb_str(&b, m[i].content);
            sb_str(&b, "<|eot_id|>");
        }
        sb_str(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    case CT_ZEPHYR:
        for (int i = 0; i < n; i++) {
            sb_str(&b, "<|");
            sb_str(&b, m[i].role);
            sb_str(&b, "|>\n");
            sb_str(&b, m[i].content);
            sb_str(&b, "</s>\n");
        }
        sb_str(&b, "<|assistant|>\n");
        break;
    case CT_LLAMA2: {
        /* [INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s><s>[INST] user [/INST] */
        const char *sys = NULL;
        int open = 0; /* an [INST] is open, waiting for [/INST] */
        int first = 1;
        for (int i = 0; i < n; i++) {
            if (!strcmp(m[i].role, "system")) {
                sys = m[i].content;
                continue;
            }
            if (!strcmp(m[i].role, "user")) {
                if (open) sb_str(&b, " [/INST]");
                if (!first && !open) sb_str(&b, "<s>");
                sb_str(&b, "[INST] ");
                if (sys) {
                    sb_str(&b, "<<SYS>>\n");
                    sb_str(&b, sys);
                    sb_str(&b, "\n<</SYS>>\n\n");
                    sys = NULL;
                }
                sb_str(&b, m[i].content);
                open = 1;
            } else { /* assistant */
                if (open) sb_str(&b, " [/INST]");
                sb_str(&b, " ");
                sb_str(&b, m[i].content);
                sb_str(&b, " </s>");
                open = 0;
            }
            first = 0;
        }
        if (sys) { /* a system message with no user turn after it */
            if (!first && !open) sb_str(&b, "<s>");
            if (!open) sb_str(&b, "[INST] ");
            sb_str(&b, "<<SYS>>\n");
            sb_str(&b, sys);
            sb_str(&b, "\n<</SYS>>\n\n");
            open = 1;
        }
        if (open) sb_str(&b, " [/INST]");
        break;
    }
    case CT_MISTRAL: {
        /* Mistral instruct: [INST] user [/INST]answer</s>[INST] user [/INST] (BOS comes from
         * the tokenizer); it has no system role: the system messages go in front of the
         * first user turn, separated by a blank line */
        const char *sys = NULL;
        int sys_done = 0;
        for (int i = 0; i < n; i++)
            if (!strcmp(m[i].role, "system")) sys = m[i].content; /* the last one */
        for (int i = 0; i < n; i++) {
            if (!strcmp(m[i].role, "system")) continue;
            if (!strcmp(m[i].role, "user")) {
                sb_str(&b, "[INST] ");
                if (sys && !sys_done) {
                    sb_str(&b, sys);
                    sb_str(&b, "\n\n");
                }
                sys_done = 1;
                sb_str(&b, m[i].content);
                sb_str(&b, " [/INST]");
            } else {
                sb_str(&b, m[i].content);
                sb_str(&b, "</s>");
            }
        }
        if (sys && !sys_done) { /* a system message and no user turn */
            sb_str(&b, "[INST] ");
            sb_str(&b, sys);
            sb_str(&b, " [/INST]");
        }
        break;
    }
    case CT_PLAIN:
        /* no roles: the contents, one per line (a completion model continues the text) */
        for (int i = 0; i < n; i++) {
            if (i) sb_str(&b, "\n");
            sb_str(&b, m[i].content);
        }
        break;
    }
    if (b.oom) {
        free(b.p);
        return NULL;
    }
    return b.p;
}
