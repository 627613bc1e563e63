"""kernels.attention, triton backend: primal, tangent (torch.func.jvp, forward_ad) and gradients vs
fp64 math attention. On CPU the kernels run in the Triton interpreter (see conftest.py), where
fp32 / fp16 arithmetic is exact numpy but bf16 is not, so bf16 is checked on CUDA only."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from fastmf.models import build
from kernels import attention, attention_triton, attention_with_tangent

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (output, tangent and gradient) tolerances; inputs are rounded to the dtype before the fp64
# reference sees them, so these bound the kernels' own error (fp32 accumulation, P cast to dtype).
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.5e-2, 8e-2)}


def math_attention(q, k, v, scale):
    return torch.softmax(scale * q @ k.transpose(-2, -1), dim=-1) @ v


def triton(q, k, v):
    return attention(q, k, v, backend="triton")


def randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def reference(q, k, v, tangents, grad_o):
    """fp64 math attention: output, tangent and (dq, dk, dv) for the given output gradient."""
    scale = q.shape[-1] ** -0.5
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    o, t = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, scale), (q, k, v),
                          tuple(x.double() for x in tangents))
    return o.detach(), t, torch.autograd.grad(o, (q, k, v), grad_o.double())


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=tol)


def check_against_reference(q, k, v, tangents, grad_o, grad_tol=None):
    o_tol, d_tol = TOL[q.dtype]
    grad_tol = d_tol if grad_tol is None else grad_tol
    o_ref, t_ref, grads_ref = reference(q, k, v, tangents, grad_o)

    o, t = torch.func.jvp(triton, (q, k, v), tangents)
    assert o.dtype == t.dtype == q.dtype
    assert_close(o, o_ref, o_tol)
    assert_close(t, t_ref, d_tol)

    with fwAD.dual_level():
        t_fw = fwAD.unpack_dual(triton(*map(fwAD.make_dual, (q, k, v), tangents))).tangent
    assert_close(t_fw, t_ref, d_tol)

    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    grads = torch.autograd.grad(triton(qs, ks, vs), (qs, ks, vs), grad_o)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == q.dtype
        assert_close(g, g_ref, grad_tol)

    # The hand-written-JVP entry point (custom ops): O differentiable, dO stop-grad.
    o, t = attention_with_tangent(qs, ks, vs, *tangents, backend="triton")
    assert o.dtype == t.dtype == q.dtype and t.grad_fn is None
    assert_close(o.detach(), o_ref, o_tol)
    assert_close(t, t_ref, d_tol)
    for g, g_ref in zip(torch.autograd.grad(o, (qs, ks, vs), grad_o), grads_ref):
        assert_close(g, g_ref, grad_tol)


@pytest.mark.parametrize("B,H,N,D", [(1, 1, 1, 16), (2, 2, 1, 32), (1, 2, 17, 16), (2, 1, 17, 32),
                                     (1, 1, 77, 32), (2, 1, 77, 16), (1, 2, 64, 16)])  # 64: whole key blocks only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_matches_math_attention(B, H, N, D, dtype):
    q, k, v, dq, dk, dv, go = (randn((B, H, N, D), dtype, seed) for seed in range(7))
    check_against_reference(q, k, v, (dq, dk, dv), go)


@pytest.mark.parametrize("N,D", [(33, 64), (9, 128), (20, 24), (64, 24)])  # 24: padded head-dim tile
def test_other_head_dims(N, D):
    q, k, v, dq, dk, dv, go = (randn((1, 1, N, D), torch.float32, seed) for seed in range(7))
    check_against_reference(q, k, v, (dq, dk, dv), go)


def test_noncontiguous_inputs_tangents_and_gradient():
    B, H, N, D = 2, 2, 19, 16
    q, k, v = randn((3, B, N, H, D), torch.float32, 0).unbind(0)           # (B, N, H, D) each
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                         # (B, H, N, D) strided
    tangents = tuple(randn((B, H, D, N), torch.float32, s).transpose(-2, -1) for s in (1, 2, 3))
    grad_o = randn((N, B, H, D), torch.float32, 4).permute(1, 2, 0, 3)       # (B, H, N, D) strided
    assert not any(x.is_contiguous() for x in (q, k, v, grad_o, *tangents))
    check_against_reference(q, k, v, tangents, grad_o)


@pytest.mark.parametrize("backward", attention_triton.BACKWARDS)
def test_outputs_are_token_major_and_fake_kernels_say_so(backward, monkeypatch):
    """O, dO and dQ, dK, dV are stored (B, N, H, D), so the projections' reshape around attention is
    a view; the fake kernels torch.compile plans with must give the same strides as the real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from kernels import attention_triton as at
    from kernels.op_names import packet

    monkeypatch.setattr(at, "_backward_mode", backward)
    B, H, N, D = 2, 3, 19, 16
    q, k, v, dq, dk, dv, go = (randn((B, H, N, D), torch.float32, s) for s in range(7))
    with_tangent, backward_op = packet(at.WITH_TANGENT_OP), packet(at.BACKWARD_OP)
    real = [*with_tangent(q, k, v, dq, dk, dv, 0.25)]
    real += backward_op(q, k, v, real[0], real[1], go, 0.25)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv, fdq, fdk, fdv, fgo = (mode.from_tensor(x) for x in (q, k, v, dq, dk, dv, go))
        fake = [*with_tangent(fq, fk, fv, fdq, fdk, fdv, 0.25)]
        fake += backward_op(fq, fk, fv, fake[0], fake[1], fgo, 0.25)
    assert [x.stride() for x in real] == [x.stride() for x in fake]
    for name, x in zip(["o", "do", "dq", "dk", "dv"], [real[0], *real[2:]]):
        assert x.transpose(1, 2).is_contiguous(), name


