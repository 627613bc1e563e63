"""fastmf's custom ops are named per version of their defining file (kernels.op_names), because
torch.compile's on-disk caches key graphs on op names, not on the ops' code."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from kernels import attention_triton, lookup, loss  # noqa: E402
from kernels.op_names import packet, versioned_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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
    (lookup, ["GRAD_OP"]),
])
def test_registered_ops_carry_their_files_digest(module, names):
    digest = hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:8]
    for name in names:
        qualified = getattr(module, name)
        assert qualified.startswith("fastmf::") and qualified.endswith("_" + digest)
        assert packet(qualified)._qualified_op_name == qualified  # defined under that name


DEMO_OP = '''import torch
from kernels.op_names import versioned_name

NAME = {name}


@torch.library.custom_op(NAME, mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    return {layout}.copy_(2 * x)


@double.register_fake
def _(x):
    return {layout}
'''
CALLER = '''import torch, demo_op
x = torch.randn(4, 5, 6)
y = torch.compile(lambda x: demo_op.double(x.sin()).cos() + 1)(x)
assert torch.allclose(y, (2 * x.sin()).cos() + 1)
'''
LAYOUTS = ["x.new_empty(x.shape)", "x.new_empty(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2)"]


def compile_with_warm_cache(tmp_path, name: str) -> list[int]:
    """Compile a call of a custom op, change the op's output layout (and its fake), compile again
    with the same on-disk cache: the return codes of the two runs."""
    tmp_path.mkdir()
    (tmp_path / "caller.py").write_text(CALLER)
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
                        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    codes = []
    for layout in LAYOUTS:
        (tmp_path / "demo_op.py").write_text(DEMO_OP.format(name=name, layout=layout))
        codes.append(subprocess.run([sys.executable, str(tmp_path / "caller.py")], env=env,
                                    capture_output=True, timeout=300).returncode)
    return codes


def test_a_warm_compile_cache_replays_no_graph_planned_for_an_older_op(tmp_path):
    """The hazard, shown on a fixed name (the second run fails inductor's stride check), and
    gone with a versioned one."""
    assert compile_with_warm_cache(tmp_path / "fixed", '"fastmf::demo_fixed"') == [0, 1]
    assert compile_with_warm_cache(tmp_path / "versioned", 'versioned_name("demo", __file__)') == [0, 0]
