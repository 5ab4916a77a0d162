#!/usr/bin/env bash
# `just bench`, boot to ready: the image `just image` built, booted in QEMU (TCG, 2 vCPUs)
# against the reference plane and a TLS registry on 127.0.0.1, against a bare boot of the same
# kernel measured in the same run. Prints times and ratios; asserts nothing.
#
#   bare        the same kernel, modules and command line, with ironroot-bare-init as /init
#               (powers off at once): QEMU start → QEMU exit
#   cold        a fresh node on a blank virtio disk (ironroot.store=disk:/dev/vda): enrolls,
#               downloads and verifies the base module; QEMU start → the plane answers its
#               `ready` handshake (the time of the plane's log line for it)
#   warm        the same node and disk booted again: certificate and objects are already there
#   soft        (run 1) on the warm node, a root update entered by soft reboot: another build of
#               the base module (from target/image/root.tar, a marker file added) assigned; from
#               staged (the new root assembled at /run/nextroot, its record written) to ready
#               (the root's trial passed and committed): the receipt's steps_ms reboot (the
#               guard started, the soft reboot, systemd and the agent starting in the new root)
#               + attach + gate + commit. Its verify (with the download) and stage are shown
#               beside. Target: soft / warm <= 0.3.
#   ext         (run 1) on the warm node, an `opt` module with a service and a health check
#               attached, then updated to a second version (the store holds the first): from
#               `channel promote` to the committed receipt at the plane, and the node's own parts
#               (receipt steps_ms: verify with its download, stage, swap, health gate, commit)
#   generic     cold and warm again, with Debian's generic kernel (target/kernel-generic: the
#               bare-metal flavour, its initramfs carrying the server NIC and disk drivers) around
#               the same agent and base module; with both initramfs sizes (as booted, and gzip
#               as `just image` ships them). Only measured when target/kernel-generic exists.
#   idle        (run 1) the warm node's agent service with nothing to do for 120 s
#               (BENCH_IDLE_SECONDS), heartbeating at its default 30 s: its resident memory and
#               CPU time as its own reports carry them (node show: agent_rss_kib, agent_cpu_ms).
#               Targets: <= 16 MiB, <= 0.5 % of a core. Under TCG every instruction is emulated,
#               so the CPU share is an upper bound of what the same agent uses on hardware.
#
# The per-phase timings are the node's own (boot.json, sent with the handshake): kernel (to
# /init), modules, network, discover, store, enroll, fetch, verify, mount, and root (hand-off
# to the agent service: switch-root plus systemd). Target: the agent's phases add no more than
# 50% to the bare boot, plus systemd's time in the root: (ready − root) / bare ≤ 1.5.
#
# BENCH_BOOT_RUNS (default 3) runs of each, the best shown; BENCH_BOOT_TIMEOUT (600) s per boot;
# BENCH_BOOT_APPEND adds to the nodes' kernel command line (e.g. ironroot.debug=1);
# BENCH_BOOT_KEEP=1 keeps the consoles.
set -euo pipefail
cd "$(dirname "$0")/.."
STEP_PREFIX=bench-boot
source scripts/lib.sh
source scripts/registry.sh
source scripts/lab.sh

RUNS=${BENCH_BOOT_RUNS:-3}
TIMEOUT=${BENCH_BOOT_TIMEOUT:-600}
IMAGE=target/image
BUILD=target/release/ironroot-build
for needed in "$IMAGE/vmlinuz" "$IMAGE/cmdline" "$IMAGE/base/index.json" "$IMAGE/keys/ironroot.key" \
    target/release/ironroot-agent target/release/ironroot-bare-init target/kernel/kernel.json; do
    [ -e "$needed" ] || { echo "bench-boot: $needed is missing (just image; cargo build --release)" >&2; exit 1; }
