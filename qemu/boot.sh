#!/usr/bin/env bash
# Boots an ironroot bundle (the output of `just image`) in QEMU, under TCG, with a hard timeout.
#
#   qemu/boot.sh [options] BUNDLE_DIR
#     --identity FILE     JSON identity document, given to the guest over fw_cfg
#                         (opt/ironroot/identity)
#     --smbios K=V        a type 11 OEM string io.ironroot.K=V (repeatable); with --uuid/--serial
#     --uuid U --serial S SMBIOS type 1 product UUID and serial
#     --forward PORT      guest 10.0.2.100:PORT reaches host 127.0.0.1:PORT (repeatable); the
#                         guest can reach nothing else (slirp restrict=on)
#     --pxe               true PXE: the NIC's iPXE loads boot.ipxe over slirp TFTP
#     --disk FILE         a virtio disk (e.g. /persist)
#     --append STR        extra kernel command line (direct boot only)
#     --timeout S         hard limit (default 600); QEMU is killed after it
#     --log FILE          serial console log (default BUNDLE_DIR/console.log)
#     --memory MiB        default 2048
#
# Exit: QEMU's status (0 after the guest powered off or rebooted, -no-reboot), 124 on timeout.
set -euo pipefail

identity="" uuid="" serial="" pxe=0 disk="" append="" timeout=600 log="" memory=2048
forwards=() oem=()
while [ $# -gt 1 ]; do
    case "$1" in
        --identity) identity=$2; shift 2 ;;
        --smbios) oem+=("$2"); shift 2 ;;
        --uuid) uuid=$2; shift 2 ;;
        --serial) serial=$2; shift 2 ;;
        --forward) forwards+=("$2"); shift 2 ;;
        --pxe) pxe=1; shift ;;
        --disk) disk=$2; shift 2 ;;
        --append) append=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --log) log=$2; shift 2 ;;
        --memory) memory=$2; shift 2 ;;
        *) echo "qemu/boot.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
bundle=${1:?usage: qemu/boot.sh [options] BUNDLE_DIR}
log=${log:-$bundle/console.log}
for f in vmlinuz initrd.img cmdline; do
    [ -f "$bundle/$f" ] || { echo "qemu/boot.sh: $bundle/$f is missing (run just image)" >&2; exit 2; }
done

netdev="user,id=n0,restrict=on"
for p in "${forwards[@]}"; do
    netdev+=",guestfwd=tcp:10.0.2.100:$p-cmd:nc 127.0.0.1 $p"
done
args=(-accel tcg -M q35 -cpu max -smp 2 -m "$memory" -no-reboot -display none -monitor none
    -serial "file:$log" -device virtio-rng-pci)
if [ $pxe = 1 ]; then
    netdev+=",tftp=$bundle,bootfile=boot.ipxe"
    args+=(-boot n)
else
    args+=(-kernel "$bundle/vmlinuz" -initrd "$bundle/initrd.img" -append "$(cat "$bundle/cmdline") $append")
fi
args+=(-netdev "$netdev" -device virtio-net-pci,netdev=n0)
[ -n "$identity" ] && args+=(-fw_cfg "name=opt/ironroot/identity,file=$identity")
smbios1=""
[ -n "$uuid" ] && smbios1+=",uuid=$uuid"
[ -n "$serial" ] && smbios1+=",serial=$serial"
[ -n "$smbios1" ] && args+=(-smbios "type=1$smbios1")
for kv in "${oem[@]}"; do args+=(-smbios "type=11,value=io.ironroot.$kv"); done
[ -n "$disk" ] && args+=(-drive "file=$disk,if=virtio,format=raw")

exec timeout --kill-after=10 "$timeout" qemu-system-x86_64 "${args[@]}"
