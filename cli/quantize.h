/* cli/quantize.h — `modpipe quantize`: a model directory with its projections stored as Q8_0
 * (docs/SPEC.md §9), loadable in place (zero-copy) by generate / eval / serve.
 *
 * cli_quantize() reads the model in `src` (any dtype, sharded or not) and writes `dst`
 * (created if missing): model.safetensors in which every tensor stage_q8_quantizes names —
 * but the n_skip `skip` entries (each a comma-separated list of module or tensor names, every
 * one a projection of the model) — becomes NAME (I8 [rows, cols]) + NAME_scale (F16 [rows,
 * ceil(cols/32)]), quantized row by row exactly as --weights-dtype q8_0 quantizes at load (the
 * same bits), every other tensor copied as stored; tensors ordered by element size (4-byte,
 * 2-byte, then int8) so each is aligned to its element size in the file; config.json = src's
 * plus stage_q8_quant_config_json's quantization_config (compressed-tensors, `ignore` = every
 * Linear module left in its dtype); the tokenizer / generation files copied.
 * Memory: one row of f32 and of q8, never a tensor. Progress to `log` (may be NULL).
 *
 * Errors: -1 + one line in err (src unreadable, already quantized, a --skip name that is not a
 * projection of the model, a non-finite weight — named with its row —, dst unwritable or
 * holding a model already); a partly written model.safetensors is removed.
 */
#ifndef CLI_QUANTIZE_H
#define CLI_QUANTIZE_H

#include <stddef.h>
#include <stdio.h>

int cli_quantize(const char *src, const char *dst, const char *const *skip, int n_skip, FILE *log,
                 char *err, size_t errlen);

/* `modpipe quantize --model DIR --out DIR [--dtype q8_0] [--skip NAMES]... [--quiet]` (argv
 * excludes the command name); errors
 * print one line "modpipe quantize: ...". Returns the exit status (0, or 1 on any error). */
int cli_quantize_main(int argc, char **argv);

#endif
