"""MiT presets and the `build` factory."""
from dataclasses import fields

import torch.nn as nn

from fastmf.models.mit import MiT, MiTConfig

# depth counts the trunk plus one head; every preset has 8-block heads except mit-tiny.
PRESETS: dict[str, dict] = {
    # CPU-sized: fewer condition tokens too, since on 8x8 digits the prefix would outnumber the patches.
    "mit-tiny": dict(depth=4, hidden_size=64, num_heads=4, aux_head_depth=2, num_class_tokens=4,
                     num_cfg_tokens=2, num_interval_tokens=1, num_time_tokens=2),
    "mit-b": dict(depth=12, hidden_size=768, num_heads=12, aux_head_depth=8),
    "mit-m": dict(depth=24, hidden_size=768, num_heads=12, aux_head_depth=8),
    "mit-l": dict(depth=32, hidden_size=1024, num_heads=16, aux_head_depth=8),
    "mit-xl": dict(depth=48, hidden_size=1024, num_heads=16, aux_head_depth=8),
}


def build(name: str, **overrides) -> nn.Module:
    """Build a MiT preset; any MiTConfig field can be overridden (input_size, patch_size, variant...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(MiTConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown MiT option(s) {sorted(unknown)}; known: {sorted(known)}")
    return MiT(MiTConfig(**(PRESETS[name] | overrides)))


__all__ = ["MiT", "MiTConfig", "PRESETS", "build"]
