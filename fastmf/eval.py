"""Quality metrics for generated samples: a digits classifier check, precision / recall, the
Frechet distance (FID's Inception features are in fastmf/fid.py) and a 3D phantom report.

    judge = DigitsJudge()                    # SVC on the digits training split (~0.1 s)
    judge.agreement(samples, labels)         # fraction classified as their conditioning label
    digits_report(samples, labels)           # agreement, Frechet distances, judge accuracy
    phantom_report(samples, seed)            # 3D phantoms: precision / recall, 3D Frechet distance

The Frechet distance for digits is computed on the 64 raw pixels: of the features we measured
they react most to degraded samples. Adding N(0, 0.3) pixel noise to 360 real digits raises the
pixel distance 2.6x, but PCA-16 features only 1.4x and the SVC decision function only 1.2x.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from fastmf.data import NUM_PHANTOMS, load_digits, make_phantoms


def _as_numpy(a: torch.Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def frechet_from_moments(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b), in float64:

    |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2). The symmetric form needs
    only eigh, so it is real and stable even for singular covariances (scipy's sqrtm of C_a C_b,
    which ADM and pytorch-fid use, can return complex values there and needs an offset).
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (len(mu_a), len(mu_a)):
        raise ValueError(f"moments do not match: means {mu_a.shape} and {mu_b.shape}, covariances "
                         f"{cov_a.shape} and {cov_b.shape}")
    if not all(np.isfinite(m).all() for m in (mu_a, mu_b, cov_a, cov_b)):
        raise ValueError("moments contain NaN or inf")
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    d = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross
    return float(max(d, 0.0))  # rounding can leave a tiny negative for identical sets


def frechet_distance(feat_a: torch.Tensor | np.ndarray, feat_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two feature sets (N_a, D) and (N_b, D)."""
    a, b = _as_numpy(feat_a).astype(np.float64), _as_numpy(feat_b).astype(np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need >= 2 samples per feature set, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or inf")
    return frechet_from_moments(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


class DigitsJudge:
    """An RBF SVC trained on the digits training split; judges samples (N, 1, 8, 8) in [-1, 1].

    `accuracy` is its own accuracy on the held-out split (about 0.99), the ceiling for agreement.
    """

    def __init__(self, seed: int = 0):
        from sklearn.svm import SVC  # imported here: scikit-learn takes about a second to import

        x_train, y_train = load_digits("train", seed)
        x_test, y_test = load_digits("test", seed)
        self.train_pixels = x_train.reshape(len(x_train), -1).numpy().astype(np.float64)
        self.test_pixels = x_test.reshape(len(x_test), -1).numpy().astype(np.float64)
        self.classifier = SVC(C=10.0).fit(self.train_pixels, y_train.numpy())
        self.accuracy = float(self.classifier.score(self.test_pixels, y_test.numpy()))

    def pixels(self, samples: torch.Tensor | np.ndarray) -> np.ndarray:
        """Samples (N, 1, 8, 8) -> (N, 64) float64, clipped to [-1, 1] as a saved image would be."""
        s = _as_numpy(samples)
        if s.ndim != 4 or s.shape[1:] != (1, 8, 8) or len(s) == 0:
            raise ValueError(f"digit samples must have shape (N, 1, 8, 8), got {s.shape}")
        if not np.isfinite(s).all():
            raise ValueError("digit samples contain NaN or inf")
        return np.clip(s.reshape(len(s), 64).astype(np.float64), -1.0, 1.0)

    def predict(self, samples: torch.Tensor | np.ndarray) -> np.ndarray:
        """Predicted class (N,) of each sample."""
        return self.classifier.predict(self.pixels(samples))

    def agreement(self, samples: torch.Tensor | np.ndarray,
                  labels: torch.Tensor | np.ndarray) -> float:
        """Fraction of samples classified as their conditioning label (0..9)."""
        lab = _as_numpy(labels)
        if lab.shape != (len(samples),) or not np.issubdtype(lab.dtype, np.integer) \
                or lab.min() < 0 or lab.max() > 9:
            raise ValueError(f"labels must be {len(samples)} integers in 0..9, got {lab.dtype} "
                             f"of shape {lab.shape}")
        return float((self.predict(samples) == lab).mean())


@functools.lru_cache(maxsize=1)
def default_judge() -> DigitsJudge:
    """The shared judge (seed 0 split), trained once per process."""
    return DigitsJudge()


def digits_report(samples: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                  judge: DigitsJudge | None = None) -> dict[str, float]:
    """Quality of class-conditional digit samples (N, 1, 8, 8) in [-1, 1], N >= 2.

    agreement:       fraction classified as their label (judge_accuracy is its ceiling)
    frechet:         pixel Frechet distance of the samples to the held-out digits
    frechet_real:    the same for N real training digits (the floor; the distance grows as N
                     shrinks, so compare frechet with this, not with 0)
    judge_accuracy:  the judge's own held-out accuracy
    """
    judge = default_judge() if judge is None else judge
    pixels = judge.pixels(samples)
    n = min(len(pixels), len(judge.train_pixels))
    return {
        "agreement": judge.agreement(samples, labels),
        "frechet": frechet_distance(pixels, judge.test_pixels),
        # The training split is shuffled, so its first n digits are a random real sample.
        "frechet_real": frechet_distance(judge.train_pixels[:n], judge.test_pixels),
        "judge_accuracy": judge.accuracy,
    }


def _points(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    p = torch.as_tensor(_as_numpy(a), dtype=torch.float64)
    if p.ndim != 2:
        raise ValueError(f"points must be (N, D), got {tuple(p.shape)}")
    if not torch.isfinite(p).all():
        raise ValueError("points contain NaN or inf")
    return p


def knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance (N,) from each point (N, D) to its k-th nearest neighbour other than itself."""
    if len(points) <= k:
        raise ValueError(f"need more than k = {k} points per set, got {len(points)}")
    return torch.cdist(points, points).kthvalue(k + 1, 1).values  # the 1st smallest is the point itself


def precision_recall(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, k: int = 3,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of samples (N_f, D) against real
    data (N_r, D): precision is the fraction of samples inside the real data's manifold (the union
    of balls about each real point reaching its k-th nearest real neighbour), recall the fraction
    of real points inside the samples' manifold built the same way. Both depend on N: compare with
    real data of the same size. `real_radii` (knn_radii(real, k)) saves recomputing them when one
    real set judges several sample sets."""
    r, f = _points(real), _points(fake)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"points must have equal D, got {tuple(r.shape)} and {tuple(f.shape)}")
    if real_radii is not None and tuple(real_radii.shape) != (len(r),):
        raise ValueError(f"real_radii must have shape ({len(r)},), got {tuple(real_radii.shape)}")
    radius_r = knn_radii(r, k) if real_radii is None else real_radii          # (N_r,)
    radius_f = knn_radii(f, k)                                                # (N_f,)
    d = torch.cdist(f, r)                                                     # (N_f, N_r)
    precision = (d <= radius_r[None]).any(1).double().mean().item()
    recall = (d.T <= radius_f[None]).any(1).double().mean().item()
    return precision, recall


def phantom_report(samples: torch.Tensor | np.ndarray, seed: int = 0, num_reference: int = 1000) -> dict[str, float]:
    """Quality of phantom3d samples (N, 1, S, S, S) from a model trained on `seed`'s phantoms.

    The reference is `num_reference` held-out phantoms (make_phantoms with seed + 1: other heads of
    the same distribution); the floor is the first N training phantoms measured the same way.
    precision, recall:            improved precision / recall in voxel space, k = 3
    precision_real, recall_real:  the same for the training phantoms (the ceiling)
    frechet, frechet_real:        Frechet distance in fastmf.volume_features' fixed random
                                  3D features (the floor: compare with frechet_real, not with 0)
    Samples are clipped to [-1, 1], as a written volume would be.
    """
    from fastmf.volume_features import RandomConvFeatures

    s = _as_numpy(samples)
    if s.ndim != 5 or s.shape[1] != 1 or len(set(s.shape[2:])) != 1 or len(s) < 4:
        raise ValueError(f"phantom samples must have shape (N >= 4, 1, S, S, S), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("phantom samples contain NaN or inf")
    fake = torch.from_numpy(np.clip(s, -1.0, 1.0)).float()
    n, size = min(len(fake), NUM_PHANTOMS), s.shape[-1]
    train = make_phantoms(NUM_PHANTOMS, size, seed)[0][:n]
    reference = make_phantoms(num_reference, size, seed + 1)[0]
    features = RandomConvFeatures()
    with torch.no_grad():
        feats = {name: features(x) for name, x in (("fake", fake), ("train", train), ("reference", reference))}
    reference_points = reference.flatten(1).double()
    radii = knn_radii(reference_points, 3)
    precision, recall = precision_recall(reference_points, fake.flatten(1), real_radii=radii)
    precision_real, recall_real = precision_recall(reference_points, train.flatten(1), real_radii=radii)
    return {"precision": precision, "recall": recall, "precision_real": precision_real, "recall_real": recall_real,
            "frechet": frechet_distance(feats["fake"], feats["reference"]),
            "frechet_real": frechet_distance(feats["train"], feats["reference"])}
