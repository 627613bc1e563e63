"""The fast MeanFlow loss: same value and gradients as fastmf.objectives, less work and memory.

What differs from the reference computation (each exact, see tests/test_train_step.py):
- No tangent graph, no second pass for it. `torch.func.jvp` records the tangent ops in the
  autograd graph although du/dt is stop-grad (pytorch issue 151782), doubling activation memory.
  Here one with-grad pass gives u and v for the batch and, by MiT's hand-written JVP rules
  (`tangents=...`: explicit rules, no dual tensors, tangent ops outside autograd), du/dt for the
  samples that need it, reusing that pass's primal activations.
- No work whose result is known. The first n_fm = int(B * data_proportion) samples are
  flow-matching samples (r = t): their compound V = u + 0 * du/dt = u needs no tangent; their
  CFG interval is [0, 1], so the interval-masked guidance pass equals the conditional one for
  them; and that conditional pass has exactly the with-grad pass's inputs (h = 0), so it is
  that pass's v, detached. The reference's three v-head passes of B samples each (3B) shrink
  to one no-grad call of B + (B - n_fm): the unconditional v for all, the masked conditional v
  for the others. The tangent is carried for those B - n_fm samples only (a static size, so
  compiled graphs stay static).
- The loss tail (compound V, squared error per sample, adaptive weight) is one fused kernel
  (kernels.adaptive_sq_loss) forward and backward.
"""
from typing import Callable

import torch

from kernels import adaptive_sq_loss
from fastmf.objectives import (Draws, ObjectiveConfig, adaptive_weight, bcast, draw, drop_labels,
                               interpolate, mf_guided_velocity, null_dropped)


def fast_guidance(apply: Callable, params: dict, z_t, t, y, d: Draws, n_fm: int, num_classes: int):
    """The guidance v-head passes the with-grad pass cannot stand in for: one call, B + (B - n_fm) samples.

    Returns v_u (B, C, *S), the unconditional v (null class, omega 1); v_m (B - n_fm, C, *S), the
    conditional v of samples n_fm: with omega set to 1 outside their interval [t_min, t_max] (the
    JVP tangent and guidance of those samples); and that scale w (B,).
    """
    with torch.no_grad():
        B = z_t.shape[0]
        s = slice(n_fm, B)
        ones = torch.ones_like(t)
        w = torch.where((t >= d.t_min) & (t <= d.t_max), d.omega, ones)
        tt = torch.cat([t, t[s]])                                                     # (2B - n_fm,)
        _, vv = apply(params, torch.cat([z_t, z_t[s]]), tt, torch.zeros_like(tt), torch.cat([ones, w[s]]),
                      torch.zeros_like(tt), torch.ones_like(tt),
                      torch.cat([torch.full_like(y, num_classes), y[s]]), heads="v")
    return vv[:B], vv[B:], w


def forward_with_du_dt(apply: Callable, params: dict, z_t, t, r, tangent, cond: tuple, n_fm: int, heads: str):
    """The with-grad pass (u, and v for heads="uv") that also carries du/dt along (tangent, 1, 0)
    for samples n_fm: (zeros for the rest; stop-grad). `tangent`: (B - n_fm, C, *S) for those samples.

    Returns (u, v, du_dt); v is None for heads="u".
    """
    B = z_t.shape[0]
    args = (params, z_t, t, t - r, *cond)
    if n_fm == B:  # all flow matching: no tangent anywhere
        u, v = apply(*args, heads=heads)
        return u, v, torch.zeros_like(z_t)
    ones = torch.ones_like(t[n_fm:])
    # The model's hand-written JVP: tangents (dz, dt, dh) = (tangent, 1, 1 - 0) for the last B - n_fm.
    out = apply(*args, heads=heads, tangents=(tangent, ones, ones))
    u, v, du = (out[0], None, out[1]) if heads == "u" else out
    return u, v, torch.cat([du.new_zeros(n_fm, *du.shape[1:]), du])


