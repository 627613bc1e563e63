"""The trainer's configuration: one nested dataclass (model, objective, optim, data, run), flat on
the command line (`--model mit-b --variant pmf --steps 100`), stored whole in every checkpoint.

Defaults are stated once, here or in the dataclass they belong to (ObjectiveConfig's per-variant
values, the backbone presets); those that depend on another option are None and derived.
"""
from dataclasses import dataclass, field, fields
from typing import Literal

import tyro

from fastmf.models import PRESETS
from fastmf.objectives import ObjectiveConfig
from fastmf.recipes import RECIPES

ModelName = Literal[tuple(PRESETS)]  # the registry's presets are the CLI's choices
RecipeName = Literal[tuple(n for n, r in RECIPES.items() if r.options)]


@dataclass
class ModelOptions:
    model: ModelName = "mit-tiny"
    """Backbone preset (fastmf.models registry): mit-* train MF/iMF/pMF, dit-* (MeanFlow's DiT) train MF."""
    patch_size: int | None = None
    """Patch size (default: 2 for images, 4 for volumes)."""
    init_from: str | None = None
    """Fine-tune: start from this fastmf checkpoint's model and weights (file or run folder; its EMA where it
    has one), e.g. official weights from `python -m fastmf.convert`; --model and --patch-size are then
    taken from it (its record), and the data must fit it. A resumed run reads it again for the model."""
    attn_backend: Literal["auto", "torch", "triton"] = "auto"
    """Attention: 'auto' = PyTorch SDPA for passes without a tangent and the exact JVP kernels for the
    tangent ('triton' flash on CUDA, 'torch' math on CPU; always these two with --reference-loss)."""


@dataclass(frozen=True)
class ObjectiveOptions(ObjectiveConfig):
    """The objective's config with the fields the trainer sets itself hidden from the CLI."""
    num_classes: tyro.conf.Suppress[int] = 1000          # taken from the data


@dataclass
class PerceptualOptions:
    """pMF's perceptual networks (frozen; not trained, averaged or saved): local weight files."""
    lpips_weights: str | None = None
    """LPIPS (VGG16) weights: lpips.LPIPS(net="vgg").state_dict() saved as .pth or .safetensors (README)."""
    convnext_weights: str | None = None
    """ConvNeXt-V2 base weights with timm's names (timm convnextv2_base), .pth or .safetensors (README)."""


@dataclass
class OptimOptions:
    optimizer: Literal["adam", "muon"] = "adam"
    """'adam', or pMF's 'muon': Muon on the weight matrices, Adam (b1, b2 below) on the rest (fastmf/optim.py)."""
    lr: float = 1e-3
    """Peak learning rate (the references use 1e-4 at batch 256 for MiT-B; small models take more)."""
    warmup_steps: int = 100
    """Linear warmup, then constant."""
    adam_b1: float = 0.9
    """Adam beta1."""
    adam_b2: float = 0.95
    """Adam beta2 (as in the iMF / pMF references)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables."""
    ema: float = 0.999
    """Decay of the constant EMA ("ema": grids, evaluation, sample.py's default; the references use 0.9999
    over long runs), warmed up as (1 + step) / (10 + step) (run_state.ema_decay)."""
    ema_halflives: tuple[float, ...] = ()
    """Power-function EMAs kept beside it, by half-life in thousands of samples (pMF: 500 1000 2000); each
    is saved as ema_HALFLIFE, for sample.py --weights."""
    ema_rampup: float = 0.05
    """The power-function EMAs' half-life is at most this fraction of the samples seen so far (pMF: 0.05)."""


@dataclass
class DataOptions:
    data: str = "digits"
    """'digits' (embedded 8x8, 10 classes), 'phantom3d' (random head volumes), or a path: image folder,
    NIfTI folder, or .npz / .safetensors arrays."""
    image_size: int | None = None
    """Images: centre-crop and resize to this size; volumes: crop or pad to this size^3 (folders need it)."""
    voxel_size: float | None = None
    """NIfTI: isotropic voxel size in mm to resample to (default: the first volume's coarsest spacing)."""
    batch_size: int = 64
    """Global batch size (divided over the processes under torchrun)."""
    hflip: bool = False
    """Random horizontal flips of the training samples, keyed by (seed, step, row). Default off: the iMF,
    pMF and MF input pipelines have a flip flag but run without it (latents: the flag is never read)."""
    workers: int | None = None
    """DataLoader processes decoding images per rank (default: 8 for image folders, fewer where a rank's share
    of the CPU cores is smaller; 0 for data in memory)."""
    skip_bad_files: bool = False
    """Skip images that do not decode (counted, a summary line per epoch) and NIfTI volumes that cannot be read
    (counted when the folder is read) instead of stopping with an error."""


