#!/usr/bin/env bash
# The prepared GPU session: correctness on CUDA first, then the benchmarks, in stages.
#   OUT=some/dir STAGES="check attention" bash bench/gpu_run.sh       # call 1: 450 s at most
#   OUT=some/dir STAGES="mfu-b 3dcompiled" bash bench/gpu_run.sh      # call 2: what is left (about 300 s:
#       mfu-b, then 3dcompiled as far as it gets; their timeouts add to 530 s)
#   later: "mfu-b-reads8 3dcompiled-1class profile-compiled mem64", "mfu-xl mfu-pmf", "cudagraphs fid", "2d 3d blocks profile" (older tables)
#   DRY=1 STAGES="..." bash bench/gpu_run.sh                          # on any machine, before a device call:
#       every stage's commands are listed in $OUT/commands.txt instead of run, and bench/check_commands.py
#       checks that each script accepts its arguments (seconds; a wrong flag costs device minutes)
# A device session has about 15 minutes in all, start-up included, 10 minutes a call: the two calls
# above are issue #16's order (kernels checked in bf16 and on CUDA, then the attention targets,
# then MFU and fast/fm of MiT-B/2 compiled, then 3D compiled). Each stage's timeout is its budget;
# the JSON is rewritten after every phase, so a stage cut short keeps what it measured.
# Stages: check (CUDA correctness, eager and compiled, + bf16 kernel tests), attention
# (bench/attention_jvp.py at N = 4096 .. 16384, D = 64 and 128: fwd+JVP and bwd TFLOP/s against
# cuDNN, the two-pass, atomic-dQ and sdpa backwards (the last: cuDNN's kernel on the fused forward's
# O and log-sum-exp), and the fwd+JVP with lazy rescaling, side by side), mfu-b / mfu-xl / mfu-pmf (compiled fm / fast: MiT-B/2 at batch 128, MiT-XL/2 at 64,
# pMF-B/16 at 256 px at 64; eager steps fit up to batch 263 / 62 / 216 in 80 GiB by
# bench/step_memory.py), 3dcompiled (48^3 volume, batch 2, fm / fast compiled), 3dcompiled-1class
# (the same at batch 1 for data of one class: no CFG), mem64 (64^3 volume,
# MiT-B batch 1, eager fm / fast: the 80 GB target; predicted 38.4 GiB), 2d (MiT-B/2 batch 32: eager
# fm/naive/fast, then compiled fm/fast), cudagraphs (compile-mode reduce-overhead), blocks
# (--compile-scope blocks), 3d (48^3 eager fm/naive/fast), profile (per-pass times and kernel
# tables of eager steps, 2D and 3D), profile-compiled (the same of the compiled fm / fast steps of
# MiT-B/2 at batch 128), fid (50k-sample FID cost of MiT-B/2). jvp_throughput prints
# MFU per case (bf16 dense peak of H100 / H200). On the H100 (third session) compiling the MiT-B
# step took 56-60 s (fm) and 106 s (fast).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
STAGES=${STAGES:-check attention}
mkdir -p "$OUT"
if [ -n "${DRY:-}" ]; then
  : > "$OUT/commands.txt"
  timeout() { shift; "$@"; }
  python3() { printf '%q ' "$@" >> "$OUT/commands.txt"; echo >> "$OUT/commands.txt"; }
  nvidia-smi() { :; }
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
filter() { grep -v "^{\|^  File\|^    \|warnings.warn" | tail -25; }
B2D="--model mit-b --input-size 32 32 --channels 4 --batch 32"
for stage in $STAGES; do
  case $stage in
    check)
      timeout 150 python3 bench/gpu_check.py 2>&1 | tail -20 | tee "$OUT/gpu_check.log"
      # The kernels in bf16 (the CPU interpreter cannot check bf16), the atomic-dQ backward, and every
      # autotune tile at the attention stage's head dims, on CUDA. About 220 Triton compiles of 1-3
      # seconds each (one core each): in 12 processes (pytest-xdist, in the device image); they
      # leave in Triton's cache the bf16 binaries that the attention and model stages launch.
      # -v: a line per test as it ends, so a run cut by its timeout still shows what passed.
      XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")
      timeout 120 python3 -m pytest $XDIST -v -p no:cacheprovider tests/test_attention_triton.py -k "bf16 or gpu_tile" 2>&1 \
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
      # batch 2: at batch 1 no row is flow matching and the step's FLOPs alone are 1.667x fm's (fake-tensor
      # count, bench/step_memory.py), over the 1.5; at batch 2 they are 1.422x
      timeout 250 python3 bench/jvp_throughput.py --model mit-b --input-size 48 48 48 --channels 4 --batch 2 \
          --steps 3 --warmup 1 --cases fm,fast --compile --no-cpu-peak --out "$OUT/jvp_mitb_3d_b2_compiled.json" 2>&1 \
          | filter | tee "$OUT/jvp_mitb_3d_b2_compiled.log" ;;
    3dcompiled-1class)
      # Data of one class (phantoms, NIfTI folders) trains without CFG: no unconditional guidance rows, so at
      # batch 1 the step's FLOPs are 1.489x fm's (fake-tensor count), under the 1.5
      timeout 250 python3 bench/jvp_throughput.py --model mit-b --input-size 48 48 48 --channels 4 --batch 1 \
          --num-classes 1 --steps 3 --warmup 1 --cases fm,fast --compile --no-cpu-peak \
          --out "$OUT/jvp_mitb_3d_b1_1class_compiled.json" 2>&1 | filter | tee "$OUT/jvp_mitb_3d_b1_1class_compiled.log" ;;
    attention)
      for hd in "64 12" "128 6"; do
        set -- $hd
        timeout 90 python3 -m bench.attention_jvp --seq-lens 4096 8192 16384 --head-dim $1 --heads $2 --reps 5 \
            --out "$OUT/attention_jvp_d$1.json" 2>&1 | tail -8 | tee "$OUT/attention_jvp_d$1.log"
      done ;;
    mfu-b|mfu-xl|mfu-pmf|mfu-b-reads8)
      # The MFU table: compiled fm / fast at larger per-GPU batches. mfu-b-reads8: mfu-b with inductor
      # recomputing results of up to 8 reads in their consumers (default 4): on CPU inductor 6% fewer generated
      # bytes for fm, for fast too or not depending on the lowering thresholds (bench/RESULTS.md); run it
      # right after mfu-b to compare.
      extra=(); tag=
      case $stage in
        mfu-b) set -- mit-b 32 32 4 2 128 imf ;;
        mfu-xl) set -- mit-xl 32 32 4 2 64 imf ;;
        mfu-pmf) set -- pmf-b 256 256 3 16 64 pmf ;;
        mfu-b-reads8) set -- mit-b 32 32 4 2 128 imf; extra=(--inductor realize_reads_threshold=8); tag=_reads8 ;;
      esac
      timeout 280 python3 bench/jvp_throughput.py --model $1 --input-size $2 $3 --channels $4 --patch-size $5 \
          --batch $6 --variant $7 --cases fm,fast --compile --steps 5 --warmup 2 --no-cpu-peak "${extra[@]}" \
          --out "$OUT/mfu_$1_b$6$tag.json" 2>&1 | filter | tee "$OUT/mfu_$1_b$6$tag.log" ;;
    mem64)
      timeout 120 python3 bench/jvp_throughput.py --model mit-b --input-size 64 64 64 --channels 4 --batch 1 \
          --steps 2 --warmup 0 --cases fm,fast --no-cpu-peak --out "$OUT/jvp_mitb_3d_64cube.json" 2>&1 \
          | filter | tee "$OUT/jvp_mitb_3d_64cube.log" ;;
    fid)
      timeout 150 python3 bench/fid_throughput.py --model mit-b --input-size 32 32 --channels 4 --vae --batch 250 \
          --batches 4 --out "$OUT/fid_mitb.json" 2>&1 | tail -2 | tee "$OUT/fid_mitb.log" ;;
    profile-compiled)
      # Where the compiled step's time goes (the roofline of bench/step_bytes.py leaves it 3x short at batch 32).
      timeout 200 python3 bench/profile_step.py --batch 128 --case fm --compile --out "$OUT/prof_2d_fm_compiled_b128.txt" 2>&1 | head -3
      timeout 250 python3 bench/profile_step.py --batch 128 --compile --out "$OUT/prof_2d_fast_compiled_b128.txt" 2>&1 | head -3 ;;
    profile)
      timeout 50 python3 bench/profile_step.py --batch 32 --out "$OUT/prof_2d_fast.txt" 2>&1 | head -3
      timeout 60 python3 bench/profile_step.py --input-size 48 48 48 --batch 1 --out "$OUT/prof_3d_fast.txt" 2>&1 | head -3 ;;
    *) echo "unknown stage $stage (check, attention, mfu-b, mfu-b-reads8, mfu-xl, mfu-pmf, 3dcompiled, 3dcompiled-1class, mem64, profile-compiled, 2d, cudagraphs, blocks, 3d, profile, fid)"; exit 2 ;;
  esac
done
if [ -n "${DRY:-}" ]; then
  command python3 bench/check_commands.py "$OUT/commands.txt"
fi
