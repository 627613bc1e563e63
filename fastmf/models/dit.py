"""DiT: the original MeanFlow backbone (a DiT/SiT with adaLN-Zero blocks), for images and volumes.

The condition c = t_embedder(t) + h_embedder(h) + y_embedder(y) (h = t - r; the label table has a
null row for CFG) modulates every block: SiLU -> Linear(c) gives shift, scale and gate for the
attention and MLP branches (adaLN-Zero: zero-initialised, so every block starts as the identity).
LayerNorm without affine, attention with qkv bias, GELU(tanh) MLP, a fixed sin-cos position
embedding, and an adaLN final layer. Only a u-head: DiT trains MF. The tangents of t and h enter
every block through the modulation; the hand-written rules below carry them.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention
from fastmf.models.contract import Backbone, Conditions, PatchInput, Prediction, Spec, Tangent
from fastmf.models.layers import (LabelEmbedder, attention_tail_tangent, LayerNorm, PatchEmbed, ScalarEmbedder, gelu_tanh_jvp,
                                  call_block, patchify, silu_jvp, sincos_embedding, tail, unpatchify)


@dataclass
class DiTConfig(PatchInput):
    """DiT hyperparameters (MeanFlow's sizes: B 12 x 768, M 16 x 1024, L 24 x 1024, XL 28 x 1152)."""
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    attn_backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads")

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)


# MeanFlow's sizes (Gsunshine/meanflow models_dit.py); the patch size is set apart (MF-B/4: patch_size=4).
PRESETS: dict[str, dict] = {
    "dit-tiny": dict(depth=4, hidden_size=96, num_heads=4),   # CPU-sized, for the digits
    "dit-b": dict(depth=12, hidden_size=768, num_heads=12),
    "dit-m": dict(depth=16, hidden_size=1024, num_heads=16),
    "dit-l": dict(depth=24, hidden_size=1024, num_heads=16),
    "dit-xl": dict(depth=28, hidden_size=1152, num_heads=16),
}

VARIANTS = {"mf": {}}  # no v-head: iMF and pMF need one


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) * (1 + scale) + shift, scale and shift (B, C)."""
    return x * (1 + scale[:, None]) + shift[:, None]


@torch.no_grad()
def modulate_tangent(x, dx, shift, scale, dshift, dscale) -> torch.Tensor:
    """d modulate for the last Bt samples: dx (1 + scale) + x dscale + dshift."""
    return dx * (1 + tail(scale, dscale)[:, None]) + tail(x, dx) * dscale[:, None] + dshift[:, None]


####################################################################################################
#                                         Transformer                                              #
####################################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with qkv bias, through kernels.attention."""

    def __init__(self, hidden: int, num_heads: int, backend: str):
        super().__init__()
        self.num_heads, self.attn_backend = num_heads, backend
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def _heads(self, qkv: torch.Tensor):
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)   # 3 x (B, H, N, Dh)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        o = attention(*self._heads(self.qkv(x)), backend=self.attn_backend)          # (B, H, N, Dh)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))                         # (B, N, C)

    def jvp(self, x, dx) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, d out) for tangent dx of the last len(dx) samples (layers.tail)."""
        B, N, C = x.shape
        q, k, v = self._heads(self.qkv(x))                                            # (B, H, N, Dh)
        with torch.no_grad():
            dq, dk, dv = self._heads(F.linear(dx, self.qkv.weight))                   # (Bt, H, N, Dh)
        o, do = attention_tail_tangent(q, k, v, dq, dk, dv, self.attn_backend)          # (B | Bt, H, N, Dh)
        flat = lambda t: t.transpose(1, 2).reshape(t.shape[0], N, C)
        out = self.proj(flat(o))
        with torch.no_grad():
            return out, F.linear(flat(do), self.proj.weight)


class MLP(nn.Module):
    """fc2(gelu_tanh(fc1 x)), with biases."""

    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def jvp(self, x, dx) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.fc1(x)
        out = self.fc2(F.gelu(a, approximate="tanh"))
        with torch.no_grad():
            _, dg = gelu_tanh_jvp(tail(a, dx), F.linear(dx, self.fc1.weight))
            return out, F.linear(dg, self.fc2.weight)


class Block(nn.Module):
    """adaLN-Zero block: x += gate * branch(modulate(norm(x), shift, scale)), for attention and MLP."""

    shard_unit = True  # FSDP2 shards each block on its own (distributed.wrap_fsdp)

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        C = cfg.hidden_size
        self.norm1, self.norm2 = LayerNorm(), LayerNorm()
        self.attn = Attention(C, cfg.num_heads, cfg.attn_backend)
        self.mlp = MLP(C, int(C * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Linear(C, 6 * C)

    def forward(self, x: torch.Tensor, sc: torch.Tensor, dx: torch.Tensor | None = None,
                dsc: torch.Tensor | None = None):
        """x (B, N, C), sc = silu(c) (B, C) -> (B, N, C); with tangents dx, dsc of the last Bt
        samples, (out, d out) (`jvp`)."""
        if dx is not None:
            return self.jvp(x, dx, sc, dsc)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(sc).chunk(6, dim=-1)  # (B, C) x6
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))             # (B, N, C)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))           # (B, N, C)

    def jvp(self, x, dx, sc, dsc) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, d out) for tangents dx (Bt, N, C) and dsc (Bt, C) of the last Bt samples."""
        mod = self.adaLN_modulation(sc).chunk(6, dim=-1)                               # (B, C) x6
        with torch.no_grad():
            dmod = F.linear(dsc, self.adaLN_modulation.weight).chunk(6, dim=-1)       # (Bt, C) x6
        (shift1, scale1, gate1, shift2, scale2, gate2), (ds1, dc1, dg1, ds2, dc2, dg2) = mod, dmod
        for norm, branch, shift, scale, gate, dshift, dscale, dgate in (
                (self.norm1, self.attn, shift1, scale1, gate1, ds1, dc1, dg1),
                (self.norm2, self.mlp, shift2, scale2, gate2, ds2, dc2, dg2)):
            n, dn = norm.jvp(x, dx)
            m = modulate(n, shift, scale)
            a, da = branch.jvp(m, modulate_tangent(n, dn, shift, scale, dshift, dscale))
            out = x + gate[:, None] * a
            with torch.no_grad():
                dx = dx + dgate[:, None] * tail(a, da) + tail(gate, dgate)[:, None] * da
            x = out
        return x, dx