@dataclass
class RunOptions:
    """How the run is carried out and reported: a resumed run may change any of these."""
    steps: int = 2000
    """Train until this many optimizer steps."""
    out: str = "runs/default"
    """Output folder: ckpt_STEP.safetensors, metrics.jsonl, samples_STEP.png, eval.json (rank 0 writes)."""
    resume: bool = False
    """Continue exactly from the newest good checkpoint in OUT (the training options must be the same;
    any world size). Under torchrun a restarted job (--max-restarts) resumes by itself."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ..."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: 'ddp' replicates the model on every rank; 'fsdp' (FSDP2) shards weights, gradients
    and optimizer state across the ranks, for models that do not fit one device (mit-xl and up); its
    checkpoints are sharded (OUT/ckpt_STEP.dcp, torch.distributed.checkpoint)."""
    compile: bool = True
    """torch.compile the train step (see --compile-scope); the first step compiles."""
    compile_scope: Literal["step", "blocks"] = "step"
    """'step': the loss and its backward as one graph (fastest steps); 'blocks': each transformer block's
    forward and JVP rule, compiled once for all blocks, the rest eager (faster to compile; see
    bench/RESULTS.md). --reference-loss always compiles the step."""
    log_every: int = 50
    """Steps between lines of OUT/metrics.jsonl (and wandb logs)."""
    sample_every: int = 1000
    """Steps between 1-NFE sample grids OUT/samples_STEP.png."""
    ckpt_every: int = 1000
    """Steps between checkpoints OUT/ckpt_STEP.safetensors (atomic, checksummed; also on SIGTERM/SIGINT)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep (a corrupt newest one falls back to the one before)."""
    max_bad_steps: int = 10
    """Steps with a non-finite loss or gradient are skipped (no weight, optimizer or EMA change); stop
    after this many in a row."""
    eval_samples: int = 1000
    """Samples for the final quality report on the built-in data (digits: classifier agreement; phantom3d:
    precision / recall against held-out heads; both a Frechet distance). 0 skips it."""
    sample_omega: float | None = None
    """CFG scale of sample grids and the final evaluation (iMF/pMF: default 2, 1 for data of one class;
    MF has no guidance input: 1)."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless WANDB_MODE says otherwise; never blocks on the network)."""
    wandb_project: str = "fastmf"
    """Weights & Biases project name."""


@dataclass
class TrainConfig:
    """Train a MeanFlow-family model (MF, iMF or pMF) on images or volumes."""
    model: ModelOptions = field(default_factory=ModelOptions)
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    perceptual: PerceptualOptions = field(default_factory=PerceptualOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    data: DataOptions = field(default_factory=DataOptions)
    run: RunOptions = field(default_factory=RunOptions)
    recipe: RecipeName | None = None
    """An official recipe (fastmf/recipes.py; README table): its model, image size, patch size, loss,
    optimiser, batch, steps and EMAs become the defaults, and any other flag still overrides them."""
    seed: int = 0
    """Seed of the initial weights, the data order, every draw of the loss, and the digits split."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast on CUDA with 'auto'; fp32 on CPU."""
    reference_loss: bool = False
    """Train with the line-by-line reference objective (fastmf.objectives, torch.func.jvp) instead of the
    fast, equal one."""


def with_recipe(name: str) -> TrainConfig:
    """The default config with recipe `name`'s options (flat field names) in their groups."""
    options = dict(RECIPES[name].options)
    groups = {}
    for f in fields(TrainConfig):
        if f.name in ("model", "objective", "perceptual", "optim", "data", "run"):
            cls = f.default_factory
            groups[f.name] = cls(**{k: options.pop(k) for k in [g.name for g in fields(cls)] if k in options})
    if options:
        raise ValueError(f"recipe {name} sets unknown options {sorted(options)}")
    return TrainConfig(**groups, recipe=name)


def parse(args: list[str] | None = None) -> TrainConfig:
    """TrainConfig from the command line, flags without group prefixes; --recipe NAME sets the defaults."""
    import sys
    argv = list(sys.argv[1:] if args is None else args)
    name = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--recipe"), None) or next(
        (a.split("=", 1)[1] for a in argv if a.startswith("--recipe=")), None)
    default = with_recipe(name) if name in RecipeName.__args__ else None  # an unknown name: tyro's error
    return tyro.cli(TrainConfig, args=argv, default=default, config=(tyro.conf.OmitArgPrefixes,))
