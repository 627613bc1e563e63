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

import numpy  # noqa: E402
import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _loop_to_a_computed_bound(x_ptr, n):
    for i in range(0, tl.cdiv(n, 2)):    # the bound is a scalar tensor, as in the attention kernels
        tl.store(x_ptr + i * 2 + tl.arange(0, 2), tl.load(x_ptr + i * 2 + tl.arange(0, 2)) + 1)


def pytest_configure(config):
    """Triton 3.5 and 3.6's interpreter (torch 2.9 to 2.11's) turns a scalar tensor into an int by int() of a
    shape-(1,) array, which numpy 2.3 and later refuse: every kernel test would fail with that
    TypeError. Stop at once with the remedy instead."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        _loop_to_a_computed_bound[(1,)](torch.zeros(4), 4)
    except Exception as e:
        pytest.exit(f"Triton {triton.__version__}'s interpreter (the kernel tests' CPU path) fails with numpy "
                    f"{numpy.__version__}: {e}. Install numpy<2.3, or a Triton whose interpreter works "
                    "with it (3.9 does)", returncode=pytest.ExitCode.USAGE_ERROR)
