"""Run by tests/test_distributed.py under torchrun: train.py where the ranks see different files, as
with node-local folders on several nodes. argv[1] 'out': only rank 0 sees checkpoints in --out;
'data': rank r reads the --data path with RANK replaced by r."""
import os
import sys

import train
from fastmf.run_checkpoints import Checkpoints

mode, flags = sys.argv[1], sys.argv[2:]
if mode == "out":
    Checkpoints.exist = lambda self: self.dist.rank == 0
else:
    flags = [f.replace("RANK", os.environ["RANK"]) for f in flags]
train.main(train.parse(flags))
