"""What the attention kernels' main loops cost in instructions on a Hopper GPU, found without one.

    python bench/kernel_sass.py                        # every kernel, head dims 64 and 128, every tile config
    python bench/kernel_sass.py --baseline 400b12f     # and the same kernels as they were at a git revision

Triton compiles each kernel for sm_90 (H100 / H200) on the CPU: its bundled ptxas needs no
device. cuobjdump then gives the SASS, whose main loop (the backward branch around the most
tensor-core instructions: one key or query block) is counted by opcode, with the registers per
thread, the stack (spilled registers) and the shared memory per kernel (a tile needing more than
sm_90's 227 KiB cannot launch: the autotuner skips it). A static measure, not a time: fewer
instructions per block means less ALU / MUFU work beside the tensor cores (HGMMA), which the
flash loop is bound by at these head dims; a spill means local-memory traffic. One tile config
per row (the autotuner's candidates; which it picks needs a GPU). JSON goes to --out.
"""
import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the kernel file imports kernels.op_names
KERNEL_FILE = "kernels/attention_triton.py"
# kernel -> (autotune config list name, tangents)
KERNELS = {"fwd+jvp": ("_QUERY_MAJOR", True), "fwd": ("_QUERY_MAJOR", False),
           "fwd+jvp lazy": ("_QUERY_MAJOR", True),  # set_rescale("lazy")
           "bwd dq": ("_QUERY_MAJOR", None), "bwd dk dv": ("_KEY_MAJOR", None),
           "bwd dk dv + atomic dq": ("_KEY_MAJOR", None)}  # set_backward("atomic"): no "bwd dq" kernel


