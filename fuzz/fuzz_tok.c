/* fuzz/fuzz_tok.c — libFuzzer target: the tokenizer.json loader, then encode / decode with
 * whatever it loaded.
 *
 * Input: a tokenizer.json, optionally followed by a NUL byte and a text (its first 512 bytes
 * are used). Checked beyond "no
 * crash": ids from tok_encode are inside the vocab; tok_decode of them succeeds; streaming
 * them one at a time gives whole UTF-8 characters and the same text as tok_decode; the text
 * decoded from arbitrary ids (taken from the text's bytes) is valid UTF-8.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz/fuzz_util.h"
#include "tok/tok.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nul = memchr(data, 0, size);
    size_t jlen = nul ? (size_t)(nul - data) : size;
    const char *text = nul ? (const char *)nul + 1 : "";
    size_t tlen = nul ? size - jlen - 1 : 0;
    if (tlen > 512) tlen = 512; /* the loader is the point here; long texts: fuzz_tok_text */

    tok_tokenizer *t = NULL;
    char err[512];
    if (tok_load_json("fuzz.json", (const char *)data, jlen, &t, err, sizeof err)) {
        FUZZ_CHECK(t == NULL);
        FUZZ_CHECK(err[0] != 0);
        return 0;
    }
    int nv = tok_vocab_size(t);
    FUZZ_CHECK(nv > 0);
    for (int special = 0; special < 2; special++) {
        int32_t *ids;
        int n;
        if (tok_encode(t, text, tlen, special, &ids, &n, err, sizeof err)) {
            FUZZ_CHECK(ids == NULL && n == 0);
            continue;
        }
        for (int i = 0; i < n; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < nv);
        fuzz_check_decode(t, ids, n, 1);
        free(ids);
    }
    /* arbitrary ids: some are holes (an error), the others must decode to valid UTF-8 */
    int32_t raw[64];
    int nr = 0;
    for (size_t i = 0; i + 1 < tlen && nr < 64; i += 2)
        raw[nr++] =
            (int32_t)(((uint32_t)(uint8_t)text[i] << 8 | (uint8_t)text[i + 1]) % (uint32_t)nv);
    fuzz_check_decode(t, raw, nr, 0);
    tok_free(t);
    return 0;
}
