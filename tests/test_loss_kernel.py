"""kernels.loss.adaptive_sq_loss against an fp64 transcription of the seed loss, both backends.

Runs on CUDA when present, else on CPU, where the triton backend runs in the interpreter
(tests/conftest.py); the interpreter computes bf16 wrongly, so bf16 is checked on CUDA only.
"""
import pytest
import torch

import kernels.loss as loss_mod
from kernels.loss import adaptive_sq_loss

SHAPES = [(3, 3, 17, 19), (1, 4, 9, 11, 13)]  # image and volume; rows not a multiple of the block
BACKENDS = ["torch", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def seed_loss(pred, target, tangent, coef, eps, p):
    """The seed pseudo-code in fp64: V = u + coef sg(du_dt); loss = sum((V - v_g)^2);
    loss / sg((loss + eps)^p). Returns (weighted, loss)."""
    V = pred if tangent is None else pred + coef.view(-1, *[1] * (pred.dim() - 1)) * tangent.detach()
    loss = ((V - target.detach()) ** 2).sum(dim=tuple(range(1, pred.dim())))
    return loss / ((loss + eps) ** p).detach(), loss


def make_inputs(shape, with_tangent, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
    coef = torch.rand(shape[0], generator=gen).to(device)
    coef[0] = 0.0  # an FM sample (t = r) in every batch
    return x[0], x[1], (x[2] if with_tangent else None), (coef if with_tangent else None)


def check_against_seed(pred, target, tangent, coef, eps, p, backend, tol_val, tol_grad):
    """Forward values and pred-gradients (random upstream grad) against seed_loss in fp64."""
    B = pred.shape[0]
    g = torch.randn(B, generator=torch.Generator().manual_seed(1)).to(pred.device)
    pred = pred.clone().requires_grad_(True)
    weighted, raw = adaptive_sq_loss(pred, target, tangent, coef, eps=eps, p=p, backend=backend)
    (grad,) = torch.autograd.grad(weighted, pred, g.to(weighted.dtype))

    pred64 = pred.detach().double().requires_grad_(True)
    w64, raw64 = seed_loss(pred64, target.double(), None if tangent is None else tangent.double(),
                           None if coef is None else coef.double(), eps, p)
    (grad64,) = torch.autograd.grad(w64, pred64, g.double())

    expect_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    assert weighted.dtype == raw.dtype == expect_dtype and weighted.shape == raw.shape == (B,)
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    assert not raw.requires_grad
    assert_rel_close(weighted, w64, tol_val)
    assert_rel_close(raw, raw64, tol_val)
    assert_rel_close(grad, grad64, tol_grad)


def assert_rel_close(actual, expected, tol):
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} * {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("with_tangent", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_seed(shape, with_tangent, p, backend):
    pred, target, tangent, coef = make_inputs(shape, with_tangent)
    check_against_seed(pred, target, tangent, coef, 0.01, p, backend, 1e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_matches_seed(shape, backend):
    # fp32 accumulation: the sum is as good as fp32's; the gradient is rounded to fp16.
    pred, target, tangent, coef = make_inputs(shape, True, dtype=torch.float16)
    check_against_seed(pred, target, tangent, coef, 0.01, 1.0, backend, 1e-5, 1e-3)


def test_fp64_triton_matches_seed():
    pred, target, tangent, coef = make_inputs(SHAPES[1], True, dtype=torch.float64)
    check_against_seed(pred, target, tangent, coef, 1.0, 0.5, "triton", 1e-12, 1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 needs CUDA: the Triton CPU interpreter computes bf16 wrongly")
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_cuda_matches_seed(backend):
    pred, target, tangent, coef = make_inputs((8, 4, 48, 48, 48), True, torch.bfloat16)
    check_against_seed(pred, target, tangent, coef, 0.01, 1.0, backend, 1e-5, 1e-2)


def test_triton_many_chunks_and_steps(monkeypatch):
    # Shrink the block and the program target so rows span several chunks of several steps each,
    # with a ragged last step: the loop and partial-sum paths that large inputs take on a GPU.
    monkeypatch.setattr(loss_mod, "_BLOCK", 32)
    monkeypatch.setattr(loss_mod, "_TARGET_PROGRAMS", 4)
    pred, target, tangent, coef = make_inputs((3, 2, 9, 11, 13), True)
    assert loss_mod._chunk(3, pred[0].numel()) == 32 * 41  # 2 chunks of 41 steps per row
    check_against_seed(pred, target, tangent, coef, 0.01, 1.0, "triton", 1e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    # pred: channel slice (rows not contiguous, copied); target: every other sample (batch
    # stride only, a view); tangent: expanded over the batch (batch stride 0).
    B, C, H, W = 3, 3, 17, 19
    gen = torch.Generator().manual_seed(2)
    pred = torch.randn(B, 2 * C, H, W, generator=gen).to(DEVICE)[:, :C]
    target = torch.randn(2 * B, C, H, W, generator=gen).to(DEVICE)[::2]
    tangent = torch.randn(1, C, H, W, generator=gen).to(DEVICE).expand(B, C, H, W)
    coef = torch.rand(B, generator=gen).to(DEVICE)
    check_against_seed(pred, target, tangent, coef, 0.01, 1.0, backend, 1e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_to_pred(backend):
    pred, target, tangent, coef = make_inputs(SHAPES[0], True)
    leaves = [x.requires_grad_(True) for x in (pred, target, tangent, coef)]
    weighted, raw = adaptive_sq_loss(pred, target, tangent, coef, backend=backend)
    assert weighted.requires_grad and not raw.requires_grad
    weighted.mean().backward()  # a stride-0 upstream gradient, as every caller produces
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert all(x.grad is None for x in leaves[1:])
    pred64 = pred.detach().double().requires_grad_(True)
    seed_loss(pred64, target.double(), tangent.double(), coef.double(), 0.01, 1.0)[0].mean().backward()
    assert_rel_close(pred.grad, pred64.grad, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coef_forms_agree(backend):
    pred, target, tangent, coef = make_inputs(SHAPES[0], True)
    w = adaptive_sq_loss(pred, target, tangent, coef, backend=backend)[0]
    w4 = adaptive_sq_loss(pred, target, tangent, coef.view(-1, 1, 1, 1), backend=backend)[0]
    torch.testing.assert_close(w4, w, rtol=0, atol=0)
    w_float = adaptive_sq_loss(pred, target, tangent, 0.25, backend=backend)[0]
    w_full = adaptive_sq_loss(pred, target, tangent, torch.full((3,), 0.25, device=DEVICE),
                              backend=backend)[0]
    torch.testing.assert_close(w_float, w_full, rtol=0, atol=0)


def test_auto_is_torch_on_cpu():
    assert loss_mod._pick_backend(torch.zeros(1), "auto") == "torch"


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=torch.zeros(2, 3, 5)), "target shape"),
    (dict(tangent=torch.zeros(2, 3, 4), coef=None), "coef together with tangent"),
    (dict(coef=torch.zeros(2)), "coef together with tangent"),
    (dict(tangent=torch.zeros(2, 3, 4), coef=torch.zeros(3)), "B=2 numbers"),
    (dict(backend="cuda"), "backend must be"),
])
def test_errors(kwargs, match):
    args = dict(target=torch.zeros(2, 3, 4), tangent=None, coef=None) | kwargs
    backend = args.pop("backend", "torch")
    with pytest.raises(ValueError, match=match):
        adaptive_sq_loss(torch.zeros(2, 3, 4), **args, backend=backend)
