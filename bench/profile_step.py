"""Where the fast step's GPU time goes: torch.profiler table of one MiT-B/2 iMF step (bf16, CUDA).

    python bench/profile_step.py --batch 32 --out prof.txt
    python bench/profile_step.py --batch 32 --compile --out prof_compiled.txt

The table sorts ops by CUDA time; compare "Self CPU total" with "Self CUDA total" at its foot to
see whether the step is bound by the GPU or by launching work from Python.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmf.models import build  # noqa: E402
from fastmf.objectives import draw, objective_defaults  # noqa: E402
from fastmf.train_step import fast_loss_from_draws  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--compile", action="store_true", help="torch.compile the loss and backward (draws eager)")
p.add_argument("--out", default="prof.txt")
args = p.parse_args()
if not torch.cuda.is_available():
    sys.exit("profile_step.py profiles a CUDA step; no GPU is visible")
model = build("mit-b", input_size=(32, 32), in_channels=4, num_classes=10).cuda()
params = dict(model.named_parameters())
apply = lambda p, *a, **kw: torch.func.functional_call(model, p, a, kw)
x = torch.randn(args.batch, 4, 32, 32, device="cuda")
y = torch.randint(0, 10, (args.batch,), device="cuda")
cfg = objective_defaults("imf", num_classes=10)
gen = torch.Generator(device="cuda").manual_seed(0)
step_loss = lambda x, y, d: fast_loss_from_draws(apply, params, x, y, d, cfg)
if args.compile:
    step_loss = torch.compile(step_loss)


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = step_loss(x, y, draw(x, gen, cfg))
    loss.backward()


for _ in range(3):
    step()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
Path(args.out).write_text(table)
print(table)
