"""The compiled train step's memory traffic, counted by inductor on the CPU, and the roofline it implies.

    python bench/step_bytes.py --model mit-b --input-size 32 32 --channels 4 --batch 32

fm and fast as bench/jvp_throughput.py compiles them (the loss and its backward under
torch.compile, bf16 autocast) are compiled here on the CPU; inductor reports the bytes every
kernel of the generated code reads and writes (its scheduler's buffer sizes, after fusion). Split
into kernels inductor generates (the norms, RoPE, activations, casts, residuals: memory-bound
work) and extern kernels (matmuls, attention: inputs and outputs). With the step's matmul FLOPs
(counted eagerly, kernels/flops.py) this gives a roofline time on a device:

    t = FLOPs / peak  +  generated-kernel bytes / memory bandwidth

(matmuls at the tensor-core peak, every other kernel at full bandwidth, one after another), and
the MFU ceiling FLOPs / peak / t. Per case it also lists the kernels by group (the aten ops fused
into a generated kernel, or the extern kernel) with their bytes: where the traffic goes. A model, not a measurement: the CPU backend fuses somewhat
differently from the GPU's Triton backend, and matmuls reach perhaps 60-80% of peak at these
sizes; launch gaps are not in it. What it shows on a CPU: how much memory traffic each step
moves besides its matmuls, and how a change alters it.

`--kernels` adds every kernel of the two graphs in launch order, with the buffers it reads and
writes (dtype[shape]): which tensor a kernel writes out that a later one reads back.

The fused attention ops run as math on the CPU here (same inputs, outputs and graph; their own
traffic is counted as their inputs and outputs, as a flash kernel's). JSON goes to --out.
"""
import argparse
import collections
import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused op's device check; its kernels never run here
import torch  # noqa: E402
from torch._inductor import metrics  # noqa: E402
from torch._inductor.graph import GraphLowering  # noqa: E402
from torch._inductor.scheduler import ExternKernelSchedulerNode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastmf.models import functional  # noqa: E402
from fastmf.objectives import objective_defaults  # noqa: E402
from jvp_throughput import add_inductor_arg, add_model_args, build_model, case_plan, set_inductor_options  # noqa: E402
from kernels import attention, attention_triton, attention_with_tangent  # noqa: E402
from kernels.flops import count_flops  # noqa: E402

# Dense bf16 peak TFLOP/s and HBM TB/s (SXM parts).
DEVICES = {"H100": (989.4, 3.35), "H200": (989.4, 4.8)}


def attention_with_tangent_math(q, k, v, sdq, sdk, dv, scale):
    """The fused Triton op (attention_triton.WITH_TANGENT_OP) by kernels.attention's math: (O, lse, dO) for (scale dQ, scale dK, dV)."""
    o, do = attention_with_tangent(q, k, v, sdq / scale, sdk / scale, dv, scale=scale, backend="torch")
    lse = torch.logsumexp(scale * q.float() @ k.float().transpose(-2, -1), dim=-1)             # (B, H, N)
    return token_major(o), lse, token_major(do)


def token_major(t):
    """t (B, H, N, D) stored as (B, N, H, D): the layout of the Triton ops' outputs (their fake kernels say so)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def attention_backward_math(q, k, v, o, lse, grad_o, scale):
    """attention_triton.BACKWARD_OP by kernels.attention's math backward."""
    with torch.enable_grad():
        qkv = [x.detach().requires_grad_() for x in (q, k, v)]
        return tuple(map(token_major, torch.autograd.grad(attention(*qkv, scale=scale, backend="torch"), qkv, grad_o)))


def use_math_for_fused_attention_on_cpu():
    torch.library.register_kernel(attention_triton.WITH_TANGENT_OP, "cpu", attention_with_tangent_math)
    torch.library.register_kernel(attention_triton.BACKWARD_OP, "cpu", attention_backward_math)


def kernel_group(node) -> str:
    """A scheduler node's group: the extern kernel's name, or the aten ops fused into a generated kernel."""
    if isinstance(node, ExternKernelSchedulerNode):
        return "extern " + str(getattr(node.node, "python_kernel_name", None) or type(node.node).__name__)
    ops = {str(o.target).split(".")[-2] if "." in str(o.target) else str(o.target)
           for n in node.get_nodes() for o in n.node.origins if o.op == "call_function"}
    return "+".join(sorted(ops)) or "?"


@contextlib.contextmanager
def kernel_listing():
    """Yields a list that gets, for each graph inductor compiles meanwhile (forward, then backward),
    its kernels in launch order: bytes, group, and the buffers each reads and writes (dtype[shape]),
    taken while inductor counts bytes, the one time its graph can still name them."""
    graphs, count_bytes = [], GraphLowering.count_bytes

    def listed(graph):
        total, counts, runtimes = count_bytes(graph)

        def describe(dep):
            try:
                b = graph.get_buffer(dep.name)
                return f"{dep.name}: {str(b.get_dtype()).removeprefix('torch.')}{list(b.get_size())}"
            except (AttributeError, NotImplementedError):  # unknown name; a multi-output kernel's tuple
                return dep.name
        graphs.append([{"kernel": node.get_name(), "MB": 4 * n / 1e6, "group": kernel_group(node),
                        "writes": sorted({describe(d) for d in node.read_writes.writes}),
                        "reads": sorted({describe(d) for d in node.read_writes.reads})} for node, n in counts])
        return total, counts, runtimes
    GraphLowering.count_bytes = listed
    try:
        yield graphs
    finally:
        GraphLowering.count_bytes = count_bytes