done
WORK=$(mktemp -d /var/tmp/ironroot-bench-boot.XXXXXX)
QEMU_PID=
stop_vm() {
    if [ -n "$QEMU_PID" ]; then
        kill "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
        QEMU_PID=
    fi
}
cleanup() {
    local status=$?
    set +e
    stop_vm
    lab_stop
    if [ "$status" = 0 ] && [ -z "${BENCH_BOOT_KEEP:-}" ]; then
        rm -rf "$WORK"
    else
        echo "bench-boot: logs kept in $WORK" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
now_ms() { date +%s%3N; }

step "lab: registry (TLS) and plane on 127.0.0.1"
lab_ca "$WORK/ca"
lab_start "$WORK/lab" "$WORK/ca" --trust "$IMAGE/keys/ironroot.pub"
guest_ref=$(lab_push "$IMAGE/base" "$IMAGE/keys/ironroot.key" ironroot/base)
lab_op template create base --module "$guest_ref,serial=1" >/dev/null

# bundle DIR INIT [KERNEL_DIR]: the kernel (target/kernel's by default) and the image's command
# line with an initramfs around INIT; the node and the bare bundle differ only in /init.
bundle() {
    local kernel=${3:-target/kernel}
    mkdir -p "$1"
    cp "$kernel/vmlinuz" "$1/vmlinuz"
    # The agent's default heartbeat (30 s), as in production: the idle figures depend on it.
    cat "$IMAGE/cmdline" >"$1/cmdline"
    $BUILD initramfs --agent "$2" --kernel "$kernel" --trust "$IMAGE/keys/ironroot.pub" \
        --registry-ca "$WORK/ca/ca.pem" --out "$1/initrd.img" >/dev/null
}
step "initramfs: the agent, and the bare init"
bundle "$WORK/node" target/release/ironroot-agent
bundle "$WORK/bare" target/release/ironroot-bare-init
GENERIC=
if [ -f target/kernel-generic/kernel.json ]; then
    GENERIC=1
    bundle "$WORK/node-generic" target/release/ironroot-agent target/kernel-generic
fi
# initrd_size KIND DIR: the initramfs as booted and as gzip (what `just image` ships).
initrd_size() {
    echo "$1 $(stat -c %s "$2/initrd.img") {\"gzip\": $(gzip -6 -c "$2/initrd.img" | wc -c)}" >>"$WORK/results"
}

# bare_boot N: records the ms from QEMU start to QEMU exit.
bare_boot() {
    local log="$WORK/bare-$1.log" t0 t1
    t0=$(now_ms)
    qemu/boot.sh --timeout 300 --log "$log" "$WORK/bare" >/dev/null 2>&1 || true
    t1=$(now_ms)
    grep -q 'ironroot-bare-init: userspace reached' "$log" || { tail -n 20 "$log" >&2; echo "bench-boot: bare boot failed" >&2; exit 1; }
    echo "bare $((t1 - t0)) {}" >>"$WORK/results"
}

# view NODE FIELD...: fields of the plane's view of NODE, one per line ("" when absent).
view() {
    local node=$1
    shift
    lab_op node show "$node" --json 2>/dev/null | python3 -c '
import json, sys
try:
    v = json.load(sys.stdin)
except ValueError:
    v = {}
for f in sys.argv[1:]:
    x = v.get(f)
    print(json.dumps(x) if isinstance(x, (dict, list)) else ("" if x is None else x))' "$@" || true
}

# handshake_ms BOOT_ID: when the plane answered BOOT_ID's `ready` handshake (ms since the
# epoch, host clock, from its log line), so the result does not depend on the polling interval.
handshake_ms() {
    python3 - "$WORK/lab/plane.log" "$1" <<'PY'
import datetime, re, sys
for line in open(sys.argv[1], errors="replace"):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if "node handshake" in line and f"boot={sys.argv[2]}" in line and "phase=ready" in line:
        at = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
        print(int(at.timestamp() * 1000))
        break
PY
}

# node_boot KIND NODE DISK: boots NODE from DISK until the plane records a `ready` handshake
# with a new boot id; records "KIND MS TIMINGS_JSON" and stops the VM.
node_boot() {
    local kind=$1 node=$2 disk=$3 log="$WORK/$2-$1.log" before t0 t1 boot phase timings why
    before=$(view "$node" boot_id | head -n1)
    t0=$(now_ms)
    qemu/boot.sh --identity "$WORK/$node.json" --forward "$PLANE_PORT" --forward "$REG_PORT" \
        --disk "$disk" --append "ironroot.store=disk:/dev/vda ${BENCH_BOOT_APPEND:-}" --timeout $((TIMEOUT + 60)) --log "$log" \
        "${BUNDLE:-$WORK/node}" >/dev/null 2>&1 &
    QEMU_PID=$!
    while :; do
        { read -r boot; read -r phase; } < <(view "$node" boot_id phase)
        if [ -n "$boot" ] && [ "$boot" != "$before" ] && [ "$phase" = ready ]; then
            t1=$(handshake_ms "$boot")
            [ -n "$t1" ] || { echo "bench-boot: $node: no handshake line for boot $boot in the plane's log" >&2; exit 1; }
            break
        fi
        case "$phase" in failed:*) tail -n 30 "$log" >&2; echo "bench-boot: $node: $phase" >&2; exit 1 ;; esac
        why=""
        kill -0 "$QEMU_PID" 2>/dev/null || why="the VM stopped before ready"
        grep -aq 'Failed to start.*ironroot-a' "$log" 2>/dev/null && why="ironroot-agent.service failed in the root"
        [ "$(now_ms)" -lt $((t0 + TIMEOUT * 1000)) ] || why="no ready handshake within ${TIMEOUT} s"
        if [ -n "$why" ]; then
            tail -n 30 "$log" >&2
            echo "bench-boot: $node: $why" >&2
            exit 1
        fi
        sleep 0.2
    done
    timings=$(view "$node" phase_timings_ms)
    [ -n "${KEEP_VM:-}" ] || stop_vm
    echo "$kind $((t1 - t0)) $timings" >>"$WORK/results"
}

