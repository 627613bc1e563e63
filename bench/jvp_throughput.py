"""The benchmark of record: one MeanFlow train step, fastmf vs the naive way vs plain flow matching.

    python bench/jvp_throughput.py                                   # CPU: mit-tiny on 8x8, fp32
    python bench/jvp_throughput.py --model mit-b --input-size 32 32 --channels 4 --batch 64 --dtype bf16
    python bench/jvp_throughput.py --model mit-b --input-size 48 48 48 --channels 4 --batch 1 --dtype bf16
    python bench/jvp_throughput.py --model dit-tiny                  # MeanFlow's DiT, MF (its only variant)

Cases, same model weights and batch, each a full step (loss, backward, Adam):
  fm     plain flow matching, every head the backbone has at r = t, attention "sdpa" (the floor)
  naive  the reference objective as PyTorch repos run it today: torch.func.jvp over the whole
         net with math attention, tangent ops recorded by autograd, unfused loss, no compile
  fast   fastmf: fastmf.train_step (guidance in one no-grad call of 1.5B samples, then one
         with-grad pass that carries du/dt by hand-written JVP rules, no tangent graph, fused
         loss); attention "auto" = SDPA for plain rows, the fused Triton forward+tangent op for
         rows with a tangent on CUDA (math on CPU)
`--compile` adds torch.compile'd fm and fast steps (loss + backward compiled, draws and Adam
eager; `--compile-mode reduce-overhead` replays them as CUDA graphs; `--compile-scope blocks`
compiles the transformer blocks only, as `train.py --compile-scope blocks`).
Each case has its own copy of the weights and its own Adam. After warm-up the cases run in
interleaved rounds (one step of each per round, synchronised) and report the median: machine
noise then hits all cases alike. Reports ms/step (median, min, max), samples/s, the FLOPs of one
step (every matmul executed, guidance and tangent work included: torch.utils.flop_counter with
kernels/flops.py's formulas for the custom attention ops; a compiled step is credited with its
eager twin's count), TFLOP/s and MFU over --peak-tflops (bf16 dense peak on H100 / H200), the aten ops
one eager step dispatches (each at least one kernel launch on a GPU), peak memory
(step_peak_MiB = the largest peak during a step minus what was allocated before it: CUDA allocator
statistics over the timed steps; on CPU the profiler's memory timeline of one eager step) and the
activation memory autograd keeps for backward (saved tensors, measured eagerly on any device),
ratios fast/fm and fast/naive, and compile time (first step) apart from steady state. JSON goes
to --out.
"""
import argparse
import ast
import copy
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmf.models import PRESETS, VARIANTS, Conditions, build, functional  # noqa: E402
from fastmf.objectives import LOSSES_FROM_DRAWS, draw, objective_defaults  # noqa: E402
from fastmf.train_step import fast_loss_from_draws  # noqa: E402
from kernels.attention_triton import BACKWARDS, set_backward  # noqa: E402
from kernels.flops import count_flops  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, for MFU: H100 / H200 SXM 989.4.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}


def fm_draw(x, gen, cfg):
    """Flow matching's randomness: t (B,) and noise like x."""
    t = torch.rand(x.shape[0], generator=gen, device=gen.device).to(x.device, x.dtype)
    return t, torch.randn(x.shape, generator=gen, device=gen.device).to(x.device, x.dtype)


def fm_loss_from_draws(apply, params, x, y, d, cfg):
    """Flow matching: every head the backbone has regresses v_t at h = 0 (no JVP, no guidance)."""
    t, e = d
    tb = t.reshape(-1, *[1] * (x.dim() - 1))
    z_t, v_t = (1 - tb) * x + tb * e, e - x
    loss = sum((out - v_t).pow(2).mean() for out in apply(params, z_t, *Conditions.full(t, y)) if out is not None)
    return loss, {"loss": loss.detach()}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a step dispatches (forward, backward, optimizer): in eager mode each is
    at least one kernel launch, so this is the launch work a CPU-bound GPU step pays."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # prims (prim::device, ...) are queries fake tensors make, not ops a step dispatches
        self.n += func.namespace != "prim"
        return func(*args, **(kwargs or {}))


def cpu_step_peak_bytes(step) -> float:
    """Peak bytes of CPU tensors allocated during step() above what was live before it, from the
    profiler's memory timeline (CPU has no allocator statistics; this reads a private profiler
    API, so a failure reports NaN instead of stopping the benchmark)."""
    from torch.profiler import ProfilerActivity, profile
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            step()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        return float(max(sum(row) for row in sizes)) if sizes else 0.0
    except Exception as e:  # noqa: BLE001 - private API: report, do not fail the run
        print(f"CPU peak memory unavailable: {type(e).__name__}: {e}".splitlines()[0])
        return float("nan")


