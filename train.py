"""fastmf trainer: one file, one loop. `python train.py --help` lists every option.

    python train.py                                   # mit-tiny iMF on the embedded digits, CPU, minutes
    python train.py --model dit-tiny --variant mf     # MeanFlow's DiT with the original objective
    python train.py --data phantom3d --steps 500      # the 3D path on random head phantoms
    torchrun --standalone --nproc_per_node=8 train.py --model mit-b --data latents/ --batch-size 256
"""
import dataclasses
import faulthandler
import gc
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from fastmf import distributed
from fastmf.cli import fail, first_line, last_line, resolve_device, writable_folder
from fastmf.ckpt import (list_checkpoints, load_checkpoint, newest_good_checkpoint, prune_checkpoints, read_meta,
                         unflatten_state)
from fastmf.config import TrainConfig, parse
from fastmf.data import Data, EpochSampler, load_dataset, step_batches, to_model_range
from fastmf.data.loader import default_workers, flips
from fastmf.data.volumes import BadVolume
from fastmf.global_batch import draw_rows, rows_in_order
from fastmf.images import save_grid, write_atomically
from fastmf.inference import default_omega, sample_labels
from fastmf.models import Backbone, build, from_record, functional
from fastmf.objectives import LOSSES_FROM_DRAWS, ObjectiveConfig, uses_perceptual
from fastmf.perceptual import Perceptual
from fastmf.optim import make_optimizer
from fastmf.run_checkpoints import Checkpoints
from fastmf.run_state import RunState, ema_decay, warmup_constant_lr
from fastmf.sharded_ckpt import list_sharded
from fastmf.train_step import fast_loss_from_draws

EVAL_CHUNK = 100  # samples per call in the final phantom report


