# shellcheck shell=bash
# scripts/lib-bench-comm.sh — the parts of scripts/bench-comm that tests/scripts/ also use:
# model specs of the layouts, deterministic prompts, the CSV row derived from one stats file
# (jq), the CSV check, and the plots (gnuplot). Source it from bash; it defines functions only.
#
# The CSV (one row per run; S = 4 stages):
#   layout,stages,capacity,phase,wire_dtype,transport,net   what was run
#   rows          rows the pipeline processed (stats .rows)
#   tokens        tokens sampled (stats .tokens)
#   participation measured share of rows selected, over all routed layers (sum active_rows /
#                 sum rows of the layers[] entries of type mod or mode_staged)
#   p_stage1..3   stage participation estimated from the per-layer participations p_l:
#                 1 if the stage has a layer that needs every row (dense, mindskip,
#                 mode_integrated), else 1 - prod_l (1 - p_l) (a row is needed if any of the
#                 stage's routers selects it; routers taken as independent)
#   recv_stage1..3 measured share of rows that arrived at stage t (sum of .rows of the chain and
#                 bypass links into t / rows): the actual union the senders computed; for the
#                 head it includes rows sent only for their logits
#   packets       activation packets (chain + bypass links)
#   wire_bytes,payload_bytes,header_bytes,token_bytes,dense_bytes   stats .total
#   ratio         wire_bytes / dense_bytes (stats .total.ratio)
#   payload_ratio payload_bytes / dense_bytes
#   ratio_vs_f32  wire_bytes / the dense pipeline's bytes in f32 (shows bf16 on top)
#   pred          docs/SPEC.md §4 prediction of payload / dense from p_stage (see pred below); 1 for
#                 the dense transport (which sends every row on every chain link)
#   max_link_bytes   bytes (payload + headers) of the busiest link s->t
#   max_port_bytes   bytes through the busiest host port: max over stages of the bytes it
#                 sends (all its links out) and of the bytes it receives (all links in)
#   max_link_ratio, max_port_ratio   the two above / the bytes of one link of the dense
#                 pipeline (dense_bytes / 3): on links of a fixed rate, the pipeline's
#                 communication time follows the busiest link (point-to-point links) or the
#                 busiest port (hosts on a switch), not the total
#   seconds       the run's own wall time (stats .seconds: first micro-batch to last, rank 0)
#   s_per_token   seconds / rows for prefill (prompt rows), seconds / tokens for decode
#   wall_s        wall time of the whole mpirun (start-up and model load included)
#   stats_file    the stats JSON the row was derived from
#
# pred (S stages, p_t = p_stage t, n_seq = sequences, N = rows):
#   prefill: ( sum_{t=1..S-2} p_t + q ) / (S-1),  q = p_{S-1} + (1 - p_{S-1}) * n_seq / N
#            (the head also receives each prompt's last row, for its logits)
#   decode:  ( sum_{t=1..S-2} p_t + 1 ) / (S-1)   (every decode row reaches the head)
#   With every p_t = p and n_seq << N these are docs/SPEC.md §4's p and (1 + p (S-2)) / (S-1).

BC_COLUMNS="layout,stages,capacity,phase,wire_dtype,transport,net,rows,tokens,participation,p_stage1,p_stage2,p_stage3,recv_stage1,recv_stage2,recv_stage3,packets,wire_bytes,payload_bytes,header_bytes,token_bytes,dense_bytes,ratio,payload_ratio,ratio_vs_f32,pred,max_link_bytes,max_port_bytes,max_link_ratio,max_port_ratio,seconds,s_per_token,wall_s,stats_file"

BC_LAYOUTS="all alt aligned"

# bc_layout_stages LAYOUT -> the --stages argument
bc_layout_stages() {
    case "$1" in
        all|alt) echo "0-1,2-3,4-5,6-7" ;;
        aligned) echo "0-0,1-3,4-4,5-7" ;;
        *) echo "bc_layout_stages: unknown layout $1" >&2; return 1 ;;
    esac
}

# bc_layout_types LAYOUT -> YAML flow list of the 8 layer types
bc_layout_types() {
    case "$1" in
        all) echo "[mod, mod, mod, mod, mod, mod, mod, mod]" ;;
        alt) echo "[dense, mod, dense, mod, dense, mod, dense, mod]" ;;
        aligned) echo "[dense, mod, mod, mod, dense, mod, mod, mod]" ;;
        *) echo "bc_layout_types: unknown layout $1" >&2; return 1 ;;
    esac
}

