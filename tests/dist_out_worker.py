"""Run by tests/test_distributed.py under torchrun: train.py where only rank 0 sees checkpoints in
--out, as with a node-local folder on several nodes."""
import sys

import train
from fastmf.run_checkpoints import Checkpoints

Checkpoints.exist = lambda self: self.dist.rank == 0
train.main(train.parse(sys.argv[1:]))