def test_missing_tangents_are_zero():
    q, k, v, dq, dv = (randn((1, 2, 21, 16), torch.float32, seed) for seed in range(5))
    zero = torch.zeros_like(q)
    _, t = torch.func.jvp(lambda c: triton(q, k, c), (v,), (dv,))
    assert_close(t, reference(q, k, v, (zero, zero, dv), q)[1], TOL[torch.float32][1])
    with fwAD.dual_level():
        t_fw = fwAD.unpack_dual(triton(fwAD.make_dual(q, dq), k, v)).tangent
    assert_close(t_fw, reference(q, k, v, (dq, zero, zero), q)[1], TOL[torch.float32][1])



def test_stop_grad_outputs_get_no_gradient_and_an_unused_o_none():
    """dO is stop-grad (no zero-filled gradients are made for it or for lse), and where O's own
    gradient is undefined (an op that drops it), backward gives none instead of failing."""
    class DropFirst(torch.autograd.Function):  # o * 0 + x, whose backward leaves o's gradient undefined
        @staticmethod
        def forward(ctx, o, x):
            return o.sum() * 0 + x.sum()

        @staticmethod
        def backward(ctx, g):
            return None, g.expand(3)
    q, k, v, dq, dk, dv = (randn((1, 2, 9, 16), torch.float32, seed) for seed in range(6))
    q.requires_grad_()
    x = torch.ones(3, device=DEVICE, requires_grad=True)
    o, do = attention_with_tangent(q, k, v, dq, dk, dv, backend="triton")        # the custom op
    assert not do.requires_grad
    with fwAD.dual_level():                                                      # the autograd.Function
        o_fw = fwAD.unpack_dual(triton(fwAD.make_dual(q, dq), k, v)).primal
    for out in (o, o_fw):
        gq, gx = torch.autograd.grad(DropFirst.apply(out, x), (q, x), allow_unused=True)
        assert gq is None and torch.equal(gx, torch.ones_like(x))

def test_jvp_primal_is_differentiable_through_functional_call():
    """The MeanFlow pattern: jvp of a functional model, loss on the primal with the stop-grad
    tangent, ordinary backward to the parameters."""
    B, H, N, D = 2, 2, 17, 16
    proj = torch.nn.Linear(H * D, 3 * H * D).to(DEVICE)
    x, dx = randn((B, N, H * D), torch.float32, 0), randn((B, N, H * D), torch.float32, 1)

    def loss(attn, params, dtype):
        def f(x):
            qkv = torch.func.functional_call(proj, params, (x,)).unflatten(-1, (3, H, D))
            return attn(*(qkv[:, :, i].transpose(1, 2).to(dtype) for i in range(3)))  # (B, H, N, D)
        o, t = torch.func.jvp(f, (x.to(dtype),), (dx.to(dtype),))
        return (o * o - t.detach() * o).sum()

    params = {n: p.detach().requires_grad_() for n, p in proj.named_parameters()}
    loss(triton, params, torch.float32).backward()
    params_ref = {n: p.detach().double().requires_grad_() for n, p in proj.named_parameters()}
    loss(lambda a, b, c: math_attention(a, b, c, D ** -0.5), params_ref, torch.float64).backward()
    for n in params:
        assert_close(params[n].grad, params_ref[n].grad, 1e-4)


