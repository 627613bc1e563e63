"""What world-size invariance costs: a step's draws for this rank's rows (global_batch.draw_rows:
the batch's scalars in full, one counter-based noise stream per row) against one plain draw of
the same rows from one generator (objectives.draw), side by side, medians of interleaved rounds.

    python bench/draw_cost.py                         # CPU: digits and latent-sized batches
    python bench/draw_cost.py --device cuda
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmf.global_batch import draw_rows  # noqa: E402
from fastmf.objectives import draw, objective_defaults  # noqa: E402

CASES = [(64, (1, 8, 8)), (256, (4, 32, 32)), (32, (3, 256, 256))]  # (rows of this rank, sample shape)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", default="bench/draw_cost.json")
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = objective_defaults("imf", num_classes=1000)
    results = []
    for rows, shape in CASES:
        x = torch.zeros(rows, *shape, device=device)
        fns = {"draw_rows": lambda: draw_rows(shape, slice(0, rows), rows, 0, 7, cfg, device),
               "plain draw": lambda: draw(x, torch.Generator(device=device).manual_seed(7), cfg)}
        times = {k: [] for k in fns}
        for r in range(args.rounds + 2):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                if r >= 2:  # warm-up rounds
                    times[name].append(time.perf_counter() - t0)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rec = {"rows": rows, "shape": shape, "ms": ms, "ratio": ms["draw_rows"] / ms["plain draw"]}
        results.append(rec)
        print(f"{rows} x {shape}: draw_rows {ms['draw_rows']:.2f} ms, plain {ms['plain draw']:.2f} ms "
              f"({rec['ratio']:.2f}x)")
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
