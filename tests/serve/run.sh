#!/usr/bin/env bash
# tests/serve/run.sh [BIN] — end-to-end test of `modpipe serve` with real clients:
# curl and the official `openai` npm client (tests/serve/client.mjs) against the real engine
# on tests/fixtures/stories260K, at -np 1 and -np 3.
#   - 32 concurrent greedy streams give the same tokens as `modpipe generate` on the prompts
#   - every error status: 400 (bad JSON, a wrong field, prompt longer than the context),
#     401 (missing / wrong key), 404, 405, 503 + Retry-After (queue full)
#   - a client that disconnects frees its slot (/metrics modpipe_slots_in_use back to 0,
#     far fewer tokens generated than asked)
#   - SIGTERM: a running stream still ends with [DONE], the server exits 0
# Servers listen on 127.0.0.1 on a free port (--port 0). Prints one line per check, then
# "N passed, N failed"; exits 1 on any failure.
. "$(dirname "$0")/lib.sh"

# the official client, pinned by package-lock.json; offline from the npm cache when possible
if ! (cd "$HERE" && { npm ci --offline --no-audit --no-fund >"$TMP/npm.log" 2>&1 ||
                      npm ci --no-audit --no-fund >>"$TMP/npm.log" 2>&1; }); then
    cat "$TMP/npm.log"
    echo "tests/serve: FAILED: 'npm ci' could not install the openai client in tests/serve (see above)"
    exit 1
fi

# start_server NAME NP ARGS... : sets PORT_<NAME>, PID_<NAME> (rank 0), MPI_<NAME> (mpirun)
start_server() {
    local name=$1 np=$2; shift 2
    mpirun --oversubscribe -np "$np" "$BIN" serve --model "$MODEL" --port 0 "$@" \
        >"$TMP/$name.out" 2>"$TMP/$name.err" &
    local mp=$!
    PIDS+=("$mp")
    await_server "$name" "$mp"
    printf -v "MPI_$name" %s "$mp"
}

# stop_server NAME: SIGTERM to rank 0; sets RC (the mpirun exit code)
stop_server() {
    local pid mp
    pid=$(eval echo "\$PID_$1")
    mp=$(eval echo "\$MPI_$1")
    kill -TERM "$pid"
    wait "$mp"
    RC=$?
}

# status PORT METHOD PATH [BODY] [HEADER] -> "CODE" and the body in $TMP/body, headers in $TMP/head
status() {
    local port=$1 method=$2 path=$3 body=${4:-} hdr=${5:-}
    curl -s -X "$method" -D "$TMP/head" -o "$TMP/body" -w '%{http_code}' \
        ${hdr:+-H "$hdr"} ${body:+-H 'Content-Type: application/json' --data-binary "$body"} \
        "http://127.0.0.1:$port$path"
}

# ---- reference: 32 prompts through `modpipe generate` --------------------------------------------
N=32
MAXT=24
: >"$TMP/prompts.txt"
WORDS=(Once The Lily Tom "One day" "The sun" "A little" "She" "He wanted" "Mom said" "The dog"
       "In the park" "There was" "They" "The bird" "Ben and")
