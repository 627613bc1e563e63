"""The fast MeanFlow loss: same value and gradients as fastmf.objectives, less work and memory.

What differs from the reference computation (each exact, see tests/test_train_step.py):
- No tangent graph, no second pass for it. `torch.func.jvp` records the tangent ops in the
  autograd graph although du/dt is stop-grad (pytorch issue 151782), doubling activation memory.
  Here one with-grad pass gives u (and v) for the batch and, by the backbone's hand-written JVP
  rules (`tangent=Tangent(...)` in the backbone contract: no dual tensors, tangent ops outside
  autograd), du/dt for the samples that need it, reusing that pass's primal activations.
- No work whose result is known. The first n_fm samples (`Draws.n_fm`) are flow-matching
  samples (r = t): their target needs no tangent, their CFG interval is [0, 1],
  and a guidance pass at h = 0 with their own label has exactly the with-grad pass's inputs, so
  its result is that pass's output, detached. iMF: the reference's three v-head passes of B
  samples each (3B) shrink to one no-grad call of B + (B - n_fm) (the unconditional v for all,
  the interval-masked conditional v for the others), and to B - n_fm without CFG (omega 1
  throughout: one class, or --cfg-max 0). MF with kappa: the reference's 2B u-passes
  shrink to B + (B - n_fm). The tangent is carried for the B - n_fm samples only (a static size,
  so compiled graphs stay static).
- The loss tail (compound V, squared error per sample, adaptive weight) is one fused kernel
  (kernels.adaptive_sq_loss) forward and backward.
"""
from typing import Callable

import torch

from kernels import adaptive_sq_loss
from fastmf.models import Conditions, Tangent
from fastmf.objectives import (Draws, ObjectiveConfig, bcast, draw, imf_uses_guidance, interpolate,
                               mf_guidance_weights, mf_uses_guidance, null_dropped, perceptual_term,
                               uses_perceptual)


def fast_guidance(apply: Callable, params: dict, z_t, t, y, d: Draws, n_fm: int, num_classes: int,
                  guided: bool = True):
    """The guidance v-head passes the with-grad pass cannot stand in for: one call, B + (B - n_fm) samples,
    or B - n_fm where omega is 1 throughout (not `guided`: v_g is v_t, no unconditional v is needed).

    Returns v_u (B, C, *S), the unconditional v (null class, omega 1), None if not guided; v_m
    (B - n_fm, C, *S), the conditional v of samples n_fm: with omega set to 1 outside their interval
    [t_min, t_max] (the JVP tangent and guidance of those samples); and that scale w (B,).
    """
    with torch.no_grad():
        B = z_t.shape[0]
        s = slice(n_fm, B)
        ones = torch.ones_like(t)
        w = torch.where((t >= d.t_min) & (t <= d.t_max), d.omega, ones)
        if not guided:
            v_m = apply(params, z_t[s], *Conditions.full(t[s], y[s], omega=w[s]), heads="v").v if n_fm < B else z_t[s]
            return None, v_m, w
        c = Conditions.full(torch.cat([t, t[s]]), torch.cat([torch.full_like(y, num_classes), y[s]]),
                            omega=torch.cat([ones, w[s]]))
        vv = apply(params, torch.cat([z_t, z_t[s]]), *c, heads="v").v             # (2B - n_fm, C, *S)
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
    # d/dt along the flow: (dz, dt, dh) = (tangent, 1, 1 - 0) for the last B - n_fm samples.
    p = apply(*args, heads=heads, tangent=Tangent(tangent, ones, ones))
    return p.u, p.v, torch.cat([p.du.new_zeros(n_fm, *p.du.shape[1:]), p.du])


