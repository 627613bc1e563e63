"""Writing samples: PNG grids (2D images, or the middle slices of volumes), .npz and NIfTI.
Each file is written under a temporary name and renamed (`write_atomically`, which evaluation's
files use too): a failed write (a full disk) leaves no partial file, and raises its OSError."""
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp), tmp a hidden name beside `path` with its suffix (the writers choose the format by
    it), then rename tmp to `path`; tmp is removed if anything fails."""
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name.removesuffix(suffix)}.tmp{os.getpid()}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels, same shape."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def middle_slices(v: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) volumes -> (N, C, H, 3 W): the three orthogonal middle slices side by side."""
    D, H, W = v.shape[2:]
    side = max(D, H, W)
    pad = lambda s: torch.nn.functional.pad(s, (0, side - s.shape[-1], 0, side - s.shape[-2]), value=-1)
    return torch.cat([pad(v[:, :, D // 2]), pad(v[:, :, :, H // 2]), pad(v[:, :, :, :, W // 2])], dim=-1)


def save_grid(samples: torch.Tensor, path: str | Path, nrow: int, scale: int = 4) -> None:
    """Tile (N, C, H, W) or (N, C, D, H, W) samples in [-1, 1] into a PNG, `nrow` images per row."""
    if samples.dim() == 5:
        samples = middle_slices(samples)
    N, C, H, W = samples.shape
    ncol = -(-N // nrow)
    grid = torch.full((C, ncol * (H + 1) + 1, nrow * (W + 1) + 1), -1.0)
    for i, img in enumerate(samples.float().cpu()):
        r, c = divmod(i, nrow)
        grid[:, 1 + r * (H + 1):1 + r * (H + 1) + H, 1 + c * (W + 1):1 + c * (W + 1) + W] = img
    pixels = to_uint8(grid).transpose(1, 2, 0)                      # (H, W, C)
    image = Image.fromarray(pixels[..., 0] if C == 1 else pixels[..., :3])
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(Path(path), image.save)


def save_npz(samples: torch.Tensor, labels: torch.Tensor, path: str | Path) -> None:
    arrays = {"samples": samples.float().cpu().numpy(), "labels": labels.cpu().numpy()}
    write_atomically(Path(path), lambda tmp: np.savez(tmp, **arrays))


def save_nifti(volumes: torch.Tensor, path: str | Path, affine=None) -> list[Path]:
    """Write each (C, X, Y, Z) volume as its own NIfTI file: name.nii.gz -> name_000.nii.gz, ...,
    with `affine` (voxel -> mm; the training grid's) or, without one, 1 mm voxels."""
    import nibabel as nib
    path = Path(path)
    stem = path.name.removesuffix(".nii.gz").removesuffix(".nii")
    out = []
    for i, v in enumerate(volumes.float().cpu().numpy()):
        data = v[0] if v.shape[0] == 1 else np.moveaxis(v, 0, -1)   # channels last for NIfTI
        f = path.with_name(f"{stem}_{i:03d}.nii.gz")
        image = nib.Nifti1Image(data, np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64))
        write_atomically(f, lambda tmp: nib.save(image, str(tmp)))
        out.append(f)
    return out
