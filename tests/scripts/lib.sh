# shellcheck shell=bash
# tests/scripts/lib.sh — tiny assertion helpers for the script tests (source from bash).
# A test file calls the checks, then `finish` (exit status 1 if any check failed).
T_FAILS=0
T_CHECKS=0
T_NAME=${0##*/}

pass() { T_CHECKS=$((T_CHECKS + 1)); echo "  ok   $*"; }
fail() { T_CHECKS=$((T_CHECKS + 1)); T_FAILS=$((T_FAILS + 1)); echo "  FAIL $*"; }

# check DESCRIPTION CMD... : passes when CMD succeeds (its output is shown only on failure)
check() {
    local d=$1 out
    shift
    if out=$("$@" 2>&1); then
        pass "$d"
    else
        fail "$d"
        [ -z "$out" ] || printf '%s\n' "$out" | head -n 15 | sed 's/^/       /'
    fi
}

# check_eq DESCRIPTION GOT WANT
check_eq() {
    if [ "$2" = "$3" ]; then pass "$1"; else fail "$1"; echo "       got:  $2"; echo "       want: $3"; fi
}

# check_fails DESCRIPTION CMD... : passes when CMD fails (exit status != 0)
check_fails() {
    local d=$1
    shift
    if "$@" >/dev/null 2>&1; then fail "$d (it succeeded)"; else pass "$d"; fi
}

# must CMD... : a setup step; stops the test file when it fails
must() { "$@" || { echo "  FAIL setup: $*"; exit 1; }; }

finish() {
    if [ "$T_FAILS" = 0 ]; then
        echo "  $T_NAME: $T_CHECKS checks passed"
        exit 0
    fi
    echo "  $T_NAME: $T_FAILS of $T_CHECKS checks FAILED"
    exit 1
}
