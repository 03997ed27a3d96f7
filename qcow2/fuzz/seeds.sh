#!/bin/sh
# Seeds the fuzz corpus with small images written by qemu-img: plain,
# compressed (zlib, zstd), v2, 512 B clusters, zero clusters, preallocated.
# Usage: fuzz/seeds.sh (from qcow2/); needs qemu-utils and python3.
set -eu
corpus=fuzz/corpus/parse
mkdir -p "$corpus"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$tmp/src.raw" <<'PY'
import random, sys
random.seed(5)
with open(sys.argv[1], "wb") as f:
    f.truncate(256 * 1024)
    f.seek(0); f.write(random.randbytes(20000))
    f.seek(70000); f.write(b"qcow2 seed text " * 3000)
    f.seek(200000); f.write(random.randbytes(5000) + bytes(3000) + random.randbytes(3000))
PY
n=0
for opts in "cluster_size=4k" "cluster_size=512" "cluster_size=64k" \
            "cluster_size=4k,compat=0.10" "cluster_size=512,compression_type=zstd"; do
  for c in "" "-c"; do
    n=$((n + 1))
    qemu-img convert -f raw -O qcow2 $c -o "$opts" "$tmp/src.raw" "$corpus/seed-$n.qcow2"
  done
done
qemu-img create -q -f qcow2 -o cluster_size=4k,preallocation=metadata "$corpus/prealloc.qcow2" 64k
cp "$corpus/seed-1.qcow2" "$corpus/zeroed.qcow2"
qemu-io -f qcow2 -c "write -z 0 8k" -c "write -z -u 64k 8k" "$corpus/zeroed.qcow2" >/dev/null
ls -l "$corpus"
