"""Training data: what `--data` names, as a source of samples that the step loader streams.

    data = load_dataset("digits" | "phantom3d" | path, size=, channels=, seed=, voxel_size=, skip_bad=)
    batches = step_batches(data.source, EpochSampler(len(data.source), B, seed), rows, start, ...)

Sources: "digits" (scikit-learn's 8x8 digits, 10 classes, in memory), "phantom3d" (random head
volumes), an image folder in the ImageNet layout or a CSV of path,label (decoded lazily in
DataLoader workers, uint8), a folder of NIfTI volumes (resampled with their geometry), array
files .npz / .safetensors (x as stored; a folder of .safetensors shards, e.g. VAE latents from
fastmf.prepare_latents, is read row by row through memory mapping). Bad input is a one-line ValueError /
FileNotFoundError naming the culprit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastmf.data.arrays import MAX_CLASSES, LatentShards, load_arrays
from fastmf.data.builtin import NUM_PHANTOMS, load_digits, make_phantoms
from fastmf.data.files import ARRAY_SUFFIXES, IMAGE_SUFFIXES, NIFTI_SUFFIXES, _files
from fastmf.data.image_folder import ImageFolder
from fastmf.data.loader import EpochSampler, TensorSource, step_batches, to_model_range
from fastmf.data.volumes import load_volumes


@dataclass
class Data:
    """A training source and what the trainer needs to know of it."""
    source: torch.utils.data.Dataset   # source[(index, flip)] -> (x, y, unreadable files skipped)
    num_classes: int
    sample_shape: tuple[int, ...]      # (C, *S)
    streaming: bool                    # decoded on demand (worth DataLoader workers) or in memory
    affine: list | None = None         # volumes: the training grid's voxel -> mm (RAS+) affine
    latent_norm: dict | None = None    # latents: how they were scaled (sample.py --vae undoes it)


def in_memory(x: torch.Tensor, y: torch.Tensor, num_classes: int, affine=None) -> Data:
    return Data(TensorSource(x, y, num_classes), num_classes, tuple(x.shape[1:]), False, affine)


def load_dataset(name_or_path: str, *, size: int | None = None, channels: int | None = None, seed: int = 0,
                 num_phantoms: int = NUM_PHANTOMS, voxel_size: float | None = None, skip_bad: bool = False) -> Data:
    """The source `name_or_path` names (see the module docstring); `size` resizes images and
    volumes (image folders and NIfTI folders need it), `seed` fixes the digits split and phantoms."""
    if name_or_path == "digits":
        if size not in (None, 8) or channels not in (None, 1):
            raise ValueError(f"digits are 1x8x8; got size={size}, channels={channels}")
        return in_memory(*load_digits("train", seed), 10)
    if name_or_path == "phantom3d":
        if channels not in (None, 1) or num_phantoms < 1:
            raise ValueError("phantom3d volumes have 1 channel and need num_phantoms >= 1")
        x, y = make_phantoms(num_phantoms, 32 if size is None else size, seed)
        return in_memory(x, y, 1, np.eye(4).tolist())
    p = Path(name_or_path)
    if not p.exists():
        raise FileNotFoundError(f"dataset {name_or_path!r} is neither 'digits', 'phantom3d' nor an existing file or folder")
    if p.suffix.lower() == ".csv" or (p.is_dir() and not _files(p, ARRAY_SUFFIXES + NIFTI_SUFFIXES)):
        if size is None:
            raise ValueError(f"image folder {p} needs an image size: pass --image-size")
        images = ImageFolder(p, size, 3 if channels is None else channels, skip_bad)
        return Data(images, images.num_classes, images.sample_shape, True)
    if p.is_dir() and _files(p, ARRAY_SUFFIXES) and _files(p, NIFTI_SUFFIXES):
        raise ValueError(f"{p} holds both NIfTI volumes and array shards; keep one kind")
    if p.is_dir() and _files(p, (".safetensors",)) and not _files(p, (".npz",)):
        shards = LatentShards(p)  # memory-mapped, row by row
        return Data(shards, shards.num_classes, shards.sample_shape, True, latent_norm=shards.latent_norm)
    if p.is_file() or _files(p, ARRAY_SUFFIXES):
        x, y = load_arrays(p)
        return in_memory(x, y, int(y.max()) + 1)
    if size is None:
        raise ValueError(f"NIfTI folder {p} needs a volume size: pass --image-size")
    x, y, affine, _ = load_volumes(p, size, voxel_size, skip_bad)
    return in_memory(x, y, 1, affine.tolist())


__all__ = ["Data", "EpochSampler", "IMAGE_SUFFIXES", "MAX_CLASSES", "NUM_PHANTOMS", "load_arrays", "load_dataset",
           "load_digits", "load_volumes", "make_phantoms", "step_batches", "to_model_range"]
