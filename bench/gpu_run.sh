#!/usr/bin/env bash
# One prepared GPU session (about 8 minutes on an H100; the timeouts sum to 585 s, under
# the device tool's 600 s per command): correctness on CUDA first (eager and
# compiled; bf16 kernel tests), then the benchmark of record: 2D MiT-B/2 batch 32 (eager cases, compiled fm and fast),
# the same with CUDA graphs (reduce-overhead), and the 3D 48^3 case.
# From the repo root: OUT=some/dir bash bench/gpu_run.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
filter() { grep -v "^{\|^  File\|^    \|warnings.warn" | tail -25; }
timeout 90 python3 bench/gpu_check.py 2>&1 | tail -20 | tee "$OUT/gpu_check.log"
# bf16 kernel tests (the CPU interpreter cannot check bf16); needs pytest on the device
timeout 45 python3 -m pytest -x -q -p no:cacheprovider tests/test_attention_triton.py -k bf16 2>&1 | tail -5 | tee "$OUT/bf16_tests.log"
timeout 190 python3 bench/jvp_throughput.py --model mit-b --input-size 32 32 --channels 4 --batch 32 \
    --steps 10 --warmup 3 --compile --out "$OUT/jvp_mitb_2d_b32.json" 2>&1 | filter | tee "$OUT/jvp_mitb_2d_b32.log"
timeout 130 python3 bench/jvp_throughput.py --model mit-b --input-size 32 32 --channels 4 --batch 32 \
    --steps 10 --warmup 3 --cases fm,fast --compile --compile-mode reduce-overhead \
    --out "$OUT/jvp_mitb_2d_b32_cudagraphs.json" 2>&1 | filter | tee "$OUT/jvp_mitb_2d_b32_cudagraphs.log"
timeout 130 python3 bench/jvp_throughput.py --model mit-b --input-size 48 48 48 --channels 4 --batch 1 \
    --steps 3 --warmup 1 --compile --out "$OUT/jvp_mitb_3d.json" 2>&1 | filter | tee "$OUT/jvp_mitb_3d.log"
