"""DiT (MeanFlow's backbone): parameter counts, exact JVP both ways, the registry around it."""
import math

import pytest
import torch

from fastmf.models import FAMILIES, PRESETS, Tangent, build, from_record
from fastmf.models.layers import rope_1d, sincos_embedding
from helpers import tiny_model


def reference_param_count(depth, hidden, patch, in_ch, num_classes, mlp_ratio=4.0):
    """DiT (facebookresearch/DiT models.py, learn_sigma off) plus MeanFlow's second time embedder,
    written out by hand."""
    mlp = int(hidden * mlp_ratio)
    block = (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden) + (hidden * mlp + mlp) \
        + (mlp * hidden + hidden) + (hidden * 6 * hidden + 6 * hidden)
    out = patch * patch * in_ch
    time_embedder = 256 * hidden + hidden + hidden * hidden + hidden
    embed = out * hidden + hidden + 2 * time_embedder + (num_classes + 1) * hidden
    final = hidden * 2 * hidden + 2 * hidden + hidden * out + out
    return depth * block + embed + final


@pytest.mark.parametrize("name,patch", [("dit-b", 4), ("dit-b", 2), ("dit-m", 2), ("dit-l", 2), ("dit-xl", 2)])
def test_preset_param_counts(name, patch):
    p = PRESETS[name]
    with torch.device("meta"):
        model = build(name, input_size=(32, 32), patch_size=patch, in_channels=4, num_classes=1000)
    n = sum(q.numel() for q in model.parameters())
    print(f"{name}/{patch}: {n / 1e6:.1f}M parameters")
    assert n == reference_param_count(p["depth"], p["hidden_size"], patch, 4, 1000)


def conditions(B, dtype):
    t = torch.tensor([0.9, 0.5, 0.3, 0.03, 0.7][:B], dtype=dtype)
    r = torch.tensor([0.2, 0.5, 0.1, 0.01, 0.7][:B], dtype=dtype)
    ones = torch.ones(B, dtype=dtype)
    return t, r, (ones, 0 * ones, ones, torch.tensor([0, 4, 5, 1, 2][:B]))


@pytest.mark.parametrize("size", [(8, 8), (4, 6, 4)])
def test_jvp_equals_central_differences_and_hand_written_rules_fp64(size):
    """torch.func.jvp = central differences = the hand-written JVP (tangents of z, t and h)."""
    model = tiny_model("mf", input_size=size, backbone="dit")
    B = 4
    g = torch.Generator().manual_seed(1)
    z = torch.randn(B, 2, *size, generator=g, dtype=torch.float64)
    dz = torch.randn(z.shape, generator=g, dtype=torch.float64)
    t, r, (omega, t_min, t_max, y) = conditions(B, torch.float64)
    f = lambda z, t, r: model(z, t, t - r, omega, t_min, t_max, y).u
    ones, zeros = torch.ones(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    with torch.no_grad():
        u, du = torch.func.jvp(f, (z, t, r), (dz, ones, zeros))
        eps = 1e-6
        fd = (f(z + eps * dz, t + eps, r) - f(z - eps * dz, t - eps, r)) / (2 * eps)
    p = model(z, t, t - r, omega, t_min, t_max, y, tangent=Tangent(dz, ones, ones))
    assert du.abs().max() > 1e-2
    torch.testing.assert_close(du, fd, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(p.u, u, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(p.du, du, atol=1e-12, rtol=1e-10)
    # t enters through its own embedder: moving t alone (h fixed) changes u
    _, du_t = torch.func.jvp(lambda s: model(z, s, t - r, omega, t_min, t_max, y).u, (t,), (ones,))
    _, du_h = torch.func.jvp(lambda h: model(z, t, h, omega, t_min, t_max, y).u, (t - r,), (ones,))
    torch.testing.assert_close(du_t + du_h, torch.func.jvp(lambda s: f(z, s, r), (t,), (ones,))[1], atol=1e-12, rtol=1e-10)
    assert du_t.abs().max() > 1e-3 and du_h.abs().max() > 1e-3


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_with_grad_pass_carries_the_tangent_of_its_last_samples(backend, dtype):
    model = tiny_model("mf", dtype=dtype, backbone="dit")
    B, Bt = 5, 3
    g = torch.Generator().manual_seed(8)
    z = torch.randn(B, 2, 8, 8, generator=g, dtype=dtype)
    dz = torch.randn(Bt, 2, 8, 8, generator=g, dtype=dtype)
    t, r, (omega, t_min, t_max, y) = conditions(B, dtype)
    ones = torch.ones(Bt, dtype=dtype)
    params = list(model.parameters())
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    u_ref = model(z, t, t - r, omega, t_min, t_max, y).u
    g_ref = torch.autograd.grad((u_ref * 1.3).sum(), params)
    s = slice(B - Bt, B)
    _, du_ref = torch.func.jvp(lambda z, t: model(z, t, t - r[s], omega[s], t_min[s], t_max[s], y[s]).u,
                               (z[s], t[s]), (dz, ones))
    model.set_attention_backend(backend)
    p = model(z, t, t - r, omega, t_min, t_max, y, tangent=Tangent(dz, ones, ones))
    grads = torch.autograd.grad((p.u * 1.3).sum(), params)
    torch.testing.assert_close(p.u, u_ref, **tol)
    torch.testing.assert_close(p.du, du_ref, **tol)
    assert p.du.grad_fn is None and p.v is None
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, **tol)


def test_sincos_embedding_is_the_mae_2d_table():
    """2D: the first half encodes the column (MAE's meshgrid(w, h)), each half [sin, cos]."""
    H, W, D = 3, 5, 16
    table = sincos_embedding((H, W), D)
    w = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))
    for i in range(H):
        for j in range(W):
            expected = torch.cat([torch.sin(j * w), torch.cos(j * w), torch.sin(i * w), torch.cos(i * w)])
            torch.testing.assert_close(table[i * W + j], expected, rtol=0, atol=1e-15)


