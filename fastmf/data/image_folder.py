"""Image folders (ImageNet layout: one subfolder per class) or a CSV of path,label, read lazily.

Only the file list lives in memory (as numpy byte strings: DataLoader workers forked from the
trainer then share it instead of copying Python objects one refcount at a time); each worker
decodes, centre-crops and resizes its images (ADM's center_crop_arr, as the references prepare
ImageNet) and returns uint8 (C, size, size): batches travel as uint8 up to the device.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from fastmf.cli import first_line
from fastmf.data.files import IMAGE_SUFFIXES, _existing_dir, _files


def center_crop_arr(im, size: int) -> np.ndarray:
    """ADM's preprocessing: halve (box filter) while the short side is >= 2 size, resize the short
    side to `size` (bicubic), crop the centre: (size, size[, C]) uint8."""
    from PIL import Image
    while min(*im.size) >= 2 * size:
        im = im.resize(tuple(s // 2 for s in im.size), resample=Image.Resampling.BOX)
    scale = size / min(*im.size)
    im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.Resampling.BICUBIC)
    a = np.asarray(im)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]


def read_image(file: str | Path, size: int, channels: int) -> torch.Tensor:
    """One image as uint8 (channels, size, size); a file that does not decode is a one-line ValueError."""
    from PIL import Image
    try:
        with Image.open(file) as im:
            im = im.convert("RGB" if channels == 3 else "L")  # forces the full decode
    except Exception as e:  # Pillow raises many types: OSError, SyntaxError, DecompressionBombError, ...
        raise ValueError(f"cannot read image {file}: {first_line(e)}") from e
    a = center_crop_arr(im, size)
    return torch.from_numpy(np.ascontiguousarray(a[None] if channels == 1 else a.transpose(2, 0, 1)))


def list_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, class names) of a folder: class subfolders, or images directly (one class)."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    top = _files(root, IMAGE_SUFFIXES)
    if subdirs and top:
        raise ValueError(f"{root} holds both images and subfolders; put all images in class subfolders or none")
    groups = [(d.name, _files(d, IMAGE_SUFFIXES)) for d in subdirs] or [(root.name, top)]
    for name, files in groups:
        if not files:
            raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {root / name if subdirs else root}")
    files = [(label, str(f)) for label, (_, fs) in enumerate(groups) for f in fs]
    return [f for _, f in files], [label for label, _ in files], [name for name, _ in groups]


def list_csv(path: Path) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, class names) of a CSV with rows path,label (paths relative to the CSV's folder)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path} is not a CSV of UTF-8 text: {e}") from None
    files, labels = [], []
    for n, row in enumerate(rows, 1):
        if n == 1 and row and row[-1].strip().lower() == "label":
            continue  # a header row
        if len(row) != 2 or not row[1].strip().lstrip("-").isdigit() or int(row[1]) < 0:
            raise ValueError(f"{path} line {n}: expected 'path,label' with a label >= 0, got {row}")
        file = (path.parent / row[0].strip()).resolve()
        if not file.is_file():
            raise ValueError(f"{path} line {n}: no file {file}")
        files.append(str(file))
        labels.append(int(row[1]))
    if not files:
        raise ValueError(f"{path} lists no images")
    return files, labels, [str(c) for c in range(max(labels) + 1)]


class ImageFolder(torch.utils.data.Dataset):
    """PNG/JPEG images of a folder or CSV, decoded on demand: uint8 (channels, size, size), label.

    With skip_bad, a file that does not decode is replaced by the next readable one of the list
    (deterministic) and counted in the item's third field; otherwise it is a one-line ValueError.
    """

    def __init__(self, path: str | Path, size: int, channels: int = 3, skip_bad: bool = False):
        p = Path(path)
        if size < 1 or channels not in (1, 3):
            raise ValueError(f"need an image size >= 1 and 1 or 3 channels, got {size}, {channels}")
        files, labels, self.classes = list_csv(p) if p.suffix.lower() == ".csv" else list_folder(_existing_dir(p))
        self.files, self.labels = np.array(files, dtype=np.bytes_), torch.tensor(labels, dtype=torch.int64)
        self.size, self.channels, self.skip_bad = size, channels, skip_bad
        self.num_classes, self.sample_shape = len(self.classes), (channels, size, size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple):
        i, flip = key[:2]
        for tries in range(len(self)):
            j = (i + tries) % len(self)
            try:
                x = read_image(self.files[j].decode(), self.size, self.channels)
                return (x.flip(-1) if flip else x), self.labels[j], tries
            except ValueError:
                if not self.skip_bad:
                    raise
        raise ValueError("no image of the dataset is readable")
