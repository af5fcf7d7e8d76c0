/* cli/tokenize.h — the `modpipe tokenize` and `modpipe detokenize` commands.
 *
 *   modpipe tokenize (--model DIR | --tokenizer F) (--text S | --text-file F) [--no-special]
 *       prints the ids space-separated on one line.
 *   modpipe detokenize (--model DIR | --tokenizer F) (--ids "1 2 3" | --ids-file F)
 *       [--skip-special]   prints the text, then a newline.
 *
 * argv excludes the command name. Returns the process exit code: 0 ok, 2 a usage error or bad
 * input (one line on stderr), never exits itself. No MPI.
 */
#ifndef CLI_TOKENIZE_H
#define CLI_TOKENIZE_H

int cli_tok_tokenize(int argc, char **argv);
int cli_tok_detokenize(int argc, char **argv);

#endif
