"""File discovery shared by the folder loaders."""
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ARRAY_SUFFIXES = (".npz", ".safetensors")


def _existing_dir(path: str | Path) -> Path:
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    return root


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    # Hidden files are skipped: macOS "._name.png" metadata files would otherwise read as corrupt.
    return sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.lower().endswith(suffixes))
