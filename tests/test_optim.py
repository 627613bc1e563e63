"""pMF's optimiser and weight averages: the Muon/Adam partition, exact resume, the EMA half-life."""
import math

import pytest
import torch

from fastmf.models import build
from fastmf.optim import MuonWithAdam, make_optimizer, muon_names, power_ema_beta
from fastmf.run_state import RunState, ema_name


def test_muon_takes_the_weight_matrices_and_adam_the_rest():
    model = build("mit-tiny", "pmf", input_size=(8, 8), in_channels=1, num_classes=10)
    muon = muon_names(model)
    assert "net.shared_blocks.0.attn.q_proj.weight" in muon and "net.u_heads.1.mlp.w2.weight" in muon
    assert "net.h_embedder.mlp.0.weight" in muon and "net.u_final_layer.linear.weight" in muon  # dense kernels
    for adam in ("net.x_embedder.proj1.weight", "net.class_tokens", "net.pos_embed", "net.y_embedder.embedding_table.weight",
                 "net.shared_blocks.0.attn_scale", "net.shared_blocks.0.norm1.weight", "net.h_embedder.mlp.0.bias"):
        assert adam not in muon, adam
    assert all(dict(model.named_parameters())[k].dim() == 2 for k in muon)


def test_muon_with_adam_steps_saves_and_resumes_exactly():
    torch.manual_seed(0)
    model = build("mit-tiny", "imf", input_size=(8, 8), in_channels=1, num_classes=10)
    named = dict(model.named_parameters())
    opt, ordered = make_optimizer("muon", model, named, 1e-2, (0.9, 0.95), fused=False)
    assert isinstance(opt, MuonWithAdam) and list(ordered) == opt.names and set(ordered) == set(named)

    def step(o, params, seed):
        g = torch.Generator().manual_seed(seed)
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g)
        o.step()
    for s in range(3):
        step(opt, ordered, s)
    state = RunState(ordered, opt)
    tensors, meta = state.state_dict()
    tensors = {k: v.clone() for k, v in tensors.items()}  # state_dict's tensors alias the live state
    assert any(k.endswith(".momentum_buffer") for k in tensors) and any(k.endswith(".exp_avg_sq") for k in tensors)
    step(opt, ordered, 3)
    after = {k: v.detach().clone() for k, v in ordered.items()}

    torch.manual_seed(1)
    model2 = build("mit-tiny", "imf", input_size=(8, 8), in_channels=1, num_classes=10)
    opt2, ordered2 = make_optimizer("muon", model2, dict(model2.named_parameters()), 0.5, (0.9, 0.95), fused=False)
    state2 = RunState(ordered2, opt2)
    state2.load_state_dict(tensors, meta)
    step(opt2, ordered2, 3)
    for k in after:
        assert torch.equal(ordered2[k], after[k]), k
    assert opt2.param_groups[0]["lr"] == 1e-2


def test_power_ema_half_life_and_ramp_up():
    B = 256
    beta = power_ema_beta(10 ** 6, 500, B)  # ramped up: the half-life is 500 kimg
    assert beta ** (500_000 / B) == pytest.approx(0.5, rel=1e-9)
    beta = power_ema_beta(100, 500, B, rampup=0.05)  # early: 5% of the 25,600 samples seen
    assert beta ** (0.05 * 100 * B / B) == pytest.approx(0.5, rel=1e-9)
    assert power_ema_beta(0, 500, B) == 0.0  # no history yet: the EMA is the weights
    assert ema_name(1000) == "ema_1000" and ema_name(2.5) == "ema_2p5"


def test_run_state_keeps_every_ema():
    p = {"w": torch.zeros(3)}
    state = RunState(p, torch.optim.Adam(p.values()), halflives_kimg=(0.5, 1))
    assert list(state.emas) == ["ema", "ema_0p5", "ema_1"]
    for _ in range(40):
        with torch.no_grad():
            p["w"].add_(1.0)
        state.update_emas(0.9, batch_size=64, rampup=1.0)
        state.step += 1
    w = p["w"][0].item()
    values = [e["w"][0].item() for e in state.emas.values()]
    assert all(0 < v < w for v in values) and values[1] > values[2]  # the shorter half-life follows closer
    assert math.isfinite(sum(values))
