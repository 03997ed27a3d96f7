#!/usr/bin/env bash
# The test command: sets the machine up, builds, runs every test (unit tests
# and end-to-end tests that boot real kernels in QEMU under TCG).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
# A test that needs a tool of scripts/tools.list fails instead of skipping when it is missing.
IMGFORGE_REQUIRE_TOOLS=1 cargo test --workspace -- --test-threads=2
