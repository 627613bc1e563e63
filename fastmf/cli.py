"""What the command-line entry points share: one-line errors for users, the device choice."""
import re
import sys
import tempfile
from pathlib import Path

import torch


def fail(msg: str):
    """Print `error: msg` on one line and exit with status 2 (a user's mistake, not a crash)."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def first_line(e: BaseException) -> str:
    """An error's first line (libraries such as torch's zip reader append advice), or its type's name
    when it has no message (an empty file fails some readers with a bare exception)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def last_line(e: BaseException) -> str:
    """An error's message as one line: errors raised in DataLoader workers (and by DCP) arrive with the
    whole traceback in their text, and the message is its last line ("ValueError: ...")."""
    if not str(e).strip():
        return type(e).__name__
    return re.sub(r"^[\w.]+(Error|Exception): ", "", str(e).strip().splitlines()[-1])


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'; a device this machine lacks is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: this torch build or machine has no CUDA; use --device cpu")
    return device


def writable_folder(folder: Path, flag: str) -> Path:
    """Create `folder` (and its parents) and check that files can be written there, so that a bad
    output path is refused in one line before any work, not after hours of it."""
    if folder.exists() and not folder.is_dir():
        fail(f"{flag}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # read-only filesystems pass mkdir's exist_ok
    except OSError as e:
        fail(f"{flag}: cannot write to the folder {folder} ({e.strerror or e})")
    return folder
