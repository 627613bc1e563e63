"""Flash attention in Triton: a forward that also computes the output tangent, and a flash backward.

Same math as the torch backend in kernels/attention.py (s = scale, P = softmax(s Q K^T)):
    O  = P V
    dO = P (dS V + dV) - rowsum(P * dS) O,     dS = s (dQ K^T + Q dK^T)
computed block by block with one online softmax (running max m shared by primal and tangent), so
no N x N tensor ever exists. Backward is the ordinary FlashAttention-2 backward of the primal: P is
recomputed from the saved log-sum-exp (set_backward: other ways to the same gradients, SDPA's own
kernel among them). The tangent is stop-grad in every MeanFlow loss, so it is never differentiated.

Tangents reach the fused kernel because `triton_attention` unpacks them from the dual inputs
(`forward_ad.unpack_dual` sees both `torch.func.jvp` and `torch.autograd.forward_ad` duals) and
passes them to the autograd.Function as extra inputs; `jvp` then returns the tangent the forward
already computed. Only first-order forward mode is supported: a jvp nested in a jvp would need
the kernels themselves to be forward-differentiable.

Runs on CUDA, or on CPU in the Triton interpreter (TRITON_INTERPRET=1 set before importing triton).
"""
import inspect
import os

import torch
import torch.autograd.forward_ad as fwAD
import triton
import triton.language as tl
from torch._functorch import eager_transforms

from kernels.op_names import versioned_name

LOG2E = tl.constexpr(1.4426950408889634)  # softmax runs in base 2: exp(x) = exp2(x * log2(e))

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # larger tiles no longer fit registers / shared memory


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

def _configs(tiles):
    """Autotune candidates from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples.

    The interpreter runs each tile as numpy arrays, where timing means nothing and every extra
    config would be benchmarked by re-running the kernel: it gets one config (the autotuner then
    skips benchmarking), 32 x 32 to keep the Python-level loop short at test sizes.
    """
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


def _prune(configs, named_args, **_):
    """Drop tiles longer than the (power-of-two padded) sequence: they only compute padding."""
    n = max(16, triton.next_power_of_2(named_args["N"]))
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= n and c.kwargs["BLOCK_N"] <= n]
    return fitting or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_PRUNE = {"early_config_prune": _prune}
# Each autotune choice is kept in Triton's on-disk cache (keyed by kernel source, device, key
# values and dtypes), so every process on a machine, a resumed run's too, launches the tile the
# first one timed. The tile sets the order of the softmax and gradient sums: a process that timed
# again and picked another (timings within noise of each other) would differ in the last bits.
# Triton >= 3.2 has the option; the interpreter ignores it.
_AUTOTUNE = {"prune_configs_by": _PRUNE} | (
    {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {})
# Query-major kernels (forward, dQ) favour tall query tiles; the dK/dV kernel the transpose.
# 128 x 128: about 20% fewer sm_90 instructions per score than 128 x 64 without spilling, except
# the fused forward+JVP at D = 128 (bench/kernel_sass.py); the autotuner times it like the rest.
# Tiles a kernel cannot launch (more shared memory than sm_90's 227 KiB: at D = 128 the forward+JVP
# at 128 x 128 and 128 x 64 with 3 stages, dQ at 128 x 128) the autotuner skips. 128 x 64 with 2
# stages (192 KiB) is there for the forward+JVP at D = 128, its only launchable 128-row tile.
QUERY_MAJOR_TILES = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
                     (64, 32, 4, 2), (32, 32, 4, 2)]
KEY_MAJOR_TILES = [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2), (32, 32, 4, 2)]
_QUERY_MAJOR = _configs(QUERY_MAJOR_TILES)
_KEY_MAJOR = _configs(KEY_MAJOR_TILES)


@triton.jit
def _head(base, strides, b, h):
    # Start of one (batch, head) slice; int64 because B*H*N*D can exceed 2**31 elements.
    return base + b.to(tl.int64) * strides[0] + h.to(tl.int64) * strides[1]


