"""The global batch of a step, and every draw of it, as a function of (seed, step) only; each rank
takes its rows.

JAX gets this from one global RNG key. Here: the scalars of the whole global batch (t, r, omega,
the CFG interval, the class dropout; B numbers each) come from one generator seeded by (seed,
step), which every rank runs in full (cheap); the pixel noise of global row g comes from its own
counter-based stream seeded by (seed, step, g), so no rank makes noise for rows it does not own.

Layout, as the references (first int(B * data_proportion) rows flow matching, the first num_drop
of those get the null class), except that the flow-matching rows are spread evenly over the
batch (row g is flow matching iff floor((g + 1) p) > floor(g p): the same count int(B p)): every
rank's slice then holds its share, so no rank idles while another carries all the tangents.
Within a rank its rows are reordered flow-matching first, as the fast step needs; the loss is a
mean over rows, so the order does not change it.
"""
import torch

from fastmf.data.loader import stream_key
from fastmf.objectives import Draws, ObjectiveConfig, draw_conditions, sample_t_r, uses_perceptual

def flow_matching_rows(B: int, proportion: float) -> torch.Tensor:
    """bool (B,): int(B * proportion) rows spread evenly (floor((g + 1) p) > floor(g p))."""
    g = torch.arange(B + 1, dtype=torch.float64)
    marks = torch.floor(g * proportion)
    return marks[1:] > marks[:-1]


def rows_in_order(rows: slice, B: int, proportion: float) -> torch.Tensor:
    """Global rows `rows` of a batch of B in the order a rank works on them: flow-matching first."""
    fm, mine = flow_matching_rows(B, proportion), torch.arange(rows.start, rows.stop)
    return torch.cat([mine[fm[mine]], mine[~fm[mine]]])


def draw_rows(sample_shape: tuple, rows: slice, B: int, seed: int, step: int, cfg: ObjectiveConfig,
              device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, Draws]:
    """The draws of global rows `rows` of step `step`'s batch of B, flow-matching rows first.

    Returns (order, draws): order (b,) are the global rows in the order the draws are in (gather
    this rank's data with it), draws a Draws record of b rows on `device` with n_fm set.
    """
    gen = torch.Generator().manual_seed(stream_key(seed, step))
    like = torch.empty(0, dtype=torch.float32)
    fm = flow_matching_rows(B, cfg.data_proportion)
    t, r = sample_t_r(fm, gen, like, cfg)
    omega, t_min, t_max, num_drop = draw_conditions(fm, gen, like, cfg)
    crop = torch.rand((B, 4), generator=gen) if uses_perceptual(cfg) else None  # drawn last: as objectives.draw
    fm_first = torch.cat([torch.nonzero(fm).flatten(), torch.nonzero(~fm).flatten()])
    drop = torch.zeros(B, dtype=torch.bool)
    drop[fm_first[:int(num_drop)]] = True                              # the first num_drop flow-matching rows

    order = rows_in_order(rows, B, cfg.data_proportion)                # (b,) flow matching first
    noise = torch.stack([torch.randn(sample_shape, device=device, dtype=torch.float32,
                                     generator=torch.Generator(device=device).manual_seed(stream_key(seed, step, g)))
                         for g in order.tolist()])                      # (b, C, *S)
    to = lambda a: a[order].to(device, dtype)
    draws = Draws(to(t), to(r), fm[order].to(device), (noise * cfg.noise_scale).to(dtype), to(omega),
                  to(t_min), to(t_max), drop[order].to(device), int(fm[order].sum()),
                  None if crop is None else crop[order].to(device))
    return order, draws
