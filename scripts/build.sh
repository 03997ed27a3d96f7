#!/usr/bin/env bash
# Builds the static agent (musl, size-optimised profile) and the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --profile agent --target x86_64-unknown-linux-musl -p initrd-agent
cargo build --workspace --all-targets
