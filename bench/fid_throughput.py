"""What a 50,000-sample FID evaluation costs: 1-NFE sampling, VAE decoding, Inception features.

    python bench/fid_throughput.py                                   # CPU: mit-tiny on 8x8 digits-sized input
    python bench/fid_throughput.py --model mit-b --input-size 32 32 --channels 4 --vae --batch 250 --batches 8

Random weights of the real architectures (the generator, diffusers' SD AutoencoderKL when --vae,
the FID Inception-v3): the cost does not depend on the values. Times each stage over --batches
batches after one warm-up batch (synchronised), reports images/s per stage and all together, and
the projected time of --num-samples on this one device (evaluate.py splits it over ranks). JSON
goes to --out.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmf.fid import to_inception_input  # noqa: E402
from fastmf.inception import FIDInception  # noqa: E402
from fastmf.inference import generate  # noqa: E402
from fastmf.models import PRESETS, build  # noqa: E402


def sd_vae(device):
    """diffusers' AutoencoderKL with Stable Diffusion's configuration (sd-vae-ft-mse), random weights."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=256).to(device).eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mit-tiny", choices=list(PRESETS))
    p.add_argument("--variant", default=None)
    p.add_argument("--input-size", type=int, nargs=2, default=[8, 8])
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--vae", action="store_true", help="decode latents with an SD-sized AutoencoderKL (diffusers)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=2, help="timed batches")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/fid_throughput.json")
    args = p.parse_args()
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    torch.manual_seed(0)
    model = build(args.model, args.variant, input_size=tuple(args.input_size), in_channels=args.channels,
                  patch_size=args.patch_size, num_classes=1000).to(device).eval()
    params = dict(model.named_parameters())
    vae = sd_vae(device) if args.vae else None
    inception = FIDInception().to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one_batch(i: int) -> dict[str, float]:
        index = torch.arange(i * args.batch, (i + 1) * args.batch)
        times, t0 = {}, time.perf_counter()
        with torch.no_grad(), amp():
            x = generate(model, params, index, seed=0, nfe=1, omega=2.0, interval=(0.0, 1.0))
            sync()
            times["sample"] = time.perf_counter() - t0
            if vae is not None:
                t1 = time.perf_counter()
                x = vae.decode(x.float() / 0.18215).sample.clamp(-1, 1)                 # (b, 3, 8 H, 8 W)
                sync()
                times["decode"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            inception(to_inception_input(x))
            sync()
            times["inception"] = time.perf_counter() - t1
        times["total"] = time.perf_counter() - t0
        return times

    one_batch(0)  # warm-up: kernels, autotuning, allocator
    runs = [one_batch(i + 1) for i in range(args.batches)]
    stages = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rate = {k: args.batch / v for k, v in stages.items()}
    image = tuple(x * (8 if args.vae else 1) for x in args.input_size)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "args": vars(args), "image_size": image, "images_per_s": rate,
              "projected_s": args.num_samples / rate["total"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{args.model} {image} batch {args.batch}, {args.dtype}, {report['device']}: "
          + ", ".join(f"{k} {v:.1f} img/s" for k, v in rate.items())
          + f"; {args.num_samples} samples: {report['projected_s'] / 60:.1f} min on this device")


if __name__ == "__main__":
    main()
