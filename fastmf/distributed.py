"""torchrun / torch.distributed: process groups, each rank's slice of the global batch, DDP.

    dist = init("auto")            # world 1 without torchrun; NCCL on GPU, gloo on CPU under it
    rows = dist.rows(batch_size)   # this rank's slice of the global batch
    net = wrap_ddp(model, dist)    # DDP when world > 1: gradients all-reduced during backward

The global batch and every draw of a step depend on (seed, step) only (data.EpochSampler,
step_draws.draw_global): each rank computes its slice, so N processes follow the trajectory of
1 process up to floating-point reduction order, and a run may resume on another world size.
"""
import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel

_held_group = None  # this module's own reference to the default process group: see shutdown


@dataclass(frozen=True)
class Dist:
    """This process's place: rank of world, and its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous slice of a global batch of `batch_size` rows."""
        if batch_size % self.world:
            raise ValueError(f"--batch-size {batch_size} is global and must divide by the world size {self.world}")
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean over ranks of each scalar (each rank's value is the mean over its equal slice)."""
        if self.world == 1:
            return values
        stacked = torch.stack([v.detach().float() for v in values.values()])
        td.all_reduce(stacked)
        return dict(zip(values, stacked / self.world))

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on some rank (a collective decision, e.g. to stop)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        td.all_reduce(t)
        return bool(t.item() > 0)

    def same(self, values: list[float]) -> bool:
        """True on every rank if every rank passed the same values (a collective check)."""
        if self.world == 1:
            return True
        lo = torch.tensor(values, dtype=torch.float64, device=self.device)
        hi = lo.clone()
        td.all_reduce(lo, op=td.ReduceOp.MIN)
        td.all_reduce(hi, op=td.ReduceOp.MAX)
        return torch.equal(lo, hi)

    def barrier(self):
        if self.world > 1:
            td.barrier()


def init(device_name: str, resolve) -> Dist:
    """Join torchrun's process group if launched by it (RANK / WORLD_SIZE / LOCAL_RANK set), else
    world 1. `resolve(name) -> torch.device` turns --device into a device (cli.resolve_device)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(0, 1, resolve(device_name))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = resolve(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)  # one GPU per process, by local rank
        torch.cuda.set_device(device)
    if not td.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        store, _, _ = next(td.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
        # Workers restarted by torchrun --max-restarts reach the same agent store as the failed
        # round, which still holds that round's addresses: a rank that reads one before its peer
        # rewrites it connects to a dead process (pytorch issue 167288). Each round keys its own.
        round_store = td.PrefixStore(f"fastmf/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        td.init_process_group("nccl" if device.type == "cuda" else "gloo", store=round_store, rank=rank,
                              world_size=world, timeout=timeout)
    global _held_group
    _held_group = td.group.WORLD
    return Dist(rank, world, device)


def shutdown():
    """Destroy the process group; call it once the DDP wrapper is freed (train.py: `del run`).

    If DDP's C++ reducer dropped the last reference to a gloo group, the group's destructor would
    join gloo's worker threads while holding the GIL, and a worker freeing the tensors of the last
    collective waits for the GIL: a hang at exit (3 in 33 CPU runs of 2 processes). So init
    keeps a Python reference, which outlives the reducer; freeing it releases the GIL first."""
    global _held_group
    if td.is_initialized():
        td.destroy_process_group()
    _held_group = None


def wrap_ddp(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """The module the train step calls: DDP(model) for world > 1, else model itself.

    Each step runs its guidance passes under no_grad (DDP does not prepare a reduction for them)
    and one with-grad pass whose hand-written tangent rules run inside the model's own forward,
    so DDP's hooks fire as in any forward and backward all-reduces every gradient, bucketed and
    overlapped with the backward. Every parameter takes part in that pass (MF builds no v-head),
    hence no find_unused_parameters; the buffers are fixed tables, hence no broadcast.
    """
    if dist.world == 1:
        return model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, **no_buffer_sync)


def wrap_fsdp(model: torch.nn.Module, dist: Dist, bf16: bool) -> torch.nn.Module:
    """FSDP2 in place: every transformer block (modules marked `shard_unit`) and then the root
    sharded across the ranks, for models whose weights, gradients and Adam state do not fit one
    device. Parameters become DTensor shards: take `named_parameters()` after this. The tangent
    path runs through each block's own forward, so FSDP's gather and reshard hooks fire for it too.
    bf16: compute in bf16 with fp32 gradient reduction and fp32 master weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if dist.world == 1:
        raise ValueError("--parallel fsdp shards across processes: launch with torchrun and 2 or more")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for m in [m for m in model.modules() if getattr(m, "shard_unit", False)]:
        fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DTensor shards gathered to full tensors on every rank (a collective); plain tensors as they are."""
    from torch.distributed.tensor import DTensor
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def check_same_on_all_ranks(tensors: dict[str, torch.Tensor], dist: Dist):
    """Raise if the ranks' tensors differ (a per-tensor sum, compared by min and max over ranks):
    a guard that gradient synchronisation really happened, run before every save."""
    if dist.world == 1:
        return
    sums = torch.stack([t.detach().double().sum() for t in tensors.values()]).to(dist.device)
    lo, hi = sums.clone(), sums.clone()
    td.all_reduce(lo, op=td.ReduceOp.MIN)
    td.all_reduce(hi, op=td.ReduceOp.MAX)
    differ = [k for k, a, b in zip(tensors, lo.tolist(), hi.tolist()) if a != b]
    if differ:
        raise RuntimeError(f"the ranks hold different weights ({len(differ)} tensors, e.g. {differ[0]}): "
                           "gradients were not synchronised")
