"""Custom-op names that change whenever the code behind the op does.

torch.compile's on-disk caches (inductor's FX-graph cache, AOTAutograd's) key a graph on the names
of the custom ops it calls, not on their implementations. After an upgrade that changes an op's
fake kernel (its output strides, say), a warm cache would replay code planned for the old one and
fail inductor's `assert_size_stride` check. A digest of the defining file in the name makes every
version of that file a different op to the caches, so no one has to clear them by hand.
"""
import hashlib
from pathlib import Path

import torch


def versioned_name(name: str, source_file: str) -> str:
    """'fastmf::<name>_<first 8 hex digits of sha256(source_file)>'."""
    digest = hashlib.sha256(Path(source_file).read_bytes()).hexdigest()[:8]
    return f"fastmf::{name}_{digest}"


def packet(qualified_name: str) -> torch._ops.OpOverloadPacket:
    """torch.ops.fastmf.<name> for a 'fastmf::<name>' already defined (what flop_counter registers)."""
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name)
