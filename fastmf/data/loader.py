"""Which samples make each step's global batch, and the loader that streams this rank's rows."""
from __future__ import annotations

import os

import torch

MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9)  # splitmix64 multipliers: distinct keys for (seed, step, row)


def stream_key(seed: int, step: int, row: int = -1) -> int:
    """A 63-bit generator seed for (seed, step) (row -1: the batch's scalars) or for one row's noise."""
    return ((((seed + 1) * MIX[0] + step) * MIX[1]) + row + 1) % 2**63


def flips(seed: int, step: int, B: int) -> torch.Tensor:
    """bool (B,): the random horizontal flips of step `step`'s batch (data augmentation)."""
    return torch.rand(B, generator=torch.Generator().manual_seed(stream_key(seed, step, -2))) < 0.5


def default_workers() -> int:
    """8 DataLoader workers per rank, or this rank's share of the CPU cores where that is fewer (more
    workers than cores only contend; DataLoader warns of it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


class EpochSampler:
    """Which samples make the global batch of each step: a function of (seed, step) only.

    Epoch e is a permutation of the dataset drawn from a generator seeded by (seed, e); step s
    takes the slice s % per_epoch of epoch s // per_epoch (the last partial batch is dropped).
    Nothing to save but the step, so a resumed run sees exactly the batches an uninterrupted one
    would, and any slicing of a batch (e.g. across ranks) sees the same global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch size must be in 1..{n} (the dataset size), got {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        """Sample indices (batch_size,) of the global batch of `step`."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:  # one permutation per epoch, kept while the epoch lasts
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


class TensorSource(torch.utils.data.Dataset):
    """Samples held in memory: x (N, C, *S) (floats as the model takes them, or uint8 pixels), y (N,)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y, self.num_classes = x, y, num_classes
        self.sample_shape = tuple(x.shape[1:])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: tuple):
        i, flip = key[:2]
        return (self.x[i].flip(-1) if flip else self.x[i]), self.y[i], 0


class _StepIndices(torch.utils.data.Sampler):
    """The loader's batch sampler: for each step from `start`, this rank's rows as (index, flip,
    noise key): the key seeds any per-sample randomness of the source (e.g. a latent's posterior draw)."""

    def __init__(self, sampler: EpochSampler, rows: torch.Tensor, start: int, flip_of, seed: int):
        self.sampler, self.rows, self.start, self.flip_of, self.seed = sampler, rows, start, flip_of, seed

    def __iter__(self):
        step = self.start
        while True:
            idx, flip = self.sampler.indices(step), self.flip_of(step)
            yield [(int(idx[g]), bool(flip[g]), stream_key(self.seed, step, -3 - g)) for g in self.rows.tolist()]
            step += 1


def _collate(items):
    xs, ys, bad = zip(*items)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.int64), sum(bad)


def step_batches(source, sampler: EpochSampler, rows: torch.Tensor, start: int, flip_of, workers: int,
                 pin_memory: bool, seed: int = 0):
    """An endless iterator of (x, y, bad_files) for steps start, start + 1, ...: this rank's `rows` of
    each global batch, decoded by `workers` DataLoader processes (0: in this one) with prefetch.

    `flip_of(step) -> bool (B,)` gives the augmentation flips (global_batch.flips, or all False).
    Everything is a function of the step, so resuming at `start` gives the batches an uninterrupted
    run would have seen, on any number of ranks.
    """
    loader = torch.utils.data.DataLoader(
        source, batch_sampler=_StepIndices(sampler, rows, start, flip_of, seed), num_workers=workers,
        collate_fn=_collate, pin_memory=pin_memory, prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0)
    return iter(loader)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> floats in [-1, 1] (on the device: the batch travels as uint8); floats as they are."""
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x
