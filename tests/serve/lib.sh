# tests/serve/lib.sh — sourced by tests/serve/run.sh and tests/serve/recover.sh (with their
# arguments: $1 is the modpipe binary): paths, the mpirun environment, a temporary directory,
# the check helpers. PIDS holds processes to SIGTERM and wait for on exit.
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BIN=$(realpath "${1:-$ROOT/build/modpipe}")
MODEL=$ROOT/tests/fixtures/stories260K
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
TMP=$(mktemp -d /tmp/modpipe-serve-XXXXXX)
PASS=0
FAIL=0
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    rm -rf "$TMP"
}
trap cleanup EXIT

ok() { PASS=$((PASS + 1)); echo "ok   $1"; }
bad() { FAIL=$((FAIL + 1)); echo "FAIL $1${2:+: $2}"; }
check() { # check "what" 'shell condition'
    if eval "$2"; then ok "$1"; else bad "$1"; fi
}

metric() { # metric PORT NAME [KEYHEADER]
    curl -s ${3:+-H "$3"} "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'
}

# await_server NAME LAUNCHED_PID: wait for the "listening" line in $TMP/NAME.err and for
# /health 200; sets PORT_<NAME> and PID_<NAME> (the process serving HTTP: rank 0 or the front)
await_server() {
    local name=$1 lp=$2 port="" pid="" i
    local re='s/.*listening on http:\/\/127.0.0.1:\([0-9]*\) (pid \([0-9]*\)).*/'
    for i in $(seq 300); do
        port=$(sed -n "${re}\1/p" "$TMP/$name.err")
        pid=$(sed -n "${re}\2/p" "$TMP/$name.err")
        [ -n "$port" ] && break
        kill -0 "$lp" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$port" ]; then
        cat "$TMP/$name.err"
        echo "tests/serve: FAILED: server $name did not start"
        exit 1
    fi
    for i in $(seq 300); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ] && break
        sleep 0.1
    done
    printf -v "PORT_$name" %s "$port"
    printf -v "PID_$name" %s "$pid"
}

[ -x "$BIN" ] || { echo "tests/serve: $BIN is not built"; exit 1; }
[ -f "$MODEL/tokenizer.json" ] || { echo "tests/serve: $MODEL is missing"; exit 1; }
command -v curl >/dev/null || { echo "tests/serve: curl is required"; exit 1; }
command -v node >/dev/null || { echo "tests/serve: node is required"; exit 1; }
