"""fastmf.data: shapes, ranges, determinism, splits, phantoms, loaders' errors, batch resume."""
import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastmf.data import (EpochSampler, load_arrays, load_dataset, load_digits, load_image_folder,
                         load_nifti_folder, make_phantoms)


def test_digits_split_shapes_range_and_disjointness():
    x_tr, y_tr = load_digits("train")
    x_te, y_te = load_digits("test")
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert x_tr.min() == -1 and x_tr.max() == 1
    # Stratified: every class holds ~20% of its digits out.
    assert (torch.bincount(y_te, minlength=10) >= 35).all()
    # Disjoint: the digits dataset has no exact duplicate images, so no test image is in train.
    train_rows = {r.tobytes() for r in x_tr.reshape(len(x_tr), -1).numpy()}
    assert not any(r.tobytes() in train_rows for r in x_te.reshape(len(x_te), -1).numpy())
    assert torch.equal(load_digits("test")[0], x_te)
    assert not torch.equal(load_digits("test", seed=1)[0], x_te)
    with pytest.raises(ValueError, match="'val'"):
        load_digits("val")


def test_load_dataset_digits_and_phantoms():
    d = load_dataset("digits")
    assert d.num_classes == 10 and len(d.x) == 1437 and len(d.x_test) == 360
    p = load_dataset("phantom3d", size=16, num_phantoms=16)
    assert p.x.shape == (16, 1, 16, 16, 16) and p.x_test.shape == (2, 1, 16, 16, 16)
    assert p.num_classes == 1
    with pytest.raises(ValueError, match="size=16"):
        load_dataset("digits", size=16)
    with pytest.raises(FileNotFoundError, match="'digitz'"):
        load_dataset("digitz")


def test_phantoms_shape_range_determinism_and_anatomy():
    x, y = make_phantoms(6, size=32, seed=3)
    assert x.shape == (6, 1, 32, 32, 32) and x.dtype == torch.float32
    assert torch.equal(y, torch.zeros(6, dtype=torch.int64))
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(make_phantoms(6, size=32, seed=3)[0], x)
    assert not torch.equal(make_phantoms(6, size=32, seed=4)[0], x)
    assert not torch.equal(x[0], x[1])
    v = x[:, 0]
    assert (v[:, 0, 0, 0] == -1).all()  # corner: background
    assert (v[:, 16, 16, 16] < 1).all() and (v[:, 16, 16, 16] > -1).all()  # centre: brain tissue
    # Walking out from the centre along +x, the last non-background voxel is skull (value 1).
    ray = v[:, 16, 16, 16:]
    last = (ray > -1).int().cumsum(-1).argmax(-1)
    assert (ray[torch.arange(6), last] == 1).all()
    # Brain (value 0.4 -> -0.2 in [-1, 1]) is the most common tissue inside the head.
    inside = v[v > -1]
    assert torch.mode(inside).values == pytest.approx(-0.2, abs=1e-6)


def _write_png(path, size=(12, 10), value=128):
    Image.fromarray(np.full(size[::-1] + (3,), value, np.uint8)).save(path)


def test_image_folder_classes_crop_and_range(tmp_path):
    for cls, value in [("cat", 0), ("dog", 255)]:
        (tmp_path / cls).mkdir()
        for i in range(2):
            _write_png(tmp_path / cls / f"{i}.png", value=value)
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    x, y, classes = load_image_folder(tmp_path, size=6, channels=3)
    assert classes == ["cat", "dog"] and y.tolist() == [0, 0, 1, 1]
    assert x.shape == (4, 3, 6, 6) and x[:2].eq(-1).all() and x[2:].eq(1).all()
    d = load_dataset(str(tmp_path), size=4, channels=1)
    assert d.x.shape == (4, 1, 4, 4) and d.num_classes == 2 and d.x_test is None


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing", size=8)
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg images"):
        load_image_folder(tmp_path, size=8)
    _write_png(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="cannot read image .*b.png"):
        load_image_folder(tmp_path, size=8)
    with pytest.raises(ValueError, match="needs an image size"):
        load_dataset(str(tmp_path))


def _write_nifti(path, vol):
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), str(path))


