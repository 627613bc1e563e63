"""What pMF's perceptual terms cost: one fast pMF train step (loss, backward, Adam) with and without
LPIPS + ConvNeXt-V2 (random-init networks of the real architectures), interleaved rounds, medians.

    python bench/perceptual_cost.py                                    # CPU: mit-tiny digits-sized, crop 32
    python bench/perceptual_cost.py --model mit-b --input-size 256 --patch-size 16 --batch 32 --crop 224
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmf.models import build, functional  # noqa: E402
from fastmf.objectives import draw, objective_defaults  # noqa: E402
from fastmf.perceptual import LPIPS, ConvNeXtV2, Perceptual  # noqa: E402
from fastmf.train_step import fast_loss_from_draws  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mit-tiny")
    p.add_argument("--input-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop", type=int, default=32, help="perceptual crop size (pMF: 224)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/perceptual_cost.json")
    args = p.parse_args()
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp())
    save_file(dict(LPIPS().state_dict()), str(tmp / "lpips.safetensors"))
    save_file(dict(ConvNeXtV2().state_dict()), str(tmp / "cnx.safetensors"))
    perceptual = Perceptual(tmp / "lpips.safetensors", tmp / "cnx.safetensors", args.crop).to(device)
    model = build(args.model, "pmf", input_size=(args.input_size,) * 2, in_channels=args.channels,
                  patch_size=args.patch_size, num_classes=10).to(device)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=1e-5)
    apply = functional(model)
    x = torch.rand(args.batch, args.channels, args.input_size, args.input_size, device=device) * 2 - 1
    y = torch.randint(0, 10, (args.batch,), device=device)
    cfgs = {"without": objective_defaults("pmf", num_classes=10),
            "with": objective_defaults("pmf", num_classes=10, lpips_lambda=0.4, convnext_lambda=0.1,
                                       perceptual_max_t=0.8, perceptual_size=args.crop)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(case):
        d = draw(x, torch.Generator(device=device).manual_seed(0), cfgs[case])
        loss, _ = fast_loss_from_draws(apply, params, x, y, d, cfgs[case], perceptual=perceptual)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    times = {case: [] for case in cfgs}
    for r in range(args.rounds + 1):
        for case in cfgs:
            sync()
            t0 = time.perf_counter()
            step(case)
            sync()
            if r:  # round 0 warms up
                times[case].append(time.perf_counter() - t0)
    ms = {case: statistics.median(v) * 1e3 for case, v in times.items()}
    fraction = (ms["with"] - ms["without"]) / ms["with"]
    print(f"{args.model} pMF batch {args.batch}, crop {args.crop}: step {ms['without']:.1f} ms without, "
          f"{ms['with']:.1f} ms with the perceptual terms: they are {fraction:.0%} of the step")
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "ms": ms, "perceptual_fraction": fraction}, indent=2))


if __name__ == "__main__":
    main()
