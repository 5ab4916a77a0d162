#!/usr/bin/env bash
# Builds a node kernel from a Linux source tree (6.12 or newer) with the ironroot fragment, and
# lays it out the way `ironroot-build kernel fetch` does, so `ironroot-build initramfs --kernel
# OUT` takes it unchanged:
#
#   kernel-configs/build-from-source.sh LINUX_SRC OUT
#
# Not run in CI (a kernel build takes far longer than the suite); documented and kept working.
set -euo pipefail
src=${1:?usage: build-from-source.sh LINUX_SRC OUT}
out=${2:?usage: build-from-source.sh LINUX_SRC OUT}
here=$(cd "$(dirname "$0")" && pwd)
jobs=$(nproc)

make -C "$src" x86_64_defconfig
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/ironroot.fragment"
make -C "$src" olddefconfig
make -C "$src" -j"$jobs" bzImage modules
release=$(make -s -C "$src" kernelrelease)

rm -rf "$out.tmp" && mkdir -p "$out.tmp/modules"
cp "$src/arch/x86/boot/bzImage" "$out.tmp/vmlinuz"
cp "$src/.config" "$out.tmp/config"
make -C "$src" INSTALL_MOD_PATH="$out.tmp/modules" modules_install
depmod -b "$out.tmp/modules" "$release"
ironroot-build kernel check "$out.tmp/config"
printf '{"metapackage":"source","metapackage_version":"","package":"linux-source","version":"%s","release":"%s","deb_sha256":"","vmlinuz_sha256":"%s"}\n' \
    "$release" "$release" "$(sha256sum "$out.tmp/vmlinuz" | cut -d' ' -f1)" >"$out.tmp/kernel.json"
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out: $release"
