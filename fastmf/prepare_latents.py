"""Encode an image folder into VAE latent shards for training (what iMF and MF train on).

    python -m fastmf.prepare_latents IMAGES OUT --vae PATH [--image-size 256]

IMAGES: an image folder (class subfolders) or a CSV of path,label; PATH: a local diffusers
AutoencoderKL folder (config.json + weights, e.g. stabilityai/sd-vae-ft-mse, which both MF and iMF
use, downloaded on a machine with internet). As the references do: images are prepared with ADM's
centre crop to [-1, 1] (no flip), the posterior's mean and std are stored, and training draws a
fresh latent mean + std * eps each step, normalised as --norm says: 'sd' multiplies by the VAE's
scaling factor (0.18215: MF), 'imf' maps each channel by iMF's constants (z - m) / s. OUT gets
shard_00000.safetensors, ... (mean, std float32 (n, 4, size/8, size/8), y int64 (n,), the
normalisation in the metadata), each written atomically: a killed run resumes where it stopped.
Train with `train.py --data OUT`; decode samples with `sample.py --vae PATH`.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from fastmf.ckpt import write_safetensors
from fastmf.cli import fail, first_line, last_line, resolve_device, writable_folder
from fastmf.data.image_folder import ImageFolder
from fastmf.data.loader import default_workers, to_model_range


# iMF's per-channel latent statistics of sd-vae-ft-mse on ImageNet (imeanflow utils/vae_util.py)
IMF_MEAN = [0.86488, -0.27787343, 0.21616915, 0.3738409]
IMF_STD = [4.85503674, 5.31922414, 3.93725398, 3.9870003]


def load_vae(path: str, device: torch.device):
    """A diffusers AutoencoderKL from a local folder, frozen, in eval mode; a one-line error otherwise."""
    p = Path(path)
    if not (p / "config.json").is_file():
        fail(f"--vae {path}: expected a local diffusers AutoencoderKL folder with config.json and weights")
    try:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # diffusers raises many types for missing or mismatched weights
        fail(f"--vae {path}: cannot load an AutoencoderKL: {first_line(e)}")
    return vae.to(device).eval().requires_grad_(False)


def shard_file(out: Path, k: int) -> Path:
    return out / f"shard_{k:05d}.safetensors"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="image folder (class subfolders) or CSV of path,label")
    p.add_argument("out", help="output folder for the latent shards")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder")
    p.add_argument("--image-size", type=int, default=256, help="centre crop and resize to this size")
    p.add_argument("--batch-size", type=int, default=32, help="images encoded at once")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="DataLoader processes decoding images (default: 8, or fewer on a machine with fewer cores)")
    p.add_argument("--norm", choices=["sd", "imf"], default="sd",
                   help="latent normalisation: 'sd' times the VAE's scaling factor (MF), 'imf' iMF's per-channel constants")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if min(args.image_size, args.batch_size, args.shard_size) < 1 or args.workers < 0:
        fail("--image-size, --batch-size and --shard-size must be >= 1, --workers >= 0")
    device = resolve_device(args.device)
    try:
        images = ImageFolder(args.images, args.image_size)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    vae = load_vae(args.vae, device)
    out = writable_folder(Path(args.out), "--out")  # after the images are listed: it may lie among them
    norm = ({"kind": "scale", "scaling_factor": float(vae.config.scaling_factor)} if args.norm == "sd"
            else {"kind": "channel", "mean": IMF_MEAN, "std": IMF_STD})
    n_shards = -(-len(images) // args.shard_size)
    todo = [k for k in range(n_shards) if not shard_file(out, k).exists()]
    print(f"{len(images)} images -> {n_shards} shards in {out} ({n_shards - len(todo)} already there)")
    for k in tqdm(todo, desc="shards", disable=None):
        rows = range(k * args.shard_size, min((k + 1) * args.shard_size, len(images)))
        loader = torch.utils.data.DataLoader([(i, False) for i in rows], batch_size=args.batch_size,
                                             num_workers=args.workers, collate_fn=lambda keys: [images[key] for key in keys])
        means, stds, ys = [], [], []
        try:
            for items in loader:
                x = torch.stack([it[0] for it in items]).to(device)
                with torch.no_grad():
                    posterior = vae.encode(to_model_range(x)).latent_dist
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.float().cpu())
                ys.append(torch.stack([it[1] for it in items]))
        except ValueError as e:
            fail(last_line(e))
        tmp = shard_file(out, k).with_suffix(".tmp")
        try:
            write_safetensors({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
                               "y": torch.cat(ys)}, tmp, metadata={"latent_norm": json.dumps(norm), "vae": str(args.vae),
                                                                   "image_size": str(args.image_size)})
            tmp.replace(shard_file(out, k))
        except OSError as e:  # a full disk
            tmp.unlink(missing_ok=True)
            fail(f"cannot write {shard_file(out, k)} ({e.strerror or e}); the shards written so far are kept: free "
                 "space and run the same command again to go on")
    print(f"done: train with `python train.py --data {out}`")


if __name__ == "__main__":
    sys.exit(main())
