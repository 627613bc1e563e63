"""A table lookup whose gradient is the same sum in every run, compiled or not.

inductor lowers the gradient of `F.embedding` (or of `table[y]`) to an accumulating scatter: on the
CPU `atomic_add` inside a parallel loop, on CUDA `tl.atomic_add`. Rows that share an index are then
summed in whatever order the threads arrive, so two compiled runs of one train step differ in the
last bits of the table's gradient, and a resumed run drifts from an uninterrupted one (measured:
mit-tiny on digits, 2 CPU threads, up to 3e-8 after 8 steps in 373 of 540 saved tensors). ATen's
eager kernels sum in a fixed order (the CPU's in sequence; CUDA's by one leader warp per index up to
3,072 indices, by sorted segments beyond), so the gradient here is a custom op that calls that
kernel: compiled graphs run it as it is. The forward stays `F.embedding`, which inductor may fuse
into its consumers.
"""
import torch
import torch.nn.functional as F

from kernels.op_names import versioned_name

GRAD_OP = versioned_name("embedding_grad", __file__)


@torch.library.custom_op(GRAD_OP, mutates_args=())
def _embedding_grad(grad: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.aten.embedding_dense_backward(grad, index, rows, -1, False)    # (rows, D)


@_embedding_grad.register_fake
def _(grad, index, rows):
    return grad.new_empty(rows, grad.shape[-1])


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(table, index):
        return F.embedding(index, table)

    @staticmethod
    def setup_context(ctx, inputs, output):
        table, index = inputs
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _embedding_grad(grad, index, ctx.rows), None


def embedding(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a (rows, D) table and integer indices (...): (..., D), deterministic gradient."""
    return _Embedding.apply(table, index)
