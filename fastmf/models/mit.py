"""MiT: the MeanFlow Transformer of iMF/pMF, for 2D images and 3D volumes.

A shared trunk of (depth - aux_head_depth) blocks, then a u-head and a v-head of aux_head_depth
blocks each with their own final layer. Conditioning is in-context: tokens for the class, omega,
t_min, t_max and h = t - r are prepended to the patch tokens (t itself is not an input token).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention, attention_with_tangent
from fastmf.models.layers import (BottleneckPatchEmbed, LabelEmbedder, PatchEmbed, RMSNorm,
                                  ScalarEmbedder, SwiGLU, apply_rope, patchify, rope_1d,
                                  rope_axial, tail, unpatchify)

VARIANTS = ("mf", "imf", "pmf")


@dataclass
class MiTConfig:
    """MiT hyperparameters. `depth` counts the trunk plus one head (B: 4 shared + 8 u + 8 v)."""
    input_size: tuple[int, ...] = (32, 32)   # 2 ints: images; 3 ints: volumes
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    aux_head_depth: int = 8
    mlp_ratio: float = 8 / 3
    num_classes: int = 1000
    num_class_tokens: int = 8
    num_cfg_tokens: int = 4
    num_interval_tokens: int = 2
    num_time_tokens: int = 4
    variant: str = "imf"                     # "pmf" predicts x inside the net
    rope: str = ""                           # "1d" (iMF) | "axial" (pMF); "" picks by variant/ndim
    weight_init_constant: float = 0.32
    attn_backend: str = "auto"

    def __post_init__(self):
        self.input_size = tuple(int(s) for s in self.input_size)
        if len(self.input_size) not in (2, 3):
            raise ValueError(f"input_size must have 2 (image) or 3 (volume) ints, got {self.input_size}")
        if any(s % self.patch_size for s in self.input_size):
            raise ValueError(f"patch_size {self.patch_size} does not divide input_size {self.input_size}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads "
                             "of even size")
        if not 0 < self.aux_head_depth <= self.depth:
            raise ValueError(f"aux_head_depth must be in [1, depth={self.depth}], got {self.aux_head_depth}")
        if not self.rope:
            self.rope = "axial" if self.variant == "pmf" or len(self.input_size) == 3 else "1d"
        if self.rope not in ("1d", "axial"):
            raise ValueError(f"rope must be '1d' or 'axial', got {self.rope!r}")

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(s // self.patch_size for s in self.input_size)

    @property
    def num_prefix(self) -> int:
        return (self.num_class_tokens + self.num_cfg_tokens + 2 * self.num_interval_tokens
                + self.num_time_tokens)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** len(self.input_size) * self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def bottleneck(self) -> int:
        """pMF's patch bottleneck width (0: plain patch embedding)."""
        if self.variant != "pmf":
            return 0
        return 128 if self.hidden_size <= 1024 else 256


####################################################################################################
#                                         Transformer                                              #
####################################################################################################

