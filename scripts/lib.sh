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

