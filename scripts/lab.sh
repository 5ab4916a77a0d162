# Sourced by lab-up.sh, lab-down.sh and bench-boot.sh: a lab on 127.0.0.1 that a QEMU guest
# reaches as 10.0.2.100 (qemu/boot.sh --forward, or the plane's QEMU provider): a TLS
# distribution registry and the reference plane. Needs registry.sh sourced first (but for the
# lab_*recorded functions). The caller's EXIT trap calls lab_stop.
#
#   lab_ca DIR              a lab CA and a registry certificate naming 127.0.0.1 and 10.0.2.100
#                           (kept: an initramfs that embeds the CA stays usable)
#   lab_start DIR CA_DIR [PLANE SERVE ARGS...]
#                           registry (TLS) + plane; sets REG_PORT, PLANE_PORT, PLANE_STATE. The
#                           plane trusts the lab CA and reads the guests' 10.0.2.100:REG_PORT at
#                           127.0.0.1:REG_PORT (--registry-alias), so channels work on the
#                           references guests fetch (give --trust KEY.pub for them)
#   lab_op ARGS...          the operator CLI against the lab's plane
#   lab_push LAYOUT KEY REPO
#                           pushes and signs LAYOUT's module; prints the guest's reference
#   lab_identity FILE NODE TEMPLATE
#                           a bootstrap token for NODE, written with the plane and its CA as
#                           the fw_cfg identity document FILE
#   lab_stop                stops what lab_start started, by PID
#   lab_record FILE PID     records a process left running as "PID START-TIME" in FILE
#   lab_running FILE        whether FILE's process is still that process
#   lab_stop_recorded FILE  SIGTERM to FILE's process (if it is still that process), waits for
#                           it to end (SIGKILL after 60 s), removes FILE

LAB_PLANE=${LAB_PLANE:-target/release/ironroot-plane}
LAB_BUILD=${LAB_BUILD:-target/release/ironroot-build}
PLANE_PID=
PLANE_PORT=
PLANE_STATE=

lab_ca() {
    local dir=$1
    [ -f "$dir/registry.pem" ] && return 0
    mkdir -p "$dir"
    (cd "$dir" &&
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem \
            -days 3650 -subj "/CN=ironroot lab CA" -addext basicConstraints=critical,CA:TRUE \
            -addext keyUsage=critical,keyCertSign 2>/dev/null &&
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout registry.key -out registry.csr \
            -subj "/CN=ironroot lab registry" 2>/dev/null &&
        printf 'subjectAltName=IP:127.0.0.1,IP:10.0.2.100\nextendedKeyUsage=serverAuth\n' >ext.cnf &&
        openssl x509 -req -in registry.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile ext.cnf -out registry.pem 2>/dev/null)
}

lab_start() {
    local dir=$1 ca=$2
    shift 2
    rm -rf "$dir/registry" "$dir/plane"
    mkdir -p "$dir"
    LAB_CA_DIR=$ca
    REGISTRY_TLS="$ca/registry.pem:$ca/registry.key" start_registry "$dir/registry"
    PLANE_STATE=$dir/plane
    $LAB_PLANE serve --state "$PLANE_STATE" --listen 127.0.0.1:0 --name 10.0.2.100 --registry-ca "$ca/ca.pem" \
        --registry-alias "10.0.2.100:$REG_PORT=127.0.0.1:$REG_PORT" "$@" >"$dir/plane.log" 2>&1 &
    PLANE_PID=$!
    for _ in $(seq 100); do [ -s "$PLANE_STATE/address" ] && break; sleep 0.1; done
    if [ ! -s "$PLANE_STATE/address" ]; then
        cat "$dir/plane.log" >&2
        echo "the plane did not start" >&2
        return 1
    fi
    PLANE_PORT=$(cut -d: -f2 <"$PLANE_STATE/address")
}

lab_op() { $LAB_PLANE --state "$PLANE_STATE" "$@"; }

lab_push() {
    local layout=$1 key=$2 repo=$3 reference
    reference=$($LAB_BUILD module push --registry-ca "$LAB_CA_DIR/ca.pem" "$layout" "127.0.0.1:$REG_PORT/$repo:1")
    $LAB_BUILD module sign --registry-ca "$LAB_CA_DIR/ca.pem" "$reference" --key "$key" >/dev/null
    printf '10.0.2.100:%s/%s@%s' "$REG_PORT" "$repo" "${reference#*@}"
}

lab_identity() {
    local file=$1 node=$2 template=$3 token
    token=$(lab_op token create --node "$node" --template "$template")
    python3 - "$file" "https://10.0.2.100:$PLANE_PORT" "$token" "$node" "$PLANE_STATE/ca.pem" <<'PY'
import json, sys
path, plane, token, node, ca = sys.argv[1:]
json.dump({"plane": plane, "token": token, "node": node, "plane_ca": open(ca).read()}, open(path, "w"))
PY
}

lab_stop() {
    if [ -n "$PLANE_PID" ]; then
        kill "$PLANE_PID" 2>/dev/null || true
        wait "$PLANE_PID" 2>/dev/null || true
    fi
    stop_registry
}

# A process's start time (clock ticks since boot): with the PID, it names one process.
lab_started() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null; }

lab_record() { echo "$2 $(lab_started "$2")" >"$1"; }

lab_running() {
    local pid start
    [ -f "$1" ] || return 1
    read -r pid start <"$1"
    [ -n "$pid" ] && [ "$(lab_started "$pid")" = "$start" ]
}

lab_stop_recorded() {
    local pid start
    if lab_running "$1"; then
        read -r pid start <"$1"
        kill "$pid"
        for _ in $(seq 600); do lab_running "$1" || break; sleep 0.1; done
        if lab_running "$1"; then
            echo "lab: $pid did not stop within 60 s; killing it" >&2
            kill -KILL "$pid"
        fi
    fi
    rm -f "$1"
}
