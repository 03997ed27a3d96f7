#!/usr/bin/env bash
# The test command: sets the machine up, builds, runs every test (unit tests
# and end-to-end tests that boot real kernels in QEMU under TCG).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
cargo test --workspace -- --test-threads=2
