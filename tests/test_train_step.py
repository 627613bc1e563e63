"""The fast loss equals the reference objective (same draws): value, metrics and gradients."""
import pytest
import torch

from fastmf.objectives import draw, imf_loss_from_draws, mf_loss_from_draws, objective_defaults
from fastmf.train_step import fast_imf_loss_from_draws, fast_loss, fast_loss_from_draws, fast_mf_loss_from_draws
from fastmf.models import Tangent
from helpers import functional, tiny_model

NC = 5


NO_GUIDANCE, OFFICIAL, OMEGA_ONLY = dict(mf_omega=1.0, mf_kappa=0.0), {}, dict(mf_omega=2.5, mf_kappa=0.0)
INTERVAL = dict(mf_omega=0.2, mf_kappa=0.92, mf_t_end=0.8)
UNGUIDED = dict(cfg_max=0.0)  # iMF/pMF without CFG: omega 1 throughout


@pytest.mark.parametrize("variant,size,backend,backbone,guidance", [
    ("imf", (8, 8), "torch", "mit", {}), ("imf", (8, 8), "triton", "mit", {}), ("pmf", (8, 8), "torch", "mit", {}),
    ("imf", (4, 4, 4), "triton", "mit", {}), ("imf", (8, 8), "torch", "mit", UNGUIDED),
    ("pmf", (4, 4, 4), "triton", "mit", UNGUIDED), ("mf", (8, 8), "torch", "mit", NO_GUIDANCE),
    ("mf", (4, 4, 4), "triton", "mit", OFFICIAL), ("mf", (8, 8), "torch", "mit", OMEGA_ONLY),
    ("mf", (8, 8), "torch", "dit", NO_GUIDANCE), ("mf", (8, 8), "triton", "dit", OFFICIAL),
    ("mf", (8, 8), "torch", "dit", OMEGA_ONLY), ("mf", (4, 6, 4), "torch", "dit", INTERVAL)])
def test_fast_loss_equals_reference(variant, size, backend, backbone, guidance):
    model = tiny_model(variant, input_size=size, num_classes=NC, backbone=backbone)
    apply, params = functional(model)
    g = torch.Generator().manual_seed(0)
    B = 7
    x = torch.randn(B, 2, *size, generator=g, dtype=torch.float64)
    y = torch.randint(0, NC, (B,), generator=g)
    cfg = objective_defaults(variant, num_classes=NC, class_dropout_prob=0.3, **guidance)
    d = draw(x, g, cfg)
    d.drop_mask[:] = torch.arange(B) < 2
    d.t_min[-1], d.t_max[-1], d.t[-1] = 0.6, 0.9, 0.95  # an MF sample outside its CFG interval
    if variant == "mf":
        ref, m_ref = mf_loss_from_draws(apply, params, x, y, d, cfg)
        fast, m_fast = fast_mf_loss_from_draws(apply, params, x, y, d, cfg, loss_backend=backend)
    else:
        ref, m_ref = imf_loss_from_draws(apply, params, x, y, d, cfg)
        fast, m_fast = fast_imf_loss_from_draws(apply, params, x, y, d, cfg, loss_backend=backend)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    for k in m_ref:
        torch.testing.assert_close(m_fast[k].double(), m_ref[k].double(), rtol=1e-9, atol=1e-12, msg=k)
    names = list(params)
    g_ref = torch.autograd.grad(ref, [params[k] for k in names], allow_unused=True)
    g_fast = torch.autograd.grad(fast, [params[k] for k in names], allow_unused=True)
    for k, a, b in zip(names, g_fast, g_ref):
        if b is None or a is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0), k
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=k)


def test_one_class_data_trains_without_guidance_and_the_fast_loss_skips_the_unconditional_pass():
    from fastmf.objectives import sample_omega
    u = torch.rand(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert objective_defaults("imf", num_classes=1).omega_max == 0.0
    assert objective_defaults("imf", num_classes=5).omega_max == 7.0
    assert objective_defaults("imf", num_classes=1, cfg_max=3.0).omega_max == 3.0   # asked for: kept
    assert torch.equal(sample_omega(u, objective_defaults("pmf", num_classes=1, cfg_beta=2.0)), torch.ones(100))
    assert sample_omega(u, objective_defaults("pmf", num_classes=5)).max() > 2.0

    model = tiny_model("imf", input_size=(8, 8), num_classes=1)
    apply, params = functional(model)
    rows = []

    def counting(*args, heads, **kw):
        if not torch.is_grad_enabled():  # the guidance passes run without grad
            rows.append(args[1].shape[0])
        return apply(*args, heads=heads, **kw)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, 8, 8, generator=g, dtype=torch.float64), torch.zeros(8, dtype=torch.int64)
    for cfg_max, want_rows in ((None, 4), (2.0, 8 + 4)):   # B - n_fm = 4 tangent rows; + B unconditional
        cfg = objective_defaults("imf", num_classes=1, cfg_max=cfg_max)
        d = draw(x, torch.Generator().manual_seed(2), cfg)
        rows.clear()
        fast, _ = fast_imf_loss_from_draws(counting, params, x, y, d, cfg, loss_backend="torch")
        ref, _ = imf_loss_from_draws(apply, params, x, y, d, cfg)
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
        assert rows == [want_rows], (cfg_max, rows)