# idle_usage NODE: the agent service's own footprint on NODE (running, nothing to do) as its
# reports carry it: resident memory, and the CPU time it used between two heartbeats
# BENCH_IDLE_SECONDS (120) or more apart, over the plane's times of those heartbeats; records
# "idle 0 {rss_kib, cpu_ms, window_ms}".
idle_usage() {
    local node=$1 beats rss cpu seen cpu0 seen0
    # next_report: waits for a heartbeat after the last one seen; sets rss, cpu, seen.
    next_report() {
        local now_beats
        beats=$(view "$node" heartbeats | head -n1)
        while :; do
            { read -r now_beats; read -r rss; read -r cpu; read -r seen; } < <(view "$node" heartbeats agent_rss_kib agent_cpu_ms last_seen)
            [ "$now_beats" = "$beats" ] || break
            sleep 0.5
        done
        [ -n "$cpu" ] || { echo "bench-boot: $node reports no agent usage" >&2; exit 1; }
    }
    next_report
    cpu0=$cpu seen0=$seen
    sleep "${BENCH_IDLE_SECONDS:-120}"
    next_report
    echo "idle 0 {\"rss_kib\": $rss, \"cpu_ms\": $((cpu - cpu0)), \"window_ms\": $(((seen - seen0) * 1000))}" >>"$WORK/results"
}

# wait_receipt NODE N: waits for NODE's Nth receipt; prints "OUTCOME STEPS_JSON".
wait_receipt() {
    local node=$1 n=$2 deadline receipt
    deadline=$(($(now_ms) + TIMEOUT * 1000))
    while :; do
        receipt=$(lab_op node receipts "$node" --json 2>/dev/null | python3 -c '
import json, sys
rs = json.load(sys.stdin)
if len(rs) >= int(sys.argv[1]):
    r = rs[int(sys.argv[1]) - 1]
    print(r["outcome"], json.dumps(r.get("steps_ms", {})))' "$n" || true)
        [ -z "$receipt" ] || { echo "$receipt"; return; }
        [ "$(now_ms)" -lt "$deadline" ] || { echo "bench-boot: no receipt #$n within ${TIMEOUT} s" >&2; exit 1; }
        sleep 0.5
    done
}

# ext_update NODE: on NODE (running), an `opt` module with a service and a health check is
# attached (template base follows its channel `stable`), then updated to a second version;
# records "ext MS STEPS_JSON" for the update: the host's time from `channel promote` (candidate
# -> stable, and a `module-update` task, so the node does not wait for its next heartbeat) to
# the committed receipt at the plane, and the node's own parts.
ext_update() {
    local node=$1 tree="$WORK/hello" v ref repo t0 receipt seen
    seen=$(lab_op node receipts "$node" --json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))')
    mkdir -p "$tree/bin" "$tree/usr/lib/systemd/system"
    printf '[Unit]\nDescription=bench: a live module\n\n[Service]\nExecStart=/opt/hello/bin/hello\n' \
        >"$tree/usr/lib/systemd/system/hello.service"
    printf '#!/bin/sh\nexit 0\n' >"$tree/bin/check"
    for v in 1 2; do
        printf '#!/bin/sh\necho hello %s\nexec sleep infinity\n' "$v" >"$tree/bin/hello"
        chmod 755 "$tree/bin/hello" "$tree/bin/check"
        $BUILD module build --from "$tree" --name hello --version "$v" --serial "$v" --role opt \
            --unit hello.service --health-cmd /opt/hello/bin/check --out "$WORK/hello-$v" >/dev/null
        ref=$(lab_push "$WORK/hello-$v" "$IMAGE/keys/ironroot.key" ironroot/hello)
        repo=${ref%@*}
        if [ "$v" = 1 ]; then
            lab_op channel set "$repo" stable "${ref#*@}" >/dev/null
            t0=$(now_ms)
            lab_op template add base --module "$repo:stable" >/dev/null
        else
            lab_op channel set "$repo" candidate "${ref#*@}" >/dev/null
            t0=$(now_ms)
            lab_op channel promote "$repo" --from candidate --to stable >/dev/null
        fi
        # Now, rather than at the next heartbeat: the task's long-poll is already waiting.
        lab_op task module-update "$node" >/dev/null
        receipt=$(wait_receipt "$node" $((seen + v)))
        case "$receipt" in
            committed\ *) ;;
            *) echo "bench-boot: hello $v ended $receipt" >&2; exit 1 ;;
        esac
    done
    echo "ext $(($(now_ms) - t0)) ${receipt#committed }" >>"$WORK/results"
}

