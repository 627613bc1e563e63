"""Guard against pytorch issue 192985 (open): under torch.compile, Dynamo can silently drop a custom
autograd.Function.jvp inside torch.func.jvp and return wrong tangents. fastmf's compiled paths that
use torch.func.jvp through kernels.attention (train.py --reference-loss compiles the reference
objective) must give the eager tangents; on CUDA this runs the Triton kernels, on CPU their
interpreter and the math backend."""
import pytest
import torch

from fastmf.objectives import draw, imf_loss_from_draws, mf_loss_from_draws, objective_defaults
from helpers import functional, tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {"mit": dict(depth=2, aux_head_depth=1), "dit": dict(depth=1)}


# The math backend ("torch") under a compiled torch.func.jvp: test_compiled_reference_loss_equals_eager.
@pytest.mark.parametrize("backbone,variant,backend", [("mit", "pmf", "triton"), ("dit", "mf", "triton")])
def test_compiled_torch_func_jvp_keeps_the_attention_tangent(backbone, variant, backend):
    model = tiny_model(variant, dtype=torch.float32, num_classes=5, backbone=backbone, **SMALL[backbone]).to(DEVICE)
    model.set_attention_backend(backend)
    g = torch.Generator().manual_seed(0)
    z, dz = (torch.randn(3, 2, 8, 8, generator=g).to(DEVICE) for _ in range(2))
    t = torch.tensor([0.9, 0.5, 0.3], device=DEVICE)
    r = torch.tensor([0.2, 0.5, 0.1], device=DEVICE)
    cond = (torch.ones(3, device=DEVICE) * 2, torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE),
            torch.tensor([0, 1, 4], device=DEVICE))

    def du(z, dz):
        f = lambda z, t, r: model(z, t, t - r, *cond, heads="u").u
        return torch.func.jvp(f, (z, t, r), (dz, torch.ones_like(t), torch.zeros_like(r)))[1]
    eager = du(z, dz)
    torch._dynamo.reset()
    compiled = torch.compile(du)(z, dz)
    assert eager.abs().max() > 1e-2
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant,backbone", [("imf", "mit"), ("mf", "dit")])
def test_compiled_reference_loss_equals_eager(variant, backbone):
    """What train.py --reference-loss runs: the compiled reference objective, loss and gradients.
    The loss reads du/dt (the compound target), so a dropped tangent would show in its value."""
    model = tiny_model(variant, dtype=torch.float32, num_classes=5, backbone=backbone, **SMALL[backbone]).to(DEVICE)
    model.set_attention_backend("torch")
    apply, params = functional(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, 8, 8, generator=g).to(DEVICE), torch.randint(0, 5, (6,), generator=g).to(DEVICE)
    cfg = objective_defaults(variant, num_classes=5, norm_p=0.0)  # unweighted: the loss value reads every term
    d = draw(x, torch.Generator(device=DEVICE).manual_seed(1), cfg)
    fn = mf_loss_from_draws if variant == "mf" else imf_loss_from_draws
    ref, _ = fn(apply, params, x, y, d, cfg)
    ref_grads = torch.autograd.grad(ref, list(params.values()), allow_unused=True, materialize_grads=True)
    d_zero = type(d)(**{**vars(d), "t": d.t, "r": d.t})  # r = t everywhere: no tangent term at all
    no_tangent, _ = fn(apply, params, x, y, d_zero, cfg)
    torch._dynamo.reset()
    loss, _ = torch.compile(lambda x, y, d: fn(apply, params, x, y, d, cfg))(x, y, d)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert (ref - no_tangent).abs() > 1e-4  # the check can fail: the loss depends on the draws' tangent term
    for name, a, b in zip(params, grads, ref_grads):  # fp32: tolerances relative to each gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)