def saved_bytes(fn) -> int:
    """Bytes of tensors autograd saves for backward during fn() (distinct storages; real or fake
    tensors: storages are told apart by their StorageImpl, which fake storages have too)."""
    seen = {}

    def pack(t):
        try:
            # Hold the storage, not the tensor: its identity stays unique while we count, and
            # holding t would tie saved outputs to their own grad_fn in a cycle that no collector
            # frees, leaking the whole graph.
            storage = t.untyped_storage()
            seen[storage._cdata] = storage
        except (RuntimeError, NotImplementedError):  # wrapper tensors without storage
            seen[id(t)] = t.numel() * t.element_size()
        return None

    def unpack(_):
        raise RuntimeError("graph built only to measure saved tensors; it cannot run backward")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss, _ = fn()
    del loss
    return sum(v if isinstance(v, int) else v.nbytes() for v in seen.values())


def add_model_args(p: argparse.ArgumentParser, model: str = "mit-tiny", input_size=(8, 8), channels: int = 1):
    """The model and input options of the step benchmarks (this one, step_memory.py, step_bytes.py)."""
    p.add_argument("--model", default=model, choices=list(PRESETS))
    p.add_argument("--variant", default=None, choices=VARIANTS, help="default: iMF, or MF for backbones without a v-head")
    p.add_argument("--input-size", type=int, nargs="+", default=list(input_size), help="2 ints (image) or 3 (volume)")
    p.add_argument("--channels", type=int, default=channels)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--depth", type=int, default=None,
                   help="override the preset's depth (trunk + one head), e.g. a shallow model of the same width")
    p.add_argument("--aux-head-depth", type=int, default=None, help="override the preset's head depth (MiT)")
    p.add_argument("--num-classes", type=int, default=10,
                   help="1 = unlabelled data: iMF/pMF then train without CFG (omega 1), and the fast step's "
                        "guidance call holds only the tangent rows")


def inductor_option(text: str) -> tuple[str, object]:
    """argparse type of --inductor: KEY=VALUE -> (KEY, VALUE read as the option's current type), so
    that a bad option fails while the arguments are parsed (bench/check_commands.py sees it)."""
    import torch._inductor.config as config
    key, sep, raw = text.partition("=")
    if not sep or not hasattr(config, key):
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY an option of torch._inductor.config")
    current = getattr(config, key)
    try:
        if isinstance(current, bool):
            return key, {"true": True, "false": False}[raw.lower()]
        if isinstance(current, (int, float, str)):
            return key, type(current)(raw)
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: {key} takes {type(current).__name__} values") from None
    if current is None:  # an unset option (e.g. realize_opcount_threshold): a Python literal, else text
        try:
            return key, ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return key, raw
    raise argparse.ArgumentTypeError(f"{text!r}: only bool, int, float, str and unset options can be set here")


def add_inductor_arg(p: argparse.ArgumentParser):
    """--inductor KEY=VALUE: a torch._inductor.config option for every compile of the run (repeatable)."""
    p.add_argument("--inductor", type=inductor_option, action="append", default=[], metavar="KEY=VALUE",
                   help="set a torch._inductor.config option for every compiled step of this run (repeatable; "
                        "e.g. realize_reads_threshold=8); compare with a run without it on the same device")


def set_inductor_options(options: list[tuple[str, object]]):
    """Applies the parsed --inductor options."""
    import torch._inductor.config as config
    for key, value in options:
        setattr(config, key, value)


def build_model(args):
    """The benchmarked model of add_model_args' options; ValueError for a bad combination."""
    overrides = {k: getattr(args, k) for k in ("depth", "aux_head_depth") if getattr(args, k, None) is not None}
    return build(args.model, args.variant, input_size=tuple(args.input_size), in_channels=args.channels,
                 patch_size=args.patch_size, num_classes=args.num_classes, **overrides)


def case_plan(variant: str) -> dict:
    """case -> (draw, loss from draws, attention backend). fast's "auto": SDPA for the primal
    passes, for the JVP pass the fused Triton forward+tangent op on CUDA (math on CPU); naive runs
    math attention under torch.func.jvp."""
    return {"fm": (fm_draw, fm_loss_from_draws, "sdpa"),
            "naive": (draw, LOSSES_FROM_DRAWS[variant], "torch"),
            "fast": (draw, fast_loss_from_draws, "auto")}