def test_nested_jvp_is_refused():
    q, dq = randn((1, 1, 4, 16), torch.float32, 0), randn((1, 1, 4, 16), torch.float32, 1)
    inner = lambda x: torch.func.jvp(lambda y: triton(y, y, y), (x,), (dq,))[1]
    with pytest.raises(NotImplementedError, match="first-order"):
        torch.func.jvp(inner, (q,), (dq,))


def test_autotuned_tiles_are_kept_on_disk_for_later_processes():
    """Outside the interpreter every autotuned kernel keeps its choice in Triton's cache, so a
    resumed run launches the tiles (and sums in the order) the first process timed."""
    code = ("from kernels import attention_triton as a; "
            "print(all(k.cache_results for k in (a._attn_fwd, a._attn_bwd_dkdv, a._attn_bwd_dq)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "True", run.stderr[-2000:]


@pytest.fixture
def atomic_backward():
    attention_triton.set_backward("atomic")
    yield attention_triton
    attention_triton.set_backward("two-pass")


def count_launches(monkeypatch, module, *names):
    """Replace module's kernels `names` by wrappers that count their launches: {name: count}."""
    counts = dict.fromkeys(names, 0)

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            counts[self.name] += 1
            return self.kernel[grid]
    for name in names:
        monkeypatch.setattr(module, name, Counted(name, getattr(module, name)))
    return counts


def use_tiles(monkeypatch, query_major, key_major):
    """Make the autotuned kernels launch with exactly these (BLOCK_M, BLOCK_N, warps, stages)
    tiles: the interpreter otherwise runs 32 x 32 only, so the GPU's tiles would first run in a
    benchmark, unchecked. Returns a check that the launches used them."""
    at = attention_triton
    tiles = {at._attn_fwd: query_major, at._attn_bwd_dq: query_major, at._attn_bwd_dkdv: key_major}
    for kernel, (m, n, warps, stages) in tiles.items():
        config = at.triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        monkeypatch.setattr(kernel, "configs", [config])

    def launched(*kernels):
        for kernel in kernels:
            m, n, *_ = tiles[kernel]
            assert kernel.best_config.kwargs == {"BLOCK_M": m, "BLOCK_N": n}
    return launched


# On CUDA the tile tests run in bf16 at the head dims and the kind of sequence length the GPU runs
# use: Triton specialises a kernel on whether an int argument such as N is divisible by 16, so N =
# 208 compiles the binaries that the attention benchmark (N = 4096 ...) times and, at D = 64, N = 205
# those of the models' steps (276 or 13,844 tokens); gpu_run.sh runs these tests in parallel first,
# which fills Triton's cache for those stages. In the interpreter: fp32, N = 208, every tile at
# D = 64 and the largest at D = 128 (each case costs seconds there). Both N are ragged against every
# tile (whole key and query blocks, then a masked one).
CUDA = DEVICE == "cuda"
TILE_DTYPE = torch.bfloat16 if CUDA else torch.float32
TILE_CASES = {64: (205, 208) if CUDA else (208,), 128: (208,)}  # head dim -> sequence lengths


def _tile_id(tile):
    m, n, _, stages = tile
    return f"{m}x{n}s{stages}"


def _tile_pairs():
    """Each query-major tile beside a key-major one, every tile at least once, per (D, N)."""
    qm, km = attention_triton.QUERY_MAJOR_TILES, attention_triton.KEY_MAJOR_TILES
    pairs = [(qm[i % len(qm)], km[i % len(km)]) for i in range(max(len(qm), len(km)))]
    return [pytest.param(a, b, d, n, id=f"fwd{_tile_id(a)}-bwd{_tile_id(b)}-d{d}-n{n}")
            for d, ns in TILE_CASES.items() for n in ns for a, b in (pairs if CUDA or d == 64 else pairs[:1])]


def _atomic_tiles():
    """Every key-major tile per (D, N); D = 64 only in the interpreter."""
    return [pytest.param(t, d, n, id=f"{_tile_id(t)}-d{d}-n{n}") for d, ns in TILE_CASES.items()
            if CUDA or d == 64 for n in ns for t in attention_triton.KEY_MAJOR_TILES]


def _lazy_tiles():
    """Every query-major tile per (D, N) on CUDA; in the interpreter the largest at D = 64 (the
    block-wide max over 128 rows)."""
    tiles = attention_triton.QUERY_MAJOR_TILES
    cases = [(t, d, n) for d, ns in TILE_CASES.items() for n in ns for t in tiles] if CUDA else [(tiles[0], 64, 208)]
    return [pytest.param(t, d, n, id=f"{_tile_id(t)}-d{d}-n{n}") for t, d, n in cases]


def skip_if_it_cannot_launch(check):
    """Run check(); a tile that needs more shared memory than this GPU has cannot launch (the
    autotuner skips it in real runs): the case is skipped, saying so."""
    try:
        check()
    except attention_triton.triton.runtime.errors.OutOfResources as e:
        pytest.skip(f"this tile cannot launch on this GPU, and the autotuner skips it: {e}")


@pytest.mark.parametrize("query_major,key_major,D,N", _tile_pairs())
def test_every_gpu_tile_matches_math_attention(query_major, key_major, D, N, monkeypatch):
    launched = use_tiles(monkeypatch, query_major, key_major)
    q, k, v, dq, dk, dv, go = (randn((1, 2, N, D), TILE_DTYPE, seed) for seed in range(7))
    skip_if_it_cannot_launch(lambda: check_against_reference(q, k, v, (dq, dk, dv), go))
    at = attention_triton
    launched(at._attn_fwd, at._attn_bwd_dkdv, at._attn_bwd_dq)


@pytest.mark.parametrize("query_major,D,N", _lazy_tiles())
def test_every_gpu_tile_of_the_lazy_forward_matches(query_major, D, N, lazy_rescale, monkeypatch):
    launched = use_tiles(monkeypatch, query_major, attention_triton.KEY_MAJOR_TILES[0])
    q, k, v, dq, dk, dv, go = rising_keys(1, 2, N, D, TILE_DTYPE, 1.0)  # the stale max is kept
    o_ref, t_ref, _ = reference(q, k, v, (dq, dk, dv), go)

    def check():
        o, t = torch.func.jvp(triton, (q, k, v), (dq, dk, dv))
        assert_close(o, o_ref, TOL[TILE_DTYPE][0])
        assert_close(t, t_ref, TOL[TILE_DTYPE][1])
    skip_if_it_cannot_launch(check)
    launched(attention_triton._attn_fwd)


@pytest.mark.parametrize("key_major,D,N", _atomic_tiles())
def test_every_gpu_tile_of_the_atomic_dq_backward_matches(key_major, D, N, atomic_backward, monkeypatch):
    launched = use_tiles(monkeypatch, attention_triton.QUERY_MAJOR_TILES[-1], key_major)
    q, k, v, go = (randn((2, 1, N, D), TILE_DTYPE, seed) for seed in range(4))
    _, _, grads_ref = reference(q, k, v, (q, k, v), go)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))

    def check():
        for g, g_ref in zip(torch.autograd.grad(triton(qs, ks, vs), (qs, ks, vs), go), grads_ref):
            assert_close(g, g_ref, TOL[TILE_DTYPE][1])
    skip_if_it_cannot_launch(check)
    launched(attention_triton._attn_bwd_dkdv)


