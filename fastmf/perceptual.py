"""pMF's perceptual losses on pred_x = z_t - t u: LPIPS (VGG16) and ConvNeXt-V2 features, after a
paired random resized crop; each network frozen, in eval mode, outside the trained parameters.

    perceptual = Perceptual(lpips_weights="lpips_vgg.pth", convnext_weights="convnextv2_base.safetensors")
    dists = perceptual(pred_x, x, crop)          # {"lpips": (B,), "convnext": (B,)}

The architectures are written out with the parameter names of the packages whose weights users
have: LPIPS as `lpips.LPIPS(net="vgg").state_dict()` names it (VGG16 slices + learned linear
heads), ConvNeXt-V2 base as timm's `convnextv2_base` (stem, 4 stages of 3/3/27/3 blocks with
GRN, head norm); Hugging Face's ConvNextV2 names (pMF loads `facebook/convnextv2-base-22k-224`
through transformers) are renamed on load. Weights are loaded from local files only (.safetensors,
or a .pth read with weights_only=True). The ConvNeXt feature is pMF's: the global average pool of the last stage
through the head's LayerNorm; its distance the squared L2 of those features. LPIPS takes [-1, 1]
input (its scaling layer is ImageNet's normalisation); ConvNeXt gets the [-1, 1] images as they
are, as pMF feeds them.
"""
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmf.weights import load_weights, read_state

CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # pMF's paired random resized crop


def crop_boxes(u: torch.Tensor, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) per sample from uniforms u (B, 4): area fraction in CROP_SCALE, log-uniform
    aspect ratio in CROP_RATIO, sizes rounded and clipped to the image, position uniform."""
    area = (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[:, 0]) * height * width
    ratio = torch.exp(math.log(CROP_RATIO[0]) + (math.log(CROP_RATIO[1]) - math.log(CROP_RATIO[0])) * u[:, 1])
    w = torch.sqrt(area * ratio).round().clamp(1, width).long()
    h = torch.sqrt(area / ratio).round().clamp(1, height).long()
    top = (u[:, 2] * (height - h + 1)).floor().clamp(max=height - h).long()
    left = (u[:, 3] * (width - w + 1)).floor().clamp(max=width - w).long()
    return list(zip(top.tolist(), left.tolist(), h.tolist(), w.tolist()))


def paired_crop(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random resized crop of a and b (B, C, H, W), resized to size x size (bicubic, antialiased)."""
    boxes = crop_boxes(u.float().cpu(), a.shape[-2], a.shape[-1])
    resize = lambda t, box: F.interpolate(t[None, :, box[0]:box[0] + box[2], box[1]:box[1] + box[3]], size=(size, size),
                                          mode="bicubic", antialias=True, align_corners=False)
    return (torch.cat([resize(t, box) for t, box in zip(a, boxes)]),
            torch.cat([resize(t, box) for t, box in zip(b, boxes)]))


####################################################################################################
#                                            LPIPS                                                 #
####################################################################################################

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
SLICE_ENDS = (4, 9, 16, 23, 30)  # lpips' slices of torchvision's vgg16.features: after relu1_2 ... relu5_3


class LPIPS(nn.Module):
    """LPIPS v0.1 with VGG16 (lpips' names: net.slice1..5, lin0..4.model.1)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16:
            layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v if v != "M" else c
        self.net = nn.Module()
        for k, (a, b) in enumerate(zip((0,) + SLICE_ENDS, SLICE_ENDS), 1):
            s = nn.Sequential()
            for i in range(a, b):
                s.add_module(str(i), layers[i])
            setattr(self.net, f"slice{k}", s)
        for k, ch in enumerate((64, 128, 256, 512, 512)):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(), nn.Conv2d(ch, 1, 1, bias=False))
            setattr(self, f"lin{k}", lin)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = (x - self.shift) / self.scale, []
        for k in range(1, 6):
            h = getattr(self.net, f"slice{k}")(h)
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))   # unit length over channels
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance (B,) between images a, b (B, 3, H, W) in [-1, 1]."""
        d = 0
        for k, (fa, fb) in enumerate(zip(self.features(a), self.features(b))):
            d = d + getattr(self, f"lin{k}").model((fa - fb).pow(2)).mean((2, 3))   # (B, 1)
        return d[:, 0]


