#!/usr/bin/env bash
# What train.py needs that the device image lacks, as wheels in .whl/ for a device call to carry
# (run's carry: [".whl"]); bench/gpu_run.sh installs them there before its stages. That is tyro and
# the two packages it brings, and typing-extensions, since typeguard needs >= 4.14 and the image's
# version is unread (it has rich, safetensors, einops, tqdm, scikit-learn: KINDS.md's package list).
# The versions are this machine's, which the suite passed with. Run here, from any folder:
#   bash bench/device_wheels.sh
set -eu
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude  # never committed
pins=$(python3 -c "from importlib.metadata import version as v
print(' '.join(f'{n}=={v(n)}' for n in ('tyro', 'docstring-parser', 'typeguard', 'typing-extensions')))")
rm -rf .whl
# Pure-Python wheels: any platform; the image's Python is 3.12
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl $pins
ls .whl
