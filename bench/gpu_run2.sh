#!/usr/bin/env bash
# Second GPU session: MiT-B/2 2D at a batch that fits every case, plus the compiled fast step.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
timeout 100 python3 bench/jvp_throughput.py --model mit-b --input-size 32 32 --channels 4 --batch 32 \
    --steps 5 --warmup 2 --out "$OUT/jvp_mitb_2d_b32.json" 2>&1 | tee "$OUT/jvp_mitb_2d_b32.log"
timeout 180 python3 bench/jvp_throughput.py --model mit-b --input-size 32 32 --channels 4 --batch 32 \
    --steps 5 --warmup 2 --cases fm --compile --out "$OUT/jvp_mitb_2d_b32_compiled.json" 2>&1 | tail -20 | tee "$OUT/jvp_mitb_2d_b32_compiled.log"
