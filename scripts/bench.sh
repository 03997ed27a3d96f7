#!/usr/bin/env bash
# Benchmarks: sizes and boot timings of the image-creation initrd; from-rootfs throughput and peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build -q --profile agent --target x86_64-unknown-linux-musl -p initrd-agent
cargo build -q --release -p host
cargo bench -p tests --bench agent_boot
cargo bench -p tests --bench from_rootfs