# soft_update NODE: on NODE (running), a new build of the base module assigned; records
# "soft MS STEPS_MS" from staged to ready (the committed receipt's steps after stage).
soft_update() {
    local node=$1 tree="$WORK/root2" ref deadline receipt
    mkdir -p "$tree"
    tar -C "$tree" --numeric-owner --xattrs -xf "$IMAGE/root.tar"
    echo "bench: root 2" >"$tree/etc/ironroot-bench"
    $BUILD module build --from "$tree" --name base --version bench-2 --serial 2 --out "$WORK/base2" >/dev/null
    rm -rf "$tree"
    ref=$(lab_push "$WORK/base2" "$IMAGE/keys/ironroot.key" ironroot/base)
    lab_op template add base --module "$ref,serial=2" >/dev/null
    lab_op task module-update "$node" >/dev/null
    deadline=$(($(now_ms) + TIMEOUT * 1000))
    while :; do
        receipt=$(lab_op node receipts "$node" --json 2>/dev/null | python3 -c '
import json, sys
for r in json.load(sys.stdin):
    if r.get("module") == "base" and r.get("role") == "root":
        steps = r.get("steps_ms") or {}
        after = sum(v for k, v in steps.items() if k not in ("verify", "stage"))
        # Without its reboot part the sum would read as a soft reboot that took no time.
        outcome = r["outcome"] if "reboot" in steps or r["outcome"] != "committed" else "committed-without-a-reboot-part"
        print(outcome, after, json.dumps(steps, separators=(",", ":")))
        break' || true)
        case "$receipt" in
            committed\ *) break ;;
            ?*) tail -n 30 "$WORK/$node-warm.log" >&2; echo "bench-boot: the root update ended $receipt" >&2; exit 1 ;;
        esac
        [ "$(now_ms)" -lt "$deadline" ] || { echo "bench-boot: no root receipt within ${TIMEOUT} s" >&2; exit 1; }
        sleep 1
    done
    echo "soft ${receipt#committed }" >>"$WORK/results"
}

: >"$WORK/results"
initrd_size size-cloud "$WORK/node"
[ -z "$GENERIC" ] || initrd_size size-generic "$WORK/node-generic"
for i in $(seq "$RUNS"); do
    step "run $i/$RUNS: bare"
    bare_boot "$i"
    node="bench-$i"
    lab_identity "$WORK/$node.json" "$node" base
    truncate -s 4G "$WORK/$node.disk"
    step "run $i/$RUNS: cold store"
    node_boot cold "$node" "$WORK/$node.disk"
    step "run $i/$RUNS: warm store"
    if [ "$i" = 1 ]; then
        KEEP_VM=1 node_boot warm "$node" "$WORK/$node.disk"
        step "run 1: the agent idle, heartbeating"
        idle_usage "$node"
        # The root update first: a live module attached would be attached again (with its own
        # health gate) in the new root, which a warm reboot of a node without one does not pay.
        step "run 1: root update by soft reboot"
        soft_update "$node"
        step "run 1: an extension module attached, then updated"
        ext_update "$node"
        stop_vm
    else
        node_boot warm "$node" "$WORK/$node.disk"
    fi
    rm -f "$WORK/$node.disk"
    if [ -n "$GENERIC" ]; then
        node="bench-generic-$i"
        lab_identity "$WORK/$node.json" "$node" base
        truncate -s 4G "$WORK/$node.disk"
        step "run $i/$RUNS: generic kernel, cold and warm store"
        BUNDLE=$WORK/node-generic node_boot generic-cold "$node" "$WORK/$node.disk"
        BUNDLE=$WORK/node-generic node_boot generic-warm "$node" "$WORK/$node.disk"
        rm -f "$WORK/$node.disk"
    fi
