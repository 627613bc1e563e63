"""Fused adaptive-weighted squared loss: the tail shared by the MF, iMF and pMF objectives.

Per sample b of tensors shaped (B, ...) (images (B, C, H, W), volumes (B, C, D, H, W), any trailing
shape), with every non-batch dim summed:
    L_b        = sum (pred + coef_b * tangent - target)^2
    weighted_b = L_b / sg((L_b + eps)^p)
Only `pred` is differentiated; target, tangent, coef and the weight are stop-grad, so
    d weighted_b / d pred = 2 (pred + coef_b * tangent - target) / (L_b + eps)^p.
    iMF/pMF u-term: pred = u, tangent = du_dt, coef = t - r,            target = v_g
    iMF/pMF v-term: pred = v, tangent = None,                           target = v_g
    MF:             pred = u, tangent = du_dt, coef = clip(t - r, 0, 1), target = v_g

Backends: "torch" is the unfused reference (plain autograd ops, any device); "triton" is one
reduction kernel for the forward and one elementwise kernel for the backward, so no (B, ...)
intermediate is written or kept for backward (CUDA, or CPU under TRITON_INTERPRET=1);
"auto" picks triton on CUDA.
"""
import torch

from kernels.op_names import versioned_name

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; the torch backend needs none of it.
    triton = None

# Elements per vector step of both kernels, and the number of forward programs to aim for:
# a few per SM on a large GPU, so small batches of large volumes still fill the machine.
_BLOCK = 1024
_TARGET_PROGRAMS = 512


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation for fp32/fp16/bf16; fp64 stays fp64 so tests can use it as ground truth.
    return torch.float64 if dtype == torch.float64 else torch.float32


####################################################################################################
# Triton kernels
####################################################################################################

