"""Time attention forward + JVP and backward: triton backend vs math attention vs SDPA flash.

    python -m bench.attention_jvp --out attention_jvp.json              # CUDA: N = 256 .. 16384
    python -m bench.attention_jvp --seq-lens 1024 4096 --batch 2        # a subset

Per sequence length N, on (B, H, N, D) inputs stored (B, N, H, D) as MiT's projections store them,
with autograd recording (as in a train step):
  triton fwd      kernels.attention(backend="triton"), primal only
  triton fwd+jvp  the same under torch.func.jvp (O and dO in one fused pass)
  triton bwd      backward of the jvp's primal output (flash backward from the saved LSE)
  triton bwd atomic  the same with set_backward("atomic"): dQ added by fp32 atomics inside the
                  dK/dV kernel (5 matmuls per block pair instead of two kernels' 7)
  triton bwd sdpa the same with set_backward("sdpa"): SDPA's own backward kernel (cuDNN's) run on
                  the fused forward's O and log-sum-exp
  triton fwd+jvp lazy  the same with set_rescale("lazy"): accumulators rescaled only when a row
                  max grows by more than 2^8
  kernel fwd+jvp  the fused forward+tangent launch alone (what the train step's custom op runs,
                  without torch.func.jvp around it)
  math fwd+jvp    softmax(s Q K^T) V as plain ops under torch.func.jvp (N x N tensors)
  math bwd        its backward
  sdpa fwd / bwd  torch SDPA pinned to the flash backend: the forward-only cost floor
  cudnn fwd / bwd torch SDPA pinned to cuDNN, what SDPA picks on an H100 for these shapes (the
                  train step's primal passes); "n/a" where this build has no cuDNN attention
Times are medians of CUDA-event-timed calls; memory is the peak allocated on top of the inputs
(for bwd: on top of inputs + forward outputs/graph). A case that runs out of memory is "OOM".
TFLOP/s count matmul FLOPs as kernels/flops.py does (PyTorch's SDPA convention: forward 2
matmuls, forward+tangent 6, backward 5, whatever a kernel recomputes).
Each row also names the tile (BLOCK_M x BLOCK_N, warps, stages) the autotuner chose per Triton
kernel, to set beside bench/kernel_sass.py's instruction counts per tile.
Ratios are taken within this run only. Without CUDA the script runs one tiny configuration in
the Triton interpreter to check itself; its timings mean nothing.
"""
import argparse
import json
import os
import statistics
import time

import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from kernels import attention  # noqa: E402
from kernels import attention_triton as at  # noqa: E402
from kernels.flops import attention_flops  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    # argparse, not tyro: the device image this runs on has no tyro
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=10,
                   help="timed calls per case (after 2 warm-up calls, which include Triton autotuning)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def math_attention(q, k, v):
    return torch.softmax(q.shape[-1] ** -0.5 * q @ k.transpose(-2, -1), dim=-1) @ v


def triton_attention(q, k, v):
    return attention(q, k, v, backend="triton")


def sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def sdpa_cudnn(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # launches are asynchronous: time the work, not the launch


def _measure(fn, reps: int) -> dict:
    """Median time of fn() and the peak memory one call allocates beyond what is live before."""
    for _ in range(2):
        fn()
    _sync()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    result = {"ms": round(statistics.median(times), 4)}
    if torch.cuda.is_available():
        result["peak_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    return result


def _case(name: str, fwd, jvp: bool, inputs, reps: int, backward: bool = True) -> dict:
    """{"name fwd[+jvp]": ..., "name bwd": ...} (bwd only if asked), each a timing or "OOM"."""
    q, k, v, tq, tk, tv, grad_o = inputs
    label = f"{name} fwd+jvp" if jvp else f"{name} fwd"
    run = (lambda: torch.func.jvp(fwd, (q, k, v), (tq, tk, tv))[0]) if jvp else (lambda: fwd(q, k, v))
    results = {}
    try:
        results[label] = _measure(run, reps)
        if backward:
            o = run()
            results[f"{name} bwd"] = _measure(
                lambda: torch.autograd.grad(o, (q, k, v), grad_o, retain_graph=True), reps)
    except torch.OutOfMemoryError:
        results.setdefault(label, "OOM")
        if backward:
            results[f"{name} bwd"] = "OOM"
    except RuntimeError as e:  # e.g. no cuDNN attention kernel for this build or shape
        print(f"{label}: {str(e).splitlines()[0][:120]}")
        results.setdefault(label, "n/a")
        if backward:
            results[f"{name} bwd"] = "n/a"
    finally:
        o = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def _chosen_tile(kernel) -> str | None:
    """The autotuner's choice at its last launch, as "M x N, warps w, stages s" (None before any)."""
    c = getattr(kernel, "best_config", None)
    if c is None:
        return None
    return f"{c.kwargs['BLOCK_M']} x {c.kwargs['BLOCK_N']}, warps {c.num_warps}, stages {c.num_stages}"


def _ratio(results: dict, num: str, den: str):
    a, b = results.get(num), results.get(den)
    if isinstance(a, dict) and isinstance(b, dict):
        return round(a["ms"] / b["ms"], 2)
    return None


def main(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available()
    if not cuda:
        print("bench.attention_jvp: no CUDA, so one tiny fp32 sanity case runs in the Triton "
              "interpreter; its timings are meaningless")
        args = argparse.Namespace(**{**vars(args), "seq_lens": [40], "batch": 1, "heads": 2, "head_dim": 16,
                                     "dtype": "fp32", "reps": 1})
    device, dtype = ("cuda" if cuda else "cpu"), DTYPES[args.dtype]
    device_name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"device: {device_name}; (B, H, D) = ({args.batch}, {args.heads}, {args.head_dim}), "
          f"{args.dtype}; cells: median ms (peak MiB)")
    rows = []
    report = {
        "bench": "attention_jvp",
        "device": device_name,
        "torch": torch.__version__,
        "shape": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim},
        "dtype": args.dtype, "reps": args.reps, "rows": rows,
    }
    for n in args.seq_lens:
        gen = torch.Generator().manual_seed(n)
        shape = (args.batch, args.heads, n, args.head_dim)
        stored = (args.batch, n, args.heads, args.head_dim)  # (B, N, H, D), as MiT's projections store them
        q, k, v, tq, tk, tv, grad_o = (torch.randn(stored, generator=gen).to(device, dtype).transpose(1, 2)
                                       for _ in range(7))
        for x in (q, k, v):
            x.requires_grad_(True)
        inputs = (q, k, v, tq, tk, tv, grad_o)
        # triton's backward is timed once, after the jvp (the MeanFlow pattern)
        results = _case("triton", triton_attention, False, inputs, args.reps, backward=False)
        tiles = {"fwd": _chosen_tile(at._attn_fwd)}
        results |= _case("triton", triton_attention, True, inputs, args.reps)
        tiles |= {"fwd+jvp": _chosen_tile(at._attn_fwd), "bwd dk dv": _chosen_tile(at._attn_bwd_dkdv),
                  "bwd dq": _chosen_tile(at._attn_bwd_dq)}
        at.set_backward("atomic")
        try:
            results |= {f"{c} atomic": r for c, r in _case("triton", triton_attention, True, inputs, args.reps).items()
                        if c.endswith("bwd")}
            tiles["bwd dk dv + atomic dq"] = _chosen_tile(at._attn_bwd_dkdv)
        finally:
            at.set_backward("two-pass")
        at.set_backward("sdpa")
        try:
            if at._sdpa_takes(q, k, v):
                results |= {f"{c} sdpa": r for c, r in _case("triton", triton_attention, True, inputs, args.reps).items()
                            if c.endswith("bwd")}
            else:
                results["triton bwd sdpa"] = "n/a"  # these inputs would take the two-pass kernels
        finally:
            at.set_backward("two-pass")
        at.set_rescale("lazy")
        try:
            results |= {f"{c} lazy": r for c, r in _case("triton", triton_attention, True, inputs, args.reps,
                                                         backward=False).items()}
            tiles["fwd+jvp lazy"] = _chosen_tile(at._attn_fwd)
        finally:
            at.set_rescale("always")
        with torch.no_grad():  # random tangents stand for the scaled ones the launch takes
            results["kernel fwd+jvp"] = _measure(lambda: at._flash_forward(q, k, v, tq, tk, tv, args.head_dim ** -0.5),
                                                 args.reps)
        results |= _case("math", math_attention, True, inputs, args.reps)
        if cuda:  # the flash and cuDNN SDPA backends exist on CUDA only
            results |= _case("sdpa", sdpa, False, inputs, args.reps)
            results |= _case("cudnn", sdpa_cudnn, False, inputs, args.reps)
        ratios = {
            "math/triton fwd+jvp": _ratio(results, "math fwd+jvp", "triton fwd+jvp"),
            "math/triton bwd": _ratio(results, "math bwd", "triton bwd"),
            "triton fwd+jvp / sdpa fwd": _ratio(results, "triton fwd+jvp", "sdpa fwd"),
            "triton fwd / sdpa fwd": _ratio(results, "triton fwd", "sdpa fwd"),
            "triton bwd / sdpa bwd": _ratio(results, "triton bwd", "sdpa bwd"),
            "triton fwd+jvp / cudnn fwd": _ratio(results, "triton fwd+jvp", "cudnn fwd"),
            "triton bwd / cudnn bwd": _ratio(results, "triton bwd", "cudnn bwd"),
            "triton bwd atomic / cudnn bwd": _ratio(results, "triton bwd atomic", "cudnn bwd"),
            "triton bwd atomic / triton bwd": _ratio(results, "triton bwd atomic", "triton bwd"),
            "triton bwd sdpa / cudnn bwd": _ratio(results, "triton bwd sdpa", "cudnn bwd"),
            "triton bwd sdpa / triton bwd": _ratio(results, "triton bwd sdpa", "triton bwd"),
            "triton fwd+jvp lazy / triton fwd+jvp": _ratio(results, "triton fwd+jvp lazy", "triton fwd+jvp"),
        }
        matmuls = {"triton fwd": 2, "kernel fwd+jvp": 6, "triton fwd+jvp": 6, "triton fwd+jvp lazy": 6, "triton bwd": 5,
                   "triton bwd atomic": 5, "triton bwd sdpa": 5, "sdpa fwd": 2, "sdpa bwd": 5, "cudnn fwd": 2, "cudnn bwd": 5}
        tflops = {c: round(attention_flops(shape, shape, m) / results[c]["ms"] / 1e9, 1)
                  for c, m in matmuls.items() if isinstance(results.get(c), dict)}
        rows.append({"N": n, "results": results, "ratios": ratios, "tflops": tflops, "tiles": tiles})
        _print_row(rows[-1], header=len(rows) == 1)
        if args.out:  # after every row: a run cut short by a time limit keeps the rows it finished
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
        del q, k, v, tq, tk, tv, grad_o, inputs
    return report


COLUMNS = ["triton fwd", "triton fwd+jvp", "triton fwd+jvp lazy", "kernel fwd+jvp", "triton bwd", "triton bwd atomic",
           "triton bwd sdpa", "math fwd+jvp", "math bwd", "sdpa fwd", "sdpa bwd", "cudnn fwd", "cudnn bwd"]
RATIOS = ["math/triton fwd+jvp", "math/triton bwd", "triton fwd+jvp / sdpa fwd",
          "triton fwd / sdpa fwd", "triton bwd / sdpa bwd", "triton fwd+jvp / cudnn fwd",
          "triton bwd / cudnn bwd", "triton bwd atomic / cudnn bwd", "triton bwd atomic / triton bwd",
          "triton bwd sdpa / cudnn bwd", "triton bwd sdpa / triton bwd", "triton fwd+jvp lazy / triton fwd+jvp"]


def _print_row(row: dict, header: bool) -> None:
    def cell(r):
        if r is None:
            return "-"
        if isinstance(r, str):  # "OOM" or "n/a"
            return r
        return f"{r['ms']:.3f} ({r['peak_MiB']:.0f})" if "peak_MiB" in r else f"{r['ms']:.3f}"

    if header:
        print(f"{'N':>6} " + " ".join(f"{c:>15}" for c in COLUMNS) + " | " + " | ".join(RATIOS))
    print(f"{row['N']:>6} " + " ".join(f"{cell(row['results'].get(c)):>15}" for c in COLUMNS)
          + " | " + " | ".join(f"{'-' if row['ratios'][r] is None else row['ratios'][r]:>{len(r)}}"
                               for r in RATIOS))
    print(f"{'':>6} TFLOP/s: " + ", ".join(f"{c} {t}" for c, t in row["tflops"].items()))
    print(f"{'':>6} tiles: " + "; ".join(f"{k} {t}" for k, t in row["tiles"].items()))


if __name__ == "__main__":
    main(parse_args())
