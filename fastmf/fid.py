"""FID and Inception Score as the ADM evaluator defines them, accumulated in streaming form.

    stats = FeatureStats(n_total=50_000)
    stats.add(*inception(images_uint8), index)   # any number of batches, on any number of ranks
    stats.all_reduce()                           # under torchrun: sums over ranks
    fid = stats.fid(load_reference("VIRTUAL_imagenet256_labeled.npz"))
    is_mean, is_std = stats.inception_score()

Why not torch-fidelity, pytorch-fid or clean-fid: all three import torchvision, which cannot be
installed beside the CPU torch build fastmf's CI uses (and pulls a CUDA torch on a GPU box);
their network is fastmf.inception here, loading the same weights files. The statistics are sums
(count, sum x, sum x x^T in float64; per IS split sum p and sum p log p), so ranks add theirs and
nothing is gathered. The IS splits are torch-fidelity's and the official evaluators': the samples
permuted by numpy's RandomState(2020), then cut into 10 equal runs; sample i's split follows from
its global index, whichever rank makes it.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from fastmf.cli import first_line
from fastmf.eval import frechet_from_moments
from fastmf.images import write_atomically

IS_SPLITS = 10  # ADM: splits of 5,000 over 50,000 samples


class FeatureStats:
    """Moments of pool3 features (D = 2048) and the Inception Score's per-split sums, in float64."""

    def __init__(self, n_total: int, dim: int = 2048, classes: int = 1008, splits: int = IS_SPLITS,
                 device="cpu"):
        if n_total < 2:
            raise ValueError(f"FID needs at least 2 samples, got {n_total}")
        self.n_total, self.splits = n_total, min(splits, n_total)
        position = np.empty(n_total, np.int64)
        position[np.random.RandomState(2020).permutation(n_total)] = np.arange(n_total)
        bounds = np.array([s * n_total // self.splits for s in range(self.splits + 1)])
        self.split_of = torch.from_numpy(np.searchsorted(bounds, position, side="right") - 1).to(device)  # (n_total,)
        f64 = dict(dtype=torch.float64, device=device)
        self.count = torch.zeros((), **f64)
        self.sum = torch.zeros(dim, **f64)
        self.outer = torch.zeros(dim, dim, **f64)
        self.split_count = torch.zeros(self.splits, **f64)
        self.split_p = torch.zeros(self.splits, classes, **f64)
        self.split_plogp = torch.zeros(self.splits, **f64)

    def add(self, pool: torch.Tensor, logits: torch.Tensor | None, index: torch.Tensor):
        """pool (b, D), logits (b, classes) or None (no IS), index (b,) the samples' global indices."""
        x = pool.to(self.sum)
        self.count += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x
        if logits is not None:
            logp = torch.log_softmax(logits.to(self.sum), dim=1)                   # (b, classes)
            p = logp.exp()
            split = self.split_of[index.to(self.split_of.device)]
            self.split_count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
            self.split_p.index_add_(0, split, p)
            self.split_plogp.index_add_(0, split, (p * logp).sum(1))

    def all_reduce(self):
        """Sum every statistic over the ranks of the default process group (a collective)."""
        import torch.distributed as td
        if td.is_initialized() and td.get_world_size() > 1:
            for t in (self.count, self.sum, self.outer, self.split_count, self.split_p, self.split_plogp):
                td.all_reduce(t)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) with the unbiased covariance, as np.cov."""
        n = float(self.count)
        if n < 2:
            raise ValueError(f"FID needs at least 2 samples, got {int(n)}")
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def fid(self, reference: tuple[np.ndarray, np.ndarray]) -> float:
        return frechet_from_moments(*self.moments(), *reference)

    def inception_score(self) -> tuple[float, float]:
        """Mean and std over the splits of exp(E_x KL(p(y|x) || p(y))), p(y) each split's mean."""
        if (self.split_count == 0).any():
            raise ValueError("Inception Score: some split has no samples (were logits added?)")
        q = self.split_p / self.split_count[:, None]                                # (splits, classes)
        kl = self.split_plogp / self.split_count - (q * torch.log(q.clamp_min(1e-300))).sum(1)
        scores = kl.exp().cpu().numpy()
        return float(scores.mean()), float(scores.std())


def to_inception_input(x: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] (C = 1 or 3) -> uint8 RGB (N, 3, H, W), as a saved PNG holds them."""
    u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


def load_reference(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz holding them: ADM's reference batches and torch-fidelity's files
    (mu, sigma), the official iMF/pMF files (ref_mu, ref_sigma), `save_reference`'s; never unpickles. A file without them is a one-line ValueError."""
    path = Path(path)
    names = (("mu", "sigma"), ("ref_mu", "ref_sigma"))
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):  # np.load would read it as a .npy or a pickle
        raise ValueError(f"{path}: not an .npz (numpy's zip of arrays), or a damaged one")
    try:
        with np.load(path, allow_pickle=False) as f:
            files, arrays = f.files, {k: f[k] for pair in names for k in pair if k in f.files}
    except Exception as e:  # a damaged member: numpy and zipfile raise many types
        raise ValueError(f"{path}: not a readable .npz ({first_line(e)[:200]})") from e
    keys = next((pair for pair in names if set(pair) <= set(arrays)), None)
    if keys is None:
        raise ValueError(f"{path} holds {sorted(files)}, not the FID statistics mu and sigma")
    mu, sigma = arrays[keys[0]].astype(np.float64), arrays[keys[1]].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not the moments of one feature space")
    return mu, sigma


def save_reference(path: str | Path, stats: FeatureStats):
    """Write mu, sigma (ADM's keys) and n to an .npz, atomically (OSError, and no file, if it fails)."""
    mu, sigma = stats.moments()
    write_atomically(Path(path), lambda tmp: np.savez(tmp, mu=mu, sigma=sigma, n=np.int64(float(stats.count))))
