#!/usr/bin/env bash
# Installs every tool the tests, the demo and the benchmarks need, idempotently.
#
# - Debian packages from the system's own sources (docker-registry, htpasswd, openssl, ...).
# - `just` from PyPI (rust-just).
# - cosign 2.x (trixie) and mkcomposefs (sid) are not in bookworm: their .debs are fetched with a
#   temporary apt configuration that reuses the system's own mirror, and unpacked with `dpkg -x`
#   into $IRONROOT_TOOLS. The system's apt sources are never changed.
#
# Prints nothing but progress; exits non-zero naming the step that failed.
set -euo pipefail

TOOLS=${IRONROOT_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/ironroot/tools}
mkdir -p "$TOOLS/bin"

STEP_PREFIX=deps
source "$(dirname "$0")/lib.sh"

apt_updated=0
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ $apt_updated -eq 0 ]; then
        step "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    step "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Downloads packages from another suite into $TOOLS/debs/SUITE with a private apt state.
fetch_debs() {
    local suite=$1; shift
    local dir="$TOOLS/apt-$suite"
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/debs"
    printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
        "$(debian_mirror)" "$suite" >"$dir/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o "Dir::State::Status=/dev/null"
        -o "APT::Get::List-Cleanup=0" -o "APT::Sandbox::User=root")
    step "apt-get update ($suite, private state)"
    apt-get "${opts[@]}" update -qq
    step "apt-get download $* ($suite)"
    (cd "$dir/debs" && apt-get "${opts[@]}" download "$@" >/dev/null)
    for deb in "$dir"/debs/*.deb; do dpkg -x "$deb" "$TOOLS/root-$suite"; done
}

# 1. Debian packages of the build machine's own suite.
apt_install docker-registry apache2-utils openssl ca-certificates python3-pip bc tar e2fsprogs util-linux mount ovmf

# 2. just
if ! command -v just >/dev/null 2>&1; then
    step "pip install rust-just"
    python3 -m pip install --quiet rust-just 2>/dev/null || python3 -m pip install --quiet --break-system-packages rust-just
fi

# 3. cosign 2.x from trixie.
if [ ! -x "$TOOLS/bin/cosign" ]; then
    fetch_debs trixie cosign
    ln -sf "$TOOLS/root-trixie/usr/bin/cosign" "$TOOLS/bin/cosign"
fi

# 4. mkcomposefs from sid, run through sid's own loader and libraries.
if [ ! -x "$TOOLS/bin/mkcomposefs" ]; then
    fetch_debs sid composefs libcomposefs1 libc6 libssl3t64
    root="$TOOLS/root-sid"
    cat >"$TOOLS/bin/mkcomposefs" <<WRAP
#!/bin/sh
exec "$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu" "$root/usr/bin/mkcomposefs" "\$@"
WRAP
    chmod +x "$TOOLS/bin/mkcomposefs"
fi

# 5. QEMU 10 and iPXE from bookworm-backports (bookworm's QEMU 7.2 crashes 6.12 guests under
#    TCG), installed through a private source list and list state that add backports to the
#    system's own suites; /etc/apt is not changed.
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'; }
if [ "$(qemu_major)" != 10 ] || ! dpkg-query -W -f='${Status}' ipxe-qemu 2>/dev/null | grep -q 'ok installed'; then
    dir="$TOOLS/apt-backports"
    mkdir -p "$dir/lists/partial"
    mirror=$(debian_mirror)
    printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
        "$mirror" bookworm "$mirror" bookworm-updates "$mirror" bookworm-backports >"$dir/sources.list"
    opts=(-o "Dir::Etc::SourceList=$dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$dir/lists" -o "APT::Get::List-Cleanup=0" -o "APT::Sandbox::User=root")
    step "apt-get update (bookworm + backports, private lists)"
    apt-get "${opts[@]}" update -qq
    step "apt-get install -t bookworm-backports qemu-system-x86 ipxe-qemu"
    DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" install -y -qq --no-install-recommends \
        -t bookworm-backports qemu-system-x86 qemu-utils ipxe-qemu >/dev/null
fi
[ "$(qemu_major)" = 10 ] || { echo "deps: qemu-system-x86_64 is not QEMU 10" >&2; exit 1; }

# 6. Image building: debootstrap (base module), kmod (depmod), and the tools the kernel fetch uses.
apt_install debootstrap kmod dpkg-dev zstd netcat-openbsd

"$TOOLS/bin/cosign" version >/dev/null 2>&1 || { echo "deps: cosign does not run" >&2; exit 1; }
case "$("$TOOLS/bin/mkcomposefs" --help 2>&1 || true)" in
    *--min-version*) ;;
    *) echo "deps: mkcomposefs does not run" >&2; exit 1 ;;
esac
step "tools ready in $TOOLS/bin"
