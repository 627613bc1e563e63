"""MiT: parameter counts, exact JVP of the whole net, dtypes, clear errors (DiT: tests/test_dit.py)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from fastmf.models import PRESETS, Tangent, build
from helpers import tiny_model


def reference_param_count(depth, hidden, aux, patch, in_ch, num_classes, variant="imf", num_tokens=0):
    """Count parameters from the reference definition (imfDiT / pmfDiT), written out by hand."""
    head_dim = hidden // (hidden // 64)
    mlp = int(hidden * 8 / 3)
    attn = 4 * hidden * hidden + 2 * head_dim
    block = attn + 3 * hidden * mlp + 2 * hidden + 2 * hidden           # + norms + gates
    blocks = (depth - aux) * block + 2 * aux * block
    embedders = 4 * (256 * hidden + hidden + hidden * hidden + hidden) + (num_classes + 1) * hidden
    tokens = (8 + 4 + 2 + 2 + 4) * hidden
    out = patch * patch * in_ch
    finals = 2 * (hidden + hidden * out + out)
    if variant == "pmf":
        bott = 128 if hidden <= 1024 else 256
        x_emb = out * bott + bott + bott * hidden + hidden + num_tokens * hidden
    else:
        x_emb = out * hidden + hidden
    return blocks + embedders + tokens + finals + x_emb


@pytest.mark.parametrize("name", ["mit-b", "mit-m", "mit-l", "mit-xl"])
def test_preset_param_counts(name):
    p = PRESETS[name]
    with torch.device("meta"):
        model = build(name, input_size=(32, 32), patch_size=2, in_channels=4, num_classes=1000)
    n = sum(q.numel() for q in model.parameters())
    ref = reference_param_count(p["depth"], p["hidden_size"], p["aux_head_depth"], 2, 4, 1000)
    print(f"{name}: {n / 1e6:.2f}M parameters (u-path only: "
          f"{(n - sum(q.numel() for k, q in model.named_parameters() if k.startswith('v_'))) / 1e6:.2f}M)")
    assert n == ref


def test_pmf_b16_param_count():
    with torch.device("meta"):
        model = build("mit-b", "pmf", depth=16, input_size=(256, 256), patch_size=16, in_channels=3)
    n = sum(q.numel() for q in model.parameters())
    assert n == reference_param_count(16, 768, 8, 16, 3, 1000, "pmf", num_tokens=256 + 20)


def u_of(model, omega, t_min, t_max, y):
    return lambda z, t, r: model(z, t, t - r, omega, t_min, t_max, y, heads="u")[0]


@pytest.mark.parametrize("variant,size", [("imf", (8, 8)), ("pmf", (8, 8)), ("imf", (4, 4, 4)),
                                          ("pmf", (4, 6, 4))])
def test_model_jvp_matches_finite_differences_and_forward_ad(variant, size):
    model = tiny_model(variant, input_size=size)
    B = 3
    g = torch.Generator().manual_seed(1)
    z = torch.randn(B, 2, *size, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.5, 0.1], dtype=torch.float64)
    omega, t_min, t_max = torch.tensor([1.0, 2.0, 4.0]).double(), torch.zeros(B).double(), torch.ones(B).double()
    y = torch.tensor([0, 4, 5])
    dz = torch.randn(z.shape, generator=g, dtype=torch.float64)
    f = u_of(model, omega, t_min, t_max, y)
    ones, zeros = torch.ones(B).double(), torch.zeros(B).double()
    with torch.no_grad():
        u, du = torch.func.jvp(f, (z, t, r), (dz, ones, zeros))
        eps = 1e-6
        fd = (f(z + eps * dz, t + eps, r) - f(z - eps * dz, t - eps, r)) / (2 * eps)
        with fwAD.dual_level():
            out = f(fwAD.make_dual(z, dz), fwAD.make_dual(t, ones), fwAD.make_dual(r, zeros))
            du_fw = fwAD.unpack_dual(out).tangent
    assert du.abs().max() > 1e-2  # the check is not vacuous
    torch.testing.assert_close(du, fd, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(du, du_fw, atol=1e-12, rtol=1e-10)


def test_v_head_skipped_and_heads_share_trunk():
    model = tiny_model()
    z = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    args = (torch.rand(2).double(), torch.zeros(2).double(), torch.ones(2).double(), torch.zeros(2).double(),
            torch.ones(2).double(), torch.tensor([1, 2]))
    u, v = model(z, *args)
    u_only, v_none = model(z, *args, heads="u")
    v_none2, v_only = model(z, *args, heads="v")
    assert v_none is None and v_none2 is None
    torch.testing.assert_close(u, u_only, rtol=0, atol=0)
    torch.testing.assert_close(v, v_only, rtol=0, atol=0)


def test_bf16_autocast_runs():
    model = tiny_model(dtype=torch.float32)
    z = torch.randn(2, 2, 8, 8)
    args = (torch.rand(2), torch.zeros(2), torch.ones(2), torch.zeros(2), torch.ones(2), torch.tensor([1, 2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, v = model(z, *args)
    ref, _ = model(z, *args)
    assert torch.isfinite(u.float()).all()
    assert (u.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-2


def test_stacked_weight_is_the_cast_weights_side_by_side():
    """One matmul for q, k, v (and w1, w3): the stack holds each weight as F.linear would use it,
    in autocast's dtype under autocast (fp64 never cast), as is without."""
    from fastmf.models.layers import stacked_weight
    lins = [torch.nn.Linear(6, n, bias=False) for n in (6, 6, 4)]
    x = torch.randn(3, 6)
    assert torch.equal(stacked_weight(*lins), torch.cat([lin.weight for lin in lins]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = stacked_weight(*lins)
        assert torch.equal(w, torch.cat([lin.weight.bfloat16() for lin in lins]))
        torch.testing.assert_close(F.linear(x, w), torch.cat([lin(x) for lin in lins], -1))
        assert stacked_weight(*(lin.double() for lin in lins)).dtype == torch.float64


def test_bad_inputs_give_clear_errors():
    model = tiny_model(dtype=torch.float32)
    ok = (torch.rand(2), torch.zeros(2), torch.ones(2), torch.zeros(2), torch.ones(2), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expects input"):
        model(torch.randn(2, 3, 8, 8), *ok)
    with pytest.raises(ValueError, match="expects input"):
        model(torch.randn(2, 2, 10, 8), *ok)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        model(torch.randn(2, 2, 8, 8), torch.tensor([0.5, 1.5]), *ok[1:])
    with pytest.raises(ValueError, match="labels must lie"):
        model(torch.randn(2, 2, 8, 8), *ok[:-1], torch.tensor([1, 9]))
    with pytest.raises(ValueError, match="does not divide"):
        build("mit-tiny", input_size=(9, 8), patch_size=2)
    with pytest.raises(ValueError, match="unknown model 'mit-q'"):
        build("mit-q")
    with pytest.raises(ValueError, match="2 \\(image\\) or 3 \\(volume\\)"):
        build("mit-tiny", input_size=(8,))


@pytest.mark.parametrize("variant,size,backend,dtype", [
    ("imf", (8, 8), "torch", torch.float64), ("pmf", (8, 8), "torch", torch.float64),
    ("imf", (4, 4, 4), "torch", torch.float64), ("pmf", (4, 6, 4), "torch", torch.float64),
    ("imf", (8, 8), "triton", torch.float32), ("pmf", (4, 4, 4), "triton", torch.float32)])
def test_hand_written_jvp_equals_torch_func_jvp(variant, size, backend, dtype):
    """MiT's explicit tangent rules (tangent=Tangent(...)) against torch.func.jvp of the same net."""
    model = tiny_model(variant, input_size=size, dtype=dtype)
    B = 3
    g = torch.Generator().manual_seed(4)
    z = torch.randn(B, 2, *size, generator=g, dtype=dtype)
    dz = torch.randn(z.shape, generator=g, dtype=dtype)
    t = torch.tensor([0.9, 0.5, 0.03], dtype=dtype)       # 0.03: inside pMF's clip at 0.05
    r = torch.tensor([0.2, 0.5, 0.01], dtype=dtype)
    omega, t_min, t_max = torch.tensor([1.0, 2.0, 4.0], dtype=dtype), torch.zeros(B, dtype=dtype), torch.ones(B, dtype=dtype)
    y = torch.tensor([0, 4, 5])
    ones, zeros = torch.ones(B, dtype=dtype), torch.zeros(B, dtype=dtype)
    model.set_attention_backend("torch")
    u_ref, du_ref = torch.func.jvp(u_of(model, omega, t_min, t_max, y), (z, t, r), (dz, ones, zeros))
    model.set_attention_backend(backend)
    p = model(z, t, t - r, omega, t_min, t_max, y, heads="u", tangent=Tangent(dz, ones, ones))
    u, du = p.u, p.du
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(u, u_ref, **tol)
    torch.testing.assert_close(du, du_ref, **tol)
    assert du.grad_fn is None and du.abs().max() > 1e-2


def test_apply_rope_rotates_pairs_eager_and_compiled():
    """Both forms of apply_rope (complex multiply eager, real form compiled) equal an explicit
    2x2 rotation of each channel pair (2i, 2i+1)."""
    from fastmf.models.layers import apply_rope
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64)                 # (B, N, H, D)
    ang = torch.rand(5, 4, generator=g, dtype=torch.float64) * 6                  # (N, D/2)
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    expected = torch.stack([c * a - s * b, s * a + c * b], -1).flatten(-2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]                              # (N, 1, D/2)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, rtol=0, atol=1e-14)
    torch._dynamo.reset()
    compiled = torch.compile(apply_rope, fullgraph=True)(x, cos, sin)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("variant,size,backend,dtype", [
    ("imf", (8, 8), "torch", torch.float64), ("pmf", (4, 6, 4), "torch", torch.float64),
    ("pmf", (8, 8), "auto", torch.float64), ("imf", (4, 4, 4), "triton", torch.float32)])
def test_with_grad_pass_carries_the_tangent_of_its_last_samples(variant, size, backend, dtype):
    """heads="uv" with tangents for the last Bt samples: u, v and their gradients are a plain
    pass's; du equals torch.func.jvp for those samples and carries no autograd graph."""
    model = tiny_model(variant, input_size=size, dtype=dtype)
    B, Bt = 5, 3
    g = torch.Generator().manual_seed(8)
    z = torch.randn(B, 2, *size, generator=g, dtype=dtype)
    dz = torch.randn(Bt, 2, *size, generator=g, dtype=dtype)
    t = torch.tensor([0.3, 0.9, 0.5, 0.03, 0.7], dtype=dtype)
    r = torch.tensor([0.3, 0.1, 0.2, 0.01, 0.7], dtype=dtype)
    omega = torch.tensor([1.0, 2.0, 4.0, 1.5, 3.0], dtype=dtype)
    t_min, t_max, y = torch.zeros(B, dtype=dtype), torch.ones(B, dtype=dtype), torch.tensor([0, 4, 5, 1, 2])
    ones, zeros = torch.ones(Bt, dtype=dtype), torch.zeros(Bt, dtype=dtype)
    params = list(model.parameters())
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)

    model.set_attention_backend("torch")
    u_ref, v_ref = model(z, t, t - r, omega, t_min, t_max, y, heads="uv")
    g_ref = torch.autograd.grad((u_ref * 1.3).sum() + v_ref.square().sum(), params)
    s = slice(B - Bt, B)
    _, du_ref = torch.func.jvp(u_of(model, omega[s], t_min[s], t_max[s], y[s]), (z[s], t[s], r[s]), (dz, ones, zeros))

    model.set_attention_backend(backend)
    u, v, du = vars(model(z, t, t - r, omega, t_min, t_max, y, heads="uv", tangent=Tangent(dz, ones, ones))).values()
    grads = torch.autograd.grad((u * 1.3).sum() + v.square().sum(), params)
    torch.testing.assert_close(u, u_ref, **tol)
    torch.testing.assert_close(v, v_ref, **tol)
    torch.testing.assert_close(du, du_ref, **tol)
    assert du.grad_fn is None and du.abs().max() > 1e-2
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, **tol)
    with pytest.raises(ValueError, match="u-head"):
        model(z, t, t - r, omega, t_min, t_max, y, heads="v", tangent=Tangent(dz, ones, ones))
    with pytest.raises(ValueError, match="Bt <="):
        model(z[:2], t[:2], (t - r)[:2], omega[:2], t_min[:2], t_max[:2], y[:2], heads="u",
              tangent=Tangent(dz, ones, ones))
