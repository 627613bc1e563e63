"""fastmf trainer: one file, one loop. `python train.py --help` lists every option.

    python train.py                                   # mit-tiny iMF on the embedded digits, CPU, minutes
    python train.py --data phantom3d --steps 500      # the 3D path on random head phantoms
    python train.py --model mit-b --variant pmf --data /path/to/images --image-size 256 --patch-size 16
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from fastmf.ckpt import (flatten_state, load_checkpoint, load_optimizer_state, load_rng_state,
                         optimizer_state_to_tensors, rng_state_to_tensors, save_checkpoint,
                         unflatten_state)
from fastmf.data import batches, load_dataset
from fastmf.images import save_grid
from fastmf.models import MiT, build
from fastmf.objectives import LOSSES_FROM_DRAWS, draw, objective_defaults
from fastmf.sampling import sample
from fastmf.train_step import fast_loss_from_draws

ModelName = Literal["mit-tiny", "mit-b", "mit-m", "mit-l", "mit-xl"]


@dataclass
class Config:
    """Train a MeanFlow-family model (MF, iMF or pMF) with MiT."""
    model: ModelName = "mit-tiny"
    """MiT preset."""
    variant: Literal["mf", "imf", "pmf"] = "imf"
    """Objective: original MeanFlow, improved MeanFlow (v-head, CFG in training), pixel MeanFlow (x-prediction)."""
    data: str = "digits"
    """'digits' (embedded 8x8, 10 classes), 'phantom3d' (random 32^3 head volumes), or a path: image folder,
    NIfTI folder, or .npz / .safetensors arrays."""
    image_size: int | None = None
    """Resize images / volumes to this size (image folders need it)."""
    patch_size: int | None = None
    """Patch size; default 2 for images, 4 for volumes."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 64
    """Global batch size."""
    lr: float = 1e-3
    """Peak learning rate (the references use 1e-4 at batch 256 for MiT-B; small models take more)."""
    warmup_steps: int = 100
    """Linear warmup, then constant (warmup_const)."""
    adam_b1: float = 0.9
    """Adam beta1."""
    adam_b2: float = 0.95
    """Adam beta2 (0.95 as in the iMF / pMF references)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables."""
    ema: float = 0.999
    """EMA decay of the weights used for sampling (the references use 0.9999 over long runs). Warmed up as
    min(ema, (1 + step) / (10 + step)) so the initial weights do not linger in short runs."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast on CUDA with 'auto'; fp32 on CPU."""
    compile: bool = True
    """torch.compile the train step (see --compile-scope): compiling first, then 1.5-3x faster steps."""
    compile_scope: Literal["step", "blocks"] = "step"
    """What --compile compiles. 'step': the loss and its backward as one graph, the fastest steps (H100:
    compiled fast step 1.50x a compiled flow-matching step; 106 s to compile MiT-B there, 2.5-5 min on 2
    CPU cores). 'blocks': each transformer block's forward and JVP rule, compiled once for all blocks,
    the rest eager: 2.6x faster to compile MiT-B on CPU (126 s vs 326 s) at about equal step time
    there, but mit-tiny steps run 15-20% slower (eager glue between blocks); unmeasured on GPU.
    --reference-loss always compiles the step."""
    reference_loss: bool = False
    """Use the line-by-line reference objective (fastmf.objectives) instead of the fast, equal one."""
    attn_backend: Literal["auto", "torch", "triton"] = "auto"
    """Attention: 'auto' = PyTorch SDPA for passes without a tangent and the exact JVP kernels for the
    tangent ('triton' flash on CUDA, 'torch' math on CPU; always these two with --reference-loss)."""
    data_proportion: float | None = None
    """Fraction of flow-matching samples (r = t); default per variant (MF 0.75, iMF/pMF 0.5)."""
    P_mean: float | None = None
    """Logit-normal mean of t, r; default per variant (-0.4; pMF 0.8)."""
    P_std: float | None = None
    """Logit-normal std of t, r; default per variant (1.0; pMF 0.8)."""
    cfg_max: float = 7.0
    """Training omega in [1, 1 + cfg_max]."""
    sample_omega: float = 2.0
    """CFG scale for sample grids and the final evaluation (iMF/pMF; MF has no guidance input and samples at 1)."""
    log_every: int = 50
    """Steps between lines of OUT/metrics.jsonl (and wandb logs)."""
    sample_every: int = 1000
    """Steps between 1-NFE sample grids OUT/samples_STEP.png."""
    ckpt_every: int = 1000
    """Steps between checkpoints (params, EMA, optimizer, RNG; written atomically)."""
    eval_samples: int = 1000
    """Samples for the final digits quality report (digits only; 0 skips)."""
    out: str = "runs/default"
    """Output folder: ckpt.safetensors, metrics.jsonl, samples_*.png."""
    resume: bool = False
    """Continue from OUT/ckpt.safetensors exactly (same config)."""
    seed: int = 0
    """Seed of the initial weights, the loss draws, the data order and the digits split."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ..."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless WANDB_MODE says otherwise; never blocks on the network)."""
    wandb_project: str = "fastmf"
    """Weights & Biases project name."""


