#!/bin/bash
# tests/scripts/test-bench-comm.sh — scripts/bench-comm end to end on tiny models over
# loopback MPI: argument checks, a 16-run sweep whose CSV must have exactly the expected rows
# and equal its stats files, the plots and command log, --csv-only, and Ctrl-C.
set -u
cd "$(dirname "$0")/../.." || exit 2
. tests/scripts/lib.sh
. scripts/lib-bench-comm.sh
MODPIPE=${MODPIPE:-build/modpipe}
TMP=$(mktemp -d)
BG=
cleanup() {
    [ -z "$BG" ] || kill -TERM "$BG" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
B=scripts/bench-comm

echo "- arguments"
check "--help" sh -c "$B --help | grep -q -- '--net RATE'"
check_fails "capacity 1.5 is refused" $B --tiny --capacities 1.5 --out "$TMP/x" --work "$TMP/x"
check_fails "unknown layout is refused" $B --tiny --layouts nosuch --out "$TMP/x" --work "$TMP/x"
check_fails "unknown phase is refused" $B --tiny --phases warmup --out "$TMP/x" --work "$TMP/x"
check_fails "unknown dtype is refused" $B --tiny --dtypes int8 --out "$TMP/x" --work "$TMP/x"
check_fails "--delay without --net is refused" $B --tiny --delay 1ms --out "$TMP/x" --work "$TMP/x"
check_fails "unknown option is refused" $B --tiny --frobnicate
check_fails "a missing binary is reported" $B --tiny --modpipe "$TMP/nosuch" --out "$TMP/x" --work "$TMP/x"
check_eq "refused arguments wrote no CSV" "$(find "$TMP/x" -name '*.csv' 2>/dev/null | wc -l | tr -d ' ')" 0

[ -x "$MODPIPE" ] || { fail "no modpipe binary at $MODPIPE (run make)"; finish; }

echo "- a sweep: capacities 1.0 0.125 x layouts all alt x prefill decode x f32 bf16"
OUT=$TMP/out
WORK=$TMP/work
if $B --tiny --modpipe "$MODPIPE" --capacities "1.0 0.125" --layouts "all alt" \
        --out "$OUT" --work "$WORK" >"$TMP/sweep.log" 2>&1; then
    pass "bench-comm --tiny ran"
else
    fail "bench-comm --tiny failed:"
    tail -n 20 "$TMP/sweep.log" | sed 's/^/       /'
    finish
fi
CSV=$OUT/bench.csv
check "progress lines were shown" grep -q '^\[16/16' "$TMP/sweep.log"
check_eq "CSV header" "$(head -n 1 "$CSV")" "$BC_COLUMNS"
check_eq "16 rows" "$(tail -n +2 "$CSV" | wc -l | tr -d ' ')" 16
want=$(for l in all alt; do for c in 1.0 0.125; do for p in prefill decode; do for d in f32 bf16; do
    echo "$l,$c,$p,$d,sparse,none"; done; done; done; done | sort)
check_eq "each configuration exactly once" "$(tail -n +2 "$CSV" | cut -d, -f1,3-7 | sort)" "$want"
check_eq "stages per layout" "$(tail -n +2 "$CSV" | cut -d, -f1,2 | sort -u | tr '\n' ' ')" \
    "all,0-1;2-3;4-5;6-7 alt,0-1;2-3;4-5;6-7 "
check "every row equals its stats file (bench-comm --check)" $B --check "$CSV"

col() { awk -F, -v c="$1" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == c) k = i; next } { print $k }' "$CSV"; }
ok=1
while IFS=, read -r layout stages cap phase dtype tr _; do
    f=$(grep "^$layout,[^,]*,$cap,$phase,$dtype,$tr," "$CSV" | awk -F, '{ print $NF }')
    [ -r "$f" ] || { ok=0; echo "       $f missing"; continue; }
    s=$(jq -r '[.ranks, .wire_dtype, .transport, ([.stages[].layers] | join(";"))] | join(" ")' "$f")
    [ "$s" = "4 $dtype $tr $stages" ] || { ok=0; echo "       $f: $s"; }
done < <(tail -n +2 "$CSV")
check_eq "stats files: 4 ranks, the dtype, transport and stages of their row" $ok 1
check_eq "decode runs: every row is a decode row (rows = tokens)" \
    "$(awk -F, 'NR > 1 && $4 == "decode" && $8 != $9' "$CSV" | wc -l | tr -d ' ')" 0
check_eq "prefill runs: one sampled token per prompt" \
    "$(awk -F, 'NR > 1 && $4 == "prefill" { print $9 }' "$CSV" | sort -u)" "$(wc -l <"$WORK/prompts-prefill.txt" | tr -d ' ')"
