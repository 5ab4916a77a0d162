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
#     --nic MODEL[,OPT…]  a NIC (repeatable; default one virtio): MODEL virtio|e1000e|igb|e1000;
#                         OPTs: mac=MAC (default 52:54:00:12:34:56, :57, … in order), isolated
#                         (its own slirp network reaching nothing: no forwards), boot (the NIC
#                         --pxe boots from; default the first that is not isolated)
#     --pxe               true PXE: the boot NIC's iPXE loads boot.ipxe over slirp TFTP
#     --pxe-url URL       the same over HTTP: DHCP names URL (http://10.0.2.100:PORT/boot.ipxe,
#                         PORT forwarded) as the boot file, iPXE fetches it and the files it names
#     --uefi              UEFI firmware (OVMF, Debian's ovmf) instead of SeaBIOS
#     --disk FILE         a disk (e.g. /persist), on --disk-bus virtio (/dev/vda, default),
#                         nvme (/dev/nvme0n1) or ahci (/dev/sda)
#     --append STR        extra kernel command line (direct boot only)
#     --timeout S         hard limit (default 600); QEMU is killed after it
#     --log FILE          serial console log (default BUNDLE_DIR/console.log)
#     --memory MiB        default 2048
#
# Exit: QEMU's status (0 after the guest powered off or rebooted, -no-reboot), 124 on timeout.
set -euo pipefail

identity="" uuid="" serial="" pxe=0 pxe_url="" uefi=0 disk="" disk_bus=virtio append="" timeout=600 log="" memory=2048
forwards=() oem=() nics=()
while [ $# -gt 1 ]; do
    case "$1" in
        --identity) identity=$2; shift 2 ;;
        --smbios) oem+=("$2"); shift 2 ;;
        --uuid) uuid=$2; shift 2 ;;
        --serial) serial=$2; shift 2 ;;
        --forward) forwards+=("$2"); shift 2 ;;
        --nic) nics+=("$2"); shift 2 ;;
        --pxe) pxe=1; shift ;;
        --pxe-url) pxe=1; pxe_url=$2; shift 2 ;;
        --uefi) uefi=1; shift ;;
        --disk) disk=$2; shift 2 ;;
        --disk-bus) disk_bus=$2; shift 2 ;;
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

[ ${#nics[@]} = 0 ] && nics=(virtio)
args=(-accel tcg -M q35 -cpu max -smp 2 -m "$memory" -no-reboot -display none -monitor none
    -serial "file:$log" -device virtio-rng-pci)
if [ $uefi = 1 ]; then
    ovmf=/usr/share/ovmf/OVMF.fd
    [ -f $ovmf ] || { echo "qemu/boot.sh: $ovmf is missing (apt-get install ovmf; just deps does)" >&2; exit 2; }
    args+=(-bios $ovmf)
fi
if [ $pxe = 0 ]; then
    args+=(-kernel "$bundle/vmlinuz" -initrd "$bundle/initrd.img" -append "$(cat "$bundle/cmdline") $append")
fi
# The boot NIC: the one marked boot, else the first that is not isolated.
boot_nic=-1
for i in "${!nics[@]}"; do
    case ",${nics[$i]}," in *,boot,*) boot_nic=$i ;; esac
done
if [ $boot_nic = -1 ]; then
    for i in "${!nics[@]}"; do
        case ",${nics[$i]}," in *,isolated,*) ;; *) boot_nic=$i; break ;; esac
    done
fi
for i in "${!nics[@]}"; do
    IFS=, read -r -a opts <<<"${nics[$i]}"
    model=${opts[0]} mac=$(printf '52:54:00:12:34:%02x' $((0x56 + i))) isolated=0
    for o in "${opts[@]:1}"; do
        case "$o" in
            mac=*) mac=${o#mac=} ;;
            isolated) isolated=1 ;;
            boot) ;;
            *) echo "qemu/boot.sh: unknown --nic option $o" >&2; exit 2 ;;
        esac
    done
    case "$model" in
        virtio) device=virtio-net-pci ;;
        e1000e|igb|e1000) device=$model ;;
        *) echo "qemu/boot.sh: unknown NIC model $model (virtio, e1000e, igb, e1000)" >&2; exit 2 ;;
    esac
    netdev="user,id=n$i,restrict=on"
    if [ $isolated = 0 ]; then
        for p in "${forwards[@]}"; do
            netdev+=",guestfwd=tcp:10.0.2.100:$p-cmd:nc 127.0.0.1 $p"
        done
    fi
    nic_opts=""
    if [ "$i" = $boot_nic ] && [ $pxe = 1 ]; then
        if [ -n "$pxe_url" ]; then
            netdev+=",bootfile=$pxe_url"
        else
            netdev+=",tftp=$bundle,bootfile=boot.ipxe"
        fi
        nic_opts=",bootindex=1"
    fi
    args+=(-netdev "$netdev" -device "$device,netdev=n$i,mac=$mac$nic_opts")
done
[ -n "$identity" ] && args+=(-fw_cfg "name=opt/ironroot/identity,file=$identity")
smbios1=""
[ -n "$uuid" ] && smbios1+=",uuid=$uuid"
[ -n "$serial" ] && smbios1+=",serial=$serial"
[ -n "$smbios1" ] && args+=(-smbios "type=1$smbios1")
for kv in "${oem[@]}"; do args+=(-smbios "type=11,value=io.ironroot.$kv"); done
if [ -n "$disk" ]; then
    case "$disk_bus" in
        virtio) args+=(-drive "file=$disk,if=virtio,format=raw") ;;
        nvme) args+=(-drive "file=$disk,if=none,id=d0,format=raw" -device nvme,drive=d0,serial=ironroot0) ;;
        ahci) args+=(-drive "file=$disk,if=none,id=d0,format=raw" -device ide-hd,drive=d0,bus=ide.0) ;;
        *) echo "qemu/boot.sh: unknown disk bus $disk_bus (virtio, nvme, ahci)" >&2; exit 2 ;;
    esac
fi

exec timeout --kill-after=10 "$timeout" qemu-system-x86_64 "${args[@]}"
