#!/usr/bin/env bash
# `just image [KERNEL=cloud|generic]`: everything a node boots, in $IRONROOT_IMAGE (default
# target/image, or target/image-generic for the generic kernel):
#
#   vmlinuz       the kernel (`ironroot-build kernel fetch`): Debian's cloud kernel (virtual
#                 hardware) or, KERNEL=generic, its generic one (bare-metal NICs and disks)
#   initrd.img    the native initramfs (`ironroot-build initramfs`): the agent as /init
#   cmdline       the kernel command line the bundle was built for
#   boot.ipxe     an iPXE script that boots the three above from the same directory
#   base/         the signed base module (an OCI layout): debootstrap of Debian 13 (trixie) with
#                 systemd 257, udev, dbus, iproute2 and the agent with its unit
#   root.tar      the node root the base module was built from (the QEMU tier builds root updates
#                 from it)
#   keys/         the module signing key pair (kept across builds; the .pub is in the initramfs)
#   bundle.json   every artifact's digest, the kernel release, the module reference
#
# IRONROOT_REGISTRY=HOST:PORT/REPO pushes and signs the base module there too
# (IRONROOT_REGISTRY_CA: its CA, embedded in the initramfs; the registry is then used over TLS).
# The debootstrap result is cached under ~/.cache/ironroot/debootstrap, keyed by its inputs.
set -euo pipefail
STEP_PREFIX=image
source "$(dirname "$0")/lib.sh"

kernel_flavour "$@"
OUT=${IRONROOT_IMAGE:-$KERNEL_IMAGE}
# trixie for systemd >= 254 (SoftReboot); the kernel comes from the same suite. Beyond minbase:
# dbus for the system bus the agent drives systemd over (systemd only recommends one, and
# debootstrap installs no recommends); e2fsprogs, no longer Priority: required in trixie
# (fsck/tune2fs for /persist, filefrag for the VM tier's verity probe).
SUITE=trixie
PACKAGES=systemd,systemd-sysv,udev,dbus,iproute2,ca-certificates,kmod,e2fsprogs
SERIAL=${IRONROOT_BASE_SERIAL:-1}
BIN=target/release/ironroot-build
AGENT=target/release/ironroot-agent
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/ironroot

step "building ironroot-build and ironroot-agent (release)"
# The same package set as `just demo` builds, so features unify the same way and nothing is rebuilt.
cargo build --release --locked -p ironroot-build -p ironroot-agent -p ironroot-plane
# After cargo: C build scripts rerun when SOURCE_DATE_EPOCH changes, so exporting it before
# would rebuild aws-lc and zstd each time a plain `cargo build` ran in between.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
mkdir -p "$OUT"

step "kernel ($KERNEL)"
$BIN kernel fetch --suite "$SUITE" --flavour "$KERNEL" --out "$KERNEL_DIR" >&2

if [ ! -f "$OUT/keys/ironroot.key" ]; then
    $BIN keys generate --out "$OUT/keys" >/dev/null
fi

