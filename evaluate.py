"""FID and Inception Score of a checkpoint, over the official evaluation sweep (EMA x NFE x omega x interval);
for volume models a Frechet distance of 3D features (MedicalNet, or a documented fixed random map).

    python evaluate.py --ckpt runs/pmf-b16 --inception pt_inception-2015-12-05-6726825d.pth \
        --reference VIRTUAL_imagenet256_labeled.npz --omega 8.5 --interval 0.1,0.7 --weights ema_2000
    python evaluate.py ... --omega 6.5 7.5 8.5 --interval 0.1,0.7 0.2,0.6 --weights ema_1000 ema_2000 --nfe 1 2
    torchrun --nproc-per-node 8 evaluate.py ...          # the same samples and numbers on any number of GPUs
    python evaluate.py --ckpt runs/brain --reference nifti_dir --volume-features resnet_50.pth --num-samples 1000

Sample i of the n has label i % num_classes (class-balanced: 50 per class for 50,000 of ImageNet) and
its own noise stream, the same for every setting. Each setting's result is written to --out as
soon as it is known, and the best FID is reported with its setting, as the official evaluators do.
"""

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

from fastmf import distributed
from fastmf.cli import fail, last_line, resolve_device, writable_folder
from fastmf.data.loader import default_workers
from fastmf.fid import FeatureStats, load_reference, save_reference, to_inception_input
from fastmf.images import write_atomically
from fastmf.inception import load_fid_inception
from fastmf.inference import generate, guidance, latent_decoder, load_model
from fastmf.recipes import RECIPES


@dataclass
class Args:
    """FID / IS of a fastmf checkpoint's samples against reference statistics, for every combination of
    --weights, --nfe, --omega and --interval. Needs the FID Inception weights as a local file (see the
    README: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torch-fidelity's equivalent)."""
    ckpt: str
    """Run folder (newest good checkpoint), ckpt_STEP.safetensors, or an FSDP run's ckpt_STEP.dcp."""
    reference: str
    """Reference statistics: an .npz with mu and sigma (ADM's VIRTUAL_imagenet256_labeled.npz, the
    official iMF/pMF imagenet_256_fid_stats.npz, torch-fidelity's, or --save-reference's), an image
    folder / CSV (centre-cropped to the samples' size), or for volume models a NIfTI folder (resampled
    as for training) whose statistics are computed here."""
    inception: str | None = None
    """Images: local FID Inception-v3 weights (.pth read weights-only, or .safetensors)."""
    volume_features: str | None = None
    """Volumes: a MedicalNet 3D ResNet weights file (resnet_10 ... resnet_200 .pth) for the Frechet
    distance; without one, a fixed random convolutional feature map (see fastmf/volume_features.py:
    its distances compare runs of one setup, not published numbers)."""
    voxel_size: float | None = None
    """Volumes: isotropic voxel size (mm) a NIfTI --reference is resampled to (default: as load_volumes)."""
    num_samples: int = 50_000
    """Samples per setting."""
    batch_size: int = 250
    """Samples per forward pass, per process."""
    weights: tuple[str, ...] = ("ema",)
    """Weight groups to evaluate: 'ema', 'params', power-function EMAs such as 'ema_1000'."""
    nfe: tuple[int, ...] = (1,)
    """Sampling steps (2: t = 1 -> 0.5 -> 0, as the official samplers)."""
    omega: tuple[float, ...] = ()
    """CFG scales (default 2 for iMF / pMF, 1 for models of one class; MF models take none)."""
    interval: tuple[str, ...] = ("0,1",)
    """Guidance intervals as t_min,t_max."""
    recipe: str | None = None
    """Take --omega, --interval, --weights and --nfe, where not given, from an official model's evaluation
    settings (fastmf/recipes.py, README table: pmf-b16 ... pmf-h32, imf-b2 ... imf-xl2). A converted
    official checkpoint holds its weights as 'ema' and is evaluated with those."""
    seed: int = 0
    """Seed of the samples' noise streams."""
    resize: Literal["tf1", "bilinear"] = "tf1"
    """How images reach 299 px: 'tf1' as the TF graph, ADM and torch-fidelity; 'bilinear' (half-pixel)
    as the official iMF/pMF JAX evaluators, whose reference files were made that way."""
    vae: str | None = None
    """Latent models: the local diffusers AutoencoderKL folder that decodes samples to images."""
    save_reference: str | None = None
    """Write the statistics computed from an image-folder --reference to this .npz."""
    workers: int | None = None
    """DataLoader workers that decode reference images (default: 8, or this rank's share of the CPU cores)."""
    out: str | None = None
    """Results JSON (default: fid.json beside the checkpoint)."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda', ..."""


def parse_interval(s: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in s.split(","))
    except ValueError:
        fail(f"--interval takes t_min,t_max pairs such as 0.2,0.6, got {s!r}")
    if not 0 <= lo <= hi <= 1:
        fail(f"--interval {s}: need 0 <= t_min <= t_max <= 1")
    return lo, hi