if triton is not None:

    @triton.jit
    def _sq_loss_fwd_kernel(pred_ptr, target_ptr, tangent_ptr, coef_ptr, partial_ptr,
                            M, chunk, n_chunks, stride_pred, stride_target, stride_tangent,
                            HAS_TANGENT: tl.constexpr, BLOCK: tl.constexpr):
        """partial[b, c] = sum of (pred + coef_b tangent - target)^2 over chunk c of row b."""
        c = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)  # row offsets b * stride overflow int32 on big batches
        acc_ty = partial_ptr.dtype.element_ty  # the partials' dtype is the accumulation dtype
        if HAS_TANGENT:
            coef = tl.load(coef_ptr + b).to(acc_ty)
        acc = tl.zeros([BLOCK], dtype=acc_ty)
        start = c * chunk
        for off in range(start, start + chunk, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < M
            d = (tl.load(pred_ptr + b * stride_pred + cols, mask=mask, other=0.0).to(acc_ty)
                 - tl.load(target_ptr + b * stride_target + cols, mask=mask, other=0.0).to(acc_ty))
            if HAS_TANGENT:
                d += coef * tl.load(tangent_ptr + b * stride_tangent + cols, mask=mask,
                                    other=0.0).to(acc_ty)
            acc += d * d
        tl.store(partial_ptr + b * n_chunks + c, tl.sum(acc, axis=0))

    @triton.jit
    def _sq_loss_bwd_kernel(pred_ptr, target_ptr, tangent_ptr, coef_ptr, g_ptr, grad_ptr, M,
                            stride_pred, stride_target, stride_tangent,
                            HAS_TANGENT: tl.constexpr, BLOCK: tl.constexpr):
        """grad[b, :] = 2 g_b (pred + coef_b tangent - target); g and grad are contiguous."""
        c = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        acc_ty = g_ptr.dtype.element_ty
        cols = c * BLOCK + tl.arange(0, BLOCK)
        mask = cols < M
        d = (tl.load(pred_ptr + b * stride_pred + cols, mask=mask, other=0.0).to(acc_ty)
             - tl.load(target_ptr + b * stride_target + cols, mask=mask, other=0.0).to(acc_ty))
        if HAS_TANGENT:
            d += tl.load(coef_ptr + b).to(acc_ty) * tl.load(
                tangent_ptr + b * stride_tangent + cols, mask=mask, other=0.0).to(acc_ty)
        scale = 2.0 * tl.load(g_ptr + b)
        tl.store(grad_ptr + b * M + cols, (scale * d).to(grad_ptr.dtype.element_ty), mask=mask)


def _chunk(B: int, M: int) -> int:
    """Elements per forward program: a multiple of _BLOCK, about _TARGET_PROGRAMS programs in all."""
    per_row = triton.cdiv(_TARGET_PROGRAMS, B)
    return max(triton.cdiv(triton.cdiv(M, per_row), _BLOCK), 1) * _BLOCK


####################################################################################################
# Custom ops (Triton): opaque to torch.compile, so a compiled step keeps them in its graph (named
# per version of this file: kernels.op_names)
####################################################################################################

ROWS_OP = versioned_name("sq_error_rows", __file__)
ROWS_BACKWARD_OP = versioned_name("sq_error_rows_backward", __file__)


@torch.library.custom_op(ROWS_OP, mutates_args=())
def _sq_error_rows(pred: torch.Tensor, target: torch.Tensor, tangent: torch.Tensor | None,
                   coef: torch.Tensor | None) -> torch.Tensor:
    """L_b = sum_j (pred + coef_b tangent - target)^2 per row of (B, M) views with unit column stride.

    Partial sums per chunk, then a per-row sum in torch: deterministic (no atomics). `coef` is a
    contiguous (B,) tensor in the accumulation dtype, given exactly when `tangent` is.
    The batch is grid axis 1, so B <= 65535 on CUDA.
    """
    B, M = pred.shape
    chunk = _chunk(B, M)
    n_chunks = triton.cdiv(M, chunk)
    partial = torch.empty(B, n_chunks, device=pred.device, dtype=_acc_dtype(pred.dtype))  # (B, n_chunks)
    has_t = tangent is not None
    t, c = (tangent, coef) if has_t else (pred, pred)  # stand-in pointers, never read
    _sq_loss_fwd_kernel[(n_chunks, B)](
        pred, target, t, c, partial, M, chunk, n_chunks,
        pred.stride(0), target.stride(0), t.stride(0),
        HAS_TANGENT=has_t, BLOCK=_BLOCK)
    return partial.sum(1)                                                         # (B,)


@_sq_error_rows.register_fake
def _(pred, target, tangent, coef):
    return pred.new_empty(pred.shape[0], dtype=_acc_dtype(pred.dtype))


@torch.library.custom_op(ROWS_BACKWARD_OP, mutates_args=())
def _sq_error_rows_backward(pred: torch.Tensor, target: torch.Tensor, tangent: torch.Tensor | None,
                            coef: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
    """d(sum_b g_b L_b)/d pred = 2 g_b (pred + coef_b tangent - target): (B, M), contiguous."""
    B, M = pred.shape
    grad = torch.empty(B, M, device=pred.device, dtype=pred.dtype)                # (B, M)
    has_t = tangent is not None
    t, c = (tangent, coef) if has_t else (pred, pred)
    _sq_loss_bwd_kernel[(triton.cdiv(M, _BLOCK), B)](
        pred, target, t, c, g.contiguous(), grad, M,
        pred.stride(0), target.stride(0), t.stride(0),
        HAS_TANGENT=has_t, BLOCK=_BLOCK)
    return grad


@_sq_error_rows_backward.register_fake
def _(pred, target, tangent, coef, g):
    return pred.new_empty(pred.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, g):
    # Only pred is differentiated: target, tangent and coef are stop-grad by contract.
    pred, target, tangent, coef = ctx.saved_tensors
    return _sq_error_rows_backward(pred, target, tangent, coef, g.to(_acc_dtype(pred.dtype))), None, None, None


_sq_error_rows.register_autograd(_backward, setup_context=_setup_context)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, M) with contiguous rows: a view when the trailing dims allow, else a copy."""
    x = x.reshape(x.shape[0], -1)
    return x if x.stride(1) == 1 else x.contiguous()


####################################################################################################
# Torch reference
####################################################################################################

def _torch_adaptive_sq_loss(pred, target, tangent, coef, eps, p):
    """Unfused reference: plain autograd ops, computed in fp32 (fp64 for fp64 inputs)."""
    acc = _acc_dtype(pred.dtype)
    d = pred.to(acc) - target.detach().to(acc)                                    # (B, ...)
    if tangent is not None:
        c = coef.detach().to(acc).view(-1, *([1] * (pred.dim() - 1)))            # (B, 1, ...)
        d = d + c * tangent.detach().to(acc)
    raw = d.square().flatten(1).sum(1)                                            # (B,)
    return raw / (raw.detach() + eps).pow(p), raw.detach()


####################################################################################################
# Public function
####################################################################################################

def _pick_backend(x: torch.Tensor, backend: str) -> str:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"loss backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton is not None else "torch"
    if backend == "triton" and triton is None:
        raise ValueError("loss backend 'triton' needs the triton package, which is not installed")
    return backend


def adaptive_sq_loss(pred: torch.Tensor, target: torch.Tensor, tangent: torch.Tensor | None = None,
                     coef: torch.Tensor | float | None = None, *, eps: float = 0.01,
                     p: float = 1.0, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample adaptive-weighted squared error, L_b / sg((L_b + eps)^p).

    L_b = sum over non-batch dims of (pred + coef_b * tangent - target)^2. Gradient flows to
    `pred` only: target, tangent, coef and the weight are stop-grad. Callers take weighted.mean().

    Args:
        pred: (B, ...) prediction, e.g. (B, C, H, W) or (B, C, D, H, W); fp32, fp16, bf16 or fp64.
        target: same shape as pred (any float dtype); stop-grad.
        tangent: same shape as pred, or None for the plain error; stop-grad.
        coef: B numbers ((B,) or (B, 1, ...)) or one float scaling tangent; required with a
            tangent, must be None without one; stop-grad.
        eps, p: the weight (L_b + eps)^p; p = 0 gives the plain sum.
        backend: "torch" (unfused reference, any device), "triton" (fused kernels; CUDA, or CPU
            under TRITON_INTERPRET=1) or "auto" (triton on CUDA, else torch).
    Returns:
        weighted: (B,) L_b / sg((L_b + eps)^p), differentiable in pred.
        raw: (B,) L_b, detached (for metrics).
        Both fp32 (fp64 for fp64 pred). Any input layout is accepted; the triton backend copies
        an input whose trailing dims are not contiguous together.
    """
    B = pred.shape[0]
    for name, x in (("target", target), ("tangent", tangent)):
        if x is not None and x.shape != pred.shape:
            raise ValueError(f"adaptive_sq_loss: {name} shape {tuple(x.shape)} != pred shape "
                             f"{tuple(pred.shape)}")
    if (tangent is None) != (coef is None):
        raise ValueError("adaptive_sq_loss: pass coef together with tangent (coef scales it), "
                         f"got tangent={'None' if tangent is None else 'tensor'}, "
                         f"coef={'None' if coef is None else 'given'}")
    if tangent is not None:
        if isinstance(coef, torch.Tensor):
            if coef.numel() != B:
                raise ValueError(f"adaptive_sq_loss: coef must hold B={B} numbers, got shape "
                                 f"{tuple(coef.shape)}")
            coef = coef.detach().reshape(B)
        else:
            coef = torch.full((B,), float(coef), device=pred.device)
        coef = coef.to(_acc_dtype(pred.dtype)).contiguous()                       # (B,)

    if _pick_backend(pred, backend) == "torch":
        return _torch_adaptive_sq_loss(pred, target, tangent, coef, eps, p)
    raw = _sq_error_rows(_rows(pred), _rows(target.detach()),
                         None if tangent is None else _rows(tangent.detach()), coef)       # (B,)
    return raw / (raw.detach() + eps).pow(p), raw.detach()
