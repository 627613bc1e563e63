"""Datasets as in-memory tensors: embedded digits, 3D head phantoms, image / NIfTI folders, arrays.

Every loader returns float32 data `x` of shape (N, C, *spatial) and int64 labels `y` of shape (N,).
Pixel and voxel data are scaled to [-1, 1]; array files (e.g. latents) are returned as stored.
Bad input raises ValueError / FileNotFoundError with a one-line message naming the culprit.

Entry points:
    load_dataset("digits" | "phantom3d" | path, size=, channels=, seed=, num_phantoms=) -> Dataset
    EpochSampler(n, batch_size, seed).indices(step) -> the sample indices of a step's batch
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ARRAY_SUFFIXES = (".npz", ".safetensors")
MAX_CLASSES = 100_000  # a larger label is a mistake, not a class count (the label table grows with it)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class Dataset(NamedTuple):
    """Training tensors, label count, and the held-out split where the source has one."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None


# ----------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=4)
def _digits_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Imported here: scikit-learn costs about a second to import and only digits need it.
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    data = sk_load_digits()
    x = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values 0..16 -> [-1, 1]
    return tuple(train_test_split(x, data.target.astype(np.int64), test_size=0.2,
                                  stratify=data.target, random_state=seed))


def load_digits(split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's embedded 8x8 digits: x (N, 1, 8, 8) in [-1, 1], y (N,) in 0..9.

    `split` is "train" (80%) or "test" (20%, stratified by class, fixed by `seed`).
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    x_train, x_test, y_train, y_test = _digits_split(seed)
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return torch.tensor(x), torch.tensor(y)  # copies, so callers cannot alter the cached split


# ----------------------------------------------------------------------------- phantoms


def _quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) from (not necessarily unit) quaternions (..., 4), w first."""
    w, x, y, z = np.moveaxis(q / np.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def _quadric_coeffs(center: np.ndarray, axes: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Coefficients (n, 10) of (p - c)^T A (p - c), A = R diag(1/a^2) R^T, on monomials of p.

    Expanding the quadratic form lets one (n, 10) @ (10, voxels) matmul evaluate an ellipsoid
    for a whole batch of volumes, instead of materialising (n, voxels, 3) offsets.
    """
    a = np.einsum("nij,nj,nkj->nik", rot, 1.0 / axes**2, rot)
    b = -2.0 * np.einsum("nij,nj->ni", a, center)
    c = np.einsum("ni,nij,nj->n", center, a, center)
    return np.stack([a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], 2 * a[:, 0, 1], 2 * a[:, 0, 2],
                     2 * a[:, 1, 2], b[:, 0], b[:, 1], b[:, 2], c], -1)


