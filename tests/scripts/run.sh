#!/bin/bash
# tests/scripts/run.sh — tests of the scripts' own logic (scripts/bench-comm, its library,
# scripts/netcluster). Run from anywhere:
#   bash tests/scripts/run.sh [MODPIPE]        (default MODPIPE: build/modpipe)
# Each tests/scripts/test-*.sh is run in turn; the exit status is 1 if any failed.
# test-netcluster.sh needs root, ip and tc: without them it FAILS (it does not skip).
# Set SCRIPT_TESTS="bench-lib bench-comm" to run only some.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export MODPIPE=${1:-${MODPIPE:-$ROOT/build/modpipe}}
case $MODPIPE in /*) ;; *) MODPIPE=$ROOT/$MODPIPE ;; esac
export OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cd "$ROOT" || exit 2

names=${SCRIPT_TESTS:-bench-lib bench-comm netcluster deps}
failed=""
for n in $names; do
    t=tests/scripts/test-$n.sh
    [ -f "$t" ] || { echo "== $t: no such test"; failed="$failed $n"; continue; }
    echo "== $t"
    start=$(date +%s)
    if bash "$t"; then
        echo "== $t: PASS ($(($(date +%s) - start)) s)"
    else
        echo "== $t: FAIL"
        failed="$failed $n"
    fi
done
if [ -n "$failed" ]; then
    echo "script tests FAILED:$failed"
    exit 1
fi
echo "script tests: all passed ($names)"