# 1. The base root: debootstrap, cached by suite, packages, mirror and debootstrap's version.
mirror=$(debian_mirror)
key=$(printf '%s\n' "$SUITE" "$PACKAGES" "$mirror" "$(dpkg-query -W -f='${Version}' debootstrap)" | sha256sum | cut -c1-16)
tarball="$CACHE/debootstrap/$SUITE-$key.tar"
if [ ! -f "$tarball" ]; then
    step "debootstrap $SUITE ($PACKAGES), cached as $tarball"
    mkdir -p "$CACHE/debootstrap"
    tmp=$(mktemp -d "$CACHE/debootstrap/.root.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp" "$mirror" >"$tmp.log" 2>&1 \
        || { tail -n 20 "$tmp.log" >&2; echo "image: debootstrap failed (log: $tmp.log)" >&2; exit 1; }
    # Nothing a booted root needs: package caches and lists, and /dev (devtmpfs is mounted).
    rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/* "$tmp"/dev/* "$tmp"/var/log/*.log
    tar -C "$tmp" --numeric-owner --xattrs -cf "$tarball.partial" .
    mv "$tarball.partial" "$tarball"
    rm -rf "$tmp" "$tmp.log"
    trap - EXIT
fi

# 2. The node root: the cached base + the agent, its unit, and a few node settings.
root=$(mktemp -d "${TMPDIR:-/tmp}/ironroot-root.XXXXXX")
trap 'rm -rf "$root"' EXIT
tar -C "$root" --numeric-owner --xattrs -xf "$tarball"
install -m 0755 "$AGENT" "$root/usr/bin/ironroot-agent"
# Built against the host's (bookworm's) glibc: it must load with the root's own loader and libraries.
chroot "$root" /usr/bin/ironroot-agent --version >/dev/null \
    || { echo "image: the agent does not run in the $SUITE root" >&2; exit 1; }
install -m 0644 dist/systemd/ironroot-agent.service "$root/etc/systemd/system/ironroot-agent.service"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants" "$root/usr/share/doc/ironroot"
ln -sf ../ironroot-agent.service "$root/etc/systemd/system/multi-user.target.wants/ironroot-agent.service"
install -m 0644 docs/interfaces/run-state.md "$root/usr/share/doc/ironroot/run-state.md"
echo ironroot-node >"$root/etc/hostname"
: >"$root/etc/machine-id"
# The root is complete as built (the packages' scripts ran ldconfig, sysusers, hwdb and the
# journal catalog). /etc and /var marked updated as of /usr (the module build gives all three the
# same mtime) spare every boot, and every soft reboot, systemd's ConditionNeedsUpdate= units:
# ldconfig, sysusers, journal-catalog-update and update-done sat on the way to sysinit.target.
for dir in etc var; do
    printf '# Marks /%s as up to date with /usr (systemd-update-done.service(8)).\n' "$dir" >"$root/$dir/.updated"
done
# The initramfs configured the network; nothing in the root may take it down.
ln -sf /dev/null "$root/etc/systemd/system/systemd-networkd.service"
# Nothing of a disk-installed, package-managed system runs on a root that is a verified,
# immutable module: no apt or dpkg timers (an update is a new module), no ext4 metadata scrubs
# (e2scrub needs LVM; the root is not ext4). Nor do the generators of what such a root never
# has: a root found on a GPT disk, a hibernation image, SysV scripts, rc.local, offline
# updates, sshd on vsock. Each is a process at every boot and every soft reboot, before
# systemd queues its first job. fstab, getty, debug, run and tpm2 stay.
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service; do
    rm -f "$root"/etc/systemd/system/*.wants/"$unit"
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
mkdir -p "$root/etc/systemd/system-generators"
for gen in gpt-auto hibernate-resume sysv rc-local ssh system-update; do
    [ -e "$root/usr/lib/systemd/system-generators/systemd-$gen-generator" ] || continue
    ln -sf /dev/null "$root/etc/systemd/system-generators/systemd-$gen-generator"
done

# The node root as a tar too: the QEMU tier builds root updates (another version of the base,
# a root whose unit fails) from it.
tar -C "$root" --numeric-owner --xattrs -cf "$OUT/root.tar.partial" . && mv "$OUT/root.tar.partial" "$OUT/root.tar"

step "base module"
rm -rf "$OUT/base"
$BIN --output json module build --from "$root" --name base --version "$SUITE-$key" --serial "$SERIAL" \
    --mtime "$SOURCE_DATE_EPOCH" --out "$OUT/base" >"$OUT/base.json"
rm -rf "$root"
trap - EXIT

# 3. The initramfs and the boot files.
step "initramfs"
registry_ca=()
[ -n "${IRONROOT_REGISTRY_CA:-}" ] && registry_ca=(--registry-ca "$IRONROOT_REGISTRY_CA")
# gzip: the bundle is for netbooting, where the smaller file wins (measured, README: PXE reaches
# /init ~1.2 s sooner with 8 MiB gzip than 21 MiB raw; direct boot is ~0.05–0.4 s slower).
$BIN --output json initramfs --agent "$AGENT" --kernel "$KERNEL_DIR" --trust "$OUT/keys/ironroot.pub" \
    "${registry_ca[@]}" --compression gzip --out "$OUT/initrd.img" >"$OUT/initrd.json"
python3 - "$OUT/initrd.json" >&2 <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
print(f"image: initramfs {b['bytes']} bytes ({b['uncompressed_bytes']} uncompressed), {b['flavour']} kernel "
      f"{b['release']}: {len(b['modules'])} modules, {len(b['hardware'])} drivers loaded by modalias"
      + (f"; not in this kernel: {' '.join(b['skipped'])}" if b['skipped'] else ""))
PY
cp "$KERNEL_DIR/vmlinuz" "$OUT/vmlinuz"
# Both consoles: a BMC's serial-over-LAN (ttyS0, the last one named, is /dev/console) and a
# screen (tty0).
cmdline="console=tty0 console=ttyS0,115200 panic=-1 oops=panic ironroot.trust=/etc/ironroot/trust.pem"
echo "$cmdline" >"$OUT/cmdline"
# Relative names resolve against where the script came from: TFTP (BIOS or UEFI iPXE) or
# http:// (UEFI HTTP boot, an iPXE chained over HTTP). initrd= lets a UEFI kernel's EFI stub
# find the initrd when iPXE is too old to hand it over itself; BOOTIF names the NIC iPXE
# booted from (the node runs DHCP on that one first). bootmethod=ipxe is for the eyes.
cat >"$OUT/boot.ipxe" <<IPXE
#!ipxe
# Boots the ironroot bundle from the directory (TFTP or HTTP) this script was loaded from.
kernel vmlinuz initrd=initrd.img $cmdline bootmethod=ipxe BOOTIF=01-\${netX/mac:hexhyp} \${ironroot_extra}
initrd initrd.img
boot
IPXE

reference=""
if [ -n "${IRONROOT_REGISTRY:-}" ]; then
    step "pushing and signing the base module to $IRONROOT_REGISTRY"
    reg_opts=()
    [ -n "${IRONROOT_REGISTRY_CA:-}" ] && reg_opts=(--registry-ca "$IRONROOT_REGISTRY_CA")
    reference=$($BIN module push "${reg_opts[@]}" "$OUT/base" "$IRONROOT_REGISTRY:$SUITE-$key")
    $BIN module sign "${reg_opts[@]}" "$reference" --key "$OUT/keys/ironroot.key" >/dev/null
fi

KERNEL=$KERNEL KERNEL_DIR=$KERNEL_DIR python3 - "$OUT" "$reference" <<'PY'
import hashlib, json, os, sys
out, reference = sys.argv[1], sys.argv[2]
def sha(p):
    h = hashlib.sha256()
    with open(os.path.join(out, p), 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return 'sha256:' + h.hexdigest()
kernel = json.load(open(os.path.join(os.environ['KERNEL_DIR'], 'kernel.json')))
base = json.load(open(os.path.join(out, 'base.json')))
bundle = {
    'kernel': {'file': 'vmlinuz', 'digest': sha('vmlinuz'), 'flavour': os.environ['KERNEL'], 'package': kernel['package'],
               'version': kernel['version'], 'release': kernel['release']},
    'initramfs': {'file': 'initrd.img', 'digest': sha('initrd.img')},
    'cmdline': open(os.path.join(out, 'cmdline')).read().strip(),
    'ipxe': {'file': 'boot.ipxe', 'digest': sha('boot.ipxe')},
    'base_module': {'layout': 'base', 'digest': base['digest'], 'reference': reference or None},
    'trust': {'file': 'keys/ironroot.pub', 'digest': sha('keys/ironroot.pub')},
}
json.dump(bundle, open(os.path.join(out, 'bundle.json'), 'w'), indent=2)
print(json.dumps(bundle, indent=2))
PY
