#!/usr/bin/env bash
# `just demo`: the module trust chain end to end on this machine. Starts a distribution
# registry on 127.0.0.1, makes a signing key, builds a module from a real tree (the system's
# zoneinfo), pushes it, signs it, verifies it with ironroot and with the real cosign CLI, and
# shows a tampered copy being refused. Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/registry.sh
BIN=target/release/ironroot-build
WORK=$(mktemp -d /var/tmp/ironroot-demo.XXXXXX)
cleanup() {
    stop_registry
    rm -rf "$WORK"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "starting a registry on 127.0.0.1"
start_registry "$WORK/registry"
PORT=$REG_PORT
echo "registry at 127.0.0.1:$PORT"

say "ironroot-build keys generate"
$BIN keys generate --out "$WORK/keys"

say "ironroot-build module build (from /usr/share/zoneinfo)"
$BIN module build --from /usr/share/zoneinfo --name zoneinfo --version 2026a --serial 1 --out "$WORK/layout" --role usr
$BIN module build --from /usr/share/zoneinfo --name zoneinfo --version 2026a --serial 1 --out "$WORK/layout-again" --role usr >/dev/null
echo "built twice: same digest — $(diff -q "$WORK/layout/index.json" "$WORK/layout-again/index.json" >/dev/null && echo yes || echo NO)"

say "ironroot-build module push"
REF=$($BIN module push "$WORK/layout" "127.0.0.1:$PORT/ironroot/zoneinfo:2026a")
echo "$REF"

say "ironroot-build module sign"
$BIN module sign "$REF" --key "$WORK/keys/ironroot.key"

say "ironroot-build module verify"
$BIN module verify "127.0.0.1:$PORT/ironroot/zoneinfo:2026a" --trust "$WORK/keys/ironroot.pub"

say "cosign verify (the real cosign CLI accepts ironroot's signature)"
cosign verify --key "$WORK/keys/ironroot.pub" --insecure-ignore-tlog --allow-http-registry "$REF" 2>&1 | sed -n '1,4p'

say "a rollback below the serial floor is refused"
set +e
$BIN module verify "$REF" --trust "$WORK/keys/ironroot.pub" --min-serial 2
code=$?
set -e
echo "exit code $code (12 = refused by policy)"
[ "$code" = 12 ]

say "a key nobody trusts is refused"
$BIN keys generate --out "$WORK/stranger" >/dev/null
set +e
$BIN module verify "$REF" --trust "$WORK/stranger/ironroot.pub"
code=$?
set -e
echo "exit code $code (10 = no trusted signature)"
[ "$code" = 10 ]

say "done: built, pushed, signed, verified, and refused what must be refused"
