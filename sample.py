"""Sample from a fastmf checkpoint at 1 NFE (or a few steps).

    python sample.py --ckpt runs/default --out grid.png                 # one row per class
    python sample.py --ckpt runs/default --labels 3,3,7 --omega 3 --out s.npz
    python sample.py --ckpt runs/phantom --n 4 --out head.nii.gz        # volumes as NIfTI
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from fastmf.cli import fail, resolve_device, writable_folder
from fastmf.images import save_grid, save_nifti, save_npz
from fastmf.inference import guidance, latent_decoder, load_model, sample_labels


@dataclass
class Args:
    """Generate samples with the u-head of a trained model (the checkpoint says which backbone)."""
    ckpt: str
    """Run folder (its newest good checkpoint is used), one ckpt_STEP.safetensors file, or an FSDP run's
    sharded ckpt_STEP.dcp folder."""
    out: str = "samples.png"
    """.png grid, .npz (arrays samples, labels) or .nii.gz / .nii volumes (one file per sample)."""
    nfe: int = 1
    """Number of sampling steps (1 = one-step generation)."""
    labels: str = ""
    """Comma-separated class labels, e.g. 0,1,2; default: `n` per class, every class in turn."""
    n: int = 10
    """Samples per class when --labels is not given."""
    omega: float | None = None
    """CFG scale (1 = no guidance); iMF/pMF models take it as an input (default 2; 1 for models of one
    class, which have nothing to guide). MF models were trained at omega 1 only (their guidance is
    baked in) and sample at 1."""
    t_min: float = 0.0
    """Guidance interval start."""
    t_max: float = 1.0
    """Guidance interval end."""
    weights: str = "ema"
    """'ema' (the constant-decay EMA), 'params' (raw weights), or a power-function EMA the run kept, e.g.
    'ema_1000' (train.py --ema-halflives)."""
    seed: int = 0
    """Seed of the starting noise."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda', ..."""
    vae: str | None = None
    """Latent models: decode the samples to images with this local diffusers AutoencoderKL folder (the
    training latents' normalisation, recorded in the checkpoint, is undone first)."""
    batch_size: int = 256
    """Samples generated (and decoded by --vae) at once; the samples do not depend on it beyond rounding."""
    eval: bool = False
    """Print the quality report of the samples: digits models the classifier agreement and Frechet distance,
    phantom3d models precision / recall and the 3D Frechet distance against held-out phantoms."""


def main(args: Args):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would write the same files
        fail("sample.py runs in one process: launch it with python, not torchrun (evaluate.py shards its "
             "sampling over ranks)")
    device = resolve_device(args.device)
    if args.nfe < 1 or args.n < 1 or args.batch_size < 1:
        fail(f"--nfe, --n and --batch-size must be >= 1, got {args.nfe}, {args.n}, {args.batch_size}")
    if not ((args.omega is None or args.omega >= 1) and 0 <= args.t_min <= args.t_max <= 1):
        fail(f"need omega >= 1 and 0 <= t_min <= t_max <= 1, got {args.omega}, {args.t_min}, {args.t_max}")
    out = Path(args.out)
    if not out.name.endswith((".png", ".npz", ".nii.gz", ".nii")):
        fail(f"--out must end in .png, .npz, .nii.gz or .nii, got {out}")
    model, params, meta = load_model(args.ckpt, args.weights, device)
    writable_folder(out.parent, "--out")  # before the sampling
    omega = guidance(model, args.omega, (args.t_min, args.t_max))
    num_classes, spec = model.spec.num_classes, model.spec
    trained_on = meta.get("config", {}).get("data", {}).get("data")
    if args.eval and trained_on not in ("digits", "phantom3d"):
        fail(f"--eval judges models trained on digits or phantom3d; this one was trained on {trained_on!r}")
    if args.vae and (len(spec.input_size) != 2 or out.name.endswith((".nii.gz", ".nii"))):
        fail("--vae decodes 2D latents to images: this model or --out is not for images")
    if out.name.endswith((".nii.gz", ".nii")) and len(spec.input_size) != 3:
        fail("NIfTI output needs a 3D (volume) model")
    if args.labels:
        try:
            labels = torch.tensor([int(s) for s in args.labels.split(",")])
        except ValueError:
            fail(f"--labels must be comma-separated integers, got {args.labels!r}")
        if ((labels < 0) | (labels >= num_classes)).any():
            fail(f"labels must lie in [0, {num_classes - 1}] for this model")
    else:
        labels = torch.arange(num_classes).repeat_interleave(args.n)
    labels = labels.to(device)
    x = sample_labels(model, params, labels, args.seed, omega, args.nfe, (args.t_min, args.t_max), args.batch_size)
    if args.vae:
        decode = latent_decoder(args.vae, meta, device)
        x = torch.cat([decode(part).cpu() for part in x.split(args.batch_size)])    # (B, 3, H, W) in [-1, 1]
    try:
        if out.name.endswith(".png"):
            save_grid(x, out, nrow=args.n if not args.labels else min(len(labels), 10))
        elif out.name.endswith(".npz"):
            save_npz(x, labels, out)
        else:
            files = save_nifti(x, out, meta.get("affine"))
            out = files[0] if len(files) == 1 else f"{files[0]} ... {files[-1].name}"
    except OSError as e:  # a full disk: no partial file is left (fastmf.images)
        fail(f"cannot write {out} ({e.strerror or e})")
    print(f"wrote {len(labels)} samples ({args.nfe} NFE, omega {omega}) to {out}")
    if args.eval:
        from fastmf.eval import digits_report, phantom_report
        try:
            report = digits_report(x.cpu(), labels.cpu()) if trained_on == "digits" else \
                phantom_report(x.cpu(), meta["config"]["seed"])
        except ValueError as e:  # too few samples
            fail(f"--eval: {e}")
        print(json.dumps(report))


if __name__ == "__main__":
    main(tyro.cli(Args))
