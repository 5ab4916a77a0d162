#!/usr/bin/env bash
# `just demo`: a node netboots the image `just image` built and reaches `running`.
#
# Starts, on 127.0.0.1 only: a distribution registry (TLS, with a lab CA that also names the
# guest's view of the host, 10.0.2.100) and the reference plane. Builds (or reuses) the image,
# pushes and signs the base module, makes a template and a bootstrap token, then boots the node
# in QEMU (TCG) with its identity over fw_cfg. The guest reaches only the two forwarded ports.
# Shows the node move through its phases on the plane (the operator CLI's view), powers the VM
# off and stops everything it started. Exit 0 only when the node reached `running`.
set -euo pipefail
cd "$(dirname "$0")/.."
STEP_PREFIX=demo
source scripts/lib.sh
source scripts/registry.sh
source scripts/lab.sh

LAB=${IRONROOT_DEMO_LAB:-target/demo}
TIMEOUT=${IRONROOT_DEMO_TIMEOUT:-900}
NODE=demo-node
mkdir -p "$LAB"
LAB=$(cd "$LAB" && pwd)
QEMU_PID=
cleanup() {
    local status=$?
    set +e
    # Only what this script started, by PID: QEMU (via timeout), the plane, the registry.
    [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
    lab_stop
    exit "$status"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building"
cargo build --release --locked -p ironroot-build -p ironroot-agent -p ironroot-plane

say "starting a registry (TLS) and the plane on 127.0.0.1"
# The lab CA is kept in $LAB so a built image (its initramfs embeds the CA) stays usable.
lab_ca "$LAB/ca"
lab_start "$LAB" "$LAB/ca" --heartbeat-interval 10s
echo "registry  127.0.0.1:$REG_PORT (guest: 10.0.2.100:$REG_PORT)"
echo "plane     127.0.0.1:$PLANE_PORT (guest: https://10.0.2.100:$PLANE_PORT)"

say "just image (pushes and signs the base module)"
IRONROOT_REGISTRY="127.0.0.1:$REG_PORT/ironroot/base" IRONROOT_REGISTRY_CA="$LAB/ca/ca.pem" \
    bash scripts/image.sh >"$LAB/bundle.json"
reference=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["base_module"]["reference"])' "$LAB/bundle.json")
serial=${IRONROOT_BASE_SERIAL:-1}
guest_ref="10.0.2.100:$REG_PORT/ironroot/base@${reference#*@}"
echo "base module $reference"

say "plane: template and bootstrap token"
lab_op template create base --module "$guest_ref,serial=$serial"
lab_identity "$LAB/identity.json" "$NODE" base

say "booting $NODE in QEMU (TCG; console: $LAB/console.log)"
boot_vm() {
    qemu/boot.sh --identity "$LAB/identity.json" --forward "$PLANE_PORT" --forward "$REG_PORT" \
        --timeout "$TIMEOUT" --log "$LAB/console.log" target/image 2>"$LAB/qemu.err" &
    QEMU_PID=$!
}
boot_vm
relaunched=0

start=$(date +%s)
last=""
state=""
while :; do
    view=$(lab_op node show "$NODE" --json 2>/dev/null || true)
    if [ -n "$view" ]; then
        now=$(python3 -c 'import json,sys; v=json.loads(sys.argv[1]); print(v["state"], v.get("phase") or "-", v.get("heartbeats", 0))' "$view")
        if [ "$now" != "$last" ]; then
            printf '%5ss  state=%s phase=%s heartbeats=%s\n' "$(($(date +%s) - start))" $now
            last=$now
        fi
        state=${now%% *}
        case "$now" in running\ ready\ [1-9]*) break ;; esac
        case "$now" in *failed:*) break ;; esac
    fi
    if ! kill -0 "$QEMU_PID" 2>/dev/null; then
        rc=0
        wait "$QEMU_PID" || rc=$?
        # QEMU itself killed by a signal before our init printed a line: an emulator fault
        # (TCG has aborted this way, rarely); nothing of ours ran, so boot again, once.
        if [ $rc -gt 128 ] && [ $relaunched = 0 ] && ! grep -q "initramfs agent starting" "$LAB/console.log"; then
            echo "demo: QEMU died (status $rc) before the guest ran our init; booting again once" >&2
            cat "$LAB/qemu.err" >&2 || true
            relaunched=1
            boot_vm
            continue
        fi
        echo "demo: the VM stopped (status $rc)" >&2
        cat "$LAB/qemu.err" >&2 || true
        break
    fi
    sleep 2
done

say "the node on the plane"
lab_op node show "$NODE" || true
if [ "$state" = running ]; then
    echo
    echo "$NODE reached running in $(($(date +%s) - start)) s"
    exit 0
fi
echo "demo: $NODE did not reach running; last console lines:" >&2
tail -n 30 "$LAB/console.log" >&2 || true
exit 1
