#!/usr/bin/env bash
# The main job, as far as imgforge goes today: set up, build the
# image-creation bootscript (kernel + initrd with the agent as PID 1), boot a
# build server on a blank volume in QEMU (TCG, restricted user networking)
# and print the agent's done line.
#
# Usage: scripts/main-job.sh [BUILD_METHOD]   (default: from-rootfs)
set -euo pipefail
cd "$(dirname "$0")/.."
method="${1:-from-rootfs}"

echo "== 1/4 setting up the machine"
./scripts/setup.sh
echo "== 2/4 building initrd-agent (static musl) and imgforge"
cargo build -q --profile agent --target x86_64-unknown-linux-musl -p initrd-agent
cargo build -q -p host
work="$(mktemp -d)"
trap 'kill "$qemu_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

echo "== 3/4 imgforge initrd -o $work/bootscript"
./target/debug/imgforge initrd -o "$work/bootscript"
args="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bootcmdargs"])' "$work/bootscript/bootscript.json")"

echo "== 4/4 booting the build server (build_method=$method, NO_METADATA=1)"
truncate -s 1G "$work/volume.raw"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
qemu-system-x86_64 -M q35 -nodefaults -no-reboot -display none -m 1024 -smp 2 -accel tcg -cpu max \
  -kernel "$work/bootscript/vmlinuz" -initrd "$work/bootscript/initrd.img" \
  -append "$args NO_METADATA=1 build_method=$method" \
  -drive "file=$work/volume.raw,if=none,id=d0,format=raw" -device virtio-blk-pci,drive=d0 \
  -netdev "user,id=n0,restrict=on,net=169.254.0.0/16,host=169.254.0.2,dhcpstart=169.254.0.15,hostfwd=tcp:127.0.0.1:$port-:22" \
  -device virtio-net-pci,netdev=n0 -serial "file:$work/console.log" &
qemu_pid=$!
for _ in $(seq 1 120); do
  line="$(timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port && head -n1 <&3" 2>/dev/null || true)"
  if [ -n "$line" ]; then
    grep -E '^\[ *[0-9]+\.[0-9]+\]' "$work/console.log" || true
    echo "== done line: $line"
    exit 0
  fi
  sleep 1
done
echo "no done line within 2 minutes; console:" >&2
tail -40 "$work/console.log" >&2
exit 1