class RoPEAttention(nn.Module):
    """Multi-head self-attention with per-head QK RMSNorm, then RoPE, through kernels.attention."""

    def __init__(self, hidden: int, num_heads: int, backend: str):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.out_proj = nn.Linear(hidden, hidden, bias=False)
        self.q_norm = RMSNorm(hidden // num_heads)
        self.k_norm = RMSNorm(hidden // num_heads)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q_proj(x).unflatten(-1, (self.num_heads, -1))             # (B, N, H, Dh)
        k = self.k_proj(x).unflatten(-1, (self.num_heads, -1))             # (B, N, H, Dh)
        v = self.v_proj(x).unflatten(-1, (self.num_heads, -1))             # (B, N, H, Dh)
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)               # (B, N, H, Dh)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)               # (B, N, H, Dh)
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                      backend=self.backend)                                # (B, H, N, Dh)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, C))           # (B, N, C)

    def jvp(self, x, dx, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, d out) for tangent dx of the last len(dx) samples (layers.tail); RoPE is linear,
        so it rotates the tangents too."""
        B, N, C = x.shape
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1))            # (B, N, H, Dh)
        qkv = []
        for proj, norm in ((self.q_proj, self.q_norm), (self.k_proj, self.k_norm), (self.v_proj, None)):
            a = heads(proj(x))
            with torch.no_grad():
                da = heads(F.linear(dx, proj.weight))
            if norm is not None:
                a, da = norm.jvp(a, da)
                a = apply_rope(a, cos, sin)
                with torch.no_grad():
                    da = apply_rope(da, cos, sin)
            qkv.append((a, da))
        dtype = qkv[2][0].dtype
        (q, dq), (k, dk), (v, dv) = [(a.to(dtype).transpose(1, 2), da.to(dtype).transpose(1, 2)) for a, da in qkv]
        flat = lambda t: t.transpose(1, 2).reshape(t.shape[0], N, C)
        # Each sample's attention is computed once: plain for the first B - Bt, and for the last
        # Bt one fused pass gives O (differentiable) and dO.
        n = B - dx.shape[0]
        o, do = attention_with_tangent(q[n:], k[n:], v[n:], dq, dk, dv, backend=self.backend)  # (Bt, H, N, Dh) x2
        if n:
            o = torch.cat([attention(q[:n], k[:n], v[:n], backend=self.backend), o])      # (B, H, N, Dh)
        out = self.out_proj(flat(o))
        with torch.no_grad():
            return out, F.linear(flat(do), self.out_proj.weight)


class Block(nn.Module):
    """Pre-norm block; both residual branches scaled by zero-initialised per-channel gates."""

    def __init__(self, cfg: MiTConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size)
        self.attn = RoPEAttention(cfg.hidden_size, cfg.num_heads, cfg.attn_backend)
        self.norm2 = RMSNorm(cfg.hidden_size)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.mlp_hidden)
        self.attn_scale = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.mlp_scale = nn.Parameter(torch.zeros(cfg.hidden_size))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin) * self.attn_scale      # (B, N, C)
        return x + self.mlp(self.norm2(x)) * self.mlp_scale               # (B, N, C)

    def jvp(self, x, dx, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, d out) for tangent dx of the last len(dx) samples (layers.tail)."""
        a, da = self.attn.jvp(*self.norm1.jvp(x, dx), cos, sin)
        x = x + a * self.attn_scale
        with torch.no_grad():
            dx = dx + da * self.attn_scale
        m, dm = self.mlp.jvp(*self.norm2.jvp(x, dx))
        out = x + m * self.mlp_scale
        with torch.no_grad():
            return out, dx + dm * self.mlp_scale


# Regional compilation: every block runs the same code, so one compiled forward and one compiled
# JVP rule serve all blocks (dynamo guards on shapes, dtypes and grad mode, not on which block):
# a handful of small graphs to compile instead of one graph of the whole step.
_COMPILED_BLOCK: dict = {}


def block_functions(compiled: bool):
    """Block's (forward, jvp) as plain functions of (block, ...); torch.compile'd ones if asked."""
    if not compiled:
        return Block.forward, Block.jvp
    if not _COMPILED_BLOCK:
        _COMPILED_BLOCK.update(forward=torch.compile(Block.forward), jvp=torch.compile(Block.jvp))
    return _COMPILED_BLOCK["forward"], _COMPILED_BLOCK["jvp"]


class FinalLayer(nn.Module):
    """RMSNorm + zero-initialised linear to patch features."""

    def __init__(self, hidden: int, patch_dim: int):
        super().__init__()
        self.norm = RMSNorm(hidden)
        self.linear = nn.Linear(hidden, patch_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))

    def jvp(self, x, dx) -> tuple[torch.Tensor, torch.Tensor]:
        n, dn = self.norm.jvp(x, dx)
        out = self.linear(n)
        with torch.no_grad():
            return out, F.linear(dn, self.linear.weight)


####################################################################################################
#                                             MiT                                                  #
####################################################################################################

