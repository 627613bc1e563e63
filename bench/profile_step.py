"""Where the fast step's GPU time goes: torch.profiler table of one MiT-B/2 iMF step (bf16).

    python bench/profile_step.py --batch 32 --out prof.txt
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmf.models import build  # noqa: E402
from fastmf.objectives import objective_defaults  # noqa: E402
from fastmf.train_step import fast_loss  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=32)
p.add_argument("--out", default="prof.txt")
args = p.parse_args()
model = build("mit-b", input_size=(32, 32), in_channels=4, num_classes=10).cuda()
params = dict(model.named_parameters())
apply = lambda p, *a, **kw: torch.func.functional_call(model, p, a, kw)
x = torch.randn(args.batch, 4, 32, 32, device="cuda")
y = torch.randint(0, 10, (args.batch,), device="cuda")
cfg = objective_defaults("imf", num_classes=10)
gen = torch.Generator(device="cuda").manual_seed(0)


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = fast_loss(apply, params, x, y, gen, cfg)
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
