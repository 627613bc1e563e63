"""Array files (.npz / .safetensors with arrays x and optional y), one file or a folder of shards."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from fastmf.cli import first_line
from fastmf.data.files import ARRAY_SUFFIXES, _files

MAX_CLASSES = 100_000  # a larger label is a mistake, not a class count (the label table grows with it)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _read_arrays(file: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        if file.name.endswith(".npz"):
            if not zipfile.is_zipfile(file):  # np.load would read it as a .npy or a pickle
                raise ValueError("not an .npz (numpy's zip of arrays), or a damaged one")
            with np.load(file, allow_pickle=False) as z:  # never unpickle user files
                arrays = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            from safetensors.torch import load_file

            arrays = load_file(file)
    except Exception as e:  # zipfile, numpy and safetensors each raise their own types
        raise ValueError(f"cannot read array file {file}: {first_line(e)}") from e
    if "x" not in arrays:
        raise ValueError(f"array file {file} has no array 'x' (found: {sorted(arrays)})")
    x, y = arrays["x"], arrays.get("y")
    if x.ndim not in (4, 5) or not x.is_floating_point():
        raise ValueError(f"'x' in {file} is {x.dtype} of shape {tuple(x.shape)}, expected floats "
                         f"of shape (N, C, H, W) or (N, C, D, H, W)")
    if len(x) == 0:
        raise ValueError(f"'x' in {file} has no samples")
    if not torch.isfinite(x).all():
        raise ValueError(f"'x' in {file} holds {int((~torch.isfinite(x)).sum())} NaN or infinite values")
    if y is not None and (y.shape != (len(x),) or y.dtype not in _INT_DTYPES or y.min() < 0):
        raise ValueError(f"'y' in {file} is {y.dtype} of shape {tuple(y.shape)}, expected "
                         f"{len(x)} non-negative integer labels")
    if y is not None and y.max() >= MAX_CLASSES:
        raise ValueError(f"'y' in {file} has label {int(y.max())}: labels must lie in [0, {MAX_CLASSES}) "
                         "(the class count is the largest label + 1)")
    return x.float(), None if y is None else y.long()


def load_arrays(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A .npz / .safetensors file (array `x`, optional `y`), or a folder of such shards.

    Shards are read in name order and concatenated; x keeps its values (no rescaling), as
    float32; y defaults to zeros when no shard has it.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"array file or folder {p} does not exist")
    files = _files(p, ARRAY_SUFFIXES) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"no .npz/.safetensors shards in {p}")
    if not files[0].name.lower().endswith(ARRAY_SUFFIXES):
        raise ValueError(f"{p} is not a .npz or .safetensors file")
    parts = [(files[0], *_read_arrays(files[0]))]
    for f in files[1:]:
        parts.append((f, *_read_arrays(f)))
        (f0, x0, y0), (_, x, y) = parts[0], parts[-1]
        if x.shape[1:] != x0.shape[1:]:
            raise ValueError(f"'x' in shard {f} has sample shape {tuple(x.shape[1:])} but "
                             f"{f0.name} has {tuple(x0.shape[1:])}")
        if (y is None) != (y0 is None):
            raise ValueError(f"shard {f} {'lacks' if y is None else 'has'} labels 'y' but "
                             f"{f0.name} {'has' if y is None else 'lacks'} them")
    x = torch.cat([x for _, x, _ in parts])
    if parts[0][2] is None:
        return x, torch.zeros(len(x), dtype=torch.int64)
    return x, torch.cat([y for *_, y in parts])


def normalise_latent(z: torch.Tensor, norm: dict | None) -> torch.Tensor:
    """VAE latent z (C, H, W) -> training scale: SD's z * scaling_factor (MF) or per-channel
    (z - mean) / std (iMF's constants); `norm` None: as it is."""
    if norm is None:
        return z
    if norm["kind"] == "scale":
        return z * norm["scaling_factor"]
    shape = (-1,) + (1,) * (z.dim() - 1)
    return (z - torch.tensor(norm["mean"]).reshape(shape)) / torch.tensor(norm["std"]).reshape(shape)


def denormalise_latent(x: torch.Tensor, norm: dict) -> torch.Tensor:
    """Inverse of normalise_latent for a batch (B, C, H, W)."""
    if norm["kind"] == "scale":
        return x / norm["scaling_factor"]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * torch.tensor(norm["std"], device=x.device).reshape(shape) + torch.tensor(norm["mean"], device=x.device).reshape(shape)


def read_latent_norm(meta: dict, shard: Path, channels: int) -> dict | None:
    """A shard's `latent_norm` metadata (as prepare_latents writes it), checked, or None without one."""
    if "latent_norm" not in meta:
        return None
    try:
        norm = json.loads(meta["latent_norm"])
        if norm["kind"] == "scale":
            ok = 0 < float(norm["scaling_factor"]) < float("inf")
        else:
            mean, std = torch.tensor(norm["mean"], dtype=torch.float64), torch.tensor(norm["std"], dtype=torch.float64)
            ok = (norm["kind"] == "channel" and mean.shape == std.shape == (channels,) and bool(mean.isfinite().all())
                  and bool((std > 0).all()) and bool(std.isfinite().all()))
    except (ValueError, KeyError, TypeError):  # bad JSON, a missing key, values that are not numbers
        ok = False
    if not ok:
        raise ValueError(f"shard {shard}: its latent_norm {meta['latent_norm'][:120]!r} is neither {{'kind': 'scale', "
                         f"'scaling_factor': s > 0}} nor {{'kind': 'channel', 'mean': [{channels} numbers], 'std': "
                         f"[{channels} numbers > 0]}}")
    return norm


class LatentShards(torch.utils.data.Dataset):
    """A folder of .safetensors shards read row by row through safetensors' memory mapping:
    nothing is loaded whole, resident memory stays flat.

    A shard holds either `x` (n, C, *S), taken as stored, or a VAE's posterior `mean` and `std`
    (n, C, H, W) as fastmf.prepare_latents writes them (as the MF and iMF references cache them):
    then each step draws a fresh latent mean + std * eps, eps keyed by (seed, step, row), and
    normalises it as the shard's metadata `latent_norm` says. Optional labels `y` (n,). Each shard
    is checked once at open (shapes, labels, every value finite, read in chunks).
    """

    CHUNK = 4096

    def __init__(self, folder: str | Path):
        from safetensors import safe_open
        self.files = [f for f in _files(Path(folder), (".safetensors",))]
        if not self.files:
            raise ValueError(f"no .safetensors shards in {folder}")
        self.counts, self.sample_shape, self.has_y, self.posterior, self.latent_norm, max_label = [], None, None, None, None, 0
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as s:
                    keys, meta = set(s.keys()), s.metadata() or {}
                    arrays = ["x"] if "x" in keys else ["mean", "std"] if {"mean", "std"} <= keys else None
                    if arrays is None:
                        raise ValueError(f"shard {f} has neither 'x' nor 'mean' and 'std' (found: {sorted(keys)})")
                    shape = tuple(s.get_slice(arrays[0]).get_shape())
                    if len(shape) not in (4, 5) or shape[0] == 0 or any(tuple(s.get_slice(a).get_shape()) != shape for a in arrays):
                        raise ValueError(f"'{arrays[0]}' in shard {f} has shape {shape}, expected (N, C, H, W) or "
                                         "(N, C, D, H, W) (and 'std' like 'mean')")
                    for a in arrays:
                        for r in range(0, shape[0], self.CHUNK):
                            if not torch.isfinite(s.get_slice(a)[r:r + self.CHUNK].float()).all():
                                raise ValueError(f"'{a}' in shard {f} holds NaN or infinite values")
                    y = s.get_tensor("y") if "y" in keys else None
            except ValueError:
                raise
            except Exception as e:  # safetensors raises its own types for damaged files
                raise ValueError(f"cannot read shard {f}: {first_line(e)}") from e
            if self.sample_shape not in (None, shape[1:]):
                raise ValueError(f"shard {f} has sample shape {shape[1:]} but {self.files[0].name} has {self.sample_shape}")
            if self.has_y not in (None, y is not None):
                raise ValueError(f"shard {f} {'has' if y is not None else 'lacks'} labels 'y' unlike {self.files[0].name}")
            if self.posterior not in (None, arrays != ["x"]):
                raise ValueError(f"shard {f} holds {' and '.join(arrays)} but {self.files[0].name} does not: one kind of shard per folder")
            norm = read_latent_norm(meta, f, shape[1])
            if self.counts and norm != self.latent_norm:  # sampling undoes one scaling for the whole model
                raise ValueError(f"shard {f} has latent_norm {norm} but {self.files[0].name} has {self.latent_norm}")
            if y is not None and (y.shape != (shape[0],) or y.dtype not in _INT_DTYPES or y.min() < 0 or y.max() >= MAX_CLASSES):
                raise ValueError(f"'y' in shard {f} is {y.dtype} of shape {tuple(y.shape)}, expected {shape[0]} "
                                 f"integer labels in [0, {MAX_CLASSES})")
            max_label = max(max_label, int(y.max()) if y is not None else 0)
            self.sample_shape, self.has_y, self.posterior, self.latent_norm = shape[1:], y is not None, arrays != ["x"], norm
            self.counts.append(shape[0])
        self.starts = np.cumsum([0] + self.counts)
        self.num_classes = max_label + 1
        self._open: dict = {}  # per process (each DataLoader worker opens its own handles)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _row(self, k: int, name: str, row: int) -> torch.Tensor:
        from safetensors import safe_open
        if k not in self._open:
            self._open[k] = safe_open(str(self.files[k]), framework="pt")
        return self._open[k].get_slice(name)[row:row + 1][0]

    def __getitem__(self, key: tuple):
        i, flip = key[:2]
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        row = i - int(self.starts[k])
        if self.posterior:  # a fresh draw from the posterior, keyed by (seed, step, row)
            mean, std = self._row(k, "mean", row).float(), self._row(k, "std", row).float()
            eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(key[2] if len(key) > 2 else 0))
            x = normalise_latent(mean + std * eps, self.latent_norm)
        else:
            x = self._row(k, "x", row).float()
        y = self._row(k, "y", row) if self.has_y else torch.tensor(0)
        return (x.flip(-1) if flip else x), y.long(), 0