# Options that do not change the training trajectory, so a resumed run may set them anew.
RESUME_MAY_CHANGE = {"steps", "resume", "compile", "compile_scope", "log_every", "sample_every", "ckpt_every",
                     "eval_samples", "sample_omega", "wandb", "wandb_project", "device"}


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_config(cfg: Config):
    positive = dict(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, log_every=cfg.log_every,
                    sample_every=cfg.sample_every, ckpt_every=cfg.ckpt_every)
    for name, value in positive.items():
        if not value > 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if not 0 <= cfg.ema < 1:
        fail(f"--ema must be in [0, 1), got {cfg.ema}")
    if cfg.warmup_steps < 0 or cfg.grad_clip < 0 or cfg.eval_samples < 0:
        fail("--warmup-steps, --grad-clip and --eval-samples must be >= 0")
    if cfg.patch_size is not None and cfg.patch_size < 1:
        fail(f"--patch-size must be >= 1, got {cfg.patch_size}")


####################################################################################################
#                                           Setup                                                  #
####################################################################################################

def make_model(cfg: Config, x: torch.Tensor, num_classes: int) -> MiT:
    spatial = tuple(x.shape[2:])
    patch = cfg.patch_size or (2 if len(spatial) == 2 else 4)
    return build(cfg.model, input_size=spatial, in_channels=x.shape[1], num_classes=num_classes,
                 patch_size=patch, variant=cfg.variant, attn_backend=cfg.attn_backend)


def objective_config(cfg: Config, num_classes: int):
    over = {k: getattr(cfg, k) for k in ("data_proportion", "P_mean", "P_std") if getattr(cfg, k) is not None}
    return objective_defaults(cfg.variant, num_classes=num_classes, cfg_max=cfg.cfg_max, **over)


def class_grid_labels(num_classes: int, per_class: int, device) -> torch.Tensor:
    """Labels for a grid with one row per class (at most 10 rows)."""
    rows = min(num_classes, 10)
    return torch.arange(rows, device=device).repeat_interleave(per_class)


def generate(model: MiT, params: dict, labels: torch.Tensor, seed: int, omega: float, nfe: int = 1):
    """1-NFE (or few-step) samples for `labels` from fixed noise."""
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    z = torch.randn(len(labels), c.in_channels, *c.input_size, generator=g).to(labels.device)
    apply = lambda p, *a, **kw: torch.func.functional_call(model, p, a, kw)
    return sample(apply, params, z, labels, steps=nfe, omega=omega)


####################################################################################################
#                                           Loop                                                   #
####################################################################################################

