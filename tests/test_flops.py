"""kernels/flops.py: the custom attention ops are credited with the matmul FLOPs their math
counterparts dispatch (counted op by op by torch.utils.flop_counter)."""
import torch

from kernels.attention import attention, attention_with_tangent
from kernels.flops import attention_flops, count_flops

B, H, N, D = 2, 3, 40, 16


def inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, N, D, generator=g, requires_grad=i < 3) for i in range(6)]


def test_fused_forward_and_tangent_count_as_the_math_path():
    q, k, v, dq, dk, dv = inputs()
    math = count_flops(lambda: attention_with_tangent(q, k, v, dq, dk, dv, backend="torch"))
    fused = count_flops(lambda: attention_with_tangent(q, k, v, dq, dk, dv, backend="triton"))  # interpreter on CPU
    assert math == fused == attention_flops(q.shape, k.shape, 6) == 3 * attention_flops(q.shape, k.shape, 2)


def test_backwards_and_cpu_sdpa_are_counted():
    q, k, v, dq, dk, dv = inputs()
    forward = attention_flops(q.shape, k.shape, 2)
    assert count_flops(lambda: attention(q, k, v, backend="sdpa")) == forward  # CPU SDPA: registered here
    def fused_step():
        o, _ = attention_with_tangent(q, k, v, dq, dk, dv, backend="triton")
        o.sum().backward()
    def sdpa_step():
        attention(q, k, v, backend="sdpa").sum().backward()
    # flash backward: 5 matmuls (Q K^T recomputed), as PyTorch counts its own SDPA backward
    assert count_flops(fused_step) == 3 * forward + 5 * forward // 2
    assert count_flops(sdpa_step) == forward + 5 * forward // 2
