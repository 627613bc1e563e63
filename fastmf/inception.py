"""The FID Inception-v3: the TensorFlow 2015-12-05 graph that FID and IS are defined on, in torch.

    net = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")
    pool, logits = net(images_uint8)             # (N, 2048) pool3 features, (N, 1008) logits

This is the network of the TTUR / ADM evaluators as pytorch-fid and torch-fidelity port it, with
their parameter names, so either project's converted weights file loads (pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`).
What differs from torchvision's Inception-v3 and matters for the numbers:
- input: uint8 RGB resized to 299 x 299 with TensorFlow 1's bilinear rule (source pixel =
  output pixel * in / out, no half-pixel shift), then (x - 128) / 128;
- average pools exclude the zero padding; the last block pools with a max instead;
- batch norms use eps 1e-3; 1008 classes; the IS logits are pool3 @ fc.weight.T without the bias
  (the original IS code reads the graph's MatMul, before the bias add).
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmf.weights import load_weights

SIZE = 299


def resize(x: torch.Tensor, size: int, rule: str) -> torch.Tensor:
    """Resize (N, C, H, W) to size x size by `rule`: 'tf1' (the TF graph's, torch-fidelity's) or
    'bilinear' (half-pixel centres, edge-clamped: torch's bilinear, which the official iMF/pMF JAX
    evaluators reproduce; it gives slightly different FIDs)."""
    if rule == "tf1":
        return resize_like_tf1(x, size)
    if rule == "bilinear":
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    raise ValueError(f"resize rule must be 'tf1' or 'bilinear', got {rule!r}")


def resize_like_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (N, C, H, W) -> (N, C, size, size) as TF 1.x's resize_bilinear with
    align_corners=False: output pixel i samples the input at i * in / out (edge-clamped), that
    position computed in float32 as TF does (a float64 position moves pixels by up to 1e-4)."""
    def axis(n_in: int):
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = pos.floor().long()
        return lo, (lo + 1).clamp(max=n_in - 1), (pos - lo).to(x.dtype)
    y0, y1, fy = axis(x.shape[-2])
    x0, x1, fx = axis(x.shape[-1])
    top, bottom = x[..., y0, :], x[..., y1, :]                                   # (N, C, size, W)
    rows = top + (bottom - top) * fy[:, None]
    left, right = rows[..., x0], rows[..., x1]                                   # (N, C, size, size)
    return left + (right - left) * fx


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU: the graph's unit ("BasicConv2d")."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class Mixed35(nn.Module):
    """The 35 x 35 blocks (Mixed_5b-d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = ConvBN(c_in, 48, 1), ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)


class Reduce35(nn.Module):
    """Mixed_6a: 35 -> 17 with a strided 3x3 | 1x1-3x3-strided 3x3 | max pool."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class Mixed17(nn.Module):
    """The 17 x 17 blocks (Mixed_6b-e): 1x1 | factorised 7x7 | twice factorised 7x7 | avg pool-1x1."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = ConvBN(c_in, c7, 1), ConvBN(c7, c7, **row), ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = ConvBN(c7, c7, **col), ConvBN(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = ConvBN(c7, c7, **col), ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for k in range(2, 6):
            double = getattr(self, f"branch7x7dbl_{k}")(double)
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(avg_pool(x))], 1)


class Reduce17(nn.Module):
    """Mixed_7a: 17 -> 8 with 1x1-strided 3x3 | 1x1-1x7-7x1-strided 3x3 | max pool."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = ConvBN(c_in, 192, 1), ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        deep = x
        for k in range(1, 5):
            deep = getattr(self, f"branch7x7x3_{k}")(deep)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), deep, F.max_pool2d(x, 3, stride=2)], 1)


class Mixed8(nn.Module):
    """The 8 x 8 blocks (Mixed_7b, 7c): 1x1 | 1x1 then 1x3 and 3x1 | 1x1-3x3 then 1x3 and 3x1 | pool-1x1.
    The TF graph's last block pools with a max where the first averages."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = pool
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = ConvBN(384, 384, **row), ConvBN(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = ConvBN(c_in, 448, 1), ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = ConvBN(384, 384, **row), ConvBN(384, 384, **col)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """uint8 RGB images (N, 3, H, W) -> pool3 features (N, 2048) and unbiased logits (N, 1008)."""

    def __init__(self, resize_rule: str = "tf1"):
        super().__init__()
        self.resize_rule = resize_rule
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = Mixed35(192, 32), Mixed35(256, 64), Mixed35(288, 64)
        self.Mixed_6a = Reduce35(288)
        self.Mixed_6b, self.Mixed_6c = Mixed17(768, 128), Mixed17(768, 160)
        self.Mixed_6d, self.Mixed_6e = Mixed17(768, 160), Mixed17(768, 192)
        self.Mixed_7a = Reduce17(768)
        self.Mixed_7b, self.Mixed_7c = Mixed8(1280, "avg"), Mixed8(2048, "max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FID Inception takes uint8 RGB images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        dtype = self.fc.weight.dtype
        x = (resize(images.to(dtype), SIZE, self.resize_rule) - 128) / 128                # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))         # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                         # (N, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (N, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)                                # ... (N, 2048, 8, 8)
        pool = x.mean((2, 3))                                                    # (N, 2048)
        return pool, pool @ self.fc.weight.T                                     # logits without the bias


def load_fid_inception(path: str | Path, resize_rule: str = "tf1", device="cpu",
                       dtype=torch.float32) -> FIDInception:
    """The FID Inception with weights from a local file (pytorch-fid's or torch-fidelity's .pth, or a
    .safetensors of the same names); a missing or mismatched file is a one-line ValueError."""
    return load_weights(FIDInception(resize_rule), path, "--inception").to(device, dtype)
