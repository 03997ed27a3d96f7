#!/usr/bin/env bash
# Installs what imgforge and its tests need on a fresh Debian 12 machine:
# Debian packages (QEMU, OVMF, GRUB, filesystem tools, musl) and the Rust
# musl target. Idempotent: installs only what is missing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

packages=(
  qemu-system-x86 qemu-utils ovmf       # build servers and boot tests (TCG)
  e2fsprogs dosfstools gdisk mtools     # mke2fs for the initrd; fsck/sgdisk as judges
  grub-efi-amd64-bin                    # GRUB EFI image for rootfs without GRUB
  cpio file binutils                    # reading archives back in tests
  musl-tools                            # musl-gcc for C in crates (ring) on the musl target
  busybox-static mmdebstrap             # test root filesystems
  umoci podman zstd xz-utils            # rootfs tests: umoci judges layer application; podman: engine source
  apt-utils ca-certificates
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The kernel comes from Debian's linux-image-cloud-amd64: apt's lists must know it.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show --no-all-versions linux-image-cloud-amd64 >/dev/null 2>&1; then
  echo "== setup: apt-get update"
  $SUDO apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "== setup: installing ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing; install Rust with rustup first" >&2
  exit 1
fi
if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  echo "== setup: rustup target add x86_64-unknown-linux-musl"
  rustup target add x86_64-unknown-linux-musl
fi
