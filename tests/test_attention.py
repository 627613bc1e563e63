"""kernels.attention, torch backend: primal, jvp (torch.func and forward_ad) and backward vs fp64 math."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from kernels import attention


def math_attention(q, k, v, scale):
    return torch.softmax(scale * q @ k.transpose(-2, -1), dim=-1) @ v


@pytest.mark.parametrize("B,H,N,D", [(1, 1, 1, 16), (2, 3, 17, 32), (1, 2, 77, 64), (2, 1, 5, 128)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_torch_backend_matches_math_attention(B, H, N, D, dtype, tol):
    g = torch.Generator().manual_seed(N)
    mk = lambda: torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    q, k, v, dq, dk, dv, do = (mk() for _ in range(7))
    scale = D ** -0.5
    o_ref, t_ref = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, scale), (q, k, v), (dq, dk, dv))
    cast = lambda *xs: tuple(x.to(dtype) for x in xs)
    o, t = torch.func.jvp(lambda a, b, c: attention(a, b, c, backend="torch"), cast(q, k, v), cast(dq, dk, dv))
    torch.testing.assert_close(o.double(), o_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(t.double(), t_ref, atol=10 * tol, rtol=10 * tol)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, b) for a, b in zip(cast(q, k, v), cast(dq, dk, dv))]
        t_fw = fwAD.unpack_dual(attention(*duals, backend="torch")).tangent
    torch.testing.assert_close(t_fw.double(), t_ref, atol=10 * tol, rtol=10 * tol)
    qs, ks, vs = (x.clone().requires_grad_() for x in cast(q, k, v))
    grads = torch.autograd.grad(attention(qs, ks, vs, backend="torch"), (qs, ks, vs), do.to(dtype))
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    grads_ref = torch.autograd.grad(math_attention(qr, kr, vr, scale), (qr, kr, vr), do)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b, atol=10 * tol, rtol=10 * tol)


def test_missing_tangents_are_zero_and_noncontiguous_inputs_work():
    q, k, v = torch.randn(3, 2, 9, 2, 16, dtype=torch.float64).unbind(0)  # (2, 9, 2, 16) each
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                   # non-contiguous (B, H, N, D)
    dv = torch.randn_like(v)
    _, t = torch.func.jvp(lambda c: attention(q, k, c), (v,), (dv,))
    _, t_ref = torch.func.jvp(lambda c: math_attention(q, k, c, 0.25), (v,), (dv,))
    torch.testing.assert_close(t, t_ref)


def test_bad_shapes_and_backend_names():
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="equal shape"):
        attention(x, x[..., :4], x)
    with pytest.raises(ValueError, match="backend"):
        attention(x, x, x, backend="cuda")


def test_auto_backend_choice():
    from kernels.attention import _has_tangent, _pick_backend
    cpu = torch.zeros(1, 1, 2, 4)
    assert _pick_backend(cpu, "auto", needs_tangent=True) == "torch"
    assert _pick_backend(cpu, "auto", needs_tangent=False) == "sdpa"
    assert _pick_backend(cpu, "triton", needs_tangent=False) == "triton"

    class FakeCuda:  # only .is_cuda is read when choosing
        is_cuda = True
    assert _pick_backend(FakeCuda(), "auto", needs_tangent=False) == "sdpa"
    assert _pick_backend(FakeCuda(), "auto", needs_tangent=True) in ("triton", "torch")
    assert not _has_tangent(cpu, cpu)
    seen = []
    torch.func.jvp(lambda a: seen.append(_has_tangent(a)) or a, (cpu,), (torch.ones_like(cpu),))
    assert seen == [True]


def test_auto_backend_is_exact_under_jvp_and_backward():
    """'auto' (SDPA without a tangent, the JVP-rule backend with one) gives the math reference's
    output, tangent and gradients, through torch.func.jvp and forward_ad alike."""
    g = torch.Generator().manual_seed(5)
    q, k, v, dq, dk, dv = torch.randn(6, 2, 3, 7, 8, generator=g, dtype=torch.float64)
    o_ref, do_ref = torch.func.jvp(lambda *a: math_attention(*a, 8 ** -0.5), (q, k, v), (dq, dk, dv))
    o, do = torch.func.jvp(lambda *a: attention(*a, backend="auto"), (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(do, do_ref)
    with fwAD.dual_level():
        do_fw = fwAD.unpack_dual(attention(fwAD.make_dual(q, dq), fwAD.make_dual(k, dk),
                                           fwAD.make_dual(v, dv), backend="auto")).tangent
    torch.testing.assert_close(do_fw, do_ref)
    qkv = [x.clone().requires_grad_(True) for x in (q, k, v)]
    grads = torch.autograd.grad((attention(*qkv, backend="auto") * dq).sum(), qkv)
    grads_ref = torch.autograd.grad((math_attention(*qkv, 8 ** -0.5) * dq).sum(), qkv)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_attention_with_tangent_torch_backend():
    """Hand-written-JVP entry point, math backend: O and dO equal torch.func.jvp of math attention,
    O is differentiable (dO is not), and it compiles without graph breaks."""
    from kernels import attention_with_tangent
    g = torch.Generator().manual_seed(9)
    q, k, v, dq, dk, dv, go = torch.randn(7, 2, 3, 13, 8, generator=g, dtype=torch.float64)
    scale = 8 ** -0.5
    o_ref, do_ref = torch.func.jvp(lambda *a: math_attention(*a, scale), (q, k, v), (dq, dk, dv))
    qkv = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o, do = attention_with_tangent(*qkv, dq, dk, dv, backend="torch")
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(do, do_ref)
    assert do.grad_fn is None
    grads = torch.autograd.grad(o, qkv, go)
    grads_ref = torch.autograd.grad(math_attention(*qkv, scale), qkv, go)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: attention_with_tangent(*a, backend="torch"), fullgraph=True)
    o_c, do_c = compiled(q, k, v, dq, dk, dv)
    torch.testing.assert_close(o_c, o_ref)
    torch.testing.assert_close(do_c, do_ref)