def make_phantoms(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 3D head phantoms in the spirit of Shepp-Logan: x (n, 1, size, size, size), y zeros.

    Each head is a skull shell (value 1) around a brain (0.4) holding up to five rotated inner
    ellipsoids of intensity +-0.1..0.4, summed and clipped to [0, 1], then mapped to [-1, 1]
    (background -1). Deterministic in (n, size, seed).
    """
    if n < 1 or size < 2:
        raise ValueError(f"make_phantoms needs n >= 1 and size >= 2, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    # Head: small random offset and tilt; the brain is the head shrunk by the skull thickness.
    head_center = rng.uniform(-0.04, 0.04, (n, 3))
    head_axes = rng.uniform(0.72, 0.92, (n, 3))
    head_rot = _quat_to_matrix(np.concatenate([np.ones((n, 1)), rng.normal(0, 0.1, (n, 3))], -1))
    brain_axes = head_axes - rng.uniform(0.07, 0.12, (n, 1))  # >= 1 voxel at 32^3
    ellipsoids = [(head_center, head_axes, head_rot, np.full(n, 1.0)),
                  (head_center, brain_axes, head_rot, np.full(n, -0.6))]
    # Inner structures: centre within 0.55 of the brain radius and semi-axes <= 0.25 < 0.42 * the
    # smallest brain axis (0.6) keep every structure inside the brain, away from the skull.
    for _ in range(5):
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
        offset = direction * 0.55 * rng.uniform(size=(n, 1)) ** (1 / 3)  # uniform in the ball
        center = head_center + np.einsum("nij,nj->ni", head_rot, brain_axes * offset)
        value = rng.choice([-1.0, 1.0], n) * rng.uniform(0.1, 0.4, n) * (rng.uniform(size=n) < 0.8)
        ellipsoids.append((center, rng.uniform(0.06, 0.25, (n, 3)),
                           _quat_to_matrix(rng.normal(size=(n, 4))), value))

    coords = torch.linspace(-1 + 1 / size, 1 - 1 / size, size)  # voxel centres
    z, y, x = (c.reshape(-1) for c in torch.meshgrid(coords, coords, coords, indexing="ij"))
    monomials = torch.stack([z * z, y * y, x * x, z * y, z * x, y * x, z, y, x, torch.ones_like(z)])
    coeffs = [torch.from_numpy(_quadric_coeffs(c, a, r)).float() for c, a, r, _ in ellipsoids]
    values = [torch.from_numpy(v).float()[:, None] for *_, v in ellipsoids]

    out = torch.empty(n, size**3)
    chunk = max(1, 2**22 // size**3)  # bounds the (chunk, voxels) temporaries to ~16 MB each
    for lo in range(0, n, chunk):
        vol = out[lo:lo + chunk].zero_()
        for coef, value in zip(coeffs, values):
            vol.addcmul_(coef[lo:lo + chunk] @ monomials <= 1.0, value[lo:lo + chunk])
        vol.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
    return out.reshape(n, 1, size, size, size), torch.zeros(n, dtype=torch.int64)


# ----------------------------------------------------------------------------- files


def _existing_dir(path: str | Path) -> Path:
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    return root


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    # Hidden files are skipped: macOS "._name.png" metadata files would otherwise read as corrupt.
    return sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.lower().endswith(suffixes))


def _read_image(file: Path, size: int, channels: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(file) as im:
            im = im.convert("RGB" if channels == 3 else "L")  # forces the full decode
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's "not a valid image" errors
        raise ValueError(f"cannot read image {file}: {e}") from e
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)  # centre square
    a = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=np.float32)
    a = a[None] if channels == 1 else a.transpose(2, 0, 1)
    return a / 127.5 - 1.0


def load_image_folder(path: str | Path, size: int,
                      channels: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """PNG/JPG images -> x (N, channels, size, size) in [-1, 1], y (N,), class names.

    With subfolders, each subfolder is a class (sorted by name); otherwise all images are
    class 0 and the class name is the folder's name. Images are centre-cropped to a square and
    resized (bicubic).
    """
    root = _existing_dir(path)
    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    top = _files(root, IMAGE_SUFFIXES)
    if subdirs and top:
        raise ValueError(f"{root} holds both images and subfolders; put all images in class "
                         f"subfolders or none")
    groups = [(d.name, _files(d, IMAGE_SUFFIXES)) for d in subdirs] or [(root.name, top)]
    for name, files in groups:
        if not files:
            where = root / name if subdirs else root
            raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {where}")
    files = [(label, f) for label, (_, fs) in enumerate(groups) for f in fs]
    x = np.empty((len(files), channels, size, size), np.float32)
    for i, (_, f) in enumerate(files):
        x[i] = _read_image(f, size, channels)
    y = torch.tensor([label for label, _ in files], dtype=torch.int64)
    return torch.from_numpy(x), y, [name for name, _ in groups]


def _read_nifti(file: Path) -> np.ndarray:
    import nibabel as nib  # imported here: only NIfTI data needs it

    try:
        vol = nib.load(str(file)).get_fdata(dtype=np.float32)
    except Exception as e:  # nibabel, gzip and zlib raise many types for a damaged file
        raise ValueError(f"cannot read NIfTI volume {file}: {e}") from e
    if vol.ndim == 4 and vol.shape[3] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise ValueError(f"NIfTI volume {file} has shape {vol.shape}, expected 3D (D, H, W)")
    if not np.isfinite(vol).all():
        raise ValueError(f"NIfTI volume {file} contains NaN or inf")
    lo, hi = vol.min(), vol.max()
    if hi == lo:
        raise ValueError(f"NIfTI volume {file} is constant ({lo}); cannot scale it to [-1, 1]")
    return (vol - lo) / (hi - lo) * 2.0 - 1.0  # per-volume min-max


def load_nifti_folder(path: str | Path,
                      size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """.nii/.nii.gz volumes -> x (N, 1, D, H, W) in [-1, 1] (per-volume min-max), y zeros.

    All volumes must share one shape; `size` then resamples them (trilinear) to size^3.
    """
    root = _existing_dir(path)
    if size is not None and size < 2:
        raise ValueError(f"volume size must be >= 2, got {size}")
    files = _files(root, NIFTI_SUFFIXES)
    if not files:
        raise ValueError(f"no .nii/.nii.gz volumes in {root}")
    vols = []
    for f in files:
        vols.append(_read_nifti(f))
        if vols[-1].shape != vols[0].shape:
            raise ValueError(f"NIfTI volume {f} has shape {vols[-1].shape} but {files[0].name} has "
                             f"{vols[0].shape}; all volumes must share one shape")
    x = torch.from_numpy(np.stack(vols))[:, None]
    if size is not None:
        # One volume at a time keeps the float temporaries of large volumes small.
        x = torch.cat([F.interpolate(v[None], size=(size,) * 3, mode="trilinear",
                                     align_corners=False) for v in x])
    return x, torch.zeros(len(x), dtype=torch.int64)


def _read_arrays(file: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        if file.name.endswith(".npz"):
            with np.load(file, allow_pickle=False) as z:  # never unpickle user files
                arrays = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            from safetensors.torch import load_file

            arrays = load_file(file)
    except Exception as e:  # zipfile, numpy and safetensors each raise their own types
        raise ValueError(f"cannot read array file {file}: {e}") from e
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


# ----------------------------------------------------------------------------- dispatch


def load_dataset(name_or_path: str, *, size: int | None = None, channels: int | None = None,
                 seed: int = 0, num_phantoms: int = 1024) -> Dataset:
    """Load a dataset by name or path.

    "digits": 8x8 digits, 10 classes, held-out 20% in x_test/y_test (size/channels: None or 8/1).
    "phantom3d": `num_phantoms` random head volumes of size^3 (default 32) plus num_phantoms/8
        held-out ones, 1 class.
    A folder of .nii/.nii.gz volumes (optional `size` resamples), a folder of .npz/.safetensors
    shards or one such file (`y` labels optional), or a folder of PNG/JPG images (class
    subfolders optional; `size` required, `channels` 3 unless given). `seed` fixes the digits
    split and the phantoms. Path sources have no held-out split.
    """
    if name_or_path == "digits":
        if size not in (None, 8) or channels not in (None, 1):
            raise ValueError(f"digits are 1x8x8; got size={size}, channels={channels}")
        return Dataset(*load_digits("train", seed), 10, *load_digits("test", seed))
    if name_or_path == "phantom3d":
        if channels not in (None, 1):
            raise ValueError(f"phantom3d volumes have 1 channel, got channels={channels}")
        if num_phantoms < 1:
            raise ValueError(f"num_phantoms must be >= 1, got {num_phantoms}")
        n_test = max(1, num_phantoms // 8)
        x, y = make_phantoms(num_phantoms + n_test, 32 if size is None else size, seed)
        return Dataset(x[:num_phantoms], y[:num_phantoms], 1, x[num_phantoms:], y[num_phantoms:])

    p = Path(name_or_path)
    if not p.exists():
        raise FileNotFoundError(f"dataset {name_or_path!r} is neither 'digits', 'phantom3d' nor "
                                f"an existing file or folder")
    if p.is_file() or _files(p, ARRAY_SUFFIXES):
        if p.is_dir() and _files(p, NIFTI_SUFFIXES):
            raise ValueError(f"{p} holds both NIfTI volumes and array shards; keep one kind")
        x, y = load_arrays(p)
        return Dataset(x, y, int(y.max()) + 1)
    if _files(p, NIFTI_SUFFIXES):
        return Dataset(*load_nifti_folder(p, size), 1)
    if size is None:
        raise ValueError(f"image folder {p} needs an image size: pass --image-size")
    x, y, classes = load_image_folder(p, size, 3 if channels is None else channels)
    return Dataset(x, y, len(classes))


class EpochSampler:
    """Which samples make the global batch of each step: a function of (seed, step) only.

    Epoch e is a permutation of the dataset drawn from a generator seeded by (seed, e); step s
    takes the slice s % per_epoch of epoch s // per_epoch (the last partial batch is dropped).
    Nothing to save but the step, so a resumed run sees exactly the batches an uninterrupted one
    would, and any slicing of a batch (e.g. across ranks) sees the same global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch size must be in 1..{n} (the dataset size), got {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        """Sample indices (batch_size,) of the global batch of `step`."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:  # one permutation per epoch, kept while the epoch lasts
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]