def test_fp64_means_fp64_buffers():
    """Fixed tables (RoPE, sin-cos) follow the model's dtype exactly, not rounded through fp32."""
    mit = tiny_model("imf").double()
    angles = rope_1d(mit.cfg.num_tokens, mit.cfg.hidden_size // mit.cfg.num_heads)
    assert mit.rope_cos.dtype == torch.float64 and torch.equal(mit.rope_cos, torch.cos(angles))
    dit = tiny_model("mf", backbone="dit").double()
    assert torch.equal(dit.pos_embed, sincos_embedding(dit.cfg.grid, dit.cfg.hidden_size))


def test_registry_records_rebuild_and_refuse_what_a_backbone_cannot_do():
    assert set(PRESETS) == {n for f in FAMILIES.values() for n in f.presets}
    for name, variant in [("dit-tiny", "mf"), ("mit-tiny", "mf"), ("mit-tiny", "pmf")]:
        model = build(name, variant, input_size=(8, 8), in_channels=1, num_classes=10)
        again = from_record(model.record)
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
        assert again.spec == model.spec
    assert build("mit-tiny", "mf").spec.heads == "u"       # MF trains no v-head: none is built
    assert not any(k.startswith("v_") for k in build("mit-tiny", "mf").state_dict())
    assert build("mit-tiny", "pmf").spec.conditions_on_t  # x-prediction reads t
    with pytest.raises(ValueError, match="dit-b cannot train 'imf'"):
        build("dit-b", "imf")
    with pytest.raises(ValueError, match=r"unknown DiT option\(s\) \['aux_head_depth'\]"):
        build("dit-tiny", aux_head_depth=2)
    model = tiny_model("mf", backbone="dit")
    z = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    t, r, (omega, t_min, t_max, y) = conditions(2, torch.float64)
    with pytest.raises(ValueError, match="heads must be one of \\['u'\\]"):
        model(z, t, t - r, omega, t_min, t_max, y, heads="v")
    u, v = model(z, t, t - r, omega, t_min, t_max, y)          # unpacks as (u, v); no v-head
    assert v is None and u.shape == z.shape and math.isfinite(u.sum().item())
