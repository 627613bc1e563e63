"""Atomic, verified safetensors checkpoints (never pickle), and a run folder that keeps the last few.

One checkpoint is one .safetensors file: tensors under grouped names ("params.<name>",
"ema.<name>", "opt.<param>.<key>") and a JSON `meta` dict in the file's metadata, so one
os.replace publishes tensors and meta together. A CRC32 of every tensor's bytes and of the meta is
stored beside them and checked at load: a file with flipped bytes is refused, not loaded as garbage
weights or a wrong step.

    tensors = flatten_state({"params": params, "ema": ema, "opt": opt_t})
    save_checkpoint(path, tensors, {"step": step, "opt": opt_meta, "config": ...})
    groups = unflatten_state(load_checkpoint(path)[0])
    path, tensors, meta, skipped = newest_good_checkpoint(run_folder)
"""
from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastmf.cli import first_line

_META_KEY = "fastmf_meta"
_CRC_KEY = "fastmf_crc32"
CKPT_PATTERN = re.compile(r"ckpt_(\d+)\.safetensors")


def crc32(t: torch.Tensor) -> int:
    """CRC32 of a tensor's bytes (any dtype)."""
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def meta_crc32(meta_json: str) -> int:
    return zlib.crc32(meta_json.encode())


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, with its I/O errors (a full disk: "... (os error 28)") as OSErrors."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        raise (OSError(int(code[1]), os.strerror(int(code[1]))) if code else OSError(first_line(e))) from e


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    """Write `tensors` and JSON-serialisable `meta` to `path` (.safetensors) atomically.

    The file is written to a temporary name in the same folder, flushed to disk, then renamed
    over `path`: a crash at any point leaves either the old checkpoint or the new one. OSError if
    it cannot be written (a full disk), with no temporary file left behind.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    try:
        meta_json = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta is not JSON-serialisable: {e}") from e
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if name == _META_KEY:
            raise ValueError(f"{_META_KEY!r} is reserved for the meta's checksum")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"checkpoint entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory (tied weights, views): copy repeats.
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in storages else t
        storages.add(ptr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        crcs = json.dumps({name: crc32(t) for name, t in out.items()} | {_META_KEY: meta_crc32(meta_json)})
        write_safetensors(out, tmp, metadata={_META_KEY: meta_json, _CRC_KEY: crcs})
        # safetensors creates the file owner-only (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Persist a rename into `folder` (POSIX; Windows cannot open a folder to fsync)."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open(path: Path, read_tensors: bool) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors or {}, meta, the tensors' CRC32s) of a checkpoint, its meta checked against its CRC32."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()} if read_tensors else {}
            header = f.metadata() or {}
        meta_json, crcs = header.get(_META_KEY, "{}"), json.loads(header.get(_CRC_KEY, "{}"))
        meta = json.loads(meta_json)
    except Exception as e:  # safetensors and json raise their own types for damaged files
        raise ValueError(f"checkpoint {path} is corrupt or not a safetensors file: {first_line(e)}") from e
    # Checkpoints written before the meta had a checksum (2026-12-07) carry none; a flipped byte in
    # the key itself is caught below, as a checksum of a tensor that is not there.
    expected = crcs.pop(_META_KEY, None)
    if expected is not None and meta_crc32(meta_json) != expected:
        raise ValueError(f"checkpoint {path} is corrupt: its meta (step, config, model record) fails its checksum")
    return tensors, meta, crcs


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint -> (tensors on CPU, meta), every tensor and the meta checked against their
    stored CRC32s. Files without fastmf meta give meta {} (and are not checked: they carry no checksums)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    tensors, meta, crcs = _open(path, read_tensors=True)
    bad = [k for k, c in crcs.items() if k not in tensors or crc32(tensors[k]) != c]
    if bad:
        raise ValueError(f"checkpoint {path} is corrupt: {len(bad)} tensor(s) fail their checksum ({bad[0]}, ...)")
    return tensors, meta


def read_meta(path: str | Path) -> dict:
    """A checkpoint's meta alone (its header, checked; no tensor is read); ValueError if unreadable."""
    return _open(Path(path), read_tensors=False)[1]


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"ckpt_{step:07d}.safetensors"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The run folder's checkpoints, newest (highest step) first."""
    folder = Path(folder)
    found = [p for p in folder.glob("ckpt_*.safetensors") if CKPT_PATTERN.fullmatch(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(CKPT_PATTERN.fullmatch(p.name).group(1)), reverse=True)


def newest_good_checkpoint(folder: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict, list[str]]:
    """The newest checkpoint of a run folder that loads and verifies: (path, tensors, meta, why
    each newer one was skipped). FileNotFoundError if there is none, ValueError if none is good."""
    paths = list_checkpoints(folder)
    if not paths:
        raise FileNotFoundError(f"no checkpoint (ckpt_STEP.safetensors) in {folder}")
    skipped = []
    for p in paths:
        try:
            return (p, *load_checkpoint(p), skipped)
        except ValueError as e:
            skipped.append(str(e))
    raise ValueError(f"none of the {len(paths)} checkpoints in {folder} is readable: {skipped[0]}")


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and temp files that killed saves left behind."""
    for p in list_checkpoints(folder)[keep:]:
        p.unlink(missing_ok=True)
    for tmp in Path(folder).glob(".ckpt_*.safetensors.tmp*"):
        tmp.unlink(missing_ok=True)


def flatten_state(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{"params": {"w": t}, "ema": {...}} -> {"params.w": t, "ema....": ...}."""
    flat = {}
    for group, tensors in groups.items():
        if not group or "." in group:
            raise ValueError(f"state group names must be non-empty and dot-free, got {group!r}")
        flat.update({f"{group}.{name}": t for name, t in tensors.items()})
    return flat


def unflatten_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of flatten_state: split each name at its first dot."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        group, sep, name = key.partition(".")
        if not sep:
            raise ValueError(f"checkpoint tensor name {key!r} has no 'group.' prefix")
        groups.setdefault(group, {})[name] = t
    return groups


def optimizer_state_to_tensors(opt: torch.optim.Optimizer, names: Sequence[str] | None = None
                               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state -> (tensors "<param>.<key>", JSON meta with param_groups).

    `names` label the parameters in the optimizer's order (e.g. list(params) of a params dict);
    by default they are indices. Non-tensor state values go into the meta.
    """
    sd = opt.state_dict()
    n_params = sum(len(g["params"]) for g in sd["param_groups"])
    names = [str(i) for i in range(n_params)] if names is None else list(names)
    if len(names) != n_params or len(set(names)) != n_params:
        raise ValueError(f"need {n_params} distinct parameter names, got {len(names)} "
                         f"({len(set(names))} distinct)")
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{names[idx]}.{key}"] = value
            else:
                scalars.setdefault(names[idx], {})[key] = value
    for group in sd["param_groups"]:
        for key, value in group.items():
            if isinstance(value, torch.Tensor):
                raise ValueError(f"optimizer param_group entry {key!r} is a tensor; use a float")
    return tensors, {"names": names, "param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                         meta: Mapping[str, Any], names: Sequence[str] | None = None) -> None:
    """Restore state saved by optimizer_state_to_tensors into `opt` (same parameters and order).

    `names` must match those given when saving (default: indices).
    """
    current = opt.state_dict()["param_groups"]
    n_params = sum(len(g["params"]) for g in current)
    names = [str(i) for i in range(n_params)] if names is None else list(names)
    saved_names = list(meta["names"])
    if names != saved_names:
        i = next(i for i, (a, b) in enumerate(zip(names + [None], saved_names + [None])) if a != b)
        raise ValueError(f"optimizer parameters differ from the checkpoint's ({len(names)} now, "
                         f"{len(saved_names)} saved): #{i} is {(names + [None])[i]!r} now, "
                         f"{(saved_names + [None])[i]!r} saved")
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        # Parameter names may contain dots; state keys (exp_avg, step, ...) do not.
        name, _, field = key.rpartition(".")
        if name not in index:
            raise ValueError(f"optimizer tensor {key!r} names no parameter of this optimizer")
        state.setdefault(index[name], {})[field] = t
    for name, fields in meta["scalars"].items():
        state.setdefault(index[name], {}).update(fields)
    groups = []
    for saved, now in zip(meta["param_groups"], current):
        # JSON turned tuples such as Adam's betas into lists; give them back their type.
        groups.append({k: tuple(v) if isinstance(now.get(k), tuple) else v
                       for k, v in saved.items()})
    opt.load_state_dict({"state": state, "param_groups": groups})
