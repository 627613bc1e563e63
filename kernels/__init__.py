"""fastmf kernels: attention with an exact forward-mode (JVP) rule, fused losses.

This package knows nothing of fastmf; fastmf imports it.
"""
from kernels.attention import attention

__all__ = ["attention"]
