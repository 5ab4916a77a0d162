#!/usr/bin/env bash
# Helpers shared by the scripts (sourced, not run).

step() { printf '%s: %s\n' "${STEP_PREFIX:-ironroot}" "$*" >&2; }

# The system's Debian mirror, read from its own configuration so no host is named here.
debian_mirror() {
    local uri
    uri=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1=="deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || { echo "cannot find the Debian mirror in /etc/apt" >&2; exit 1; }
    printf '%s' "$uri"
}


# kernel_flavour ARGS...: reads KERNEL=cloud|generic from the arguments (or the environment;
# default cloud) and sets KERNEL, KERNEL_DIR (what `kernel fetch` writes) and KERNEL_IMAGE (the
# bundle `just image` writes for it).
kernel_flavour() {
    KERNEL=${KERNEL:-cloud}
    local arg
    for arg in "$@"; do
        case "$arg" in
            KERNEL=*) KERNEL=${arg#KERNEL=} ;;
            *) echo "${STEP_PREFIX:-ironroot}: unknown argument $arg (KERNEL=cloud|generic)" >&2; exit 2 ;;
        esac
    done
    case "$KERNEL" in
        cloud) KERNEL_DIR=target/kernel KERNEL_IMAGE=target/image ;;
        generic) KERNEL_DIR=target/kernel-generic KERNEL_IMAGE=target/image-generic ;;
        *) echo "${STEP_PREFIX:-ironroot}: KERNEL=$KERNEL is neither cloud nor generic" >&2; exit 2 ;;
    esac
}