def with_evaluation(args: Args, ev, converted: bool) -> Args:
    """args with a recipe's evaluation settings where the flags were left at their defaults."""
    default = Args(ckpt="", reference="")
    pick = lambda name, value: value if getattr(args, name) == getattr(default, name) else getattr(args, name)
    return dataclasses.replace(args, omega=pick("omega", (ev.omega,)), nfe=pick("nfe", (ev.nfe,)),
                               interval=pick("interval", (f"{ev.interval[0]},{ev.interval[1]}",)),
                               weights=pick("weights", ("ema",) if converted else (ev.weights,)))


def my_indices(n: int, dist: distributed.Dist) -> torch.Tensor:
    """This rank's contiguous share of the sample indices 0..n-1."""
    return torch.arange(dist.rank * n // dist.world, (dist.rank + 1) * n // dist.world)


def progress(total: int, desc: str, dist: distributed.Dist):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not dist.is_main, file=sys.stderr, leave=False)


class Features:
    """The feature space of the Frechet distance: the FID Inception for images (with IS logits), a
    MedicalNet or the fixed random map for volumes. Called on samples in [-1, 1]."""

    def __init__(self, args: Args, spec, device):
        self.volumes = len(spec.input_size) == 3
        if self.volumes:
            from fastmf.volume_features import RandomConvFeatures, medicalnet_resnet
            net = medicalnet_resnet(args.volume_features) if args.volume_features else RandomConvFeatures(spec.in_channels)
            self.net, self.dim, self.classes = net.to(device), net.dim, 0
            self.name = f"medicalnet {args.volume_features}" if args.volume_features else "random-conv-3d (seed 0)"
        else:
            if not args.inception:
                fail("--inception PATH is needed for images: the FID Inception-v3 weights (see the README)")
            self.net, self.dim, self.classes = load_fid_inception(args.inception, args.resize, device), 2048, 1008
            self.name = f"fid-inception-v3 {args.inception} ({args.resize} resize)"
        self.metric = "fd3d" if self.volumes else "fid"

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (self.net(x), None) if self.volumes else self.net(to_inception_input(x))

    def stats(self, n: int, device) -> FeatureStats:
        return FeatureStats(n, self.dim, max(self.classes, 1), device=device)


def reference_samples(args: Args, size: int, features: Features):
    """The reference set in [-1, 1] as (dataset, loader of (x, index)) for a folder --reference."""
    path = Path(args.reference)
    if features.volumes:
        from fastmf.data.volumes import load_volumes
        x = load_volumes(path, size, args.voxel_size)[0]                        # (N, 1, S, S, S)
        return len(x), lambda mine: ((x[i], i) for i in mine.split(args.batch_size))
    from fastmf.data.image_folder import ImageFolder
    from fastmf.data.loader import to_model_range
    images = ImageFolder(path, size, 3)
    collate = lambda keys: (to_model_range(torch.stack([images[k][0] for k in keys])), torch.tensor([k[0] for k in keys]))
    return len(images), lambda mine: torch.utils.data.DataLoader(
        [(int(i), False) for i in mine], batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate)


@torch.no_grad()
def reference_stats(args: Args, size: int, features: Features, dist: distributed.Dist) -> tuple:
    """(mu, sigma) of --reference: read from an .npz, or computed from a folder (sharded over ranks)."""
    if Path(args.reference).suffix == ".npz":
        mu, sigma = load_reference(args.reference)
        if len(mu) != features.dim:  # checked now, not after the sampling
            raise ValueError(f"--reference {args.reference} holds statistics of {len(mu)} features, but {features.name} "
                             f"gives {features.dim}: statistics of another network")
        return mu, sigma
    n, batches = reference_samples(args, size, features)
    if not dist.same([n]):  # node-local copies that differ: each rank would take another share
        fail(f"the processes see different reference data in {args.reference} (this one: {n} samples); on several "
             "nodes --reference must hold the same files on each")
    stats = features.stats(n, dist.device)
    bar = progress(n, f"reference statistics of {n} samples", dist)
    for x, index in batches(my_indices(n, dist)):                               # x (b, C, *S) in [-1, 1]
        stats.add(*features(x.to(dist.device)), index)
        bar.update(len(x) * dist.world)
    bar.close()
    stats.all_reduce()
    if args.save_reference and dist.is_main:
        try:
            save_reference(args.save_reference, stats)
        except OSError as e:  # a full disk
            fail(f"cannot write {args.save_reference} ({e.strerror or e})")
        print(f"wrote the reference statistics to {args.save_reference}", file=sys.stderr)
    return stats.moments()


