"""The trainer on CUDA: what a user's `python train.py` does there, measured.

    bash bench/device_wheels.sh                                  # here, once: tyro as wheels in .whl/
    python bench/gpu_train_check.py --out bench/out/train_cuda.json   # on the device (gpu_run.sh's train stage)

Every figure in README's digits rows was trained on a CPU in fp32. On CUDA train.py takes another
path: bf16 autocast, the compiled fast step with the Triton tangent kernel, SDPA for the plain
passes, pinned-memory batches. This runs `python train.py` itself, each run in a process of its own
as a user's (so a resumed run re-reads every cache from disk, autotuned tiles included), and records:
  learn    the default run (mit-tiny iMF on the embedded digits, 2,000 steps, batch 64; `--variants
           imf pmf` adds pMF): the 1-NFE judge's agreement and Frechet distance (train.py's
           eval.json), the median steps/s after the first logged interval (which holds the
           compile), and the wall time;
  resume   the same run to --resume-steps twice straight, and once stopped halfway then resumed
           with --resume, per attention backend: whether each pair's final weights (model, EMA,
           optimizer state) are bit-identical, else the largest absolute difference. Straight
           against straight is the run-to-run floor: a resume is exact if it matches a straight
           run as closely as two straight runs match each other.
Nothing is asserted: the JSON (rewritten after each run) holds what was seen. Without CUDA it runs
on the CPU, for the suite, with whatever steps it is given.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    # argparse: this script parses where tyro is missing, to say so in one line
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=["imf", "pmf", "mf"], default=["imf"],
                   help="objectives of the learning runs (train.py --variant)")
    p.add_argument("--steps", type=int, default=2000, help="steps of each learning run (train.py's default)")
    p.add_argument("--resume-steps", type=int, default=200, help="steps of the resume runs (0 skips them)")
    p.add_argument("--resume-attn-backends", nargs="+", choices=["auto", "torch", "triton"], default=["auto", "triton"],
                   help="train.py --attn-backend of each set of resume runs: 'auto' takes SDPA's backward for the "
                        "passes without a tangent (FlashAttention-2's backward adds dQ with atomics; cuDNN's may), "
                        "'triton' fastmf's flash backward throughout (two kernels, no atomics)")
    p.add_argument("--eval-samples", type=int, default=1000, help="samples the judge sees (train.py's default)")
    p.add_argument("--work", default=None, help="folder for the runs' outputs (default: a new temporary one)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="train.py --compile")
    p.add_argument("--out", default="bench/out/train_cuda.json")
    return p.parse_args(argv)


def tyro_version() -> str:
    """The version of tyro (train.py's parser), or a one-line exit where it is missing."""
    try:
        import tyro
        return tyro.__version__
    except ModuleNotFoundError:
        sys.exit("error: train.py needs tyro, which this machine lacks (the device image: fetch the wheels with "
                 "`bash bench/device_wheels.sh` where pip works, carry .whl; bench/gpu_run.sh installs them)")


def run_train(out: Path, args, flags: list[str]) -> float:
    """`python train.py --out OUT FLAGS` in a process of its own; its wall time in seconds."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(out),
           "--compile" if args.compile else "--no-compile", *flags]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"error: {' '.join(cmd[1:])} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    print(run.stdout.strip())
    return time.perf_counter() - t0


def final_state(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"ckpt_{step:07d}.safetensors"))


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Bit-identical or not, and the largest absolute difference over every tensor of two checkpoints."""
    if a.keys() != b.keys():
        return {"identical": False, "max_abs_diff": None, "note": "different tensor names"}
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a}
    worst = max(diffs, key=diffs.get)
    return {"identical": all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": diffs[worst],
            "worst_tensor": worst if diffs[worst] > 0 else None,
            "tensors_differing": sum(v > 0 for v in diffs.values()), "tensors": len(diffs)}


def main(argv=None):
    tyro = tyro_version()  # before parsing: bench/check_commands.py then refuses a call that lacks tyro's wheels
    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="fastmf_train_check_"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = {"device": device, "torch": torch.__version__, "tyro": tyro, "args": vars(args)}
    report = {"meta": meta, "learn": {}, "resume": {}}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))

    for variant in args.variants:
        out = work / f"learn_{variant}"
        wall = run_train(out, args, ["--variant", variant, "--steps", str(args.steps),
                                     "--eval-samples", str(args.eval_samples)])
        rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
        later = [r["steps_per_s"] for r in rows[1:]]  # the first interval holds the compile
        report["learn"][variant] = {
            "wall_s": round(wall, 1), "steps_per_s_median": statistics.median(later) if later else None,
            "first_interval_steps_per_s": rows[0]["steps_per_s"], "final_loss": rows[-1]["loss"],
            "eval": json.loads((out / "eval.json").read_text()) if args.eval_samples else None}
        print(f"learn {variant}: {json.dumps(report['learn'][variant])}")
        save()

    if args.resume_steps:
        n, half = args.resume_steps, args.resume_steps // 2
        quiet = ["--eval-samples", "0", "--sample-every", str(10 * n), "--ckpt-every", str(half), "--log-every",
                 str(max(1, half // 2)), "--warmup-steps", str(half)]
        for backend in args.resume_attn_backends:
            runs, walls = work / f"resume_{backend}", {}
            flags = ["--attn-backend", backend, *quiet]
            for name, steps in (("straight", n), ("straight_again", n), ("split", half)):
                walls[name] = run_train(runs / name, args, ["--steps", str(steps), *flags])
            walls["resumed"] = run_train(runs / "split", args, ["--steps", str(n), "--resume", *flags])
            straight = final_state(runs / "straight", n)
            report["resume"][backend] = {
                "steps": n, "stopped_at": half, "wall_s": {k: round(v, 1) for k, v in walls.items()},
                "straight_vs_straight": compare(straight, final_state(runs / "straight_again", n)),
                "straight_vs_resumed": compare(straight, final_state(runs / "split", n))}
            print(f"resume, attention {backend}: {json.dumps(report['resume'][backend])}")
            save()
    print(f"wrote {args.out}; the runs are in {work}")


if __name__ == "__main__":
    main()
