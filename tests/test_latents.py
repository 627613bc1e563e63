"""Latents: prepare_latents with a randomly initialised diffusers AutoencoderKL (no weights can be
downloaded here), memory-mapped shards, training on them and decoding samples with sample.py --vae."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from fastmf.data import load_dataset
from fastmf.data.arrays import LatentShards

ROOT = Path(__file__).resolve().parents[1]
diffusers = pytest.importorskip("diffusers")  # part of the [dev] extra


def tiny_vae(path: Path):
    """The AutoencoderKL architecture at a small width, random weights, written as a local folder."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
                                  sample_size=16)
    vae.save_pretrained(str(path))
    return vae


def run(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_prepare_latents_train_and_decode(tmp_path):
    vae = tiny_vae(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "img" / cls / f"{i}.png")
    lat = tmp_path / "lat"
    run("-m", "fastmf.prepare_latents", str(tmp_path / "img"), str(lat), "--vae", str(tmp_path / "vae"),
        "--image-size", "16", "--shard-size", "4", "--batch-size", "3", "--workers", "0")
    shards = sorted(lat.glob("shard_*.safetensors"))
    assert [s.name for s in shards] == ["shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    with safe_open(str(shards[0]), framework="pt") as f:
        mean0, std0, y0, meta = f.get_tensor("mean"), f.get_tensor("std"), f.get_tensor("y"), f.metadata()
    assert mean0.shape == std0.shape == (4, 4, 8, 8) and y0.tolist() == [0, 0, 0, 0]
    assert json.loads(meta["latent_norm"]) == {"kind": "scale", "scaling_factor": 0.18215}
    # The shard holds the posterior of the centre-cropped image.
    from fastmf.data.image_folder import ImageFolder
    img = ImageFolder(tmp_path / "img", 16)[(1, False)][0].float()[None] / 127.5 - 1
    with torch.no_grad():
        posterior = vae.encode(img).latent_dist
    torch.testing.assert_close(mean0[1:2], posterior.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std0[1:2], posterior.std, rtol=1e-4, atol=1e-5)
    shards[2].unlink()  # a killed run: the missing shard is made again, the others are kept
    mtime = shards[0].stat().st_mtime_ns
    r = run("-m", "fastmf.prepare_latents", str(tmp_path / "img"), str(lat), "--vae", str(tmp_path / "vae"),
            "--image-size", "16", "--shard-size", "4", "--workers", "0")
    assert "(2 already there)" in r.stdout and shards[2].exists() and shards[0].stat().st_mtime_ns == mtime
    r = subprocess.run([sys.executable, "-m", "fastmf.prepare_latents", str(tmp_path / "img"), str(shards[0]),
                        "--vae", str(tmp_path / "vae")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == f"error: --out: {shards[0]} is a file, not a folder", \
        r.stderr  # (diffusers may warn above it)

    data = load_dataset(str(lat))
    assert len(data.source) == 10 and data.num_classes == 2 and data.sample_shape == (4, 8, 8)
    assert data.latent_norm["scaling_factor"] == 0.18215 and data.streaming
    # Each (seed, step, row) key draws its own latent from the posterior: mean + std * eps, scaled.
    a, b, again = data.source[(1, False, 7)][0], data.source[(1, False, 8)][0], data.source[(1, False, 7)][0]
    eps = torch.randn(mean0[1].shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, (mean0[1] + std0[1] * eps) * 0.18215)
    assert torch.equal(a, again) and not torch.equal(a, b)
    assert data.source[(9, False)][1] == 1

    out = tmp_path / "run"
    run("train.py", "--data", str(lat), "--steps", "2", "--batch-size", "4", "--no-compile", "--eval-samples", "0",
        "--workers", "1", "--out", str(out))
    png = tmp_path / "s.png"
    r = run("sample.py", "--ckpt", str(out), "--vae", str(tmp_path / "vae"), "--out", str(png), "--n", "2")
    assert Image.open(png).size[0] > 0


def test_shards_are_memory_mapped_row_by_row_and_checked(tmp_path):
    x = torch.randn(6, 4, 2, 2)
    save_file({"x": x[:4], "y": torch.tensor([0, 1, 2, 3])}, str(tmp_path / "a.safetensors"))
    save_file({"x": x[4:], "y": torch.tensor([4, 5])}, str(tmp_path / "b.safetensors"))
    shards = LatentShards(tmp_path)
    assert len(shards) == 6 and shards.num_classes == 6
    for i in range(6):
        xi, yi, _ = shards[(i, i % 2 == 1)]
        assert torch.equal(xi, x[i].flip(-1) if i % 2 else x[i]) and yi == i
    bad = x[4:].clone()
    bad[1, 0, 0, 0] = float("inf")
    save_file({"x": bad, "y": torch.tensor([4, 5])}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="b.safetensors holds NaN or infinite values"):
        LatentShards(tmp_path)
    save_file({"x": x[4:]}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="b.safetensors lacks labels 'y'"):
        LatentShards(tmp_path)
    (tmp_path / "b.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read shard .*b.safetensors"):
        LatentShards(tmp_path)
    # Shards of two kinds, or of two scalings, in one folder: sampling would undo one scaling for all.
    save_file({"mean": x[4:], "std": x[4:].abs(), "y": torch.tensor([4, 5])}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="b.safetensors holds mean and std but a.safetensors does not"):
        LatentShards(tmp_path)
    scale = {"latent_norm": json.dumps({"kind": "scale", "scaling_factor": 0.18215})}
    save_file({"x": x[4:], "y": torch.tensor([4, 5])}, str(tmp_path / "b.safetensors"), metadata=scale)
    with pytest.raises(ValueError, match="b.safetensors has latent_norm .*'scale'.* but a.safetensors has None"):
        LatentShards(tmp_path)
    save_file({"x": x[:4], "y": torch.tensor([0, 1, 2, 3])}, str(tmp_path / "a.safetensors"), metadata=scale)
    assert LatentShards(tmp_path).latent_norm == {"kind": "scale", "scaling_factor": 0.18215}
    three = {"latent_norm": json.dumps({"kind": "channel", "mean": [0.0] * 3, "std": [1.0] * 3})}  # 4 channels
    save_file({"x": x[4:], "y": torch.tensor([4, 5])}, str(tmp_path / "b.safetensors"), metadata=three)
    with pytest.raises(ValueError, match="b.safetensors: its latent_norm .* is neither .*'mean': \\[4 numbers\\]"):
        LatentShards(tmp_path)


def test_a_full_disk_while_writing_shards_keeps_the_written_ones_and_a_rerun_goes_on(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import fastmf.ckpt
    from fastmf.prepare_latents import main
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    args = [str(tmp_path / "imgs"), str(tmp_path / "lat"), "--vae", str(tmp_path / "vae"), "--image-size", "16",
            "--shard-size", "2", "--workers", "0"]
    tiny_vae(tmp_path / "vae")
    real = fastmf.ckpt.save_file

    def fills_the_disk(tensors, path, metadata):
        if path.endswith("shard_00001.tmp"):  # what safetensors raises on a full disk, half written
            Path(path).write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path, metadata=metadata)
    monkeypatch.setattr(fastmf.ckpt, "save_file", fills_the_disk)
    with pytest.raises(SystemExit):
        main(args)
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write {tmp_path / 'lat' / 'shard_00001.safetensors'} (No space left on device); the shards "
        "written so far are kept: free space and run the same command again to go on")
    assert sorted(f.name for f in (tmp_path / "lat").iterdir()) == ["shard_00000.safetensors"]
    monkeypatch.setattr(fastmf.ckpt, "save_file", real)
    main(args)
    assert "(1 already there)" in capsys.readouterr().out and len(LatentShards(tmp_path / "lat")) == 3


def test_missing_vae_is_a_one_line_error(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    r = subprocess.run([sys.executable, "-m", "fastmf.prepare_latents", str(tmp_path), str(tmp_path / "o"),
                        "--vae", str(tmp_path / "none")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "expected a local diffusers AutoencoderKL folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_imf_channel_normalisation_round_trips():
    from fastmf.data.arrays import denormalise_latent, normalise_latent
    from fastmf.prepare_latents import IMF_MEAN, IMF_STD
    norm = {"kind": "channel", "mean": IMF_MEAN, "std": IMF_STD}
    z = torch.randn(4, 3, 3) * 5
    x = normalise_latent(z, norm)
    torch.testing.assert_close(x[1], (z[1] - IMF_MEAN[1]) / IMF_STD[1])
    torch.testing.assert_close(denormalise_latent(x[None], norm)[0], z)