def measure(args, model, case: str) -> dict:
    """Bytes of one compiled step of case (forward and backward graphs), and its matmul FLOPs."""
    draw_fn, loss_fn, attn = case_plan(model.record["variant"])[case]
    model = copy.deepcopy(model)
    model.set_attention_backend("sdpa" if attn == "auto" else attn)  # the GPU's pick: fused op for tangent rows
    params = dict(model.named_parameters())
    apply = functional(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.channels, *args.input_size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g)
    cfg = objective_defaults(model.record["variant"], num_classes=args.num_classes)
    gen = torch.Generator().manual_seed(0)
    step_loss = lambda x, y, d: loss_fn(apply, params, x, y, d, cfg)  # noqa: E731
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")  # noqa: E731

    def step(loss_of):
        with amp():
            loss, _ = loss_of(x, y, draw_fn(x, gen, cfg))
        loss.backward()

    flops = count_flops(lambda: step(step_loss))
    torch._dynamo.reset()
    metrics.reset()
    t0 = time.perf_counter()
    with kernel_listing() if args.kernels else contextlib.nullcontext() as graphs:
        step(torch.compile(step_loss))  # compiles the forward graph, then the backward graph
    seconds = time.perf_counter() - t0
    generated = sum(4 * n for node, n in metrics.nodes_num_elem if not isinstance(node, ExternKernelSchedulerNode))
    extern = sum(4 * n for node, n in metrics.nodes_num_elem if isinstance(node, ExternKernelSchedulerNode))
    groups, counts = collections.Counter(), collections.Counter()
    for node, n in metrics.nodes_num_elem:
        groups[kernel_group(node)] += 4 * n
        counts[kernel_group(node)] += 1
    r = {"case": case, "batch": args.batch, "gflop": flops / 1e9, "generated_kernel_GB": generated / 1e9,
         "extern_kernel_GB": extern / 1e9, "kernels": len(metrics.nodes_num_elem), "compile_and_step_s": seconds,
         "top_kernel_groups": [{"group": g, "GB": b / 1e9, "kernels": counts[g]} for g, b in groups.most_common(args.top)]}
    if args.kernels:
        names = ("forward", "backward") if len(graphs) == 2 else [f"graph {i}" for i in range(len(graphs))]
        r["kernels_by_graph"] = dict(zip(names, graphs))
    for dev, (peak, bw) in DEVICES.items():
        t_mm, t_mem = flops / peak / 1e9, generated / bw / 1e9                        # ms
        r[dev] = {"matmul_ms": t_mm, "generated_kernel_ms": t_mem, "roofline_ms": t_mm + t_mem,
                  "mfu_ceiling": t_mm / (t_mm + t_mem)}
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--cases", default="fm,fast", help="comma list of fm, fast")
    p.add_argument("--top", type=int, default=25, help="kernel groups listed per case, by bytes")
    p.add_argument("--kernels", action="store_true",
                   help="also list every kernel of the forward and backward graphs in launch order in the JSON: "
                        "bytes, fused ops, and the buffers it reads and writes (dtype[shape])")
    add_inductor_arg(p)
    p.add_argument("--out", default="bench/step_bytes.json")
    args = p.parse_args()
    set_inductor_options(args.inductor)
    cases = [c for c in args.cases.split(",") if c]
    if any(c not in ("fm", "fast") for c in cases) or len(args.input_size) not in (2, 3) or args.batch < 1:
        p.error("--cases takes fm and/or fast; --input-size 2 or 3 ints; --batch >= 1")
    torch.manual_seed(0)
    try:
        model = build_model(args)
    except ValueError as e:
        p.error(str(e))
    with torch.no_grad():  # zero-initialised gates made non-zero, as jvp_throughput.py does
        for q in model.parameters():
            if not q.any():
                q.normal_(0, 0.02)
    use_math_for_fused_attention_on_cpu()
    torch._logging.set_logs(inductor_metrics=True)  # inductor counts bytes only with its metrics log on
    # ... and only when it schedules the graph: a cached graph (from an earlier run) would count nothing
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    results = []
    for c in cases:
        results.append(measure(args, model, c))
        r = results[-1]
        print(f"{c}: {r['gflop']:.1f} GFLOP, generated kernels {r['generated_kernel_GB']:.3f} GB, extern "
              f"{r['extern_kernel_GB']:.3f} GB, {r['kernels']} kernels; by bytes (GB, kernels, group):")
        for k in r["top_kernel_groups"]:
            print(f"  {k['GB']:8.3f} {k['kernels']:5d}  {k['group']}")
    torch._logging.set_logs(inductor_metrics=False)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"counted_on": "CPU inductor", "torch": torch.__version__, "args": vars(args),
            "tokens": model.spec.num_tokens, "devices": DEVICES}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print("\n| case | GFLOP/step | generated-kernel GB | extern GB | kernels | H100 roofline ms (MFU ceiling) "
          "| H200 roofline ms (MFU ceiling) |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['gflop']:.1f} | {r['generated_kernel_GB']:.2f} | {r['extern_kernel_GB']:.2f} "
              f"| {r['kernels']} | {r['H100']['roofline_ms']:.1f} ({r['H100']['mfu_ceiling']:.0%}) "
              f"| {r['H200']['roofline_ms']:.1f} ({r['H200']['mfu_ceiling']:.0%}) |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
