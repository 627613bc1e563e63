"""Building blocks of the backbones: norms, MLP activations with their tangent rules, rotary and
sin-cos position tables, scalar/label embedders, nd patching.

Each `jvp(x, dx)` method returns (y, dy) for a primal batch x of B samples and a tangent dx for its
last Bt <= B samples (see `tail`); `tangent(...)` methods return the tangent alone.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from kernels import attention, attention_with_tangent, embedding


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (the references upcast norms, RoPE and embeddings), fp64 stays fp64."""
    # A comparison, not torch.promote_types, which dispatches an aten op (about 280 per MiT-B step).
    return torch.float64 if dtype == torch.float64 else torch.float32


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 (or fp64), returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one dispatch instead of five: it matters under torch.func.jvp, where every
        # op also dispatches its tangent.
        xc = F.rms_norm(x.to(compute_dtype(x.dtype)), (x.shape[-1],), eps=self.eps)
        return xc.to(x.dtype) * self.weight

    def jvp(self, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, dy); see `tail` for the shapes. With r = rsqrt(mean(x^2) + eps) and n = x r,
        d(x r) = r dx - x r^3 mean(x dx) = r (dx - n mean(n dx))."""
        y = self(x)
        with torch.no_grad():
            ct = compute_dtype(x.dtype)
            xc, dxc = tail(x, dx).to(ct), dx.to(ct)
            r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
            n = xc * r
            dn = r * (dxc - n * (n * dxc).mean(-1, keepdim=True))
            return y, dn.to(dx.dtype) * self.weight


class LayerNorm(nn.Module):
    """LayerNorm without affine (DiT's), in fp32 (or fp64), returned in the input dtype. Written
    out: nn.LayerNorm inside a compiled JVP hit an internal assert in torch 2.13."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(compute_dtype(x.dtype))
        xc = xc - xc.mean(-1, keepdim=True)
        return (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def jvp(self, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, dy): with centred xc, dxc, r = rsqrt(mean(xc^2) + eps) and n = xc r,
        dy = r dxc - xc r^3 mean(xc dxc) = r (dxc - n mean(n dxc))."""
        y = self(x)
        with torch.no_grad():
            ct = compute_dtype(x.dtype)
            xc, dxc = tail(x, dx).to(ct), dx.to(ct)
            xc, dxc = xc - xc.mean(-1, keepdim=True), dxc - dxc.mean(-1, keepdim=True)
            r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
            n = xc * r
            return y, (r * (dxc - n * (n * dxc).mean(-1, keepdim=True))).to(dx.dtype)


def stacked_weight(*linears: nn.Linear) -> torch.Tensor:
    """The linears' weights stacked along the output dim: one matmul instead of several on the
    same input (x read once, one GEMM as wide as all of them; in backward the input gradients are
    summed inside that GEMM). The parameters stay separate (the references' layout). Under
    autocast each weight is cast first, the cast F.linear would make, so that the stack is written
    once in the compute dtype (cat then cast writes an fp32 copy, then the cast)."""
    w = linears[0].weight
    dev = w.device.type
    cast = torch.is_autocast_enabled(dev) and w.dtype != torch.float64
    dtype = torch.get_autocast_dtype(dev) if cast else w.dtype
    return torch.cat([lin.weight.to(dtype) for lin in linears])


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.linear(x, stacked_weight(self.w1, self.w3)).chunk(2, -1)  # (..., hidden) each
        return self.w2(F.silu(a) * b)

    def jvp(self, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, dy); see `tail` for the shapes."""
        w = stacked_weight(self.w1, self.w3)                            # (2 hidden, dim)
        ab = F.linear(x, w)                                             # (B, ..., 2 hidden)
        a, b = ab.chunk(2, -1)
        y = self.w2(F.silu(a) * b)
        with torch.no_grad():
            da, db = F.linear(dx, w).chunk(2, -1)                       # (Bt, ..., hidden) each
            at, bt = tail(ab, dx).chunk(2, -1)
            sa, dsa = silu_jvp(at, da)
            return y, F.linear(dsa * bt + sa * db, self.w2.weight)


def tail(p: torch.Tensor, dp: torch.Tensor) -> torch.Tensor:
    """The rows of primal p (B, ...) that tangent dp (Bt, ...) belongs to: its last Bt, detached.

    The hand-written JVP rules (`jvp` methods) take a primal batch of B samples and a tangent for
    its last Bt <= B samples: the primal output keeps its autograd graph (grad mode permitting),
    the tangent is computed without one. So one with-grad pass over a batch can also carry the
    (stop-grad) tangent of some of its samples.
    """
    return p[p.shape[0] - dp.shape[0]:].detach()


def attention_tail_tangent(q, k, v, dq, dk, dv, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of all B samples (q, k, v (B, H, N, D)) and its tangent for the last Bt (dq, dk, dv
    (Bt, H, N, D)): each sample's attention is computed once, plain for the first B - Bt, one fused
    pass giving O (differentiable) and dO (stop-grad) for the rest. Returns o (B, ...), do (Bt, ...)."""
    Bt = dq.shape[0]
    n = q.shape[0] - Bt
    if not n:
        return attention_with_tangent(q, k, v, dq, dk, dv, backend=backend)
    if torch.compiler.is_compiling():
        # Compiled: two slices. Inductor folds each slice's zero-filled gradient into the kernel
        # that consumes it (RoPE's backward), where a split's backward cat is a copy of its own
        # (bench/step_bytes.py, fast: 2.876 GB and 594 kernels against 2.917 and 618).
        (q0, k0, v0), (q1, k1, v1) = (q[:n], k[:n], v[:n]), (q[n:], k[n:], v[n:])
    else:
        # Eager: one split, whose backward is one cat of the two row blocks' gradients, where each
        # slice's backward writes a zero-filled full-batch gradient and the two are then added.
        (q0, q1), (k0, k1), (v0, v1) = (x.split([n, Bt]) for x in (q, k, v))
    o, do = attention_with_tangent(q1, k1, v1, dq, dk, dv, backend=backend)
    plain = attention(q0, k0, v0, backend=backend)
    # Joined token-major (B, N, H, Dh), the fused kernels' layout, so that the caller's
    # o.transpose(1, 2).reshape(B, N, C) stays a view.
    o = torch.cat([plain.transpose(1, 2), o.transpose(1, 2)]).transpose(1, 2)
    return o, do


# Regional compilation: every block of a network runs the same code, so one compiled forward and
# one compiled JVP rule serve all its blocks (dynamo guards on shapes, dtypes and grad mode, not on
# which block): a handful of small graphs to compile instead of one graph of the whole step.
_COMPILED: dict = {}


def call_block(block: nn.Module, compiled: bool, *args):
    """block(*args) as a module call (so that hooks such as FSDP's run), or through the one
    torch.compile'd forward that all blocks of its class share (regional compilation)."""
    if not compiled:
        return block(*args)
    forward = type(block).forward
    if forward not in _COMPILED:
        _COMPILED[forward] = torch.compile(forward)
    return _COMPILED[forward](block, *args)


def silu_jvp(a: torch.Tensor, da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(a), silu'(a) da) with silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a)))."""
    sig = torch.sigmoid(a)
    return a * sig, da * sig * (1 + a * (1 - sig))


def gelu_tanh_jvp(a: torch.Tensor, da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu_tanh(a), gelu_tanh'(a) da), gelu_tanh(a) = a (1 + tanh(k (a + 0.044715 a^3))) / 2."""
    k = math.sqrt(2 / math.pi)
    th = torch.tanh(k * (a + 0.044715 * a.pow(3)))
    grad = 0.5 * (1 + th) + 0.5 * a * (1 - th.pow(2)) * k * (1 + 3 * 0.044715 * a.pow(2))
    return 0.5 * a * (1 + th), da * grad


class ScalarEmbedder(nn.Module):
    """Sinusoidal features of a per-sample scalar (cos half first) -> Linear, SiLU, Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def freqs(self, s: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        ct = compute_dtype(s.dtype)
        return torch.exp(-math.log(self.max_period) * torch.arange(half, device=s.device, dtype=ct) / half)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        freqs = self.freqs(s)                                                       # (half,)
        args = s.to(freqs.dtype)[:, None] * freqs[None]                             # (B, half)
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)               # (B, freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))                         # (B, hidden)

    @torch.no_grad()
    def tangent(self, s: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
        """d forward(s) along ds (both (B,)): (B, hidden), no autograd."""
        freqs = self.freqs(s)                                                       # (half,)
        args = s.to(freqs.dtype)[:, None] * freqs[None]                             # (B, half)
        dargs = ds.to(freqs.dtype)[:, None] * freqs[None]                           # (B, half)
        w = self.mlp[0].weight
        dfeats = torch.cat([-torch.sin(args) * dargs, torch.cos(args) * dargs], dim=-1).to(w.dtype)
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(w.dtype)
        _, dsa = silu_jvp(self.mlp[0](feats), F.linear(dfeats, w))
        return F.linear(dsa, self.mlp[2].weight)                                    # (B, hidden)


class LabelEmbedder(nn.Module):
    """Class table with num_classes + 1 rows; the last row is the null class used for CFG."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        # not self.embedding_table(y): compiled, its gradient would be summed in no fixed order
        return embedding(self.embedding_table.weight, y)                            # (B, hidden)


####################################################################################################
#                                       Rotary embeddings                                          #
####################################################################################################

def rope_1d(num_tokens: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """iMF form: angles (N, head_dim/2) over the whole sequence, prefix tokens included."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return torch.outer(torch.arange(num_tokens, dtype=torch.float64), freqs)


def rope_axial(grid: tuple[int, ...], num_prefix: int, head_dim: int,
               theta: float = 10000.0) -> torch.Tensor:
    """pMF form generalised to n axes: angles (prefix + prod(grid), head_dim/2).

    The head_dim/2 rotation pairs are split into equal consecutive groups, one per axis (pMF 2D:
    pairs [0, D/4) follow the row, [D/4, D/2) the column). Pairs left over when head_dim/2 is not
    divisible by the number of axes, and all prefix tokens, get angle 0 (no rotation).
    """
    pairs = head_dim // 2
    per_axis = pairs // len(grid)
    axis_dim = 2 * per_axis
    freqs = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    angles = torch.zeros(num_prefix + math.prod(grid), pairs, dtype=torch.float64)
    for a, c in enumerate(coords):
        angles[num_prefix:, a * per_axis:(a + 1) * per_axis] = torch.outer(c.reshape(-1), freqs)
    return angles


def sincos_embedding(grid: tuple[int, ...], dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos position table (prod(grid), dim) fp64, tokens in row-major order.

    DiT/MAE 2D form generalised to n axes: the channels split into n equal even parts, the first
    for the last axis (the column, as MAE's meshgrid(w, h) does), the next for the axis before it;
    each part is [sin(pos w), cos(pos w)] with w_i = theta^(-i / (part / 2)). Channels left over
    when dim is not divisible by 2n stay 0.
    """
    n = len(grid)
    part = 2 * (dim // (2 * n))
    w = 1.0 / theta ** (torch.arange(part // 2, dtype=torch.float64) / (part / 2))
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    out = torch.zeros(math.prod(grid), dim, dtype=torch.float64)
    for k, axis in enumerate(reversed(range(n))):
        ang = torch.outer(coords[axis].reshape(-1), w)                              # (N, part/2)
        out[:, k * part:(k + 1) * part] = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, N, H, D) by angles given as cos/sin
    (N, 1, D/2): shaped once per network call to broadcast over the batch and the heads.

    Computed in fp32 (fp64 for fp64 inputs) as the references do; returns that dtype. Eager: one
    complex multiply (fewer dispatches than the real form, which counts twice under a JVP).
    Compiled: the real form x cos + swap_pairs(x) (-sin, sin), which inductor fuses with the norm
    before it (it generates no code for complex ops; this form also vectorises on CPU, measured
    2.5x faster there than stacking the two rotated halves).
    """
    ct = compute_dtype(x.dtype)
    if torch.compiler.is_compiling():
        xc = x.to(ct)
        swapped = xc.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)                   # (x1, x0, x3, x2, ...)
        c = cos.to(ct).repeat_interleave(2, -1)                                     # (N, 1, D)
        s = torch.stack([-sin, sin], dim=-1).flatten(-2).to(ct)                     # (N, 1, D)
        return xc * c + swapped * s                                                 # (B, N, H, D)
    pairs = torch.view_as_complex(x.to(ct).unflatten(-1, (-1, 2)).contiguous())    # (B, N, H, D/2)
    rot = torch.complex(cos.to(ct), sin.to(ct))                                     # (N, 1, D/2)
    return torch.view_as_real(pairs * rot).flatten(-2)                              # (B, N, H, D)


####################################################################################################
#                                    nd patchify / unpatchify                                      #
####################################################################################################

_PATTERNS = {
    2: "b c (h p) (w q) -> b (h w) (p q c)",
    3: "b c (d p) (h q) (w r) -> b (d h w) (p q r c)",
}
_AXES = {2: ("p", "q"), 3: ("p", "q", "r")}
_GRID = {2: ("h", "w"), 3: ("d", "h", "w")}


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, *S) -> (B, N, p^n C), tokens in row-major order, features ordered (patch..., c)."""
    n = x.dim() - 2
    return rearrange(x, _PATTERNS[n], **{a: p for a in _AXES[n]})


def unpatchify(tokens: torch.Tensor, p: int, grid: tuple[int, ...]) -> torch.Tensor:
    """(B, N, p^n C) -> (B, C, *S); inverse of patchify."""
    n = len(grid)
    lhs, rhs = _PATTERNS[n].split(" -> ")
    sizes = dict(zip(_GRID[n], grid)) | {a: p for a in _AXES[n]}
    return rearrange(tokens, f"{rhs} -> {lhs}", **sizes)


class PatchEmbed(nn.Module):
    """Linear patch embedding (the p x p stride-p conv as a matmul on patchified input)."""

    def __init__(self, patch_dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(patch_dim, hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)

    def tangent(self, dpatches: torch.Tensor) -> torch.Tensor:
        return F.linear(dpatches, self.proj.weight)


class BottleneckPatchEmbed(nn.Module):
    """pMF: patch -> bottleneck channels -> hidden (conv p x p then 1 x 1 conv, both with bias)."""

    def __init__(self, patch_dim: int, bottleneck: int, hidden: int):
        super().__init__()
        self.proj1 = nn.Linear(patch_dim, bottleneck)
        self.proj2 = nn.Linear(bottleneck, hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(patches))

    def tangent(self, dpatches: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(dpatches, self.proj1.weight), self.proj2.weight)
