"""Run by tests/test_distributed.py under torchrun: ranks holding different weights must be caught."""
import torch
import torch.distributed as td

from fastmf.distributed import Dist, check_same_on_all_ranks

td.init_process_group("gloo")
rank = td.get_rank()
dist = Dist(rank, td.get_world_size(), torch.device("cpu"))
check_same_on_all_ranks({"w": torch.ones(3), "b": torch.zeros(2)}, dist)  # the same: passes
try:
    check_same_on_all_ranks({"w": torch.ones(3), "b": torch.full((2,), float(rank))}, dist)
except RuntimeError as e:
    assert "different weights (1 tensors, e.g. b)" in str(e), e
    print(f"rank {rank}: caught")
td.destroy_process_group()
