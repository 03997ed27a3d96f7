#!/usr/bin/env bash
# The main job: build a Debian bookworm server image on this machine with the
# local provider, boot it, and log in to a server made from it.
#
#   1. set the machine up (Debian packages, Rust musl target)
#   2. build initrd-agent (static musl) and imgforge
#   3. imgforge build --rootfs debian:bookworm: mmdebstrap makes the rootfs (the cloud profile:
#      sshd, cloud-init, DHCP, guest agent, growpart), a QEMU build server (the image-creation
#      bootscript, restricted user networking) streams it onto a blank volume (GPT, ESP, ext4,
#      GRUB), then the volume is snapshotted into the image `debian-bookworm`
#   4. imgforge boot debian-bookworm: UEFI (OVMF) boot to a login prompt on the serial console
#   5. imgforge boot debian-bookworm --ssh: a server from the image (a Scaleway instance to the
#      software inside), a fresh SSH key, login with OpenSSH, cloud-init done, a command run
#   6. imgforge image export + imgforge inspect: the raw disk and what is on it
#
# Usage: scripts/main-job.sh [OUTPUT_DISK]   (default: ./debian-bookworm.raw)
# State (servers, volumes, images) lives in $IMGFORGE_HOME (default ~/.local/share/imgforge).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-$PWD/debian-bookworm.raw}"
name=debian-bookworm
step() { echo "== $*"; }

step "1/6 setting up the machine"
./scripts/setup.sh
step "2/6 building initrd-agent (static musl) and imgforge"
cargo build -q --profile agent --target x86_64-unknown-linux-musl -p initrd-agent
cargo build -q -p host
imgforge="$PWD/target/debug/imgforge"

# A rerun replaces the image of the previous run.
if "$imgforge" image get "$name" >/dev/null 2>&1; then
  "$imgforge" image rm "$name" --with-snapshot
fi

step "3/6 imgforge build --rootfs debian:bookworm --name $name (local provider, QEMU under TCG)"
"$imgforge" build --provider local --method from-rootfs --rootfs debian:bookworm \
  --hostname imgforge-debian --name "$name" --size 2G

step "4/6 imgforge boot $name --expect login: (UEFI, OVMF)"
"$imgforge" boot "$name" --expect 'login:' --timeout 300

step "5/6 imgforge boot $name --ssh (a server from the image; log in over SSH)"
"$imgforge" boot "$name" --ssh --timeout 900 \
  --command 'echo "logged in to $(hostname) as $(id -un)"; cloud-init query platform; df -h /'

step "6/6 imgforge image export $name -o $out; imgforge inspect"
"$imgforge" image export "$name" -o "$out" --format raw
"$imgforge" inspect "$out"
echo "== the image works as a server: $name (exported to $out)"
