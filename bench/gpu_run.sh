#!/usr/bin/env bash
# One prepared GPU session: correctness check, then the benchmark of record (2D, 3D, compiled).
# Usage on a GPU machine, from the repo root: OUT=some/dir bash bench/gpu_run.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 60 python3 bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
timeout 150 python3 bench/jvp_throughput.py --model mit-b --input-size 32 32 --channels 4 --batch 64 \
    --steps 5 --warmup 2 --out "$OUT/jvp_mitb_2d.json" 2>&1 | tee "$OUT/jvp_mitb_2d.log"
timeout 120 python3 bench/jvp_throughput.py --model mit-b --input-size 48 48 48 --channels 4 --batch 1 \
    --steps 3 --warmup 1 --out "$OUT/jvp_mitb_3d.json" 2>&1 | tee "$OUT/jvp_mitb_3d.log"
timeout 150 python3 bench/jvp_throughput.py --model mit-b --input-size 32 32 --channels 4 --batch 64 \
    --steps 5 --warmup 2 --cases fm --compile --out "$OUT/jvp_mitb_2d_compiled.json" 2>&1 | tee "$OUT/jvp_mitb_2d_compiled.log"
