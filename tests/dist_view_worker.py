"""Run by tests/test_distributed.py under torchrun: train.py or evaluate.py where the ranks see
different files, as with node-local folders on several nodes. argv[1] 'out': train.py, and only
rank 0 sees checkpoints in --out; 'train' / 'evaluate': rank r reads the paths with RANK replaced by r."""
import os
import sys

import tyro

import evaluate
import train
from fastmf.run_checkpoints import Checkpoints

mode, flags = sys.argv[1], [f.replace("RANK", os.environ["RANK"]) for f in sys.argv[2:]]
if mode == "out":
    Checkpoints.exist = lambda self: self.dist.rank == 0
if mode == "evaluate":
    evaluate.main(tyro.cli(evaluate.Args, args=flags))
else:
    train.main(train.parse(flags))
