"""A train step's GPU memory, predicted on any machine: the step run on fake tensors.

    python bench/step_memory.py --model mit-b --input-size 64 64 64 --channels 4 --batch 1
    python bench/step_memory.py --model mit-b --input-size 32 32 --channels 4 --fit 80   # largest batch in 80 GiB

bench/jvp_throughput.py's cases (same model, draws, loss, backward and Adam) run under
FakeTensorMode: every op computes its output's shape, dtype and strides but no values, so MiT-B on
a 64^3 volume takes seconds on a CPU and needs no GPU. A dispatch mode follows every storage the
step allocates and frees. As on the GPU: bf16 autocast (CPU autocast on fake CPU tensors casts
linear, matmul and SDPA as CUDA's does; norms compute in fp32 as the model writes them), SDPA for
the primal attention, and for rows with a tangent the fused attention op (its fake kernel stands
in for the Triton launch: it returns what the GPU kernel allocates), and F.rms_norm as a CUDA build
dispatches it: one fused op forward and one backward, where a CPU build runs five ops and their
backward ops (a stand-in pair with the fused op's outputs and saved tensors, `cuda_rms_norm`).

Per case: the step's matmul FLOPs (counted as bench/jvp_throughput.py counts them: shapes are all
they need), the aten ops the loss and its backward dispatch on the GPU's path (what an eager step
pays in launches and CPU dispatch; the draws and Adam left out), saved activations and step peak
as jvp_throughput.py measures them (the most bytes live during a step above what was live before
it: gradients of the previous step, freed by zero_grad, count as live before), the persistent
state (fp32 weights, gradients, Adam's two moments) and total = state + step peak. Not counted:
the CUDA context, cuBLAS / cuDNN workspaces and allocator rounding (together about 1 GiB). Eager
steps: a compiled step keeps less (the H100 measured 6218 MiB compiled against 9959 MiB eager for
fast MiT-B/2 at batch 32). pMF's perceptual networks are not in the step, as in jvp_throughput.py.
JSON goes to --out.
"""
import argparse
import contextlib
import json
import os
import sys
import time
import weakref
from pathlib import Path
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the fused attention op's checks pass on CPU
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastmf.models import functional  # noqa: E402
from fastmf.models.layers import compute_dtype  # noqa: E402
from fastmf.objectives import objective_defaults  # noqa: E402
from jvp_throughput import OpCounter, add_model_args, build_model, case_plan, saved_bytes  # noqa: E402
from kernels.flops import count_flops  # noqa: E402

MiB = 2**20


