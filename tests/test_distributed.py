"""torchrun on CPU (gloo): 2 processes follow 1 process on the same global batch, resume across
world sizes, only rank 0 writes; kill -9 and SIGTERM leave resumable checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--no-compile", "--batch-size", "16", "--log-every", "1", "--ckpt-every", "2", "--sample-every", "100",
         "--eval-samples", "0", "--warmup-steps", "2"]
TOL = dict(rtol=1e-5, atol=1e-6)  # reduction order: DDP averages the ranks' gradients


def launch(nproc: int, out: Path, *args: str, wait: bool = True, torchrun: tuple = ()):
    """`python train.py` (nproc 1) or `torchrun --standalone --nproc_per_node=nproc *torchrun train.py`."""
    cmd = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *torchrun, "train.py"]
    cmd += [*FLAGS, "--out", str(out), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics(out: Path) -> list[dict]:
    return [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path, step: int) -> dict:
    return load_file(str(out / f"ckpt_{step:07d}.safetensors"))


def assert_same_weights(a: dict, b: dict, exact=False):
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith(("params.", "ema.")):
            if exact:
                assert torch.equal(a[k], b[k]), k
            else:
                torch.testing.assert_close(a[k], b[k], **TOL, msg=k)


@pytest.mark.parametrize("model,variant", [("mit-tiny", "imf"), ("dit-tiny", "mf")])
def test_two_processes_follow_one_on_the_same_global_batch(tmp_path, model, variant):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--model", model, "--variant", variant, "--steps", "4"]
    launch(1, one, *args)
    launch(2, two, *args)  # every save checks that both ranks hold the same weights
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m2] == [1, 2, 3, 4]  # one writer: rank 0
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-6)
    assert m2[0]["grad_norm"] == pytest.approx(m1[0]["grad_norm"], rel=1e-6)
    assert_same_weights(weights(one, 4), weights(two, 4))
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_resume_on_another_world_size_continues_the_same_trajectory(tmp_path):
    straight, a, b = tmp_path / "straight", tmp_path / "a", tmp_path / "b"
    launch(1, straight, "--steps", "4")
    launch(2, a, "--steps", "2")
    r = launch(1, a, "--steps", "4", "--resume")  # written by 2 processes, resumed by 1
    assert "(written by 2 processes, now 1)" in r.stdout
    launch(1, b, "--steps", "2")
    launch(2, b, "--steps", "4", "--resume")      # and the other way
    assert_same_weights(weights(a, 4), weights(straight, 4))
    assert_same_weights(weights(b, 4), weights(straight, 4))


def wait_for(path: Path, proc, timeout=300):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.05)


END = 30  # steps of the kill and restart tests


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted END-step runs of 1 and 2 processes, made once: nproc -> run folder."""
    runs = {}

    def run(nproc: int) -> Path:
        if nproc not in runs:
            runs[nproc] = tmp_path_factory.mktemp(f"straight{nproc}")
            launch(nproc, runs[nproc], "--steps", str(END))
        return runs[nproc]
    return run


def newest_step(out: Path) -> int:
    return max(int(p.stem.split("_")[1]) for p in out.glob("ckpt_*.safetensors"))


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_9_then_resume_is_bit_identical(tmp_path, nproc, straight):
    killed = tmp_path / "killed"
    proc = launch(nproc, killed, "--steps", "1000", wait=False)
    wait_for(killed / "ckpt_0000002.safetensors", proc)
    # Every process of the job, mid-run (torchrun's workers have process groups of their own).
    subprocess.run(["pkill", "-9", "-f", "--", f"--out {killed}"], check=False)
    proc.wait()
    assert newest_step(killed) < END, f"the killed run reached step {newest_step(killed)} before the kill"
    launch(nproc, killed, "--steps", str(END), "--resume")
    assert_same_weights(weights(killed, END), weights(straight(nproc), END), exact=True)
    assert [r["step"] for r in metrics(killed)] == list(range(1, END + 1))  # rows past the checkpoint: once


