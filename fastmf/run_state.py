"""The run state: everything a training run needs to continue exactly, saved and restored as one.

Params, their EMAs, the optimizer and the step. There is no other state: the data order and
every random draw of a step derive from (seed, step) (data.EpochSampler, global_batch.draw_rows).
"""
import torch

from fastmf.ckpt import flatten_state, load_optimizer_state, optimizer_state_to_tensors, unflatten_state


def warmup_constant_lr(step: int, peak: float, warmup_steps: int) -> float:
    """Linear warmup to `peak` over `warmup_steps`, then constant (the references' schedule)."""
    return peak * min(1.0, (step + 1) / warmup_steps) if warmup_steps else peak


def ema_decay(step: int, ema: float) -> float:
    """Constant decay `ema`, warmed up as (1 + step) / (10 + step) so that the initial weights do
    not linger in short runs."""
    return min(ema, (1 + step) / (10 + step))


def ema_name(halflife_kimg: float) -> str:
    """The checkpoint group (and sample.py --weights) name of a power-function EMA: ema_1000, ema_2p5."""
    return f"ema_{halflife_kimg:g}".replace(".", "p")


class RunState:
    """params (name -> trainable tensor), their EMAs, the optimizer over params, the step.

    EMAs: "ema", the constant-decay one, and one power-function EMA per half-life (optim.power_ema_beta,
    pMF's "edm" EMAs), all kept at once; each is saved.
    """

    def __init__(self, params: dict[str, torch.Tensor], opt, halflives_kimg: tuple = ()):
        self.params, self.opt, self.step, self.halflives = params, opt, 0, tuple(halflives_kimg)
        self.emas = {name: {k: v.detach().clone() for k, v in params.items()}
                     for name in ["ema", *map(ema_name, self.halflives)]}

    @property
    def ema(self) -> dict[str, torch.Tensor]:
        return self.emas["ema"]

    @torch.no_grad()
    def update_emas(self, decay: float, batch_size: int, rampup: float):
        """One step of every EMA: "ema" with `decay`, the power-function ones by their half-lives."""
        from fastmf.optim import power_ema_beta
        decays = [decay] + [power_ema_beta(self.step + 1, h, batch_size, rampup) for h in self.halflives]
        for ema, d in zip(self.emas.values(), decays):
            torch._foreach_lerp_(list(ema.values()), list(self.params.values()), 1 - d)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON meta) for ckpt.save_checkpoint; CPU tensors alias the live state (write them
        before the next step)."""
        opt_tensors, opt_meta = optimizer_state_to_tensors(self.opt, names=list(self.params))
        tensors = flatten_state({"params": self.params, **self.emas, "opt": opt_tensors})
        return {k: v.detach().cpu() for k, v in tensors.items()}, {"step": self.step, "opt": opt_meta}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict):
        """Restore from what state_dict gave; a checkpoint of another model is a one-line ValueError."""
        groups = unflatten_state(tensors)
        for group in ("params", *self.emas):
            saved = groups.get(group, {})
            missing, unexpected = sorted(set(self.params) - set(saved)), sorted(set(saved) - set(self.params))
            if missing or unexpected:
                raise ValueError(f"checkpoint {group} do not fit this model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            bad = [k for k, v in saved.items() if v.shape != self.params[k].shape]
            if bad:
                raise ValueError(f"checkpoint {group} have other shapes than this model: {bad[0]} is "
                                 f"{tuple(saved[bad[0]].shape)}, the model's {tuple(self.params[bad[0]].shape)}")
            nonfinite = [k for k, v in saved.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if nonfinite:
                raise ValueError(f"checkpoint {group} hold non-finite values ({nonfinite[0]}, ...): refused")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(groups["params"][k])
                for name, ema in self.emas.items():
                    ema[k].copy_(groups[name][k])
        load_optimizer_state(self.opt, groups.get("opt", {}), meta["opt"], names=list(self.params))
        self.step = int(meta["step"])