BF16_ON_CUDA = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 needs CUDA: the Triton interpreter computes bf16 arithmetic wrongly"))


@pytest.mark.parametrize("B,H,N,D", [(2, 1, 77, 16), (1, 2, 64, 32), (1, 1, 33, 24), (2, 2, 1, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_ON_CUDA], ids=DTYPE_IDS.get)
def test_atomic_dq_backward_matches_math_attention(B, H, N, D, dtype, atomic_backward, monkeypatch):
    launches = count_launches(monkeypatch, atomic_backward, "_attn_bwd_dq")  # the two-pass backward's dQ kernel
    q, k, v, go = (randn((B, H, N, D), dtype, seed) for seed in range(4))
    _, _, (dq_ref, dk_ref, dv_ref) = reference(q, k, v, (q, k, v), go)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    grads = torch.autograd.grad(triton(qs, ks, vs), (qs, ks, vs), go)
    assert launches["_attn_bwd_dq"] == 0  # dQ came from the atomics
    for g, g_ref in zip(grads, (dq_ref, dk_ref, dv_ref)):
        assert g.dtype == dtype
        assert_close(g, g_ref, TOL[dtype][1])
    torch.use_deterministic_algorithms(True)  # keeps the two-pass dQ
    try:
        torch.autograd.grad(triton(qs, ks, vs), qs, go)
    finally:
        torch.use_deterministic_algorithms(False)
    assert launches["_attn_bwd_dq"] == 1
    with pytest.raises(ValueError, match="flash backward must be one of"):
        atomic_backward.set_backward("fast")


@pytest.fixture
def sdpa_backward():
    attention_triton.set_backward("sdpa")
    yield attention_triton
    attention_triton.set_backward("two-pass")


# q, k, v strided as MiT's views of its stacked projection: (B, N, 3, H, D) storage.
@pytest.mark.parametrize("B,H,N,D,stacked", [(2, 1, 77, 16, False), (1, 2, 64, 32, True), (1, 1, 33, 24, True),
                                             (2, 2, 1, 16, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_ON_CUDA], ids=DTYPE_IDS.get)
def test_sdpa_backward_matches_math_attention(B, H, N, D, stacked, dtype, sdpa_backward, monkeypatch):
    """set_backward("sdpa"): SDPA's backward kernel on this forward's O and log-sum-exp (cuDNN on
    CUDA, the CPU flash kernel here) gives the gradients, and no Triton backward kernel runs."""
    launches = count_launches(monkeypatch, sdpa_backward, "_attn_bwd_dkdv", "_attn_bwd_dq")
    if stacked:
        q, k, v = randn((B, N, 3, H, D), dtype, 0).unbind(2)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))                  # (B, H, N, D) views
    else:
        q, k, v = (randn((B, H, N, D), dtype, seed) for seed in range(3))
    go = randn((B, H, N, D), dtype, 3)
    _, _, grads_ref = reference(q, k, v, (q, k, v), go)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    o, _ = attention_with_tangent(qs, ks, vs, q, k, v, backend="triton")   # the fast step's call
    by_sdpa = sdpa_backward._sdpa_takes(q, k, v)  # on CUDA: not for (B, H, N, D)-ordered inputs
    for g, g_ref in zip(torch.autograd.grad(o, (qs, ks, vs), go), grads_ref):
        assert g.dtype == dtype and g.transpose(1, 2).is_contiguous()
        assert_close(g, g_ref, TOL[dtype][1])
    assert launches == {"_attn_bwd_dkdv": 0 if by_sdpa else 1, "_attn_bwd_dq": 0 if by_sdpa else 1}
    torch.use_deterministic_algorithms(True)  # keeps the two-pass Triton backward
    try:
        torch.autograd.grad(triton(qs, ks, vs), qs, go)
    finally:
        torch.use_deterministic_algorithms(False)
    assert launches["_attn_bwd_dq"] == (1 if by_sdpa else 2)


