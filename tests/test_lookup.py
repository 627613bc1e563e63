"""kernels.embedding: the class-label lookup whose gradient is summed in a fixed order, compiled too."""
import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import embedding
from kernels.lookup import GRAD_OP
from kernels.op_names import packet
from helpers import functional, tiny_model


def table_gradient(lookup, compiled: bool):
    """d/d table of sum(lookup(table, y) * w): the rows of w summed per index, 200 indices into 7 rows."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(7, 33, generator=gen, requires_grad=True)
    y = torch.randint(0, 7, (200,), generator=gen)
    w = torch.randn(200, 33, generator=gen)

    def loss(table, y, w):
        return (lookup(table, y) * w).sum()
    fn = torch.compile(loss) if compiled else loss
    grad, code = run_and_get_code(lambda: torch.autograd.grad(fn(table, y, w), table)[0])
    return grad, "\n".join(code)


def test_compiled_gradient_is_atens_fixed_order_sum_without_atomics():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # inductor writes a parallel loop, and atomics in it, for more than one thread
    try:
        eager, _ = table_gradient(lambda t, y: F.embedding(y, t), compiled=False)
        plain, plain_code = table_gradient(lambda t, y: F.embedding(y, t), compiled=True)
        ours, code = table_gradient(embedding, compiled=True)
    finally:
        torch.set_num_threads(threads)
    # the hazard on this torch: inductor sums F.embedding's gradient with atomic adds
    assert "atomic_add" in plain_code
    assert "atomic_add" not in code and GRAD_OP.split("::")[1] in code
    assert torch.equal(ours, eager)  # the gradient w passes through the product exactly: the sums are ATen's
    torch.testing.assert_close(plain, eager)


def test_lookup_values_and_fp64_gradient_equal_f_embedding():
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.tensor([[4, 0, 4], [2, 2, 2]])
    w = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen)
    out = embedding(table, y)
    assert torch.equal(out, F.embedding(y, table))
    g, = torch.autograd.grad((out * w).sum(), table)
    g_ref, = torch.autograd.grad((F.embedding(y, table) * w).sum(), table)
    assert torch.equal(g, g_ref)


class OpsSeen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backbone, variant", [("mit", "imf"), ("dit", "mf")])
def test_backbones_take_their_class_gradient_from_it(backbone, variant):
    model = tiny_model(variant, backbone=backbone)
    apply, params = functional(model)
    B = 4
    z = torch.randn(B, 2, 8, 8, dtype=torch.float64)
    t = torch.rand(B, dtype=torch.float64)
    y = torch.tensor([0, 3, 3, 5])  # 5: the null class
    ones = torch.ones(B, dtype=torch.float64)
    u = apply(params, z, t, 0 * t, ones, 0 * ones, ones, y).u
    with OpsSeen() as seen:
        u.square().sum().backward()
    assert packet(GRAD_OP) in seen.ops and torch.ops.aten.embedding_dense_backward not in seen.ops
    assert params["y_embedder.embedding_table.weight"].grad[[1, 2, 4]].abs().sum() == 0  # unused rows
