#!/usr/bin/env bash
# Third GPU session: the benchmark of record again with per-case memory baselines (gc between cases).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
timeout 90 python3 bench/jvp_throughput.py --model mit-b --input-size 32 32 --channels 4 --batch 32 \
    --steps 5 --warmup 2 --out "$OUT/jvp_mitb_2d_b32.json" 2>&1 | grep -v "^{" | tee "$OUT/jvp_mitb_2d_b32.log"
timeout 80 python3 bench/jvp_throughput.py --model mit-b --input-size 48 48 48 --channels 4 --batch 1 \
    --steps 3 --warmup 1 --out "$OUT/jvp_mitb_3d.json" 2>&1 | grep -v "^{\|^  File\|^    " | tee "$OUT/jvp_mitb_3d.log"
