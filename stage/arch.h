/* stage/arch.h — the block families beyond plain Llama (docs/SPEC.md §10).
 *
 * stage_arch_parse() reads the keys of config.json that choose the block variant: model_type /
 * architectures (llama, mistral, qwen2, qwen3), rope_scaling / rope_parameters (default,
 * linear, llama3), attention_bias, mlp_bias, sliding_window, use_sliding_window,
 * max_window_layers and Hugging Face's own layer_types ("full_attention" /
 * "sliding_attention") — and sets the flags of stage_config (arch ... window_from). Every
 * key is read with the meaning Hugging Face transformers gives it for that family; a value
 * that would change the math in a way the engine does not compute is refused.
 * Inputs : the parsed config root; cfg with n_layers and head_dim already set.
 * Errors : -1 and one line "PATH: key: what" in c->err.
 * The other functions are pure and thread-safe.
 */
#ifndef STAGE_ARCH_H
#define STAGE_ARCH_H

#include "stage/config.h"
#include "stage/config_json.h"

/* stage_arch_parse and stage_arch_hf_layer_types: declared in stage/config_json.h. */

const char *stage_arch_name(stage_arch a);       /* its model_type, "qwen2" */
const char *stage_arch_class_name(stage_arch a); /* its architectures entry, "Qwen2ForCausalLM" */

/* inv_freq [head_dim/2]: rope_theta's frequencies with the config's scaling applied. */
void stage_arch_inv_freq(const stage_config *c, float *inv_freq);

/* The sliding window of layer l (0: full attention). */
static inline int stage_layer_window(const stage_config *c, int l)
{
    return c->window > 0 && l >= c->window_from ? c->window : 0;
}

/* Is `suffix` (a tensor name after "model.layers.N.") one of the block-variant tensors this
 * config uses (biases, q/k norms)? */
int stage_arch_tensor_used(const stage_config *c, const char *suffix);

#endif
