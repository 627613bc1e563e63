"""Built-in datasets: scikit-learn's embedded 8x8 digits and random 3D head phantoms."""
from __future__ import annotations

import functools

import numpy as np
import torch

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


NUM_PHANTOMS = 1024  # the phantom3d training set's size (load_dataset)


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
