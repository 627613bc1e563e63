"""Optimizers and weight averages: Adam, pMF's Muon + Adam, and power-function ("edm") EMAs.

pMF trains with optax.contrib.muon: Muon on the weight matrices, Adam on the rest. Its partition
is by array rank (ndim == 2), on the official layouts: every dense kernel goes to Muon, while the
patch embedding (a p x p conv there), the condition-token tables and position embedding (3D
there) and everything 1D go to Adam. Here: the weights of nn.Linear layers outside the patch
embedding go to Muon (torch.optim.Muon, optax's defaults: momentum 0.95, Nesterov, 5
Newton-Schulz steps, eps 1e-8, no weight decay, lr times sqrt(max(1, fan_out / fan_in))); the rest
to Adam (b1 0.9, b2 0.95; optax's Adam branch there is Nesterov Adam, torch has none: plain Adam).
"""

import torch
import torch.nn as nn


def muon_names(model: nn.Module) -> set[str]:
    """Names of the parameters Muon takes: nn.Linear weights outside the patch embedding."""
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".x_embedder" not in f".{mod_name}":
            names.add(f"{mod_name}.weight" if mod_name else "weight")
    return names


class MuonWithAdam:
    """torch.optim.Muon on some parameters and Adam on the others, stepped, zeroed, saved and
    loaded as one optimizer (its state_dict is torch's format: Muon's parameters first)."""

    def __init__(self, named: dict[str, torch.Tensor], muon: set[str], lr: float, betas: tuple, fused: bool):
        self.names = [k for k in named if k in muon] + [k for k in named if k not in muon]
        self.n_muon = sum(k in muon for k in named)
        self.muon = torch.optim.Muon([named[k] for k in self.names[:self.n_muon]], lr=lr, weight_decay=0.0,
                                     momentum=0.95, nesterov=True, eps=1e-8, ns_steps=5, adjust_lr_fn="original")
        self.adam = torch.optim.Adam([named[k] for k in self.names[self.n_muon:]], lr=lr, betas=betas, fused=fused)

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adam.param_groups

    def step(self):
        self.muon.step()
        self.adam.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adam.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        m, a = self.muon.state_dict(), self.adam.state_dict()
        shift = lambda g: g | {"params": [i + self.n_muon for i in g["params"]]}
        return {"state": m["state"] | {i + self.n_muon: s for i, s in a["state"].items()},
                "param_groups": m["param_groups"] + [shift(g) for g in a["param_groups"]]}

    def load_state_dict(self, sd: dict):
        (gm,), (ga,) = sd["param_groups"][:1], sd["param_groups"][1:]
        self.muon.load_state_dict({"state": {i: s for i, s in sd["state"].items() if i < self.n_muon},
                                   "param_groups": [gm]})
        self.adam.load_state_dict({"state": {i - self.n_muon: s for i, s in sd["state"].items() if i >= self.n_muon},
                                   "param_groups": [ga | {"params": [i - self.n_muon for i in ga["params"]]}]})


def make_optimizer(kind: str, model: nn.Module, named: dict[str, torch.Tensor], lr: float, betas: tuple,
                   fused: bool) -> tuple[object, dict[str, torch.Tensor]]:
    """(optimizer, the parameters in the optimizer's order) for --optimizer adam|muon."""
    if kind == "adam":
        # fused: the update is a few kernels instead of several per parameter (CUDA launch overhead)
        return torch.optim.Adam(named.values(), lr=lr, betas=betas, fused=fused), named
    opt = MuonWithAdam(named, muon_names(model), lr, betas, fused)
    return opt, {k: named[k] for k in opt.names}


def power_ema_beta(step: int, halflife_kimg: float, batch_size: int, rampup: float = 0.05) -> float:
    """pMF's "edm" EMA decay after `step` steps: the half-life (in thousands of samples) is ramped
    up as rampup x the samples seen so far: beta = 0.5 ^ (B / max(min(h * 1000, step * B * rampup), 1e-8))."""
    halflife = min(halflife_kimg * 1000, step * batch_size * rampup)
    return 0.5 ** (batch_size / max(halflife, 1e-8))
