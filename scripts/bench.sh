#!/usr/bin/env bash
# Benchmarks: sizes and boot timings of the image-creation initrd; from-rootfs throughput and peak memory;
# from-qcow2 throughput against qemu-img convert; local build time of a Debian rootfs against virt-make-fs;
# a cloud image's server boot (SSH, cloud-init) and size against the minimal profile; image push upload throughput
# against curl -T and its peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

# virt-make-fs (guestfs-tools) is the local_build bench's baseline only; the tests do not need it, so it
# is installed here rather than in setup.sh. Recommends stay on: supermin builds the libguestfs appliance
# from the host's own kernel, which comes with linux-image-amd64 (a Recommends of supermin), named here so
# that it is explicit.
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! command -v virt-make-fs >/dev/null || ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
  echo "== bench: installing guestfs-tools linux-image-amd64"
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q guestfs-tools linux-image-amd64
fi

cargo build -q --profile agent --target x86_64-unknown-linux-musl -p initrd-agent
cargo build -q --release -p host
cargo bench -p tests --bench agent_boot
cargo bench -p tests --bench from_rootfs
# Needs root (it drops the page cache); makes its test images once, in target/bench-qcow2/.
cargo bench -p tests --bench from_qcow2
# Needs `imgforge build`: with an imgforge that lacks it, this bench says so and exits non-zero.
cargo bench -p tests --bench local_build
# Server start to SSH login and to cloud-init done (median of BENCH_RUNS=3), cloud vs minimal image size.
cargo bench -p tests --bench server_boot
# image push: upload MB/s against curl -T to the same S3 server (moto), peak RSS of 1 and 3 GiB pushes.
cargo bench -p tests --bench push
