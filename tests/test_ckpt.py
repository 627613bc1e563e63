"""fastmf.ckpt: exact roundtrip, bit-exact Adam resume, atomic writes, clear errors."""
import os

import pytest
import torch

import fastmf.ckpt as ckpt
from fastmf.ckpt import (checkpoint_path, flatten_state, load_checkpoint, load_optimizer_state,
                         newest_good_checkpoint, optimizer_state_to_tensors, prune_checkpoints, save_checkpoint,
                         unflatten_state)


def test_roundtrip_is_exact(tmp_path):
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(6, 4, generator=g)
    tensors = flatten_state({
        "params": {"blocks.0.w": torch.randn(3, 5, generator=g).to(torch.bfloat16),
                   "q": qkv[:2], "k": qkv[2:4]},  # views of one storage, as after a qkv split
        "misc": {"step": torch.tensor(7), "flag": torch.tensor([True, False]),
                 "t": torch.randn(4, 3, generator=g).t()},  # non-contiguous
    })
    meta = {"step": 7, "config": {"lr": 1e-3, "betas": [0.9, 0.99], "name": "mit-tiny"}}
    path = tmp_path / "sub" / "ckpt.safetensors"
    save_checkpoint(path, tensors, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta and loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k
    groups = unflatten_state(loaded)
    assert sorted(groups) == ["misc", "params"] and "blocks.0.w" in groups["params"]


def _adam(params, lr):
    return torch.optim.Adam(list(params.values()), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)


def _step(params, opt, gen):
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


def test_adam_resume_is_bit_exact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    params = {"blocks.0.w": torch.randn(4, 3, generator=gen).requires_grad_(),
              "head.b": torch.randn(3, generator=gen).requires_grad_()}
    opt = _adam(params, lr=1e-2)
    for _ in range(3):
        _step(params, opt, gen)
    opt_t, opt_meta = optimizer_state_to_tensors(opt, names=list(params))
    assert "blocks.0.w.exp_avg_sq" in opt_t and "head.b.step" in opt_t
    save_checkpoint(tmp_path / "c.safetensors",
                    flatten_state({"params": params, "opt": opt_t}), {"opt": opt_meta})
    gen_state = gen.get_state()
    _step(params, opt, gen)  # the unsaved run continues

    tensors, meta = load_checkpoint(tmp_path / "c.safetensors")
    groups = unflatten_state(tensors)
    params2 = {k: v.clone().requires_grad_() for k, v in groups["params"].items()}
    params2 = {k: params2[k] for k in params}  # the optimizer's parameter order
    opt2 = _adam(params2, lr=0.5)  # a wrong lr: the checkpoint must restore the real one
    load_optimizer_state(opt2, groups["opt"], meta["opt"], names=list(params2))
    gen2 = torch.Generator()
    gen2.set_state(gen_state)
    _step(params2, opt2, gen2)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.9, 0.95)
    for k in params:
        assert torch.equal(params2[k], params[k]), k

    with pytest.raises(ValueError, match="#0 is 'w' now, 'blocks.0.w' saved"):
        load_optimizer_state(_adam(params2, 0.1), groups["opt"], meta["opt"], names=["w", "b"])


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(64)}, {"step": 1})

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00 half a header")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(64)}, {"step": 2})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_checkpoint(path, {"w": torch.zeros(64)}, {"step": object()})
    tensors, meta = load_checkpoint(path)
    assert meta == {"step": 1} and torch.equal(tensors["w"], torch.ones(64))
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temporary file left behind


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file at .*none.safetensors"):
        load_checkpoint(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint .*bad.safetensors is corrupt"):
        load_checkpoint(bad)
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, {"w": torch.randn(1000)}, {"step": 1})
    bad.write_bytes(good.read_bytes()[:-100])  # truncated in the tensor data
    with pytest.raises(ValueError, match="checkpoint .*bad.safetensors is corrupt"):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_checkpoint(tmp_path / "c.pt", {}, {})