def fast_imf_loss_from_draws(apply: Callable, params: dict, x: torch.Tensor, y: torch.Tensor, d: Draws,
                             cfg: ObjectiveConfig, perceptual: Callable | None = None,
                             loss_backend: str = "auto"):
    """iMF / pMF loss, equal to objectives.imf_loss_from_draws (draws from objectives.draw)."""
    n_fm = d.n_fm
    t, r = d.t, d.r
    tb, z_t, v_t = interpolate(x, d, cfg)
    y_in = null_dropped(y, d, cfg.num_classes)
    v_u, v_m, w = fast_guidance(apply, params, z_t, t, y, d, n_fm, cfg.num_classes, imf_uses_guidance(cfg))
    u, v, du_dt = forward_with_du_dt(apply, params, z_t, t, r, v_m, (d.omega, d.t_min, d.t_max, y_in), n_fm, "uv")
    with torch.no_grad():
        # The reference's conditional guidance pass for FM samples has exactly the with-grad pass's
        # inputs (h = 0, interval [0, 1], label y) wherever its result is used (dropped samples
        # regress v_t), and their w equals omega: their v_c is v, detached.
        if v_u is None:  # omega 1 everywhere: the reference's v_t + 0 (v_c - v_u)
            v_g = v_t
        else:
            v_c = torch.cat([v[:n_fm], v_m])                                          # (B, C, *S)
            v_g = v_t + bcast(1 - 1 / w, v_t) * (v_c - v_u)
            v_g = torch.where(bcast(d.drop_mask, v_t), v_t, v_g)
    loss_u, raw_u = adaptive_sq_loss(u, v_g, du_dt, t - r, eps=cfg.norm_eps, p=cfg.norm_p, backend=loss_backend)
    loss_v, raw_v = adaptive_sq_loss(v, v_g, eps=cfg.norm_eps, p=cfg.norm_p, backend=loss_backend)
    loss = loss_u + loss_v
    n = x[0].numel()
    metrics = {"loss_u": raw_u.mean() / n, "loss_v": raw_v.mean() / n}
    if perceptual is not None and uses_perceptual(cfg):
        term, perceptual_metrics = perceptual_term(perceptual, z_t - tb * u, x, d, cfg)   # pred_x = z_t - t u
        loss, metrics = loss + term, metrics | perceptual_metrics
    loss = loss.mean()
    metrics["loss"] = loss.detach()
    return loss, metrics


def fast_mf_guidance(apply: Callable, params: dict, z_t, t, y, n_fm: int, cfg: ObjectiveConfig):
    """MF's guidance u-passes at h = 0 the with-grad pass cannot stand in for, one no-grad call:
    u_null (B, C, *S) for all samples, u_cond (B - n_fm, C, *S) for samples n_fm: (none when
    mf_kappa is 0: shape (0, C, *S))."""
    with torch.no_grad():
        B = z_t.shape[0]
        s = slice(n_fm if cfg.mf_kappa else B, B)
        c = Conditions.full(torch.cat([t, t[s]]), torch.cat([torch.full_like(y, cfg.num_classes), y[s]]))
        uu = apply(params, torch.cat([z_t, z_t[s]]), *c, heads="u").u              # (B + |s|, C, *S)
    return uu[:B], uu[B:]


def fast_mf_loss_from_draws(apply: Callable, params: dict, x: torch.Tensor, y: torch.Tensor, d: Draws,
                            cfg: ObjectiveConfig, loss_backend: str = "auto"):
    """Original MeanFlow loss, equal to objectives.mf_loss_from_draws."""
    B, n_fm = x.shape[0], d.n_fm
    t, r = d.t, d.r
    _, z_t, v_t = interpolate(x, d, cfg)
    y_in = null_dropped(y, d, cfg.num_classes)
    dropped = bcast(d.drop_mask, v_t)
    guided = mf_uses_guidance(cfg)
    with torch.no_grad():
        if guided:
            u_null, u_cond = fast_mf_guidance(apply, params, z_t, t, y, n_fm, cfg)
            w, k = (bcast(a, v_t) for a in mf_guidance_weights(t, cfg))

            def v_g_rows(rows: slice, u_c):
                """v_g = w v + (1 - w - k) u_null + k u_cond of `rows`; dropped samples regress v."""
                v_g = w[rows] * v_t[rows] + (1 - w - k)[rows] * u_null[rows]
                v_g = v_g + k[rows] * u_c if cfg.mf_kappa else v_g
                return torch.where(dropped[rows], v_t[rows], v_g)
            tangent = v_g_rows(slice(n_fm, B), u_cond)                               # (B - n_fm, C, *S)
        else:
            tangent = v_t[n_fm:]
    u, _, du_dt = forward_with_du_dt(apply, params, z_t, t, r, tangent, (d.omega, d.t_min, d.t_max, y_in), n_fm, "u")
    # FM samples' conditional u at h = 0 is the with-grad pass's u, detached (same inputs where used).
    v_g = torch.cat([v_g_rows(slice(0, n_fm), u[:n_fm].detach()), tangent]) if guided else v_t
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