@triton.jit
def _load_rows(head, strides, rows, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr = True):
    # (len(rows), BLOCK_D) tile; rows >= N and padded head-dim columns read as zero, so they add
    # nothing to any dot product. MASK_ROWS=False: every row is < N (a whole block), and with
    # BLOCK_D == HEAD_DIM the load needs no mask at all.
    cols = tl.arange(0, BLOCK_D)
    ptrs = head + rows[:, None] * strides[2] + cols[None, :] * strides[3]
    if MASK_ROWS:
        tile = tl.load(ptrs, mask=(rows[:, None] < N) & (cols[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM < BLOCK_D:
        tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_rows(head, strides, rows, N, tile, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    ptrs = head + rows[:, None] * strides[2] + cols[None, :] * strides[3]
    tl.store(ptrs, tile.to(head.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _rescale(alpha, l, acc_o, mu, acc_t, TANGENT_S: tl.constexpr, TANGENT_V: tl.constexpr):
    # The online softmax's accumulators, moved to a new row max: alpha = exp(m_old - m_new) per row.
    l, acc_o = l * alpha, acc_o * alpha[:, None]
    if TANGENT_S or TANGENT_V:
        acc_t = acc_t * alpha[:, None]
    if TANGENT_S:
        mu = mu * alpha
    return l, acc_o, mu, acc_t


@triton.jit
def _fwd_key_block(q, tq, k_head, v_head, tk_head, tv_head, k_strides, v_strides, tk_strides, tv_strides,
                   start_n, N, qk_scale, m, l, acc_o, mu, acc_t,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   TANGENT_Q: tl.constexpr, TANGENT_K: tl.constexpr, TANGENT_V: tl.constexpr,
                   PRECISION: tl.constexpr, LAZY_RESCALE: tl.constexpr, LAST: tl.constexpr):
    """One key block of _attn_fwd's online softmax: the updated (m, l, acc_o, mu, acc_t); tq and the
    TK tiles are scaled tangents (see _attn_fwd). LAST: the block holds keys past N (masked); every
    other block is whole, so its loads and scores need no mask. LAZY_RESCALE: see set_rescale."""
    TANGENT_S: tl.constexpr = TANGENT_Q or TANGENT_K   # dS is zero without dQ and dK
    cols = start_n + tl.arange(0, BLOCK_N)                                   # (BLOCK_N,)
    k = _load_rows(k_head, k_strides, cols, N, HEAD_DIM, BLOCK_D, LAST)      # (BLOCK_N, BLOCK_D)
    v = _load_rows(v_head, v_strides, cols, N, HEAD_DIM, BLOCK_D, LAST)      # (BLOCK_N, BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)                  # (BLOCK_M, BLOCK_N) unscaled
    if LAST:
        qk = tl.where(cols[None, :] < N, qk, float("-inf"))                 # keys past N get p = 0
    m_block = tl.max(qk, 1) * qk_scale  # finite: every block holds at least one real key
    if LAZY_RESCALE:
        # Keep the stale max while no row's grows by more than 8 (p <= 2^8: safe in fp32 and bf16);
        # rescale only when some row's does (a block-wide max per key block).
        if tl.max(m_block - m, 0) > 8.0:
            m_new = tl.maximum(m, m_block)
            l, acc_o, mu, acc_t = _rescale(tl.exp2(m - m_new), l, acc_o, mu, acc_t, TANGENT_S, TANGENT_V)
            m = m_new
    else:
        m_new = tl.maximum(m, m_block)
        l, acc_o, mu, acc_t = _rescale(tl.exp2(m - m_new), l, acc_o, mu, acc_t, TANGENT_S, TANGENT_V)
        m = m_new
    p = tl.exp2(qk * qk_scale - m[:, None])                                  # one FMA, one exp2 each
    l = l + tl.sum(p, 1)
    acc_o = tl.dot(p.to(v.dtype), v, acc_o, input_precision=PRECISION)
    if TANGENT_V:
        tv = _load_rows(tv_head, tv_strides, cols, N, HEAD_DIM, BLOCK_D, LAST).to(v.dtype)
        acc_t = tl.dot(p.to(v.dtype), tv, acc_t, input_precision=PRECISION)
    if TANGENT_S:
        ds = tl.zeros(qk.shape, tl.float32)                                  # dS, scale included
        if TANGENT_Q:
            ds = tl.dot(tq, tl.trans(k), ds, input_precision=PRECISION)
        if TANGENT_K:
            tk = _load_rows(tk_head, tk_strides, cols, N, HEAD_DIM, BLOCK_D, LAST).to(q.dtype)
            ds = tl.dot(q, tl.trans(tk), ds, input_precision=PRECISION)
        p_ds = p * ds                                                        # (BLOCK_M, BLOCK_N)
        mu = mu + tl.sum(p_ds, 1)
        acc_t = tl.dot(p_ds.to(v.dtype), v, acc_t, input_precision=PRECISION)
    return m, l, acc_o, mu, acc_t


@triton.autotune(_QUERY_MAJOR, key=["N", "HEAD_DIM", "TANGENT_Q", "TANGENT_K", "TANGENT_V", "LAZY_RESCALE"],
                 **_AUTOTUNE)
@triton.jit
def _attn_fwd(Q, K, V, TQ, TK, TV, O, TO, LSE,
              q_strides, k_strides, v_strides, tq_strides, tk_strides, tv_strides,
              o_strides, to_strides,
              H, N, scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              TANGENT_Q: tl.constexpr, TANGENT_K: tl.constexpr, TANGENT_V: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              LAZY_RESCALE: tl.constexpr = False):
    """One (query block, batch, head): O, its log-sum-exp and, if any tangent is given, dO.

    Online softmax over key blocks with p~ = exp(s q.k - m) for the running row max m; every
    accumulator is rescaled by alpha = exp(m_old - m_new) when m grows (LAZY_RESCALE: only when
    some row's grows by more than a factor 2^8, see set_rescale):
        l = sum p~,  acc_o = sum p~ V,  mu = sum p~ dS,  acc_t = sum (p~ dS) V + p~ dV
    and at the end O = acc_o / l, dO = acc_t / l - (mu / l) O (the TANGENT_* flags drop the
    terms of missing tangents at compile time). TQ and TK hold s dQ and s dK (the launchers scale
    them), so dS = TQ K^T + Q TK^T needs no per-score multiply.
    """
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                        # (BLOCK_M,)
    q_head, k_head, v_head = _head(Q, q_strides, b, h), _head(K, k_strides, b, h), _head(V, v_strides, b, h)
    tk_head, tv_head = _head(TK, tk_strides, b, h), _head(TV, tv_strides, b, h)
    q = _load_rows(q_head, q_strides, rows, N, HEAD_DIM, BLOCK_D, True)   # (BLOCK_M, BLOCK_D)
    tq = q  # a stand-in when TANGENT_Q is off (never read)
    if TANGENT_Q:
        tq = _load_rows(_head(TQ, tq_strides, b, h), tq_strides, rows, N, HEAD_DIM, BLOCK_D, True).to(q.dtype)
    qk_scale = scale * LOG2E

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    mu = tl.zeros((BLOCK_M,), tl.float32)
    acc_t = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    n_whole = N // BLOCK_N * BLOCK_N
    for start_n in range(0, n_whole, BLOCK_N):
        m, l, acc_o, mu, acc_t = _fwd_key_block(
            q, tq, k_head, v_head, tk_head, tv_head, k_strides, v_strides, tk_strides, tv_strides,
            start_n, N, qk_scale, m, l, acc_o, mu, acc_t, HEAD_DIM, BLOCK_D, BLOCK_N,
            TANGENT_Q, TANGENT_K, TANGENT_V, PRECISION, LAZY_RESCALE, False)
    if n_whole < N:
        m, l, acc_o, mu, acc_t = _fwd_key_block(
            q, tq, k_head, v_head, tk_head, tv_head, k_strides, v_strides, tk_strides, tv_strides,
            n_whole, N, qk_scale, m, l, acc_o, mu, acc_t, HEAD_DIM, BLOCK_D, BLOCK_N,
            TANGENT_Q, TANGENT_K, TANGENT_V, PRECISION, LAZY_RESCALE, True)

    o = acc_o / l[:, None]                                                  # (BLOCK_M, BLOCK_D)
    _store_rows(_head(O, o_strides, b, h), o_strides, rows, N, o, HEAD_DIM, BLOCK_D)
    lse = (m + tl.log2(l)) / LOG2E                                          # natural log-sum-exp
    tl.store(LSE + (b * H + h).to(tl.int64) * N + rows, lse, mask=rows < N)
    if TANGENT_Q or TANGENT_K or TANGENT_V:
        t = acc_t / l[:, None] - (mu / l)[:, None] * o
        _store_rows(_head(TO, to_strides, b, h), to_strides, rows, N, t, HEAD_DIM, BLOCK_D)


# reset_to_zero: the autotuner's timing runs would otherwise add into the dQ accumulator.
@triton.autotune(_KEY_MAJOR, key=["N", "HEAD_DIM", "ATOMIC_DQ"], reset_to_zero=["DQ"], **_AUTOTUNE)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, GO, LSE, DELTA, DK, DV, DQ,
                   q_strides, k_strides, v_strides, go_strides, dk_strides, dv_strides, dq_strides,
                   H, N, scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                   ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (key block, batch, head): dK and dV, looping over all query blocks.

    With P^T recomputed from the log-sum-exp and Delta = rowsum(dO * O) = rowsum(P * dP):
        dV = P^T dO,  dS^T = P^T * (V dO^T - Delta),  dK = scale dS^T Q
    ATOMIC_DQ: also add each block's share of dQ / scale = dS K into the fp32, zeroed DQ with
    atomics (5 matmuls per block pair instead of the 7 this kernel and _attn_bwd_dq make
    together; the order of the additions, hence dQ's last bits, varies from run to run).
    """
    pid_n, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                          # (BLOCK_N,) keys
    q_head, go_head = _head(Q, q_strides, b, h), _head(GO, go_strides, b, h)
    k = _load_rows(_head(K, k_strides, b, h), k_strides, cols, N, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(_head(V, v_strides, b, h), v_strides, cols, N, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    row_stats = (b * H + h).to(tl.int64) * N
    qk_scale = scale * LOG2E

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)                              # (BLOCK_M,) queries
        q = _load_rows(q_head, q_strides, rows, N, HEAD_DIM, BLOCK_D)       # (BLOCK_M, BLOCK_D)
        go = _load_rows(go_head, go_strides, rows, N, HEAD_DIM, BLOCK_D)    # (BLOCK_M, BLOCK_D)
        # lse = +inf past N makes those queries' probabilities exactly 0
        lse = tl.load(LSE + row_stats + rows, mask=rows < N, other=float("inf"))
        delta = tl.load(DELTA + row_stats + rows, mask=rows < N, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)             # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :] * LOG2E)
        dv = tl.dot(p_t.to(go.dtype), go, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(go), input_precision=PRECISION)           # (BLOCK_N, BLOCK_M)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION)  # (BLOCK_M, BLOCK_D), unscaled
            d_cols = tl.arange(0, BLOCK_D)
            ptrs = _head(DQ, dq_strides, b, h) + rows[:, None] * dq_strides[2] + d_cols[None, :] * dq_strides[3]
            tl.atomic_add(ptrs, dq, mask=(rows[:, None] < N) & (d_cols[None, :] < HEAD_DIM), sem="relaxed")

    _store_rows(_head(DK, dk_strides, b, h), dk_strides, cols, N, dk * scale, HEAD_DIM, BLOCK_D)
    _store_rows(_head(DV, dv_strides, b, h), dv_strides, cols, N, dv, HEAD_DIM, BLOCK_D)


@triton.autotune(_QUERY_MAJOR, key=["N", "HEAD_DIM"], **_AUTOTUNE)
@triton.jit
def _attn_bwd_dq(Q, K, V, GO, LSE, DELTA, DQ,
                 q_strides, k_strides, v_strides, go_strides, dq_strides,
                 H, N, scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (query block, batch, head): dQ = scale (P * (dO V^T - Delta)) K over all key blocks."""
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                          # (BLOCK_M,)
    k_head, v_head = _head(K, k_strides, b, h), _head(V, v_strides, b, h)
    q = _load_rows(_head(Q, q_strides, b, h), q_strides, rows, N, HEAD_DIM, BLOCK_D)      # (BLOCK_M, BLOCK_D)
    go = _load_rows(_head(GO, go_strides, b, h), go_strides, rows, N, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
    row_stats = (b * H + h).to(tl.int64) * N
    lse2 = tl.load(LSE + row_stats + rows, mask=rows < N, other=float("inf")) * LOG2E  # base 2
    delta = tl.load(DELTA + row_stats + rows, mask=rows < N, other=0.0)
    qk_scale = scale * LOG2E

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)                               # (BLOCK_N,)
        k = _load_rows(k_head, k_strides, cols, N, HEAD_DIM, BLOCK_D)       # (BLOCK_N, BLOCK_D)
        v = _load_rows(v_head, v_strides, cols, N, HEAD_DIM, BLOCK_D)       # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)               # (BLOCK_M, BLOCK_N)
        # Keys past N need no mask: their k rows load as zero, so whatever their ds, ds @ k adds 0.
        p = tl.exp2(s * qk_scale - lse2[:, None])
        dp = tl.dot(go, tl.trans(v), input_precision=PRECISION)             # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)

    _store_rows(_head(DQ, dq_strides, b, h), dq_strides, rows, N, dq * scale, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 tiles use tensor cores like torch's fp32 matmuls: plain tf32 where torch allows it,
    # else 3-pass tf32 (about fp32 accuracy). fp16/bf16 dots ignore the setting.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _tile_meta(q: torch.Tensor) -> dict:
    d = q.shape[-1]
    # tl.arange and tl.dot need a power of two >= 16; columns past D are masked to zero
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                PRECISION=_dot_precision(q.dtype))


def _token_major(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor of x's (B, H, N, D) shape stored as (B, N, H, D): the layout of the
    projections on either side of attention, so that out.transpose(1, 2).reshape(B, N, H D) is a
    view, not a copy (FlashAttention's own layout; the kernels take any strides)."""
    B, H, N, D = x.shape
    return x.new_empty((B, N, H, D), dtype=dtype).transpose(1, 2)


def _flash_forward(q, k, v, sq_t, sk_t, v_t, scale):
    """(O, log-sum-exp, dO) in one pass for the tangents (scale dQ, scale dK, dV) (the callers
    scale them where the scaling can fuse with the op before); dO is None when every tangent is
    None (= zero)."""
    B, H, N, _ = q.shape
    o = _token_major(q)                                                     # (B, H, N, D)
    lse = q.new_empty((B, H, N), dtype=torch.float32)                       # (B, H, N)
    has_tangent = sq_t is not None or sk_t is not None or v_t is not None
    o_t = _token_major(q) if has_tangent else None                         # (B, H, N, D)
    # A missing tangent gets a stand-in pointer; its TANGENT_* flag compiles every load away.
    tq, tk, tv, to = (o if t is None else t for t in (sq_t, sk_t, v_t, o_t))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B, H)  # noqa: E731
    _attn_fwd[grid](q, k, v, tq, tk, tv, o, to, lse,
                    q.stride(), k.stride(), v.stride(), tq.stride(), tk.stride(), tv.stride(),
                    o.stride(), to.stride(),
                    H, N, scale,
                    TANGENT_Q=sq_t is not None, TANGENT_K=sk_t is not None, TANGENT_V=v_t is not None,
                    LAZY_RESCALE=_rescale_mode == "lazy", **_tile_meta(q))
    return o, lse, o_t


RESCALES = ("always", "lazy")
_rescale_mode = "always"


def set_rescale(mode: str) -> None:
    """When the forward's online softmax rescales its accumulators (O, and dO's two): "always", at
    every key block a row's max grows (the default), or "lazy", only when some row's max grows by
    more than 2^8 (FlashAttention-4's trick). In the fused forward+JVP two accumulators are rescaled,
    so the loop's common path loses 5-20% of its sm_90 instructions (bench/kernel_sass.py), for
    a block-wide max (three more barriers) per key block. Exact either way: the stale max cancels
    in O = acc / l. Which is faster: unmeasured (needs a GPU; bench/attention_jvp.py times both)."""
    global _rescale_mode
    if mode not in RESCALES:
        raise ValueError(f"forward rescale must be one of {RESCALES}, got {mode!r}")
    _rescale_mode = mode


BACKWARDS = ("two-pass", "atomic", "sdpa")
_backward_mode = "two-pass"


def set_backward(mode: str) -> None:
    """How the backward makes dQ, dK, dV: "two-pass" (a second kernel recomputes P per query block:
    7 matmuls per block pair, deterministic; the default), "atomic" (the dK/dV kernel adds dQ
    with fp32 atomics: 5 matmuls, as FlashAttention-2's backward) or "sdpa" (PyTorch's own fused
    attention backward, fed with this forward's O and log-sum-exp, which follow SDPA's conventions:
    cuDNN's kernel on CUDA for fp16 / bf16 at head dims that are multiples of 8 up to 128 and
    inputs stored token-major, other CUDA inputs taking two-pass; the CPU flash kernel in the
    interpreter). Neither atomic nor cuDNN is bitwise reproducible, so
    torch.use_deterministic_algorithms(True) keeps two-pass."""
    global _backward_mode
    if mode not in BACKWARDS:
        raise ValueError(f"flash backward must be one of {BACKWARDS}, got {mode!r}")
    _backward_mode = mode


def _sdpa_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether set_backward("sdpa") can use cuDNN here. Only for q, k, v stored in (B, N, H, D)
    order (as MiT's views of its stacked projection are): PyTorch caches a cuDNN backward graph by
    q, k and v alone, and in that order SDPA's own O and dO are token-major as ours, so rows of
    either kind reuse the graph on the layout it was built for."""
    if not q.is_cuda:
        return True
    d = q.shape[-1]
    token_order = all(x.stride(-1) == 1 and x.stride(1) < x.stride(2) < x.stride(0) for x in (q, k, v))
    return q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 128 and token_order


def _sdpa_backward(q, k, v, o, lse, grad_o, scale):
    """dQ, dK, dV by SDPA's backward kernel from the saved O and log-sum-exp, stored token-major
    as the Triton kernels store them (and the fake kernel says)."""
    N = q.shape[2]
    if grad_o.stride() != o.stride():  # cuDNN reads dO in O's layout (else it copies, warning)
        grad_o = _token_major(o).copy_(grad_o)
    if q.is_cuda:
        # Dropout's seed and offset: never read at dropout 0, but on sm_100 PyTorch casts them to int64
        # first, which fails on None (pytorch PR 146734). An uninitialised word launches nothing.
        word = q.new_empty((), dtype=torch.int64)
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_o, q, k, v, o, lse.unsqueeze(-1), word, word, None, None, None, N, N, 0.0, False, scale=scale)
    else:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_o, q, k, v, o, lse, 0.0, False, scale=scale)
    return tuple(g if g.transpose(1, 2).is_contiguous() else _token_major(g).copy_(g) for g in grads)


def _flash_backward(q, k, v, o, lse, grad_o, scale):
    """dQ, dK, dV of the primal from the saved log-sum-exp (no N x N tensor)."""
    B, H, N, _ = q.shape
    grad_o = grad_o.to(q.dtype)  # the kernels' dots need one operand dtype
    mode = "two-pass" if torch.are_deterministic_algorithms_enabled() else _backward_mode
    if mode == "sdpa" and _sdpa_takes(q, k, v):
        return _sdpa_backward(q, k, v, o, lse, grad_o, scale)
    delta = (grad_o.float() * o.float()).sum(-1).contiguous()              # (B, H, N)
    dk, dv = _token_major(k), _token_major(v)                              # (B, H, N, D) each
    atomic = mode == "atomic"
    dq = _token_major(q, torch.float32).zero_() if atomic else _token_major(q)
    meta = _tile_meta(q)
    _attn_bwd_dkdv[lambda m: (triton.cdiv(N, m["BLOCK_N"]), B, H)](
        q, k, v, grad_o, lse, delta, dk, dv, dq,
        q.stride(), k.stride(), v.stride(), grad_o.stride(), dk.stride(), dv.stride(), dq.stride(),
        H, N, scale, ATOMIC_DQ=atomic, **meta)
    if atomic:
        return (dq * scale).to(q.dtype), dk, dv
    _attn_bwd_dq[lambda m: (triton.cdiv(N, m["BLOCK_M"]), B, H)](
        q, k, v, grad_o, lse, delta, dq,
        q.stride(), k.stride(), v.stride(), grad_o.stride(), dq.stride(),
        H, N, scale, **meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------

class _FlashAttention(torch.autograd.Function):
    """Flash attention whose forward also takes the input tangents and returns (O, lse, dO).

    Forward AD hands tangents only to `jvp`, after `forward` has run; `triton_attention` therefore
    passes them in as ordinary inputs so one kernel pass produces O and dO, and `jvp` returns the
    dO it saved. lse and dO are non-differentiable outputs: backward differentiates O only.
    """

    @staticmethod
    def forward(q, k, v, sq_t, sk_t, v_t, scale):
        return _flash_forward(q, k, v, sq_t, sk_t, v_t, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, _, _, scale = inputs
        o, lse, o_t = output
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the stop-grad lse and dO
        if o_t is None:
            ctx.mark_non_differentiable(lse)
        else:
            ctx.mark_non_differentiable(lse, o_t)
            ctx.save_for_forward(o_t)

    @staticmethod
    def jvp(ctx, *_input_tangents):
        # The same tangents were unpacked from the dual inputs and went through the fused kernel.
        if not ctx.saved_tensors:
            raise RuntimeError("triton attention: forward AD reached jvp without the tangents "
                               "passing through forward; call it through triton_attention")
        (o_t,) = ctx.saved_tensors
        return o_t, None, None

    @staticmethod
    def backward(ctx, grad_o, _grad_lse, _grad_o_t):
        if grad_o is None:  # O's gradient undefined (an op downstream dropped it)
            return (None,) * 7
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_backward(q, k, v, o, lse, grad_o, ctx.scale)
        return dq, dk, dv, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise TypeError(f"triton attention needs q, k, v of one dtype among {_DTYPES}; got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dim <= {_MAX_HEAD_DIM}, got {q.shape[-1]}")
    if not q.is_cuda and not _INTERPRET:
        raise RuntimeError("triton attention on CPU needs TRITON_INTERPRET=1 in the environment "
                           "before triton is imported; use backend='torch' otherwise")
    # torch.func.jvp inside torch.func.jvp would need the kernels to be forward-differentiable.
    if getattr(eager_transforms, "JVP_NESTING", 0) > 1:
        raise NotImplementedError("triton attention supports first-order forward mode only; "
                                  "use backend='torch' for nested torch.func.jvp")


# Dynamo cannot trace the autotuned launch (it trips over the autotuner's config list, torch 2.11),
# so compiled code calls the kernels eagerly: one graph break per attention call.
@torch.compiler.disable
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Flash softmax attention O = softmax(scale Q K^T) V with its forward-mode tangent fused in.

    Args:
        q, k, v: (B, H, N, D), one dtype among fp32 / fp16 / bf16 (fp32 accumulation), any N >= 1,
            D <= 256, any strides. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Dual
            tensors of `torch.func.jvp` or `torch.autograd.forward_ad` (a missing tangent is zero)
            get their output tangent from the same kernel pass.
        scale: softmax scale.
    Returns:
        o: (B, H, N, D) stored token-major (o.transpose(1, 2) is contiguous), in q's dtype.
            Differentiable by ordinary backward; its tangent is not (stop-grad, as every
            MeanFlow loss uses it).
    """
    _check(q, k, v)
    q_t, k_t, v_t = (fwAD.unpack_dual(x).tangent for x in (q, k, v))     # (B, H, N, D) or None
    sq_t, sk_t = (None if t is None else t * scale for t in (q_t, k_t))
    o, _, _ = _FlashAttention.apply(q, k, v, sq_t, sk_t, v_t, scale)
    return o


# Custom ops, so torch.compile keeps the hand-written JVP pass in one graph: it sees the ops'
# shapes (register_fake) and never traces the autotuned launches inside. Named per version of this
# file (kernels.op_names), so a warm compile cache never replays a graph planned for older fakes.
WITH_TANGENT_OP = versioned_name("flash_attention_with_tangent", __file__)
BACKWARD_OP = versioned_name("flash_attention_backward", __file__)


@torch.library.custom_op(WITH_TANGENT_OP, mutates_args=())
def _flash_with_tangent_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sdq: torch.Tensor,
                           sdk: torch.Tensor, dv: torch.Tensor, scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # sdq, sdk: scale dQ, scale dK (see _flash_forward)
    return _flash_forward(q, k, v, sdq, sdk, dv, scale)


@_flash_with_tangent_op.register_fake
def _(q, k, v, sdq, sdk, dv, scale):
    return _token_major(q), q.new_empty(q.shape[:3], dtype=torch.float32), _token_major(q)


@torch.library.custom_op(BACKWARD_OP, mutates_args=())
def _flash_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, grad_o: torch.Tensor, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flash_backward(q, k, v, o, lse, grad_o, scale)


@_flash_backward_op.register_fake
def _(q, k, v, o, lse, grad_o, scale):
    return _token_major(q), _token_major(k), _token_major(v)


def _save_for_backward(ctx, inputs, output):
    q, k, v, _, _, _, scale = inputs
    o, lse, o_t = output
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, o, lse)
    # lse and the tangent dO are stop-grad outputs: no gradient for them, not even zeros (autograd
    # would otherwise fill a dO-sized zero tensor per call to hand to backward).
    ctx.mark_non_differentiable(lse, o_t)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_o, _grad_lse, _grad_o_t):
    if grad_o is None:  # O's gradient undefined (an op downstream dropped it)
        return (None,) * 7
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_backward_op(q, k, v, o, lse, grad_o, ctx.scale)
    return dq, dk, dv, None, None, None, None


_flash_with_tangent_op.register_autograd(_backward, setup_context=_save_for_backward)


def triton_attention_with_tangent(q, k, v, dq, dk, dv, scale: float):
    """(O, dO) from one fused flash pass for explicit tangents (all (B, H, N, D)); O and dO are
    stored token-major, as `triton_attention`'s output.

    O is differentiable by ordinary backward (flash backward from the saved log-sum-exp) when
    grad mode is on; dO is stop-grad.
    """
    _check(q, k, v)
    # Scaled before the cast to q's dtype: no extra rounding, and compiled code fuses it with
    # the op that made the tangent.
    o, _, do = _flash_with_tangent_op(q, k, v, (dq * scale).to(q.dtype), (dk * scale).to(q.dtype),
                                      dv.to(q.dtype), scale)
    return o, do
