"""MeanFlow objectives as pure functions: MF, iMF and pMF.

Every loss is `loss, metrics = *_loss(apply, params, x, y, gen, cfg)` with `apply =
fastmf.models.functional(model)`: `apply(params, z, t, h, omega, t_min, t_max, y, heads=...)`
returns the backbone contract's Prediction (fastmf/models/contract.py). All randomness of a
step is drawn first into a `Draws` record (`draw`), and `*_loss_from_draws` is a deterministic
function of (params, batch, draws), so tests can replay draws exactly. These functions follow the
reference code line by line; the fast train step (fastmf/train_step.py) is tested against them.
"""
import math
from dataclasses import dataclass, fields
from typing import Callable, Literal

import torch

from fastmf.models import VARIANTS, Conditions
from fastmf.models.xpred import clipped_t

TR_UNIFORM_FRACTION = 0.1  # pMF's tr_uniform share

# Reference values that differ by variant, for the ObjectiveConfig fields left None: MF
# (meanflow configs/default.py) data_proportion 0.75; iMF 0.5; pMF (B/16) P_mean = P_std = 0.8.
VARIANT_DEFAULTS = {
    "mf": dict(data_proportion=0.75, P_mean=-0.4, P_std=1.0),
    "imf": dict(data_proportion=0.5, P_mean=-0.4, P_std=1.0),
    "pmf": dict(data_proportion=0.5, P_mean=0.8, P_std=0.8),
}


