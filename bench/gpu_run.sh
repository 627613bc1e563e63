#!/usr/bin/env bash
# One prepared GPU session (about 6 minutes on an H100): correctness on CUDA first, then the
# benchmark of record, 2D MiT-B/2 (eager cases + compiled fast step) and the 3D 48^3 case.
# From the repo root: OUT=some/dir bash bench/gpu_run.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 90 python3 bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
timeout 100 python3 bench/jvp_throughput.py --model mit-b --input-size 32 32 --channels 4 --batch 32 \
    --steps 5 --warmup 2 --out "$OUT/jvp_mitb_2d_b32.json" 2>&1 | grep -v "^{" | tee "$OUT/jvp_mitb_2d_b32.log"
timeout 180 python3 bench/jvp_throughput.py --model mit-b --input-size 32 32 --channels 4 --batch 32 \
    --steps 5 --warmup 2 --cases fm --compile --out "$OUT/jvp_mitb_2d_b32_compiled.json" 2>&1 \
    | grep -v "^{\|^  File\|^    " | tail -20 | tee "$OUT/jvp_mitb_2d_b32_compiled.log"
timeout 90 python3 bench/jvp_throughput.py --model mit-b --input-size 48 48 48 --channels 4 --batch 1 \
    --steps 3 --warmup 1 --out "$OUT/jvp_mitb_3d.json" 2>&1 | grep -v "^{\|^  File\|^    " | tee "$OUT/jvp_mitb_3d.log"
