"""fastmf.data: shapes, ranges, determinism, splits, phantoms, loaders' errors, batch resume."""
import gzip
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastmf.data import (EpochSampler, load_arrays, load_dataset, load_digits, load_volumes, make_phantoms,
                         step_batches, to_model_range)
from fastmf.data.image_folder import ImageFolder


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
    assert d.num_classes == 10 and len(d.source) == 1437 and d.sample_shape == (1, 8, 8) and not d.streaming
    x, y, bad = d.source[(3, False)]
    assert torch.equal(x, load_digits("train")[0][3]) and bad == 0
    p = load_dataset("phantom3d", size=16, num_phantoms=16)
    assert len(p.source) == 16 and p.sample_shape == (1, 16, 16, 16) and p.num_classes == 1
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


def test_image_folder_classes_crop_and_uint8(tmp_path):
    for cls, value in [("cat", 0), ("dog", 255)]:
        (tmp_path / cls).mkdir()
        for i in range(2):
            _write_png(tmp_path / cls / f"{i}.png", value=value)
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    images = ImageFolder(tmp_path, size=6, channels=3)
    assert images.classes == ["cat", "dog"] and images.labels.tolist() == [0, 0, 1, 1]
    x, y, bad = images[(2, False)]
    assert x.shape == (3, 6, 6) and x.dtype == torch.uint8 and (x == 255).all() and y == 1 and bad == 0
    assert torch.equal(to_model_range(torch.stack([images[(0, False)][0], x])).amax((1, 2, 3)), torch.tensor([-1.0, 1.0]))
    d = load_dataset(str(tmp_path), size=4, channels=1)
    assert d.sample_shape == (1, 4, 4) and d.num_classes == 2 and d.streaming


def test_real_photos_folder_and_csv_center_crop_and_flip(tmp_path):
    """scikit-learn's bundled photos (china.jpg 427x640, flower.jpg), as a folder and as a CSV."""
    from sklearn.datasets import load_sample_images
    photos = load_sample_images()
    for name, arr in zip(photos.filenames, photos.images):
        (tmp_path / "photos" / Path(name).stem).mkdir(parents=True)
        Image.fromarray(arr).save(tmp_path / "photos" / Path(name).stem / Path(name).name)
    images = ImageFolder(tmp_path / "photos", size=32)
    china, _, _ = images[(0, False)]
    flipped, _, _ = images[(0, True)]
    assert china.shape == (3, 32, 32) and torch.equal(flipped, china.flip(-1)) and not torch.equal(flipped, china)
    # ADM centre crop: the short side (427) becomes 32, then the centre 32 columns of the long side.
    ref = np.asarray(Image.fromarray(photos.images[0]).resize((48, 32), Image.Resampling.BICUBIC))[:, 8:40]
    assert np.abs(china.permute(1, 2, 0).numpy().astype(int) - ref.astype(int)).mean() < 12
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\nphotos/china/china.jpg,3\nphotos/flower/flower.jpg,1\n")
    listed = ImageFolder(csv, size=32)
    assert len(listed) == 2 and listed.num_classes == 4 and torch.equal(listed[(0, False)][0], china)
    csv.write_text("photos/china/china.jpg,cat\n")
    with pytest.raises(ValueError, match="list.csv line 1: expected 'path,label'"):
        ImageFolder(csv, size=32)
    csv.write_text("photos/none.jpg,0\n")
    with pytest.raises(ValueError, match="list.csv line 1: no file"):
        ImageFolder(csv, size=32)
    csv.write_bytes("photos/china/china.jpg,3\nphotos/\u00e9t\u00e9.jpg,1\n".encode("latin-1"))  # not UTF-8
    with pytest.raises(ValueError, match="list.csv is not a CSV of UTF-8 text: 'utf-8' codec can't decode byte 0xe9"):
        ImageFolder(csv, size=32)


