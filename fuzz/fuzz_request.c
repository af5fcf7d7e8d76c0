/* fuzz/fuzz_request.c — libFuzzer target for the HTTP request parser (serve_request_parse).
 * The first byte picks the endpoint (completion, chat, tokenize, detokenize), the rest is the
 * body. Checks the parser's contract on every input: success gives a validated request
 * (fields in range, strings present), failure names a field and leaves the struct zeroed.
 * Built by `make fuzz-build`, run by `scripts/fuzz request` (fuzz/README.md). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz/fuzz_util.h"
#include "serve/serve.h"

#define CHECK(c) FUZZ_CHECK(c)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    serve_req_kind kind = (serve_req_kind)(data[0] % 4);
    serve_request r;
    char param[96], err[512];
    int rc = serve_request_parse(kind, (const char *)data + 1, size - 1, 512, &r, param,
                                 sizeof param, err, sizeof err);
    if (rc) {
        CHECK(err[0] != 0);
        CHECK(memchr(param, 0, sizeof param) != NULL);
        CHECK(!r.prompt_text && !r.prompt_ids && !r.msgs && !r.n_stop && !r.model);
        return 0;
    }
    CHECK(r.kind == kind);
    switch (kind) {
    case SERVE_REQ_COMPLETION: CHECK((r.prompt_text != NULL) != (r.prompt_ids != NULL)); break;
    case SERVE_REQ_CHAT:
        CHECK(r.n_msgs >= 1 && r.msgs);
        for (int i = 0; i < r.n_msgs; i++) CHECK(r.msgs[i].role && r.msgs[i].content);
        break;
    case SERVE_REQ_TOKENIZE: CHECK(r.prompt_text != NULL); break;
    case SERVE_REQ_DETOKENIZE: CHECK(r.n_prompt_ids == 0 || r.prompt_ids); break;
    }
    for (int i = 0; i < r.n_prompt_ids; i++) CHECK(r.prompt_ids[i] >= 0 && r.prompt_ids[i] < 512);
    CHECK(r.max_tokens >= 0);
    CHECK(r.temperature >= 0 && r.temperature <= 2);
    CHECK(r.top_p > 0 && r.top_p <= 1);
    CHECK(r.n_stop >= 0 && r.n_stop <= SERVE_MAX_STOP);
    for (int i = 0; i < r.n_stop; i++) CHECK(r.stop[i] && r.stop[i][0]);
    serve_request_free(&r);
    return 0;
}
