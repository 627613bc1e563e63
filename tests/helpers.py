"""Shared test fixtures: tiny models with perturbed (non-zero-gate) weights, functional apply."""
import torch

from fastmf.models import build, functional as functional_apply

TINY = {
    "mit": dict(depth=3, aux_head_depth=2, hidden_size=32, num_heads=2, patch_size=2, num_class_tokens=2,
                num_cfg_tokens=1, num_interval_tokens=1, num_time_tokens=2),
    "dit": dict(depth=2, hidden_size=32, num_heads=2, patch_size=2),
}


def tiny_model(variant="imf", input_size=(8, 8), in_channels=2, num_classes=5, dtype=torch.float64,
               seed=0, backbone="mit", **kw):
    torch.manual_seed(seed)
    model = build(f"{backbone}-tiny", variant, input_size=input_size, in_channels=in_channels,
                  num_classes=num_classes, attn_backend="torch", **(TINY[backbone] | kw)).to(dtype)
    with torch.no_grad():  # zero-init gates/outputs would make most derivatives trivially zero
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def functional(model):
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    return functional_apply(model), params