def test_image_folder_errors_and_skipped_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(tmp_path / "missing", size=8)
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg images"):
        ImageFolder(tmp_path, size=8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write_png(tmp_path / "a" / "1.png")
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg images in .*b"):  # an empty class folder
        ImageFolder(tmp_path, size=8)
    (tmp_path / "b" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="cannot read image .*2.png"):
        ImageFolder(tmp_path, size=8)[(1, False)]
    x, y, bad = ImageFolder(tmp_path, size=8, skip_bad=True)[(1, False)]  # replaced by the next readable one
    assert bad == 1 and y == 0 and x.shape == (3, 8, 8)
    # A header claiming 10^10 pixels: Pillow refuses it as a decompression bomb, one line all the same.
    png = (tmp_path / "a" / "1.png").read_bytes()
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (tmp_path / "b" / "2.png").write_bytes(png[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:])
    with pytest.raises(ValueError, match="cannot read image .*2.png: Image size \\(10000000000 pixels\\) exceeds limit"):
        ImageFolder(tmp_path, size=8)[(1, False)]
    with pytest.raises(ValueError, match="needs an image size"):
        load_dataset(str(tmp_path))


def _write_nifti(path, vol, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), str(path))


NIB_DATA = Path(nib.__file__).parent / "tests" / "data"


def test_nifti_volumes_keep_their_geometry(tmp_path):
    """nibabel's own test volumes: mixed shapes, spacings and orientations to one RAS+ grid."""
    import shutil
    for name in ("anatomical.nii", "reoriented_anat_moved.nii", "standard.nii.gz"):
        shutil.copy(NIB_DATA / name, tmp_path / name)  # 2 mm LAS 33x41x25, 4 mm RAS, 1x3x2 mm RAS 4x5x7
    x, y, affine, voxel = load_volumes(tmp_path, size=16, voxel_size=4.0)
    assert x.shape == (3, 1, 16, 16, 16) and x.min() >= -1 and x.max() <= 1 and y.tolist() == [0, 0, 0]
    assert nib.aff2axcodes(affine) == ("R", "A", "S") and np.allclose(np.linalg.norm(affine[:3, :3], axis=0), 4.0)
    # Geometry is exact: the grid's voxel centre maps to the scanner point the source volume has there.
    src = nib.as_closest_canonical(nib.load(str(NIB_DATA / "anatomical.nii")))
    data = src.get_fdata()
    q = np.array([8, 8, 8, 1.0])
    i = np.linalg.solve(src.affine, affine @ q)[:3]  # source voxel index of that scanner point
    assert np.allclose(i, np.round(i))               # 4 mm grid on a 2 mm volume: lands on a voxel
    lo, hi = np.percentile(data, (0.5, 99.5))
    expected = (np.clip(data[tuple(np.round(i).astype(int))], lo, hi) - lo) / (hi - lo) * 2 - 1
    assert float(x[0, 0, 8, 8, 8]) == pytest.approx(expected, abs=1e-5)
    d = load_dataset(str(tmp_path), size=16)  # default voxel size: the first volume's coarsest spacing (2 mm)
    assert np.allclose(np.linalg.norm(np.asarray(d.affine)[:3, :3], axis=0), 2.0)


def test_nifti_errors(tmp_path, capsys):
    import shutil
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(NIB_DATA / "resampled_anat_moved.nii", real)  # nibabel's: holds NaN voxels
    with pytest.raises(ValueError, match="resampled_anat_moved.nii contains NaN or inf"):
        load_volumes(real, size=4)
    shutil.copy(NIB_DATA / "example4d.nii.gz", real / "a.nii.gz")  # a 4D series
    with pytest.raises(ValueError, match=r"a.nii.gz has shape \(128, 96, 24, 2\): expected one 3D volume"):
        load_volumes(real, size=4)
    rng = np.random.default_rng(0)
    _write_nifti(tmp_path / "a.nii.gz", rng.uniform(3, 7, (6, 5, 4)))
    _write_nifti(tmp_path / "b.nii", rng.uniform(0, 1, (6, 5, 4, 3)))  # 4D
    with pytest.raises(ValueError, match=r"b.nii has shape \(6, 5, 4, 3\): expected one 3D volume"):
        load_volumes(tmp_path, size=4)
    bad = rng.uniform(0, 1, (6, 5, 4))
    bad[1, 1, 1] = np.nan
    _write_nifti(tmp_path / "b.nii", bad)
    with pytest.raises(ValueError, match="b.nii contains NaN or inf"):
        load_volumes(tmp_path, size=4)
    (tmp_path / "b.nii").write_bytes(gzip.compress(b"garbage" * 100))
    with pytest.raises(ValueError, match="cannot read NIfTI volume .*b.nii"):
        load_volumes(tmp_path, size=4)
    _write_nifti(tmp_path / "b.nii", np.ones((6, 5, 4)))
    with pytest.raises(ValueError, match="b.nii is constant"):
        load_volumes(tmp_path, size=4)
    # --skip-bad-files: the unreadable volume is left out, in one line, and the others are the same
    (tmp_path / "c.nii").write_bytes(b"garbage")
    x, *_ = load_volumes(tmp_path, size=4, skip_bad=True)
    assert "skipped 2 of 3 volumes: NIfTI volume" in capsys.readouterr().err
    (tmp_path / "b.nii").unlink()
    (tmp_path / "c.nii").unlink()
    assert torch.equal(x, load_volumes(tmp_path, size=4)[0])
    with pytest.raises(ValueError, match="no readable volume in .*real: NIfTI volume .*a.nii.gz has shape"):
        load_volumes(real, size=4, skip_bad=True)  # a 4D series and a volume with NaN
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .nii/.nii.gz volumes in .*empty"):
        load_volumes(empty, size=4)


