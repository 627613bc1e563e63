"""Data loading: samples/s of each loader by number of DataLoader workers, and resident memory while
streaming a large image folder. Prints a table, writes JSON.

    python bench/data_throughput.py                       # generates its data under --tmp
    python bench/data_throughput.py --workers 0 1 2 --memory-files 20000

Loaders, each through fastmf.data.step_batches exactly as train.py uses it (batch 64, this rank's
rows of the global batch, flips where the source takes them):
  png256    image folder of 256x256 PNGs (decode + ADM centre crop to 256 + flip)
  jpeg512   image folder of 512x384 JPEGs, cropped to 256
  latents   safetensors shards of 4x32x32 latents, memory-mapped row by row
  digits    the embedded digits, in memory
Memory: resident set size (this process and its workers, /proc) sampled while streaming an
image folder of --memory-files small PNGs for two epochs: flat means independent of the dataset.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmf.data import EpochSampler, load_dataset, step_batches  # noqa: E402


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children, MiB (Linux /proc)."""
    total = 0.0
    for p in [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except FileNotFoundError:
            pass
    return total


def make_images(folder: Path, n: int, size: tuple, fmt: str):
    if folder.exists() and len(list(folder.rglob(f"*.{fmt}"))) >= n:
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        d = folder / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        # smooth random images (noise compresses badly and decodes slower than photos)
        small = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(d / f"{i:06d}.{fmt}")


def throughput(data, workers: int, batch: int, steps: int) -> float:
    sampler = EpochSampler(len(data.source), batch, 0)
    flip_of = (lambda s: torch.rand(batch, generator=torch.Generator().manual_seed(s)) < 0.5)
    it = step_batches(data.source, sampler, torch.arange(batch), 0, flip_of, workers, pin_memory=False)
    next(it)  # start-up (workers forking, first prefetch) is not counted
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tmp", default="/tmp/fastmf_data_bench")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=10, help="batches timed per loader and worker count")
    p.add_argument("--memory-files", type=int, default=20000)
    p.add_argument("--out", default="bench/data_throughput.json")
    args = p.parse_args()
    tmp = Path(args.tmp)
    batch = 64
    make_images(tmp / "png256", 700, (256, 256), "png")
    make_images(tmp / "jpeg512", 700, (512, 384), "jpg")
    if not (tmp / "latents" / "shard_00000.safetensors").exists():
        (tmp / "latents").mkdir(parents=True, exist_ok=True)
        for k in range(2):
            save_file({"x": torch.randn(4096, 4, 32, 32), "y": torch.arange(4096) % 1000},
                      str(tmp / "latents" / f"shard_{k:05d}.safetensors"))
    sources = {"png256": load_dataset(str(tmp / "png256"), size=256), "jpeg512": load_dataset(str(tmp / "jpeg512"), size=256),
               "latents": load_dataset(str(tmp / "latents")), "digits": load_dataset("digits")}
    results = {"cpu_count": os.cpu_count(), "batch": batch, "throughput": {}, "memory": {}}
    print(f"samples/s (batch {batch}, {os.cpu_count()} CPUs)\n| loader | " + " | ".join(f"{w} workers" for w in args.workers)
          + " |\n|---|" + "---|" * len(args.workers))
    for name, data in sources.items():
        rates = {w: throughput(data, w, batch, args.steps) for w in args.workers}
        results["throughput"][name] = rates
        print(f"| {name} | " + " | ".join(f"{r:.0f}" for r in rates.values()) + " |")

    folder = tmp / f"png8_{args.memory_files}"
    make_images(folder, args.memory_files, (16, 16), "png")
    data = load_dataset(str(folder), size=8)
    workers = max(args.workers)
    sampler = EpochSampler(len(data.source), batch, 0)
    it = step_batches(data.source, sampler, torch.arange(batch), 0, lambda s: torch.zeros(batch, dtype=torch.bool),
                      workers, pin_memory=False)
    trace = []
    for step in range(2 * sampler.per_epoch):
        next(it)
        if step % 50 == 0:
            trace.append((step, rss_mib(os.getpid())))
    results["memory"] = {"files": args.memory_files, "workers": workers, "steps": 2 * sampler.per_epoch,
                         "rss_MiB_by_step": trace}
    print(f"RSS while streaming {args.memory_files} PNGs for 2 epochs with {workers} workers (MiB, process + workers): "
          + ", ".join(f"step {s}: {m:.0f}" for s, m in trace[::max(1, len(trace) // 8)]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