def main(cfg: Config):
    check_config(cfg)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    out = Path(cfg.out)
    ckpt_path = out / "ckpt.safetensors"
    if cfg.resume and not ckpt_path.exists():
        fail(f"--resume given but {ckpt_path} does not exist")
    if not cfg.resume and ckpt_path.exists():
        fail(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")

    try:
        data = load_dataset(cfg.data, size=cfg.image_size, seed=cfg.seed)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if cfg.batch_size > len(data.x):
        fail(f"--batch-size {cfg.batch_size} exceeds the dataset size {len(data.x)}")
    torch.manual_seed(cfg.seed)
    try:
        model = make_model(cfg, data.x, data.num_classes).to(device)
    except ValueError as e:
        fail(str(e))
    ocfg = objective_config(cfg, data.num_classes)
    if int(cfg.batch_size * ocfg.data_proportion) == 0 < ocfg.data_proportion:
        # The first int(B * data_proportion) samples of a batch get r = t (as in the references):
        # with none, the u-head never trains at r = t.
        print(f"warning: --batch-size {cfg.batch_size} with data proportion {ocfg.data_proportion} gives no "
              "flow-matching (r = t) sample per batch; use a batch of at least "
              f"{math.ceil(1 / ocfg.data_proportion)}", file=sys.stderr)
    params = dict(model.named_parameters())
    ema = {k: v.detach().clone() for k, v in params.items()}
    # fused: the update is a few kernels instead of several per parameter (CUDA launch overhead)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, betas=(cfg.adam_b1, cfg.adam_b2),
                           fused=device.type == "cuda")
    loss_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    data_gen = torch.Generator().manual_seed(cfg.seed + 2)
    step = 0
    if cfg.resume:
        try:
            tensors, meta = load_checkpoint(ckpt_path)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        saved, now = meta["config"], asdict(cfg)
        changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k])
        if changed:
            fail(f"{ckpt_path} was trained with other values of {', '.join('--' + k.replace('_', '-') for k in changed)}"
                 f" ({', '.join(f'{saved.get(k)!r}' for k in changed)}); resume with the same ones")
        groups = unflatten_state(tensors)
        with torch.no_grad():
            for k in params:
                params[k].copy_(groups["params"][k])
                ema[k].copy_(groups["ema"][k])
        load_optimizer_state(opt, groups.get("opt", {}), meta["opt"], names=list(params))
        load_rng_state({"loss": loss_gen, "data": data_gen}, groups["rng"])
        step = meta["step"]

    apply = lambda p, *a, **kw: torch.func.functional_call(model, p, a, kw)
    if cfg.reference_loss and cfg.attn_backend == "auto":
        # torch.func.jvp needs attention with a JVP rule, and compiled code hides its tangents from "auto"
        model.set_attention_backend("triton" if device.type == "cuda" else "torch")
    loss_from_draws = LOSSES_FROM_DRAWS[cfg.variant] if cfg.reference_loss else fast_loss_from_draws
    step_loss = lambda x, y, d: loss_from_draws(apply, params, x, y, d, ocfg)
    scope = "step" if cfg.reference_loss else cfg.compile_scope
    if cfg.compile and scope == "blocks":
        model.compile_blocks()
    elif cfg.compile:  # the draws stay eager: dynamo cannot trace sampling from an explicit generator
        step_loss = torch.compile(step_loss)
    compute = lambda x, y: step_loss(x, y, draw(x, loss_gen, ocfg))
    per_epoch = len(data.x) // cfg.batch_size
    it = batches(data.x, data.y, cfg.batch_size, data_gen, start=step % per_epoch)
    n_params = sum(p.numel() for p in params.values())
    print(f"fastmf: {cfg.model} ({n_params / 1e6:.2f}M params, {model.cfg.num_tokens} tokens) {cfg.variant} on "
          f"{cfg.data} {tuple(data.x.shape)}, {device}{', bf16' if use_bf16 else ''}; out {out}")
    if cfg.compile and step < cfg.steps:
        print(f"compiling the train step ({scope} scope) on its first call (on 2 CPU cores: ~1-2 min for mit-tiny; "
              f"mit-b ~2.5-5 min, ~2 with --compile-scope blocks; --no-compile skips it)")
    out.mkdir(parents=True, exist_ok=True)
    run = None
    if cfg.wandb:
        import wandb
        os.environ.setdefault("WANDB_MODE", "offline")
        run = wandb.init(project=cfg.wandb_project, config=asdict(cfg), dir=str(out), resume="allow")

    def save():
        opt_tensors, opt_meta = optimizer_state_to_tensors(opt, names=list(params))
        tensors = flatten_state({"params": params, "ema": ema, "opt": opt_tensors,
                                 "rng": rng_state_to_tensors({"loss": loss_gen, "data": data_gen})})
        meta = {"step": step, "config": asdict(cfg), "model": asdict(model.cfg), "opt": opt_meta,
                "num_classes": data.num_classes}
        save_checkpoint(ckpt_path, {k: v.detach().cpu() for k, v in tensors.items()}, meta)

    eval_omega = 1.0 if cfg.variant == "mf" else cfg.sample_omega

    def grid(tag: str):
        labels = class_grid_labels(data.num_classes, 10, device)
        save_grid(generate(model, ema, labels, cfg.seed, eval_omega), out / f"samples_{tag}.png", nrow=10)

    bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True, disable=None)
    t_last, step_last = time.perf_counter(), step
    while step < cfg.steps:
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, metrics = compute(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip or float("inf"))
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.values()), list(params.values()), 1 - decay)
        step += 1
        bar.update(1)
        log_now = step % cfg.log_every == 0 or step == cfg.steps
        ckpt_now = step % cfg.ckpt_every == 0 or step == cfg.steps
        # Checked where we read values anyway (a device sync): at log steps and before every save,
        # so a checkpoint never holds weights that a non-finite step has touched.
        if (log_now or ckpt_now) and not math.isfinite(loss.item()):
            fail(f"non-finite loss {loss.item()} at step {step}; the last checkpoint ({ckpt_path}) is kept. "
                 "Lower --lr or set --grad-clip.")
        if log_now:
            record = {k: v.item() for k, v in metrics.items()} | {"step": step, "lr": lr,
                                                                   "grad_norm": grad_norm.item()}
            now = time.perf_counter()
            record["steps_per_s"] = (step - step_last) / (now - t_last)
            t_last, step_last = now, step
            bar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['steps_per_s']:.1f}")
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if run is not None:
                run.log(record, step=step)
        if step % cfg.sample_every == 0 or step == cfg.steps:
            grid(f"{step:07d}")
        if ckpt_now:
            save()
    bar.close()

    if cfg.data == "digits" and cfg.eval_samples:
        from fastmf.eval import digits_report
        labels = torch.arange(cfg.eval_samples, device=device) % 10
        samples = generate(model, ema, labels, cfg.seed + 7, eval_omega)
        report = digits_report(samples.cpu(), labels.cpu())
        report |= {"step": step, "nfe": 1, "omega": eval_omega, "n": cfg.eval_samples}
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        print(f"digits @1 NFE: classifier agreement {report['agreement']:.3f} (judge's own accuracy "
              f"{report['judge_accuracy']:.3f}), Frechet {report['frechet']:.2f} (real: {report['frechet_real']:.2f})")
        if run is not None:
            run.log({f"eval/{k}": v for k, v in report.items()}, step=step)
    if run is not None:
        run.finish()


if __name__ == "__main__":
    main(tyro.cli(Config))
