#!/bin/bash
# tests/scripts/test-netcluster.sh — scripts/netcluster and scripts/netcluster-agent: the hosts
# it builds (switch and mesh), shaping that MPI traffic really goes through, exit status, and
# that it removes everything it made: after success, failure, SIGTERM, SIGINT, and that
# --cleanup removes what a SIGKILLed run left. Needs root, ip and tc: otherwise it FAILS.
set -u
cd "$(dirname "$0")/../.." || exit 2
. tests/scripts/lib.sh
. scripts/lib-bench-comm.sh
MODPIPE=${MODPIPE:-build/modpipe}
NC=scripts/netcluster
TMP=$(mktemp -d)
BG=
FAKE=
cleanup() {
    [ -z "$BG" ] || kill -TERM "$BG" 2>/dev/null
    [ -z "$FAKE" ] || ip netns del "$FAKE" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

if [ "$(id -u)" != 0 ]; then
    fail "test-netcluster.sh needs root (network namespaces); run the script tests as root"
    finish
fi
for t in ip tc unshare; do
    command -v $t >/dev/null 2>&1 || { fail "$t not found (scripts/install-deps installs iproute2)"; finish; }
done


left() { ip netns list | awk '{ print $1 }' | grep -c "^$1-"; }
# alive PID...: how many still run (zombies waiting to be reaped by pid 1 do not count);
# waits up to 3 s for them to end
alive() {
    local p n t
    for t in $(seq 1 30); do
        n=0
        for p in "$@"; do
            grep -q '^State:[[:space:]]*[^ZX]' "/proc/$p/status" 2>/dev/null && n=$((n + 1))
        done
        [ $n = 0 ] && break
        sleep 0.1
    done
    echo $n
}

echo "- arguments (nothing created)"
before=$(ip netns list | wc -l)
check "--help" sh -c "$NC --help | grep -q -- '--topology'"
check_fails "a rate that is not one is refused" $NC --rate fast --raw -- true
check_fails "a delay that is not one is refused" $NC --delay soon --raw -- true
check_fails "--hosts 0 is refused" $NC -n 0 --raw -- true
check_fails "an unknown topology is refused" $NC --topology ring --raw -- true
check_fails "a mesh of 1 host is refused" $NC -n 1 --topology mesh --raw -- true
check_fails "no program is refused" $NC -n 2
check_eq "none of these created a namespace" "$(ip netns list | wc -l)" "$before"

echo "- switch: 3 hosts, 50mbit"
$NC -n 3 --rate 50mbit --raw -- sh -c '
    echo "prefix $NETCLUSTER_PREFIX"; echo "addrs $NETCLUSTER_ADDRS"; echo "host $(hostname)"
    echo "ns $(ip netns identify)"; echo "tmp $TMPDIR"
    tc qdisc show dev eth0; ip -o -4 addr show dev eth0
    cat "$NETCLUSTER_HOSTFILE"' >"$TMP/sw.out" 2>&1
check_eq "exit status 0" $? 0
P=$(awk '$1 == "prefix" { print $2 }' "$TMP/sw.out")
check "ran under a prefix" test -n "$P"
check_eq "addresses" "$(awk '$1 == "addrs" { $1 = ""; print }' "$TMP/sw.out")" " 10.77.0.1 10.77.0.2 10.77.0.3"
check_eq "program runs on host 0 (its hostname, namespace)" \
    "$(awk '$1 == "host" || $1 == "ns" { print $2 }' "$TMP/sw.out" | tr '\n' ' ')" "h0 $P-h0 "
check "host 0 has its own TMPDIR" grep -q "^tmp .*tmp-h0$" "$TMP/sw.out"
check "eth0 is shaped: tbf 50Mbit" grep -q "tbf .*rate 50Mbit" "$TMP/sw.out"
check "eth0 has 10.77.0.1/24" grep -q "inet 10.77.0.1/24" "$TMP/sw.out"
check_eq "hostfile: one slot per address" "$(grep -c '^10\.77\.0\.[123] slots=1$' "$TMP/sw.out")" 3
check_eq "nothing left afterwards" "$(left "$P")" 0

echo "- exit status is the program's; cleanup after failure"
$NC -n 2 --raw -- sh -c 'echo "$NETCLUSTER_PREFIX" > '"$TMP/p2"'; exit 7' >/dev/null 2>&1
check_eq "exit status 7" $? 7
check_eq "nothing left after the failure" "$(left "$(cat "$TMP/p2")")" 0

echo "- mesh: 3 hosts, a shaped link per pair, MPI across them"
$NC -n 3 --topology mesh --rate 20mbit --info -- sh -c \
    'echo "$(hostname) $NETCLUSTER_PREFIX $(ls /sys/class/net | grep -v lo | tr "\n" " ")$(tc qdisc show | grep -c "tbf.*rate 20Mbit")"' \
    >"$TMP/mesh.out" 2>"$TMP/mesh.err"
check_eq "exit status 0" $? 0
check_eq "one rank on each host, each with links to the 2 others, both shaped" "$(awk '{ $2 = ""; print }' "$TMP/mesh.out" | sort)" \
"h0  to1 to2 2
h1  to0 to2 2
h2  to0 to1 2"
P=$(awk '{ print $2; exit }' "$TMP/mesh.out")
check_eq "nothing left afterwards" "$(left "$P")" 0

echo "- MPI traffic takes the shaped links (modpipe, 4 hosts on a switch at 8mbit)"
if [ -x "$MODPIPE" ]; then
    bc_model_spec all 1.0 256 256 4 2 >"$TMP/m.yaml"
    must "$MODPIPE" init-model --spec "$TMP/m.yaml" --out "$TMP/m" --quiet
    bc_prompts 8 32 1 >"$TMP/prompts.txt"
    run() {  # RATE STATS -> runs a prefill with the dense transport
        $NC -n 4 ${1:+--rate "$1"} --traffic "$TMP/traffic" -- "$MODPIPE" generate --model "$TMP/m" \
            --prompts-file "$TMP/prompts.txt" --max-new 1 --stages 0-1,2-3,4-5,6-7 \
            --transport dense --stats "$2" --quiet >"$TMP/run.log" 2>&1
    }
    if run 8mbit "$TMP/slow.json"; then
        pass "modpipe ran on 4 hosts"
        # the busiest port moved at least the payload of one chain link
        need=$(jq '.links | map(select(.kind == "chain") | .payload_bytes) | max' "$TMP/slow.json")
        tx=$(awk '$1 == "10.77.0.2" { print $3 }' "$TMP/traffic")
        check "host 1 sent at least its chain link's payload ($need B) over its eth0 ($tx B)" test "$tx" -ge "$need"
        secs=$(jq .seconds "$TMP/slow.json")
        floor=$(awk -v b="$need" 'BEGIN { printf "%.3f", b * 8 / 8e6 * 0.9 }')
        check "at 8mbit the run took at least 90% of bytes/rate ($secs s >= $floor s)" \
            awk -v s="$secs" -v f="$floor" 'BEGIN { exit !(s >= f) }'
        if run "" "$TMP/fast.json"; then
            fast=$(jq .seconds "$TMP/fast.json")
            check "unshaped, the same run is faster ($fast s < $secs s)" awk -v a="$fast" -v b="$secs" 'BEGIN { exit !(a < b) }'
        else
            fail "unshaped run failed: $(tail -n 5 "$TMP/run.log")"
        fi
    else
        fail "modpipe on netcluster failed: $(tail -n 10 "$TMP/run.log")"
    fi
else
    fail "no modpipe binary at $MODPIPE (run make)"
fi

for sig in TERM INT; do
    echo "- SIGTERM/SIGINT while MPI ranks run: everything removed ($sig)"
    rm -f "$TMP"/pid.*
    set -m
    $NC -n 3 -- sh -c 'echo $$ > '"$TMP"'/pid.$(hostname); echo "$NETCLUSTER_PREFIX" > '"$TMP"'/prefix; exec sleep 60' \
        >"$TMP/sig.log" 2>&1 &
    BG=$!
    set +m
    for _ in $(seq 1 100); do
        [ "$(ls "$TMP"/pid.* 2>/dev/null | wc -l)" = 3 ] && break
        sleep 0.1
    done
    pids=$(cat "$TMP"/pid.* 2>/dev/null)
    P=$(cat "$TMP/prefix" 2>/dev/null)
    check_eq "3 ranks started" "$(echo $pids | wc -w | tr -d ' ')" 3
    check_eq "its namespaces exist meanwhile" "$(left "$P")" 4
    kill -$sig "$BG"
    wait "$BG"
    rc=$?
    BG=
    [ $sig = TERM ] && want=143 || want=130
    check_eq "exit status $want" $rc $want
    check_eq "no namespace left" "$(left "$P")" 0
    check_eq "no rank left" "$(alive $pids)" 0
done

echo "- --cleanup removes what a killed run left, and only that"
dead=$(($(cat /proc/sys/kernel/pid_max) + 1))
FAKE=ncl$dead-h0
must ip netns add "$FAKE"
set -m
$NC -n 2 --raw -- sh -c 'echo "$NETCLUSTER_PREFIX" > '"$TMP"'/live; exec sleep 60' >/dev/null 2>&1 &
BG=$!
set +m
for _ in $(seq 1 100); do [ -s "$TMP/live" ] && break; sleep 0.1; done
LIVE=$(cat "$TMP/live")
check "--list shows the leftover as gone" sh -c "$NC --list | grep -q '$FAKE (run $dead, gone)'"
check "--cleanup runs" $NC --cleanup
check_eq "the leftover is removed" "$(ip netns list | awk '{ print $1 }' | grep -c "^$FAKE$")" 0
FAKE=
check_eq "the live run's namespaces are kept" "$(left "$LIVE")" 3
kill -TERM "$BG"
wait "$BG"
BG=
check_eq "and removed when it ends" "$(left "$LIVE")" 0

echo "- --delay: applied with netem, or a clear error (this kernel may have no netem)"
$NC -n 2 --delay 1ms --raw -- sh -c 'echo "$NETCLUSTER_PREFIX" > '"$TMP"'/d; tc qdisc show dev eth0' >"$TMP/delay.out" 2>&1 &
dpid=$! # its namespaces are ncl<pid>-*: other runs on the machine (other tests) are not ours
wait $dpid
rc=$?
if [ $rc = 0 ]; then
    check "netem delay 1ms is on eth0" grep -q "netem.*delay 1ms" "$TMP/delay.out"
    check_eq "nothing left" "$(left "$(cat "$TMP/d")")" 0
else
    check "the error names netem" grep -q "netem" "$TMP/delay.out"
    check_eq "nothing left after the error" "$(left "ncl$dpid")" 0
fi

echo "- netcluster-agent"
: >"$TMP/map"
NETCLUSTER_HOSTS=$TMP/map scripts/netcluster-agent 10.9.9.9 true >/dev/null 2>&1
check_eq "an unknown host: exit 255" $? 255
check_fails "no host map: refused" env -u NETCLUSTER_HOSTS scripts/netcluster-agent 10.9.9.9 true

finish
