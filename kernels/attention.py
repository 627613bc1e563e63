"""Softmax attention with a hand-written forward-mode (JVP) rule and backward.

`attention(q, k, v)` is exact under `torch.func.jvp`, `torch.autograd.forward_ad` and ordinary
backward. The "torch" backend below is plain tensor math (the reference and the CPU path);
the "triton" backend (kernels/attention_triton.py) computes the same in flash style.

Math (s = scale, P = softmax(s Q K^T), tangents dQ, dK, dV):
    dS = s (dQ K^T + Q dK^T)
    dP = P * (dS - rowsum(P * dS))
    dO = dP V + P dV
"""
import math
import os

import torch
import torch.autograd.forward_ad as fwAD


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The references compute attention in fp32; fp64 stays fp64 so tests can use it as ground truth.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _probs(q, k, scale):
    return torch.softmax(scale * (q @ k.transpose(-2, -1)), dim=-1)  # (B, H, N, N)


class _TorchAttention(torch.autograd.Function):
    """Math attention in fp32 (fp64 for fp64 inputs) with explicit jvp and backward."""

    @staticmethod
    def forward(q, k, v, scale):
        ct = _compute_dtype(q.dtype)
        p = _probs(q.to(ct), k.to(ct), scale)                         # (B, H, N, N)
        return (p @ v.to(ct)).to(q.dtype)                             # (B, H, N, D)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        ctx.scale = scale
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def jvp(ctx, dq, dk, dv, _dscale):
        q, k, v = ctx.saved_tensors
        ct = _compute_dtype(q.dtype)
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        p = _probs(q, k, ctx.scale)                                    # (B, H, N, N)
        ds = torch.zeros_like(p)
        if dq is not None:
            ds = ds + dq.to(ct) @ k.transpose(-2, -1)
        if dk is not None:
            ds = ds + q @ dk.to(ct).transpose(-2, -1)
        ds = ctx.scale * ds                                            # (B, H, N, N)
        dp = p * (ds - (p * ds).sum(-1, keepdim=True))                 # (B, H, N, N)
        do = dp @ v                                                    # (B, H, N, D)
        if dv is not None:
            do = do + p @ dv.to(ct)
        return do.to(q.dtype if dq is None else dq.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        ct = _compute_dtype(q.dtype)
        qc, kc, vc, doc = q.to(ct), k.to(ct), v.to(ct), do.to(ct)
        p = _probs(qc, kc, ctx.scale)                                  # (B, H, N, N)
        dv = p.transpose(-2, -1) @ doc                                 # (B, H, N, D)
        dp = doc @ vc.transpose(-2, -1)                                # (B, H, N, N)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * ctx.scale     # (B, H, N, N)
        dq = ds @ kc                                                   # (B, H, N, D)
        dk = ds.transpose(-2, -1) @ qc                                 # (B, H, N, D)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _pick_backend(q: torch.Tensor, backend: str, needs_tangent: bool) -> str:
    if backend not in ("auto", "torch", "triton", "sdpa"):
        raise ValueError(f"attention backend must be 'auto', 'torch', 'triton' or 'sdpa', got {backend!r}")
    if backend != "auto":
        return backend
    # Without forward-mode tangents PyTorch's fused SDPA is the fastest primal and compiles as
    # plain ops (the Functions below with a custom jvp are graph breaks for dynamo).
    if not needs_tangent:
        return "sdpa"
    return "triton" if q.is_cuda and _triton_available() else "torch"


def _has_tangent(*xs: torch.Tensor) -> bool:
    """Whether forward-mode AD (torch.func.jvp or forward_ad) carries a tangent on any input."""
    if torch.compiler.is_compiling():  # compiled code runs no dual tensors through here (see docstring)
        return False
    return any(fwAD.unpack_dual(x).tangent is not None for x in xs)


def _triton_available() -> bool:
    try:
        import kernels.attention_triton  # noqa: F401
    except ImportError:
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Softmax attention O = softmax(scale Q K^T) V with an exact forward-mode rule.

    Args:
        q, k, v: (B, H, N, D) queries, keys, values (any strides).
        scale: softmax scale, default 1 / sqrt(D).
        backend: "torch" (math reference, any device), "triton" (flash kernels; CUDA, or CPU under
            TRITON_INTERPRET=1), "sdpa" (PyTorch's fused attention: forward and backward only, no
            forward-mode rule) or "auto": sdpa when no forward-mode tangent is present, else
            triton on CUDA and torch on CPU. Inside torch.compile "auto" assumes no tangents:
            compiling a torch.func.jvp through attention needs backend "triton" or "torch".
    Returns:
        o: (B, H, N, D) in q's dtype.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention expects q, k, v of equal shape (B, H, N, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = _pick_backend(q, backend, needs_tangent=backend == "auto" and _has_tangent(q, k, v))
    if backend == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "triton":
        from kernels.attention_triton import triton_attention
        return triton_attention(q, k, v, scale)
    return _TorchAttention.apply(q, k, v, scale)


def attention_with_tangent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: torch.Tensor,
                           dk: torch.Tensor, dv: torch.Tensor, *, scale: float | None = None,
                           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """O and its tangent dO for explicit tangents (dq, dk, dv): the attention of hand-written JVPs.

    O is differentiable by ordinary backward when grad mode is on; dO never is (stop-grad), so a
    with-grad pass can carry tangents without recording them.

    Args:
        q, k, v, dq, dk, dv: (B, H, N, D).
        backend: "torch" (math) or "triton" (one fused flash pass, flash backward); "auto" picks
            triton on CUDA; "sdpa" (a model whose primal passes use SDPA) picks triton where it
            can launch (CUDA, or CPU under TRITON_INTERPRET=1), else torch.
    Returns:
        (o, do): (B, H, N, D) each, in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "sdpa":  # SDPA has no tangent rule: its counterpart is the fused Triton pass
        launchable = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
        backend = "triton" if launchable and _triton_available() else "torch"
    backend = _pick_backend(q, backend, needs_tangent=True)
    if backend == "triton":
        from kernels.attention_triton import triton_attention_with_tangent
        return triton_attention_with_tangent(q, k, v, dq, dk, dv, scale)
    # Plain ops (not the Function above, whose custom jvp dynamo cannot trace), so this compiles.
    ct = _compute_dtype(q.dtype)
    p = _probs(q.to(ct), k.to(ct), scale)                                             # (B, H, N, N)
    o = (p @ v.to(ct)).to(q.dtype)                                                    # (B, H, N, D)
    with torch.no_grad():
        p, vc = p.detach(), v.detach().to(ct)
        ds = scale * (dq.to(ct) @ k.detach().to(ct).transpose(-2, -1)
                      + q.detach().to(ct) @ dk.to(ct).transpose(-2, -1))               # (B, H, N, N)
        dp = p * (ds - (p * ds).sum(-1, keepdim=True))                                # (B, H, N, N)
        return o, (dp @ vc + p @ dv.to(ct)).to(q.dtype)
