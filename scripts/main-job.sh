#!/usr/bin/env bash
# The main job: build a Debian bookworm server image on this machine and boot it.
#
#   1. set the machine up (Debian packages, Rust musl target)
#   2. build initrd-agent (static musl) and imgforge
#   3. imgforge initrd: the image-creation bootscript (Debian kernel + initrd, agent as PID 1)
#   4. imgforge rootfs debian:bookworm (mmdebstrap: kernel, GRUB EFI, systemd; serial console)
#   5. a build server in QEMU (TCG, restricted user networking) with a blank volume; the agent
#      streams the rootfs from a loopback HTTP server, partitions, formats, installs GRUB
#   6. the image boots under UEFI (OVMF) to a login prompt on the serial console
#
# Step 5 becomes `imgforge build` with the local provider.
# Usage: scripts/main-job.sh [OUTPUT_DISK]   (default: ./debian-bookworm.raw)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-$PWD/debian-bookworm.raw}"
step() { echo "== $*"; }

step "1/6 setting up the machine"
./scripts/setup.sh
step "2/6 building initrd-agent (static musl) and imgforge"
cargo build -q --profile agent --target x86_64-unknown-linux-musl -p initrd-agent
cargo build -q -p host
imgforge="$PWD/target/debug/imgforge"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT INT TERM

step "3/6 imgforge initrd -o $work/bootscript"
"$imgforge" initrd -o "$work/bootscript" >/dev/null
args="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bootcmdargs"])' "$work/bootscript/bootscript.json")"

step "4/6 imgforge rootfs debian:bookworm (mmdebstrap, about a minute)"
mkdir -p "$work/www"
"$imgforge" rootfs debian:bookworm --hostname imgforge-debian -o "$work/www/rootfs.tar"
ls -l "$work/www/rootfs.tar"

step "5/6 build server: from-rootfs onto a 2 GiB volume"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port="$(free_port)"; done_port="$(free_port)"
python3 -m http.server --bind 127.0.0.1 --directory "$work/www" "$http_port" >/dev/null 2>&1 &
pids+=($!)
rm -f "$out"; truncate -s 2G "$out"
qemu-system-x86_64 -M q35 -nodefaults -no-reboot -display none -m 1024 -smp 2 -accel tcg -cpu max \
  -kernel "$work/bootscript/vmlinuz" -initrd "$work/bootscript/initrd.img" \
  -append "$args NO_METADATA=1 build_method=from-rootfs rootfs_url=http://169.254.42.10/rootfs.tar" \
  -drive "file=$out,if=none,id=d0,format=raw,cache=unsafe" -device virtio-blk-pci,drive=d0 \
  -netdev "user,id=n0,restrict=on,net=169.254.0.0/16,host=169.254.0.2,dhcpstart=169.254.0.15,hostfwd=tcp:127.0.0.1:$done_port-:22,guestfwd=tcp:169.254.42.10:80-cmd:$imgforge guestfwd-bridge 127.0.0.1:$http_port" \
  -device virtio-net-pci,netdev=n0 -serial "file:$work/build-console.log" &
build_pid=$!; pids+=($build_pid)
line=""
for _ in $(seq 1 900); do
  line="$(timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$done_port && head -n1 <&3" 2>/dev/null || true)"
  [ -n "$line" ] && break
  sleep 1
done
grep -E 'INFO|ERROR|WARN' "$work/build-console.log" | tail -20
echo "done line: $line"
kill "$build_pid" 2>/dev/null || true; wait "$build_pid" 2>/dev/null || true
case "$line" in *'"status":"0"'*) ;; *) echo "the build failed" >&2; exit 1;; esac

step "6/6 imgforge boot $out --expect login: (UEFI, OVMF)"
"$imgforge" boot "$out" --expect 'login:' --timeout 300
echo "== the image boots: $out"
