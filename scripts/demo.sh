#!/usr/bin/env bash
# `just demo`: a node netboots the image `just image` built and reaches `running`.
#
# Brings the lab up unless it is (`just lab`: a TLS registry and the plane with the QEMU provider
# on 127.0.0.1, the image built, pushed and signed, template `base`), then
# `ironroot-plane node provision demo-node --template base`: the plane creates the node and a
# single-use token and boots a QEMU (TCG) VM with its identity over fw_cfg; the guest reaches
# only the plane and the registry. Shows the node move through its states, then terminates it
# (VM powered off, node revoked) and takes down the lab if it brought it up. Exit 0 only when
# the node reached `running`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lab.sh

TIMEOUT=${IRONROOT_DEMO_TIMEOUT:-900}
NODE=demo-node
PLANE=target/release/ironroot-plane
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

started_lab=0 provisioned=0
cleanup() {
    local status=$?
    set +e
    [ $provisioned = 1 ] && $PLANE node terminate "$NODE"
    [ $started_lab = 1 ] && bash scripts/lab-down.sh
    exit "$status"
}
trap cleanup EXIT

if ! { lab_running target/lab/plane.pid && lab_running target/lab/registry.pid; }; then
    say "just lab"
    started_lab=1
    bash scripts/lab-up.sh
fi
source target/lab/env

say "ironroot-plane node provision $NODE --template $IRONROOT_TEMPLATE"
$PLANE node provision "$NODE" --template "$IRONROOT_TEMPLATE"
provisioned=1
id=$($PLANE node list | awk -v n="$NODE" '$2 == n {print $1}')

start=$(date +%s) last="" state=""
while [ $(($(date +%s) - start)) -lt "$TIMEOUT" ]; do
    read -r state phase < <($PLANE node list | awk -v n="$NODE" '$2 == n {print $3, $5}') || true
    if [ "$state $phase" != "$last" ]; then
        printf '%5ss  state=%s phase=%s\n' "$(($(date +%s) - start))" "$state" "$phase"
        last="$state $phase"
    fi
    case "$state $phase" in running\ *|*failed:*) break ;; esac
    if $PLANE audit list | awk -v id="$id" '$4 == "provider.exited" && $5 == id {f=1} END {exit !f}'; then
        echo "demo: the VM ended by itself" >&2
        break
    fi
    sleep 2
done

say "the node on the plane"
$PLANE node show "$NODE" || true
if [ "$state" = running ]; then
    printf '\n%s reached running in %s s\n' "$NODE" "$(($(date +%s) - start))"
    exit 0
fi
echo "demo: $NODE did not reach running; last console lines:" >&2
$PLANE node console "$NODE" | tail -n 30 >&2 || true
exit 1
