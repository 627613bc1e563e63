"""fastmf.ckpt: exact roundtrip, bit-exact Adam resume, atomic writes, clear errors."""
import os

import pytest
import torch

import fastmf.ckpt as ckpt
from fastmf.ckpt import (flatten_state, load_checkpoint, load_optimizer_state, load_rng_state,
                         optimizer_state_to_tensors, rng_state_to_tensors, save_checkpoint,
                         unflatten_state)


def test_roundtrip_is_exact(tmp_path):
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(6, 4, generator=g)
    tensors = flatten_state({
        "params": {"blocks.0.w": torch.randn(3, 5, generator=g).to(torch.bfloat16),
                   "q": qkv[:2], "k": qkv[2:4]},  # views of one storage, as after a qkv split
        "misc": {"step": torch.tensor(7), "flag": torch.tensor([True, False]),
                 "t": torch.randn(4, 3, generator=g).t()},  # non-contiguous
        "rng": rng_state_to_tensors({"noise": g}),
    })
    meta = {"step": 7, "config": {"lr": 1e-3, "betas": [0.9, 0.99], "name": "mit-tiny"}}
    path = tmp_path / "sub" / "ckpt.safetensors"
    save_checkpoint(path, tensors, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta and loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k
    groups = unflatten_state(loaded)
    assert sorted(groups) == ["misc", "params", "rng"] and "blocks.0.w" in groups["params"]
    restored = torch.Generator()
    load_rng_state({"noise": restored}, groups["rng"])
    assert torch.equal(torch.rand(3, generator=restored), torch.rand(3, generator=g))


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
                    flatten_state({"params": params, "opt": opt_t,
                                   "rng": rng_state_to_tensors({"data": gen})}),
                    {"opt": opt_meta})
    _step(params, opt, gen)  # the unsaved run continues

    tensors, meta = load_checkpoint(tmp_path / "c.safetensors")
    groups = unflatten_state(tensors)
    params2 = {k: v.clone().requires_grad_() for k, v in groups["params"].items()}
    params2 = {k: params2[k] for k in params}  # the optimizer's parameter order
    opt2 = _adam(params2, lr=0.5)  # a wrong lr: the checkpoint must restore the real one
    load_optimizer_state(opt2, groups["opt"], meta["opt"], names=list(params2))
    gen2 = torch.Generator()
    load_rng_state({"data": gen2}, groups["rng"])
    _step(params2, opt2, gen2)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.9, 0.95)
    for k in params:
        assert torch.equal(params2[k], params[k]), k

    with pytest.raises(ValueError, match="#0 is 'w' now, 'blocks.0.w' saved"):
        load_optimizer_state(_adam(params2, 0.1), groups["opt"], meta["opt"], names=["w", "b"])
    with pytest.raises(ValueError, match=r"no RNG state for generators \['noise'\]"):
        load_rng_state({"noise": gen2}, groups["rng"])


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
