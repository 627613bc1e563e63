"""The official recipes (fastmf/recipes.py): one flag sets model, loss, optimiser and EMAs; the
model sizes are pMF's; a recipe run trains (tiny overrides, random-init perceptual nets)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fastmf.config import RecipeName, parse
from fastmf.models import build
from fastmf.recipes import IMAGENET_STEPS_PER_EPOCH, RECIPES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", RecipeName.__args__)
def test_every_recipe_parses_and_flags_still_override(name):
    r = RECIPES[name].options
    cfg = parse(["--recipe", name])
    assert cfg.recipe == name and cfg.model.model == r["model"] and cfg.data.batch_size == 1024
    assert cfg.optim.lr == r["lr"] and cfg.objective.variant == r["variant"]
    assert parse(["--recipe", name, "--batch-size", "8", "--lr", "3e-4"]).data.batch_size == 8
    assert parse([f"--recipe={name}", "--lr", "3e-4"]).optim.lr == 3e-4


def test_pmf_recipes_hold_the_official_settings():
    h = parse(["--recipe", "pmf-h16"])
    assert (h.objective.P_mean, h.objective.P_std, h.objective.noise_scale, h.objective.tr_uniform) == (0.0, 0.8, 2.0, True)
    assert (h.objective.perceptual_max_t, h.objective.convnext_max_t) == (1.0, 0.6)
    assert (h.objective.lpips_lambda, h.objective.convnext_lambda) == (0.4, 0.1)
    assert h.optim.optimizer == "muon" and h.optim.ema_halflives == (500.0, 1000.0, 2000.0) and h.optim.warmup_steps == 0
    assert h.run.steps == 320 * IMAGENET_STEPS_PER_EPOCH == 400_320 and not h.data.hflip
    b = parse(["--recipe", "pmf-b16"])
    assert (b.objective.P_mean, b.objective.perceptual_max_t, b.objective.tr_uniform) == (0.8, 0.8, False)
    assert parse(["--recipe", "pmf-l16"]).objective.cfg_beta == 2.0
    assert parse(["--recipe", "pmf-l32"]).objective.noise_scale == 4.0
    assert RECIPES["pmf-h16"].evaluation.omega == 7.0 and RECIPES["pmf-h16"].evaluation.interval == (0.2, 0.6)


@pytest.mark.parametrize("name,size,patch,hidden,depth,head_dim,mlp,bottleneck", [
    ("pmf-b", 256, 16, 768, 16, 64, 2048, 128), ("pmf-l", 256, 16, 1024, 32, 64, 2730, 128),
    ("pmf-h", 256, 16, 1280, 48, 80, 3416, 256), ("pmf-b", 512, 32, 768, 16, 64, 2048, 128)])
def test_pmf_model_sizes(name, size, patch, hidden, depth, head_dim, mlp, bottleneck):
    with torch.device("meta"):  # sizes without allocating the weights
        model = build(name, "pmf", input_size=(size, size), patch_size=patch, in_channels=3, num_classes=1000)
    cfg = model.net.cfg
    assert (cfg.hidden_size, cfg.depth, cfg.hidden_size // cfg.num_heads) == (hidden, depth, head_dim)
    assert cfg.mlp_hidden == mlp and cfg.bottleneck == bottleneck
    assert cfg.num_tokens == 276  # 8 class + 4 time + 4 cfg + 2 x 2 interval tokens + 16 x 16 patches
    params = dict(model.named_parameters())
    assert params["net.shared_blocks.0.mlp.w1.weight"].shape == (mlp, hidden)
    assert len({k.split(".")[2] for k in params if k.startswith("net.shared_blocks.")}) == depth - 8


def test_a_recipe_run_trains_with_its_optimiser_emas_and_gates(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_perceptual import random_weights
    from test_train import train
    lpips_file, cnx_file = random_weights(tmp_path)
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "imgs" / str(c)).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / str(c) / f"{i}.png")
    out = tmp_path / "run"
    train.main(parse(["--recipe", "pmf-h16", "--model", "mit-tiny", "--data", str(tmp_path / "imgs"), "--image-size", "16",
                      "--patch-size", "4", "--batch-size", "4", "--steps", "2", "--perceptual-size", "32",
                      "--lpips-weights", str(lpips_file), "--convnext-weights", str(cnx_file), "--no-compile",
                      "--log-every", "1", "--ckpt-every", "2", "--sample-every", "100", "--workers", "0",
                      "--out", str(out)]))
    ckpt = load_file(str(out / "ckpt_0000002.safetensors"))
    assert {k.split(".")[0] for k in ckpt} == {"params", "ema", "ema_500", "ema_1000", "ema_2000", "opt"}
    assert any(k.endswith("momentum_buffer") for k in ckpt)  # Muon's state
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(r["loss"]) and r["loss_lpips"] > 0 for r in lines)
