"""The official training recipes and evaluation settings, one name each (`train.py --recipe pmf-b16`).

Read in Lyy-iiis/pMF (configs/pMF_{B,L}_{16,32}_config.yml on main, pMF_H_{16,32} on the hsdp branch,
configs/default.py, eval_config.yml; models/pmfDiT.py for the sizes) and Lyy-iiis/imeanflow
(configs/train_config.yml, eval_config.yml). What every pMF recipe shares: Muon (Adam b2 0.95 on
the rest), lr 1e-3 constant without warmup, batch 1024, 320 epochs, power-function EMAs with
half-lives 500 / 1000 / 2000 kimg and ramp-up 0.05, LPIPS 0.4 and ConvNeXt 0.1, no flips; the
defaults of default.py (data_proportion 0.5, cfg_max 7, class dropout 0.1, norm_p 1, norm_eps 0.01).
Steps are ImageNet-1k's: 1,281,167 images // 1024 = 1,251 per epoch.

One reading to know: the H configs set `convnext_max_t: 0.6`, a key pMF's code does not define (the
released code would refuse it), so fastmf reads it as what it names, a gate on the ConvNeXt term
alone, with LPIPS ungated (perceptual_max_t 1.0, the code's default).
"""
from dataclasses import dataclass, field

IMAGENET_STEPS_PER_EPOCH = 1_281_167 // 1024


@dataclass(frozen=True)
class Evaluation:
    """The guidance an official model is evaluated at (its eval_config.yml)."""
    omega: float
    interval: tuple[float, float]
    weights: str = "ema"
    nfe: int = 1


@dataclass(frozen=True)
class Recipe:
    """Flat train.py options (flag name with underscores -> value) and the evaluation settings."""
    options: dict = field(default_factory=dict)
    evaluation: Evaluation | None = None
    note: str = ""


PMF_COMMON = dict(variant="pmf", data_proportion=0.5, lpips_lambda=0.4, convnext_lambda=0.1, optimizer="muon",
                  lr=1e-3, warmup_steps=0, adam_b2=0.95, batch_size=1024, ema_halflives=(500.0, 1000.0, 2000.0),
                  ema_rampup=0.05, hflip=False, steps=320 * IMAGENET_STEPS_PER_EPOCH)


def pmf(model: str, patch: int, size: int, P_mean: float, noise: float, evaluation: Evaluation,
        gate: dict, **extra) -> Recipe:
    return Recipe(PMF_COMMON | dict(model=model, patch_size=patch, image_size=size, P_mean=P_mean, P_std=0.8,
                                    noise_scale=noise, **gate, **extra), evaluation)


RECIPES: dict[str, Recipe] = {
    "pmf-b16": pmf("pmf-b", 16, 256, 0.8, 1.0, Evaluation(8.5, (0.1, 0.7), "ema_2000"), dict(perceptual_max_t=0.8)),
    "pmf-l16": pmf("pmf-l", 16, 256, 0.8, 1.0, Evaluation(7.0, (0.2, 0.7), "ema_1000"), dict(perceptual_max_t=0.8),
                   cfg_beta=2.0),
    "pmf-h16": pmf("pmf-h", 16, 256, 0.0, 2.0, Evaluation(7.0, (0.2, 0.6), "ema_1000"),
                   dict(perceptual_max_t=1.0, convnext_max_t=0.6), tr_uniform=True),
    "pmf-b32": pmf("pmf-b", 32, 512, 0.8, 2.0, Evaluation(6.5, (0.1, 0.7), "ema_2000"), dict(perceptual_max_t=0.8)),
    "pmf-l32": pmf("pmf-l", 32, 512, 0.0, 4.0, Evaluation(7.5, (0.2, 0.6), "ema_2000"), dict(perceptual_max_t=0.6)),
    "pmf-h32": pmf("pmf-h", 32, 512, 0.0, 4.0, Evaluation(5.5, (0.1, 0.6), "ema_500"),
                   dict(perceptual_max_t=1.0, convnext_max_t=0.6), tr_uniform=True),
    # iMF on 256 px SD-VAE latents (32 x 32 x 4); only B/2's training config is published.
    "imf-b2": Recipe(dict(model="mit-b", variant="imf", patch_size=2, batch_size=1024, lr=1e-4,
                          warmup_steps=10 * IMAGENET_STEPS_PER_EPOCH, adam_b2=0.95, ema=0.9999,
                          steps=640 * IMAGENET_STEPS_PER_EPOCH), Evaluation(8.0, (0.4, 0.65))),
    "imf-m2": Recipe({}, Evaluation(10.5, (0.4, 0.6)), "evaluation settings only (no training config published)"),
    "imf-l2": Recipe({}, Evaluation(10.5, (0.4, 0.6)), "evaluation settings only (no training config published)"),
    "imf-xl2": Recipe({}, Evaluation(8.0, (0.42, 0.62)), "evaluation settings only; at 2 NFE: omega 4.0 in [0.36, 0.64]"),
}