@torch.no_grad()
def evaluate(model, params, features: Features, reference, args: Args, setting: dict, decode, dist) -> dict:
    """The Frechet distance (and IS for images) of args.num_samples samples at one setting; every rank
    makes its share, the ranks' sums are reduced."""
    stats = features.stats(args.num_samples, dist.device)
    bar = progress(args.num_samples, f"{setting['weights']} nfe {setting['nfe']} omega {setting['omega']} "
                                     f"interval {setting['interval']}", dist)
    for index in my_indices(args.num_samples, dist).split(args.batch_size):
        x = generate(model, params, index, args.seed, setting["nfe"], setting["omega"], setting["interval"], decode)
        stats.add(*features(x), index)
        bar.update(len(index) * dist.world)
    bar.close()
    stats.all_reduce()
    result = setting | {features.metric: stats.fid(reference)}
    if not features.volumes:
        result["is"], result["is_std"] = stats.inception_score()
    return result


def write_json(path: Path, results: dict):
    """The results so far, atomically; a failed write (a full disk) is one line."""
    try:
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    except OSError as e:
        fail(f"cannot write {path} ({e.strerror or e})")


def main(args: Args):
    if args.num_samples < 2 or args.batch_size < 1 or not args.nfe or min(args.nfe) < 1 or not args.weights:
        fail(f"need --num-samples >= 2, --batch-size >= 1, --nfe >= 1 and some --weights; got {args.num_samples}, {args.batch_size}, "
             f"{args.nfe}, {args.weights}")
    args = dataclasses.replace(args, workers=default_workers() if args.workers is None else args.workers)
    if args.workers < 0:
        fail(f"--workers must be >= 0, got {args.workers}")
    if any(w < 1 for w in args.omega):
        fail(f"--omega values must be >= 1, got {args.omega}")
    intervals = [parse_interval(s) for s in args.interval]
    reference_path = Path(args.reference)
    if not reference_path.exists():
        fail(f"--reference {reference_path}: no such file or folder")
    if args.recipe is not None and (args.recipe not in RECIPES or RECIPES[args.recipe].evaluation is None):
        fail(f"--recipe {args.recipe}: choose one of {', '.join(n for n, r in RECIPES.items() if r.evaluation)}")
    dist = distributed.init(args.device, resolve_device)
    ckpt = Path(args.ckpt)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "fid.json"
    try:
        model, params, meta = load_model(args.ckpt, "ema", dist.device)  # every fastmf checkpoint holds "ema"
        if dist.is_main:  # refused now, not after the statistics and the sampling, which can take hours
            writable_folder(out.parent, "--out")
            if args.save_reference:
                writable_folder(Path(args.save_reference).parent, "--save-reference")
        if args.recipe:
            args = with_evaluation(args, RECIPES[args.recipe].evaluation, converted="converted_from" in meta)
            intervals = [parse_interval(s) for s in args.interval]
            print(f"{args.recipe}'s evaluation: weights {args.weights}, nfe {args.nfe}, omega {args.omega}, "
                  f"interval {args.interval}", file=sys.stderr)
        if args.weights[0] != "ema":
            model, params, meta = load_model(args.ckpt, args.weights[0], dist.device)
        if model.spec.in_channels not in (1, 3) and not args.vae:
            fail(f"the model makes {model.spec.in_channels}-channel samples: latent models need --vae")
        features = Features(args, model.spec, dist.device)
        decode = latent_decoder(args.vae, meta, dist.device) if args.vae else None
        omegas = list(args.omega) or [guidance(model, None)]
        for omega in omegas:
            for interval in intervals:
                guidance(model, omega, interval)                                # MF refuses guidance settings
        size = generate(model, params, torch.tensor([0]), args.seed, 1, omegas[0], intervals[0], decode).shape[-1]
        reference = reference_stats(args, size, features, dist)
    except ValueError as e:  # a bad reference image arrives from a DataLoader worker with its traceback
        fail(last_line(e))
    metric = features.metric
    results = {"ckpt": str(ckpt), "reference": args.reference, "features": features.name,
               "num_samples": args.num_samples, "seed": args.seed, "settings": [], "best": None}
    for weights in args.weights:
        if weights != args.weights[0]:
            model, params, _ = load_model(args.ckpt, weights, dist.device)
        for nfe in args.nfe:
            for omega in omegas:
                for interval in intervals:
                    setting = {"weights": weights, "nfe": nfe, "omega": omega, "interval": list(interval)}
                    r = evaluate(model, params, features, reference, args, setting, decode, dist)
                    results["settings"].append(r)
                    results["best"] = min(results["settings"], key=lambda s: s[metric])
                    if dist.is_main:
                        score = f"  IS {r['is']:.2f} +- {r['is_std']:.2f}" if "is" in r else ""
                        print(f"{metric.upper()} {r[metric]:.4g}{score}  {setting}")
                        write_json(out, results)
    if dist.is_main:
        b = results["best"]
        print(f"best: {metric.upper()} {b[metric]:.4g} at weights {b['weights']}, {b['nfe']} NFE, omega "
              f"{b['omega']}, interval {b['interval']} ({args.num_samples} samples); all settings in {out}")
    distributed.shutdown()


if __name__ == "__main__":
    main(tyro.cli(Args))