def check_config(cfg: TrainConfig):
    run, optim = cfg.run, cfg.optim
    positive = dict(steps=run.steps, batch_size=cfg.data.batch_size, lr=optim.lr, log_every=run.log_every,
                    sample_every=run.sample_every, ckpt_every=run.ckpt_every, keep_checkpoints=run.keep_checkpoints,
                    max_bad_steps=run.max_bad_steps)
    if cfg.data.voxel_size is not None:
        positive["voxel_size"] = cfg.data.voxel_size
    for name, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            fail(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    if not 0 <= optim.ema < 1:
        fail(f"--ema must be in [0, 1), got {optim.ema}")
    if any(not (h > 0 and math.isfinite(h)) for h in optim.ema_halflives) or not 0 < optim.ema_rampup <= 1:
        fail(f"--ema-halflives must be > 0 and --ema-rampup in (0, 1], got {optim.ema_halflives}, {optim.ema_rampup}")
    at_least_zero = dict(warmup_steps=optim.warmup_steps, grad_clip=optim.grad_clip, eval_samples=run.eval_samples,
                         workers=cfg.data.workers or 0)
    for name, value in at_least_zero.items():
        if not (value >= 0 and math.isfinite(value)):  # written so that nan fails too
            fail(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if 0 < run.eval_samples < 4:  # a Frechet distance needs 2 samples, precision / recall k + 1 = 4
        fail(f"--eval-samples must be 0 (no report) or >= 4, got {run.eval_samples}")
    for name, value in dict(adam_b1=optim.adam_b1, adam_b2=optim.adam_b2).items():
        if not 0 <= value < 1:
            fail(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    if not 0 <= cfg.seed < 2**32:  # the built-in datasets' splits take numpy's 32-bit seeds
        fail(f"--seed must be in [0, 2^32), got {cfg.seed}")
    if cfg.model.patch_size is not None and cfg.model.patch_size < 1:
        fail(f"--patch-size must be >= 1, got {cfg.model.patch_size}")
    if run.sample_omega is not None and not (run.sample_omega >= 1 and math.isfinite(run.sample_omega)):
        fail(f"--sample-omega must be a finite number >= 1 (1: no guidance), got {run.sample_omega}")


####################################################################################################
#                                           Setup                                                  #
####################################################################################################

def make_model(cfg: TrainConfig, sample_shape: tuple, num_classes: int) -> Backbone:
    spatial = tuple(sample_shape[1:])
    patch = cfg.model.patch_size or (2 if len(spatial) == 2 else 4)
    return build(cfg.model.model, cfg.objective.variant, input_size=spatial, in_channels=sample_shape[0],
                 num_classes=num_classes, patch_size=patch, attn_backend=cfg.model.attn_backend)


def class_grid_labels(num_classes: int, per_class: int, device) -> torch.Tensor:
    """Labels for a grid with one row per class (at most 10 rows)."""
    return torch.arange(min(num_classes, 10), device=device).repeat_interleave(per_class)


def init_model(cfg: TrainConfig, sample_shape: tuple, num_classes: int) -> Backbone:
    """--init-from: the checkpoint's own model (its record: preset, variant, whole config) with its
    weights (its EMA where it has one), checked against the data; one line if anything does not fit."""
    path = Path(cfg.model.init_from)
    try:
        _, tensors, meta, _ = newest_good_checkpoint(path) if path.is_dir() else (path, *load_checkpoint(path), [])
        if "model" not in meta:
            raise ValueError("it has no fastmf model record")
        if meta["model"]["variant"] != cfg.objective.variant:
            raise ValueError(f"it holds a {meta['model']['variant']} model; pass --variant {meta['model']['variant']}")
        model = from_record(meta["model"])
        spec = model.spec
        if (spec.in_channels, *spec.input_size) != tuple(sample_shape) or spec.num_classes != num_classes:
            raise ValueError(f"its model takes {(spec.in_channels, *spec.input_size)} with {spec.num_classes} classes, "
                             f"the data is {tuple(sample_shape)} with {num_classes}")
        groups = unflatten_state(tensors)
        weights = groups.get("ema") or groups["params"]
        missing = sorted(set(dict(model.named_parameters())) - set(weights))
        if missing:
            raise ValueError(f"its weights lack {missing[:5]}")
        model.load_state_dict(weights, strict=False)  # the fixed tables are the model's own
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        fail(f"--init-from {path}: {first_line(e)}")
    model.set_attention_backend(cfg.model.attn_backend)
    return model


def restarted_job() -> bool:
    """A worker restarted by torchrun --max-restarts (it resumes by itself)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def saved_record(out: Path) -> dict | None:
    """The model record in a run folder's checkpoints (the same in each: the newest readable one), or None.
    A resumed --init-from run builds its model from it, so the init checkpoint need not stay."""
    metas = [p / "meta.json" for p in list_sharded(out)] + list_checkpoints(out)[::-1]
    for p in metas:
        try:
            meta = json.loads(p.read_text()) if p.name == "meta.json" else read_meta(p)
        except (ValueError, OSError):
            continue
        if "model" in meta:
            return meta["model"]
    return None


def make_perceptual(cfg: TrainConfig, ocfg, sample_shape: tuple, device) -> Perceptual | None:
    """pMF's perceptual networks from their local weight files, when a perceptual term is on;
    one-line errors before training for a missing flag or file, or data they cannot see."""
    if not uses_perceptual(ocfg):
        return None
    lpips, convnext = cfg.perceptual.lpips_weights, cfg.perceptual.convnext_weights
    for lam, path, flags in ((ocfg.lpips_lambda, lpips, ("--lpips-lambda", "--lpips-weights")),
                             (ocfg.convnext_lambda, convnext, ("--convnext-lambda", "--convnext-weights"))):
        if lam > 0 and not path:
            fail(f"{flags[0]} {lam} needs the network's weights: pass {flags[1]} PATH (README: perceptual losses)")
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
        fail(f"the perceptual terms look at images of 1 or 3 channels; the data is {tuple(sample_shape)}")
    try:
        return Perceptual(lpips if ocfg.lpips_lambda > 0 else None, convnext if ocfg.convnext_lambda > 0 else None,
                          ocfg.perceptual_size).to(device)
    except ValueError as e:
        fail(str(e))


def final_eval(cfg: TrainConfig, model: Backbone, weights: dict, step: int, omega: float, out: Path, logger):
    """The final quality report at 1 NFE on the built-in data: digits (the judge's agreement and
    Frechet distance) or phantom3d (precision / recall and Frechet distance against held-out heads)."""
    from fastmf.eval import digits_report, phantom_report
    n, device = cfg.run.eval_samples, next(iter(weights.values())).device
    if cfg.data.data == "digits":
        labels = torch.arange(n, device=device) % 10
        report = digits_report(sample_labels(model, weights, labels, cfg.seed + 7, omega).cpu(), labels.cpu())
        summary = (f"digits @1 NFE: classifier agreement {report['agreement']:.3f} (judge's own accuracy "
                   f"{report['judge_accuracy']:.3f}), Frechet {report['frechet']:.2f} "
                   f"(real: {report['frechet_real']:.2f})")
    else:
        # In chunks: a volume model's attention over all samples at once could fill the memory.
        labels = torch.zeros(EVAL_CHUNK, dtype=torch.int64, device=device)
        samples = torch.cat([sample_labels(model, weights, labels[:min(EVAL_CHUNK, n - lo)], cfg.seed + 7 + lo,
                                           omega).cpu() for lo in range(0, n, EVAL_CHUNK)])
        report = phantom_report(samples, cfg.seed)
        summary = (f"phantoms @1 NFE: precision {report['precision']:.3f} / recall {report['recall']:.3f} (real: "
                   f"{report['precision_real']:.3f} / {report['recall_real']:.3f}), Frechet {report['frechet']:.3f} "
                   f"(real: {report['frechet_real']:.3f})")
    report |= {"step": step, "nfe": 1, "omega": omega, "n": n}
    try:
        write_atomically(out / "eval.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    except OSError as e:
        cannot_write(out / "eval.json", e)
    print(summary)
    if logger.run is not None:
        logger.run.log({f"eval/{k}": v for k, v in report.items()}, step=step)


class StopSignal:
    """SIGTERM (schedulers, torchrun) and SIGINT (Ctrl-C) ask the loop to save and stop."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now, without the save
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name


def cannot_write(path: Path, e: OSError):
    """A full disk or a lost mount while writing a run's file: one line, and the run stops."""
    fail(f"cannot write {path} ({e.strerror or e}); the checkpoints written so far are kept: free space and "
         "continue with --resume")


def rows_up_to(path: Path, step: int) -> list[str]:
    """metrics.jsonl's rows of steps <= step; a row torn by a killed write is dropped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return rows


class Logger:
    """Rank 0's metrics.jsonl (a fresh run starts a fresh file), progress bar and wandb."""

    def __init__(self, cfg: TrainConfig, out: Path, step: int, resumed: bool):
        self.path, self.run = out / "metrics.jsonl", None
        if not resumed:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():  # steps past the resumed checkpoint run again: drop their old rows
            rows = "".join(f"{row}\n" for row in rows_up_to(self.path, step))
            try:
                write_atomically(self.path, lambda tmp: tmp.write_text(rows))  # a kill now loses no row
            except OSError as e:
                cannot_write(self.path, e)
        if cfg.run.wandb:
            import wandb
            os.environ.setdefault("WANDB_MODE", "offline")
            self.run = wandb.init(project=cfg.run.wandb_project, config=asdict(cfg), dir=str(out), resume="allow")
        self.bar = tqdm(total=cfg.run.steps, initial=step, desc="train", dynamic_ncols=True, disable=None)
        self.t_last, self.step_last = time.perf_counter(), step

    def log(self, step: int, record: dict):
        now = time.perf_counter()
        record = record | {"step": step, "steps_per_s": (step - self.step_last) / (now - self.t_last)}
        self.t_last, self.step_last = now, step
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['steps_per_s']:.1f}")
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")  # a row torn by a full disk is dropped on resume (rows_up_to)
        except OSError as e:
            cannot_write(self.path, e)
        if self.run is not None:
            self.run.log(record, step=step)

    def finish(self):
        self.bar.close()
        if self.run is not None:
            self.run.finish()


@dataclasses.dataclass
class Run:
    """A set-up training run: what the loop reads and updates."""
    cfg: TrainConfig
    ocfg: ObjectiveConfig                   # the objective with the data's class count
    dist: distributed.Dist
    use_bf16: bool
    data: Data
    sampler: EpochSampler
    rows: slice                             # this rank's rows of every global batch
    model: Backbone
    params: dict
    opt: torch.optim.Optimizer
    state: RunState
    checkpoints: Checkpoints
    step_loss: Callable                     # (x, y, draws) -> (loss, metrics)
    logger: Logger | None                   # rank 0 only
    sampler_model: Backbone | None = None   # FSDP: an unsharded copy to sample with

    @property
    def out(self) -> Path:
        return Path(self.cfg.run.out)

    @property
    def eval_omega(self) -> float:
        if self.ocfg.variant == "mf":
            return 1.0
        omega = self.cfg.run.sample_omega
        return default_omega(self.ocfg.num_classes) if omega is None else omega

    def sampling_weights(self) -> tuple[Backbone, dict]:
        """The model and EMA weights to sample with (FSDP: gathered into an unsharded copy; a collective)."""
        if not self.checkpoints.sharded:
            return self.model, self.state.ema
        full = distributed.full_tensors(self.state.ema)
        if self.sampler_model is None:
            self.sampler_model = from_record(self.model.record).to(self.dist.device)
        return self.sampler_model, full


def setup(cfg: TrainConfig) -> Run:
    """Process group, data, model, optimizer and run state (resumed where asked), the step function."""
    check_config(cfg)
    dist = distributed.init(cfg.run.device, resolve_device)
    device, main_rank = dist.device, dist.is_main
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    out = Path(cfg.run.out)
    if dist.world > 1 and cfg.reference_loss:
        fail("--reference-loss uses torch.func.jvp, which is broken through DDP (pytorch 102197): "
             "under torchrun train with the fast step (the default)")
    try:
        rows = dist.rows(cfg.data.batch_size)
        data = load_dataset(cfg.data.data, size=cfg.data.image_size, seed=cfg.seed, voxel_size=cfg.data.voxel_size,
                            skip_bad=cfg.data.skip_bad_files)
        sampler = EpochSampler(len(data.source), cfg.data.batch_size, cfg.seed)
        torch.manual_seed(cfg.seed)
        record = saved_record(out) if cfg.model.init_from and (cfg.run.resume or restarted_job()) else None
        if record:  # a resumed fine-tuning run: its own checkpoints hold the model and the weights
            model = from_record(record)
            model.set_attention_backend(cfg.model.attn_backend)
        elif cfg.model.init_from:
            model = init_model(cfg, data.sample_shape, data.num_classes)
        else:
            model = make_model(cfg, data.sample_shape, data.num_classes)
        model = model.to(device)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e) + (" (--skip-bad-files skips such files)" if isinstance(e, BadVolume) else ""))
    if not dist.same([len(data.source), data.num_classes, *data.sample_shape]):  # node-local copies that differ
        fail(f"the processes see different data in {cfg.data.data} (this one: {len(data.source)} samples of "
             f"{data.num_classes} classes, each {tuple(data.sample_shape)}); on several nodes --data must hold the "
             "same files on each")
    ocfg = dataclasses.replace(cfg.objective, num_classes=data.num_classes)
    held = getattr(data.source, "x", None)  # data in memory; its first samples tell the scale
    floats = isinstance(held, torch.Tensor) and held.is_floating_point()
    rms = held[:1024].float().square().mean().sqrt().item() if floats else 1.0
    if rms > 3 and main_rank:  # arrays are taken as stored: pixels in [0, 255] or unscaled latents train badly
        print(f"warning: the data's root mean square is {rms:.3g}; the noise schedules expect data of about unit "
              "scale (images in [-1, 1]: x / 127.5 - 1; VAE latents times the VAE's scaling factor)", file=sys.stderr)
    if int(cfg.data.batch_size * ocfg.data_proportion) == 0 < ocfg.data_proportion and main_rank:
        # int(B * data_proportion) samples of a batch get r = t: with none, the u-head never trains at r = t.
        print(f"warning: --batch-size {cfg.data.batch_size} with data proportion {ocfg.data_proportion} gives no "
              "flow-matching (r = t) sample per batch; use a batch of at least "
              f"{math.ceil(1 / ocfg.data_proportion)}", file=sys.stderr)
    perceptual = make_perceptual(cfg, ocfg, data.sample_shape, device)
    if cfg.reference_loss and cfg.model.attn_backend == "auto":
        # torch.func.jvp needs attention with a JVP rule, and compiled code hides its tangents from "auto"
        model.set_attention_backend("triton" if device.type == "cuda" else "torch")
    # What sample.py needs to write samples back in the data's terms: volume geometry, the latent scale.
    checkpoints = Checkpoints(cfg, dist, model, {"affine": data.affine, "latent_norm": data.latent_norm})
    exists = checkpoints.exist()
    if not dist.same([float(exists)]):  # else some ranks would resume and others start afresh
        fail(f"{out}: some processes see checkpoints there and others do not; on several nodes --out must be a "
             "folder every node sees (a shared filesystem)")
    restarted = restarted_job() and exists
    resumed = cfg.run.resume or restarted  # a job restarted by torchrun --max-restarts resumes by itself
    if resumed != exists:
        fail(f"--resume given but {out} holds no checkpoint" if resumed else
             f"{out} holds checkpoints; pass --resume to continue them or choose another --out")
    try:
        net = (distributed.wrap_fsdp(model, dist, use_bf16) if checkpoints.sharded
               else distributed.wrap_ddp(model, dist))
    except ValueError as e:
        fail(str(e))
    if checkpoints.sharded and cfg.optim.optimizer == "muon":
        fail("--optimizer muon orthogonalises whole weight matrices, which FSDP shards across ranks: "
             "use --parallel ddp with Muon")
    # after wrapping: FSDP's parameters are DTensor shards
    opt, params = make_optimizer(cfg.optim.optimizer, model, dict(model.named_parameters()), cfg.optim.lr,
                                 (cfg.optim.adam_b1, cfg.optim.adam_b2), fused=device.type == "cuda")
    state = RunState(params, opt, cfg.optim.ema_halflives)
    if resumed:
        checkpoints.resume(state)
        if state.step >= cfg.run.steps and main_rank:
            print(f"{out} is already at step {state.step} (--steps {cfg.run.steps}): nothing to train")
    # Wrapped, the step calls the wrapper itself (its params are these very tensors), so its hooks run.
    apply = functional(model) if net is model and dist.world == 1 else (lambda p, *a, **kw: net(*a, **kw))
    loss_from_draws = LOSSES_FROM_DRAWS[ocfg.variant] if cfg.reference_loss else fast_loss_from_draws
    extra = {"perceptual": perceptual} if perceptual is not None else {}
    step_loss = lambda x, y, d: loss_from_draws(apply, params, x, y, d, ocfg, **extra)
    scope = "step" if cfg.reference_loss else cfg.run.compile_scope
    if cfg.run.compile and scope == "blocks":
        if checkpoints.sharded:
            fail("--compile-scope blocks calls the blocks' shared compiled code, which FSDP's hooks do not "
                 "see: use --compile-scope step with --parallel fsdp")
        model.compile_blocks()
    elif cfg.run.compile:  # the draws stay eager: dynamo cannot trace sampling from an explicit generator
        step_loss = torch.compile(step_loss)
    if main_rank:
        n_params = sum(p.numel() for p in params.values())
        print(f"fastmf: {cfg.model.model} ({n_params / 1e6:.2f}M params, {model.spec.num_tokens} tokens) "
              f"{ocfg.variant} on {cfg.data.data} ({len(data.source)} x {data.sample_shape}), {dist.world} x {device}"
              f"{', bf16' if use_bf16 else ''}; out {out}")
        if cfg.run.compile and state.step < cfg.run.steps:
            print(f"compiling the train step ({scope} scope) on its first call (--no-compile skips it)")
        writable_folder(out, "--out")  # after the data are read: --out may lie inside an image folder
        prune_checkpoints(out, cfg.run.keep_checkpoints)  # also removes temp files of killed saves
    logger = Logger(cfg, out, state.step, resumed) if main_rank else None
    return Run(cfg, ocfg, dist, use_bf16, data, sampler, rows, model, params, opt, state, checkpoints, step_loss,
               logger)