@dataclass(frozen=True)
class ObjectiveConfig:
    """Loss hyperparameters. Fields left None take the variant's reference value."""
    variant: Literal["mf", "imf", "pmf"] = "imf"
    """Objective: original MeanFlow, improved MeanFlow (v-head, CFG trained in), pixel MeanFlow (x-prediction)."""
    num_classes: int = 1000
    """Number of classes (the null class is num_classes); the trainer takes it from the data."""
    P_mean: float | None = None
    """Logit-normal mean of t and r (default per variant: MF/iMF -0.4, pMF 0.8)."""
    P_std: float | None = None
    """Logit-normal std of t and r (default per variant: MF/iMF 1.0, pMF 0.8)."""
    data_proportion: float | None = None
    """Fraction of the batch with r = t, flow matching (default per variant: MF 0.75, iMF/pMF 0.5)."""
    norm_eps: float = 0.01
    """Adaptive weight L / sg((L + eps)^p): eps."""
    norm_p: float = 1.0
    """Adaptive weight L / sg((L + eps)^p): p."""
    class_dropout_prob: float = 0.1
    """Probability that a sample's label is replaced by the null class."""
    cfg_max: float | None = None
    """iMF/pMF: training omega drawn in [1, 1 + cfg_max] (default 7; 0 for data of one class, which has
    nothing to guide: its conditional and null-class fields are one field)."""
    cfg_beta: float = 1.0
    """iMF/pMF: omega's power-distribution exponent (1: log-uniform)."""
    mf_omega: float = 1.0
    """MF: training guidance v_g = w v + (1 - w - k) u(null) + k u(y) with u at r = t: w."""
    mf_kappa: float = 0.5
    """MF: k of that guidance (the official default w 1, k 0.5: effective scale w / (1 - k) = 2)."""
    mf_t_start: float = 0.0
    """MF: guidance applies where mf_t_start <= t <= mf_t_end (v_g = v elsewhere)."""
    mf_t_end: float = 1.0
    """MF: end of the guidance interval."""
    noise_scale: float = 1.0
    """Noise e ~ N(0, noise_scale^2) (pMF uses 2 at 256 px and up)."""
    lpips_lambda: float = 0.0
    """pMF: weight of the adaptively weighted LPIPS term (pMF's configs: 0.4; needs --lpips-weights)."""
    convnext_lambda: float = 0.0
    """pMF: weight of the adaptively weighted ConvNeXt-V2 feature term (pMF's configs: 0.1; needs --convnext-weights)."""
    perceptual_max_t: float = 1.0
    """pMF: the perceptual terms apply only where t < this (pMF B/16, L/16: 0.8)."""
    convnext_max_t: float | None = None
    """pMF: the ConvNeXt term's own gate (default: perceptual_max_t); pMF's H configs name 0.6."""
    perceptual_size: int = 224
    """pMF: the paired random resized crop's output size (224, the networks' training size)."""
    tr_uniform: bool = False
    """Draw (t, r) of 10% of the samples uniformly instead of logit-normal (pMF's H/16 and H/32 configs)."""

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for k, v in VARIANT_DEFAULTS[self.variant].items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name.replace('_', '-')} must be finite, got {value}")
        checks = [("data_proportion", 0 <= self.data_proportion <= 1, "in [0, 1]"),
                  ("P_std", self.P_std > 0, "> 0"), ("noise_scale", self.noise_scale > 0, "> 0"),
                  ("norm_eps", self.norm_eps >= 0, ">= 0"),
                  ("cfg_max", self.cfg_max is None or self.cfg_max >= 0, ">= 0"),
                  ("class_dropout_prob", 0 <= self.class_dropout_prob <= 1, "in [0, 1]"),
                  ("mf_t_start", 0 <= self.mf_t_start <= self.mf_t_end <= 1, "<= --mf-t-end, both in [0, 1]"),
                  ("num_classes", self.num_classes >= 1, ">= 1"),
                  ("lpips_lambda", self.lpips_lambda >= 0 and self.convnext_lambda >= 0, ">= 0, as --convnext-lambda"),
                  ("perceptual_size", self.perceptual_size >= 1, ">= 1"),
                  ("perceptual_max_t", 0 <= self.perceptual_max_t <= 1 and 0 <= (self.convnext_max_t or 0) <= 1,
                   "in [0, 1], as --convnext-max-t")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {want}, got {getattr(self, name)}")

    @property
    def omega_max(self) -> float:
        """cfg_max, or its default: 7, and 0 for one class. Resolved here, not in __post_init__:
        the trainer sets num_classes from the data after the command line is parsed."""
        if self.cfg_max is not None:
            return self.cfg_max
        return 0.0 if self.num_classes == 1 else 7.0


def uses_perceptual(cfg: ObjectiveConfig) -> bool:
    return cfg.variant == "pmf" and (cfg.lpips_lambda > 0 or cfg.convnext_lambda > 0)


def objective_defaults(variant: str, **overrides) -> ObjectiveConfig:
    """The reference configuration of `variant`, with overrides."""
    return ObjectiveConfig(variant=variant, **overrides)


####################################################################################################
#                                           Draws                                                  #
####################################################################################################

@dataclass
class Draws:
    """All random quantities of one step (shapes (B,) except e, which is like x)."""
    t: torch.Tensor
    r: torch.Tensor
    fm_mask: torch.Tensor      # bool: flow-matching samples, r = t
    e: torch.Tensor            # noise, already scaled by noise_scale
    omega: torch.Tensor
    t_min: torch.Tensor
    t_max: torch.Tensor
    drop_mask: torch.Tensor    # bool: class label replaced by the null class
    n_fm: int                  # the flow-matching samples are the first n_fm (the fast step relies on it)
    crop: torch.Tensor | None = None  # (B, 4) uniforms of the perceptual terms' paired crop (pMF only)


def _rand(shape, gen: torch.Generator, like: torch.Tensor, normal: bool) -> torch.Tensor:
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=gen, device=gen.device, dtype=torch.float32).to(like.device, like.dtype)


