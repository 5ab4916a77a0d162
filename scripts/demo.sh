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

LAB=${IRONROOT_DEMO_LAB:-target/demo}
TIMEOUT=${IRONROOT_DEMO_TIMEOUT:-900}
PLANE=target/release/ironroot-plane
NODE=demo-node
mkdir -p "$LAB"
LAB=$(cd "$LAB" && pwd)
PLANE_PID= QEMU_PID=
cleanup() {
    local status=$?
    set +e
    # Only what this script started, by PID: QEMU (via timeout), the plane, the registry.
    [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
    [ -n "$PLANE_PID" ] && kill "$PLANE_PID" 2>/dev/null && wait "$PLANE_PID" 2>/dev/null
    stop_registry
    exit "$status"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building"
cargo build --release --locked -p ironroot-build -p ironroot-agent -p ironroot-plane

# 1. The lab CA and the registry's certificate (kept in $LAB so a built image stays usable).
if [ ! -f "$LAB/ca/registry.pem" ]; then
    mkdir -p "$LAB/ca"
    (cd "$LAB/ca" &&
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem \
            -days 3650 -subj "/CN=ironroot demo lab CA" -addext basicConstraints=critical,CA:TRUE \
            -addext keyUsage=critical,keyCertSign 2>/dev/null &&
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout registry.key -out registry.csr \
            -subj "/CN=ironroot demo registry" 2>/dev/null &&
        printf 'subjectAltName=IP:127.0.0.1,IP:10.0.2.100\nextendedKeyUsage=serverAuth\n' >ext.cnf &&
        openssl x509 -req -in registry.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile ext.cnf -out registry.pem 2>/dev/null)
fi

say "starting a registry (TLS) and the plane on 127.0.0.1"
rm -rf "$LAB/registry"
REGISTRY_TLS="$LAB/ca/registry.pem:$LAB/ca/registry.key" start_registry "$LAB/registry"
echo "registry  127.0.0.1:$REG_PORT (guest: 10.0.2.100:$REG_PORT)"
rm -rf "$LAB/plane"
$PLANE serve --state "$LAB/plane" --listen 127.0.0.1:0 --name 10.0.2.100 --heartbeat-interval 10s \
    >"$LAB/plane.log" 2>&1 &
PLANE_PID=$!
for _ in $(seq 100); do [ -s "$LAB/plane/address" ] && break; sleep 0.1; done
[ -s "$LAB/plane/address" ] || { cat "$LAB/plane.log" >&2; echo "demo: the plane did not start" >&2; exit 1; }
PLANE_PORT=$(cut -d: -f2 <"$LAB/plane/address")
echo "plane     127.0.0.1:$PLANE_PORT (guest: https://10.0.2.100:$PLANE_PORT)"
op() { $PLANE --state "$LAB/plane" "$@"; }

say "just image (pushes and signs the base module)"
IRONROOT_REGISTRY="127.0.0.1:$REG_PORT/ironroot/base" IRONROOT_REGISTRY_CA="$LAB/ca/ca.pem" \
    bash scripts/image.sh >"$LAB/bundle.json"
reference=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["base_module"]["reference"])' "$LAB/bundle.json")
serial=${IRONROOT_BASE_SERIAL:-1}
guest_ref="10.0.2.100:$REG_PORT/ironroot/base@${reference#*@}"
echo "base module $reference"

say "plane: template and bootstrap token"
op template create base --module "$guest_ref,serial=$serial"
token=$(op token create --node "$NODE" --template base)
python3 - "$LAB/identity.json" "https://10.0.2.100:$PLANE_PORT" "$token" "$NODE" "$LAB/plane/ca.pem" <<'PY'
import json, sys
path, plane, token, node, ca = sys.argv[1:]
json.dump({"plane": plane, "token": token, "node": node, "plane_ca": open(ca).read()}, open(path, "w"))
PY

say "booting $NODE in QEMU (TCG; console: $LAB/console.log)"
qemu/boot.sh --identity "$LAB/identity.json" --forward "$PLANE_PORT" --forward "$REG_PORT" \
    --timeout "$TIMEOUT" --log "$LAB/console.log" target/image &
QEMU_PID=$!

start=$(date +%s)
last=""
state=""
while :; do
    view=$(op node show "$NODE" --json 2>/dev/null || true)
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
    if ! kill -0 "$QEMU_PID" 2>/dev/null; then echo "demo: the VM stopped" >&2; break; fi
    sleep 2
done

say "the node on the plane"
op node show "$NODE" || true
if [ "$state" = running ]; then
    echo
    echo "$NODE reached running in $(($(date +%s) - start)) s"
    exit 0
fi
echo "demo: $NODE did not reach running; last console lines:" >&2
tail -n 30 "$LAB/console.log" >&2 || true
exit 1