####################################################################################################
#                                           Loop                                                   #
####################################################################################################

def train(run: Run) -> StopSignal:
    """Steps until --steps or a stop signal: log, sample, checkpoint. Returns the signal handler."""
    cfg, ocfg, dist, data, state, opt, params = run.cfg, run.ocfg, run.dist, run.data, run.state, run.opt, run.params
    device, main_rank, out, sampler, rows = dist.device, dist.is_main, run.out, run.sampler, run.rows
    step_loss, logger, checkpoints = run.step_loss, run.logger, run.checkpoints
    stop, bad_in_row, skipped = StopSignal(), 0, 0
    B = cfg.data.batch_size
    workers = cfg.data.workers if cfg.data.workers is not None else default_workers() if data.streaming else 0
    batches = step_batches(data.source, sampler, rows_in_order(rows, B, ocfg.data_proportion), state.step,
                           lambda s: flips(cfg.seed, s, B) if cfg.data.hflip else torch.zeros(B, dtype=torch.bool),
                           workers, pin_memory=device.type == "cuda", seed=cfg.seed)
    bad_files = 0
    while state.step < cfg.run.steps:
        try:
            x, y, bad = next(batches)
        except ValueError as e:  # a file that does not decode (in a worker: its message is the last line)
            fail(last_line(e) + " (--skip-bad-files skips such files)")
        bad_files += bad
        _, d = draw_rows(data.sample_shape, rows, B, cfg.seed, state.step, ocfg, device)
        x, y = to_model_range(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        lr = warmup_constant_lr(state.step, cfg.optim.lr, cfg.optim.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
            loss, metrics = step_loss(x, y, d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.optim.grad_clip or float("inf"))
        grad_norm = distributed.full_tensors({"g": grad_norm})["g"]
        # The all-reduced gradients are the same on every rank, so every rank decides alike.
        if math.isfinite(grad_norm.item()):
            opt.step()
            state.update_emas(ema_decay(state.step, cfg.optim.ema), B, cfg.optim.ema_rampup)
            bad_in_row = 0
        else:  # skipped: no weight, optimizer or EMA change
            bad_in_row, skipped = bad_in_row + 1, skipped + 1
            if bad_in_row >= cfg.run.max_bad_steps:
                fail(f"{bad_in_row} steps in a row with a non-finite loss or gradient (up to step {state.step + 1}); "
                     "the learning rate is likely too high (lower --lr or set --grad-clip), or the data holds "
                     "extreme values. The checkpoints in --out are kept.")
        state.step += 1
        step, last = state.step, state.step == cfg.run.steps
        if step % sampler.per_epoch == 0:  # the epoch's summary of skipped files, over all ranks
            total, bad_files = round(dist.mean({"b": torch.tensor(float(bad_files))})["b"].item() * dist.world), 0
            if total and main_rank:
                print(f"epoch {step // sampler.per_epoch}: skipped {total} unreadable file(s)", file=sys.stderr)
        log_now, ckpt_now = step % cfg.run.log_every == 0 or last, step % cfg.run.ckpt_every == 0 or last
        signalled = dist.any(stop.received is not None)
        if log_now:
            metrics = dist.mean(metrics)
            if main_rank:
                logger.log(step, {k: v.item() for k, v in metrics.items()} | {
                    "lr": lr, "grad_norm": grad_norm.item(), "skipped_steps": skipped})
        if step % cfg.run.sample_every == 0 or last:
            sample_model, weights = run.sampling_weights()
            if main_rank:
                labels = class_grid_labels(data.num_classes, 10, device)
                grid = out / f"samples_{step:07d}.png"
                try:
                    save_grid(sample_labels(sample_model, weights, labels, cfg.seed, run.eval_omega), grid, nrow=10)
                except OSError as e:
                    cannot_write(grid, e)
        if ckpt_now or signalled:
            checkpoints.save(state)
        if main_rank:
            logger.bar.update(1)
        if signalled:
            if main_rank:
                print(f"stopped by {stop.received or 'a signal to another rank'} at step {step}: checkpoint saved; "
                      "continue with --resume", file=sys.stderr)
            break
    dist.barrier()
    return stop


def main(cfg: TrainConfig):
    run = setup(cfg)
    stop = train(run)
    if cfg.data.data in ("digits", "phantom3d") and cfg.run.eval_samples and not stop.received:
        sample_model, weights = run.sampling_weights()  # a collective under FSDP: every rank
        if run.dist.is_main:
            final_eval(cfg, sample_model, weights, run.state.step, run.eval_omega, run.out, run.logger)
    if run.dist.is_main:
        run.logger.finish()
    del run  # the DDP wrapper first, then the process group (distributed.shutdown says why)
    gc.collect()
    distributed.shutdown()


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack, for hangs
    main(parse())
