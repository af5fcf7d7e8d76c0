#!/usr/bin/env bash
# tests/serve/recover.sh [BIN] — the front outside the MPI job (`modpipe serve --ranks N`,
# serve/front.h) with the real engine on tests/fixtures/stories260K:
#   - 8 greedy + 8 sampled (seeded) streams of 400 tokens, uninterrupted: the reference
#   - kill -9 of rank 1, kill -9 of rank 0, SIGSTOP of rank 1 (restart after --stall-timeout)
#     during the same 16 streams: every stream completes with exactly the reference tokens,
#     /health says recovering (503) meanwhile, /metrics counts restarts and replays
#   - SIGTERM to the front during streams: they finish, the front exits 0, the job is gone;
#     SIGINT the same
#   - --max-restarts 0: a kill ends every stream with an error event and a plain request with
#     503 + error JSON; the front exits 1
#   - a job that cannot start: exit 1 with the reason; --ranks 1 runs in the front's process
#   - --hostfile whose first host is not this machine, --spare-hosts misused: exit 2, one line
# Prints one line per check, then "N passed, N failed"; exits 1 on any failure.
. "$(dirname "$0")/lib.sh"

# start_front NAME ARGS... : PORT_<NAME>, PID_<NAME> (the front)
start_front() {
    local name=$1; shift
    "$BIN" serve --model "$MODEL" --port 0 "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" &
    PIDS+=("$!")
    await_server "$name" "$!"
}

# rankpid FRONT_PID R: the pid of the job's rank R (a child of the front's mpirun)
rankpid() {
    local mp p
    mp=$(pgrep -P "$1" -x mpirun | head -1)
    [ -n "$mp" ] || return
    for p in $(pgrep -P "$mp" -x modpipe); do
        grep -qz "^OMPI_COMM_WORLD_RANK=$2$" "/proc/$p/environ" 2>/dev/null && echo "$p"
    done
}

# wait_tokens PORT N: until N more tokens were generated than when called (at most 10 s)
wait_tokens() {
    local base now i
    base=$(metric "$1" modpipe_generated_tokens_total)
    for i in $(seq 500); do
        now=$(metric "$1" modpipe_generated_tokens_total)
        [ $((${now:-0} - ${base:-0})) -ge "$2" ] && return 0
        sleep 0.02
    done
    return 1
}

health_watch() { # health_watch PORT FILE: /health codes every 50 ms while the file exists
    while [ -e "$2.on" ]; do
        curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$1/health" >>"$2"
        sleep 0.05
    done
}

N=8
MAXT=400
STREAMS="$HERE/streams.mjs"

start_front a --ranks 2 --mpi-args '--oversubscribe' --slots 16 --ctx 512 --stall-timeout 2 --max-restarts 5
P=$PORT_a
node "$STREAMS" "http://127.0.0.1:$P" "$TMP/ref.json" $N $MAXT >"$TMP/ref.txt" 2>&1
check "reference: 16 streams complete ($(cat "$TMP/ref.txt"))" 'grep -q "^16 of 16 streams complete" "$TMP/ref.txt"'