####################################################################################################
#                                         ConvNeXt-V2                                              #
####################################################################################################

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global response normalisation (channels last): x + bias + weight * x * N(x)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):                                                   # (B, H, W, C)
        g = x.norm(p=2, dim=(1, 2), keepdim=True)
        return x + torch.addcmul(self.bias, self.weight, x * (g / (g.mean(-1, keepdim=True) + self.eps)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.grn, self.mlp.fc2 = nn.Linear(dim, 4 * dim), GRN(4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):                                                   # (B, C, H, W)
        h = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        h = self.mlp.fc2(self.mlp.grn(F.gelu(self.mlp.fc1(h))))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXtV2(nn.Module):
    """ConvNeXt-V2 (timm's convnextv2_base names and sizes by default), features only."""

    def __init__(self, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stage = nn.Module()
            stage.downsample = (nn.Identity() if i == 0 else
                                nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, stride=2)))
            stage.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
            self.stages.append(stage)
        self.head = nn.Module()
        self.head.norm = nn.LayerNorm(dims[-1], eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features (B, dims[-1]) of images (B, 3, H, W)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage.blocks(stage.downsample(x))
        return self.head.norm(x.mean((2, 3)))


####################################################################################################
#                                            The term                                              #
####################################################################################################

HF_RENAMES = [  # Hugging Face transformers' ConvNextV2 names -> timm's (regex, replacement), in order
    (r"^embeddings\.patch_embeddings\.", "stem.0."), (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.", r"stages.\1.blocks.\2.mlp.grn."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^layernorm\.", "head.norm."), (r"^classifier\.", "head.fc."),
]


def convnext_state(path: Path) -> dict[str, torch.Tensor]:
    """A ConvNeXt-V2 base weights file with timm's names, or Hugging Face's
    (`facebook/convnextv2-base-22k-224`, as pMF loads it: ConvNextV2Model or ...ForImageClassification,
    whose keys start with "convnextv2."), renamed to timm's; HF's GRN gamma/beta (1, 1, 1, C) become (C,)."""
    state = read_state(path)
    if not isinstance(state, dict) or not any(k.startswith(("convnextv2.", "embeddings.")) for k in state):
        return state
    out = {}
    for k, v in state.items():
        k = k.removeprefix("convnextv2.")
        for pattern, repl in HF_RENAMES:
            k = re.sub(pattern, repl, k)
        out[k] = v.reshape(-1) if ".mlp.grn." in k else v
    return out


class Perceptual(nn.Module):
    """The perceptual distances pMF adds: each network's per-sample distance between the paired crops
    of pred_x and x. Gradients flow to pred_x (the generator), never into the networks."""

    def __init__(self, lpips_weights: str | None, convnext_weights: str | None, size: int = 224):
        super().__init__()
        self.size = size
        self.nets = nn.ModuleDict()
        if lpips_weights:
            self.nets["lpips"] = load_weights(LPIPS(), lpips_weights, "--lpips-weights", ignore=("scaling_layer.",))
        if convnext_weights:
            self.nets["convnext"] = load_weights(ConvNeXtV2(), convnext_weights, "--convnext-weights", ignore=("head.fc.",),
                                                  read=convnext_state)
        self.eval()

    def train(self, mode: bool = True):  # frozen in eval mode whatever the caller sets
        return super().train(False)

    def forward(self, pred_x: torch.Tensor, x: torch.Tensor, crop: torch.Tensor) -> dict[str, torch.Tensor]:
        """pred_x, x (B, C, H, W) in [-1, 1] with C = 3 (or 1, repeated as RGB); crop (B, 4) uniforms."""
        if pred_x.shape[1] == 1:
            pred_x, x = pred_x.expand(-1, 3, -1, -1), x.expand(-1, 3, -1, -1)
        a, b = paired_crop(pred_x, x.detach(), crop, self.size)              # (B, 3, size, size)
        out = {}
        if "lpips" in self.nets:
            out["lpips"] = self.nets["lpips"](a, b)
        if "convnext" in self.nets:
            out["convnext"] = (self.nets["convnext"](a) - self.nets["convnext"](b)).pow(2).sum(-1)
        return out
