"""fastmf kernels: attention with an exact forward-mode (JVP) rule, fused losses, a lookup whose
gradient is deterministic when compiled.

This package knows nothing of fastmf; fastmf imports it.
"""
from kernels.attention import attention, attention_with_tangent
from kernels.lookup import embedding
from kernels.loss import adaptive_sq_loss

__all__ = ["adaptive_sq_loss", "attention", "attention_with_tangent", "embedding"]
