"""Environment for the tests, chosen before torch and triton are imported."""
import os

# Inductor's CPU backend emits scalar C++ instead of at::vec code: about 35% less compile time per
# graph (measured on the 2-core CI machine), the same graphs and fusions. What a user compiles for a
# GPU is Triton code either way.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

import torch  # noqa: E402

# Triton kernels run on CPU only in its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
