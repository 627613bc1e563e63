"""End to end on CPU: train a few steps, resume exactly, sample; CLI errors are one line."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train = load_script("train")
sample_script = load_script("sample")


def small(out, **kw):
    """A short CPU run's config: the flags of `python train.py`, given as keyword arguments."""
    base = dict(steps=6, batch_size=16, log_every=2, sample_every=3, ckpt_every=3, eval_samples=20,
                compile=False, warmup_steps=2, out=str(out))
    flags = []
    for k, v in (base | kw).items():
        name = "--" + k.replace("_", "-")
        flags += [name] if v is True else [name.replace("--", "--no-", 1)] if v is False else [name, *str(v).split()]
    return train.parse(flags)


def test_train_resume_is_exact_and_sample_writes_outputs(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(small(straight))
    train.main(small(split, steps=3))
    with open(split / "metrics.jsonl", "a") as f:  # what a run killed past its checkpoint leaves
        f.write('{"step": 4, "loss": 1.0}\n{"step": 5, "lo')
    train.main(small(split, resume=True))
    a = load_file(str(straight / "ckpt_0000006.safetensors"))
    b = load_file(str(split / "ckpt_0000006.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    lines = [json.loads(s) for s in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in lines)
    resumed = [json.loads(s) for s in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [2, 3, 4, 6] and resumed[2]["loss"] != 1.0  # 3: the first run's last
    report = json.loads((straight / "eval.json").read_text())
    assert 0 <= report["agreement"] <= 1 and report["nfe"] == 1
    assert (straight / "samples_0000006.png").exists()

    npz = tmp_path / "s.npz"
    sample_script.main(sample_script.Args(ckpt=str(straight), out=str(npz), labels="0,3,9", omega=1.5))
    arrays = np.load(npz)
    assert arrays["samples"].shape == (3, 1, 8, 8) and arrays["labels"].tolist() == [0, 3, 9]
    sample_script.main(sample_script.Args(ckpt=str(straight), out=str(npz), labels="0,3,9", omega=1.5, batch_size=2))
    np.testing.assert_allclose(np.load(npz)["samples"], arrays["samples"], atol=1e-5)  # two batches, the same noise
    png = tmp_path / "g.png"
    sample_script.main(sample_script.Args(ckpt=str(straight), out=str(png), n=2, nfe=2))
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit):  # refused before the sampling, not when the samples are written
        sample_script.main(sample_script.Args(ckpt=str(straight), out=str(png / "g.png")))
    assert capsys.readouterr().err == f"error: --out: {png} is a file, not a folder\n"


def test_batch_without_flow_matching_samples_warns(tmp_path, capsys):
    train.main(small(tmp_path / "b1", steps=1, batch_size=1, log_every=1, sample_every=1, ckpt_every=1,
                     eval_samples=0))
    assert "no flow-matching (r = t) sample per batch; use a batch of at least 2" in capsys.readouterr().err
    train.main(small(tmp_path / "b2", steps=1, batch_size=2, log_every=1, sample_every=1, ckpt_every=1,
                     eval_samples=0))
    assert "flow-matching" not in capsys.readouterr().err


def test_3d_phantoms_train_and_write_nifti(tmp_path, capsys):
    import nibabel as nib
    out = tmp_path / "vol"
    train.main(small(out, data="phantom3d", image_size=16, steps=2, batch_size=2, sample_every=2,
                     ckpt_every=2, log_every=1))
    report = json.loads((out / "eval.json").read_text())    # the final phantom report, 20 samples
    assert report["n"] == 20 and 0 <= report["precision"] <= 1 and report["precision_real"] > 0.5
    assert report["frechet"] > report["frechet_real"] > 0   # 2 steps: far from real heads
    nii = tmp_path / "head.nii.gz"
    sample_script.main(sample_script.Args(ckpt=str(out), out=str(nii), n=2))
    vol = nib.load(str(tmp_path / "head_000.nii.gz")).get_fdata()
    assert vol.shape == (16, 16, 16) and np.isfinite(vol).all()
    capsys.readouterr()
    sample_script.main(sample_script.Args(ckpt=str(out), out=str(tmp_path / "s.npz"), n=8, eval=True))
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])   # sample.py --eval: the same report
    assert printed.keys() == {k for k in report if k not in ("step", "nfe", "omega", "n")}


def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,message", [
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--data", "/no/such/folder"], "neither 'digits', 'phantom3d' nor an existing"),
    (["--device", "foo"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["--model", "dit-tiny", "--variant", "imf"], "dit-tiny cannot train 'imf' (it has no v-head"),
    (["--model", "mit-tiny", "--patch-size", "3"], "patch_size 3 does not divide input_size (8, 8)"),
    (["--model", "mit-q"], "mit-q"),
    (["--data-proportion", "2"], "--data-proportion must be in [0, 1], got 2.0"),
    (["--P-std", "-1"], "--P-std must be > 0"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0, got nan"),
    (["--workers", "-1"], "--workers must be a finite number >= 0, got -1"),
    (["--adam-b2", "1.5"], "--adam-b2 must be in [0, 1), got 1.5"),
    (["--voxel-size", "0"], "--voxel-size must be a finite number > 0, got 0.0"),
    (["--eval-samples", "2"], "--eval-samples must be 0 (no report) or >= 4, got 2"),
    (["--sample-omega", "0.5"], "--sample-omega must be a finite number >= 1 (1: no guidance), got 0.5"),
    (["--cfg-max", "-1"], "--cfg-max must be >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 2^32), got -1"),
])
def test_bad_cli_values_give_one_line_errors(tmp_path, args, message):
    r = run_cli("train.py", "--out", str(tmp_path / "x"), *args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    if "error:" in r.stderr:  # ours are single lines; tyro boxes its own parse and constructor errors
        assert len([l for l in r.stderr.splitlines() if l.strip()]) == 1, r.stderr
    else:
        assert args[0] in ("--model", "--data-proportion", "--P-std", "--cfg-max"), r.stderr


@pytest.mark.parametrize("args,message", [
    (["train.py", "--out", "{file}"], "--out: {file} is a file, not a folder"),
    (["train.py", "--out", "{file}/run"], "--out: cannot write to the folder {file}/run (Not a directory)"),
])
def test_an_output_folder_that_cannot_be_written_is_refused_in_one_line(tmp_path, args, message):
    """Before the first step (sample.py: test_train_resume_is_exact_and_sample_writes_outputs;
    evaluate.py: tests/test_fid.py; prepare_latents: tests/test_latents.py)."""
    file = tmp_path / "a_file"
    file.write_text("")
    fill = lambda s: s.format(file=file)
    r = run_cli(*map(fill, args))
    assert r.returncode == 2 and r.stderr.strip() == "error: " + fill(message), r.stderr


def test_sample_without_checkpoint_fails_clearly(tmp_path):
    r = run_cli("sample.py", "--ckpt", str(tmp_path), "--out", str(tmp_path / "g.png"))
    assert r.returncode != 0 and "no checkpoint (ckpt_STEP.safetensors) in" in r.stderr
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sample.py", "--ckpt", str(tmp_path))
    assert r.returncode != 0 and "error: sample.py runs in one process: launch it with python, not torchrun" in r.stderr


def test_pmf_mit_b_command_reaches_its_first_step(tmp_path):
    r = run_cli("train.py", "--model", "mit-b", "--variant", "pmf", "--steps", "1", "--batch-size", "4",
                "--no-compile", "--eval-samples", "0", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "b" / "ckpt_0000001.safetensors").exists()


def test_resume_refuses_changed_training_options(tmp_path, capsys):
    out = tmp_path / "r"
    train.main(small(out, steps=3))
    with pytest.raises(SystemExit):
        train.main(small(out, resume=True, lr=5e-4))
    assert "other options: --lr 0.001 there, 0.0005 now" in capsys.readouterr().err
    train.main(small(out, resume=True, steps=4, log_every=1, compile=False))  # logging may change


def test_nonfinite_steps_are_skipped_counted_and_stop_after_max_bad_steps(tmp_path, capsys, monkeypatch):
    import torch
    out = tmp_path / "nan"
    with pytest.raises(SystemExit):  # an absurd learning rate blows the weights up: every step non-finite
        train.main(small(out, steps=30, ckpt_every=1, log_every=1, lr=1e30, warmup_steps=0, max_bad_steps=3))
    assert "3 steps in a row with a non-finite loss or gradient" in capsys.readouterr().err
    for ckpt in out.glob("ckpt_*.safetensors"):  # what was saved is finite
        assert all(torch.isfinite(t.float()).all() for t in load_file(str(ckpt)).values())

    # One poisoned step (its loss times NaN) changes no weight, optimizer or EMA state, and is counted.
    real = train.fast_loss_from_draws
    calls = []

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), metrics) if len(calls) == 2 else (loss, metrics)
    monkeypatch.setattr(train, "fast_loss_from_draws", poisoned)
    train.main(small(tmp_path / "poisoned", steps=2, ckpt_every=1, log_every=1, eval_samples=0))
    monkeypatch.setattr(train, "fast_loss_from_draws", real)
    train.main(small(tmp_path / "clean", steps=1, ckpt_every=1, log_every=1, eval_samples=0))
    after_skip = load_file(str(tmp_path / "poisoned" / "ckpt_0000002.safetensors"))
    clean = load_file(str(tmp_path / "clean" / "ckpt_0000001.safetensors"))
    assert after_skip.keys() == clean.keys() and all(torch.equal(after_skip[k], clean[k]) for k in clean)
    last = json.loads((tmp_path / "poisoned" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["skipped_steps"] == 1


def test_dit_mf_trains_resumes_and_samples_from_its_record(tmp_path, capsys):
    out = tmp_path / "dit"
    train.main(small(out, model="dit-tiny", variant="mf", steps=3))
    train.main(small(out, model="dit-tiny", variant="mf", resume=True, steps=4))
    with pytest.raises(SystemExit):  # a checkpoint of another backbone given to the wrong flags
        train.main(small(out, model="mit-tiny", variant="mf", resume=True, steps=5))
    err = capsys.readouterr().err
    assert "--model 'dit-tiny' there, 'mit-tiny' now" in err
    npz = tmp_path / "d.npz"
    sample_script.main(sample_script.Args(ckpt=str(out), out=str(npz), labels="1,2"))  # builds a DiT from the record
    assert np.load(npz)["samples"].shape == (2, 1, 8, 8)


def test_sample_refuses_a_checkpoint_without_a_model_record(tmp_path):
    from safetensors.torch import save_file
    import torch
    save_file({"params.w": torch.zeros(2)}, str(tmp_path / "ckpt_0000001.safetensors"))
    r = run_cli("sample.py", "--ckpt", str(tmp_path), "--out", str(tmp_path / "g.png"))
    assert r.returncode != 0 and "no fastmf model record" in r.stderr and "Traceback" not in r.stderr


def test_real_volume_trains_and_samples_with_its_geometry(tmp_path):
    """nibabel's anatomical.nii (2 mm, LAS, 33x41x25): trained on a 16^3 grid of 4 mm voxels, the
    sampled volume is written with that grid's voxel size and orientation."""
    import shutil
    import nibabel as nib
    vols = tmp_path / "vols"
    vols.mkdir()
    shutil.copy(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii", vols)
    out = tmp_path / "run"
    train.main(small(out, data=str(vols), image_size=16, voxel_size=4.0, patch_size=4, steps=2, batch_size=1,
                     sample_every=2, ckpt_every=2, log_every=1))
    sample_script.main(sample_script.Args(ckpt=str(out), out=str(tmp_path / "s.nii.gz"), n=1))
    img = nib.load(str(tmp_path / "s_000.nii.gz"))
    assert img.shape == (16, 16, 16) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(img.header.get_zooms(), 4.0)


def test_real_photos_train_from_a_folder_with_workers(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photos = load_sample_images()
    for name, arr in zip(photos.filenames, photos.images):
        Image.fromarray(arr).save(tmp_path / Path(name).name)
    out = tmp_path / "run"
    train.main(small(out, data=str(tmp_path), image_size=16, steps=2, batch_size=2, sample_every=2, ckpt_every=2,
                     log_every=1, workers=2, patch_size=4, hflip=True))
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_muon_and_power_emas_resume_exactly_and_sample(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    kw = dict(optimizer="muon", ema_halflives="0.5 1", eval_samples=0)
    train.main(small(straight, **kw))
    train.main(small(split, steps=3, **kw))
    train.main(small(split, resume=True, **kw))
    a = load_file(str(straight / "ckpt_0000006.safetensors"))
    b = load_file(str(split / "ckpt_0000006.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k.split(".")[0] for k in a} == {"params", "ema", "ema_0p5", "ema_1", "opt"}
    assert any(k.endswith("momentum_buffer") for k in a)
    npz = tmp_path / "s.npz"
    sample_script.main(sample_script.Args(ckpt=str(straight), out=str(npz), labels="1", weights="ema_0p5"))
    assert npz.exists()


def test_pmf_with_both_perceptual_terms_trains_and_needs_its_weight_files(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_perceptual import random_weights
    lpips_file, cnx_file = random_weights(tmp_path)
    perc = dict(variant="pmf", lpips_lambda=0.4, convnext_lambda=0.1, perceptual_max_t=0.8, perceptual_size=32)
    out = tmp_path / "run"
    train.main(small(out, steps=2, batch_size=4, eval_samples=0, lpips_weights=lpips_file, convnext_weights=cnx_file,
                     **perc))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["loss_lpips"] > 0 and record["loss_convnext"] > 0
    with pytest.raises(SystemExit):
        train.main(small(tmp_path / "x", steps=1, lpips_weights=lpips_file, **perc))
    assert "--convnext-lambda 0.1 needs the network's weights: pass --convnext-weights PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(small(tmp_path / "y", steps=1, lpips_weights=tmp_path / "none.pth", convnext_weights=cnx_file, **perc))
    assert "--lpips-weights" in capsys.readouterr().err


def test_default_workers_are_at_most_a_ranks_share_of_the_cores(monkeypatch):
    import os

    from fastmf.data.loader import default_workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    for local_ranks, workers in (("1", 8), ("4", 4), ("32", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
        assert default_workers() == workers


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, capsys, monkeypatch):
    """A full disk at the second save: one line, the first checkpoint kept, no temporary file left."""
    from safetensors import SafetensorError

    import fastmf.ckpt
    out = tmp_path / "full"
    real, saves = fastmf.ckpt.save_file, []

    def fills_the_disk(tensors, path, metadata):
        saves.append(path)
        if len(saves) == 2:  # what safetensors raises on a full disk (a 9 MB tmpfs, safetensors 0.8), half written
            Path(path).write_bytes(b"\0" * 1000)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path, metadata=metadata)
    monkeypatch.setattr(fastmf.ckpt, "save_file", fills_the_disk)
    with pytest.raises(SystemExit):
        train.main(small(out))
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write the checkpoint of step 6 to {out} (No space left on device); the previous checkpoints "
        "are kept: free space and continue with --resume")
    assert sorted(p.name for p in out.glob("*ckpt*")) == ["ckpt_0000003.safetensors"]


def test_a_full_disk_at_the_sample_grid_stops_the_run_in_one_line_and_leaves_no_partial_file(tmp_path, capsys,
                                                                                              monkeypatch):
    import errno

    from PIL import Image
    out = tmp_path / "full"
    real = Image.Image.save

    def fills_the_disk(image, path, *args, **kwargs):
        if Path(path).name.startswith(".samples_0000006"):  # the second grid (step 6), half written
            Path(path).write_bytes(b"\x89PNG")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(image, path, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", fills_the_disk)
    with pytest.raises(SystemExit):
        train.main(small(out))
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write {out / 'samples_0000006.png'} (No space left on device); the checkpoints written so far "
        "are kept: free space and continue with --resume")
    assert sorted(p.name for p in out.iterdir() if "samples" in p.name) == ["samples_0000003.png"]


def test_an_unreadable_volume_names_the_flag_that_skips_it(tmp_path):
    (tmp_path / "vols").mkdir()
    (tmp_path / "vols" / "a.nii.gz").write_bytes(b"garbage")
    r = run_cli("train.py", "--data", str(tmp_path / "vols"), "--image-size", "8", "--out", str(tmp_path / "x"))
    line = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in line, r.stderr
    assert line.startswith(f"error: cannot read NIfTI volume {tmp_path / 'vols' / 'a.nii.gz'}: ") and \
        line.endswith(" (--skip-bad-files skips such files)"), line


def test_data_far_from_unit_scale_gets_a_warning(tmp_path, capsys):
    """Arrays are taken as stored: pixels saved as floats in [0, 255] would train silently badly."""
    np.savez(tmp_path / "pixels.npz", x=np.full((4, 1, 8, 8), 200.0, np.float32))
    train.main(small(tmp_path / "a", data=str(tmp_path / "pixels.npz"), steps=1, batch_size=2, eval_samples=0))
    assert "warning: the data's root mean square is 200; the noise schedules expect data of about unit" in capsys.readouterr().err
    train.main(small(tmp_path / "b", steps=1, eval_samples=0))  # the digits, in [-1, 1]
    assert "root mean square" not in capsys.readouterr().err