check_eq "alt (a dense layer in every stage) saves nothing: payload_ratio 1" \
    "$(awk -F, 'NR > 1 && $1 == "alt" { print $24 }' "$CSV" | sort -u)" 1
check_eq "capacity 1.0 saves nothing" "$(awk -F, 'NR > 1 && $3 == "1.0" { print $24 }' "$CSV" | sort -u)" 1
check "all at 0.125: prefill payload under 0.6 of dense" \
    awk -F, 'NR > 1 && $1 == "all" && $3 == "0.125" && $4 == "prefill" { n++; if ($24 >= 0.6) bad = 1 } END { exit bad || n != 2 }' "$CSV"
check "all at 0.125: decode saves less than prefill" \
    awk -F, 'NR > 1 && $1 == "all" && $3 == "0.125" && $5 == "f32" { r[$4] = $24 } END { exit !(r["decode"] > r["prefill"]) }' "$CSV"
check "payload follows the prediction (within 0.15 on these tiny runs)" \
    awk -F, 'NR > 1 { d = $24 - $26; if (d < 0) d = -d; if (d > 0.15) { print; bad = 1 } } END { exit bad }' "$CSV"
check "bf16 sends about half the payload bytes of f32" \
    awk -F, 'NR > 1 { k = $1 "," $3 "," $4; if ($5 == "f32") f[k] = $19; else b[k] = $19 }
             END { for (k in f) { r = b[k] / f[k]; if (r < 0.4 || r > 0.6) { print k, r; bad = 1 } } exit bad }' "$CSV"
for f in bytes-prefill.png bytes-decode.png ratio-vs-pred.png; do
    check "$f is a PNG" sh -c "head -c 8 '$OUT/$f' | od -An -c | grep -q 'P   N   G'"
done
check_eq "command log: 16 mpirun lines" "$(grep -c '^mpirun ' "$OUT/commands-tiny.txt")" 16
check_eq "command log: 4 init-model lines" "$(grep -c ' init-model ' "$OUT/commands-tiny.txt")" 4
check "command log: load recorded" grep -q '^# load after' "$OUT/commands-tiny.txt"
cp "$CSV" "$TMP/first.csv"
check "--csv-only rebuilds the same CSV" sh -c "$B --tiny --csv-only --out '$OUT' --work '$WORK' >/dev/null 2>&1 && cmp -s '$CSV' '$TMP/first.csv'"

echo "- --repeat 3: three runs, the CSV row is the one of median time"
if $B --tiny --modpipe "$MODPIPE" --repeat 3 --capacities 0.25 --layouts all --phases prefill \
        --dtypes f32 --out "$TMP/rep" --work "$TMP/repw" >"$TMP/rep.log" 2>&1; then
    check_eq "3 stats files" "$(find "$TMP/repw/stats" -name '*.json' | wc -l | tr -d ' ')" 3
    chosen=$(tail -n 1 "$TMP/rep/bench.csv" | awk -F, '{ print $NF }')
    median=$(for f in "$TMP"/repw/stats/*.json; do echo "$(jq .seconds "$f") $f"; done | sort -g | sed -n 2p | cut -d' ' -f2)
    check_eq "the row's stats file is the median run" "$chosen" "$median"
    check "and the row equals it" $B --check "$TMP/rep/bench.csv"
else
    fail "bench-comm --repeat 3 failed: $(tail -n 5 "$TMP/rep.log")"
fi

echo "- Ctrl-C stops the sweep, writes nothing to --out, leaves no MPI job"
OUT2=$TMP/out2
WORK2=$TMP/work2
set -m
# --repeat 50: long enough that the sweep cannot end on its own before the signal lands
$B --tiny --repeat 50 --modpipe "$MODPIPE" --out "$OUT2" --work "$WORK2" >"$TMP/int.log" 2>&1 &
BG=$!
set +m
for _ in $(seq 1 100); do
    [ -s "$WORK2/runs.tsv" ] && break
    sleep 0.1
done
kill -INT "$BG"
wait "$BG"
rc=$?
BG=
check_eq "exit status 130" "$rc" 130
[ "$rc" = 130 ] || { echo "  its log:"; tail -n 15 "$TMP/int.log" | sed 's/^/    /'; }
check "it said so" grep -q interrupted "$TMP/int.log"
check_eq "no CSV in --out" "$(find "$OUT2" -name '*.csv' 2>/dev/null | wc -l | tr -d ' ')" 0
sleep 0.5
check_eq "no process of the sweep left" "$(pgrep -f "$WORK2" | wc -l | tr -d ' ')" 0

finish