def test_torchrun_max_restarts_resumes_by_itself_bit_identically(tmp_path, straight):
    """One worker of a 2-process job killed: torchrun restarts both (TORCHELASTIC_RESTART_COUNT 1),
    which resume the newest checkpoint without --resume and end where an uninterrupted run ends."""
    out = tmp_path / "restarted"
    proc = launch(2, out, "--steps", str(END), wait=False, torchrun=("--max-restarts=1",))
    wait_for(out / "ckpt_0000002.safetensors", proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed ckpt_" in stdout, stdout
    assert_same_weights(weights(out, END), weights(straight(2), END), exact=True)
    assert [r["step"] for r in metrics(out)] == list(range(1, END + 1))


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    out = tmp_path / "term"
    proc = launch(1, out, "--steps", "100000", "--ckpt-every", "100000", wait=False)
    wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    step = metrics(out)[-1]["step"]
    saved = sorted(out.glob("ckpt_*.safetensors"))
    assert "stopped by SIGTERM at step" in err and saved and int(saved[-1].stem.split("_")[1]) >= step
    launch(1, out, "--steps", str(int(saved[-1].stem.split("_")[1]) + 1), "--resume")


def test_a_flipped_byte_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    out = tmp_path / "flip"
    launch(1, out, "--steps", "4")
    newest = out / "ckpt_0000004.safetensors"
    data = bytearray(newest.read_bytes())
    data[-64:-60] = bytes(255 - b for b in data[-64:-60])
    newest.write_bytes(bytes(data))
    r = launch(1, out, "--steps", "4", "--resume")
    assert "skipped a damaged checkpoint" in r.stderr and "fail their checksum" in r.stderr
    assert "resumed ckpt_0000002.safetensors at step 2" in r.stdout


def test_batch_size_must_divide_by_the_world_size(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *FLAGS, "--batch-size", "15", "--out", str(tmp_path / "x")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--batch-size 15 is global and must divide by the world size 2" in r.stderr


def test_fsdp_shards_match_one_process_and_a_sharded_checkpoint_resumes(tmp_path):
    """FSDP2 on 2 processes (the model sharded across them): the same trajectory as 1 process,
    through a save and resume of its DCP checkpoint; sample.py reads that checkpoint whole."""
    from fastmf.models import from_record
    from fastmf.sharded_ckpt import load_full
    one, sharded = tmp_path / "one", tmp_path / "fsdp"
    launch(1, one, "--steps", "6")
    launch(2, sharded, "--parallel", "fsdp", "--steps", "4")
    r = launch(2, sharded, "--parallel", "fsdp", "--steps", "6", "--resume")
    assert "resumed ckpt_0000004.dcp at step 4" in r.stdout
    m1, m2 = metrics(one), metrics(sharded)
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-6)
    assert m2[0]["grad_norm"] == pytest.approx(m1[0]["grad_norm"], rel=1e-6)
    path = sharded / "ckpt_0000006.dcp"
    record = json.loads((path / "meta.json").read_text())["model"]
    groups, _ = load_full(path, from_record(record).state_dict())
    full = {f"{g}.{k}": v for g, tensors in groups.items() for k, v in tensors.items()}
    assert_same_weights(full, {k: v for k, v in weights(one, 6).items() if k.startswith(("params.", "ema."))})
    npz = tmp_path / "s.npz"
    subprocess.run([sys.executable, "sample.py", "--ckpt", str(sharded), "--out", str(npz), "--labels", "1,2"],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert npz.exists()
    # Flipped bytes in a shard of the newest checkpoint (DCP checks nothing itself): checksums.json
    # catches them, and sample.py and a resumed run both fall back to the checkpoint before it.
    assert (path / "checksums.json").is_file()
    shard = max(path.glob("*.distcp"), key=lambda f: f.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[-64:-60] = bytes(255 - b for b in data[-64:-60])
    shard.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", str(sharded), "--out", str(npz)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"skipped a damaged checkpoint: checkpoint {path} is corrupt" in r.stderr, r.stderr
    r = launch(2, sharded, "--parallel", "fsdp", "--steps", "6", "--resume")
    assert "skipped a damaged checkpoint" in r.stderr and "resumed ckpt_0000004.dcp at step 4" in r.stdout



def test_out_data_and_reference_folders_that_differ_between_ranks_are_refused(tmp_path):
    """Node-local --out, --data or --reference on several nodes: some ranks would resume and others
    start afresh, or ranks would index different sample lists. Simulated per rank by
    tests/dist_view_worker.py."""
    def views(mode, *flags):
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "tests/dist_view_worker.py", mode, *flags], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    run = ["--out", str(tmp_path / "run"), "--steps", "2", "--no-compile"]
    for flags in ([], ["--resume"]):
        r = views("out", *run, *flags)
        assert r.returncode != 0 and r.stderr.count(
            f"error: {tmp_path / 'run'}: some processes see checkpoints there and others do not; on several nodes "
            "--out must be a folder every node sees (a shared filesystem)") == 2, r.stderr[-2000:]
    for rank, n in enumerate((10, 9)):  # an interrupted copy on the second node
        np.savez(tmp_path / f"x_{rank}.npz", x=np.zeros((n, 1, 8, 8), np.float32), y=np.arange(n) % 3)
    r = views("train", *run, "--data", str(tmp_path / "x_RANK.npz"), "--batch-size", "2")
    for rank, n in enumerate((10, 9)):
        assert (f"error: the processes see different data in {tmp_path / f'x_{rank}.npz'} (this one: {n} samples of 3 "
                "classes, each (1, 8, 8)); on several nodes --data must hold the same files on each") in r.stderr, \
            r.stderr[-2000:]

    import nibabel as nib
    from fastmf.data import make_phantoms
    from test_train import small, train
    train.main(small(tmp_path / "ph", data="phantom3d", image_size=16, steps=2, batch_size=2, sample_every=100,
                     ckpt_every=2, log_every=1, eval_samples=0))
    for rank, n in enumerate((3, 2)):
        (tmp_path / f"ref_{rank}").mkdir()
        for i, v in enumerate(make_phantoms(n, 16, seed=1)[0]):
            nib.save(nib.Nifti1Image(v[0].numpy(), np.eye(4)), str(tmp_path / f"ref_{rank}" / f"{i}.nii.gz"))
    r = views("evaluate", "--ckpt", str(tmp_path / "ph"), "--reference", str(tmp_path / "ref_RANK"), "--num-samples",
              "4", "--batch-size", "2", "--voxel-size", "1", "--device", "cpu", "--out", str(tmp_path / "fd.json"))
    for rank, n in enumerate((3, 2)):
        assert (f"error: the processes see different reference data in {tmp_path / f'ref_{rank}'} (this one: {n} "
                "samples); on several nodes --reference must hold the same files on each") in r.stderr, r.stderr[-2000:]


def test_the_weight_guard_catches_ranks_that_differ():
    # The worker lives in tests/, so its sys.path[0] is not the repo root: name the root, so that
    # it imports this checkout's fastmf whatever is installed.
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "tests/dist_guard_worker.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 0: caught" in r.stdout and "rank 1: caught" in r.stdout
