"""FID / IS: the Inception's resize rule and statistics against plain transcriptions, FID's behaviour
with a random-init Inception of the real architecture, and evaluate.py end to end, on 1 and 2 ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from safetensors.torch import save_file

from fastmf.data import load_digits
from fastmf.eval import frechet_from_moments
from fastmf.fid import FeatureStats, load_reference, to_inception_input
from fastmf.inception import FIDInception, load_fid_inception, resize_like_tf1

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """Random-init FID Inception weights with batch norms calibrated on random images (so features
    are O(1) through all 94 layers, as with real weights), written as a .safetensors file."""
    torch.manual_seed(0)
    net = FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # the running statistics become this one batch's
    with torch.no_grad():
        net.train()(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def tf1_resize_reference(x: np.ndarray, size: int) -> np.ndarray:
    """TF 1.x resize_bilinear(align_corners=False), one output pixel at a time: source position
    out * (in / out) in float32, floor and the next pixel (clamped), lerp rows then columns."""
    H, W = x.shape[-2:]
    out = np.zeros(x.shape[:-2] + (size, size))
    sy, sx = np.float32(H / size), np.float32(W / size)
    for i in range(size):
        y = np.float32(i) * sy
        y0 = int(np.floor(y)); y1 = min(y0 + 1, H - 1); fy = np.float32(y - y0)
        for j in range(size):
            xx = np.float32(j) * sx
            x0 = int(np.floor(xx)); x1 = min(x0 + 1, W - 1); fx = np.float32(xx - x0)
            top = x[..., y0, x0] + (x[..., y0, x1] - x[..., y0, x0]) * fx
            bottom = x[..., y1, x0] + (x[..., y1, x1] - x[..., y1, x0]) * fx
            out[..., i, j] = top + (bottom - top) * fy
    return out


def test_tf1_resize_matches_its_definition():
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64) * 255
    for size in (11, 3, 5):
        assert np.allclose(resize_like_tf1(x, size).numpy(), tf1_resize_reference(x.numpy(), size), atol=1e-9)
    assert torch.equal(resize_like_tf1(x[..., :5], 5), x[..., :5])  # same size: the image itself


def test_frechet_equals_the_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu_a, mu_b, c_a, c_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(c_a + c_b - 2 * scipy.linalg.sqrtm(c_a @ c_b).real)
    assert frechet_from_moments(mu_a, c_a, mu_b, c_b) == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match="moments do not match"):
        frechet_from_moments(mu_a, c_a, mu_b[:5], c_b)


def test_streamed_statistics_equal_direct_ones_however_split():
    g = torch.Generator().manual_seed(0)
    n, D, K = 103, 8, 5
    pool, logits = torch.randn(n, D, generator=g) + 2, 3 * torch.randn(n, K, generator=g)
    one, ranks = FeatureStats(n, D, K), [FeatureStats(n, D, K) for _ in range(2)]
    for idx in torch.randperm(n, generator=g).split(17):       # batches in any order
        one.add(pool[idx], logits[idx], idx)
    for r, idx in enumerate([torch.arange(0, 40), torch.arange(40, n)]):  # two "ranks", summed as all_reduce
        ranks[r].add(pool[idx], logits[idx], idx)
    for name in ("count", "sum", "outer", "split_count", "split_p", "split_plogp"):
        setattr(ranks[0], name, getattr(ranks[0], name) + getattr(ranks[1], name))
    mu, sigma = one.moments()
    assert np.allclose(mu, pool.double().mean(0).numpy()) and np.allclose(sigma, np.cov(pool.double().numpy(), rowvar=False))
    # Inception Score as torch-fidelity computes it: permute by RandomState(2020), 10 equal runs.
    f = logits.double()[np.random.RandomState(2020).permutation(n)]
    p, logp = f.softmax(1), f.log_softmax(1)
    scores = []
    for s in range(10):
        ps, ls = p[s * n // 10:(s + 1) * n // 10], logp[s * n // 10:(s + 1) * n // 10]
        scores.append((ps * (ls - ps.mean(0, keepdim=True).log())).sum(1).mean().exp().item())
    for stats in (one, ranks[0]):
        assert stats.inception_score() == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
        assert np.allclose(stats.moments()[1], sigma, rtol=1e-10)


def features(net, images):
    stats = FeatureStats(len(images))
    with torch.no_grad():
        for idx in torch.arange(len(images)).split(8):
            stats.add(*net(images[idx]), idx)
    return stats


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(inception_file):
    net = load_fid_inception(inception_file)
    x, _ = load_digits("test")
    images = to_inception_input(torch.nn.functional.interpolate(x[:16], size=32, mode="nearest"))  # (16, 3, 32, 32)
    real = features(net, images).moments()
    shifted = features(net, to_inception_input(torch.nn.functional.interpolate(x[:16] + 0.2, size=32))).fid(real)
    assert features(net, images).fid(real) < 1e-6 * shifted and shifted > 1.0


def test_inception_file_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="--inception .*none.pth: no such file"):
        load_fid_inception(tmp_path / "none.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "small.pth")
    with pytest.raises(ValueError, match="does not fit FIDInception"):
        load_fid_inception(tmp_path / "small.pth")
    np.savez(tmp_path / "imgs.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="not the FID statistics mu and sigma"):
        load_reference(tmp_path / "imgs.npz")
    np.savez(tmp_path / "official.npz", ref_mu=np.zeros(4), ref_sigma=np.eye(4))  # the iMF/pMF files' keys
    assert load_reference(tmp_path / "official.npz")[1].shape == (4, 4)
    # An empty file (an interrupted copy) fails torch's reader with a bare EOFError: still one line.
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="--inception .*empty.pth: unreadable \\(EOFError\\)"):
        load_fid_inception(tmp_path / "empty.pth")
    # Files numpy would read as something else (a pickle, an .npy) or cannot open, and a damaged member.
    whole = (tmp_path / "official.npz").read_bytes()
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "text.npz").write_text("mu sigma")
    (tmp_path / "cut.npz").write_bytes(whole[:len(whole) // 2])
    for name in ("one.npy", "text.npz", "cut.npz", "empty.pth"):
        with pytest.raises(ValueError, match=f"{name}: not an .npz \\(numpy's zip of arrays\\), or a damaged one"):
            load_reference(tmp_path / name)
    flipped = bytearray(whole)
    flipped[100:140] = bytes(40)  # inside ref_mu.npy's data: the zip's CRC catches it
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="flipped.npz: not a readable .npz \\(Bad CRC-32"):
        load_reference(tmp_path / "flipped.npz")


def run(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "evaluate.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "evaluate.py"]
    return subprocess.run(cmd + list(args), cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)


def test_evaluate_sweeps_and_gives_the_same_numbers_on_two_ranks(tmp_path, inception_file):
    from test_train import small, train
    train.main(small(tmp_path / "run", steps=3, ckpt_every=3, sample_every=100, eval_samples=0))
    x, y = load_digits("test")
    for i in range(30):                                   # a reference folder of 30 digits, 3 classes
        (tmp_path / "ref" / str(int(y[i]) % 3)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(((x[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)).save(tmp_path / "ref" / str(int(y[i]) % 3) / f"{i}.png")
    common = ["--ckpt", str(tmp_path / "run"), "--inception", str(inception_file), "--num-samples", "20", "--batch-size", "8",
              "--workers", "0", "--device", "cpu"]
    r = run(1, *common, "--reference", str(tmp_path / "ref"), "--save-reference", str(tmp_path / "ref.npz"),
            "--omega", "1", "2", "--out", str(tmp_path / "a.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads((tmp_path / "a.json").read_text())
    assert [s["omega"] for s in a["settings"]] == [1.0, 2.0]
    assert a["best"] == min(a["settings"], key=lambda s: s["fid"]) and all(s["fid"] > 0 and s["is"] >= 1 for s in a["settings"])
    assert "best: FID" in r.stdout
    r = run(2, *common, "--reference", str(tmp_path / "ref.npz"), "--omega", "2", "--out", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    b = json.loads((tmp_path / "b.json").read_text())["settings"][0]
    assert b["fid"] == pytest.approx(a["settings"][1]["fid"], rel=1e-6)
    assert (b["is"], b["is_std"]) == pytest.approx((a["settings"][1]["is"], a["settings"][1]["is_std"]), rel=1e-6)

    few = [a if a != "20" else "4" for a in common]
    r = run(1, *few, "--reference", str(tmp_path / "ref.npz"),
            "--recipe", "imf-b2", "--out", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    c = json.loads((tmp_path / "c.json").read_text())["settings"]
    assert [(s["omega"], s["interval"], s["weights"]) for s in c] == [(8.0, [0.4, 0.65], "ema")]  # its eval_config

    # refused before the reference statistics and the samples are computed, not when they are written
    (tmp_path / "a_file").write_text("")
    for flag in ("--out", "--save-reference"):
        r = run(1, *common, "--reference", str(tmp_path / "ref"), flag, str(tmp_path / "a_file" / "x"))
        assert r.returncode == 2 and r.stderr.strip() == f"error: {flag}: {tmp_path / 'a_file'} is a file, not a folder", \
            r.stderr
    r = run(1, *common, "--reference", str(tmp_path / "ref.npz"), "--inception", str(tmp_path / "missing.pth"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "missing.pth: no such file" in r.stderr


@pytest.mark.parametrize("args,message", [(["--workers", "-1"], "--workers must be >= 0, got -1"),
                                          (["--omega", "0.5"], "--omega values must be >= 1")])
def test_bad_evaluate_values_are_one_line_errors(tmp_path, args, message):
    r = run(1, "--ckpt", str(tmp_path), "--inception", str(tmp_path / "none.pth"), "--reference", str(tmp_path),
            *args)
    assert r.returncode == 2 and r.stderr.strip().startswith(f"error: {message}"), r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


def test_generated_samples_do_not_depend_on_batching():
    from fastmf.inference import generate
    from helpers import tiny_model
    model = tiny_model(in_channels=1, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    idx = torch.arange(10)
    whole = generate(model, params, idx, seed=3, nfe=2, omega=2.0, interval=(0.1, 0.7))
    parts = torch.cat([generate(model, params, i, seed=3, nfe=2, omega=2.0, interval=(0.1, 0.7)) for i in idx.split(3)])
    assert torch.allclose(whole, parts, atol=1e-6)
    assert not torch.allclose(whole, generate(model, params, idx, seed=4, nfe=2, omega=2.0, interval=(0.1, 0.7)))


def medicalnet_file(path: Path, blocks, bottleneck, shortcut) -> Path:
    """A random-init MedicalNet ResNet saved as MedicalNet saves it: {'state_dict': {'module.' + name}},
    with its segmentation head."""
    from fastmf.volume_features import MedicalNetResNet
    state = {f"module.{k}": v for k, v in MedicalNetResNet(blocks, bottleneck, shortcut).state_dict().items()}
    torch.save({"state_dict": state | {"module.conv_seg.0.weight": torch.zeros(2, 2)}}, str(path))
    return path


def test_medicalnet_is_built_from_its_file(tmp_path):
    from fastmf.volume_features import Bottleneck, MedicalNetResNet, ShortcutA, medicalnet_resnet
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    basic = medicalnet_resnet(medicalnet_file(tmp_path / "r10.pth", (1, 1, 1, 1), False, "B"))
    assert basic.dim == 512 and basic(x).shape == (2, 512)
    shortcut_a = medicalnet_resnet(medicalnet_file(tmp_path / "r18a.pth", (2, 2, 2, 2), False, "A"))
    assert isinstance(shortcut_a.layer2[0].downsample, ShortcutA) and len(shortcut_a.layer1) == 2
    deep = medicalnet_resnet(medicalnet_file(tmp_path / "b.pth", (1, 2, 1, 1), True, "B"))
    assert isinstance(deep.layer1[0], Bottleneck) and deep(x).shape == (2, 2048) and len(deep.layer2) == 2
    # the per-volume z-score makes the features blind to an intensity scale, as MedicalNet's pretraining
    assert torch.allclose(basic(x), basic(3 * x), atol=1e-5)
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2)}}, str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="not a MedicalNet 3D ResNet"):
        medicalnet_resnet(tmp_path / "other.pth")
    assert MedicalNetResNet((1, 1, 1, 1), False, "B").training  # built fresh it trains; loaded it is frozen
    assert not basic.training and not any(p.requires_grad for p in basic.parameters())


def test_volume_frechet_distance_end_to_end(tmp_path, capsys, monkeypatch):
    import nibabel as nib
    from fastmf.data import make_phantoms
    from fastmf.volume_features import RandomConvFeatures
    from test_train import small, train
    evaluate = __import__("test_train").load_script("evaluate")
    train.main(small(tmp_path / "run", data="phantom3d", image_size=16, steps=2, batch_size=2, sample_every=100,
                     ckpt_every=2, log_every=1, eval_samples=0))
    (tmp_path / "ref").mkdir()
    for i, v in enumerate(make_phantoms(6, 16, seed=1)[0]):
        nib.save(nib.Nifti1Image(v[0].numpy(), np.eye(4)), str(tmp_path / "ref" / f"{i}.nii.gz"))
    common = dict(ckpt=str(tmp_path / "run"), reference=str(tmp_path / "ref"), num_samples=4, batch_size=2,
                  omega=(1.0, 2.0), voxel_size=1.0, device="cpu")
    evaluate.main(evaluate.Args(**common, out=str(tmp_path / "random.json")))
    r = json.loads((tmp_path / "random.json").read_text())
    assert r["features"].startswith("random-conv-3d") and len(r["settings"]) == 2
    assert all(s["fd3d"] > 0 and "is" not in s for s in r["settings"])
    evaluate.main(evaluate.Args(**common, out=str(tmp_path / "mn.json"),
                                volume_features=str(medicalnet_file(tmp_path / "r10.pth", (1, 1, 1, 1), False, "B"))))
    assert json.loads((tmp_path / "mn.json").read_text())["features"].startswith("medicalnet")
    # Statistics of another network: refused before any sampling. A full disk at --out: one line, no file.
    np.savez(tmp_path / "other.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(SystemExit):
        evaluate.main(evaluate.Args(**common | {"reference": str(tmp_path / "other.npz")}, out=str(tmp_path / "o.json")))
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --reference {tmp_path / 'other.npz'} holds statistics of 3 features, but random-conv-3d (seed 0) gives "
        f"{RandomConvFeatures(1).dim}: statistics of another network")

    def full_disk(path, text):
        path.write_bytes(b"{")  # half written
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(SystemExit):
        evaluate.main(evaluate.Args(**common, out=str(tmp_path / "full.json")))
    assert capsys.readouterr().err.splitlines()[-1] == f"error: cannot write {tmp_path / 'full.json'} (No space left on device)"
    assert not list(tmp_path.glob("full.json*"))