@pytest.fixture
def lazy_rescale():
    attention_triton.set_rescale("lazy")
    yield attention_triton
    attention_triton.set_rescale("always")


def rising_keys(B, H, N, D, dtype, rise):
    """q, k, v, tangents and dO where every query's logits rise along the keys by `rise` (in log2
    units) per 32 keys, plus noise: from block to block the row maxima grow by less than lazy
    rescaling's 8 (rise 1: it keeps the stale max) or by far more (it must rescale)."""
    u = randn((D,), torch.float64, 0)
    u = u / u.norm()                                                 # a direction every q shares
    q = D ** 0.5 * u + 0.3 * randn((B, H, N, D), torch.float64, 1)   # scale q.u = 1 (+ noise)
    ramp = rise * math.log(2) / 32 * torch.arange(N, dtype=torch.float64, device=DEVICE)
    k = 0.3 * randn((B, H, N, D), torch.float64, 2) + ramp[:, None] * u   # scale q.k ~ ramp
    v, dq, dk, dv, go = (randn((B, H, N, D), torch.float64, seed) for seed in range(3, 8))
    return tuple(x.to(dtype) for x in (q, k, v, dq, dk, dv, go))


# Rises of 80 (fp32: past the first block p would pass 2^128 within 100 keys) and 10 (fp16: 2^16)
# make an accumulator overflow unless rescaled; half types stay at 10, where the tangent's large dS
# keeps them within tolerance. On CUDA 208 keys at D = 64 and 128: the attention benchmark's binaries.
@pytest.mark.parametrize("dtype,rise", [
    (torch.float32, 1.0), (torch.float32, 80.0), (torch.float16, 1.0), (torch.float16, 10.0),
    *(pytest.param(torch.bfloat16, r, marks=BF16_ON_CUDA.marks) for r in (1.0, 10.0))], ids=lambda x: DTYPE_IDS.get(x, x))
