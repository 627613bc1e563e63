"""fastmf's custom ops are named per version of their defining file (kernels.op_names), because
torch.compile's on-disk caches key graphs on op names, not on the ops' code."""
import hashlib
from pathlib import Path

import pytest

pytest.importorskip("triton")

from kernels import attention_triton, loss  # noqa: E402
from kernels.op_names import packet, versioned_name  # noqa: E402


def test_a_changed_file_names_its_ops_anew(tmp_path):
    source = tmp_path / "ops.py"
    source.write_text("BLOCK = 64\n")
    first = versioned_name("op", str(source))
    assert versioned_name("op", str(source)) == first
    source.write_text("BLOCK = 128\n")
    assert versioned_name("op", str(source)) != first


@pytest.mark.parametrize("module, names", [
    (attention_triton, ["WITH_TANGENT_OP", "BACKWARD_OP"]),
    (loss, ["ROWS_OP", "ROWS_BACKWARD_OP"]),
])
def test_registered_ops_carry_their_files_digest(module, names):
    digest = hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:8]
    for name in names:
        qualified = getattr(module, name)
        assert qualified.startswith("fastmf::") and qualified.endswith("_" + digest)
        assert packet(qualified)._qualified_op_name == qualified  # defined under that name