# F.rms_norm as a CUDA build runs it: aten._fused_rms_norm (output and rstd; autograd saves the input
# and rstd) and aten._fused_rms_norm_backward, one dispatch each. A CPU build decomposes it (pow,
# mean, add, rsqrt, mul and their backward ops), which would count some 1,400 ops a MiT-B/2 step
# does not dispatch on a GPU. Values are exact, so the real CPU step stays a true step.
@torch.library.custom_op("step_memory::fused_rms_norm", mutates_args=())
def fused_rms_norm(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # (..., 1) in CUDA's accumulate dtype: fp32, or fp64 for fp64
    rstd = torch.rsqrt(x.to(compute_dtype(x.dtype)).pow(2).mean(-1, keepdim=True) + eps)
    return (x * rstd).to(x.dtype), rstd


@fused_rms_norm.register_fake
def _(x, eps):
    return torch.empty_like(x), x.new_empty((*x.shape[:-1], 1), dtype=compute_dtype(x.dtype))


@torch.library.custom_op("step_memory::fused_rms_norm_backward", mutates_args=())
def fused_rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    n = x * rstd
    return (rstd * (grad - n * (n * grad).mean(-1, keepdim=True))).to(x.dtype)


@fused_rms_norm_backward.register_fake
def _(grad, x, rstd):
    return torch.empty_like(x)


def _save_input_and_rstd(ctx, inputs, output):
    # rstd has no gradient and its undefined one stays undefined: otherwise autograd would dispatch
    # a detach and a zeros per norm that CUDA's op does not.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inputs[0], output[1])


def _rms_norm_backward(ctx, grad, _grad_rstd):
    return None if grad is None else fused_rms_norm_backward(grad, *ctx.saved_tensors), None


fused_rms_norm.register_autograd(_rms_norm_backward, setup_context=_save_input_and_rstd)


def cuda_rms_norm():
    """F.rms_norm dispatched as on CUDA, for the norms fastmf writes (no weight, last dim). Under
    torch.func.jvp (the naive step's tangent pass) it stays decomposed: the stand-in has no JVP rule."""
    plain = F.rms_norm

    def rms_norm(x, normalized_shape, weight=None, eps=None):
        if weight is not None or len(normalized_shape) != 1 or torch._C._functorch.is_functorch_wrapped_tensor(x):
            return plain(x, normalized_shape, weight, eps)
        return fused_rms_norm(x, torch.finfo(x.dtype).eps if eps is None else eps)[0]
    return mock.patch.object(F, "rms_norm", rms_norm)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive now and at most, among those made inside the mode or `add`ed.

    A storage is counted once however many tensors view it, and leaves the count when it is freed
    (a weakref finalizer on the storage, whose Python object lives as long as the storage does).
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def add(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def measure(args, case: str, batch: int, fake: bool = True) -> dict:
    """Memory of one step of `case` at `batch` (MiB), on fake tensors or (fake=False, to check
    the prediction) on real CPU tensors."""
    with FakeTensorMode() if fake else contextlib.nullcontext(), cuda_rms_norm():
        model = build_model(args)
        draw_fn, loss_fn, attn = case_plan(model.record["variant"])[case]
        # "auto" on a CPU would pick math attention for the tangent rows; the GPU's choice is
        # SDPA for primal work and the fused op for rows with a tangent, which "sdpa" gives here.
        model.set_attention_backend("sdpa" if attn == "auto" else attn)
        params = dict(model.named_parameters())
        opt = torch.optim.Adam(params.values(), lr=1e-5)
        apply = functional(model)
        x = torch.randn(batch, args.channels, *args.input_size)
        y = torch.randint(0, args.num_classes, (batch,))
        cfg = objective_defaults(model.record["variant"], num_classes=args.num_classes)
        gen = torch.Generator().manual_seed(0)
        amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")  # noqa: E731
        compute = lambda: loss_fn(apply, params, x, y, draw_fn(x, gen, cfg), cfg)  # noqa: E731

        def step():
            with amp():
                loss, _ = compute()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        with amp():
            saved = saved_bytes(compute)
        flops = count_flops(step)  # also the step before: Adam's moments and the previous gradients exist
        tracker = LiveBytes()
        for p in params.values():
            tracker.add(p.grad)
        before = tracker.now
        with tracker:
            step()
        state = sum(t.nbytes for t in tree_leaves([params, [p.grad for p in params.values()], opt.state_dict()["state"]])
                    if isinstance(t, torch.Tensor))
        # What the eager GPU step dispatches for loss and backward (each op at least a kernel launch
        # or a CPU-side dispatch), without the draws and Adam (fused on CUDA, a loop per tensor here).
        ops = OpCounter()
        with amp(), ops:
            loss, _ = compute()
        with ops:
            loss.backward()
    peak = tracker.peak - before
    return {"case": case, "batch": batch, "saved_activation_MiB": saved / MiB, "step_peak_MiB": peak / MiB,
            "state_MiB": state / MiB, "total_MiB": (state + peak) / MiB, "gflop_per_step": flops / 1e9,
            "aten_ops_loss_backward": ops.n}


def largest_batch(args, case: str, capacity_mib: float) -> dict | None:
    """The largest batch whose total fits in capacity: doubling, then bisection (memory grows with the batch)."""
    fits = lambda r: r["total_MiB"] <= capacity_mib  # noqa: E731
    best, lo, hi = None, 0, 1
    while True:
        r = measure(args, case, hi)
        if not fits(r):
            break
        best, lo, hi = r, hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        r = measure(args, case, mid)
        if fits(r):
            best, lo = r, mid
        else:
            hi = mid
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, model="mit-b", input_size=(32, 32), channels=4)
    p.add_argument("--batch", type=int, default=32, help="per-GPU batch (ignored with --fit)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="bf16: autocast, as a GPU step runs")
    p.add_argument("--cases", default="fm,fast", help="comma list of fm, naive, fast")
    p.add_argument("--fit", type=float, default=None, metavar="GIB",
                   help="instead of --batch: the largest batch per case whose total fits in GIB GiB")
    p.add_argument("--out", default="bench/step_memory.json")
    args = p.parse_args()
    if len(args.input_size) not in (2, 3) or args.batch < 1 or (args.fit is not None and args.fit <= 0):
        p.error("--input-size takes 2 or 3 ints; --batch and --fit must be positive")
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in ("fm", "naive", "fast"):
            p.error(f"unknown case {c!r}; choose from fm, naive, fast")
    try:
        with torch.device("meta"):  # sizes only
            tokens = build_model(args).spec.num_tokens
    except ValueError as e:
        p.error(str(e))
    print(f"{args.model} {tuple(args.input_size)} p{args.patch_size}: {tokens} tokens, {args.dtype}, "
          + (f"largest batch within {args.fit:g} GiB" if args.fit else f"batch {args.batch}"))
    results = []
    for c in cases:
        t0 = time.perf_counter()
        r = largest_batch(args, c, args.fit * 1024) if args.fit else measure(args, c, args.batch)
        results.append(r or {"case": c, "batch": 0, "error": f"batch 1 does not fit in {args.fit:g} GiB"})
        print(f"{c}: {json.dumps(results[-1])} ({time.perf_counter() - t0:.1f} s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"predicted_on": "fake tensors (no device)", "torch": torch.__version__, "args": vars(args), "tokens": tokens}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print("\n| case | batch | GFLOP/step | aten ops (loss + backward) | saved act. MiB | step peak MiB | state MiB "
          "| total GiB |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | {r['error']} | | | | | | |")
        else:
            print(f"| {r['case']} | {r['batch']} | {r['gflop_per_step']:.0f} | {r['aten_ops_loss_backward']} "
                  f"| {r['saved_activation_MiB']:.0f} | {r['step_peak_MiB']:.0f} | {r['state_MiB']:.0f} "
                  f"| {r['total_MiB'] / 1024:.1f} |")
    done = {r["case"]: r for r in results if "error" not in r}
    if "fm" in done and "fast" in done and not args.fit:
        for key, name in (("gflop_per_step", "FLOPs"), ("aten_ops_loss_backward", "aten ops")):
            print(f"fast/fm {name}: {done['fast'][key] / done['fm'][key]:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
