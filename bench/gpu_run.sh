#!/usr/bin/env bash
# The prepared GPU session: correctness on CUDA first, then the benchmark of record.
#   OUT=some/dir STAGES="check 2d" bash bench/gpu_run.sh          # 336 s on an H100 (third session)
#   OUT=some/dir STAGES="3d cudagraphs" bash bench/gpu_run.sh     # 3d took 70 s; cudagraphs ~240 s
#   OUT=some/dir STAGES="blocks 3dcompiled" bash bench/gpu_run.sh  # unmeasured yet: 450 s at most,
#   then STAGES="cudagraphs attention" (340 s at most): one device call each
# Stages: check (CUDA correctness, eager and compiled, + bf16 kernel tests), 2d (MiT-B/2 batch 32:
# eager fm/naive/fast, then compiled fm/fast), cudagraphs (fm/fast compiled with CUDA graphs:
# compile-mode reduce-overhead), blocks (fm/fast eager and with --compile-scope blocks), 3d (48^3
# volume, batch 1, eager fm/naive/fast), 3dcompiled (the same, fm/fast compiled), attention
# (bench/attention_jvp.py incl. the cuDNN SDPA the step's primal passes use), profile
# (per-pass times and kernel tables of eager steps, 2D and 3D), fid (50k-sample FID cost of MiT-B/2:
# 1-NFE sampling, SD-VAE decoding, Inception features; bench/fid_throughput.py). jvp_throughput
# prints MFU per case (bf16 dense peak of H100 / H200); mfu (compiled fm / fast for MiT-B/2 at batch
# 128, MiT-XL/2 at 64, pMF-B/16 at 256 px at 64: up to 14 min, run it alone).
# On the H100 machine compiling the MiT-B step took 56-60 s (fm) and 106 s (fast). The JSON is
# rewritten after every phase, so a stage cut by its timeout keeps what it measured.
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
      timeout 200 python3 bench/gpu_check.py 2>&1 | tail -20 | tee "$OUT/gpu_check.log"
      # bf16 kernel tests (the CPU interpreter cannot check bf16); needs pytest on the device
      timeout 90 python3 -m pytest -x -q -rA -p no:cacheprovider tests/test_attention_triton.py -k bf16 2>&1 \
          | grep "PASSED\|FAILED\|ERROR\|passed\|failed" | tee "$OUT/bf16_tests.log" ;;
    2d)
      timeout 330 python3 bench/jvp_throughput.py $B2D --steps 10 --warmup 3 --compile \
          --out "$OUT/jvp_mitb_2d_b32.json" 2>&1 | filter | tee "$OUT/jvp_mitb_2d_b32.log" ;;
    cudagraphs)
      timeout 250 python3 bench/jvp_throughput.py $B2D --steps 10 --warmup 3 --cases fm,fast --compile \
          --compile-mode reduce-overhead --out "$OUT/jvp_mitb_2d_b32_cudagraphs.json" 2>&1 \
          | filter | tee "$OUT/jvp_mitb_2d_b32_cudagraphs.log" ;;
    3d)
      timeout 100 python3 bench/jvp_throughput.py --model mit-b --input-size 48 48 48 --channels 4 --batch 1 \
          --steps 3 --warmup 1 --out "$OUT/jvp_mitb_3d.json" 2>&1 | filter | tee "$OUT/jvp_mitb_3d.log" ;;
    blocks)
      timeout 200 python3 bench/jvp_throughput.py $B2D --steps 10 --warmup 3 --cases fm,fast --compile \
          --compile-scope blocks --out "$OUT/jvp_mitb_2d_b32_blocks.json" 2>&1 | filter | tee "$OUT/jvp_mitb_2d_b32_blocks.log" ;;
    3dcompiled)
      timeout 250 python3 bench/jvp_throughput.py --model mit-b --input-size 48 48 48 --channels 4 --batch 1 \
          --steps 3 --warmup 1 --cases fm,fast --compile --out "$OUT/jvp_mitb_3d_compiled.json" 2>&1 \
          | filter | tee "$OUT/jvp_mitb_3d_compiled.log" ;;
    attention)
      timeout 90 python3 -m bench.attention_jvp --seq-lens 276 1024 4096 13844 --reps 5 \
          --out "$OUT/attention_jvp.json" 2>&1 | tail -8 | tee "$OUT/attention_jvp.log" ;;
    mfu)
      # The MFU table: compiled fm / fast at larger per-GPU batches, MiT-XL/2 and pMF-B/16 too.
      for cfg in "mit-b 32 32 4 2 128 imf" "mit-xl 32 32 4 2 64 imf" "pmf-b 256 256 3 16 64 pmf"; do
        set -- $cfg
        timeout 280 python3 bench/jvp_throughput.py --model $1 --input-size $2 $3 --channels $4 --patch-size $5 \
            --batch $6 --variant $7 --cases fm,fast --compile --steps 5 --warmup 2 --no-cpu-peak \
            --out "$OUT/mfu_$1_b$6.json" 2>&1 | filter | tee "$OUT/mfu_$1_b$6.log"
      done ;;
    fid)
      timeout 150 python3 bench/fid_throughput.py --model mit-b --input-size 32 32 --channels 4 --vae --batch 250 \
          --batches 4 --out "$OUT/fid_mitb.json" 2>&1 | tail -2 | tee "$OUT/fid_mitb.log" ;;
    profile)
      timeout 50 python3 bench/profile_step.py --batch 32 --out "$OUT/prof_2d_fast.txt" 2>&1 | head -3
      timeout 60 python3 bench/profile_step.py --input-size 48 48 48 --batch 1 --out "$OUT/prof_3d_fast.txt" 2>&1 | head -3 ;;
    *) echo "unknown stage $stage (check, 2d, cudagraphs, blocks, 3d, 3dcompiled, attention, profile, fid, mfu)"; exit 2 ;;
  esac
done
