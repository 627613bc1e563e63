"""Time the fused adaptive loss (triton) against the unfused torch reference, forward + backward.

    python -m bench.loss_kernel --shape 256 4 32 32 --dtype bf16 --device cuda --out loss.json
    python -m bench.loss_kernel --shape 8 4 48 48 48 --device cpu        # torch backend only

One step = adaptive_sq_loss(...) then the pred-gradient of weighted.mean(). The triton backend
needs CUDA (on CPU it exists only in the slow interpreter), so a CPU run times torch alone.
Reported per backend: first-call time (Triton JIT, allocator warm-up) apart from the steady state;
latency (median synchronised step, CPU launch work included); on CUDA, device time (median
CUDA-graph replay), the effective bandwidth over the minimum bytes, and the peak extra memory.
"""
import argparse
import json
import statistics
import time

import torch

from kernels.loss import adaptive_sq_loss

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    # argparse, not tyro: the device image this runs on has no tyro
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs="+", default=[256, 4, 32, 32], help="(B, C, H, W) or (B, C, D, H, W)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tangent", action=argparse.BooleanOptionalAction, default=True,
                   help="u-term with a tangent (3 input streams) rather than the v-term (2)")
    p.add_argument("--p", type=float, default=1.0)
    p.add_argument("--eps", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernel launches are asynchronous: time the work, not the launch


def _graph_ms(step, reps: int) -> float:
    """Median device time of one step, replayed from a CUDA graph so launch gaps drop out."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture needs the step's first-use work done off-graph
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(10):  # several replays per event pair: one replay is near the event cost
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 10)
    return statistics.median(times)


def bench_backend(args: argparse.Namespace, backend: str, inputs) -> dict:
    pred, target, tangent, coef = inputs
    device = pred.device

    def step():
        weighted, _ = adaptive_sq_loss(pred, target, tangent, coef, eps=args.eps, p=args.p,
                                       backend=backend)
        return torch.autograd.grad(weighted.mean(), pred)[0]

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    _sync(device)
    t0 = time.perf_counter()
    grad = step()
    _sync(device)
    first_ms = 1e3 * (time.perf_counter() - t0)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    # Latency: one synchronised step from Python, the CPU's launch work included; on a GPU it is
    # mostly that for small inputs. Device time (CUDA only) is what a train step, whose launches
    # run ahead of the GPU, pays.
    result = {"first_call_ms": round(first_ms, 3), "latency_ms": round(statistics.median(times), 4)}
    if device.type == "cuda":
        result["peak_extra_MiB"] = round((torch.cuda.max_memory_allocated() - base_mem) / 2**20, 1)
        result["device_ms"] = round(_graph_ms(step, args.iters), 4)
    # Minimum traffic: the forward reads each input stream once, the backward reads them again
    # and writes the gradient.
    streams = 3 if tangent is not None else 2
    bytes_moved = pred.numel() * pred.element_size() * (2 * streams + 1)
    ms = result.get("device_ms", result["latency_ms"])
    result["effective_GBps"] = round(bytes_moved / ms / 1e6, 1)
    return result | {"_grad": grad}


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    shape = tuple(args.shape)
    pred, target, tangent = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    pred.requires_grad_(True)
    coef = torch.rand(shape[0], generator=gen).to(device)
    inputs = (pred, target, tangent if args.tangent else None, coef if args.tangent else None)

    backends = ["torch"]
    if device.type == "cuda":
        backends.append("triton")
    else:
        print("triton backend skipped: it needs CUDA (on CPU only the slow interpreter runs it)")
    results = {b: bench_backend(args, b, inputs) for b in backends}
    grads = {b: r.pop("_grad") for b, r in results.items()}

    report = {
        "bench": "loss_kernel",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": list(shape), "dtype": args.dtype, "tangent": args.tangent, "p": args.p,
        "eps": args.eps, "iters": args.iters, "results": results,
    }
    if "triton" in results:
        report["speedup_device"] = round(results["torch"]["device_ms"] / results["triton"]["device_ms"], 2)
        report["speedup_latency"] = round(results["torch"]["latency_ms"] / results["triton"]["latency_ms"], 2)
        err = (grads["triton"].float() - grads["torch"].float()).abs().max().item()
        report["grad_max_abs_diff"] = err
    for b, r in results.items():
        print(f"{b:>6}: {r}")
    if "triton" in results:
        print(f"triton speedup: device time {report['speedup_device']}x, latency "
              f"{report['speedup_latency']}x on {report['device']}; "
              f"grad max |diff| {report['grad_max_abs_diff']:.3g}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main(parse_args())
