#!/bin/bash
# tests/scripts/test-deps.sh — the newcomer order: `make` / `make test` on a machine
# that lacks a build dependency installs it (root) or stops with one line naming
# scripts/install-deps (anyone else), and a normal build runs no installer. Missing tools are
# simulated with a PATH that hides protoc-c (and pkg-config modules with an empty
# PKG_CONFIG_LIBDIR) — nothing is uninstalled. Only `make -n` runs: no build, no apt.
set -u
cd "$(dirname "$0")/../.." || exit 2
# Run under `make test`, the child makes would inherit the parent's MAKEFLAGS / MAKELEVEL and
# print "Entering / Leaving directory" lines around the one line this script checks.
unset MAKEFLAGS MAKELEVEL MFLAGS
. tests/scripts/lib.sh
TMP=$(mktemp -d)
chmod 755 "$TMP" # the unprivileged runs below need the PATH directory
trap 'rm -rf "$TMP"' EXIT
mkdir "$TMP/bin"
for f in /usr/bin/* /usr/sbin/*; do ln -sf "$f" "$TMP/bin/"; done
rm -f "$TMP/bin/protoc-c"
NOPC="$TMP/bin"

echo "- scripts/check-deps"
check "nothing missing here" sh scripts/check-deps ompi-c openblas libprotobuf-c yaml-0.1 libcjson cunit
check_eq "names a hidden tool" "$(PATH=$NOPC sh scripts/check-deps ompi-c)" "protoc-c"
check_eq "names a missing module" "$(sh scripts/check-deps cunit no-such-module-xyz)" "no-such-module-xyz"

echo "- make, everything present: no installer"
out=$(make -n all 2>&1)
check_eq "make -n all mentions no install-deps" "$(printf '%s\n' "$out" | grep -c install-deps)" "0"

echo "- make, protoc-c missing, not root: one line naming scripts/install-deps"
for goal in all test; do
    out=$(setpriv --reuid=65534 --regid=65534 --clear-groups env PATH="$NOPC" make -n $goal 2>&1)
    rc=$?
    check_eq "make $goal fails" "$([ $rc -ne 0 ] && echo failed)" "failed"
    check_eq "make $goal: one line" "$(printf '%s\n' "$out" | wc -l)" "1"
    check "make $goal: names protoc-c and scripts/install-deps" \
        grep -q "missing protoc-c: run 'sudo sh scripts/install-deps'" <<<"$out"
done
out=$(PKG_CONFIG_LIBDIR=$TMP/none setpriv --reuid=65534 --regid=65534 --clear-groups make -n 2>&1)
check "modules missing: named" grep -q "missing ompi-c openblas libprotobuf-c yaml-0.1 libcjson libpcre2-8 libmicrohttpd icu-uc cunit: run" <<<"$out"
check "make clean needs nothing" env PATH="$NOPC" make -n clean

echo "- make, protoc-c missing, root: runs scripts/install-deps, then re-checks"
if [ "$(id -u)" = 0 ]; then
    # install-deps finds every package installed (dpkg) and returns at once; protoc-c stays
    # hidden, so the re-check must still stop the build with a clear line.
    out=$(PATH="$NOPC" make -n all 2>&1)
    check "announces install-deps" grep -q "make: missing protoc-c: running scripts/install-deps" <<<"$out"
    check "install-deps ran" grep -q "install-deps: all packages present" <<<"$out"
    check "still missing: stops" grep -q "still missing after scripts/install-deps: protoc-c" <<<"$out"
else
    fail "the root path needs root (run the script tests as root, as make test does here)"
fi
finish
