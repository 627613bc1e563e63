"""Where a train step's GPU time goes: torch.profiler table of one MiT-B/2 iMF step (bf16, CUDA).

    python bench/profile_step.py --batch 32 --out prof.txt
    python bench/profile_step.py --batch 32 --compile --out prof_compiled.txt
    python bench/profile_step.py --input-size 48 48 48 --batch 1 --case fm --out prof_3d_fm.txt

The table sorts ops by CUDA time; compare "Self CPU total" with "Self CUDA total" at its foot, and
the step's wall time in the first line with "Self CUDA total", to see whether the step is bound by
the GPU or by launching work from Python. The kernel timeline goes beside --out (.trace.json). Before the table, the
step's passes are timed with CUDA events (guidance, with-grad forward, backward) for case fast.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.jvp_throughput import fm_draw, fm_loss_from_draws  # noqa: E402
from fastmf.models import build, functional  # noqa: E402
from fastmf.objectives import draw, interpolate, objective_defaults  # noqa: E402
from fastmf.train_step import fast_guidance, fast_loss_from_draws, forward_with_du_dt  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--input-size", type=int, nargs="+", default=[32, 32], help="latent size, 2 or 3 numbers")
p.add_argument("--case", choices=["fast", "fm"], default="fast")
p.add_argument("--compile", action="store_true", help="torch.compile the loss and backward (draws eager)")
p.add_argument("--out", default="prof.txt")
args = p.parse_args()
if not torch.cuda.is_available():
    sys.exit("profile_step.py profiles a CUDA step; no GPU is visible")
size = tuple(args.input_size)
model = build("mit-b", input_size=size, in_channels=4, num_classes=10).cuda()
params = dict(model.named_parameters())
apply = functional(model)
x = torch.randn(args.batch, 4, *size, device="cuda")
y = torch.randint(0, 10, (args.batch,), device="cuda")
cfg = objective_defaults("imf", num_classes=10)
gen = torch.Generator(device="cuda").manual_seed(0)
if args.case == "fast":
    step_loss, step_draw = (lambda x, y, d: fast_loss_from_draws(apply, params, x, y, d, cfg)), draw
else:
    step_loss, step_draw = (lambda x, y, d: fm_loss_from_draws(apply, params, x, y, d, cfg)), fm_draw
if args.compile:
    step_loss = torch.compile(step_loss)


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = step_loss(x, y, step_draw(x, gen, cfg))
    loss.backward()


def timed_passes(reps: int = 3) -> str:
    """Median ms of the fast step's passes, eager: guidance, with-grad forward (+ tangent), backward."""
    out = {"guidance": [], "with-grad forward": [], "backward": []}
    for _ in range(reps):
        d = draw(x, gen, cfg)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        n_fm = int(args.batch * cfg.data_proportion)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, z_t, _ = interpolate(x, d, cfg)
            ev[0].record()
            _, v_m, _ = fast_guidance(apply, params, z_t, d.t, y, d, n_fm, cfg.num_classes)
            ev[1].record()
            u, v, du = forward_with_du_dt(apply, params, z_t, d.t, d.r, v_m, (d.omega, d.t_min, d.t_max, y),
                                          n_fm, "uv")
            ev[2].record()
        (u.float().square().mean() + v.float().square().mean()).backward()
        ev[3].record()
        torch.cuda.synchronize()
        for i, k in enumerate(out):
            out[k].append(ev[i].elapsed_time(ev[i + 1]))
    return "  ".join(f"{k} {sorted(v)[len(v) // 2]:.1f} ms" for k, v in out.items())


for _ in range(3):
    step()
torch.cuda.synchronize()
walls = []
for _ in range(3):  # wall time of a step, against the GPU time the table sums: the gap is launch / idle time
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    walls.append(1e3 * (time.perf_counter() - t0))
head = (f"MiT-B/2 {args.case} {size} batch {args.batch}{' compiled' if args.compile else ''}: "
        f"step wall {sorted(walls)[1]:.1f} ms (median of 3)\n")
if args.case == "fast" and not args.compile:
    head += "passes: " + timed_passes() + "\n"
print(head, flush=True)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
Path(args.out).write_text(head + table)
prof.export_chrome_trace(str(Path(args.out).with_suffix(".trace.json")))  # the kernel timeline: gaps show
print(table)
