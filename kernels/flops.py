"""FLOP formulas for fastmf's custom attention ops, so torch.utils.flop_counter counts whole steps.

    from kernels.flops import count_flops
    flops = count_flops(lambda: train_step())       # every matmul FLOP the step executes

The fused Triton ops are opaque to FlopCounterMode, and PyTorch registers no formula for the CPU
SDPA kernel: both are registered here. Convention, that of PyTorch's own SDPA formulas: 2 FLOPs per
multiply-add of every matmul executed. Attention of (B, H, N, D) against M keys: forward
Q K^T and P V (4 BHNMD); with the tangent also dQ K^T + Q dK^T, dP V and P dV (12 BHNMD, 3x a
forward); the flash backward recomputes Q K^T, then dO V^T, P^T dO, dS K and dS^T Q (10 BHNMD).
"""
from typing import Callable

import torch
from torch.utils import flop_counter as fc

from kernels import attention_triton
from kernels.op_names import packet


def attention_flops(q_shape, k_shape, matmuls: int) -> int:
    """2 * B * H * N * M * D per (N x D) @ (D x M)-sized matmul."""
    B, H, N, D = q_shape
    return matmuls * 2 * B * H * N * k_shape[2] * D


def _register(op, formula):
    if op not in fc.flop_registry:  # once per process (re-imports must not raise)
        fc.register_flop_formula(op)(formula)


_register(packet(attention_triton.WITH_TANGENT_OP),
          lambda q, k, v, dq, dk, dv, scale, out_shape=None, **_: attention_flops(q, k, 6))
_register(packet(attention_triton.BACKWARD_OP),
          lambda q, k, v, o, lse, grad_o, scale, out_shape=None, **_: attention_flops(q, k, 5))
_register(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
          lambda q, k, v, *args, out_shape=None, **kw: attention_flops(q, k, 2))
_register(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
          lambda grad_out, q, k, v, *args, out_shape=None, **kw: attention_flops(q, k, 5))


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of the ops fn() dispatches (run eagerly under FlopCounterMode)."""
    with fc.FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
