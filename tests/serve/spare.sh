#!/usr/bin/env bash
# tests/serve/spare.sh [BIN] — `modpipe serve --ranks 2 --hostfile F --spare-hosts G` on four
# hosts of scripts/netcluster (network namespaces, each its own hostname; needs root, ip, tc:
# without them it FAILS, it does not skip), with the real engine on tests/fixtures/stories260K:
#   - the reference: the same 4 greedy + 4 sampled streams from a 1-rank front
#   - plan h0 + h1, spares h2 h3: kill -9 of rank 1 (on h1) mid-stream: h1 is counted dead, the
#     job restarts on h0 + h2 (2 ranks), every token identical to the reference
#   - SIGSTOP of rank 1 (now on h2): after --stall-timeout the front names stage 1 / rank 1 on
#     h2 (log, /metrics), counts h2 dead and restarts on h0 + h3, every token identical
#   - kill -9 of rank 1 again (now on h3): no spare left, the job is re-partitioned to 1 rank
#     on h0, every token identical
#   - SIGTERM to the front: exit 0
#   - a hostfile whose first host is not this machine: exit 2, the reason in one line
# Prints one line per check, then "N passed, N failed"; exits 1 on any failure.
if [ -z "${SPARE_INSIDE:-}" ]; then
    # run this script again inside host 0 of a 3-host cluster
    root=$(cd "$(dirname "$0")/../.." && pwd)
    bin=$(realpath "${1:-$root/build/modpipe}")
    SPARE_INSIDE=1 exec "$root/scripts/netcluster" -n 4 --raw -- bash "$0" "$bin"
fi
. "$(dirname "$0")/lib.sh"

start_front() { # start_front NAME ARGS... : PORT_<NAME>, PID_<NAME>
    local name=$1
    shift
    "$BIN" serve --model "$MODEL" --port 0 "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" &
    PIDS+=("$!")
    await_server "$name" "$!"
}

wait_tokens() { # wait_tokens PORT N: until N more tokens were generated (at most 20 s)
    local base now i
    base=$(metric "$1" modpipe_generated_tokens_total)
    for i in $(seq 1000); do
        now=$(metric "$1" modpipe_generated_tokens_total)
        [ $((${now:-0} - ${base:-0})) -ge "$2" ] && return 0
        sleep 0.02
    done
    return 1
}

# rank_on HOST_INDEX R: the pid of a modpipe rank R running in this cluster's host HOST_INDEX
rank_on() {
    local p
    for p in $(pgrep -x modpipe); do
        [ "$(ip netns identify "$p" 2>/dev/null)" = "$NETCLUSTER_PREFIX-h$1" ] || continue
        grep -qz "^OMPI_COMM_WORLD_RANK=$2$" "/proc/$p/environ" 2>/dev/null && echo "$p"
    done
}

N=4
MAXT=300
STREAMS="$HERE/streams.mjs"
read -r A0 A1 A2 A3 <<<"$NETCLUSTER_ADDRS"
printf '%s slots=1\n%s slots=1\n' "$A0" "$A1" >"$TMP/plan"
printf '# the spares\n%s slots=1\n%s slots=1\n' "$A2" "$A3" >"$TMP/spare"
MPI=$NETCLUSTER_MPI_ARGS

start_front ref --ranks 1 --slots 8 --ctx 512
node "$STREAMS" "http://127.0.0.1:$PORT_ref" "$TMP/ref.json" $N $MAXT >"$TMP/ref.txt" 2>&1
check "reference (1 rank): 8 streams complete ($(cat "$TMP/ref.txt"))" 'grep -q "^8 of 8 streams complete" "$TMP/ref.txt"'
kill -TERM "$PID_ref"

start_front a --ranks 2 --hostfile "$TMP/plan" --spare-hosts "$TMP/spare" --mpi-args "$MPI" \
    --slots 8 --ctx 512 --stall-timeout 5 --max-restarts 5
P=$PORT_a
check "the job starts on the plan's hosts" 'grep -q "the job: 2 ranks, 2 stages on $A0, $A1$" "$TMP/a.err"'

