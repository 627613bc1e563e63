"""The backbone contract: what a MeanFlow network takes, what it returns, what it has.

Every backbone is a `Backbone` (an nn.Module) with a `spec` and one method, `predict`:

    pred = model(z, t, h, omega, t_min, t_max, y)                  # official positional order
    u, v = pred                                                    # unpacks as (u, v)
    pred = model(z, *cond, heads="u", tangent=Tangent(dz, dt, dh))  # pred.u, pred.du

z is (B, C, *S); the conditions (`Conditions`, each (B,)) are t, h = t - r, the CFG scale omega and
interval [t_min, t_max], and the label y (num_classes = the null class). `heads` picks the outputs
("u", "v" or "uv", default all the backbone has); the others are None. With a `tangent` for the
last Bt <= B samples the same pass also returns du (Bt, C, *S), the exact directional derivative
of u along (dz, dt, dh) for those samples, by hand-written rules (stop-grad: no autograd graph),
while u and v keep their graph: one with-grad pass can carry du/dt (fastmf.train_step).
`torch.func.jvp` through the plain call is exact too (attention goes through kernels.attention).
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils._pytree import register_dataclass

HEADS = ("u", "v", "uv")


class Conditions(NamedTuple):
    """Per-sample inputs besides z, each (B,), in the official argument order."""
    t: torch.Tensor        # time, 1 = noise (only backbones with conditions_on_t and x-prediction read it)
    h: torch.Tensor        # t - r
    omega: torch.Tensor    # CFG scale the net is asked for (1: none)
    t_min: torch.Tensor    # CFG interval
    t_max: torch.Tensor
    y: torch.Tensor        # int64 labels, num_classes = null class

    @classmethod
    def full(cls, t: torch.Tensor, y: torch.Tensor, h=0.0, omega=1.0, t_min=0.0, t_max=1.0) -> "Conditions":
        """Conditions for t (B,) and y (B,); the rest scalars or (B,), broadcast to (B,)."""
        col = lambda s: torch.as_tensor(s, dtype=t.dtype, device=t.device).expand(t.shape)
        return cls(t, col(h), col(omega), col(t_min), col(t_max), y)


class Tangent(NamedTuple):
    """A direction for the last Bt samples: dz (Bt, C, *S), dt (Bt,), dh (Bt,)."""
    dz: torch.Tensor
    dt: torch.Tensor
    dh: torch.Tensor


@dataclass
class Prediction:
    """What a backbone returns; iterates as (u, v) so `u, v = model(...)` keeps working.
    A registered pytree, so torch.func transforms and torch.compile pass it through."""
    u: torch.Tensor | None
    v: torch.Tensor | None = None
    du: torch.Tensor | None = None

    def __iter__(self):
        yield self.u
        yield self.v

    def __getitem__(self, i: int):
        return (self.u, self.v)[i]


register_dataclass(Prediction)


@dataclass(frozen=True)
class Spec:
    """What a backbone has: its heads, whether it reads t, and its input."""
    heads: str                      # "u" or "uv"
    conditions_on_t: bool
    in_channels: int
    input_size: tuple[int, ...]     # 2 ints: images; 3: volumes
    num_classes: int
    num_tokens: int                 # sequence length the blocks see


@dataclass
class PatchInput:
    """The fields every patch-based backbone config starts with: the input and its patching."""
    input_size: tuple[int, ...] = (32, 32)   # 2 ints: images; 3 ints: volumes
    patch_size: int = 2
    in_channels: int = 4

    def __post_init__(self):
        self.input_size = tuple(int(s) for s in self.input_size)
        if len(self.input_size) not in (2, 3):
            raise ValueError(f"input_size must have 2 (image) or 3 (volume) ints, got {self.input_size}")
        if self.patch_size < 1 or any(s % self.patch_size for s in self.input_size):
            raise ValueError(f"patch_size {self.patch_size} does not divide input_size {self.input_size}")

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(s // self.patch_size for s in self.input_size)

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** len(self.input_size) * self.in_channels


class Backbone(nn.Module):
    """Base of every network: checks the call against `spec`, then `predict` does the work."""

    spec: Spec

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, omega: torch.Tensor,
                t_min: torch.Tensor, t_max: torch.Tensor, y: torch.Tensor, heads: str | None = None,
                tangent: Tangent | None = None) -> Prediction:
        c = Conditions(t, h, omega, t_min, t_max, y)
        heads = self.spec.heads if heads is None else heads
        check_call(self.spec, z, c, heads, tangent)
        return self.predict(z, c, heads, tangent)

    def predict(self, z: torch.Tensor, c: Conditions, heads: str, tangent: Tangent | None) -> Prediction:
        raise NotImplementedError

    def set_attention_backend(self, backend: str):
        """Switch every attention layer's backend ("torch", "triton", "sdpa", "auto")."""
        for m in self.modules():
            if hasattr(m, "attn_backend"):
                m.attn_backend = backend

    def compile_blocks(self, enabled: bool = True):
        """Run each transformer block through torch.compile (regional compilation): one compiled
        forward and JVP rule serve all blocks. For the fast loss; leave off under torch.func or
        an outer torch.compile."""
        for m in self.modules():
            if hasattr(m, "compiled_blocks"):
                m.compiled_blocks = enabled


