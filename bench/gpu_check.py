"""GPU check: the fast step (Triton attention + fused loss) equals the reference objective on CUDA,
eager, compiled as one graph (fullgraph=True, as the benchmark and train.py compile it) and with
compiled blocks (train.py --compile-scope blocks).

fp32, mit-tiny, same draws; prints the relative differences of loss and gradients, and whether
the same step run again gives bit-identical gradients.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmf.models import build, functional  # noqa: E402
from fastmf.objectives import draw, imf_loss_from_draws, objective_defaults  # noqa: E402
from fastmf.train_step import fast_imf_loss_from_draws, fast_loss_from_draws  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
for size, variant in [((32, 32), "imf"), ((8, 8, 8), "pmf")]:
    torch.manual_seed(0)
    model = build("mit-tiny", variant, input_size=size, in_channels=3, num_classes=10).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = dict(model.named_parameters())
    apply = functional(model)
    x = torch.randn(16, 3, *size, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    cfg = objective_defaults(variant, num_classes=10)
    d = draw(x, torch.Generator(device="cuda").manual_seed(0), cfg)
    model.set_attention_backend("torch")
    ref, _ = imf_loss_from_draws(apply, params, x, y, d, cfg)
    g_ref = torch.autograd.grad(ref, list(params.values()))
    compiled = torch.compile(lambda x, y, d: fast_loss_from_draws(apply, params, x, y, d, cfg), fullgraph=True)
    # auto: SDPA primal passes + Triton tangent op; -compiled: the whole loss as one graph;
    # -blocks: MiT.compile_blocks (train.py --compile-scope blocks)
    for backend in ("triton", "auto", "auto-compiled", "auto-blocks"):
        model.set_attention_backend(backend.split("-")[0])
        model.compile_blocks(backend.endswith("blocks"))

        def step():
            if backend.endswith("compiled"):
                return compiled(x, y, d)[0]
            return fast_imf_loss_from_draws(apply, params, x, y, d, cfg, loss_backend="triton")[0]
        fast = step()
        g_fast = torch.autograd.grad(fast, list(params.values()))
        rel = max(((a - b).norm() / (b.norm() + 1e-12)).item() for a, b in zip(g_fast, g_ref))
        # The same step again: bit-identical gradients, or the largest difference (SDPA's backward,
        # which 'auto' takes for the rows without a tangent, may add with atomics)
        g_again = torch.autograd.grad(step(), list(params.values()))
        rerun = max((a - b).abs().max().item() for a, b in zip(g_again, g_fast))
        print(f"{variant} {size} attention {backend}: loss ref {ref.item():.6f} fast {fast.item():.6f} "
              f"|diff| {abs(ref - fast).item():.2e}; worst relative gradient difference {rel:.2e}; "
              f"run again: {'bit-identical' if rerun == 0 else f'max |diff| {rerun:.2e}'}")
        assert abs(ref - fast).item() < 1e-4 and rel < 1e-3, "fast step disagrees with the reference on CUDA"
print("gpu_check ok")