# bc_model_spec LAYOUT CAPACITY HIDDEN INTERMEDIATE HEADS KV_HEADS -> YAML on stdout
bc_model_spec() {
    local types
    types=$(bc_layout_types "$1") || return 1
    cat <<EOF
# bench-comm model: layout $1, capacity $2 (written by scripts/bench-comm)
hidden_size: $3
intermediate_size: $4
num_attention_heads: $5
num_key_value_heads: $6
num_hidden_layers: 8
vocab_size: 256
rms_norm_eps: 1.0e-5
rope_theta: 10000
max_position_embeddings: 1024
tie_word_embeddings: false
layer_types: $types
mod:
  capacity: $2
  routing: threshold
  threshold: 0.5
  router_scale: none
  router_bias: true
init:
  seed: 7
  std: 0.02
  router_std: 1.0
output:
  dtype: f32
calibrate:
  enabled: true
  prompts: 16
  length: 64
EOF
}

# bc_prompts N LEN SEED -> N lines of LEN token ids in 1..255. A Park-Miller generator
# (x = 16807 x mod 2^31-1): every product stays below 2^53, so the arithmetic is exact in any
# awk (mawk, gawk, busybox) and the prompts are the same everywhere.
bc_prompts() {
    awk -v n="$1" -v len="$2" -v seed="$3" 'BEGIN {
        m = 2147483647
        x = (seed * 7919 + 17) % m
        if (x == 0) x = 1
        for (s = 0; s < n; s++) {
            line = ""
            for (i = 0; i < len; i++) {
                x = (x * 16807) % m
                line = line (i ? "," : "") (1 + int(x / 8) % 255)
            }
            print line
        }
    }'
}

# The jq program: stats JSON -> one CSV row. Arguments (--arg): layout stages capacity phase
# net wall stats_file. Fails (jq error) when the stats do not fit the run described.
BC_JQ_ROW='
def r6: if . == null then "" else (. * 1000000 | round / 1000000 | tostring) end;
def r9: if . == null then "" else (. * 1000000000 | round / 1000000000 | tostring) end;
def routed: .type == "mod" or .type == "mode_staged";
def wsize: if . == "f32" then 4 else 2 end;
. as $j
| if ($j.ranks != 4) then error("stats \($file): \($j.ranks) ranks, the bench expects 4") else . end
| ($j.rows) as $N
| ($j.layers | map(select(routed))) as $rl
| (if ($rl | length) > 0 then (($rl | map(.active_rows) | add) / ($rl | map(.rows) | add)) else null end) as $part
| [range(1; 4) as $t
    | ($j.layers | map(select(.stage == $t))) as $ls
    | if ($ls | length) == 0 then error("stats \($file): stage \($t) has no layers")
      elif ($ls | any(routed | not)) then 1
      else 1 - ($ls | map(1 - .participation) | reduce .[] as $x (1; . * $x)) end] as $p
