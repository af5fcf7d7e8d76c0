#!/bin/bash
# tests/scripts/test-bench-lib.sh — scripts/lib-bench-comm.sh without MPI: prompts, layouts,
# model specs (accepted by modpipe init-model/partition), the CSV row derived from stats
# (hand-checked fixtures), the CSV check (catches edits, missing files), plots.
set -u
cd "$(dirname "$0")/../.." || exit 2
. tests/scripts/lib.sh
. scripts/lib-bench-comm.sh
MODPIPE=${MODPIPE:-build/modpipe}
FX=tests/scripts/fixtures
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "- tools"
for t in jq awk gnuplot; do check "$t installed (scripts/install-deps)" command -v "$t"; done

echo "- prompts"
check_eq "bc_prompts 2 6 1 is fixed" "$(bc_prompts 2 6 1)" "135,251,95,72,146,60
67,43,205,74,98,154"
check_eq "bc_prompts is deterministic" "$(bc_prompts 32 128 1 | cksum)" "$(bc_prompts 32 128 1 | cksum)"
check_eq "bc_prompts 32 128: 32 lines" "$(bc_prompts 32 128 1 | wc -l | tr -d ' ')" 32
check_eq "bc_prompts 32 128: 128 ids a line" \
    "$(bc_prompts 32 128 1 | awk -F, '{ print NF }' | sort -u)" 128
check_eq "bc_prompts: ids in 1..255" \
    "$(bc_prompts 64 64 3 | tr ',' '\n' | awk '$1 < 1 || $1 > 255 || $1 != int($1)' | wc -l | tr -d ' ')" 0
check "bc_prompts: different seeds differ" test "$(bc_prompts 1 16 1)" != "$(bc_prompts 1 16 2)"

echo "- layouts"
dense_in_stage() {  # LAYOUT STAGE -> yes|no
    local types stages range a b
    types=$(bc_layout_types "$1" | tr -d '[] ')
    stages=$(bc_layout_stages "$1")
    range=$(echo "$stages" | cut -d, -f$(($2 + 1)))
    a=${range%-*}
    b=${range#*-}
    echo "$types" | awk -F, -v a="$a" -v b="$b" '{ d = "no"; for (i = a + 1; i <= b + 1; i++) if ($i == "dense") d = "yes"; print d }'
}
for l in $BC_LAYOUTS; do
    check_eq "$l: 8 layer types" "$(bc_layout_types "$l" | tr -d '[] ' | awk -F, '{ print NF }')" 8
    check_eq "$l: stages cover layers 0-7 in order, 4 stages" \
        "$(bc_layout_stages "$l" | awk -F, '{ n = 0; ok = NF == 4; for (i = 1; i <= NF; i++) { split($i, r, "-"); if (r[1] != n || r[2] < r[1]) ok = 0; n = r[2] + 1 } print (ok && n == 8) ? "yes" : "no" }')" yes
done
check_eq "all: no stage has a dense layer" "$(for s in 0 1 2 3; do dense_in_stage all $s; done | tr '\n' ' ')" "no no no no "
check_eq "alt: every stage has a dense layer" "$(for s in 0 1 2 3; do dense_in_stage alt $s; done | tr '\n' ' ')" "yes yes yes yes "
check_eq "aligned: stages 1 and 3 are routed segments" "$(for s in 0 1 2 3; do dense_in_stage aligned $s; done | tr '\n' ' ')" "yes no yes no "
check_fails "unknown layout is an error" bc_layout_stages nosuch

echo "- model specs are accepted by modpipe (init-model, partition)"
if [ -x "$MODPIPE" ]; then
    for l in $BC_LAYOUTS; do
        bc_model_spec "$l" 0.25 32 64 4 2 >"$TMP/$l.yaml"
        if "$MODPIPE" init-model --spec "$TMP/$l.yaml" --out "$TMP/$l" --quiet >"$TMP/$l.log" 2>&1; then
            pass "$l: init-model (calibrated)"
            "$MODPIPE" partition --model "$TMP/$l" -n 4 --stages "$(bc_layout_stages "$l")" >"$TMP/$l.plan" 2>&1
            case $l in all) want="3 of 3" ;; alt) want="0 of 3" ;; aligned) want="2 of 3" ;; esac
            check "$l: partition says $want boundaries can carry fewer rows" grep -q "$want boundaries" "$TMP/$l.plan"
            check_eq "$l: config.json has the layout's types" \
                "$(jq -c '.layer_types' "$TMP/$l/config.json" | tr -d '"')" "$(bc_layout_types "$l" | tr -d ' ')"
        else
            fail "$l: init-model rejected the spec: $(tail -n 3 "$TMP/$l.log")"
        fi
    done
