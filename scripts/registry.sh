# Sourced by demo.sh and bench.sh: puts the project's tools on PATH and starts a distribution
# registry on 127.0.0.1 with storage under a given directory. Sets REG_PID and REG_PORT; the
# caller's EXIT trap stops it with stop_registry. REGISTRY_TLS=CERT:KEY makes it serve TLS.

TOOLS=${IRONROOT_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/ironroot/tools}
export PATH="$TOOLS/bin:$PATH"
REG_PID=
REG_PORT=

start_registry() {
    local dir=$1
    mkdir -p "$dir/storage"
    cat >"$dir/registry.yml" <<YML
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $dir/storage
http:
  addr: 127.0.0.1:0
YML
    # REGISTRY_TLS=CERT:KEY serves TLS.
    if [ -n "${REGISTRY_TLS:-}" ]; then
        printf '  tls:\n    certificate: %s\n    key: %s\n' "${REGISTRY_TLS%%:*}" "${REGISTRY_TLS#*:}" >>"$dir/registry.yml"
    fi
    docker-registry serve "$dir/registry.yml" >"$dir/registry.log" 2>&1 &
    REG_PID=$!
    for _ in $(seq 100); do grep -q 'listening on' "$dir/registry.log" && break; sleep 0.1; done
    REG_PORT=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$dir/registry.log" | head -n1 | cut -d: -f2 || true)
    if [ -z "$REG_PORT" ]; then
        echo "the registry did not start:" >&2
        cat "$dir/registry.log" >&2
        return 1
    fi
}

stop_registry() {
    if [ -n "$REG_PID" ]; then
        kill "$REG_PID" 2>/dev/null || true
        wait "$REG_PID" 2>/dev/null || true
    fi
}
