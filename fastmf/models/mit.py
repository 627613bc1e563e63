"""MiT: the MeanFlow Transformer of iMF/pMF, for 2D images and 3D volumes.

A shared trunk of (depth - aux_head_depth) blocks, then a u-head and (unless v_head=False, for MF)
a v-head of aux_head_depth blocks each with their own final layer. Conditioning is in-context:
tokens for the class, omega, t_min, t_max and h = t - r are prepended to the patch tokens (t itself
is not an input: MiT does not condition on t). pMF's form (absolute position embedding, bottleneck
patch embedding, axial RoPE) is a set of config options; its x-prediction is models.xpred.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention
from fastmf.models.contract import Backbone, Conditions, PatchInput, Prediction, Spec, Tangent
from fastmf.models.layers import (BottleneckPatchEmbed, attention_tail_tangent, LabelEmbedder, PatchEmbed, RMSNorm,
                                  ScalarEmbedder, SwiGLU, apply_rope, compute_dtype, patchify, rope_1d,
                                  call_block, rope_axial, stacked_weight, tail, unpatchify)


@dataclass
class MiTConfig(PatchInput):
    """MiT hyperparameters. `depth` counts the trunk plus one head (B: 4 shared + 8 u + 8 v)."""
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    aux_head_depth: int = 8
    mlp_ratio: float = 8 / 3
    mlp_multiple: int = 1                    # SwiGLU width int(hidden * ratio) rounded up to this (pMF-H: 8)
    num_classes: int = 1000
    num_class_tokens: int = 8
    num_cfg_tokens: int = 4
    num_interval_tokens: int = 2
    num_time_tokens: int = 4
    v_head: bool = True                      # MF trains no v-head
    patch_embed: str = "linear"              # "linear" (iMF) | "bottleneck" (pMF)
    pos_embed: bool = False                  # learned absolute position embedding (pMF)
    rope: str = ""                           # "1d" (iMF) | "axial" (pMF); "": 1d for images, axial for volumes
    weight_init_constant: float = 0.32
    attn_backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.patch_embed not in ("linear", "bottleneck"):
            raise ValueError(f"patch_embed must be 'linear' or 'bottleneck', got {self.patch_embed!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads "
                             "of even size")
        if not 0 < self.aux_head_depth <= self.depth:
            raise ValueError(f"aux_head_depth must be in [1, depth={self.depth}], got {self.aux_head_depth}")
        if not self.rope:
            self.rope = "axial" if len(self.input_size) == 3 else "1d"
        if self.rope not in ("1d", "axial"):
            raise ValueError(f"rope must be '1d' or 'axial', got {self.rope!r}")

    @property
    def num_prefix(self) -> int:
        return (self.num_class_tokens + self.num_cfg_tokens + 2 * self.num_interval_tokens
                + self.num_time_tokens)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + math.prod(self.grid)

    @property
    def mlp_hidden(self) -> int:
        m = self.mlp_multiple
        return -(-int(self.hidden_size * self.mlp_ratio) // m) * m

    @property
    def bottleneck(self) -> int:
        """pMF's patch bottleneck width (0: plain patch embedding)."""
        if self.patch_embed != "bottleneck":
            return 0
        return 128 if self.hidden_size <= 1024 else 256


# depth counts the trunk plus one head; every preset has 8-block heads except mit-tiny.
PRESETS: dict[str, dict] = {
    # CPU-sized: fewer condition tokens too, since on 8x8 digits the prefix would outnumber the patches.
    "mit-tiny": dict(depth=4, hidden_size=64, num_heads=4, aux_head_depth=2, num_class_tokens=4,
                     num_cfg_tokens=2, num_interval_tokens=1, num_time_tokens=2),
    "mit-b": dict(depth=12, hidden_size=768, num_heads=12, aux_head_depth=8),
    "mit-m": dict(depth=24, hidden_size=768, num_heads=12, aux_head_depth=8),
    "mit-l": dict(depth=32, hidden_size=1024, num_heads=16, aux_head_depth=8),
    "mit-xl": dict(depth=48, hidden_size=1024, num_heads=16, aux_head_depth=8),
    # pMF's sizes (models/pmfDiT.py): B is deeper than iMF's B; H has 80-wide heads, a 256-wide patch
    # bottleneck (hidden > 1024) and a SwiGLU width rounded up to a multiple of 8 (3413 -> 3416).
    "pmf-b": dict(depth=16, hidden_size=768, num_heads=12, aux_head_depth=8),
    "pmf-l": dict(depth=32, hidden_size=1024, num_heads=16, aux_head_depth=8),
    "pmf-h": dict(depth=48, hidden_size=1280, num_heads=16, aux_head_depth=8, mlp_multiple=8),
}