for i in $(seq 0 $((N - 1))); do
    text="${WORDS[$((i % ${#WORDS[@]}))]}"
    [ $i -ge ${#WORDS[@]} ] && text="$text upon a time"
    "$BIN" tokenize --model "$MODEL" --text "$text" >>"$TMP/prompts.txt" || { echo "tokenize failed"; exit 1; }
done
if ! mpirun --oversubscribe -np 1 "$BIN" generate --model "$MODEL" --prompts-file "$TMP/prompts.txt" \
        --max-new $MAXT --quiet >"$TMP/gen.txt" 2>"$TMP/gen.err"; then
    cat "$TMP/gen.err"; echo "tests/serve: FAILED: modpipe generate"; exit 1
fi
node -e '
const fs = require("fs");
const p = fs.readFileSync(process.argv[1], "utf8").trim().split("\n").map(l => l.trim().split(/\s+/).map(Number));
const g = fs.readFileSync(process.argv[2], "utf8").split("\n").filter(l => l.startsWith("generated"))
  .map(l => { const s = l.slice(9).trim(); return s ? s.split(",").map(Number) : []; });
if (p.length !== g.length) { console.error("prompts", p.length, "generated", g.length); process.exit(1); }
fs.writeFileSync(process.argv[3], JSON.stringify(p.map((x, i) => ({ prompt: x, tokens: g[i], max_tokens: +process.argv[4] }))));
' "$TMP/prompts.txt" "$TMP/gen.txt" "$TMP/expected.json" $MAXT || { echo "tests/serve: FAILED: reference"; exit 1; }
echo "reference: $N prompts, $(wc -l <"$TMP/gen.txt") lines from modpipe generate"

# ---- -np 1: the openai client --------------------------------------------------------------
start_server np1 1 --slots 8 --queue 64
if node "$HERE/client.mjs" "http://127.0.0.1:$PORT_np1/v1" "" "$TMP/expected.json" >"$TMP/client1.txt" 2>&1; then
    ok "openai client at -np 1 ($(tail -1 "$TMP/client1.txt"))"
else
    cat "$TMP/client1.txt"; bad "openai client at -np 1"
fi

# tokenize / detokenize agree with the CLI
want=$("$BIN" tokenize --model "$MODEL" --text "Once upon a time" --no-special | tr ' ' ',')
code=$(status "$PORT_np1" POST /tokenize '{"content":"Once upon a time"}')
check "POST /tokenize == modpipe tokenize" '[ "$code" = 200 -a "$(cat "$TMP/body")" = "{\"tokens\":[$want]}" ]'
code=$(status "$PORT_np1" POST /detokenize "{\"tokens\":[$want]}")
check "POST /detokenize gives the text back" '[ "$code" = 200 -a "$(cat "$TMP/body")" = '\''{"content":"Once upon a time"}'\'' ]'

# SIGTERM during a stream: the stream completes, exit 0
curl -sN "http://127.0.0.1:$PORT_np1/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt":"Once upon a time","max_tokens":300,"ignore_eos":true,"temperature":0,"stream":true}' \
    >"$TMP/term_stream.txt" &
cpid=$!
for i in $(seq 100); do [ -s "$TMP/term_stream.txt" ] && break; sleep 0.02; done
stop_server np1
wait $cpid
check "SIGTERM at -np 1: exit 0" '[ "$RC" = 0 ]'
check "SIGTERM: the running stream finished with [DONE]" 'grep -q '\''data: \[DONE\]'\'' "$TMP/term_stream.txt"'
check "SIGTERM: no new connections" '[ "$(curl -s -o /dev/null -w '\''%{http_code}'\'' "http://127.0.0.1:$PORT_np1/health")" = 000 ]'

# ---- -np 3 with an API key and a small context: client + every error status ---------------
KEY=test-key-123
printf '%s\n' "$KEY" >"$TMP/key"
start_server np3 3 --slots 8 --queue 64 --ctx 64 --api-key-file "$TMP/key"
AUTH="Authorization: Bearer $KEY"
if node "$HERE/client.mjs" "http://127.0.0.1:$PORT_np3/v1" "$KEY" "$TMP/expected.json" >"$TMP/client3.txt" 2>&1; then
    ok "openai client at -np 3 ($(tail -1 "$TMP/client3.txt"))"
else
    cat "$TMP/client3.txt"; bad "openai client at -np 3"