def functional(model: nn.Module):
    """`apply(params, z, t, h, omega, t_min, t_max, y, heads=, tangent=) -> Prediction`: the model
    called statelessly on `params` (torch.func.functional_call), as the objectives take it."""
    return lambda params, *args, **kwargs: torch.func.functional_call(model, params, args, kwargs)


def check_call(spec: Spec, z: torch.Tensor, c: Conditions, heads: str, tangent: Tangent | None):
    """One-line errors for calls the backbone cannot take."""
    if heads not in HEADS or any(hd not in spec.heads for hd in heads):
        raise ValueError(f"heads must be one of {[h for h in HEADS if set(h) <= set(spec.heads)]} for this "
                         f"backbone (it has heads {spec.heads!r}), got {heads!r}")
    if tuple(z.shape[1:]) != (spec.in_channels, *spec.input_size):
        raise ValueError(f"the model expects input (B, {spec.in_channels}, {', '.join(map(str, spec.input_size))}), "
                         f"got {tuple(z.shape)}")
    if any(s.shape != z.shape[:1] for s in c):
        raise ValueError(f"t, h, omega, t_min, t_max and y must have shape (B,) = ({z.shape[0]},), "
                         f"got {[tuple(s.shape) for s in c]}")
    if tangent is not None:
        Bt = tangent.dz.shape[0]
        if "u" not in heads:
            raise ValueError(f"a tangent needs the u-head: heads must contain 'u', got {heads!r}")
        if (tangent.dz.shape[1:] != z.shape[1:] or tangent.dt.shape != (Bt,) or tangent.dh.shape != (Bt,)
                or Bt > z.shape[0]):
            raise ValueError(f"tangent (dz, dt, dh) must be ((Bt, *z.shape[1:]), (Bt,), (Bt,)) with Bt <= "
                             f"{z.shape[0]}; got {tuple(tangent.dz.shape)}, {tuple(tangent.dt.shape)}, "
                             f"{tuple(tangent.dh.shape)}")
    # Value checks read the values: only for CPU tensors outside compiled code, so that a GPU step
    # never waits on a device sync (training draws and sampling times are valid by construction),
    # and not for fake tensors (bench/step_memory.py), which have shapes but no values.
    if c.t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(c.t):
        if bool(((c.t < 0) | (c.t > 1)).any()):
            raise ValueError(f"t must lie in [0, 1], got values in [{c.t.min().item():.4g}, {c.t.max().item():.4g}]")
        if bool(((c.y < 0) | (c.y > spec.num_classes)).any()):
            raise ValueError(f"labels must lie in [0, {spec.num_classes}] ({spec.num_classes} = null class)")