done

python3 - "$WORK/results" "$RUNS" <<'PY'
import json, sys
runs = {}
for line in open(sys.argv[1]):
    kind, ms, timings = line.split(" ", 2)
    runs.setdefault(kind, []).append((int(ms), json.loads(timings)))
best = {k: min(v, key=lambda r: r[0]) for k, v in runs.items()}
bare = best["bare"][0]
phases = ["kernel", "modules", "network", "discover", "store", "enroll", "fetch", "verify", "mount", "root"]
agent = phases[1:-1]
print(f"\nboot to ready (QEMU TCG, 2 vCPUs; best of {sys.argv[2]} runs; seconds)")
print(f"{'':6} {'ready':>7} " + " ".join(f"{p:>8}" for p in phases))
s = lambda ms: f"{ms / 1000:.2f}"
print(f"{'bare':6} {s(bare):>7}   (QEMU start to power-off with a trivial /init)")
for kind in ("cold", "warm", "generic-cold", "generic-warm"):
    if kind not in best:
        continue
    ms, t = best[kind]
    label = kind.replace("generic-", "g-")
    print(f"{label:6} {s(ms):>7} " + " ".join(f"{s(t[p]) if p in t else '-':>8}" for p in phases))
print()
if "size-generic" in best:
    (cloud, cz), (generic, gz) = best["size-cloud"], best["size-generic"]
    mib = lambda b: f"{b / 1048576:.1f} MiB"
    print(f"initramfs: cloud {mib(cloud)} ({mib(cz['gzip'])} gzip), generic {mib(generic)} ({mib(gz['gzip'])} gzip) "
          f"= {generic / cloud:.2f}x ({gz['gzip'] / cz['gzip']:.2f}x gzip)")
    for kind in ("cold", "warm"):
        c, g = best[kind], best[f"generic-{kind}"]
        print(f"generic vs cloud kernel, {kind} boot to ready: {s(g[0])} s / {s(c[0])} s = {g[0] / c[0]:.2f}x; "
              f"modules {s(g[1].get('modules', 0))} s vs {s(c[1].get('modules', 0))} s")
    print()
for kind in ("cold", "warm"):
    ms, t = best[kind]
    own = sum(t.get(p, 0) for p in agent)
    ratio = (ms - t.get("root", 0)) / bare
    print(f"{kind}: agent phases {s(own)} s = {own / bare:.2f}x bare; (ready - root) / bare = {ratio:.2f}  target <= 1.50")
if "idle" in best:
    u = best["idle"][1]
    cpu = u["cpu_ms"] / u["window_ms"] * 100
    print(f"idle agent (warm node, heartbeating every 30 s, a task long-poll always open): RSS {u['rss_kib'] / 1024:.1f} MiB = "
          f"{u['rss_kib'] / 16384:.2f}x the 16 MiB target; CPU {cpu:.2f} % of a core over "
          f"{u['window_ms'] / 1000:.0f} s = {cpu / 0.5:.2f}x the 0.5 % target")
if "ext" in best:
    ms, parts = best["ext"]
    total = sum(parts.values())
    order = ["verify", "stage", "swap", "gate", "commit"]
    print(f"ext: extension update (warm store, v1 -> v2): channel promote + module-update task to committed receipt at the "
          f"plane {s(ms)} s; on the node {s(total)} s = " + " + ".join(f"{p} {s(parts.get(p, 0))}" for p in order))
if "soft" in best:
    (soft, parts), warm = best["soft"], best["warm"][0]
    order = ["reboot", "attach", "gate", "commit"]
    print(f"soft: root update by soft reboot, staged to ready {s(soft)} s = "
          + " + ".join(f"{p} {s(parts.get(p, 0))}" for p in order)
          + f" (before it: verify {s(parts.get('verify', 0))}, stage {s(parts.get('stage', 0))}); "
          f"soft / warm reboot = {soft / warm:.2f}  target <= 0.30")
PY