class Case:
    """One timed train step (loss, backward, Adam) on its own copy of the model and optimizer."""

    def __init__(self, name, draw_fn, loss_fn, model, attn, args, x, y, cfg, device, compiled=False):
        self.name, self.compiled, self.device, self.args = name, compiled, device, args
        self.model = copy.deepcopy(model)
        self.model.set_attention_backend(attn)
        params = dict(self.model.named_parameters())
        # fused Adam on CUDA (as train.py): a few kernels per step instead of several per parameter
        self.opt = torch.optim.Adam(params.values(), lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")
        apply = functional(self.model)
        gen = torch.Generator(device=device).manual_seed(0)
        step_loss = lambda x, y, d: loss_fn(apply, params, x, y, d, cfg)
        if compiled and args.compile_scope == "blocks":  # the blocks' compiled code is shared by all cases
            self.model.compile_blocks()
        elif compiled:  # draws stay eager (explicit generators do not trace), as in train.py
            step_loss = torch.compile(step_loss, mode=None if args.compile_mode == "default" else args.compile_mode)
        self.cudagraphs = compiled and args.compile_scope == "step" and args.compile_mode == "reduce-overhead"
        self.compute = lambda: step_loss(x, y, draw_fn(x, gen, cfg))
        self.amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
        scope = args.compile_scope if args.compile_mode == "default" else f"{args.compile_scope}, {args.compile_mode}"
        self.rec = {"case": name, "attention": attn, "compiled": scope if compiled else False}
        self.times, self.peaks = [], []

    def step(self):
        if self.cudagraphs:  # a new iteration: outputs of the previous replay may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with self.amp():
            loss, _ = self.compute()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def timed_step(self):
        """One synchronised step: its time, and on CUDA its peak above what was allocated before it."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        self.step()
        if cuda:
            torch.cuda.synchronize()
            self.peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
        return time.perf_counter() - t0

    def guarded(self, fn):
        """Run fn; a failing case records its error (out of memory, ...) and drops out."""
        if "error" in self.rec:
            return
        try:
            fn()
        except torch.OutOfMemoryError:
            self.rec["error"] = "out of memory"
        except Exception as e:  # a benchmark reports a failing case and goes on
            self.rec["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            traceback.print_exc()
        if "error" in self.rec:
            self.opt.zero_grad(set_to_none=True)
            self.model, self.opt, self.compute = None, None, None  # free its memory for the others
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def warm_up(self, n):
        def run():
            if not self.compiled:
                with self.amp():
                    self.rec["saved_activation_MiB"] = saved_bytes(self.compute) / 2**20
                counter = OpCounter()
                with counter:
                    self.step()
                self.rec["aten_ops_per_step"] = counter.n
                self.rec["gflop_per_step"] = count_flops(self.step) / 1e9
                if self.device.type == "cpu" and self.args.cpu_peak:
                    self.rec["step_peak_MiB"] = cpu_step_peak_bytes(self.step) / 2**20
            self.rec["first_step_s"] = self.timed_step()   # includes compile / autotune
            for _ in range(n):
                self.timed_step()
            self.peaks.clear()
        self.guarded(run)

    def result(self, batch):
        if "error" not in self.rec and self.times:
            ms = statistics.median(self.times) * 1e3
            self.rec |= {"ms_per_step": ms, "samples_per_s": batch / ms * 1e3,
                         "ms_per_step_min": min(self.times) * 1e3, "ms_per_step_max": max(self.times) * 1e3}
            if self.peaks:
                self.rec["step_peak_MiB"] = max(self.peaks)
        return self.rec


def eager_flops_of(results: list[dict], case: str) -> float:
    return next((r["gflop_per_step"] for r in results if r["case"] == case and "gflop_per_step" in r), float("nan"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed rounds (one step of every case each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case after the first")
    p.add_argument("--cases", default="fm,naive,fast", help="comma list of fm, naive, fast")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd fm and fast steps (naive stays eager by definition)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode; reduce-overhead replays the step as CUDA graphs")
    p.add_argument("--compile-scope", default="step", choices=["step", "blocks"],
                   help="step: the loss and its backward as one graph; blocks: each block's forward and JVP "
                        "rule (MiT.compile_blocks; compiled once for all blocks and cases, so a later case's "
                        "first step includes only what was not compiled yet)")
    p.add_argument("--no-cpu-peak", dest="cpu_peak", action="store_false",
                   help="skip the CPU step peak (the profiler's memory analysis takes seconds for "
                        "mit-tiny but many minutes for mit-b's naive step)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak for MFU (default: bf16 on H100 / H200 989.4; none on CPU)")
    p.add_argument("--flash-backward", default="two-pass", choices=BACKWARDS,
                   help="the backward of the tangent rows' fused attention: Triton flash with dQ from a second "
                        "kernel (two-pass, deterministic) or by fp32 atomics in the dK/dV kernel (atomic: 5 matmuls, "
                        "not 7), or SDPA's own backward kernel on the fused forward's O and log-sum-exp (sdpa: cuDNN)")
    add_inductor_arg(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/jvp_throughput.json")
    args = p.parse_args()
    set_backward(args.flash_backward)
    set_inductor_options(args.inductor)
    if len(args.input_size) not in (2, 3) or args.batch < 1 or args.steps < 1:
        p.error("--input-size takes 2 or 3 ints; --batch and --steps must be >= 1")
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")

    torch.manual_seed(0)
    try:
        model = build_model(args).to(device)
    except ValueError as e:
        p.error(str(e))
    args.variant = model.record["variant"]
    with torch.no_grad():  # zero-initialised gates and modulations made non-zero: every block does real work
        for q in model.parameters():
            if not q.any():
                q.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.channels, *args.input_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device)
    cfg = objective_defaults(args.variant, num_classes=args.num_classes)
    plan = case_plan(args.variant)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name and args.dtype == "bf16"), None)
    meta = {"device": name, "peak_tflops": peak,
            "torch": torch.__version__, "args": vars(args), "tokens": model.spec.num_tokens,
            "params_M": sum(q.numel() for q in model.parameters()) / 1e6}
    print(f"{args.model} {args.variant} {tuple(args.input_size)} p{args.patch_size}: {meta['tokens']} tokens, "
          f"batch {args.batch}, {args.dtype}, {meta['device']}")
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in plan:
            p.error(f"unknown case {c!r}; choose from fm, naive, fast")
    runs = [(c, False) for c in cases] + [(c, True) for c in cases if args.compile and c != "naive"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save(live):
        """Write what is measured so far: a run cut short by a timeout still leaves its numbers."""
        results = [case.result(args.batch) for case in live]
        eager_flops = {r["case"]: r["gflop_per_step"] for r in results if "gflop_per_step" in r}
        for r in results:  # a compiled step executes its eager twin's matmuls (counted eagerly)
            if "ms_per_step" in r and r["case"] in eager_flops:
                r["tflops"] = eager_flops[r["case"]] / r["ms_per_step"]       # GFLOP / ms = TFLOP/s
                if peak:
                    r["mfu"] = r["tflops"] / peak
        by = {(r["case"], bool(r["compiled"])): r for r in results if "ms_per_step" in r}
        ratios = {}
        for (fast_c, base, base_c) in [(False, "fm", False), (False, "naive", False), (True, "fm", True),
                                       (True, "fm", False), (True, "naive", False)]:
            a, b = by.get(("fast", fast_c)), by.get((base, base_c))
            if a is None or b is None:
                continue
            tag = f"fast{'_compiled' if fast_c else ''}/{base}{'_compiled' if base_c else ''}"
            ratios[f"{tag}_time"] = a["ms_per_step"] / b["ms_per_step"]
            for key in ("step_peak_MiB", "saved_activation_MiB", "aten_ops_per_step"):
                if key in a and key in b:
                    ratios[f"{tag}_{key}"] = a[key] / b[key]
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=2))
        return results, ratios

    live = []
    for c, compiled in runs:
        draw_fn, loss_fn, attn = plan[c]
        case = Case(c, draw_fn, loss_fn, model, attn, args, x, y, cfg, device, compiled)
        case.warm_up(args.warmup)
        live.append(case)
        print(f"{c}{' (compiled)' if compiled else ''} ready: {json.dumps(case.rec)}")
        save(live)
    # Interleaved rounds, one step of each case per round; medians: drifting machine load then
    # hits every case alike instead of whichever ran during a slow stretch.
    for _ in tqdm(range(args.steps), desc="rounds", disable=None):
        for case in live:
            case.guarded(lambda: case.times.append(case.timed_step()))
        results, ratios = save(live)
    print("\n| case | ms/step (min-max) | samples/s | GFLOP/step | TFLOP/s (MFU) | step peak MiB | saved act. MiB | aten ops "
          "| first step s |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        name = r["case"] + (f" (compiled, {r['compiled']})" if r["compiled"] else "")
        if "error" in r:
            print(f"| {name} | {r['error']} | | | | | | | |")
        else:
            mfu = f" ({r['mfu']:.1%})" if "mfu" in r else ""
            print(f"| {name} | {r['ms_per_step']:.1f} ({r['ms_per_step_min']:.1f}-{r['ms_per_step_max']:.1f}) | {r['samples_per_s']:.1f} "
                  f"| {eager_flops_of(results, r['case']):.1f} | {r.get('tflops', float('nan')):.3g}{mfu} | {r.get('step_peak_MiB', float('nan')):.0f} "
                  f"| {r.get('saved_activation_MiB', float('nan')):.1f} | {r.get('aten_ops_per_step', '-')} "
                  f"| {r['first_step_s']:.1f} |")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