def sample_t_r(fm_mask: torch.Tensor, gen: torch.Generator, like: torch.Tensor, cfg: ObjectiveConfig):
    """t >= r (B,) for a batch whose fm_mask rows are flow matching (r = t), in the reference order.

    t and r are logit-normal; with tr_uniform (pMF H) 10% of the rows take independent uniforms for
    both instead. MF and iMF sort (t, r = max, min) and then set r = t on the flow-matching rows,
    whose t is so the larger of two draws; pMF sets r = t first and sorts after, so its
    flow-matching t is a single draw.
    """
    B = fm_mask.shape[0]
    t = torch.sigmoid(_rand((B,), gen, like, True) * cfg.P_std + cfg.P_mean)
    r = torch.sigmoid(_rand((B,), gen, like, True) * cfg.P_std + cfg.P_mean)
    if cfg.tr_uniform:
        uniform = _rand((B,), gen, like, False) < TR_UNIFORM_FRACTION
        t = torch.where(uniform, _rand((B,), gen, like, False), t)
        r = torch.where(uniform, _rand((B,), gen, like, False), r)
    if cfg.variant == "pmf":
        r = torch.where(fm_mask, t, r)
        return torch.maximum(t, r), torch.minimum(t, r)
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    return t, torch.where(fm_mask, t, r)


def sample_tr(B: int, gen: torch.Generator, like: torch.Tensor, cfg: ObjectiveConfig):
    """The first int(B * data_proportion) samples are flow matching: (t, r, fm_mask) by `sample_t_r`."""
    fm_mask = torch.arange(B, device=like.device) < int(B * cfg.data_proportion)
    return (*sample_t_r(fm_mask, gen, like, cfg), fm_mask)


