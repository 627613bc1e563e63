"""fastmf.convert: official torch-branch state dicts (the golden tensors written as a .pth) convert
to checkpoints whose outputs equal the official code's; pickles with code are refused."""
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"


def official_pth(variant: str, path: Path) -> dict:
    g = load_file(str(GOLDEN / f"{variant}_torch_tiny.safetensors"))
    state = {k.removeprefix("param."): v for k, v in g.items() if k.startswith("param.")}
    state |= {k.removeprefix("buf."): v for k, v in g.items() if k.startswith("buf.")}
    torch.save({"model": state}, str(path))  # nested, as training scripts often save
    return g


def run(*args, ok=True):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("variant", ["imf", "pmf"])
def test_converted_official_weights_give_the_official_outputs(tmp_path, variant):
    from fastmf.convert import convert
    g = official_pth(variant, tmp_path / "official.pth")
    model = convert(variant, tmp_path / "official.pth", image_size=8 if variant == "imf" else None)
    inputs = [g[f"in.{k}"] for k in ("x", "t", "h", "omega", "t_min", "t_max")] + [g["in.y"]]
    with torch.no_grad():
        u, v = model(*inputs)
    torch.testing.assert_close(u, g["out.u"], atol=2e-5, rtol=0)
    torch.testing.assert_close(v, g["out.v"], atol=2e-5, rtol=0)

    out = tmp_path / "converted"
    run("-m", "fastmf.convert", variant, str(tmp_path / "official.pth"), str(out),
        *(["--image-size", "8"] if variant == "imf" else []))
    from fastmf.ckpt import newest_good_checkpoint
    meta = newest_good_checkpoint(out)[2]
    assert ("latent_norm" in meta) == (variant == "imf")  # iMF's latent constants travel for --vae decoding
    npz = tmp_path / "s.npz"
    run("sample.py", "--ckpt", str(out), "--out", str(npz), "--labels", "1,3")  # sample.py takes it as it is
    assert npz.exists()


def test_a_pickle_with_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"net.x": Exploit()}))
    r = run("-m", "fastmf.convert", "imf", str(tmp_path / "evil.pth"), str(tmp_path / "o"), ok=False)
    assert "refused" in r.stderr and "not a plain tensor checkpoint" in r.stderr and not marker.exists()
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_damaged_or_foreign_file_is_one_line(tmp_path, capsys):
    from fastmf.convert import read_state
    torch.save({"model": {"w": torch.zeros(100)}}, str(tmp_path / "ok.pth"))
    whole = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])  # an interrupted download
    (tmp_path / "text.pth").write_text("junk\n")  # the weights-only unpickler fails with a KeyError here
    for name in ("cut.pth", "text.pth"):
        with pytest.raises(SystemExit):
            read_state(tmp_path / name)
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot read {tmp_path / name}: not a torch checkpoint, or a damaged one (")
        assert len(err.strip().splitlines()) == 1


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import fastmf.ckpt
    from fastmf.convert import main
    official_pth("pmf", tmp_path / "official.pth")

    def full_disk(tensors, path, metadata):
        Path(path).write_bytes(b"\0" * 100)  # half written
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(fastmf.ckpt, "save_file", full_disk)
    with pytest.raises(SystemExit):
        main(["pmf", str(tmp_path / "official.pth"), str(tmp_path / "out")])
    assert capsys.readouterr().err == f"error: cannot write {tmp_path / 'out' / 'ckpt_0000000.safetensors'} (No space left on device)\n"
    assert not list((tmp_path / "out").iterdir())


def test_missing_and_unknown_keys_are_listed(tmp_path):
    g = load_file(str(GOLDEN / "imf_torch_tiny.safetensors"))
    state = {k.removeprefix("param."): v for k, v in g.items() if k.startswith("param.")}
    state.pop("net.u_final_layer.norm.weight")
    state["net.extra.weight"] = torch.zeros(3)
    torch.save(state, str(tmp_path / "bad.pth"))
    r = run("-m", "fastmf.convert", "imf", str(tmp_path / "bad.pth"), str(tmp_path / "o"), "--image-size", "8", ok=False)
    assert "missing ['u_final_layer.norm.weight'], unknown ['extra.weight']" in r.stderr
    state.pop("net.time_tokens")
    torch.save(state, str(tmp_path / "bad.pth"))
    r = run("-m", "fastmf.convert", "imf", str(tmp_path / "bad.pth"), str(tmp_path / "o"), "--image-size", "8", ok=False)
    assert "lacks 'net.time_tokens'" in r.stderr and "Traceback" not in r.stderr


def test_train_init_from_a_converted_checkpoint_fine_tunes_it(tmp_path):
    import numpy as np
    official_pth("imf", tmp_path / "official.pth")
    run("-m", "fastmf.convert", "imf", str(tmp_path / "official.pth"), str(tmp_path / "conv"), "--image-size", "8")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "lat.npz", x=rng.normal(size=(16, 4, 8, 8)).astype(np.float32), y=np.arange(16) % 10)
    out = tmp_path / "ft"
    run("train.py", "--init-from", str(tmp_path / "conv"), "--data", str(tmp_path / "lat.npz"), "--steps", "2",
        "--batch-size", "8", "--no-compile", "--eval-samples", "0", "--out", str(out))
    tuned = load_file(str(out / "ckpt_0000002.safetensors"))
    start = load_file(str(tmp_path / "conv" / "ckpt_0000000.safetensors"))
    w = "params.shared_blocks.0.attn.q_proj.weight"
    assert tuned[w].shape == start[w].shape == (64, 64) and not torch.equal(tuned[w], start[w])
    assert (tuned[w] - start[w]).abs().max() < 0.1  # a fine-tuning step, not a fresh model
    # Resuming needs only the run's own checkpoints (their record builds the model): the init file may go.
    (tmp_path / "conv" / "ckpt_0000000.safetensors").rename(tmp_path / "moved.safetensors")
    run("train.py", "--init-from", str(tmp_path / "conv"), "--data", str(tmp_path / "lat.npz"), "--steps", "3",
        "--batch-size", "8", "--no-compile", "--eval-samples", "0", "--out", str(out), "--resume")
    assert (out / "ckpt_0000003.safetensors").exists()
    (tmp_path / "moved.safetensors").rename(tmp_path / "conv" / "ckpt_0000000.safetensors")
    r = run("train.py", "--init-from", str(tmp_path / "conv"), "--out", str(tmp_path / "x"), "--no-compile", ok=False)
    assert "its model takes (4, 8, 8) with 10 classes, the data is (1, 8, 8) with 10" in r.stderr