else
    fail "no modpipe binary at $MODPIPE (run make)"
fi

echo "- CSV row from stats (fixtures checked by hand: see tests/scripts/fixtures/README)"
check_eq "34 distinct columns" "$(echo "$BC_COLUMNS" | tr , '\n' | sort -u | wc -l | tr -d ' ')" 34
row=$(bc_csv_row $FX/stats-prefill.json all 0-1,2-3,4-5,6-7 0.25 prefill none 3.5)
check_eq "prefill row" "$row" \
    "all,0-1;2-3;4-5;6-7,0.25,prefill,bf16,sparse,none,100,4,0.292857,0.6,1,0.25,0.6,1,0.28,15,3764,3008,740,16,4800,0.784167,0.626667,0.392083,0.626667,1330,1870,0.83125,1.16875,2,0.02,3.5,$FX/stats-prefill.json"
row=$(bc_csv_row $FX/stats-prefill.json all 0-1,2-3,4-5,6-7 0.25 decode 10mbit/switch 3.5)
check_eq "decode row: pred (p1 + p2 + 1)/3, s/token = seconds/tokens" \
    "$(echo "$row" | cut -d, -f4,7,26,32)" "decode,10mbit/switch,0.866667,0.5"
row=$(bc_csv_row $FX/stats-dense.json all 0-1,2-3,4-5,6-7 0.25 prefill none 3.5)
check_eq "dense transport: pred 1" "$(echo "$row" | cut -d, -f6,26)" "dense,1"
check_eq "row has every column" "$(echo "$row" | awk -F, '{ print NF }')" 34
jq '.ranks = 3' $FX/stats-prefill.json >"$TMP/three.json"
check_fails "stats of 3 ranks are refused" bc_csv_row "$TMP/three.json" all 0-1 0.25 prefill none 1

echo "- CSV check"
{
    echo "$BC_COLUMNS"
    bc_csv_row $FX/stats-prefill.json all 0-1,2-3,4-5,6-7 0.25 prefill none 3.5
    bc_csv_row $FX/stats-dense.json alt 0-1,2-3,4-5,6-7 0.5 decode 20mbit/mesh 1.25
} >"$TMP/good.csv"
check "a CSV made from the stats passes" bc_check_csv "$TMP/good.csv" .
sed '2s/,3764,/,3765,/' "$TMP/good.csv" >"$TMP/edited.csv"
check_fails "an edited byte count is caught" bc_check_csv "$TMP/edited.csv" .
sed '3s/,decode,/,prefill,/' "$TMP/good.csv" >"$TMP/edited2.csv"
check_fails "a wrong phase (other prediction) is caught" bc_check_csv "$TMP/edited2.csv" .
sed '2s/,bf16,/,f32,/' "$TMP/good.csv" >"$TMP/edited3.csv"
check_fails "a wrong wire dtype is caught" bc_check_csv "$TMP/edited3.csv" .
sed "2s#$FX/stats-prefill.json#$FX/nosuch.json#" "$TMP/good.csv" >"$TMP/missing.csv"
check_fails "a missing stats file is caught" bc_check_csv "$TMP/missing.csv" .
sed '1s/,ratio,/,ratio2,/' "$TMP/good.csv" >"$TMP/header.csv"
check_fails "a different header is caught" bc_check_csv "$TMP/header.csv" .
head -n 1 "$TMP/good.csv" >"$TMP/empty.csv"
check_fails "a CSV without rows is refused" bc_check_csv "$TMP/empty.csv" .
check "scripts/bench-comm --check accepts it" scripts/bench-comm --check "$TMP/good.csv"
check_fails "scripts/bench-comm --check rejects the edit" scripts/bench-comm --check "$TMP/edited.csv"

echo "- series and plots"
check_eq "bc_series selects by columns" \
    "$(bc_series "$TMP/good.csv" "phase=decode&transport=dense" "capacity pred")" "0.5 1"
check_eq "bc_series: no match, no rows" "$(bc_series "$TMP/good.csv" "phase=decode&transport=sparse" "capacity")" ""
mkdir -p "$TMP/plots"
if bc_plots "$TMP/good.csv" "$TMP/plots" "x-" "20mbit/mesh" 2>"$TMP/gp.err"; then
    for f in x-bytes-prefill.png x-bytes-decode.png x-ratio-vs-pred.png x-time.png; do
        check "$f is a PNG" sh -c "head -c 8 '$TMP/plots/$f' | od -An -c | grep -q 'P   N   G'"
    done
else
    fail "bc_plots failed: $(head -n 5 "$TMP/gp.err")"
fi

finish