class MiT(nn.Module):
    """MeanFlow Transformer with a shared trunk, a u-head and a v-head."""

    def __init__(self, cfg: MiTConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.x_embedder = (BottleneckPatchEmbed(cfg.patch_dim, cfg.bottleneck, C) if cfg.bottleneck
                           else PatchEmbed(cfg.patch_dim, C))
        self.h_embedder = ScalarEmbedder(C)
        self.omega_embedder = ScalarEmbedder(C)
        self.cfg_t_start_embedder = ScalarEmbedder(C)
        self.cfg_t_end_embedder = ScalarEmbedder(C)
        self.y_embedder = LabelEmbedder(cfg.num_classes, C)
        self.class_tokens = nn.Parameter(torch.empty(cfg.num_class_tokens, C))
        self.omega_tokens = nn.Parameter(torch.empty(cfg.num_cfg_tokens, C))
        self.t_min_tokens = nn.Parameter(torch.empty(cfg.num_interval_tokens, C))
        self.t_max_tokens = nn.Parameter(torch.empty(cfg.num_interval_tokens, C))
        self.time_tokens = nn.Parameter(torch.empty(cfg.num_time_tokens, C))
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_tokens, C)) if cfg.variant == "pmf" else None
        shared = cfg.depth - cfg.aux_head_depth
        self.shared_blocks = nn.ModuleList(Block(cfg) for _ in range(shared))
        self.u_heads = nn.ModuleList(Block(cfg) for _ in range(cfg.aux_head_depth))
        self.v_heads = nn.ModuleList(Block(cfg) for _ in range(cfg.aux_head_depth))
        self.u_final_layer = FinalLayer(C, cfg.patch_dim)
        self.v_final_layer = FinalLayer(C, cfg.patch_dim)

        head_dim = C // cfg.num_heads
        angles = (rope_1d(cfg.num_tokens, head_dim) if cfg.rope == "1d"
                  else rope_axial(cfg.grid, cfg.num_prefix, head_dim))     # (N, Dh/2) fp64
        # Tables, not parameters: non-persistent so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", torch.cos(angles).float(), persistent=False)
        self.register_buffer("rope_sin", torch.sin(angles).float(), persistent=False)
        self.compiled_blocks = False
        self.initialize_weights()

    def initialize_weights(self):
        """Gaussian fan-in init, zero gates and output layers (as the references)."""
        C = self.cfg.hidden_size
        for blk in [*self.shared_blocks, *self.u_heads, *self.v_heads]:
            for lin in [blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj, blk.attn.out_proj,
                        blk.mlp.w1, blk.mlp.w2, blk.mlp.w3]:
                nn.init.normal_(lin.weight, std=self.cfg.weight_init_constant / math.sqrt(lin.in_features))
            nn.init.zeros_(blk.attn_scale)
            nn.init.zeros_(blk.mlp_scale)
        for emb in [self.h_embedder, self.omega_embedder, self.cfg_t_start_embedder, self.cfg_t_end_embedder]:
            for lin in (emb.mlp[0], emb.mlp[2]):
                nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.in_features))
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=1.0 / math.sqrt(C))
        for tok in [self.class_tokens, self.omega_tokens, self.t_min_tokens, self.t_max_tokens,
                    self.time_tokens]:
            nn.init.normal_(tok, std=1.0 / math.sqrt(C))
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)
        for lin in [m for m in self.x_embedder.modules() if isinstance(m, nn.Linear)]:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        for final in (self.u_final_layer, self.v_final_layer):
            nn.init.zeros_(final.linear.weight)
            nn.init.zeros_(final.linear.bias)

    def compile_blocks(self, enabled: bool = True):
        """Run every block's forward and JVP rule through torch.compile (regional compilation).

        Compiles in a fraction of the time a whole compiled train step takes (the blocks share
        their compiled code); the rest of the step (embeddings, final layers, loss) stays eager.
        Meant for the fast loss (train.py --compile-scope blocks); a step under torch.func
        transforms or an outer torch.compile should leave it off.
        """
        self.compiled_blocks = enabled

    def set_attention_backend(self, backend: str):
        """Switch every block's attention backend ("torch", "triton", "sdpa", "auto")."""
        self.cfg.attn_backend = backend
        for m in self.modules():
            if isinstance(m, RoPEAttention):
                m.backend = backend

    def check_inputs(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """One-line errors for inputs the model cannot take."""
        cfg = self.cfg
        if tuple(z.shape[1:]) != (cfg.in_channels, *cfg.input_size):
            raise ValueError(f"MiT expects input (B, {cfg.in_channels}, {', '.join(map(str, cfg.input_size))}), "
                             f"got {tuple(z.shape)}")
        if t.shape != z.shape[:1] or y.shape != z.shape[:1]:
            raise ValueError(f"t, h, omega, t_min, t_max and y must have shape (B,) = ({z.shape[0]},), "
                             f"got t {tuple(t.shape)}, y {tuple(y.shape)}")
        # Value checks read the values: only for CPU tensors outside compiled code, so that a GPU step
        # never waits on a device sync (training draws and sampling times are valid by construction).
        if t.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(((t < 0) | (t > 1)).any()):
                raise ValueError(f"t must lie in [0, 1], got values in [{t.min().item():.4g}, {t.max().item():.4g}]")
            if bool(((y < 0) | (y > cfg.num_classes)).any()):
                raise ValueError(f"labels must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = null class)")

    def build_sequence(self, z, h, omega, t_min, t_max, y) -> torch.Tensor:
        """Condition tokens (class, omega, t_min, t_max, time) then patch tokens: (B, N, C)."""
        x_embed = self.x_embedder(patchify(z, self.cfg.patch_size))                  # (B, Np, C)
        groups = [
            self.class_tokens + self.y_embedder(y)[:, None],                         # (B, 8, C)
            self.omega_tokens + self.omega_embedder(1 - 1 / omega)[:, None],         # (B, 4, C)
            self.t_min_tokens + self.cfg_t_start_embedder(t_min)[:, None],           # (B, 2, C)
            self.t_max_tokens + self.cfg_t_end_embedder(t_max)[:, None],             # (B, 2, C)
            self.time_tokens + self.h_embedder(h)[:, None],                          # (B, 4, C)
        ]
        seq = torch.cat([g.to(x_embed.dtype) for g in groups] + [x_embed], dim=1)    # (B, N, C)
        return seq if self.pos_embed is None else seq + self.pos_embed

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, omega: torch.Tensor,
                t_min: torch.Tensor, t_max: torch.Tensor, y: torch.Tensor,
                heads: str = "uv", tangents: tuple | None = None) -> tuple:
        """Average velocity u and instantaneous velocity v at z (B, C, *S).

        t is used only by pMF's x -> u conversion; the net sees h = t - r, omega, t_min, t_max, y.
        `heads` picks what to compute: "uv", "u" (sampling) or "v" (guidance); the other is None.

        With `tangents=(dz, dt, dh)` for the last Bt <= B samples (dz (Bt, C, *S), dt and dh
        (Bt,)), the same pass also gives du (Bt, C, *S), the exact directional derivative of u for
        those samples, by hand-written JVP rules (no dual tensors, no autograd graph: du is
        stop-grad): returns (u, du) for heads="u" and (u, v, du) for heads="uv". u and v keep
        their autograd graph as in a plain pass, so one with-grad pass can carry the tangent.
        """
        self.check_inputs(z, t, y)
        if tangents is not None:
            if heads not in ("u", "uv"):
                raise ValueError(f"tangents need the u-head: heads must be 'u' or 'uv', got {heads!r}")
            u, v, du = self._forward_with_tangent(z, t, h, omega, t_min, t_max, y, heads, *tangents)
            return (u, du) if heads == "u" else (u, v, du)
        seq = self.build_sequence(z, h, omega, t_min, t_max, y)                      # (B, N, C)
        seq = self._run(self.shared_blocks, seq)
        u = self._velocity_from_tokens(self._run(self.u_heads, seq), self.u_final_layer, z, t) if "u" in heads else None
        v = self._velocity_from_tokens(self._run(self.v_heads, seq), self.v_final_layer, z, t) if "v" in heads else None
        return u, v

    def _run(self, blocks, seq):
        forward, _ = block_functions(self.compiled_blocks)
        for blk in blocks:
            seq = forward(blk, seq, self.rope_cos, self.rope_sin)
        return seq

    def _velocity_from_tokens(self, seq, final: "FinalLayer", z, t) -> torch.Tensor:
        """Final layer on the patch tokens, unpatchified; pMF: x-prediction -> velocity."""
        out = unpatchify(final(seq[:, self.cfg.num_prefix:]), self.cfg.patch_size, self.cfg.grid)
        if self.cfg.variant != "pmf":
            return out
        # x-prediction inside the net: u = (z - x_hat) / clip(t, 0.05, 1).
        return (z - out) / t.clamp(0.05, 1.0).reshape(-1, *[1] * (z.dim() - 1))

    def _forward_with_tangent(self, z, t, h, omega, t_min, t_max, y, heads, dz, dt, dh):
        """u (and v) for all B samples, du along (dz, dt, dh) for the last Bt, through the u-path."""
        cfg = self.cfg
        cos, sin = self.rope_cos, self.rope_sin
        B, Bt = z.shape[0], dz.shape[0]
        if dz.shape[1:] != z.shape[1:] or dt.shape != (Bt,) or dh.shape != (Bt,) or Bt > B:
            raise ValueError(f"tangents (dz, dt, dh) must be ((Bt, *z.shape[1:]), (Bt,), (Bt,)) with Bt <= "
                             f"{B}; got {tuple(dz.shape)}, {tuple(dt.shape)}, {tuple(dh.shape)}")
        seq = self.build_sequence(z, h, omega, t_min, t_max, y)                      # (B, N, C)
        with torch.no_grad():
            # Only the time tokens (through h) and the patch tokens (through z) carry a tangent.
            dh_emb = self.h_embedder.tangent(tail(h, dh), dh)                        # (Bt, C)
            d_patch = self.x_embedder.tangent(patchify(dz, cfg.patch_size))         # (Bt, Np, C)
            n_before_time = cfg.num_prefix - cfg.num_time_tokens
            dseq = torch.cat([d_patch.new_zeros(Bt, n_before_time, d_patch.shape[-1]),
                              dh_emb[:, None].to(d_patch.dtype).expand(-1, cfg.num_time_tokens, -1),
                              d_patch], dim=1)                                       # (Bt, N, C)
        _, jvp = block_functions(self.compiled_blocks)
        for blk in self.shared_blocks:
            seq, dseq = jvp(blk, seq, dseq, cos, sin)
        v = self._velocity_from_tokens(self._run(self.v_heads, seq), self.v_final_layer, z, t) if "v" in heads else None
        for blk in self.u_heads:
            seq, dseq = jvp(blk, seq, dseq, cos, sin)
        out, dout = self.u_final_layer.jvp(seq[:, cfg.num_prefix:], dseq[:, cfg.num_prefix:])
        out = unpatchify(out, cfg.patch_size, cfg.grid)                              # (B, C, *S)
        with torch.no_grad():
            dout = unpatchify(dout, cfg.patch_size, cfg.grid)                        # (Bt, C, *S)
        if cfg.variant != "pmf":
            return out, v, dout
        # u = (z - x_hat) / c with c = clip(t, 0.05, 1); dc = dt inside the clip range (as torch's clamp).
        shape = (-1, *[1] * (z.dim() - 1))
        u = (z - out) / t.clamp(0.05, 1.0).reshape(shape)
        with torch.no_grad():
            tt = tail(t, dt)
            c = tt.clamp(0.05, 1.0).reshape(shape)
            dc = torch.where((tt >= 0.05) & (tt <= 1.0), dt, torch.zeros_like(dt)).reshape(shape)
            return u, v, (dz - dout) / c - tail(u, dz) * dc / c