# disrupt WHAT SIGNAL RANK: the 16 streams again, the signal to the rank mid-way
disrupt() {
    local what=$1 sig=$2 rank=$3 before after r cpid
    before=$(metric $P modpipe_replayed_requests_total)
    : >"$TMP/health.$what"
    touch "$TMP/health.$what.on"
    health_watch $P "$TMP/health.$what" &
    local hw=$!
    node "$STREAMS" "http://127.0.0.1:$P" "$TMP/$what.json" $N $MAXT >"$TMP/$what.txt" 2>&1 &
    cpid=$!
    wait_tokens $P 300
    r=$(rankpid "$PID_a" "$rank")
    [ -n "$r" ] && kill "-$sig" "$r"
    wait $cpid
    rm -f "$TMP/health.$what.on"
    wait $hw
    after=$(metric $P modpipe_replayed_requests_total)
    check "$what: 16 streams complete ($(cat "$TMP/$what.txt"))" 'grep -q "^16 of 16 streams complete" "$TMP/$what.txt"'
    check "$what: every token identical to the uninterrupted run" 'cmp -s "$TMP/ref.json" "$TMP/$what.json"'
    check "$what: requests were replayed ($before -> $after; rank $rank pid ${r:-not found})" '[ -n "$r" ] && [ "${after:-0}" -gt "${before:-0}" ]'
    check "$what: /health said recovering (503) meanwhile" 'grep -qx 503 "$TMP/health.$what"'
}
disrupt "kill-9-rank-1" KILL 1
disrupt "kill-9-rank-0" KILL 0
disrupt "SIGSTOP-rank-1" STOP 1
grep -q "the job stalled: no result for 2" "$TMP/a.err" && ok "SIGSTOP: detected as a stall after --stall-timeout 2" || bad "SIGSTOP: detected as a stall" "$(tail -3 "$TMP/a.err")"
grep -q "stalled: .*; stage 1 (rank 1) has not finished micro-batch [0-9]*, last heard [0-9.]* s ago on host $(hostname);" "$TMP/a.err" && ok "SIGSTOP: the log names the stuck rank (1) and its host" || bad "SIGSTOP: the log names the stuck rank" "$(grep stalled "$TMP/a.err")"
check "/metrics: 1 stall, blamed on stage 1, rank 1" '[ "$(metric $P modpipe_stalls_total)" = 1 ] && curl -s "http://127.0.0.1:$P/metrics" | grep -q "^modpipe_last_stall{stage=\"1\",rank=\"1\",host=\"$(hostname)\"} 1$"'
check "/metrics: 3 restarts, tokens re-prefilled" '[ "$(metric $P modpipe_restarts_total)" = 3 ] && [ "$(metric $P modpipe_replayed_tokens_total)" -gt 0 ]'

echo "-- the front's log of the three recoveries (docs/SERVE.md: the timeline):"
grep "^modpipe serve: the " "$TMP/a.err"

# SIGTERM to the front during streams: drain, exit 0, the job gone
node "$STREAMS" "http://127.0.0.1:$P" "$TMP/term.json" 2 100 >"$TMP/term.txt" 2>&1 &
cpid=$!
wait_tokens $P 20
mp=$(pgrep -P "$PID_a" -x mpirun)
kill -TERM "$PID_a"
wait "$PID_a"
rc=$?
wait $cpid
check "SIGTERM to the front: exit 0" '[ "$rc" = 0 ]'
check "SIGTERM: the running streams completed ($(cat "$TMP/term.txt"))" 'grep -q "^4 of 4 streams complete" "$TMP/term.txt"'
check "SIGTERM: the job is gone" '[ -n "$mp" ] && ! kill -0 "$mp" 2>/dev/null && [ -z "$(pgrep -P "$mp")" ]'

# SIGINT (a terminal's ^C) to the front: the same drain, exit 0
start_front int --ranks 2 --mpi-args '--oversubscribe' --slots 4 --ctx 512
node "$STREAMS" "http://127.0.0.1:$PORT_int" "$TMP/int.json" 1 100 >"$TMP/int.txt" 2>&1 &
cpid=$!
wait_tokens $PORT_int 20
kill -INT "$PID_int"
wait "$PID_int"
rc=$?
wait $cpid
check "SIGINT to the front: the streams completed, exit 0 ($(cat "$TMP/int.txt"))" '[ "$rc" = 0 ] && grep -q "^2 of 2 streams complete" "$TMP/int.txt"'

# --max-restarts 0: errors, not a hang
start_front z --ranks 2 --mpi-args '--oversubscribe' --slots 16 --ctx 512 --max-restarts 0 \
    --stall-timeout 120
# rank 1 stopped until all 9 requests are in (running or queued: the micro-batches in flight
# bound admission meanwhile), so none ends before the kill however slowly curl and node start
# under load (the long stall timeout keeps the front from acting on the stop)
rz=$(rankpid "$PID_z" 1)
[ -n "$rz" ] && kill -STOP "$rz"
node "$STREAMS" "http://127.0.0.1:$PORT_z" "$TMP/z.json" 4 $MAXT >"$TMP/z.txt" 2>&1 &
cpid=$!
curl -s -o "$TMP/z.plain" -w '%{http_code}' "http://127.0.0.1:$PORT_z/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt":"Once","max_tokens":400,"ignore_eos":true}' >"$TMP/z.code" &
ppid=$!
inz() { echo $(( $(metric $PORT_z modpipe_requests_running) + $(metric $PORT_z modpipe_queue_length) )); }
for i in $(seq 600); do
    [ "$(inz)" = 9 ] && break
    sleep 0.05
