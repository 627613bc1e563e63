"""Feature maps for a Frechet distance between sets of volumes (there is no standard 3D Inception).

    net = medicalnet_resnet("resnet_50.pth")     # a user's MedicalNet 3D ResNet: 512- or 2048-d features
    net = RandomConvFeatures()                   # no weights: a fixed random convolutional map (384-d)
    feats = net(volumes)                         # volumes (N, 1, D, H, W) in [-1, 1] -> (N, dim)

MedicalNet (Chen et al. 2019, Tencent/MedicalNet) is the 3D ResNet that 3D-FID papers and MONAI
Generative use: the network is built from the weights file itself (blocks per stage, basic or
bottleneck blocks, shortcut A or B, read off the keys), volumes are z-scored per volume as its
pretraining did, and the feature is the global average of the last stage. The file is read
weights-only; its segmentation head and a DataParallel "module." prefix are ignored.

RandomConvFeatures is what is used without a file, and it is only that: three stride-2 3x3x3
convolutions with fixed Gaussian weights (seed 0, He scaling) and ReLU, each stage's channel means
and standard deviations concatenated. It reacts to intensity, texture and multi-scale structure;
its distances compare samples of one setup with each other, not with published 3D FIDs.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmf.cli import first_line
from fastmf.weights import load_weights, read_state

RANDOM_WIDTHS = (32, 64, 96)


class RandomConvFeatures(nn.Module):
    """Fixed random 3-stage conv net: (N, C, D, H, W) -> (N, 2 * sum(RANDOM_WIDTHS)) = (N, 384)."""

    def __init__(self, in_channels: int = 1, seed: int = 0):
        super().__init__()
        g, c, self.dim = torch.Generator().manual_seed(seed), in_channels, 2 * sum(RANDOM_WIDTHS)
        for k, w in enumerate(RANDOM_WIDTHS):
            weight = torch.randn(w, c, 3, 3, 3, generator=g) * (2.0 / (27 * c)) ** 0.5
            self.register_buffer(f"w{k}", weight, persistent=False)
            c = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for k in range(len(RANDOM_WIDTHS)):
            x = F.relu(F.conv3d(x, getattr(self, f"w{k}").to(x.dtype), stride=2, padding=1))
            feats += [x.mean((2, 3, 4)), x.std((2, 3, 4))]                    # (N, w) each
        return torch.cat(feats, 1)


def conv3(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False)


class Basic(nn.Module):
    expansion = 1

    def __init__(self, c_in, planes, stride, dilation, downsample):
        super().__init__()
        self.conv1, self.bn1 = conv3(c_in, planes, stride, dilation), nn.BatchNorm3d(planes)
        self.conv2, self.bn2 = conv3(planes, planes, dilation=dilation), nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, planes, stride, dilation, downsample):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(c_in, planes, 1, bias=False), nn.BatchNorm3d(planes)
        self.conv2, self.bn2 = conv3(planes, planes, stride, dilation), nn.BatchNorm3d(planes)
        self.conv3, self.bn3 = nn.Conv3d(planes, planes * 4, 1, bias=False), nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        return F.relu(out + self.downsample(x))


class ShortcutA(nn.Module):
    """Parameter-free shortcut: strided identity, zero-padded to the wider channel count."""

    def __init__(self, c_out: int, stride: int):
        super().__init__()
        self.c_out, self.stride = c_out, stride

    def forward(self, x):
        x = F.avg_pool3d(x, 1, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.c_out - x.shape[1]))


class MedicalNetResNet(nn.Module):
    """MedicalNet's 3D ResNet trunk (conv1 7^3 stride 2, max pool, 4 stages; stages 3 and 4 keep the
    resolution with dilations 2 and 4) -> global average pool of stage 4."""

    def __init__(self, blocks: tuple[int, int, int, int], bottleneck: bool, shortcut: str):
        super().__init__()
        block = Bottleneck if bottleneck else Basic
        self.conv1, self.bn1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm3d(64)
        c = 64
        for k, (planes, n, stride, dilation) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 1, 1), (1, 1, 2, 4)), 1):
            layers = []
            for i in range(n):
                s = stride if i == 0 else 1
                down = nn.Identity()
                if i == 0 and (s != 1 or c != planes * block.expansion):
                    down = ShortcutA(planes * block.expansion, s) if shortcut == "A" else nn.Sequential(
                        nn.Conv3d(c, planes * block.expansion, 1, stride=s, bias=False), nn.BatchNorm3d(planes * block.expansion))
                layers.append(block(c, planes, s, dilation, down))
                c = planes * block.expansion
            setattr(self, f"layer{k}", nn.Sequential(*layers))
        self.dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean((1, 2, 3, 4), keepdim=True)) / x.std((1, 2, 3, 4), keepdim=True).clamp_min(1e-6)  # per volume
        x = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        for k in range(1, 5):
            x = getattr(self, f"layer{k}")(x)
        return x.mean((2, 3, 4))                                                 # (N, 512 or 2048)


def medicalnet_state(path: Path) -> dict[str, torch.Tensor]:
    """MedicalNet's file ({'state_dict': ...} with a DataParallel prefix) or a plain state dict."""
    state = read_state(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k.removeprefix("module."): v for k, v in state.items()} if isinstance(state, dict) else state


def medicalnet_resnet(path: str | Path) -> MedicalNetResNet:
    """A MedicalNet ResNet shaped by its weights file and loaded from it, frozen; a missing, unreadable
    or unrecognised file is a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--volume-features {path}: no such file")
    try:
        keys = set(medicalnet_state(path))
    except Exception as e:  # zipfile, the weights-only unpickler and safetensors raise their own types
        raise ValueError(f"--volume-features {path}: unreadable ({first_line(e)[:200]})") from e
    blocks = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{s}.")}) for s in range(1, 5))
    if "conv1.weight" not in keys or 0 in blocks:
        raise ValueError(f"--volume-features {path}: not a MedicalNet 3D ResNet (no conv1 and layer1-4 weights)")
    net = MedicalNetResNet(blocks, bottleneck="layer1.0.conv3.weight" in keys,
                           shortcut="B" if "layer2.0.downsample.0.weight" in keys else "A")
    return load_weights(net, path, "--volume-features", ignore=("conv_seg.",), read=medicalnet_state)
