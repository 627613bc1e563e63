"""Objectives against an independent transcription of the reference pseudo-code (same draws)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from fastmf.objectives import (Draws, draw, imf_loss, imf_loss_from_draws, mf_loss_from_draws,
                               objective_defaults, pmf_loss)
from helpers import functional, tiny_model

NC = 5


def call(model, params, *args):
    return torch.func.functional_call(model, params, args)


def reference_imf(model, params, x, y, d: Draws, cfg, stop_grad=True):
    """imf.py / pmf.py forward, transcribed: v_fn, v_cond_fn, guidance_fn, cond_drop, jvp, adp_wt."""
    expand = lambda s: s.reshape(-1, *[1] * (x.dim() - 1))
    t, r, e = d.t, d.r, d.e
    z_t = (1 - expand(t)) * x + expand(t) * e
    v_t = (z_t - x) / expand(t).clamp(0.05, 1.0) if cfg.variant == "pmf" else e - x

    def v_cond_fn(z, tt, w, yy):
        return call(model, params, z, tt, torch.zeros_like(tt), w, torch.zeros_like(tt), torch.ones_like(tt), yy)[1]

    with torch.no_grad():
        B = x.shape[0]
        out = v_cond_fn(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([d.omega, torch.ones_like(d.omega)]),
                        torch.cat([y, torch.full_like(y, NC)]))
        v_c, v_u = out[:B], out[B:]
        v_g_fm = v_t + expand(1 - 1 / d.omega) * (v_c - v_u)
        w = torch.where((t >= d.t_min) & (t <= d.t_max), d.omega, 1.0)
        v_c = v_cond_fn(z_t, t, w, y)
        v_g = v_t + expand(1 - 1 / w) * (v_c - v_u)
        v_g = torch.where(expand(d.fm_mask), v_g_fm, v_g)
    labels = torch.where(d.drop_mask, NC, y)
    v_g = torch.where(expand(d.drop_mask), v_t, v_g)
    with fwAD.dual_level():
        zd = fwAD.make_dual(z_t, v_c)
        td = fwAD.make_dual(t, torch.ones_like(t))
        rd = fwAD.make_dual(r, torch.zeros_like(r))
        u_d, v_d = call(model, params, zd, td, td - rd, d.omega, d.t_min, d.t_max, labels)
        u, du_dt = fwAD.unpack_dual(u_d)
        v = fwAD.unpack_dual(v_d).primal
    V = u + expand(t - r) * (du_dt.detach() if stop_grad else du_dt)
    v_g = v_g.detach()
    adp = lambda l: l / ((l + cfg.norm_eps) ** cfg.norm_p).detach()
    loss_u = adp(((V - v_g) ** 2).sum(dim=tuple(range(1, x.dim()))))
    loss_v = adp(((v - v_g) ** 2).sum(dim=tuple(range(1, x.dim()))))
    return (loss_u + loss_v).mean()


def reference_mf(model, params, x, y, d, cfg):
    """meanflow.py forward, transcribed: guidance_fn (omega, kappa, interval), cond_drop, jvp, adp_wt."""
    expand = lambda s: s.reshape(-1, *[1] * (x.dim() - 1))
    t, r = d.t, d.r
    z_t = (1 - expand(t)) * x + expand(t) * d.e
    v = d.e - x
    omega, kappa = cfg.mf_omega, cfg.mf_kappa
    if omega == 1.0 and kappa == 0.0:
        v_g = v
    else:
        def u_at_h0(labels):
            zeros, ones = torch.zeros_like(t), torch.ones_like(t)
            return call(model, params, z_t, t, zeros, ones, zeros, ones, labels)[0]
        u_uncond = u_at_h0(torch.full_like(y, NC))
        u_cond = u_at_h0(y) if kappa else torch.zeros_like(v)
        v_g = omega * v + (1 - omega - kappa) * u_uncond + kappa * u_cond
        inside = (t >= cfg.mf_t_start) & (t <= cfg.mf_t_end)
        v_g = torch.where(expand(inside), v_g, v).detach()
    y_inp = torch.where(d.drop_mask, NC, y)
    v_g = torch.where(expand(d.drop_mask), v, v_g)
    with fwAD.dual_level():
        out = call(model, params, fwAD.make_dual(z_t, v_g), fwAD.make_dual(t, torch.ones_like(t)),
                   fwAD.make_dual(t, torch.ones_like(t)) - fwAD.make_dual(r, torch.zeros_like(r)),
                   d.omega, d.t_min, d.t_max, y_inp)[0]
        u, du_dt = fwAD.unpack_dual(out)
    u_tgt = (v_g - expand((t - r).clamp(0, 1)) * du_dt).detach()
    loss = ((u - u_tgt) ** 2).sum(dim=tuple(range(1, x.dim())))
    return (loss / ((loss + cfg.norm_eps) ** cfg.norm_p).detach()).mean()


def setup(variant, size=(8, 8), B=6, seed=0, backbone="mit", **overrides):
    model = tiny_model(variant, input_size=size, num_classes=NC, backbone=backbone)
    apply, params = functional(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, *size, generator=g, dtype=torch.float64)
    y = torch.randint(0, NC, (B,), generator=g)
    cfg = objective_defaults(variant, num_classes=NC, class_dropout_prob=0.3, **overrides)
    d = draw(x, g, cfg)
    d.drop_mask[:2] = True  # make sure dropout, FM and MF samples all appear
    d.drop_mask[2:] = False
    d.t_min[-1], d.t_max[-1], d.t[-1] = 0.6, 0.9, 0.95  # one MF sample outside its CFG interval
    return model, apply, params, x, y, cfg, d


MF_GUIDANCE = [dict(mf_omega=1.0, mf_kappa=0.0), dict(), dict(mf_omega=2.5, mf_kappa=0.0),
               dict(mf_omega=0.2, mf_kappa=0.92, mf_t_end=0.8)]


@pytest.mark.parametrize("variant,size,backbone,guidance", [
    ("imf", (8, 8), "mit", {}), ("pmf", (8, 8), "mit", {}), ("imf", (4, 4, 4), "mit", {}),
    ("mf", (8, 8), "mit", MF_GUIDANCE[0]), ("mf", (4, 4, 4), "mit", MF_GUIDANCE[1]),
    *[("mf", (8, 8), "dit", g) for g in MF_GUIDANCE], ("mf", (4, 6, 4), "dit", MF_GUIDANCE[3])])
def test_objective_matches_reference_transcription(variant, size, backbone, guidance):
    model, apply, params, x, y, cfg, d = setup(variant, size, backbone=backbone, **guidance)
    fn = mf_loss_from_draws if variant == "mf" else imf_loss_from_draws
    loss, metrics = fn(apply, params, x, y, d, cfg)
    ref = (reference_mf if variant == "mf" else reference_imf)(model, params, x, y, d, cfg)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    names = list(params)
    g = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
    g_ref = torch.autograd.grad(ref, [params[k] for k in names], allow_unused=True)
    for k, a, b in zip(names, g, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0, k
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=k)
    assert torch.isfinite(loss) and set(metrics) >= {"loss", "loss_u"}


def test_stop_gradients_matter_and_are_applied():
    """Without sg(du/dt) the gradient differs: the transcription comparison above can fail."""
    model, apply, params, x, y, cfg, d = setup("imf")
    loss, _ = imf_loss_from_draws(apply, params, x, y, d, cfg)
    bad = reference_imf(model, params, x, y, d, cfg, stop_grad=False)
    w = params["u_heads.1.mlp.w2.weight"]
    g_ok = torch.autograd.grad(loss, w)[0]
    g_bad = torch.autograd.grad(bad, w)[0]
    assert (g_ok - g_bad).abs().max() > 1e-6 * g_ok.abs().max()


@pytest.mark.parametrize("variant,backbone", [("imf", "mit"), ("mf", "mit"), ("mf", "dit")])
def test_gradients_reach_every_parameter(variant, backbone):
    """Every parameter learns (MF on MiT builds no v-head: none is dead weight, as DDP needs)."""
    model, apply, params, x, y, cfg, d = setup(variant, backbone=backbone)
    fn = mf_loss_from_draws if variant == "mf" else imf_loss_from_draws
    loss, _ = fn(apply, params, x, y, d, cfg)
    loss.backward()
    assert not any(k.startswith("v_") for k in params) or variant != "mf"
    for k, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, k


def test_draws_follow_the_reference_distributions():
    cfg = objective_defaults("imf", num_classes=NC)
    x = torch.zeros(4000, 1, 2, 2)
    d = draw(x, torch.Generator().manual_seed(0), cfg)
    assert (d.t >= d.r).all() and ((d.t > 0) & (d.t < 1)).all()
    assert d.fm_mask.sum() == 2000 and (d.r[d.fm_mask] == d.t[d.fm_mask]).all()
    assert (d.omega >= 1).all() and (d.omega <= 8).all()
    # log-uniform omega for cfg_beta = 1: the median is sqrt(8)
    assert abs(d.omega.median().item() - 8 ** 0.5) < 0.15
    mf = ~d.fm_mask
    assert (d.t_min[d.fm_mask] == 0).all() and (d.t_max[d.fm_mask] == 1).all()
    assert (d.t_min[mf] <= 0.5).all() and (d.t_max[mf] >= 0.5).all()
    frac = d.drop_mask.float().mean().item()
    assert 0.08 < frac < 0.12 and d.drop_mask[: int(d.drop_mask.sum())].all()
    assert objective_defaults("mf").data_proportion == 0.75
    assert objective_defaults("pmf").P_mean == 0.8


def reference_sample_tr(B, gen, cfg, pmf_order):
    """imf.py's / pmf.py's sample_tr transcribed (torch RNG in the same order): logit-normal t, r;
    pMF's tr_uniform mask and uniforms; iMF sorts then sets r = t on the first int(B p) rows, pMF
    sets r = t and then sorts."""
    ln = lambda: torch.sigmoid(torch.randn(B, generator=gen) * cfg.P_std + cfg.P_mean)
    t, r = ln(), ln()
    if cfg.tr_uniform:
        mask = torch.rand(B, generator=gen) < 0.1
        t = torch.where(mask, torch.rand(B, generator=gen), t)
        r = torch.where(mask, torch.rand(B, generator=gen), r)
    fm = torch.arange(B) < int(B * cfg.data_proportion)
    if not pmf_order:
        t, r = torch.maximum(t, r), torch.minimum(t, r)
    r = torch.where(fm, t, r)
    return torch.maximum(t, r), torch.minimum(t, r)


@pytest.mark.parametrize("variant,tr_uniform", [("imf", False), ("mf", False), ("pmf", False), ("pmf", True)])
def test_t_r_draws_equal_the_reference_sample_tr(variant, tr_uniform):
    cfg = objective_defaults(variant, num_classes=NC, tr_uniform=tr_uniform)
    B = 20_000
    d = draw(torch.zeros(B, 1, 1, 1), torch.Generator().manual_seed(1), cfg)
    t, r = reference_sample_tr(B, torch.Generator().manual_seed(1), cfg, pmf_order=variant == "pmf")
    assert torch.equal(d.t, t) and torch.equal(d.r, r)
    # What the order changes: pMF's flow-matching t is one logit-normal draw (half of it below the
    # draw's median sigmoid(P_mean)); iMF's is the larger of two (a quarter below it).
    below = (d.t[d.fm_mask] < torch.sigmoid(torch.tensor(cfg.P_mean))).float().mean().item()
    expected = (0.5 if variant == "pmf" else 0.25) * (0.9 if tr_uniform else 1.0) + (0.1 * 0.69 if tr_uniform else 0)
    assert abs(below - expected) < 0.02
    if tr_uniform:  # uniform rows reach t < 0.05, which the logit-normal (0.8, 0.8) almost never does
        assert 0.002 < (d.t < 0.05).float().mean().item() < 0.008


def test_public_losses_are_deterministic_given_generator_and_check_config():
    model, apply, params, x, y, cfg, d = setup("imf")
    l1, _ = imf_loss(apply, params, x, y, torch.Generator().manual_seed(3), cfg)
    l2, _ = imf_loss(apply, params, x, y, torch.Generator().manual_seed(3), cfg)
    assert l1.item() == l2.item()
    with pytest.raises(ValueError, match="variant 'imf'"):
        pmf_loss(apply, params, x, y, torch.Generator(), cfg)
