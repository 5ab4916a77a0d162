#!/usr/bin/env bash
# `just lab [KERNEL=cloud|generic]`: a lab on 127.0.0.1 that stays up. A TLS distribution registry (lab CA in
# target/lab/ca, naming 127.0.0.1 and the guests' 10.0.2.100), the image built, pushed and
# signed (`just image`), the plane with the QEMU provider booting that image (trusting the
# image's signing key and the lab CA), channel `stable` of the base module, template `base`
# following it.
# Writes target/lab/env (source it; then `ironroot-plane node provision NAME --template base`)
# and returns once everything is up. Processes stay running, recorded in target/lab/*.pid as
# "PID START-TIME"; `just lab-down` stops exactly those.
set -euo pipefail
cd "$(dirname "$0")/.."
STEP_PREFIX=lab
source scripts/lib.sh
source scripts/registry.sh
source scripts/lab.sh

# KERNEL=generic: the generic kernel's bundle, for nodes with e1000e or igb NICs, NVMe or SATA
# disks (`node provision NAME --nic igb --disk 4G --disk-bus nvme`).
kernel_flavour "$@"
mkdir -p target/lab
LAB=$(cd target/lab && pwd)
IMAGE=$(mkdir -p "${IRONROOT_IMAGE:-$KERNEL_IMAGE}" && cd "${IRONROOT_IMAGE:-$KERNEL_IMAGE}" && pwd)

if lab_running "$LAB/registry.pid" && lab_running "$LAB/plane.pid"; then
    step "already up: $LAB/env"
    exit 0
fi
bash scripts/lab-down.sh # whatever is left of an earlier lab
trap 'status=$?; [ $status = 0 ] || bash scripts/lab-down.sh; exit $status' EXIT

step "building"
cargo build --release --locked -p ironroot-build -p ironroot-agent -p ironroot-plane

step "registry (TLS) on 127.0.0.1"
lab_ca "$LAB/ca"
rm -rf "$LAB/registry" "$LAB/plane"
REGISTRY_TLS="$LAB/ca/registry.pem:$LAB/ca/registry.key" start_registry "$LAB/registry"
lab_record "$LAB/registry.pid" "$REG_PID"

step "just image (pushes and signs the base module)"
KERNEL=$KERNEL IRONROOT_IMAGE=$IMAGE IRONROOT_REGISTRY="127.0.0.1:$REG_PORT/ironroot/base" IRONROOT_REGISTRY_CA="$LAB/ca/ca.pem" \
    bash scripts/image.sh >"$LAB/bundle.json"
digest=$(sed -n 's/.*"reference": "[^"]*@\(sha256:[0-9a-f]*\)".*/\1/p' "$LAB/bundle.json")
[ -n "$digest" ] || { echo "lab: no pushed base module in $LAB/bundle.json" >&2; exit 1; }

step "plane with the QEMU provider on 127.0.0.1"
PLANE_STATE=$LAB/plane
setsid $LAB_PLANE serve --state "$PLANE_STATE" --listen 127.0.0.1:0 --heartbeat-interval 10s \
    --provider qemu --bundle "$IMAGE" --machine-forward "$REG_PORT" \
    --trust "$IMAGE/keys/ironroot.pub" --registry-ca "$LAB/ca/ca.pem" \
    --registry-alias "10.0.2.100:$REG_PORT=127.0.0.1:$REG_PORT" </dev/null >"$LAB/plane.log" 2>&1 &
lab_record "$LAB/plane.pid" $!
for _ in $(seq 100); do [ -s "$PLANE_STATE/address" ] && break; sleep 0.1; done
[ -s "$PLANE_STATE/address" ] || { cat "$LAB/plane.log" >&2; echo "lab: the plane did not start" >&2; exit 1; }
# The plane reads the registry itself (at 127.0.0.1, the guests' 10.0.2.100): it verifies the
# signature and takes the serial from the signed config; template base follows channel stable.
lab_op channel set "10.0.2.100:$REG_PORT/ironroot/base" stable "$digest" >/dev/null
lab_op template create base --module "10.0.2.100:$REG_PORT/ironroot/base:stable" >/dev/null

cat >"$LAB/env" <<ENV
export IRONROOT_PLANE_STATE=$PLANE_STATE
export IRONROOT_REGISTRY=127.0.0.1:$REG_PORT
export IRONROOT_GUEST_REGISTRY=10.0.2.100:$REG_PORT
export IRONROOT_REGISTRY_CA=$LAB/ca/ca.pem
export IRONROOT_SIGNING_KEY=$IMAGE/keys/ironroot.key
export IRONROOT_TRUST=$IMAGE/keys/ironroot.pub
export IRONROOT_TEMPLATE=base
ENV
step "up: plane $(cat "$PLANE_STATE/address"), registry 127.0.0.1:$REG_PORT; source $LAB/env"
