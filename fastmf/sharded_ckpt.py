"""Sharded checkpoints of FSDP2 runs through torch.distributed.checkpoint (DCP).

A checkpoint is a folder OUT/ckpt_STEP.dcp: DCP's files (every rank writes its shards of params,
EMA and optimizer state), meta.json (rank 0: the step, config, model record, world size) and
checksums.json (rank 0: a CRC32 of every other file, checked before a load: DCP keeps none).
It is written under a temporary name and renamed when complete, so a killed save leaves no
half checkpoint. DCP reshards at load: a run may resume on another world size. DCP pickles its
index (.metadata) and non-tensor entries: they are read by unpicklers that build DCP's metadata
classes and plain values only.

    save_sharded(OUT, state, model, meta)          # every rank
    damaged_files(path, rank, world)               # every rank its share, before a load
    load_sharded(path, state, model)               # every rank, into the sharded state
    groups, meta = load_full(path)                 # one process: full tensors, e.g. for sampling
    meta = read_sharded_meta(path)                 # its meta.json
"""
import json
import os
import pickle
import re
import shutil
import zlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from fastmf.ckpt import fsync_folder
from fastmf.cli import last_line
from fastmf.run_state import RunState

DCP_PATTERN = re.compile(r"ckpt_(\d+)\.dcp")
CHECKSUMS = "checksums.json"


class _MetadataUnpickler(pickle.Unpickler):
    """Builds what DCP's .metadata holds (its metadata dataclasses, sizes, dtypes, paths) and
    refuses every other global, so a crafted checkpoint cannot run code."""
    ALLOWED = {("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
        ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


class _Reader(dcp.FileSystemReader):
    """Reads the index (.metadata) once, when made: DCP before torch 2.13 swallows read_metadata's
    errors ("metadata is None"), so a refused or damaged index is reported here, with its reason."""
    def __init__(self, path: Path):
        super().__init__(path)
        with open(Path(path) / ".metadata", "rb") as f:
            self._index = _MetadataUnpickler(f).load()
        if getattr(self._index, "storage_meta", None) is None:  # as FileSystemReader does
            self._index.storage_meta = dcp.metadata.StorageMeta()

    def read_metadata(self, *args, **kwargs):
        self._index.storage_meta.load_id = self.load_id
        return self._index


def _file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_synced(path: Path, text: str):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class _Planner(dcp.DefaultLoadPlanner):
    def load_bytes(self, read_item, value):
        # Non-tensor entries (the optimizer's lr, betas, ...) are torch.save'd values, which DCP reads
        # with weights_only=False: read them weights-only first, which refuses anything but plain data.
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"entry {read_item.dest_index.fqn!r} holds more than plain data") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def _load(state: dict, path: Path, **kwargs):
    """dcp.load from `path`, reading no code; a bad index, or DCP's CheckpointException (a
    BaseException), becomes a one-line ValueError."""
    try:
        reader = _Reader(path)
    except Exception as e:  # an untrusted pickle fails in many ways: each is a damaged checkpoint
        raise ValueError(f"checkpoint {path} cannot be read: its index .metadata: {last_line(e)}") from None
    try:
        dcp.load(state, storage_reader=reader, planner=_Planner(), **kwargs)
    except dcp.api.CheckpointException as e:
        raise ValueError(f"checkpoint {path} cannot be read: {last_line(e)}") from None


def damaged_files(path: Path, rank: int = 0, world: int = 1) -> list[str]:
    """This rank's share (every world-th file) of the checkpoint's files that are missing or fail
    their CRC32; [] for checkpoints written before checksums.json (2026-12-07)."""
    try:
        crcs = json.loads((path / CHECKSUMS).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        return [CHECKSUMS]
    names = sorted(crcs)[rank::world]
    return [n for n in names if not (path / n).is_file() or _file_crc32(path / n) != crcs[n]]


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
    if is_main:  # this save's folder, and any a failed or killed save left
        for stale in Path(folder).glob(".ckpt_*.dcp.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    dcp.save({"params": state.params, **state.emas, "opt": get_optimizer_state_dict(model, state.opt)},
             checkpoint_id=str(tmp))
    if is_main:
        _write_synced(tmp / "meta.json", json.dumps(meta | {"state": {"step": state.step, "emas": list(state.emas)}}))
        _write_synced(tmp / CHECKSUMS, json.dumps({f.name: _file_crc32(f) for f in sorted(tmp.iterdir())}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_folder(final.parent)
        for old in list_sharded(folder)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def read_sharded_meta(path: Path) -> dict:
    """A sharded checkpoint's meta.json; ValueError naming the checkpoint if it cannot be read."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise ValueError(f"checkpoint {path} cannot be read: its meta.json: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint {path} cannot be read: its meta.json holds no record")
    return meta


def load_sharded(path: Path, state: RunState, model: torch.nn.Module) -> dict:
    """Load a sharded checkpoint into the (sharded) run state, in place; returns its meta."""
    meta = read_sharded_meta(path)
    target = {"params": state.params, **state.emas, "opt": get_optimizer_state_dict(model, state.opt)}
    _load(target, path)
    set_optimizer_state_dict(model, state.opt, target["opt"])
    state.step = int(meta["state"]["step"])
    return meta


def load_full(path: Path, template: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict]:
    """params and EMAs of a sharded checkpoint as full tensors in one process (no process group):
    `template` maps parameter names to tensors of the right shapes (a model's state). ValueError
    naming the checkpoint if it is damaged."""
    damaged = damaged_files(path)
    if damaged:
        raise ValueError(f"checkpoint {path} is corrupt: {len(damaged)} file(s) fail their checksum ({damaged[0]}, ...)")
    meta = read_sharded_meta(path)
    names = ["params", *meta["state"].get("emas", ["ema"])]
    groups = {g: {k: torch.empty_like(v) for k, v in template.items()} for g in names}
    _load(groups, path, no_dist=True)
    return groups, meta