fi
P=$PORT_np3
check "GET /health needs no key" '[ "$(status $P GET /health)" = 200 ]'
code=$(status $P POST /v1/completions '{"prompt":"a"}')
check "no key -> 401" '[ "$code" = 401 ] && grep -q '\''"type":"authentication_error"'\'' "$TMP/body"'
code=$(status $P POST /v1/completions '{"prompt":"a"}' "Authorization: Bearer nope")
check "wrong key -> 401" '[ "$code" = 401 ]'
code=$(status $P POST /v1/completions '{"prompt": "a",' "$AUTH")
check "malformed JSON -> 400 OpenAI error" '[ "$code" = 400 ] && grep -q '\''^{"error":{"message":"the request body is not valid JSON","type":"invalid_request_error","param":null,"code":null}}$'\'' "$TMP/body"'
code=$(status $P POST /v1/completions '{"prompt":"a","max_tokens":"many"}' "$AUTH")
check "wrong field -> 400 naming it" '[ "$code" = 400 ] && grep -q '\''"param":"max_tokens"'\'' "$TMP/body"'
code=$(status $P POST /v1/chat/completions '{"messages":[{"role":"robot","content":"x"}]}' "$AUTH")
check "chat: wrong role -> 400 naming messages[0].role" '[ "$code" = 400 ] && grep -q '\''"param":"messages\[0\].role"'\'' "$TMP/body"'
long=$(seq -s, 1 100 | sed 's/[0-9]\+/300/g')
code=$(status $P POST /v1/completions "{\"prompt\":[$long]}" "$AUTH")
check "prompt longer than --ctx -> 400 context_length_exceeded" '[ "$code" = 400 ] && grep -q '\''"code":"context_length_exceeded"'\'' "$TMP/body"'
check "unknown route -> 404" '[ "$(status $P GET /v1/nothing '\'''\'' "$AUTH")" = 404 ]'
code=$(status $P GET /v1/completions '' "$AUTH")
check "wrong method -> 405 with Allow" '[ "$code" = 405 ] && grep -qi '\''^Allow: POST'\'' "$TMP/head"'
m=$(curl -s -H "$AUTH" "http://127.0.0.1:$P/metrics")
check "/metrics counts the 401s" 'grep -q '\''^modpipe_requests_total{status="401"} 2$'\'' <<<"$m"'
check "/metrics has link bytes vs dense for 0->1 and 1->2" \
    'grep -q "^modpipe_link_bytes_total{from=\"0\",to=\"1\"} [1-9]" <<<"$m" && grep -q "^modpipe_link_dense_bytes_total{from=\"1\",to=\"2\"} [1-9]" <<<"$m"'
ttft=$(awk '$1 == "modpipe_ttft_seconds_count" { print $2 }' <<<"$m")
check "/metrics TTFT histogram counted every generation ($ttft)" '[ "${ttft:-0}" -ge 40 ]'
kv_pools() { # every stage's page pool is on /metrics (docs/SPEC.md §11), its parts adding up
    local s k u p b
    kvm() { awk -v n="modpipe_kv_$1{stage=\"$s\"}" '$1 == n { print $2 }' <<<"$m"; }
    for s in 0 1 2; do
        grep -q "^modpipe_kv_pages_total{stage=\"$s\"} [1-9]" <<<"$m" &&
            grep -q "^modpipe_kv_pages_peak{stage=\"$s\"} [1-9]" <<<"$m" &&
            grep -q "^modpipe_kv_bytes_dense{stage=\"$s\"} [0-9]" <<<"$m" || return 1
        for k in full routed mindskip; do
            grep -q "^modpipe_kv_pages_used_by_kind{stage=\"$s\",kind=\"$k\"} [0-9]" <<<"$m" ||
                return 1
        done
        u=$(kvm pages_used) p=$(kvm page_bytes) b=$(kvm bytes_used)
        [ -n "$u" ] && [ -n "$p" ] && [ "$p" -gt 0 ] && [ "$b" = $((u * p)) ] || return 1
        [ $((u + $(kvm pages_cached) + $(kvm pages_free))) = "$(kvm pages_total)" ] || return 1
    done
}
check "/metrics has the KV page pool of every stage" kv_pools
check "/metrics counts preemptions" 'grep -q "^modpipe_preemptions_total [0-9]" <<<"$m"'
prefix_counters() {
    local n
    for n in hits tokens parked_hits evictions; do
        grep -q "^modpipe_prefix_cache_${n}_total [0-9]" <<<"$m" || return 1
    done
    grep -q "^modpipe_prefix_holders_used [0-9]" <<<"$m"
}
check "/metrics has the prefix cache counters" prefix_counters
check "/metrics: modpipe_requests_running counts the requests being computed now" \
    'grep -q "^# HELP modpipe_requests_running Requests being computed now" <<<"$m" && grep -q "^modpipe_requests_running [0-9]" <<<"$m"'
# bad options: one line on stderr, exit 2, no hang
badrun() { # badrun "expected text" ARGS...
    local want=$1; shift
    timeout 60 mpirun --oversubscribe -np 1 "$BIN" serve "$@" >"$TMP/bad.out" 2>"$TMP/bad.err"
    local rc=$?
    [ $rc = 2 ] && grep -q -- "$want" "$TMP/bad.err" || { echo "rc $rc: $(cat "$TMP/bad.err")"; return 1; }
}
check "serve without --model: exit 2" 'badrun "--model DIR is required"'
check "serve --model missing dir: exit 2" 'badrun "config.json" --model "$TMP/nope"'
check "serve --chat-template unknown: exit 2" 'badrun "unknown template .vicuna." --model "$MODEL" --chat-template vicuna'
check "serve --kv-mem lots: exit 2" 'badrun "--kv-mem: expected a size like 512M or 2G, got .lots." --model "$MODEL" --kv-mem lots'
check "serve --port 70000: exit 2" 'badrun "expected an integer in \[0, 65535\]" --model "$MODEL" --port 70000'
check "serve --mem-per-rank 1K (the shared plan options): exit 2" 'badrun "fits --mem-per-rank 0.0 MiB" --model "$MODEL" --mem-per-rank 1K'
check "serve --stages 0-1:K names its origin: exit 2" 'badrun "--stages: .0-1:0.: ranks after" --model "$MODEL" --stages 0-1:0,2-4'
check "serve on a port in use: exit 2" 'badrun "cannot listen on 127.0.0.1:$PORT_np3" --model "$MODEL" --port $PORT_np3'
check "the key from --api-key-file is not in ps" '! ps -o args= -p "$PID_np3,$MPI_np3" | grep -qF -- "$KEY"'
check "serve --api-key KEY (visible in ps): exit 2" 'badrun "visible to every user in ps" --model "$MODEL" --api-key abc'
check "serve --api-key-file missing: exit 2" 'badrun "api-key-file $TMP/nokey: No such file" --model "$MODEL" --api-key-file "$TMP/nokey"'
: >"$TMP/emptykey"
check "serve --api-key-file empty: exit 2" 'badrun "the first line (the key) is empty" --model "$MODEL" --api-key-file "$TMP/emptykey"'
# a model directory whose config.json is edited: link the rest
edited_model() { # edited_model DIR 'js expression on c'
    mkdir -p "$1"
    for f in "$MODEL"/*; do [ "$(basename "$f")" = config.json ] || ln -sf "$f" "$1/"; done
    node -e 'const fs=require("fs"); const c=JSON.parse(fs.readFileSync(process.argv[1])); '"$2"'; fs.writeFileSync(process.argv[2], JSON.stringify(c))' \
        "$MODEL/config.json" "$1/config.json"
}
edited_model "$TMP/pos1" 'c.max_position_embeddings = 1'
check "serve: max_position_embeddings 1: exit 2" 'badrun "max_position_embeddings is 1; serving needs at least 2" --model "$TMP/pos1"'
edited_model "$TMP/eosbig" 'c.eos_token_id = 99999'
check "serve: eos_token_id outside the vocab: exit 2" 'badrun "eos_token_id: 99999 is outside the vocab" --model "$TMP/eosbig"'
stop_server np3
check "SIGTERM at -np 3: exit 0" '[ "$RC" = 0 ]'

# the key from the environment
MODPIPE_API_KEY=env-key-456 start_server envk 1 --slots 1 --ctx 64
check "MODPIPE_API_KEY: no key -> 401" '[ "$(status $PORT_envk GET /v1/models)" = 401 ]'
check "MODPIPE_API_KEY: its key -> 200" '[ "$(status $PORT_envk GET /v1/models "" "Authorization: Bearer env-key-456")" = 200 ]'
# a NUL in chat content and bytes after the JSON reach the real server as 400s naming them
code=$(status $PORT_envk POST /v1/chat/completions '{"messages":[{"role":"user","content":"hi\u0000there"}]}' "Authorization: Bearer env-key-456")
check "NUL in chat content -> 400 naming messages[0].content" '[ "$code" = 400 ] && grep -q '\''"param":"messages\[0\].content"'\'' "$TMP/body"'
stop_server envk

# ---- tensor-parallel stages: 2 stages x 2 ranks (--tp 2) give the same greedy tokens -------------
start_server tp2 4 --tp 2 --slots 8 --queue 64 --ctx 64
if node "$HERE/client.mjs" "http://127.0.0.1:$PORT_tp2/v1" "" "$TMP/expected.json" >"$TMP/clienttp.txt" 2>&1; then
    ok "openai client at -np 4 --tp 2 ($(tail -1 "$TMP/clienttp.txt"))"
else
    cat "$TMP/clienttp.txt"; bad "openai client at -np 4 --tp 2"
fi
stop_server tp2
check "SIGTERM at -np 4 --tp 2: exit 0" '[ "$RC" = 0 ]'
check "serve -np 1 --tp 2: exit 2" 'badrun "-np 1 is not a multiple of --tp 2" --model "$MODEL" --tp 2'

# ---- one slot, one queue place: 503 when full; a disconnect frees the slot -----------------------
start_server small 2 --slots 1 --queue 1
P=$PORT_small
LONG='{"prompt":"Once upon a time","max_tokens":500,"ignore_eos":true,"stream":true}'
# until COND holds (a shell condition, re-evaluated every 50 ms), at most SEC seconds: 0 or 1
wait_for() {
    local sec=$1 cond=$2 i
    for i in $(seq $((sec * 20))); do
        eval "$cond" && return 0
        sleep 0.05
    done
    return 1
}
busy() { echo $(( $(metric $P modpipe_slots_in_use) + $(metric $P modpipe_queue_length) )); }
# Rank 1 is stopped (SIGSTOP) before the streams start, so none can finish while the refusals
# are tried, however loaded the machine: a request is admitted and its prompt issued, and
# rank 0 keeps answering HTTP. Two long streams fill the slot and the queue place (waited for
# on /metrics); SIGCONT lets both finish.
rank1=$(pgrep -P "$MPI_small" -x modpipe | grep -vx "$PID_small" | head -1)
[ -n "$rank1" ] && kill -STOP "$rank1"
cpids=()
for k in 1 2; do
    curl -sN -D "$TMP/long$k.head" -o /dev/null "http://127.0.0.1:$P/v1/completions" \
        -H 'Content-Type: application/json' -d "$LONG" &
    cpids+=($!)
    wait_for 30 '[ "$(busy)" -ge $k ]'
done
for k in 3 4; do
    curl -sN -D "$TMP/long$k.head" -o /dev/null "http://127.0.0.1:$P/v1/completions" \
        -H 'Content-Type: application/json' -d "$LONG"
done
code=$(status $P POST /v1/completions '{"prompt":"Once","max_tokens":1}')
[ "$code" = 503 ] && cp "$TMP/head" "$TMP/long0.head"
[ -n "$rank1" ] && kill -CONT "$rank1"
wait "${cpids[@]}"
n503=$(grep -l '^HTTP/1.1 503' "$TMP"/long*.head 2>/dev/null | wc -l)
n200=$(grep -l '^HTTP/1.1 200' "$TMP"/long[1-4].head 2>/dev/null | wc -l)
check "queue full -> 503 ($n503 refused, $n200 of 4 long streams served; rank 1 stopped: ${rank1:-not found})" '[ -n "$rank1" -a "$n503" = 3 -a "$n200" = 2 ]'
check "every 503 carries Retry-After" '[ "$(grep -il "^Retry-After: 1" $(grep -l "^HTTP/1.1 503" "$TMP"/long*.head) | wc -l)" = "$n503" ]'
# A client that hangs up while its stream waits for the next token: rank 1 stopped again, the
# stream admitted (a slot in use), the client killed; once the server has closed that
# connection (modpipe_connections_open back to 1: this /metrics request) rank 1 goes on, and
# the slot must come free with only the micro-batches already in flight generated.
wait_for 30 '[ "$(busy)" = 0 ]'
before=$(metric $P modpipe_generated_tokens_total)
[ -n "$rank1" ] && kill -STOP "$rank1"
curl -sN "http://127.0.0.1:$P/v1/completions" -H 'Content-Type: application/json' -d "$LONG" >/dev/null &
cpid=$!
wait_for 30 '[ "$(metric $P modpipe_slots_in_use)" = 1 ]'
kill "$cpid"
wait "$cpid" 2>/dev/null
wait_for 30 '[ "$(metric $P modpipe_connections_open)" = 1 ]'
closed=$(metric $P modpipe_connections_open)
[ -n "$rank1" ] && kill -CONT "$rank1"
wait_for 30 '[ "$(metric $P modpipe_slots_in_use)" = 0 ]'
used=$(metric $P modpipe_slots_in_use)
after=$(metric $P modpipe_generated_tokens_total)
check "disconnect: the server closed the connection (connections_open $closed)" '[ "$closed" = 1 ]'
check "disconnect frees the slot (slots_in_use $used)" '[ "$used" = 0 ]'
check "disconnect cancels the sequence ($((after - before)) of 500 tokens generated)" '[ $((after - before)) -lt 500 ]'
wait_for 30 '[ "$(busy)" = 0 ] && [ "$(metric $P modpipe_connections_open)" = 1 ]'
stop_server small
check "SIGTERM when idle: exit 0 (rc $RC)" '[ "$RC" = 0 ]'
[ "$RC" = 0 ] || tail -5 "$TMP/small.err"

# ---- a KV pool too small for 8 streams, behind the front (--ranks 3): admitted by memory,
# preempted and recomputed (docs/SPEC.md §11), the tokens still generate's, every page back ----
"$BIN" serve --model "$MODEL" --port 0 --ranks 3 --mpi-args '--oversubscribe' --slots 8 --ctx 64 \
    --kv-page 4 --kv-mem 41600 >"$TMP/kv.out" 2>"$TMP/kv.err" &
PIDS+=("$!")
kvpid=$!
await_server kv "$kvpid"
if node "$HERE/client.mjs" "http://127.0.0.1:$PORT_kv/v1" "" "$TMP/expected.json" >"$TMP/clientkv.txt" 2>&1; then
    ok "openai client, KV pool of 40 pages a stage, --ranks 3 ($(tail -1 "$TMP/clientkv.txt"))"
else
    cat "$TMP/clientkv.txt"; bad "openai client, KV pool of 40 pages a stage, --ranks 3"
fi
pre=$(metric "$PORT_kv" modpipe_preemptions_total)
check "the small pool preempted ($pre preemptions)" '[ "${pre:-0}" -gt 0 ]'
kv_back() { # every stage reports every page back: free, or cached (parked finished prefixes)
    local m s t c f
    for i in $(seq 100); do
        m=$(curl -s "http://127.0.0.1:$PORT_kv/metrics")
        for s in 0 1 2; do
            t=$(awk -v n="modpipe_kv_pages_total{stage=\"$s\"}" '$1 == n { print $2 }' <<<"$m")
            c=$(awk -v n="modpipe_kv_pages_cached{stage=\"$s\"}" '$1 == n { print $2 }' <<<"$m")
            f=$(awk -v n="modpipe_kv_pages_free{stage=\"$s\"}" '$1 == n { print $2 }' <<<"$m")
            grep -q "^modpipe_kv_pages_used{stage=\"$s\"} 0$" <<<"$m" &&
                [ -n "$t" ] && [ $((c + f)) = "$t" ] || break
            [ $s = 2 ] && return 0
        done
        sleep 0.05
    done
    return 1
}
check "every KV page free or cached once the streams ended" kv_back
kill -TERM "$PID_kv"
wait "$kvpid"
RC=$?
check "SIGTERM to the front: exit 0" '[ "$RC" = 0 ]'

# ---- prefix reuse through the front (--ranks 2; a pool with room for both) -----------------------
"$BIN" serve --model "$MODEL" --port 0 --ranks 2 --mpi-args '--oversubscribe' --slots 4 --ctx 512 \
    >"$TMP/px.out" 2>"$TMP/px.err" &
PIDS+=("$!")
pxpid=$!
await_server px "$pxpid"
# B's prompt = A's, sent while A runs, starts from A's pages
PX=$(seq -s, 3 22)
one() { # one MAX_TOKENS OUT: a greedy completion of the 20-token prompt, its text in OUT
    curl -s "http://127.0.0.1:$PORT_px/v1/completions" -H 'Content-Type: application/json' \
        -d "{\"prompt\":[$PX],\"max_tokens\":$1,\"temperature\":0,\"ignore_eos\":true}" |
        sed 's/.*"text":"\([^"]*\)".*/\1/' >"$2"
}
one 8 "$TMP/px_ref.txt"
h0=$(metric "$PORT_px" modpipe_prefix_cache_hits_total)
curl -sN "http://127.0.0.1:$PORT_px/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"prompt\":[$PX],\"max_tokens\":480,\"temperature\":0,\"ignore_eos\":true,\"stream\":true}" \
    >"$TMP/px_a.txt" &
apid=$!
# A's prompt is in the pipeline once tokens stream back (A runs long enough for B to arrive)
for i in $(seq 500); do [ -s "$TMP/px_a.txt" ] && break; sleep 0.01; done
one 8 "$TMP/px_b.txt"
wait $apid
h1=$(metric "$PORT_px" modpipe_prefix_cache_hits_total)
check "prefix reuse through the front: hit ($h0 -> $h1), the same text as alone" \
    '[ "${h1:-0}" -gt "${h0:-0}" ] && [ -s "$TMP/px_ref.txt" ] && cmp -s "$TMP/px_ref.txt" "$TMP/px_b.txt"'
# C, once nothing runs: only a finished request's parked slot holds the prefix
p0=$(metric "$PORT_px" modpipe_prefix_cache_parked_hits_total)
one 8 "$TMP/px_c.txt"
p1=$(metric "$PORT_px" modpipe_prefix_cache_parked_hits_total)
check "the cache of finished prefixes through the front: hit ($p0 -> $p1), the same text" \
    '[ "${p1:-0}" -gt "${p0:-0}" ] && cmp -s "$TMP/px_ref.txt" "$TMP/px_c.txt"'
# the finished A, B and C left their prefixes in holders (not slots): the gauge counts them
hu=$(metric "$PORT_px" modpipe_prefix_holders_used)
check "modpipe_prefix_holders_used counts the holders in use ($hu)" '[ "${hu:-0}" -ge 1 ]'
kill -TERM "$PID_px"
wait "$pxpid"


echo "serve: $PASS passed, $FAIL failed"
[ $FAIL = 0 ]