| [range(1; 4) as $t
    | ($j.links | map(select(.to == $t and .kind != "tokens") | .rows) | add // 0) / $N] as $recv
| ($j.links | map(select(.kind != "tokens") | .packets) | add) as $packets
| ($j.tokens) as $nseq
| (if $phase == "prefill"
     then ($p[0] + $p[1] + ($p[2] + (1 - $p[2]) * $nseq / $N)) / 3
     else ($p[0] + $p[1] + 1) / 3 end
   | if $j.transport == "dense" then 1 else . end) as $pred
| ($j.links | map(.payload_bytes + .header_bytes)) as $lb
| ($lb | max) as $maxlink
| ([range(0; 4) as $s
     | ($j.links | map(select(.from == $s) | .payload_bytes + .header_bytes) | add // 0),
       ($j.links | map(select(.to == $s) | .payload_bytes + .header_bytes) | add // 0)]
   | max) as $maxport
| ($j.total) as $tot
| ($tot.dense_bytes * 4 / ($j.wire_dtype | wsize)) as $dense32
| (if $phase == "prefill" then $j.seconds / $N else $j.seconds / $j.tokens end) as $spt
| [ $layout, $stages, $capacity, $phase, $j.wire_dtype, $j.transport, $net,
    ($N | tostring), ($j.tokens | tostring), ($part | r6),
    ($p[0] | r6), ($p[1] | r6), ($p[2] | r6),
    ($recv[0] | r6), ($recv[1] | r6), ($recv[2] | r6),
    ($packets | tostring),
    ($tot.wire_bytes | tostring), ($tot.payload_bytes | tostring), ($tot.header_bytes | tostring),
    ($tot.token_bytes | tostring), ($tot.dense_bytes | tostring),
    ($tot.ratio | r6), ($tot.payload_ratio | r6), ($tot.wire_bytes / $dense32 | r6),
    ($pred | r6), ($maxlink | tostring), ($maxport | tostring),
    ($maxlink / ($j.total.dense_bytes / 3) | r6), ($maxport / ($j.total.dense_bytes / 3) | r6),
    ($j.seconds | r6), ($spt | r9), $wall, $file ]
| join(",")
'

# bc_csv_row STATS LAYOUT STAGES CAPACITY PHASE NET WALL_S -> one CSV line (file name as
# given; the commas of STAGES become ';' in the CSV: 0-1;2-3;4-5;6-7)
bc_csv_row() {
    jq -r --arg file "$1" --arg layout "$2" --arg stages "${3//,/;}" --arg capacity "$4" \
        --arg phase "$5" --arg net "$6" --arg wall "$7" "$BC_JQ_ROW" "$1"
}

# bc_check_csv CSV [BASE]: every row's stats file (relative to BASE, default ., unless absolute) must exist and
# give exactly the same row again (the run columns layout..net and wall_s are taken from the
# CSV; everything else is recomputed). Prints the mismatches; returns 1 if any.
bc_check_csv() {
    local csv=$1 base=${2:-.} bad=0 n=0 line got f path layout stages cap phase net wall
    if [ "$(head -n 1 "$csv")" != "$BC_COLUMNS" ]; then
        echo "$csv: header differs from: $BC_COLUMNS" >&2
        return 1
    fi
    while IFS= read -r line; do
        n=$((n + 1))
        IFS=, read -r layout stages cap phase _ _ net _ <<<"$line"
        f=${line##*,}
        wall=$(printf '%s\n' "$line" | awk -F, '{ print $(NF - 1) }')
        case "$f" in /*) path=$f ;; *) path=$base/$f ;; esac
        if [ ! -r "$path" ]; then
            echo "row $n: stats file $path missing" >&2
            bad=1
            continue
        fi
        got=$(cd "$base" && bc_csv_row "$f" "$layout" "$stages" "$cap" "$phase" "$net" "$wall") || {
            echo "row $n: jq failed on $f" >&2; bad=1; continue; }
        if [ "$got" != "$line" ]; then
            echo "row $n differs from $f:" >&2
            echo "  csv:   $line" >&2
            echo "  stats: $got" >&2
            bad=1
        fi
    done < <(tail -n +2 "$csv")
    [ "$n" -gt 0 ] || { echo "$csv: no rows" >&2; return 1; }
    return $bad
}

# bc_series CSV FILTER_AWK COLS -> whitespace table of the rows matching an awk condition on
# named columns (c["capacity"] etc.), with the named columns, sorted by the first.
bc_series() {
    awk -F, -v cond="$2" -v cols="$3" '
        NR == 1 { for (i = 1; i <= NF; i++) idx[$i] = i; n = split(cols, want, " "); next }
        {
            for (k in idx) c[k] = $(idx[k])
            ok = 1
            m = split(cond, cl, "&")
            for (j = 1; j <= m; j++) {
                split(cl[j], kv, "=")
                if (c[kv[1]] != kv[2]) ok = 0
            }
            if (!ok) next
            line = ""
            for (j = 1; j <= n; j++) line = line (j > 1 ? " " : "") c[want[j]]
            print line
        }' "$1" | sort -g
}

# bc_gp_plot SPEC... : a gnuplot `plot` command of the series whose data file has rows; each
# SPEC is "FILE|USING|STYLE|TITLE". With no data at all: an empty panel saying so.
bc_gp_plot() {
    local spec file using style title out=""
    for spec in "$@"; do
        IFS='|' read -r file using style title <<<"$spec"
        [ -s "$file" ] || continue
        out="$out${out:+, }'$file' u $using $style t '$title'"
    done
    if [ -n "$out" ]; then
        echo "plot $out"
    else
        echo "set label 99 'no runs' at graph 0.5, 0.5 center; plot [] [0:1] -1 notitle; unset label 99"
    fi
}

# bc_plots CSV OUTDIR [PREFIX [NET [time]]]: PNGs from the CSV (gnuplot, pngcairo), named
# PREFIX...; with "time" only the time plots (the bytes of a run do not depend on the links)
#   bytes-prefill.png, bytes-decode.png  wire MiB vs capacity per layout: measured, dense,
#                                        SPEC prediction x dense, for f32 and bf16
#   ratio-vs-pred.png                    measured / dense against the prediction, every run
#   time.png, speedup.png (when the CSV has dense-transport runs)  ms/token vs capacity,
#                                        sparse vs dense; speed-up vs bottleneck bytes saved
bc_plots() {
    local csv=$1 out=$2 pre=${3:-} tag=${4:-} only=${5:-} d phase layout dt f title a b what
    d=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$d'" RETURN
    for phase in prefill decode; do
        for layout in $BC_LAYOUTS; do
            for dt in f32 bf16; do
                f=$d/$phase-$layout-$dt
                bc_series "$csv" "phase=$phase&layout=$layout&wire_dtype=$dt&transport=sparse" \
                    "capacity wire_bytes dense_bytes pred ratio s_per_token" >"$f"
                bc_series "$csv" "phase=$phase&layout=$layout&wire_dtype=$dt&transport=dense" \
                    "capacity wire_bytes dense_bytes pred ratio s_per_token" >"$f.dense"
            done
        done
    done
    # speed-up of sparse over dense transport vs how much less the bottleneck carries
    # (busiest link on a mesh, busiest host port on a switch), one point per configuration
    awk -F, -v d="$d" '
        NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
        {
            k = $c["layout"] "," $c["capacity"] "," $c["phase"] "," $c["wire_dtype"] "," $c["net"]
            b = ($c["net"] ~ /mesh/) ? $c["max_link_ratio"] : $c["max_port_ratio"]
            if ($c["transport"] == "dense") { dt[k] = $c["s_per_token"]; db[k] = b }
            else { st[k] = $c["s_per_token"]; sb[k] = b; ph[k] = $c["phase"] "-" $c["wire_dtype"] }
        }
        END {
            for (k in st) if (k in dt && st[k] > 0 && sb[k] > 0)
                printf "%.6f %.6f\n", db[k] / sb[k], dt[k] / st[k] >> (d "/speedup-" ph[k])
        }' "$csv"
    bc_series "$csv" "phase=prefill&transport=sparse" "pred ratio payload_ratio" >"$d/scatter-prefill"
    bc_series "$csv" "phase=decode&transport=sparse" "pred ratio payload_ratio" >"$d/scatter-decode"

    {
      if [ "$only" != time ]; then
        echo "set terminal pngcairo size 1500,520 font 'sans,10'"
        echo "set logscale x 2; set xrange [0.1:1.2]; set xtics (0.125, 0.25, 0.5, 1)"
        echo "set xlabel 'capacity (configured)'; set ylabel 'MiB on the wire (3 stage boundaries)'"
        echo "set key bottom right font 'sans,8'; set grid; set yrange [0:*]"
        for phase in prefill decode; do
            echo "set output '$out/${pre}bytes-$phase.png'"
            echo "set multiplot layout 1,3 title '$phase: bytes sent between the 4 stages vs a dense pipeline${tag:+ (links of $tag)}'"
            for layout in $BC_LAYOUTS; do
                case $layout in
                    all) title="every layer routed (stages 0-1|2-3|4-5|6-7)" ;;
                    alt) title="every other layer routed (paper; stages 0-1|2-3|4-5|6-7)" ;;
                    aligned) title="[dense,mod,mod,mod]x2, stages aligned (0|1-3|4|5-7)" ;;
                esac
                echo "set title '$title' font 'sans,9'"
                a=$d/$phase-$layout-f32
                b=$d/$phase-$layout-bf16
                bc_gp_plot \
                    "$a|1:(\$3/1048576)|w lp lc rgb 'black' dt 2 pt 4|dense f32" \
                    "$a|1:(\$4*\$3/1048576)|w p lc rgb '#1f77b4' pt 6 ps 2|docs/SPEC.md §4 prediction f32" \
                    "$a|1:(\$2/1048576)|w lp lc rgb '#1f77b4' lw 2 pt 7|measured f32" \
                    "$b|1:(\$3/1048576)|w lp lc rgb 'gray40' dt 2 pt 4|dense bf16" \
                    "$b|1:(\$4*\$3/1048576)|w p lc rgb '#d62728' pt 6 ps 2|docs/SPEC.md §4 prediction bf16" \
                    "$b|1:(\$2/1048576)|w lp lc rgb '#d62728' lw 2 pt 5|measured bf16"
            done
            echo "unset multiplot"
        done
        echo "set terminal pngcairo size 640,600 font 'sans,10'"
        echo "set output '$out/${pre}ratio-vs-pred.png'"
        echo "unset logscale x; set xrange [0:1.1]; set yrange [0:1.1]; set xtics auto"
        echo "set xlabel 'docs/SPEC.md §4 prediction from measured participation (payload / dense)'"
        echo "set ylabel 'measured / dense bytes'"
        echo "set title 'every run${tag:+ (links of $tag)}: measured vs predicted'"
        echo "set key top left font 'sans,8'"
        echo "set arrow 1 from 0,0 to 1.1,1.1 nohead lc rgb 'gray'"
        bc_gp_plot \
            "$d/scatter-prefill|1:3|w p pt 6 ps 1.5 lc rgb '#1f77b4'|prefill, payload only" \
            "$d/scatter-prefill|1:2|w p pt 7 lc rgb '#1f77b4'|prefill, all bytes (+ headers, masks, tokens)" \
            "$d/scatter-decode|1:3|w p pt 4 ps 1.5 lc rgb '#d62728'|decode, payload only" \
            "$d/scatter-decode|1:2|w p pt 5 lc rgb '#d62728'|decode, all bytes (+ headers, masks, tokens)"
        echo "unset arrow 1"
      fi
        if cat "$d"/*.dense | grep -q .; then
            echo "set terminal pngcairo size 1500,900 font 'sans,10'"
            echo "set output '$out/${pre}time.png'"
            echo "set logscale x 2; set xrange [0.1:1.2]; set xtics (0.125, 0.25, 0.5, 1)"
            echo "set yrange [0:*]; set key top left"
            echo "set xlabel 'capacity (configured)'; set ylabel 'ms per token'"
            echo "set multiplot layout 2,3 title 'time per token${tag:+ on links of $tag}: sparse vs dense transport (same model, same compute)'"
            for phase in prefill decode; do
                for layout in $BC_LAYOUTS; do
                    echo "set title '$phase, $layout' font 'sans,9'"
                    a=$d/$phase-$layout-f32
                    b=$d/$phase-$layout-bf16
                    bc_gp_plot \
                        "$a.dense|1:(\$6*1000)|w lp lc rgb 'black' dt 2 pt 4|dense transport f32" \
                        "$a|1:(\$6*1000)|w lp lc rgb '#1f77b4' lw 2 pt 7|sparse f32" \
                        "$b.dense|1:(\$6*1000)|w lp lc rgb 'gray40' dt 2 pt 4|dense transport bf16" \
                        "$b|1:(\$6*1000)|w lp lc rgb '#d62728' lw 2 pt 5|sparse bf16"
                done
            done
            echo "unset multiplot"
            echo "set terminal pngcairo size 640,600 font 'sans,10'"
            echo "set output '$out/${pre}speedup.png'"
            case $tag in */mesh*) what="busiest link" ;; *) what="busiest host port" ;; esac
            echo "unset logscale x; set xtics auto; set xrange [0.8:*]; set yrange [0.5:*]"
            echo "set offsets 0, 0.3, 0.2, 0"
            echo "set xlabel 'bytes through the bottleneck ($what): dense / sparse transport'"
            echo "set ylabel 'time per token: dense / sparse transport'"
            echo "set title 'speed-up of the sparse transport${tag:+ on links of $tag}' font 'sans,10'"
            echo "set key top left font 'sans,8'"
            echo "set arrow 1 from 0.8,0.8 to 4.5,4.5 nohead lc rgb 'gray'"
            echo "set arrow 2 from 0.8,1 to 4.5,1 nohead lc rgb 'gray' dt 2"
            bc_gp_plot \
                "$d/speedup-prefill-f32|1:2|w p pt 7 ps 1.3 lc rgb '#1f77b4'|prefill f32" \
                "$d/speedup-prefill-bf16|1:2|w p pt 6 ps 1.3 lc rgb '#1f77b4'|prefill bf16" \
                "$d/speedup-decode-f32|1:2|w p pt 5 ps 1.3 lc rgb '#d62728'|decode f32" \
                "$d/speedup-decode-bf16|1:2|w p pt 4 ps 1.3 lc rgb '#d62728'|decode bf16"
            echo "unset arrow 1; unset arrow 2; set offsets 0, 0, 0, 0"
        fi
    } >"$d/plot.gp"
    gnuplot "$d/plot.gp"
}