# kill_rank1 WHAT HOST_INDEX [SIGNAL]: the 8 streams, rank 1 on that host signalled (KILL)
# mid-way
kill_rank1() {
    local what=$1 h=$2 sig=${3:-KILL} r cpid
    node "$STREAMS" "http://127.0.0.1:$P" "$TMP/$what.json" $N $MAXT >"$TMP/$what.txt" 2>&1 &
    cpid=$!
    wait_tokens $P 200
    r=$(rank_on "$h" 1)
    [ -n "$r" ] && kill "-$sig" "$r"
    wait $cpid
    check "$what: rank 1 found on host $h (pid ${r:-none}) and sent SIG$sig" '[ -n "$r" ]'
    check "$what: 8 streams complete ($(cat "$TMP/$what.txt"))" 'grep -q "^8 of 8 streams complete" "$TMP/$what.txt"'
    check "$what: every token identical to the 1-rank run" 'cmp -s "$TMP/ref.json" "$TMP/$what.json"'
}
kill_rank1 "kill-9-rank-1-on-h1" 1
check "h1 counted dead, the job restarted on h0 + the spare" 'grep -q "host $A1 is counted dead" "$TMP/a.err" && grep -q "the job: 2 ranks, 2 stages on $A0, $A2$" "$TMP/a.err"'
check "rank 1 now runs on the spare (h2)" '[ -n "$(rank_on 2 1)" ] && [ -z "$(rank_on 1 1)" ]'
kill_rank1 "SIGSTOP-rank-1-on-h2" 2 STOP
check "the stall names stage 1 / rank 1 on h2 in the log" 'grep -q "the job stalled: no result for 5.*; stage 1 (rank 1) has not finished micro-batch [0-9]*, last heard [0-9.]* s ago on host $A2;" "$TMP/a.err"'
check "/metrics: 1 stall, blamed on rank 1 on h2" '[ "$(metric $P modpipe_stalls_total)" = 1 ] && curl -s "http://127.0.0.1:$P/metrics" | grep -qx "modpipe_last_stall{stage=\"1\",rank=\"1\",host=\"$A2\"} 1"'
check "h2 counted dead (the stall), the job restarted on h0 + the second spare" 'grep -q "host $A2 is counted dead (\"rank 1 stalled for 5.0 s\")" "$TMP/a.err" && grep -q "the job: 2 ranks, 2 stages on $A0, $A3$" "$TMP/a.err"'
check "rank 1 now runs on h3, the stopped rank on h2 is gone" '[ -n "$(rank_on 3 1)" ] && [ -z "$(rank_on 2 1)" ]'
kill_rank1 "kill-9-rank-1-on-h3" 3
check "h3 counted dead, no spare left: re-partitioned to 1 rank on h0" 'grep -q "host $A3 is counted dead" "$TMP/a.err" && grep -q "the job: 1 rank, 1 stage on $A0$" "$TMP/a.err"'
check "/metrics: 3 restarts" '[ "$(metric $P modpipe_restarts_total)" = 3 ]'
echo "-- the front's log:"
grep "^modpipe serve: \(the job\|host\)" "$TMP/a.err"
kill -TERM "$PID_a"
wait "$PID_a"
check "SIGTERM to the front: exit 0" '[ $? = 0 ]'

# rank 0 runs on the first host: another first host is a start-up error
printf '%s slots=1\n%s slots=1\n' "$A1" "$A0" >"$TMP/bad"
"$BIN" serve --model "$MODEL" --port 0 --ranks 2 --hostfile "$TMP/bad" --mpi-args "$MPI" >"$TMP/bad.out" 2>"$TMP/bad.err"
rc=$?
check "first host not this machine: exit 2, one line ($(head -c 120 "$TMP/bad.err"))" '[ "$rc" = 2 ] && [ "$(wc -l <"$TMP/bad.err")" = 1 ] && grep -q "its first host, $A1, is not this machine" "$TMP/bad.err"'

[ $FAIL = 0 ] || cat "$TMP/a.err"
echo "spare: $PASS passed, $FAIL failed"
[ $FAIL = 0 ]