def sample_omega(u: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """Power distribution on [1, 1 + cfg_max] from uniforms u (density ~ omega^-beta)."""
    log_top = math.log1p(cfg.omega_max)
    if cfg.cfg_beta == 1.0:
        return torch.exp(u * log_top)
    b = cfg.cfg_beta
    return torch.exp(torch.log1p(u * math.expm1((1 - b) * log_top)) / (1 - b))


def draw_conditions(fm_mask: torch.Tensor, gen: torch.Generator, like: torch.Tensor, cfg: ObjectiveConfig):
    """omega, t_min, t_max (B,) and the count of null-class samples num_drop ~ Binomial(B, p)."""
    B = fm_mask.shape[0]
    if cfg.variant == "mf":  # MF has no guidance inputs: neutral conditions
        t_min, t_max = torch.zeros(B, dtype=like.dtype, device=like.device), torch.ones(B, dtype=like.dtype, device=like.device)
        omega = torch.ones_like(t_min)
    else:
        t_min = torch.where(fm_mask, 0.0, 0.5 * _rand((B,), gen, like, False))
        t_max = torch.where(fm_mask, 1.0, 0.5 + 0.5 * _rand((B,), gen, like, False))
        omega = sample_omega(_rand((B,), gen, like, False), cfg)
    num_drop = (_rand((B,), gen, like, False) < cfg.class_dropout_prob).sum()
    return omega, t_min, t_max, num_drop


def draw(x: torch.Tensor, gen: torch.Generator, cfg: ObjectiveConfig) -> Draws:
    """Draw everything random for one step, in a fixed order (the reference layout: the first
    int(B * data_proportion) samples are flow matching, the first num_drop get the null class)."""
    B = x.shape[0]
    t, r, fm_mask = sample_tr(B, gen, x, cfg)
    e = _rand(x.shape, gen, x, True) * cfg.noise_scale
    omega, t_min, t_max, num_drop = draw_conditions(fm_mask, gen, x, cfg)
    drop_mask = torch.arange(B, device=x.device) < num_drop
    crop = _rand((B, 4), gen, x, False) if uses_perceptual(cfg) else None  # drawn last: other draws unchanged
    return Draws(t, r, fm_mask, e, omega, t_min, t_max, drop_mask, int(B * cfg.data_proportion), crop)


####################################################################################################
#                                         Helpers                                                  #
####################################################################################################

def bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against like (B, C, *S)."""
    return s.reshape(-1, *[1] * (like.dim() - 1))


def per_sample_sq(a: torch.Tensor) -> torch.Tensor:
    """Sum of squares over every non-batch dim: (B, ...) -> (B,)."""
    return a.pow(2).flatten(1).sum(1)


def adaptive_weight(loss: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """L / sg((L + eps)^p): every sample contributes about 1 whatever its scale."""
    return loss / (loss + cfg.norm_eps).pow(cfg.norm_p).detach()


def cond_uncond_v(apply: Callable, params: dict, z_t, t, omega, y, num_classes: int):
    """v-head at h = 0, t_min = 0, t_max = 1 in one doubled batch: conditional with omega,
    unconditional (null class) with omega = 1. Returns (v_c, v_u), no gradient."""
    with torch.no_grad():
        B = z_t.shape[0]
        c = Conditions.full(torch.cat([t, t]), torch.cat([y, torch.full_like(y, num_classes)]),
                            omega=torch.cat([omega, torch.ones_like(omega)]))
        vv = apply(params, torch.cat([z_t, z_t]), *c, heads="v").v                   # (2B, C, *S)
    return vv[:B], vv[B:]


def guidance(apply: Callable, params: dict, z_t, t, v_t, y, d: Draws, num_classes: int):
    """CFG target v_g and JVP tangent v_c from the v-head (iMF/pMF); no gradient flows.

    Pass 1: `cond_uncond_v`. Pass 2: conditional v with omega set to 1 outside [t_min, t_max]:
    the tangent. Flow-matching samples use pass 1's v_g (their interval is [0, 1]).
    """
    with torch.no_grad():
        ones = torch.ones_like(t)
        v_c, v_u = cond_uncond_v(apply, params, z_t, t, d.omega, y, num_classes)
        v_g_fm = v_t + bcast(1 - 1 / d.omega, v_t) * (v_c - v_u)
        w = torch.where((t >= d.t_min) & (t <= d.t_max), d.omega, ones)
        v_c = apply(params, z_t, *Conditions.full(t, y, omega=w), heads="v").v
        v_g = v_t + bcast(1 - 1 / w, v_t) * (v_c - v_u)
        v_g = torch.where(bcast(d.fm_mask, v_t), v_g_fm, v_g)
    return v_g, v_c


def interpolate(x: torch.Tensor, d: Draws, cfg: ObjectiveConfig):
    """z_t = (1 - t) x + t e and the conditional velocity v_t; returns (t as (B, 1, ...), z_t, v_t)."""
    tb = bcast(d.t, x)
    z_t = (1 - tb) * x + tb * d.e
    # pMF writes v_t through x so that v_t and the net's u share the clip of t (xpred.T_CLIP).
    v_t = (z_t - x) / clipped_t(d.t, x) if cfg.variant == "pmf" else d.e - x
    return tb, z_t, v_t


def perceptual_term(perceptual: Callable, pred_x: torch.Tensor, x: torch.Tensor, d: Draws, cfg: ObjectiveConfig):
    """pMF: sum over terms of lambda x adaptive_weight(distance) per sample, only where t < the term's
    gate (perceptual_max_t, pmf.py; convnext_max_t for ConvNeXt where set); returns ((B,), metrics)."""
    lambdas = {"lpips": cfg.lpips_lambda, "convnext": cfg.convnext_lambda}
    gates = {"lpips": cfg.perceptual_max_t,
             "convnext": cfg.perceptual_max_t if cfg.convnext_max_t is None else cfg.convnext_max_t}
    total, metrics = 0.0, {}
    for name, dist in perceptual(pred_x, x, d.crop).items():
        dist = torch.where(d.t < gates[name], dist, 0.0)
        total = total + lambdas[name] * adaptive_weight(dist, cfg)
        metrics[f"loss_{name}"] = dist.mean().detach()
    return total, metrics


def mf_guidance_weights(t: torch.Tensor, cfg: ObjectiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """MF's (w, k) per sample (B,): (mf_omega, mf_kappa) inside [mf_t_start, mf_t_end], (1, 0) outside."""
    inside = (t >= cfg.mf_t_start) & (t <= cfg.mf_t_end)
    # Tensors of t's dtype on both sides: a where() of two Python floats would round to float32.
    return (torch.where(inside, torch.full_like(t, cfg.mf_omega), torch.ones_like(t)),
            torch.where(inside, torch.full_like(t, cfg.mf_kappa), torch.zeros_like(t)))


def imf_uses_guidance(cfg: ObjectiveConfig) -> bool:
    """iMF/pMF draw omega > 1 for some samples; else omega is 1 and the CFG target v_g is v_t."""
    return cfg.omega_max > 0


def mf_uses_guidance(cfg: ObjectiveConfig) -> bool:
    return not (cfg.mf_omega == 1.0 and cfg.mf_kappa == 0.0)


def mf_guided_velocity(apply: Callable, params: dict, z_t, t, v_t, y, cfg: ObjectiveConfig):
    """MF target velocity v_g = w v_t + (1 - w - k) u(z_t, t, h=0 | null) + k u(z_t, t, h=0 | y)
    (meanflow.py guidance_fn), where the interval gives (w, k); v_t without guidance."""
    if not mf_uses_guidance(cfg):
        return v_t
    with torch.no_grad():  # the target's guidance from the net's own instantaneous velocity u(z, t, t)
        B = z_t.shape[0]
        c = Conditions.full(torch.cat([t, t]), torch.cat([torch.full_like(y, cfg.num_classes), y]))
        uu = apply(params, torch.cat([z_t, z_t]), *c, heads="u").u                   # (2B, C, *S)
        w, k = mf_guidance_weights(t, cfg)
    return bcast(w, v_t) * v_t + bcast(1 - w - k, v_t) * uu[:B] + bcast(k, v_t) * uu[B:]


def null_dropped(y, d: Draws, num_classes: int):
    """The labels the net sees: dropped samples get the null class."""
    return torch.where(d.drop_mask, num_classes, y)


def drop_labels(y, v_t, v_g, d: Draws, num_classes: int):
    """Dropped samples condition on the null class and regress the unguided v_t."""
    return null_dropped(y, d, num_classes), torch.where(bcast(d.drop_mask, v_t), v_t, v_g)


####################################################################################################
#                                         Objectives                                               #
####################################################################################################

def imf_loss_from_draws(apply: Callable, params: dict, x: torch.Tensor, y: torch.Tensor, d: Draws,
                        cfg: ObjectiveConfig, perceptual: Callable | None = None):
    """iMF (and pMF) loss for fixed draws: compound V = u + (t - r) sg(du/dt) against v_g.

    Args:
        x: (B, C, *S) data; y: (B,) int64 labels.
        perceptual: pMF only, `perceptual(pred_x, x, crop) -> {"lpips": (B,), "convnext": (B,)}` (the
            distances fastmf.perceptual.Perceptual gives), or None.
    Returns:
        loss (scalar), metrics dict of detached scalars.
    """
    t, r = d.t, d.r
    tb, z_t, v_t = interpolate(x, d, cfg)
    v_g, v_c = guidance(apply, params, z_t, t, v_t, y, d, cfg.num_classes)
    y_in, v_g = drop_labels(y, v_t, v_g, d, cfg.num_classes)

    def u_fn(z, t_, r_):
        u, v = apply(params, z, t_, t_ - r_, d.omega, d.t_min, d.t_max, y_in, heads="uv")
        return u, v  # u is differentiated; v rides along as aux (primal only)

    # Tangent (v_c, 1, 0): the total derivative d/dt along the conditional flow.
    u, du_dt, v = torch.func.jvp(u_fn, (z_t, t, r), (v_c, torch.ones_like(t), torch.zeros_like(r)),
                                 has_aux=True)
    V = u + bcast(t - r, u) * du_dt.detach()     # stop-grad: du/dt is part of the target
    v_g = v_g.detach()                           # stop-grad: the regression target
    loss_u = adaptive_weight(per_sample_sq(V - v_g), cfg)
    loss_v = adaptive_weight(per_sample_sq(v - v_g), cfg)
    loss = loss_u + loss_v
    metrics = {"loss_u": (V - v_g).pow(2).mean().detach(), "loss_v": (v - v_g).pow(2).mean().detach()}
    if perceptual is not None and uses_perceptual(cfg):
        term, perceptual_metrics = perceptual_term(perceptual, z_t - tb * u, x, d, cfg)   # pred_x = z_t - t u
        loss, metrics = loss + term, metrics | perceptual_metrics
    loss = loss.mean()
    metrics["loss"] = loss.detach()
    return loss, metrics


def mf_loss_from_draws(apply: Callable, params: dict, x: torch.Tensor, y: torch.Tensor, d: Draws,
                       cfg: ObjectiveConfig):
    """Original MeanFlow loss for fixed draws: u against sg(v_g - clip(t - r, 0, 1) du/dt)."""
    t, r = d.t, d.r
    _, z_t, v_t = interpolate(x, d, cfg)
    v_g = mf_guided_velocity(apply, params, z_t, t, v_t, y, cfg)
    y_in, v_g = drop_labels(y, v_t, v_g, d, cfg.num_classes)

    def u_fn(z, t_, r_):
        return apply(params, z, t_, t_ - r_, d.omega, d.t_min, d.t_max, y_in, heads="u").u

    u, du_dt = torch.func.jvp(u_fn, (z_t, t, r), (v_g, torch.ones_like(t), torch.zeros_like(r)))
    u_tgt = (v_g - bcast((t - r).clamp(0, 1), u) * du_dt).detach()   # stop-grad target
    loss = adaptive_weight(per_sample_sq(u - u_tgt), cfg).mean()
    return loss, {"loss": loss.detach(), "loss_u": (u - u_tgt).pow(2).mean().detach()}


def _check(x: torch.Tensor, y: torch.Tensor, cfg: ObjectiveConfig, variant: str):
    if cfg.variant != variant:
        raise ValueError(f"{variant}_loss got a config for variant {cfg.variant!r}")
    if x.dim() not in (4, 5) or y.shape != x.shape[:1]:
        raise ValueError(f"expected x (B, C, H, W) or (B, C, D, H, W) and y (B,), got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")


def mf_loss(apply: Callable, params: dict, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
            cfg: ObjectiveConfig):
    """MeanFlow loss (Geng et al.): draws then `mf_loss_from_draws`."""
    _check(x, y, cfg, "mf")
    return mf_loss_from_draws(apply, params, x, y, draw(x, gen, cfg), cfg)


def imf_loss(apply: Callable, params: dict, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
             cfg: ObjectiveConfig):
    """Improved MeanFlow loss: v-head tangent, CFG trained in, loss_u + loss_v."""
    _check(x, y, cfg, "imf")
    return imf_loss_from_draws(apply, params, x, y, draw(x, gen, cfg), cfg)


def pmf_loss(apply: Callable, params: dict, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
             cfg: ObjectiveConfig, perceptual: Callable | None = None):
    """Pixel MeanFlow loss: the iMF loss with x-prediction in the net and optional perceptual term."""
    _check(x, y, cfg, "pmf")
    return imf_loss_from_draws(apply, params, x, y, draw(x, gen, cfg), cfg, perceptual)


LOSSES = {"mf": mf_loss, "imf": imf_loss, "pmf": pmf_loss}
# Deterministic given the draws: what a compiled train step wraps (draws stay eager).
LOSSES_FROM_DRAWS = {"mf": mf_loss_from_draws, "imf": imf_loss_from_draws, "pmf": imf_loss_from_draws}
