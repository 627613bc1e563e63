"""fastmf.eval: the digits judge, precision / recall, the Frechet distance and the phantom report
measure what they claim."""
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


def test_precision_recall_by_hand():
    from fastmf.eval import knn_radii, precision_recall
    real = np.arange(5.0)[:, None]                       # 0 1 2 3 4: each real ball (k = 1) has radius 1
    fake = np.array([[0.5], [10.0]])                     # one inside the real manifold, one far out
    # The fakes' balls have radius 9.5 (each other's distance): they cover all five real points.
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # k = 2: real radii 2, 1, 1, 1, 2; fake 5.2 lies 1.2 from 4 (radius 2): inside.
    assert precision_recall(real, np.array([[5.2], [7.5], [-3.0]]), k=2)[0] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="equal D"):
        precision_recall(real, np.zeros((3, 2)), k=1)
    with pytest.raises(ValueError, match="more than k = 3"):
        precision_recall(real, fake)
    # Radii given by the caller are the ones used: knn_radii's give the same answer, zero radii
    # leave 0.5 (which no real point equals) outside.
    radii = knn_radii(torch.tensor(real), 1)
    assert radii.tolist() == [1.0] * 5
    assert precision_recall(real, fake, k=1, real_radii=radii) == (0.5, 1.0)
    assert precision_recall(real, fake, k=1, real_radii=torch.zeros(5))[0] == 0.0
    with pytest.raises(ValueError, match="real_radii must have shape"):
        precision_recall(real, fake, k=1, real_radii=torch.zeros(4))


def test_phantom_report_tells_real_from_noisy_and_blurred_heads():
    from fastmf.data import make_phantoms
    from fastmf.eval import phantom_report
    heads = make_phantoms(300, 16, seed=5)[0]           # neither the training (0) nor the reference (1) seed
    real = phantom_report(heads, seed=0)
    assert real["precision_real"] > 0.8 and real["recall_real"] > 0.8
    assert real["precision"] == pytest.approx(real["precision_real"], abs=0.05)
    assert real["frechet"] < 2 * real["frechet_real"]
    noisy = phantom_report(heads + 0.3 * torch.randn(heads.shape, generator=torch.Generator().manual_seed(0)))
    assert noisy["precision"] < 0.3 and noisy["frechet"] > 2 * noisy["frechet_real"]
    blurred = phantom_report(torch.nn.functional.avg_pool3d(heads, 3, 1, 1))
    assert blurred["precision"] < 0.1 and blurred["frechet"] > 10 * blurred["frechet_real"]
    with pytest.raises(ValueError, match=r"\(N >= 4, 1, S, S, S\)"):
        phantom_report(heads[:, :, :8])
