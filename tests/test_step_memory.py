"""bench/step_memory.py predicts a step's memory from fake tensors: the prediction must equal what the
same step allocates on real tensors, and its byte counter must count what it is given."""
import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("step_memory", ROOT / "bench/step_memory.py")
step_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_memory)


def test_live_bytes_counts_each_storage_once_until_freed():
    tracker = step_memory.LiveBytes()
    keep = torch.zeros(10)                       # made before: not counted unless added
    with tracker:
        a = torch.empty(1000)                    # 4000 bytes
        view = a[10:]                            # same storage: not counted again
        b = torch.empty(500, dtype=torch.float64)  # 4000 bytes, peak 8000
        del a, view
        c = torch.empty(250)                     # 1000 bytes: now 5000
    tracker.add(keep)
    assert (tracker.now, tracker.peak) == (4000 + 1000 + 40, 8000)
    del b, c
    assert tracker.now == 40


def test_rms_norm_is_counted_as_cuda_dispatches_it_with_the_same_values():
    """The stand-in for CUDA's fused RMSNorm: F.rms_norm's value and gradient (fp64, to rounding),
    one op forward and one backward, where the CPU's decomposition dispatches many."""
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 7, dtype=torch.float64)

    def run():
        counter = step_memory.OpCounter()
        with counter:
            y = torch.nn.functional.rms_norm(x, (7,), eps=1e-6)
            (dx,) = torch.autograd.grad(y, x, g)
        return y, dx, counter.n
    y_ref, dx_ref, ops_ref = run()
    with step_memory.cuda_rms_norm():
        y, dx, ops = run()
    torch.testing.assert_close(y, y_ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-14, atol=1e-14)
    assert ops == 2 < ops_ref


@pytest.mark.parametrize("case", ["fm", "naive", "fast"])
def test_fake_prediction_equals_the_real_step(case):
    """mit-tiny, bf16 autocast on CPU: the fake step saves exactly the real step's bytes, peaks at
    its bytes and dispatches its ops. fast's real tangent attention runs in the Triton interpreter, which copies each
    kernel argument for the launch (a GPU does not): its real peak is a little higher."""
    if torch.cuda.is_available():  # conftest.py picks the interpreter only where there is no GPU
        pytest.skip("the real CPU step's tangent attention needs the Triton interpreter (CPU-only machines)")
    args = argparse.Namespace(model="mit-tiny", variant=None, input_size=[8, 8], channels=1, patch_size=2,
                              num_classes=10, dtype="bf16")
    fake, real = step_memory.measure(args, case, 8), step_memory.measure(args, case, 8, fake=False)
    assert fake["saved_activation_MiB"] == real["saved_activation_MiB"] > 1
    assert fake["state_MiB"] == real["state_MiB"] > 0
    assert fake["gflop_per_step"] == real["gflop_per_step"] > 0
    # The real CPU step also reads t and y for the backbone's value checks (CPU tensors only, 5 ops
    # each), once per backbone call: fm 1, naive 3 (two guidance passes and the JVP), fast 2.
    calls = {"fm": 1, "naive": 3, "fast": 2}[case]
    assert real["aten_ops_loss_backward"] - fake["aten_ops_loss_backward"] == 10 * calls
    assert fake["aten_ops_loss_backward"] > 1000
    if case == "fast":
        assert 0 <= real["step_peak_MiB"] - fake["step_peak_MiB"] < 0.02 * real["step_peak_MiB"]
    else:
        assert fake["step_peak_MiB"] == real["step_peak_MiB"]
    assert fake["step_peak_MiB"] >= fake["saved_activation_MiB"]


def test_fit_finds_the_largest_batch(tmp_path):
    out = tmp_path / "mem.json"
    args = ["--model", "mit-tiny", "--input-size", "8", "8", "--channels", "1", "--cases", "fast",
            "--fit", "0.0145", "--out", str(out)]                # 14.8 MiB: a batch of a few tens
    subprocess.run([sys.executable, str(ROOT / "bench/step_memory.py"), *args], check=True, capture_output=True,
                   timeout=600)
    (r,) = json.loads(out.read_text())["results"]
    ns = argparse.Namespace(model="mit-tiny", variant=None, input_size=[8, 8], channels=1, patch_size=2, num_classes=10,
                            dtype="bf16")
    assert r["batch"] > 1 and r["total_MiB"] <= 0.0145 * 1024
    assert step_memory.measure(ns, "fast", r["batch"] + 1)["total_MiB"] > 0.0145 * 1024


def test_bad_arguments_are_one_line_errors():
    p = subprocess.run([sys.executable, str(ROOT / "bench/step_memory.py"), "--cases", "slow"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown case 'slow'" in p.stderr and "Traceback" not in p.stderr
