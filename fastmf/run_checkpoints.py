"""A training run's checkpoints in its --out folder: one interface over both formats.

ckpt_STEP.safetensors written by rank 0 (one process, DDP: verified, the newest `keep` kept), or
sharded ckpt_STEP.dcp folders written by every rank (FSDP2, torch.distributed.checkpoint). A
resumed run must keep the options that shape the trajectory (`training_options`); the run group
(paths, logging, compile, parallelism) may change.
"""
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from fastmf import distributed
from fastmf.ckpt import checkpoint_path, list_checkpoints, newest_good_checkpoint, prune_checkpoints, save_checkpoint
from fastmf.cli import fail, last_line
from fastmf.config import TrainConfig
from fastmf.models import Backbone
from fastmf.run_state import RunState
from fastmf.sharded_ckpt import damaged_files, list_sharded, load_sharded, read_sharded_meta, save_sharded


def training_options(cfg: TrainConfig) -> dict:
    """The options that shape the trajectory: a resumed run must keep them (run options may change)."""
    return {k: v for k, v in asdict(cfg).items() if k != "run"}


def changed_options(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(flag name, saved value, current value) of every option that differs, compared as JSON has them."""
    flat = lambda d: {f: v for g, group in d.items() for f, v in (group.items() if isinstance(group, dict) else [(g, group)])}
    a, b = flat(saved), flat(json.loads(json.dumps(now)))
    return [(k, a.get(k), b[k]) for k in b if a.get(k) != b[k]]


class Checkpoints:
    """The run folder's checkpoints: ckpt_STEP.safetensors written by rank 0 (one process, DDP), or
    sharded ckpt_STEP.dcp folders written by every rank (FSDP); the newest `keep` are kept."""

    def __init__(self, cfg: TrainConfig, dist: distributed.Dist, model: Backbone, data_meta: dict):
        self.cfg, self.dist, self.model, self.out, self.data_meta = cfg, dist, model, Path(cfg.run.out), data_meta
        self.sharded = cfg.run.parallel == "fsdp"

    def exist(self) -> bool:
        return bool(list_sharded(self.out) if self.sharded else list_checkpoints(self.out))

    def save(self, state: RunState):
        meta = {"config": asdict(self.cfg), "model": self.model.record, "world_size": self.dist.world} | self.data_meta
        keep = self.cfg.run.keep_checkpoints
        if self.sharded:  # each rank checks its shards; all refuse together
            local = lambda t: t.to_local() if hasattr(t, "to_local") else t
            weights = [local(t) for group in (state.params, *state.emas.values()) for t in group.values()]
            if self.dist.any(not all(torch.isfinite(t).all() for t in weights)):
                fail(f"non-finite weights at step {state.step}: not saved (the previous checkpoints are kept)")
            try:
                save_sharded(self.out, state, self.model, meta, self.dist.is_main, keep, self.dist.barrier)
            except (OSError, dcp.api.CheckpointException) as e:  # DCP's is a BaseException
                self.cannot_save(state, e)
            return
        distributed.check_same_on_all_ranks(state.params, self.dist)
        if not self.dist.is_main:
            return
        tensors, state_meta = state.state_dict()
        if not all(torch.isfinite(t).all() for k, t in tensors.items() if not k.startswith("opt.")):
            fail(f"non-finite weights at step {state.step}: not saved (the previous checkpoints are kept)")
        try:
            save_checkpoint(checkpoint_path(self.out, state.step), tensors, meta | {"state": state_meta})
        except OSError as e:
            self.cannot_save(state, e)
        prune_checkpoints(self.out, keep)

    def cannot_save(self, state: RunState, e: BaseException):
        """A full disk or a lost mount: one line, and the run stops with its earlier checkpoints intact
        (the failed save's temporary file or folder is removed, now or by the next save)."""
        why = e.strerror if isinstance(e, OSError) and e.strerror else last_line(e)
        fail(f"cannot write the checkpoint of step {state.step} to {self.out} ({why}); the previous checkpoints "
             "are kept: free space and continue with --resume")

    def newest_good_sharded(self) -> Path:
        """The newest sharded checkpoint whose files pass their checksums: each rank checks its share
        of the files, and all take the same decision."""
        paths = list_sharded(self.out)
        for path in paths:
            damaged = damaged_files(path, self.dist.rank, self.dist.world)
            if not self.dist.any(bool(damaged)):
                return path
            if damaged:
                print(f"warning: skipped a damaged checkpoint: {path}: {len(damaged)} file(s) fail their checksum "
                      f"({damaged[0]}, ...)", file=sys.stderr)
        raise ValueError(f"none of the {len(paths)} sharded checkpoints is readable")

    def resume(self, state: RunState):
        """Load the newest good checkpoint into state (every rank reads it)."""
        try:
            if self.sharded:
                path = self.newest_good_sharded()
                meta = read_sharded_meta(path)
            else:
                path, tensors, meta, skipped = newest_good_checkpoint(self.out)
                for why in skipped if self.dist.is_main else []:
                    print(f"warning: skipped a damaged checkpoint: {why}", file=sys.stderr)
            if not {"state", "config", "model"} <= set(meta):
                fail(f"{path} has no fastmf run record: not a checkpoint written by fastmf's train.py")
            changed = changed_options(meta["config"], training_options(self.cfg))
            if changed:
                fail(f"{path} was trained with other options: " + "; ".join(
                    f"--{k.replace('_', '-')} {a!r} there, {b!r} now" for k, a, b in changed[:4]) + ". Resume with the same ones")
            if self.sharded:
                load_sharded(path, state, self.model)
            else:
                state.load_state_dict(tensors, meta["state"])
        except (ValueError, KeyError, FileNotFoundError, IndexError) as e:
            fail(f"cannot resume from {self.out}: {e}")
        if self.dist.is_main:
            world = meta.get("world_size", 1)
            print(f"resumed {path.name} at step {state.step}" + (f" (written by {world} processes, now "
                                                                  f"{self.dist.world})" if world != self.dist.world else ""))