class FinalLayer(nn.Module):
    """adaLN (shift, scale) on the normalised tokens, then a linear to patch features."""

    def __init__(self, hidden: int, patch_dim: int):
        super().__init__()
        self.norm = LayerNorm()
        self.adaLN_modulation = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, patch_dim)

    def forward(self, x: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(sc).chunk(2, dim=-1)                      # (B, C) x2
        return self.linear(modulate(self.norm(x), shift, scale))                       # (B, N, p^n C)

    def jvp(self, x, dx, sc, dsc) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale = self.adaLN_modulation(sc).chunk(2, dim=-1)
        n, dn = self.norm.jvp(x, dx)
        out = self.linear(modulate(n, shift, scale))
        with torch.no_grad():
            dshift, dscale = F.linear(dsc, self.adaLN_modulation.weight).chunk(2, dim=-1)
            return out, F.linear(modulate_tangent(n, dn, shift, scale, dshift, dscale), self.linear.weight)


####################################################################################################
#                                             DiT                                                  #
####################################################################################################

class DiT(Backbone):
    """MeanFlow's DiT: u(z, t, h, y); conditions on t and h = t - r through adaLN-Zero."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.spec = Spec(heads="u", conditions_on_t=True, in_channels=cfg.in_channels, input_size=cfg.input_size,
                         num_classes=cfg.num_classes, num_tokens=cfg.num_tokens)
        C = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_dim, C)
        self.t_embedder = ScalarEmbedder(C)
        self.h_embedder = ScalarEmbedder(C)
        self.y_embedder = LabelEmbedder(cfg.num_classes, C)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(C, cfg.patch_dim)
        # Fixed, not learned (non-persistent); fp64 so that a .double() model is fp64-exact.
        self.register_buffer("pos_embed", sincos_embedding(cfg.grid, C), persistent=False)  # (N, C)
        self.compiled_blocks = False
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier linears with zero bias; N(0, 0.02) embedders; zero adaLN and output layers (DiT)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in (self.t_embedder, self.h_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for mod in [blk.adaLN_modulation for blk in self.blocks] + [self.final_layer.adaLN_modulation,
                                                                   self.final_layer.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def embed(self, z: torch.Tensor, c: Conditions) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens (B, N, C) and the condition c (B, C)."""
        x = self.x_embedder(patchify(z, self.cfg.patch_size))                          # (B, N, C)
        x = x + self.pos_embed.to(x.dtype)
        cond = self.t_embedder(c.t) + self.h_embedder(c.h) + self.y_embedder(c.y)      # (B, C)
        return x, cond

    def predict(self, z: torch.Tensor, c: Conditions, heads: str, tangent: Tangent | None) -> Prediction:
        x, cond = self.embed(z, c)
        sc = F.silu(cond)                                                              # (B, C)
        if tangent is not None:
            return self._predict_with_tangent(x, cond, sc, c, tangent)
        for blk in self.blocks:
            x = call_block(blk, self.compiled_blocks, x, sc)
        return Prediction(self._unpatchify(self.final_layer(x, sc)))

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        return unpatchify(tokens, self.cfg.patch_size, self.cfg.grid)                  # (B, C, *S)

    def _predict_with_tangent(self, x, cond, sc, c: Conditions, tangent: Tangent) -> Prediction:
        """u for all B samples, du along (dz, dt, dh) for the last Bt."""
        with torch.no_grad():
            dx = self.x_embedder.tangent(patchify(tangent.dz, self.cfg.patch_size))   # (Bt, N, C)
            dcond = (self.t_embedder.tangent(tail(c.t, tangent.dt), tangent.dt)
                     + self.h_embedder.tangent(tail(c.h, tangent.dh), tangent.dh))   # (Bt, C)
            _, dsc = silu_jvp(tail(cond, dcond), dcond)                               # (Bt, C)
            dsc = dsc.to(dx.dtype)
        for blk in self.blocks:
            x, dx = call_block(blk, self.compiled_blocks, x, sc, dx, dsc)
        out, dout = self.final_layer.jvp(x, dx, sc, dsc)
        with torch.no_grad():
            du = self._unpatchify(dout)
        return Prediction(self._unpatchify(out), None, du)
