"""Environment for the tests, chosen before torch and triton are imported."""
import os

# Inductor's CPU backend emits scalar C++ instead of at::vec code: about 35% less compile time per
# graph (measured on the 2-core CI machine), the same graphs and fusions. What a user compiles for a
# GPU is Triton code either way.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

# pytest-xdist workers share the cores: each takes its share of threads, or OpenMP's spinning threads
# oversubscribe them (measured: the digits learning run took 390 s beside the other worker, 75 s
# alone on one thread). Subprocesses a test starts (train.py, torchrun) inherit the setting.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, share)))

import torch  # noqa: E402

# Triton kernels run on CPU only in its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