def test_fast_loss_fp32_matches_reference_and_draws_like_it():
    model = tiny_model(dtype=torch.float32, num_classes=NC)
    apply, params = functional(model)
    x = torch.randn(8, 2, 8, 8)
    y = torch.randint(0, NC, (8,))
    cfg = objective_defaults("imf", num_classes=NC)
    from fastmf.objectives import imf_loss
    ref, _ = imf_loss(apply, params, x, y, torch.Generator().manual_seed(5), cfg)
    fast, _ = fast_loss(apply, params, x, y, torch.Generator().manual_seed(5), cfg, loss_backend="torch")
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_pmf_perceptual_terms_match_reference_and_count(tmp_path):
    """LPIPS and ConvNeXt-V2 (random-init, real architectures, fp64) added by the fast step and the
    reference objective alike: the same loss and gradients, and the terms really change them."""
    from test_perceptual import random_weights
    from fastmf.perceptual import Perceptual
    perceptual = Perceptual(*random_weights(tmp_path), size=32).double()
    model = tiny_model("pmf", num_classes=NC, in_channels=3, input_size=(16, 16))
    apply, params = functional(model)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, NC, (6,), generator=g)
    cfg = objective_defaults("pmf", num_classes=NC, lpips_lambda=0.4, convnext_lambda=0.1, perceptual_max_t=0.8,
                             perceptual_size=32)
    d = draw(x, g, cfg)
    assert d.crop.shape == (6, 4)
    ref, m_ref = imf_loss_from_draws(apply, params, x, y, d, cfg, perceptual=perceptual)
    fast, m_fast = fast_imf_loss_from_draws(apply, params, x, y, d, cfg, perceptual=perceptual, loss_backend="torch")
    plain, _ = imf_loss_from_draws(apply, params, x, y, d, cfg)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
    for k in ("loss_lpips", "loss_convnext"):
        torch.testing.assert_close(m_fast[k], m_ref[k])
    assert (ref - plain).abs() > 1e-3  # the terms are really added (gated by t < 0.8 per sample)
    names = list(params)
    g_ref = torch.autograd.grad(ref, [params[k] for k in names])
    g_fast = torch.autograd.grad(fast, [params[k] for k in names])
    for k, a, b in zip(names, g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=k)


def test_tangent_pass_compiles_as_one_graph_with_triton_attention():
    """A pure (no-grad) hand-written JVP pass has no graph break, the fused Triton attention
    forward+tangent included (a custom op)."""
    model = tiny_model("pmf", dtype=torch.float32, num_classes=NC, depth=2, aux_head_depth=1)
    B = 3
    g = torch.Generator().manual_seed(6)
    z, dz = torch.randn(2, B, 2, 8, 8, generator=g)
    t = torch.tensor([0.9, 0.4, 0.2])
    om, t_min, t_max, y, ones = t * 0 + 2, t * 0, t * 0 + 1, torch.tensor([0, 1, 2]), torch.ones(B)

    def fn(z, dz):
        with torch.no_grad():
            p = model(z, t, t * 0.5, om, t_min, t_max, y, heads="u", tangent=Tangent(dz, ones, ones))
            return p.u, p.du
    model.set_attention_backend("torch")
    u_ref, du_ref = fn(z, dz)
    model.set_attention_backend("triton")
    torch._dynamo.reset()
    u, du = torch.compile(fn, fullgraph=True)(z, dz)
    torch.testing.assert_close(du, du_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(u, u_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant,size", [("imf", (8, 8)), ("pmf", (8, 8)), ("mf", (8, 8)), ("pmf", (4, 6, 4))])
def test_whole_fast_step_compiles_as_one_graph_on_the_cuda_path(variant, size):
    """Loss and backward of the fast step, dispatched as on CUDA (SDPA primal passes, the fused
    Triton forward+tangent op, the Triton loss ops), compile with fullgraph=True and match the
    reference objective. Draws stay outside the graph (explicit generators do not trace). The
    volume case is what bench/gpu_run.sh's 3dcompiled stage compiles (axial RoPE over 3 axes)."""
    model = tiny_model(variant, input_size=size, dtype=torch.float32, num_classes=NC, depth=2,
                       aux_head_depth=1)
    _, params = functional(model)
    apply, _ = functional(model)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 2, *size, generator=g)
    y = torch.randint(0, NC, (6,), generator=g)
    cfg = objective_defaults(variant, num_classes=NC, class_dropout_prob=0.3)
    d = draw(x, g, cfg)
    reference = {"imf": imf_loss_from_draws, "pmf": imf_loss_from_draws, "mf": mf_loss_from_draws}[variant]
    model.set_attention_backend("torch")
    ref, _ = reference(apply, params, x, y, d, cfg)
    ref_grads = torch.autograd.grad(ref, list(params.values()), allow_unused=True, materialize_grads=True)
    model.set_attention_backend("sdpa")
    torch._dynamo.reset()
    step = torch.compile(lambda x, y, d: fast_loss_from_draws(apply, params, x, y, d, cfg, loss_backend="triton"),
                         fullgraph=True)
    loss, _ = step(x, y, d)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(params, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_blocks_match_eager_and_compile_once_for_all_blocks():
    """MiT.compile_blocks (train.py --compile-scope blocks): the fast loss and its gradients equal
    the eager ones, and dynamo compiles three graphs (block forward with and without grad, block
    JVP rule) however many blocks there are, not one per block."""
    from torch._dynamo.utils import counters
    model = tiny_model("imf", dtype=torch.float32, num_classes=NC, depth=4, aux_head_depth=3)  # 7 blocks
    model.set_attention_backend("auto")
    apply, params = functional(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 8, 8, generator=g)
    y = torch.randint(0, NC, (6,), generator=g)
    cfg = objective_defaults("imf", num_classes=NC, class_dropout_prob=0.3)
    d = draw(x, g, cfg)
    ref, _ = fast_loss_from_draws(apply, params, x, y, d, cfg)
    ref_grads = torch.autograd.grad(ref, list(params.values()))
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks()
    try:
        loss, _ = fast_loss_from_draws(apply, params, x, y, d, cfg)
        grads = torch.autograd.grad(loss, list(params.values()))
    finally:
        model.compile_blocks(False)
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(params, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