# Config overrides per objective (fastmf.models.build applies them).
VARIANTS = {"mf": dict(v_head=False), "imf": {},
            "pmf": dict(patch_embed="bottleneck", pos_embed=True, rope="axial")}


####################################################################################################
#                                         Transformer                                              #
####################################################################################################

class RoPEAttention(nn.Module):
    """Multi-head self-attention with per-head QK RMSNorm, then RoPE, through kernels.attention."""

    def __init__(self, hidden: int, num_heads: int, backend: str):
        super().__init__()
        self.num_heads, self.attn_backend = num_heads, backend
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.out_proj = nn.Linear(hidden, hidden, bias=False)
        self.q_norm = RMSNorm(hidden // num_heads)
        self.k_norm = RMSNorm(hidden // num_heads)

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(2)        # 3 x (B, N, H, Dh)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        w = stacked_weight(self.q_proj, self.k_proj, self.v_proj)           # (3C, C)
        q, k, v = self._split(F.linear(x, w))                               # (B, N, H, Dh) each
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)               # (B, N, H, Dh)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)               # (B, N, H, Dh)
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                      backend=self.attn_backend)                                # (B, H, N, Dh)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, C))           # (B, N, C)

    def jvp(self, x, dx, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, d out) for tangent dx of the last len(dx) samples (layers.tail); RoPE is linear,
        so it rotates the tangents too."""
        B, N, C = x.shape
        w = stacked_weight(self.q_proj, self.k_proj, self.v_proj)           # (3C, C)
        q, k, v = self._split(F.linear(x, w))                               # (B, N, H, Dh) each
        with torch.no_grad():
            dq, dk, dv = self._split(F.linear(dx, w))                       # (Bt, N, H, Dh) each
        q, dq = self.q_norm.jvp(q, dq)
        k, dk = self.k_norm.jvp(k, dk)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        with torch.no_grad():
            # The tangents keep RoPE's compute dtype: attention_with_tangent scales them before its
            # one cast to the kernel's dtype, so the softmax scale adds no rounding.
            dq, dk = apply_rope(dq, cos, sin), apply_rope(dk, cos, sin)
        heads = lambda t: t.transpose(1, 2)                                  # (B, H, N, Dh)
        flat = lambda t: t.transpose(1, 2).reshape(t.shape[0], N, C)
        o, do = attention_tail_tangent(*map(heads, (q, k, v, dq, dk, dv)), self.attn_backend)  # (B | Bt, H, N, Dh)
        out = self.out_proj(flat(o))
        with torch.no_grad():
            return out, F.linear(flat(do), self.out_proj.weight)


class Block(nn.Module):
    """Pre-norm block; both residual branches scaled by zero-initialised per-channel gates."""

    shard_unit = True  # FSDP2 shards each block on its own (distributed.wrap_fsdp)

    def __init__(self, cfg: MiTConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size)
        self.attn = RoPEAttention(cfg.hidden_size, cfg.num_heads, cfg.attn_backend)
        self.norm2 = RMSNorm(cfg.hidden_size)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.mlp_hidden)
        self.attn_scale = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.mlp_scale = nn.Parameter(torch.zeros(cfg.hidden_size))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dx: torch.Tensor | None = None):
        """x (B, N, C) -> (B, N, C); with a tangent dx of the last Bt samples, (out, d out) (`jvp`)."""
        if dx is not None:
            return self.jvp(x, dx, cos, sin)
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

class MiT(Backbone):
    """MeanFlow Transformer with a shared trunk, a u-head and (optionally) a v-head."""

    def __init__(self, cfg: MiTConfig):
        super().__init__()
        self.cfg = cfg
        self.spec = Spec(heads="uv" if cfg.v_head else "u", conditions_on_t=False, in_channels=cfg.in_channels,
                         input_size=cfg.input_size, num_classes=cfg.num_classes, num_tokens=cfg.num_tokens)
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
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_tokens, C)) if cfg.pos_embed else None
        shared = cfg.depth - cfg.aux_head_depth
        self.shared_blocks = nn.ModuleList(Block(cfg) for _ in range(shared))
        self.u_heads = nn.ModuleList(Block(cfg) for _ in range(cfg.aux_head_depth))
        self.u_final_layer = FinalLayer(C, cfg.patch_dim)
        if cfg.v_head:
            self.v_heads = nn.ModuleList(Block(cfg) for _ in range(cfg.aux_head_depth))
            self.v_final_layer = FinalLayer(C, cfg.patch_dim)

        head_dim = C // cfg.num_heads
        angles = (rope_1d(cfg.num_tokens, head_dim) if cfg.rope == "1d"
                  else rope_axial(cfg.grid, cfg.num_prefix, head_dim))     # (N, Dh/2) fp64
        # Tables, not parameters (non-persistent: checkpoints hold only learned weights). Kept in
        # fp64 so that a .double() model is fp64-exact; apply_rope computes in fp32 or fp64.
        self.register_buffer("rope_cos", torch.cos(angles), persistent=False)
        self.register_buffer("rope_sin", torch.sin(angles), persistent=False)
        self.compiled_blocks = False
        self.initialize_weights()

    def blocks(self) -> list:
        return [*self.shared_blocks, *self.u_heads, *(self.v_heads if self.cfg.v_head else [])]

    def initialize_weights(self):
        """Gaussian fan-in init, zero gates and output layers (as the references)."""
        C = self.cfg.hidden_size
        for blk in self.blocks():
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
        for final in [self.u_final_layer, *([self.v_final_layer] if self.cfg.v_head else [])]:
            nn.init.zeros_(final.linear.weight)
            nn.init.zeros_(final.linear.bias)

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

    def predict(self, z: torch.Tensor, c: Conditions, heads: str, tangent: Tangent | None) -> Prediction:
        seq = self.build_sequence(z, c.h, c.omega, c.t_min, c.t_max, c.y)          # (B, N, C)
        # RoPE's tables in its compute dtype and shaped for apply_rope once per call, not in every block.
        rope = tuple(t.to(compute_dtype(seq.dtype))[:, None] for t in (self.rope_cos, self.rope_sin))  # (N, 1, Dh/2)
        if tangent is not None:
            return self._predict_with_tangent(z, seq, c, heads, tangent, rope)
        seq = self._run(self.shared_blocks, seq, rope)
        u = self._head(self.u_heads, self.u_final_layer, seq, rope) if "u" in heads else None
        v = self._head(self.v_heads, self.v_final_layer, seq, rope) if "v" in heads else None
        return Prediction(u, v)

    def _run(self, blocks, seq, rope):
        for blk in blocks:
            seq = call_block(blk, self.compiled_blocks, seq, *rope)
        return seq

    def _head(self, blocks, final: "FinalLayer", seq, rope) -> torch.Tensor:
        """Head blocks, final layer on the patch tokens, unpatchified: (B, C, *S)."""
        out = final(self._run(blocks, seq, rope)[:, self.cfg.num_prefix:])
        return unpatchify(out, self.cfg.patch_size, self.cfg.grid)

    def _predict_with_tangent(self, z, seq, c: Conditions, heads: str, tangent: Tangent, rope) -> Prediction:
        """u (and v) for all B samples, du along (dz, dh) for the last Bt, through the u-path
        (MiT does not read t, so dt does not enter)."""
        cfg = self.cfg
        cos, sin = rope
        Bt = tangent.dz.shape[0]
        with torch.no_grad():
            # Only the time tokens (through h) and the patch tokens (through z) carry a tangent.
            dh_emb = self.h_embedder.tangent(tail(c.h, tangent.dh), tangent.dh)      # (Bt, C)
            d_patch = self.x_embedder.tangent(patchify(tangent.dz, cfg.patch_size))  # (Bt, Np, C)
            n_before_time = cfg.num_prefix - cfg.num_time_tokens
            dseq = torch.cat([d_patch.new_zeros(Bt, n_before_time, d_patch.shape[-1]),
                              dh_emb[:, None].to(d_patch.dtype).expand(-1, cfg.num_time_tokens, -1),
                              d_patch], dim=1)                                       # (Bt, N, C)
        for blk in self.shared_blocks:
            seq, dseq = call_block(blk, self.compiled_blocks, seq, cos, sin, dseq)
        v = self._head(self.v_heads, self.v_final_layer, seq, rope) if "v" in heads else None
        for blk in self.u_heads:
            seq, dseq = call_block(blk, self.compiled_blocks, seq, cos, sin, dseq)
        out, dout = self.u_final_layer.jvp(seq[:, cfg.num_prefix:], dseq[:, cfg.num_prefix:])
        u = unpatchify(out, cfg.patch_size, cfg.grid)                                # (B, C, *S)
        with torch.no_grad():
            du = unpatchify(dout, cfg.patch_size, cfg.grid)                          # (Bt, C, *S)
        return Prediction(u, v, du)
