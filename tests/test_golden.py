"""Parity with the official iMF / pMF PyTorch inference code (../shared/golden, see its README)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmf.models import build, functional

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = {
    "imf": dict(file="imf_torch_tiny.safetensors", input_size=(8, 8), patch_size=2, in_channels=4),
    "pmf": dict(file="pmf_torch_tiny.safetensors", input_size=(32, 32), patch_size=8, in_channels=3),
}


def official_to_fastmf(state: dict, variant: str) -> dict:
    """Map the official state dict onto fastmf names: drop flax wrappers, convs become linears; pMF's
    MiT sits inside the x-prediction wrapper as `net`, as the official pMF net does."""
    out = {}
    prefix = "net." if variant == "pmf" else ""
    for key, w in state.items():
        if not key.startswith("param.net."):
            continue
        name = prefix + key.removeprefix("param.net.").replace("._flax_linear", "").replace("._flax_embedding", "")
        if w.dim() == 4:  # conv (out, in, p, p) -> linear over features ordered (pi, pj, c)
            w = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        if name.endswith(("_tokens", "pos_embed")):
            w = w.reshape(-1, w.shape[-1])
        out[name] = w
    return out


def load_case(variant: str, dtype: torch.dtype):
    case = CASES[variant]
    path = GOLDEN / case["file"]
    if not path.exists():
        pytest.fail(f"golden file missing: {path}")
    g = load_file(str(path))
    model = build("mit-tiny", variant, depth=3, aux_head_depth=2, hidden_size=64, num_heads=4, num_classes=10,
                  attn_backend="torch", num_class_tokens=8, num_cfg_tokens=4,
                  num_interval_tokens=2, num_time_tokens=4,
                  **{k: v for k, v in case.items() if k != "file"})
    missing, unexpected = model.load_state_dict(official_to_fastmf(g, variant), strict=True)
    assert not missing and not unexpected
    model = model.to(dtype)
    inputs = [g[f"in.{k}"] for k in ("x", "t", "h", "omega", "t_min", "t_max")]
    inputs = [x.to(dtype) for x in inputs] + [g["in.y"]]
    return model, inputs, g


@pytest.mark.parametrize("variant", ["imf", "pmf"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float64, 1e-5)])
def test_forward_matches_official(variant, dtype, atol):
    model, inputs, g = load_case(variant, dtype)
    with torch.no_grad():
        u, v = model(*inputs)
        seq = (model.net if variant == "pmf" else model).build_sequence(inputs[0], *inputs[2:])
    torch.testing.assert_close(seq, g["dbg.seq_embed"].to(dtype), atol=atol, rtol=0)
    torch.testing.assert_close(u, g["out.u"].to(dtype), atol=atol, rtol=0)
    torch.testing.assert_close(v, g["out.v"].to(dtype), atol=atol, rtol=0)
    # Sensitivity guard: outputs must not already match when a conditioning input is changed.
    with torch.no_grad():
        u_wrong, _ = model(*inputs[:-1], torch.zeros_like(inputs[-1]))
    assert (u_wrong - g["out.u"].to(dtype)).abs().max() > 50 * atol


@pytest.mark.parametrize("variant", ["imf", "pmf"])
def test_one_step_sample_matches_official(variant):
    from fastmf.sampling import sample
    model, (x, _t, _h, omega, t_min, t_max, y), g = load_case(variant, torch.float64)
    params = dict(model.named_parameters())
    out = sample(functional(model), params, x, y, steps=g["in.t_steps"].tolist(), omega=omega, t_min=t_min, t_max=t_max)
    torch.testing.assert_close(out, g["out.sample_1nfe"].double(), atol=1e-5, rtol=0)
