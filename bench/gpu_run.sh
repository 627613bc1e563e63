#!/usr/bin/env bash
# The prepared GPU session: correctness on CUDA first, then the benchmark of record.
#   OUT=some/dir bash bench/gpu_run.sh                      # every stage (about 11 minutes)
#   OUT=some/dir STAGES="check 2d" bash bench/gpu_run.sh    # 465 s at most: one device call
#   OUT=some/dir STAGES="cudagraphs 3d" bash bench/gpu_run.sh   # 250 s at most: a second one
# Stages: check (CUDA correctness, eager and compiled, + bf16 kernel tests), 2d (MiT-B/2 batch 32:
# eager fm/naive/fast, then compiled fm/fast), cudagraphs (the same compiled with CUDA graphs:
# compile-mode reduce-overhead), 3d (48^3 volume, batch 1, eager). Compiling the MiT-B step took
# 110 s (fm) and 150 s (fast) on the 2-core CPU; the JSON is rewritten after every phase, so a
# stage cut by its timeout keeps what it measured.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
STAGES=${STAGES:-check 2d cudagraphs 3d}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
filter() { grep -v "^{\|^  File\|^    \|warnings.warn" | tail -25; }
B2D="--model mit-b --input-size 32 32 --channels 4 --batch 32"
for stage in $STAGES; do
  case $stage in
    check)
      timeout 90 python3 bench/gpu_check.py 2>&1 | tail -20 | tee "$OUT/gpu_check.log"
      # bf16 kernel tests (the CPU interpreter cannot check bf16); needs pytest on the device
      timeout 45 python3 -m pytest -x -q -p no:cacheprovider tests/test_attention_triton.py -k bf16 2>&1 \
          | tail -5 | tee "$OUT/bf16_tests.log" ;;
    2d)
      timeout 330 python3 bench/jvp_throughput.py $B2D --steps 10 --warmup 3 --compile \
          --out "$OUT/jvp_mitb_2d_b32.json" 2>&1 | filter | tee "$OUT/jvp_mitb_2d_b32.log" ;;
    cudagraphs)
      timeout 150 python3 bench/jvp_throughput.py $B2D --steps 10 --warmup 3 --cases fm,fast --compile \
          --compile-mode reduce-overhead --out "$OUT/jvp_mitb_2d_b32_cudagraphs.json" 2>&1 \
          | filter | tee "$OUT/jvp_mitb_2d_b32_cudagraphs.log" ;;
    3d)
      timeout 100 python3 bench/jvp_throughput.py --model mit-b --input-size 48 48 48 --channels 4 --batch 1 \
          --steps 3 --warmup 1 --out "$OUT/jvp_mitb_3d.json" 2>&1 | filter | tee "$OUT/jvp_mitb_3d.log" ;;
    *) echo "unknown stage $stage (check, 2d, cudagraphs, 3d)"; exit 2 ;;
  esac
done
