"""Pretrained networks from local files: fastmf never downloads weights, and never unpickles code.

    net = load_weights(LPIPS(), "lpips_vgg.pth", "--lpips-weights", ignore=("scaling_layer.",))

.safetensors files are read as they are; .pth files with torch.load(weights_only=True), which
refuses anything but tensors and plain containers.
"""
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from fastmf.cli import first_line


def read_state(path: Path) -> dict:
    """A .safetensors file, or a .pth read weights-only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_weights(net: nn.Module, path: str | Path, flag: str, ignore: tuple[str, ...] = (),
                 read: Callable[[Path], dict] = read_state) -> nn.Module:
    """Load a local weights file into net, frozen and in eval mode; a missing, unreadable or
    mismatched file is a one-line ValueError naming it and the flag. `read` turns the file into a
    state dict with net's names (e.g. unwrapping a checkpoint or renaming another library's keys);
    keys starting with `ignore` are dropped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file (see the README for where to get it)")
    try:
        state = read(path)
    except Exception as e:  # safetensors, zipfile and the weights-only unpickler raise their own types
        raise ValueError(f"{flag} {path}: unreadable ({first_line(e)[:200]})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{flag} {path}: not a state dict of tensors")
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    own = net.state_dict()
    missing, unknown = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unknown or bad:
        raise ValueError(f"{flag} {path} does not fit {type(net).__name__}: missing {missing[:3]}, unknown "
                         f"{unknown[:3]}, other shapes {bad[:3]}")
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)
