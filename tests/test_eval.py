"""fastmf.eval: the digits judge and the Frechet distance measure what they claim."""
import numpy as np
import pytest
import torch

from fastmf.data import load_digits
from fastmf.eval import default_judge, digits_report, frechet_distance


def test_judge_is_accurate_on_held_out_digits():
    assert default_judge().accuracy > 0.9


def test_agreement_real_vs_shuffled_labels():
    x, y = load_digits("test")
    judge = default_judge()
    assert judge.agreement(x, y) > 0.9
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert judge.agreement(x, shuffled) < 0.3
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        judge.agreement(x[:, :, :4], y)
    with pytest.raises(ValueError, match="integers in 0..9"):
        judge.agreement(x, y + 1)


def test_frechet_distance_basics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Closed form for Gaussians: N(0, I) vs N(m, 4 I) -> |m|^2 + sum (1 + 4 - 2 * 2).
    b = rng.normal(size=(4000, 3)) * 2 + np.array([1.0, 0.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(1.0 + 3.0, rel=0.1)
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(a, a[:, :2])


def test_digits_report_small_for_real_large_for_noise():
    x_tr, y_tr = load_digits("train")
    real = digits_report(x_tr[:360], y_tr[:360])
    noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = digits_report(noise, y_tr[:360])
    assert real["judge_accuracy"] > 0.9
    assert real["agreement"] > 0.9 and fake["agreement"] < 0.3
    # 360 real training digits vs the held-out ones: ~0.7; uniform noise: ~40.
    assert real["frechet"] < 2.0 and fake["frechet"] > 20.0
    # The report's floor is that same real-digit distance at the samples' count.
    assert real["frechet_real"] == pytest.approx(real["frechet"])
    assert digits_report(x_tr[:50], y_tr[:50])["frechet_real"] > real["frechet_real"]