@pytest.mark.parametrize("N,D", [(208, 64), (208, 128)] if CUDA else [(100, 32)])
def test_lazy_rescale_matches_math_attention(dtype, rise, N, D, lazy_rescale):
    q, k, v, dq, dk, dv, go = rising_keys(1, 2, N, D, dtype, rise)
    # The flash backward recomputes P = exp(s - lse): s and lse carry their own rounding, about
    # max|s| eps each, as a relative error of every P (math attention's s - max is exact instead),
    # and dV sums N such P dO. Rise 80 makes max|s| ~ 190: a bound of 2 max|s| eps max|dO| sqrt(N)
    # (here 1.9e-3; measured 2.1e-4 in the interpreter on an AMD EPYC, where fp32 math attention is
    # off by 7e-5; under 1e-4 on the machine before). At rise 1 (max|s| ~ 3) and for fp16 (s is
    # accumulated in fp32: max|s| 24, bound 2e-4) TOL's own tolerance is the larger: unchanged.
    logit_max = (q.double() @ k.double().transpose(-1, -2)).abs().max().item() * D ** -0.5
    bound = 2 * logit_max * torch.finfo(torch.float32).eps * go.abs().max().item() * N ** 0.5  # s is fp32
    check_against_reference(q, k, v, (dq, dk, dv), go, grad_tol=max(TOL[dtype][1], bound))
    o_lazy, _, t_lazy = lazy_rescale._flash_forward(q, k, v, dq, dk, dv, q.shape[-1] ** -0.5)
    lazy_rescale.set_rescale("always")
    o, _, t = lazy_rescale._flash_forward(q, k, v, dq, dk, dv, q.shape[-1] ** -0.5)
    if rise < 8:  # a stale max rounds differently: the lazy branch ran
        assert not torch.equal(o_lazy, o) and not torch.equal(t_lazy, t)
    with pytest.raises(ValueError, match="forward rescale must be one of"):
        lazy_rescale.set_rescale("sometimes")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 needs CUDA: the Triton interpreter computes bf16 arithmetic wrongly")
@pytest.mark.parametrize("B,H,N,D", [(2, 3, 77, 32), (2, 2, 257, 64), (1, 2, 1000, 128)])
def test_bf16_on_cuda(B, H, N, D):
    q, k, v, dq, dk, dv, go = (randn((B, H, N, D), torch.bfloat16, seed) for seed in range(7))
    check_against_reference(q, k, v, (dq, dk, dv), go)


def test_mit_tiny_same_with_triton_and_torch_backends():
    """Whole model in fp32: outputs, the MeanFlow JVP and parameter gradients agree."""
    models = {}
    for backend in ("torch", "triton"):
        # one trunk block + one u-head block keeps the interpreter run short
        models[backend] = build("mit-tiny", attn_backend=backend, input_size=(8, 8), in_channels=2,
                                num_classes=5, depth=2, aux_head_depth=1, num_heads=2).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-init gates would hide attention from the outputs entirely
        for p in models["torch"].parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(DEVICE))
    models["triton"].load_state_dict(models["torch"].state_dict())

    B = 2
    z, dz = randn((B, 2, 8, 8), torch.float32, 1), randn((B, 2, 8, 8), torch.float32, 2)
    t, r = torch.tensor([0.9, 0.4], device=DEVICE), torch.tensor([0.2, 0.4], device=DEVICE)
    cond = (torch.tensor([1.0, 3.0]), torch.zeros(B), torch.ones(B), torch.tensor([1, 4]))
    omega, t_min, t_max, y = (c.to(DEVICE) for c in cond)
    results = {}
    for backend, model in models.items():
        params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}

        def u_fn(z, t, r):
            return torch.func.functional_call(model, params, (z, t, t - r, omega, t_min, t_max, y),
                                              {"heads": "u"})[0]
        u, du = torch.func.jvp(u_fn, (z, t, r), (dz, torch.ones_like(t), torch.zeros_like(r)))
        loss = (u - (dz - (t - r)[:, None, None, None] * du).detach()).square().sum()
        grads = torch.autograd.grad(loss, list(params.values()), materialize_grads=True)  # v-head: 0
        results[backend] = (u, du, grads)
    (u, du, grads), (u_ref, du_ref, grads_ref) = results["triton"], results["torch"]
    assert du_ref.abs().max() > 1e-2  # the comparison is not vacuous
    torch.testing.assert_close(u, u_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(du, du_ref, atol=1e-4, rtol=1e-4)
    for gr, gr_ref in zip(grads, grads_ref):
        torch.testing.assert_close(gr, gr_ref, atol=1e-4, rtol=1e-3)