def test_nifti_folder_minmax_resize_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    _write_nifti(tmp_path / "a.nii.gz", rng.uniform(3, 7, (6, 5, 4)))
    _write_nifti(tmp_path / "b.nii", rng.uniform(-100, 0, (6, 5, 4)))
    x, y = load_nifti_folder(tmp_path)
    assert x.shape == (2, 1, 6, 5, 4) and y.tolist() == [0, 0]
    assert x.amin(dim=(1, 2, 3, 4)).tolist() == [-1, -1]
    assert x.amax(dim=(1, 2, 3, 4)).tolist() == [1, 1]
    d = load_dataset(str(tmp_path), size=8)
    assert d.x.shape == (2, 1, 8, 8, 8) and d.num_classes == 1

    _write_nifti(tmp_path / "c.nii.gz", rng.uniform(0, 1, (6, 5, 5)))
    with pytest.raises(ValueError, match=r"c.nii.gz has shape \(6, 5, 5\) but a.nii.gz has \(6, 5, 4"):
        load_nifti_folder(tmp_path)
    (tmp_path / "c.nii.gz").write_bytes(gzip.compress(b"garbage" * 100))
    with pytest.raises(ValueError, match="cannot read NIfTI volume .*c.nii.gz"):
        load_nifti_folder(tmp_path)
    (tmp_path / "c.nii.gz").unlink()
    # Truncated: a valid header whose voxel data stops short.
    raw = (tmp_path / "b.nii").read_bytes()
    (tmp_path / "b.nii").write_bytes(raw[: len(raw) - 40])
    with pytest.raises(ValueError, match="cannot read NIfTI volume .*b.nii"):
        load_nifti_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .nii/.nii.gz volumes in .*empty"):
        load_nifti_folder(empty)


def test_arrays_npz_safetensors_shards_and_errors(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 4, 2, 2)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(5))
    save_file({"x": torch.ones(3, 4, 2, 2, dtype=torch.bfloat16), "y": torch.tensor([7, 0, 1])},
              str(tmp_path / "b.safetensors"))
    xs, ys = load_arrays(tmp_path)
    assert xs.shape == (8, 4, 2, 2) and xs.dtype == torch.float32
    assert torch.equal(xs[:5], torch.from_numpy(x)) and ys.tolist() == [0, 1, 2, 3, 4, 7, 0, 1]
    assert load_dataset(str(tmp_path)).num_classes == 8
    xa, ya = load_arrays(tmp_path / "a.npz")
    assert len(xa) == 5 and ya.dtype == torch.int64

    np.savez(tmp_path / "c.npz", x=np.zeros((2, 4, 3, 3), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"c.npz has sample shape \(4, 3, 3\) but a.npz has \(4, 2"):
        load_arrays(tmp_path)
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(ValueError, match="cannot read array file .*c.npz"):
        load_arrays(tmp_path)
    np.savez(tmp_path / "c.npz", images=x)
    with pytest.raises(ValueError, match=r"c.npz has no array 'x' \(found: \['images'\]\)"):
        load_arrays(tmp_path / "c.npz")
    np.savez(tmp_path / "c.npz", x=x, y=np.arange(4))
    with pytest.raises(ValueError, match="expected 5 non-negative integer labels"):
        load_arrays(tmp_path / "c.npz")
    bad = x.copy()
    bad[1, 2, 0, 1] = np.nan
    np.savez(tmp_path / "c.npz", x=bad)  # caught at load, not as a NaN loss blamed on the lr
    with pytest.raises(ValueError, match="c.npz holds 1 NaN or infinite values"):
        load_arrays(tmp_path / "c.npz")
    np.savez(tmp_path / "c.npz", x=x, y=np.array([0, 1, 2, 3, 10 ** 9]))  # would size a 1e9-row label table
    with pytest.raises(ValueError, match="has label 1000000000: labels must lie in"):
        load_arrays(tmp_path / "c.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_arrays(tmp_path / "nope.npz")


def test_epoch_sampler_covers_epochs_and_depends_on_seed_and_step_only():
    sampler = EpochSampler(10, 3, seed=5)  # 3 batches per epoch, the 10th sample dropped
    steps = [sampler.indices(s) for s in range(9)]
    for e in range(3):
        epoch = torch.cat(steps[3 * e:3 * e + 3])
        assert len(set(epoch.tolist())) == 9 and epoch.max() < 10
    assert not torch.equal(torch.cat(steps[:3]), torch.cat(steps[3:6]))  # a fresh permutation each epoch
    fresh = EpochSampler(10, 3, seed=5)  # a resumed run: a new sampler, asked from step 7 on
    assert all(torch.equal(fresh.indices(s), steps[s]) for s in (7, 8, 4))
    assert not torch.equal(EpochSampler(10, 3, seed=6).indices(0), steps[0])
    with pytest.raises(ValueError, match="batch size must be in 1..10"):
        EpochSampler(10, 11, seed=0)
