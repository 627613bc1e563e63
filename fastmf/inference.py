"""A trained model for generation: loaded from any fastmf checkpoint, its noise keyed per sample.

    model, params, meta = load_model("runs/pmf", "ema_1000", device)
    omega = guidance(model, 7.0, (0.2, 0.6))     # MF models take none
    x = generate(model, params, indices, seed=0, nfe=1, omega=omega, interval=(0.2, 0.6))
    x = sample_labels(model, params, labels, seed=0, omega=omega)   # given labels, one noise draw (grids)

Sample i of an evaluation has label i % num_classes and noise from its own stream (seed, i), so
any batching and any number of ranks make the same samples, and every guidance setting of a
sweep sees the same noise.
"""
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from fastmf.ckpt import list_checkpoints, load_checkpoint, newest_good_checkpoint, unflatten_state
from fastmf.cli import fail, first_line
from fastmf.data.loader import stream_key
from fastmf.models import Backbone, from_record, functional
from fastmf.sampling import sample
from fastmf.sharded_ckpt import list_sharded, load_full, read_sharded_meta

EVAL_STREAM = -3  # stream_key's step slot for evaluation noise: apart from every training step's


def load_model(path: str, weights: str, device) -> tuple[Backbone, dict, dict]:
    """(model in eval mode, its params, the checkpoint's meta) from a run folder (its newest good
    checkpoint), a ckpt_STEP.safetensors file or an FSDP run's ckpt_STEP.dcp; `weights` names the
    group ('ema', 'params', 'ema_1000', ...). Problems are one-line errors."""
    p = Path(path)
    sharded = [p] if p.name.endswith(".dcp") else list_sharded(p) if p.is_dir() and not list_checkpoints(p) else []
    if sharded:  # an FSDP run's sharded checkpoint, read whole into this one process
        for ckpt in sharded:  # the newest good one
            try:
                model, groups, meta = _sharded_model(ckpt, device)
                break
            except ValueError as e:  # each message names the checkpoint
                if ckpt == sharded[-1]:
                    fail(str(e))
                print(f"warning: skipped a damaged checkpoint: {e}", file=sys.stderr)
        if weights not in groups:
            fail(f"--weights {weights}: the checkpoint holds {sorted(groups)}")
        model.load_state_dict(groups[weights], strict=True)
        return model.eval(), dict(model.named_parameters()), meta
    try:
        if p.is_dir():
            file, tensors, meta, skipped = newest_good_checkpoint(p)
            for why in skipped:
                print(f"warning: skipped a damaged checkpoint: {why}", file=sys.stderr)
        else:
            file, (tensors, meta) = p, load_checkpoint(p)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if "model" not in meta:
        fail(f"{file} has no fastmf model record: not a checkpoint written by fastmf's train.py")
    try:
        groups = unflatten_state(tensors)
    except ValueError as e:
        fail(f"{file}: {e}")
    if weights not in groups or weights == "opt":
        fail(f"--weights {weights}: the checkpoint holds {sorted(g for g in groups if g != 'opt')}")
    try:
        model = from_record(meta["model"]).to(device)
        model.load_state_dict(groups[weights], strict=True)
    except (ValueError, RuntimeError) as e:
        fail(f"{file} does not hold the model its record describes: {first_line(e)}")
    model.eval()
    return model, {k: v for k, v in model.named_parameters()}, meta


def _sharded_model(ckpt: Path, device) -> tuple[Backbone, dict, dict]:
    """(model, its weight groups, meta) of a sharded checkpoint; ValueError naming it if damaged."""
    meta = read_sharded_meta(ckpt)
    if not {"model", "state"} <= meta.keys():
        raise ValueError(f"{ckpt} has no fastmf model record: not a checkpoint written by fastmf's train.py")
    try:
        model = from_record(meta["model"]).to(device)
    except ValueError as e:
        raise ValueError(f"{ckpt}: {e}") from None
    groups, meta = load_full(ckpt, model.state_dict())
    return model, groups, meta


def default_omega(num_classes: int) -> float:
    """iMF / pMF's default CFG scale: 2, and 1 (no guidance) for models of one class, which have
    nothing to guide (their conditional and null-class fields are one field)."""
    return 1.0 if num_classes == 1 else 2.0


def guidance(model: Backbone, omega: float | None, interval: tuple[float, float] = (0.0, 1.0)) -> float:
    """The CFG scale to sample at: MF models were trained at omega 1 only (their guidance is baked
    in) and refuse other settings; iMF / pMF models take omega and the interval as inputs (default:
    `default_omega`)."""
    if model.record["variant"] == "mf":
        if omega not in (None, 1.0) or tuple(interval) != (0.0, 1.0):
            fail("MF models take no guidance inputs: leave --omega and the interval at their defaults")
        return 1.0
    return default_omega(model.spec.num_classes) if omega is None else omega


def noise(indices: torch.Tensor, shape: tuple, seed: int, device) -> torch.Tensor:
    """(b, *shape) standard normal noise, row j from the stream of sample indices[j]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(stream_key(seed, EVAL_STREAM, i)))
                        for i in indices.tolist()]).to(device)


def generate(model: Backbone, params: dict, indices: torch.Tensor, seed: int, nfe: int, omega: float,
             interval: tuple[float, float], decode=None) -> torch.Tensor:
    """Samples `indices` (b,) of an evaluation, in [-1, 1]: (b, C, *S), or decoded images when
    `decode` (latents -> images) is given. Labels are index % num_classes."""
    spec, device = model.spec, next(iter(params.values())).device
    labels = (indices % spec.num_classes).to(device)
    z = noise(indices, (spec.in_channels, *spec.input_size), seed, device)
    x = sample(functional(model), params, z, labels, steps=nfe, omega=omega, t_min=interval[0], t_max=interval[1])
    return decode(x) if decode is not None else x.clamp(-1, 1)


def sample_labels(model: Backbone, params: dict, labels: torch.Tensor, seed: int, omega: float, nfe: int = 1,
                  interval: tuple[float, float] = (0.0, 1.0), batch_size: int | None = None) -> torch.Tensor:
    """Samples (B, C, *S) for given labels (B,) from one generator seeded `seed` (sample grids, sample.py),
    `batch_size` at a time (default all): the noise is drawn whole, so the batch changes only rounding."""
    spec = model.spec
    z = torch.randn(len(labels), spec.in_channels, *spec.input_size, generator=torch.Generator().manual_seed(seed))
    b = batch_size or len(labels)
    starts = range(0, len(labels), b)
    bar = tqdm(starts, desc="sampling", unit="batch", disable=True if len(starts) == 1 else None)  # None: on a terminal
    return torch.cat([sample(functional(model), params, z[i:i + b].to(labels.device), labels[i:i + b], steps=nfe,
                             omega=omega, t_min=interval[0], t_max=interval[1]) for i in bar])


def latent_decoder(vae_path: str, meta: dict, device):
    """latents -> images in [-1, 1] through a local diffusers AutoencoderKL folder, undoing the
    training latents' normalisation (recorded in the checkpoint)."""
    from fastmf.data.arrays import denormalise_latent
    from fastmf.prepare_latents import load_vae
    vae = load_vae(vae_path, device)
    norm = meta.get("latent_norm") or {"kind": "scale", "scaling_factor": float(vae.config.scaling_factor)}

    @torch.no_grad()
    def decode(x: torch.Tensor) -> torch.Tensor:
        return vae.decode(denormalise_latent(x, norm)).sample.clamp(-1, 1)    # (B, 3, H, W)
    return decode