done
running=$(inz)
[ -n "$rz" ] && kill -CONT "$rz"
wait_tokens $PORT_z 100
r=$(rankpid "$PID_z" 1)
[ -n "$r" ] && kill -KILL "$r"
wait $cpid
wait $ppid
wait "$PID_z"
rc=$?
nerr=$(node -e 'const a=JSON.parse(require("fs").readFileSync(process.argv[1]));console.log(a.filter(r=>r.error&&/failed/.test(r.error)).length)' "$TMP/z.json")
check "--max-restarts 0: all 9 requests were in before the kill ($running)" '[ "$running" = 9 ]'
check "--max-restarts 0: every stream ended with an error event ($nerr of 8)" '[ "$nerr" = 8 ]'
check "--max-restarts 0: a plain request got 503 + error JSON" '[ "$(cat "$TMP/z.code")" = 503 ] && grep -q "\"error\":{\"message\":\"the job failed 1 time" "$TMP/z.plain"'
check "--max-restarts 0: the front exits 1" '[ "$rc" = 1 ]'

# a job that cannot start; one rank in the front's own process
"$BIN" serve --model "$MODEL" --port 0 --ranks 2 --mpi-args '--no-such-mpirun-option' >"$TMP/nostart.out" 2>"$TMP/nostart.err"
rc=$?
check "a job that cannot start: exit 1 with the reason" '[ "$rc" = 1 ] && grep -q "the job failed to start" "$TMP/nostart.err"'
# --hostfile / --spare-hosts refused before anything starts (tests/serve/spare.sh: the restart
# on spare hosts itself, on netcluster)
printf 'no-such-host.invalid slots=1\nlocalhost slots=1\n' >"$TMP/hf-bad"
printf 'x slots=0\n' >"$TMP/hf-bad2"
printf 'localhost slots=2\n' >"$TMP/hf-ok"
refused() { # refused NAME 'expected text' ARGS...: exit 2 and one line with the text
    local name=$1 want=$2 rc
    shift 2
    "$@" >"$TMP/$name.out" 2>"$TMP/$name.err"
    rc=$?
    check "$name: exit 2, one line ($(head -c 100 "$TMP/$name.err"))" '[ "$rc" = 2 ] && grep -qe "$want" "$TMP/$name.err" && [ "$(grep -c "" "$TMP/$name.err")" = 1 ]'
}
refused "first host not this machine" "its first host, no-such-host.invalid, is not this machine" \
    "$BIN" serve --model "$MODEL" --port 0 --ranks 2 --hostfile "$TMP/hf-bad"
refused "--spare-hosts without --hostfile" "--spare-hosts needs --hostfile" \
    "$BIN" serve --model "$MODEL" --port 0 --ranks 2 --spare-hosts "$TMP/hf-ok"
refused "--spare-hosts without --ranks (the mpirun form)" "only the front restarts a job" \
    "$BIN" serve --model "$MODEL" --port 0 --spare-hosts "$TMP/hf-ok"
refused "--spare-hosts: a bad line" "hf-bad2:1: slots= wants a whole number" \
    "$BIN" serve --model "$MODEL" --port 0 --ranks 2 --hostfile "$TMP/hf-ok" --spare-hosts "$TMP/hf-bad2"
start_front one --ranks 1
code=$(curl -s -o "$TMP/one.json" -w '%{http_code}' "http://127.0.0.1:$PORT_one/v1/completions" -H 'Content-Type: application/json' -d '{"prompt":"Once","max_tokens":4,"temperature":0}')
check "--ranks 1: in the front's process (no mpirun child), answers 200" '[ "$code" = 200 ] && [ -z "$(pgrep -P "$PID_one" -x mpirun)" ]'
kill -TERM "$PID_one"
wait "$PID_one"
check "--ranks 1: SIGTERM, exit 0" '[ $? = 0 ]'

echo "recover: $PASS passed, $FAIL failed"
[ $FAIL = 0 ]
