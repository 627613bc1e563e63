"""Sharded checkpoints of FSDP2 runs through torch.distributed.checkpoint (DCP).

A checkpoint is a folder OUT/ckpt_STEP.dcp: DCP's files (every rank writes its shards of params,
EMA and optimizer state) plus meta.json (rank 0: the step, config, model record, world size).
It is written under a temporary name and renamed when complete, so a killed save leaves no
half checkpoint. DCP reshards at load: a run may resume on another world size.

    save_sharded(OUT, state, model, meta)          # every rank
    load_sharded(path, state, model)               # every rank, into the sharded state
    groups, meta = load_full(path)                 # one process: full tensors, e.g. for sampling
"""
import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from fastmf.run_state import RunState

DCP_PATTERN = re.compile(r"ckpt_(\d+)\.dcp")


def sharded_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"ckpt_{step:07d}.dcp"


def list_sharded(folder: str | Path) -> list[Path]:
    """Complete sharded checkpoints of a run folder (those with meta.json), newest first."""
    folder = Path(folder)
    found = [p for p in folder.glob("ckpt_*.dcp") if DCP_PATTERN.fullmatch(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(DCP_PATTERN.fullmatch(p.name).group(1)), reverse=True)


def save_sharded(folder: str | Path, state: RunState, model: torch.nn.Module, meta: dict, is_main: bool,
                 keep: int, barrier):
    """Every rank writes its shards; rank 0 adds meta.json, publishes by rename and prunes to `keep`."""
    final = sharded_path(folder, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    dcp.save({"params": state.params, **state.emas, "opt": get_optimizer_state_dict(model, state.opt)},
             checkpoint_id=str(tmp))
    if is_main:
        (tmp / "meta.json").write_text(json.dumps(meta | {"state": {"step": state.step, "emas": list(state.emas)}}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_sharded(folder)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_sharded(path: Path, state: RunState, model: torch.nn.Module) -> dict:
    """Load a sharded checkpoint into the (sharded) run state, in place; returns its meta."""
    meta = json.loads((path / "meta.json").read_text())
    target = {"params": state.params, **state.emas, "opt": get_optimizer_state_dict(model, state.opt)}
    dcp.load(target, checkpoint_id=str(path))
    set_optimizer_state_dict(model, state.opt, target["opt"])
    state.step = int(meta["state"]["step"])
    return meta


def load_full(path: Path, template: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict]:
    """params and EMAs of a sharded checkpoint as full tensors in one process (no process group):
    `template` maps parameter names to tensors of the right shapes (a model's state)."""
    meta = json.loads((path / "meta.json").read_text())
    names = ["params", *meta["state"].get("emas", ["ema"])]
    groups = {g: {k: torch.empty_like(v) for k, v in template.items()} for g in names}
    dcp.load(groups, checkpoint_id=str(path), no_dist=True)
    return groups, meta