def flip_bytes(path, where: int, n: int = 4):
    data = bytearray(path.read_bytes())
    data[where:where + n] = bytes(255 - b for b in data[where:where + n])
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_refused_and_the_newest_good_checkpoint_is_found(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(checkpoint_path(tmp_path, step), {"w": torch.full((256,), float(step))}, {"step": step})
    flip_bytes(checkpoint_path(tmp_path, 3), -64)  # inside the tensor data: still a valid file
    with pytest.raises(ValueError, match="is corrupt: 1 tensor\\(s\\) fail their checksum \\(w"):
        load_checkpoint(checkpoint_path(tmp_path, 3))
    path, tensors, meta, skipped = newest_good_checkpoint(tmp_path)
    assert path == checkpoint_path(tmp_path, 2) and meta == {"step": 2} and (tensors["w"] == 2).all()
    assert len(skipped) == 1 and "ckpt_0000003" in skipped[0]
    (tmp_path / ".ckpt_0000004.safetensors.tmp99").write_bytes(b"half a save")  # a killed save's leftover
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000002.safetensors", "ckpt_0000003.safetensors"]
    flip_bytes(checkpoint_path(tmp_path, 2), -64)
    with pytest.raises(ValueError, match="none of the 2 checkpoints"):
        newest_good_checkpoint(tmp_path)


def test_a_changed_meta_is_refused_and_old_checkpoints_still_load(tmp_path):
    """The step, config and model record are checked too: a flipped digit that leaves valid JSON
    would otherwise resume at the wrong step."""
    from safetensors.torch import save_file
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(path, {"w": torch.ones(4)}, {"state": {"step": 12345}})
    data = path.read_bytes()
    path.write_bytes(data.replace(b"12345", b"12385", 1))
    for read in (load_checkpoint, ckpt.read_meta):
        with pytest.raises(ValueError, match="is corrupt: its meta .* fails its checksum"):
            read(path)
    # A checkpoint written before the meta had a checksum: its tensors are checked, its meta read.
    save_file({"w": torch.ones(4)}, str(path), metadata={"fastmf_meta": '{"step": 7}',
                                                         "fastmf_crc32": f'{{"w": {ckpt.crc32(torch.ones(4))}}}'})
    assert load_checkpoint(path)[1] == {"step": 7} == ckpt.read_meta(path)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(path, {"fastmf_meta": torch.ones(1)}, {})


def test_run_state_refuses_non_finite_weights_at_load():
    from fastmf.run_state import RunState
    p = {"w": torch.zeros(3, requires_grad=True)}
    state = RunState(p, torch.optim.Adam(p.values()))
    tensors, meta = state.state_dict()
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["ema.w"][1] = float("nan")
    with pytest.raises(ValueError, match="checkpoint ema hold non-finite values"):
        state.load_state_dict(tensors, meta)


def test_a_damaged_sharded_checkpoint_is_named_once_and_the_next_one_tried(tmp_path, capsys):
    from fastmf.inference import load_model
    metas = {3: "[1]", 2: "{not json", 1: '{"model": {}}'}  # not a record, bad JSON, no run state
    for step, text in metas.items():
        (tmp_path / f"ckpt_{step:07d}.dcp").mkdir()
        (tmp_path / f"ckpt_{step:07d}.dcp" / "meta.json").write_text(text)
    with pytest.raises(SystemExit):
        load_model(str(tmp_path), "ema", "cpu")
    lines = capsys.readouterr().err.splitlines()
    paths = [tmp_path / f"ckpt_{step:07d}.dcp" for step in metas]
    assert lines == [f"warning: skipped a damaged checkpoint: checkpoint {paths[0]} cannot be read: its meta.json "
                     "holds no record",
                     f"warning: skipped a damaged checkpoint: checkpoint {paths[1]} cannot be read: its meta.json: "
                     "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
                     f"error: {paths[2]} has no fastmf model record: not a checkpoint written by fastmf's train.py"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo ran > ran.txt",))


def test_sharded_checkpoints_are_checked_and_their_pickled_index_cannot_run_code(tmp_path, monkeypatch):
    """DCP keeps no checksums and its .metadata index is a pickle: load_full checks checksums.json
    first, and reads the index with an unpickler that builds DCP's metadata classes only."""
    import json
    import pickle

    import torch.distributed.checkpoint as dcp
    from fastmf.sharded_ckpt import CHECKSUMS, _load, damaged_files, load_full
    monkeypatch.chdir(tmp_path)
    net = torch.nn.Linear(3, 4)
    path = tmp_path / "ckpt_0000001.dcp"
    dcp.save({"params": dict(net.named_parameters())}, checkpoint_id=str(path), no_dist=True)
    (path / "meta.json").write_text(json.dumps({"state": {"emas": []}}))
    (path / CHECKSUMS).write_text(json.dumps({f.name: ckpt.zlib.crc32(f.read_bytes()) for f in path.iterdir()}))
    groups, _ = load_full(path, dict(net.named_parameters()))
    assert torch.equal(groups["params"]["weight"], net.weight.detach()) and damaged_files(path) == []
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))
    # two ranks share the three files (.metadata, __0_0.distcp, meta.json): rank 1 checks the shard
    assert damaged_files(path) == damaged_files(path, 1, 2) == [shard.name] and damaged_files(path, 0, 2) == []
    with pytest.raises(ValueError, match="is corrupt: 1 file\\(s\\) fail their checksum"):
        load_full(path, dict(net.named_parameters()))
    (path / CHECKSUMS).unlink()  # as a checkpoint written before checksums.json, with a crafted index
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ValueError, match="cannot be read: its index .metadata: posix.system is not part of DCP's metadata"):
        load_full(path, dict(net.named_parameters()))
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode())[:10])  # a truncated index: its reason, on any torch
    with pytest.raises(ValueError, match="cannot be read: its index .metadata: .*(data|input)"):
        load_full(path, dict(net.named_parameters()))
    # Non-tensor entries (an optimizer's lr, betas) are pickled by DCP too: plain values load, code does not.
    other = tmp_path / "other.dcp"
    dcp.save({"lr": 0.5, "betas": (0.9, 0.95), "code": _RunsCode()}, checkpoint_id=str(other), no_dist=True)
    plain = {"lr": 0.0, "betas": (0.0, 0.0)}
    _load(plain, other, no_dist=True)
    assert plain == {"lr": 0.5, "betas": (0.9, 0.95)}
    with pytest.raises(ValueError, match="cannot be read: entry 'code' holds more than plain data"):
        _load({"code": None}, other, no_dist=True)
    assert not (tmp_path / "ran.txt").exists()