def fast_imf_loss_from_draws(apply: Callable, params: dict, x: torch.Tensor, y: torch.Tensor, d: Draws,
                             cfg: ObjectiveConfig, perceptual: Callable | None = None,
                             loss_backend: str = "auto"):
    """iMF / pMF loss, equal to objectives.imf_loss_from_draws (draws from objectives.draw)."""
    B = x.shape[0]
    n_fm = int(B * cfg.data_proportion)
    t, r = d.t, d.r
    tb, z_t, v_t = interpolate(x, d, cfg)
    y_in = null_dropped(y, d, cfg.num_classes)
    v_u, v_m, w = fast_guidance(apply, params, z_t, t, y, d, n_fm, cfg.num_classes)
    u, v, du_dt = forward_with_du_dt(apply, params, z_t, t, r, v_m, (d.omega, d.t_min, d.t_max, y_in), n_fm, "uv")
    with torch.no_grad():
        # The reference's conditional guidance pass for FM samples has exactly the with-grad pass's
        # inputs (h = 0, interval [0, 1], label y) wherever its result is used (dropped samples
        # regress v_t), and their w equals omega: their v_c is v, detached.
        v_c = torch.cat([v[:n_fm], v_m])                                              # (B, C, *S)
        v_g = v_t + bcast(1 - 1 / w, v_t) * (v_c - v_u)
        v_g = torch.where(bcast(d.drop_mask, v_t), v_t, v_g)
    loss_u, raw_u = adaptive_sq_loss(u, v_g, du_dt, t - r, eps=cfg.norm_eps, p=cfg.norm_p, backend=loss_backend)
    loss_v, raw_v = adaptive_sq_loss(v, v_g, eps=cfg.norm_eps, p=cfg.norm_p, backend=loss_backend)
    loss = loss_u + loss_v
    n = x[0].numel()
    metrics = {"loss_u": raw_u.mean() / n, "loss_v": raw_v.mean() / n}
    if perceptual is not None and cfg.variant == "pmf":
        dist = torch.where(t < cfg.perceptual_max_t, perceptual(z_t - tb * u, x), 0.0)
        loss = loss + cfg.perceptual_weight * adaptive_weight(dist, cfg)
        metrics["loss_perceptual"] = dist.mean().detach()
    loss = loss.mean()
    metrics["loss"] = loss.detach()
    return loss, metrics


def fast_mf_loss_from_draws(apply: Callable, params: dict, x: torch.Tensor, y: torch.Tensor, d: Draws,
                            cfg: ObjectiveConfig, loss_backend: str = "auto"):
    """Original MeanFlow loss, equal to objectives.mf_loss_from_draws."""
    B = x.shape[0]
    n_fm = int(B * cfg.data_proportion)
    t, r = d.t, d.r
    _, z_t, v_t = interpolate(x, d, cfg)
    v_g = mf_guided_velocity(apply, params, z_t, t, v_t, y, d, cfg)
    y_in, v_g = drop_labels(y, v_t, v_g, d, cfg.num_classes)
    u, _, du_dt = forward_with_du_dt(apply, params, z_t, t, r, v_g[n_fm:], (d.omega, d.t_min, d.t_max, y_in), n_fm, "u")
    # (u - sg(v_g - c du/dt))^2 = (u + c du/dt - v_g)^2 with c = clip(t - r, 0, 1)
    loss, raw = adaptive_sq_loss(u, v_g, du_dt, (t - r).clamp(0, 1), eps=cfg.norm_eps, p=cfg.norm_p,
                                 backend=loss_backend)
    loss = loss.mean()
    return loss, {"loss": loss.detach(), "loss_u": raw.mean() / x[0].numel()}


def fast_loss_from_draws(apply: Callable, params: dict, x: torch.Tensor, y: torch.Tensor, d: Draws,
                         cfg: ObjectiveConfig, loss_backend: str = "auto", perceptual: Callable | None = None):
    """The fast loss of cfg.variant for given draws: what a train step compiles (draws stay eager:
    dynamo cannot trace sampling with an explicit torch.Generator)."""
    if cfg.variant == "mf":
        return fast_mf_loss_from_draws(apply, params, x, y, d, cfg, loss_backend)
    return fast_imf_loss_from_draws(apply, params, x, y, d, cfg, perceptual, loss_backend)


def fast_loss(apply: Callable, params: dict, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
              cfg: ObjectiveConfig, loss_backend: str = "auto", perceptual: Callable | None = None):
    """Draw, then the fast loss of cfg.variant: a drop-in for objectives.LOSSES[cfg.variant]."""
    return fast_loss_from_draws(apply, params, x, y, draw(x, gen, cfg), cfg, loss_backend, perceptual)
