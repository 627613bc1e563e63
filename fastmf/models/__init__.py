"""The backbone registry: presets by name, `build`, and rebuilding a model from its record.

Adding a backbone: one file defining the network (a `contract.Backbone`), its config dataclass,
PRESETS (name -> config overrides) and VARIANTS (objective -> config overrides; an objective it
cannot train is absent), then one entry in FAMILIES below. The CLI choices, checkpoints and
sample.py follow from the registry.
"""
from dataclasses import asdict, dataclass, fields

from fastmf.models import dit, mit
from fastmf.models.contract import Backbone, Conditions, Prediction, Spec, Tangent, functional
from fastmf.models.dit import DiT, DiTConfig
from fastmf.models.mit import MiT, MiTConfig
from fastmf.models.xpred import XPrediction


@dataclass(frozen=True)
class Family:
    """One backbone: its module, config, presets and the objectives it can train."""
    module: type
    config: type
    presets: dict
    variants: dict

    @property
    def default_variant(self) -> str:
        return "imf" if "imf" in self.variants else next(iter(self.variants))


FAMILIES = {
    "mit": Family(MiT, MiTConfig, mit.PRESETS, mit.VARIANTS),
    "dit": Family(DiT, DiTConfig, dit.PRESETS, dit.VARIANTS),
}
PRESETS: dict[str, dict] = {name: p for f in FAMILIES.values() for name, p in f.presets.items()}
VARIANTS = ("mf", "imf", "pmf")


def family_of(name: str) -> Family:
    for f in FAMILIES.values():
        if name in f.presets:
            return f
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")


def build(name: str, variant: str | None = None, **overrides) -> Backbone:
    """Build preset `name` for objective `variant` (default: iMF where the backbone can, else MF);
    any field of the backbone's config can be overridden (input_size, patch_size, ...). pMF wraps
    the net in x-prediction. The model's `record` rebuilds it (`from_record`)."""
    family = family_of(name)
    variant = family.default_variant if variant is None else variant
    if variant not in family.variants:
        raise ValueError(f"{name} cannot train {variant!r} (it has no v-head; iMF and pMF need one): "
                         f"choose --variant {' or '.join(family.variants)} or another --model")
    known = {f.name for f in fields(family.config)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown {family.module.__name__} option(s) {sorted(unknown)}; known: {sorted(known)}")
    cfg = family.config(**(family.presets[name] | family.variants[variant] | overrides))
    net = family.module(cfg)
    model = XPrediction(net) if variant == "pmf" else net
    model.record = {"name": name, "variant": variant, "config": asdict(cfg)}
    return model


def from_record(record: dict) -> Backbone:
    """The model a checkpoint's record describes (its preset, variant and whole config)."""
    try:
        name, variant, config = record["name"], record["variant"], dict(record["config"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"model record lacks {e}: not a fastmf checkpoint of this version") from e
    return build(name, variant, **config)


__all__ = ["Backbone", "Conditions", "DiT", "DiTConfig", "FAMILIES", "MiT", "MiTConfig", "PRESETS", "Prediction",
           "Spec", "Tangent", "VARIANTS", "XPrediction", "build", "family_of", "from_record", "functional"]
