"""NIfTI volumes with their geometry: one canonical orientation, isotropic voxels, the model's grid.

Each volume is reoriented to RAS+ (nibabel's closest canonical: a permutation and flips of its
axes, no interpolation), resampled (trilinear) to isotropic voxels of `voxel_size` mm, cropped or
padded about its centre to size^3, and its intensities clipped to their 0.5th-99.5th percentiles
and mapped to [-1, 1] (padding is -1). The affine of each result is exact (index -> scanner mm),
so mixed shapes and spacings are the normal case, and the training grid's affine is kept for
writing sampled volumes with real geometry. Written here with nibabel and torch's grid_sample
rather than MONAI or torchio: three transforms whose affine bookkeeping we test directly, without
a large dependency.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastmf.cli import first_line
from fastmf.data.files import NIFTI_SUFFIXES, _existing_dir, _files

PERCENTILES = (0.5, 99.5)


class BadVolume(ValueError):
    """A NIfTI file that cannot be read or scaled (what --skip-bad-files skips)."""


def read_canonical(file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data (X, Y, Z) float32 in RAS+ axis order, affine (4, 4), voxel spacing (3,) mm)."""
    import nibabel as nib  # imported here: only NIfTI data needs it
    try:
        img = nib.as_closest_canonical(nib.load(str(file)))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel, gzip and zlib raise many types for a damaged file
        raise BadVolume(f"cannot read NIfTI volume {file}: {first_line(e)}") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 2:
        raise BadVolume(f"NIfTI volume {file} has shape {data.shape}: expected one 3D volume, at least 2 voxels a side")
    if not np.isfinite(data).all():
        raise BadVolume(f"NIfTI volume {file} contains NaN or inf")
    return data, img.affine.astype(np.float64), np.asarray(img.header.get_zooms()[:3], dtype=np.float64)


def normalise(data: np.ndarray, file: Path) -> np.ndarray:
    """Clip to the 0.5th-99.5th percentiles, then map to [-1, 1]."""
    lo, hi = np.percentile(data, PERCENTILES)
    if hi <= lo:
        raise BadVolume(f"NIfTI volume {file} is constant within its percentiles ({lo}); cannot scale it")
    return (np.clip(data, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0


def to_grid(data: np.ndarray, affine: np.ndarray, spacing: np.ndarray, size: int,
            voxel_size: float) -> tuple[torch.Tensor, np.ndarray]:
    """Resample to isotropic `voxel_size` and crop/pad about the centre to size^3.

    Output voxel q samples input index i = (q + o) v / s (voxel 0 on voxel 0, o the crop offset):
    returns (volume (size, size, size) float32 in [-1, 1], its affine (4, 4)).
    """
    n = np.asarray(data.shape)
    m = np.floor((n - 1) * spacing / voxel_size).astype(int) + 1          # resampled extent, voxels
    offset = (m - size) // 2                                              # < 0: padding
    scale = voxel_size / spacing                                          # input voxels per output voxel
    q = torch.arange(size, dtype=torch.float64)
    coords = [((q + offset[k]) * scale[k]) / (n[k] - 1) * 2 - 1 for k in range(3)]   # align_corners=True
    gx, gy, gz = torch.meshgrid(*coords, indexing="ij")
    grid = torch.stack([gz, gy, gx], dim=-1)[None].float()                # grid_sample wants (W, H, D) order
    shifted = torch.from_numpy(data + 1.0)[None, None].float()            # background 0, so zero padding is -1
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0] - 1.0
    M = np.eye(4)
    M[:3, :3] = np.diag(scale)
    M[:3, 3] = scale * offset
    return out, affine @ M


def load_volumes(path: str | Path, size: int, voxel_size: float | None = None, skip_bad: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, float]:
    """A folder of .nii/.nii.gz -> (x (N, 1, size, size, size) in [-1, 1], y zeros, the first volume's
    grid affine, the voxel size used). `voxel_size` None: the coarsest spacing of the first volume
    (no axis is resampled finer than it was acquired). `skip_bad`: volumes that cannot be read or
    scaled are left out (counted in one line) instead of stopping with an error."""
    root = _existing_dir(path)
    if size < 2:
        raise ValueError(f"volume size must be >= 2, got {size}")
    files = _files(root, NIFTI_SUFFIXES)
    if not files:
        raise ValueError(f"no .nii/.nii.gz volumes in {root}")
    main = os.environ.get("RANK", "0") == "0"  # every rank reads the folder; one reports
    vols, affine, skipped = [], None, []
    for f in tqdm(files, desc=f"reading {root}", unit="volume", disable=None if main else True):  # None: on a terminal
        try:
            data, aff, spacing = read_canonical(f)
            data = normalise(data, f)
        except BadVolume as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        voxel_size = float(spacing.max()) if voxel_size is None else voxel_size
        if voxel_size <= 0:
            raise ValueError(f"--voxel-size must be > 0, got {voxel_size}")
        vol, grid_affine = to_grid(data, aff, spacing, size, voxel_size)
        vols.append(vol)
        affine = grid_affine if affine is None else affine
    if skipped and main:
        print(f"skipped {len(skipped)} of {len(files)} volumes: {skipped[0]}{', ...' if len(skipped) > 1 else ''}",
              file=sys.stderr)
    if not vols:
        raise ValueError(f"no readable volume in {root}: {skipped[0]}")
    return torch.stack(vols)[:, None], torch.zeros(len(vols), dtype=torch.int64), affine, voxel_size