def use_sm90_without_a_device():
    """Point Triton's active driver at an sm_90 target: compilation needs only the target."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class CompileOnlyDriver(CudaDriver):
        def __init__(self):  # no CUDA runtime to load
            self.target = GPUTarget("cuda", 90, 32)

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    triton.runtime.driver.set_active(CompileOnlyDriver())


def load_kernels(path: Path):
    spec = importlib.util.spec_from_file_location("counted_attention_triton", path)  # one version per process
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_kernel(mod, kernel: str, head_dim: int, cfg):
    """The compiled kernel for a bf16 (1, 1, 8192, head_dim) problem and one tile config."""
    x = torch.empty(1, 1, 8192, head_dim, dtype=torch.bfloat16)
    lse = torch.empty(1, 1, 8192)
    st = x.stride()
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PRECISION="tf32",
                **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages, grid=(1,))
    if kernel.startswith("fwd"):
        t = KERNELS[kernel][1]
        lazy = {}
        if kernel.endswith("lazy"):
            if "LAZY_RESCALE" not in mod._attn_fwd.fn.arg_names:  # before set_rescale
                return None
            lazy = {"LAZY_RESCALE": True}
        return mod._attn_fwd.fn.warmup(x, x, x, x, x, x, x, x, lse, st, st, st, st, st, st, st, st, 1, 8192, 0.125,
                                       TANGENT_Q=t, TANGENT_K=t, TANGENT_V=t, **lazy, **meta)
    if kernel == "bwd dq":
        return mod._attn_bwd_dq.fn.warmup(x, x, x, x, lse, lse, x, st, st, st, st, st, 1, 8192, 0.125, **meta)
    if "ATOMIC_DQ" not in mod._attn_bwd_dkdv.fn.arg_names:  # before the atomic dQ option
        if kernel != "bwd dk dv":
            return None
        return mod._attn_bwd_dkdv.fn.warmup(x, x, x, x, lse, lse, x, x, st, st, st, st, st, st, 1, 8192, 0.125,
                                            **meta)
    dq = torch.empty(x.shape)  # the fp32 accumulator
    return mod._attn_bwd_dkdv.fn.warmup(x, x, x, x, lse, lse, x, x, dq, st, st, st, st, st, st, dq.stride(),
                                        1, 8192, 0.125, ATOMIC_DQ=kernel.endswith("atomic dq"), **meta)


def sass_stats(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {**main_loop_stats(sass), "registers": int(re.search(r"REG:(\d+)", res).group(1)),
            "spill_stack_bytes": int(re.search(r"STACK:(\d+)", res).group(1))}


def main_loop_stats(sass: str) -> dict:
    """Opcode counts of the main loop in cuobjdump's SASS text: the span of the conditional
    backward branch around the most tensor-core instructions."""
    pred = r"(?:@!?U?P\w+\s+)?"
    ins = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+" + pred + r"([A-Z][A-Z0-9_.]*)", sass)]
    branches = [(int(a, 16), int(b, 16), bool(p))  # (at, to, conditional)
                for a, p, b in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?BRA\s+0x([0-9a-f]+)", sass)]
    loop, span = [], (0, 0)
    # Unconditional backward branches are not loops: out-of-line code placed after the kernel's
    # end (an mbarrier wait's retry path, with TMA loads) returns into the loop's middle by one.
    for src, dst, _ in filter(lambda b: b[2], branches):
        body = [op for a, op in ins if dst <= a <= src] if dst < src else []
        if sum(op.startswith(("HGMMA", "HMMA")) for op in body) > sum(op.startswith(("HGMMA", "HMMA")) for op in loop):
            loop, span = body, (dst, src)
    # Forward branches inside the loop skip code that not every iteration runs (set_rescale("lazy")'s
    # rescale): the common path is the loop without it.
    skips = [(a, b) for a, b, _ in branches if span[0] <= a < b <= span[1]]
    skipped = sum(1 for a, _ in ins if span[0] <= a <= span[1] and any(x < a < y for x, y in skips))
    ops = collections.Counter(op.split(".")[0] for op in loop)
    return {"loop_instructions": len(loop), "common_path_instructions": len(loop) - skipped,
            "tensor_core": ops["HGMMA"] + ops["HMMA"], "exp2": ops["MUFU"],
            "fp32_alu": ops["FADD"] + ops["FMUL"] + ops["FFMA"] + ops["FMNMX"] + ops["FSEL"],
            "by_op": dict(ops.most_common(12))}


def count(path: Path, kernels: list[str], head_dims: list[int]) -> list[dict]:
    """Stats of every kernel x head dim x tile config of the kernel file at path."""
    use_sm90_without_a_device()
    mod = load_kernels(path)
    rows = []
    for kernel in kernels:
        for d in head_dims:
            for cfg in getattr(mod, KERNELS[kernel][0]):
                compiled = compile_kernel(mod, kernel, d, cfg)
                rows.append({"kernel": kernel, "head_dim": d, "block_m": cfg.kwargs["BLOCK_M"],
                             "block_n": cfg.kwargs["BLOCK_N"], "warps": cfg.num_warps, "stages": cfg.num_stages,
                             **({"shared_memory_bytes": compiled.metadata.shared, **sass_stats(compiled.asm["cubin"])}
                                if compiled else {})})  # {}: not in this version
    return rows


def _loop_cell(stats: dict) -> str:
    """'loop' or 'loop [common path]' where a branch in the loop skips some of it."""
    loop, common = stats["loop_instructions"], stats.get("common_path_instructions", stats["loop_instructions"])
    return f"{loop}" if common == loop else f"{loop} [{common}]"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {', '.join(KERNELS)}")
    p.add_argument("--baseline", default=None, metavar="REV", help=f"also count {KERNEL_FILE} as of this git revision")
    p.add_argument("--kernel-file", default=None, help=argparse.SUPPRESS)  # one version, in its own process
    p.add_argument("--out", default="bench/kernel_sass.json")
    args = p.parse_args()
    kernels = [k for k in args.kernels.split(",") if k]
    if any(k not in KERNELS for k in kernels):
        p.error(f"--kernels takes a comma list of {', '.join(KERNELS)}")
    if args.kernel_file:
        Path(args.out).write_text(json.dumps(count(Path(args.kernel_file), kernels, args.head_dims)))
        return
    tmp = tempfile.TemporaryDirectory()
    versions = {"current": ROOT / KERNEL_FILE}
    if args.baseline:
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline}:{KERNEL_FILE}"],
                               capture_output=True, text=True)
        if shown.returncode:
            p.error(f"--baseline {args.baseline}: {shown.stderr.strip()}")
        versions = {args.baseline: Path(tmp.name) / "baseline.py", **versions}
        versions[args.baseline].write_text(shown.stdout)
    counted = {}
    for v, path in versions.items():  # each in its own process: both versions register the same custom ops
        out = Path(tmp.name) / f"{len(counted)}.json"
        run = subprocess.run([sys.executable, __file__, "--kernel-file", str(path), "--kernels", ",".join(kernels),
                              "--head-dims", *map(str, args.head_dims), "--out", str(out)], capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"counting {v} failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
        counted[v] = json.loads(out.read_text())
    print("| kernel | D | BLOCK_M x BLOCK_N, warps, stages | "
          + " | ".join(f"{v}: loop instructions [common path] (regs, spill bytes, shared KiB)" for v in versions)
          + " |\n|---|---|---|" + "---|" * len(versions))
    stat_keys = ("loop_instructions", "common_path_instructions", "registers", "spill_stack_bytes",
                 "shared_memory_bytes", "tensor_core", "exp2", "fp32_alu", "by_op")
    config = lambda r: tuple(r[k] for k in ("kernel", "head_dim", "block_m", "block_n", "warps", "stages"))
    by_config = {v: {config(r): r for r in counted[v]} for v in versions}  # versions may tune other tiles
    rows = []
    for base in counted["current"]:
        row = {k: v for k, v in base.items() if k not in stat_keys}
        for v in versions:
            other = by_config[v].get(config(base), {})
            row[v] = {k: other[k] for k in stat_keys if k in other}
        rows.append(row)
        cells = " | ".join(f"{_loop_cell(row[v])} ({row[v]['registers']}, {row[v]['spill_stack_bytes']}, "
                           f"{row[v].get('shared_memory_bytes', 0) / 1024:.0f})" if row[v] else "-" for v in versions)
        print(f"| {row['kernel']} | {row['head_dim']} | {row['block_m']} x {row['block_n']}, {row['warps']}, "
              f"{row['stages']} | {cells} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"target": "sm_90 (compiled on the CPU)", "triton": triton.__version__, "torch": torch.__version__,
            "problem": "bf16, N = 8192", "versions": list(versions)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
