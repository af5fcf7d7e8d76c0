/* cli/routertune.h — `modpipe router-tune`: data-parallel Router-Tuning under MPI.
 *
 * Every rank loads the frozen model (train/train.h) and the same data; each step's batch of B
 * sequences is split into contiguous shards, one per rank. Per step: forward on the shard,
 * MPI_Allreduce of the gate and NLL sums (the penalty needs the whole batch's kept fraction),
 * backward, MPI_Allreduce of the router gradients, the same AdamW step everywhere, then rank 0's
 * parameters are broadcast so every rank holds identical bits. The result depends on the rank
 * count only through float summation order.
 *
 * Data: --data FILE (text: documents separated by blank lines, tokenized with the model's
 * tokenizer.json through tok/tok.h, BOS added per document as the tokenizer's post-processor
 * says) or --data-ids FILE (one document per line, token ids). Documents are concatenated into
 * one token stream and cut into consecutive sequences of --seq-len tokens (the tail that does
 * not fill a sequence is dropped); a sequence may span two documents.
 *
 * Output (--out DIR, written by rank 0): config.json (the original with the routed layers as
 * "mindskip" in layer_types and a "mindskip" settings object, plus a "router_tuning" record of
 * how it was trained), routers.safetensors (model.layers.{i}.router.weight [1, D] and
 * router.bias [1], F32), model.safetensors.index.json mapping the routers to that file and every
 * original tensor to its ORIGINAL file by relative path (nothing copied), and copies of the
 * tokenizer files. SIGINT / SIGTERM: the routers with the best held-out loss so far (or the
 * current ones without --eval-data) are written, exit status 130.
 *
 * Held-out data (--eval-data) is scored with the inference gate (hard threshold) every
 * --eval-every steps; the routers with the lowest held-out NLL + penalty are written.
 * Learning rate: linear decay to 0 over --steps (--lr-decay none: constant).
 * --random-skip F,...: no training; random routers whose biases are calibrated on --data, layer
 * by layer, to skip the given fractions (the baseline of docs/ROUTER-TUNING.md).
 * --dump-sequences FILE: write the (held-out, else training) sequences as id lines and exit.
 *
 * Errors: one line "modpipe router-tune: ..." on stderr from rank 0, exit status 1.
 */
#ifndef CLI_ROUTERTUNE_H
#define CLI_ROUTERTUNE_H

/* argv after "router-tune". Calls MPI_Init / MPI_Finalize. Returns the exit status. */
int cli_routertune_main(int argc, char **argv);

#endif