def test_step_batches_resume_mid_epoch_and_use_workers(tmp_path):
    """The loader's batches are a function of the step: resuming at step 5 (mid-epoch) gives what
    an uninterrupted run sees, with or without worker processes."""
    for i in range(12):
        _write_png(tmp_path / f"{i:02d}.png", value=i * 20)
    images = ImageFolder(tmp_path, size=4)
    sampler = EpochSampler(len(images), 4, seed=3)   # 3 steps per epoch
    rows = torch.tensor([2, 0, 3, 1])
    flip_of = lambda s: torch.rand(4, generator=torch.Generator().manual_seed(s)) < 0.5
    straight = step_batches(images, sampler, rows, 0, flip_of, workers=0, pin_memory=False)
    ref = [next(straight) for _ in range(8)]
    resumed = step_batches(images, EpochSampler(len(images), 4, seed=3), rows, 5, flip_of, workers=2, pin_memory=False)
    for step in range(5, 8):
        x, y, bad = next(resumed)
        assert torch.equal(x, ref[step][0]) and torch.equal(y, ref[step][1]) and bad == 0
    values = ref[0][0].float().mean((1, 2, 3)) / 20
    assert torch.equal(values.round().long(), sampler.indices(0)[rows])  # rows in the order asked


def test_arrays_npz_safetensors_shards_and_errors(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 4, 2, 2)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(5))
    save_file({"x": torch.ones(3, 4, 2, 2, dtype=torch.bfloat16), "y": torch.tensor([7, 0, 1])},
              str(tmp_path / "b.safetensors"))
    xs, ys = load_arrays(tmp_path)
    assert xs.shape == (8, 4, 2, 2) and xs.dtype == torch.float32
    assert torch.equal(xs[:5], torch.from_numpy(x)) and ys.tolist() == [0, 1, 2, 3, 4, 7, 0, 1]
    assert load_dataset(str(tmp_path)).num_classes == 8 and len(load_dataset(str(tmp_path)).source) == 8
    xa, ya = load_arrays(tmp_path / "a.npz")
    assert len(xa) == 5 and ya.dtype == torch.int64

    np.savez(tmp_path / "c.npz", x=np.zeros((2, 4, 3, 3), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"c.npz has sample shape \(4, 3, 3\) but a.npz has \(4, 2"):
        load_arrays(tmp_path)
    # A broken zip, and files numpy would read as a pickle (text) or meet empty: one line each.
    for content in (b"PK\x03\x04 broken zip", b"x,y\n1,2\n", b""):
        (tmp_path / "c.npz").write_bytes(content)
        with pytest.raises(ValueError, match="cannot read array file .*c.npz: not an .npz \\(numpy's zip of arrays\\), "
                                             "or a damaged one$"):
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


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise ValueError(f"cannot read image {i}.png: truncated")


def test_an_error_from_a_dataloader_worker_is_shown_as_one_line():
    """DataLoader re-raises a worker's error with the whole traceback as its text; the entry points
    show its last line (train.py, evaluate.py's reference folder, prepare_latents)."""
    from fastmf.cli import last_line
    with pytest.raises(ValueError) as e:
        next(iter(torch.utils.data.DataLoader(_Unreadable(), num_workers=1)))
    assert "Traceback" in str(e.value) and last_line(e.value) == "cannot read image 0.png: truncated"
