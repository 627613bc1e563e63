"""The benchmark of record runs on CPU and reports every case and ratio (a smoke test, no timing claims)."""
import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model", ["mit-tiny", "dit-tiny"])
def test_jvp_throughput_runs_all_cases(tmp_path, model):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench/jvp_throughput.py"), "--model", model, "--batch", "8",
                    "--steps", "2", "--warmup", "0", "--out", str(out)], check=True, capture_output=True, timeout=600)
    rep = json.loads(out.read_text())
    assert [r["case"] for r in rep["results"]] == ["fm", "naive", "fast"]
    for r in rep["results"]:
        assert "error" not in r and r["ms_per_step"] > 0 and r["saved_activation_MiB"] > 0
        assert r["aten_ops_per_step"] > 100 and r["step_peak_MiB"] > 0
        assert r["gflop_per_step"] > 0 and r["tflops"] > 0 and "mfu" not in r  # no peak known for a CPU
    flops = {r["case"]: r["gflop_per_step"] for r in rep["results"]}
    assert flops["fm"] < flops["fast"] < flops["naive"]  # the fast step saves work, not only launches
    assert {"fast/fm_time", "fast/naive_time", "fast/naive_saved_activation_MiB"} <= set(rep["ratios"])
    # The fast step keeps no tangent graph: clearly less saved activation memory than naive, and
    # about what flow matching keeps (on CPU the carried rows' math attention adds its N x N probs).
    assert rep["ratios"]["fast/naive_saved_activation_MiB"] < 0.6
    assert rep["ratios"]["fast/fm_saved_activation_MiB"] < 1.15


def test_fid_throughput_times_every_stage(tmp_path):
    out = tmp_path / "fid.json"
    subprocess.run([sys.executable, str(ROOT / "bench/fid_throughput.py"), "--batch", "2", "--batches", "1",
                    "--out", str(out)], check=True, capture_output=True, timeout=600)
    rep = json.loads(out.read_text())
    assert set(rep["images_per_s"]) == {"sample", "inception", "total"} and rep["projected_s"] > 0


def test_kernel_sass_counts_each_kernels_main_loop(tmp_path):
    """Compiled for sm_90 on the CPU: the fused forward+JVP loop issues 3x the tensor-core
    instructions of the primal forward's (6 block matmuls against 2), and needs more shared memory,
    per tile config."""
    out = tmp_path / "sass.json"
    subprocess.run([sys.executable, str(ROOT / "bench/kernel_sass.py"), "--kernels", "fwd+jvp,fwd", "--head-dims", "64",
                    "--out", str(out)], check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    by = {(r["kernel"], r["block_m"], r["block_n"], r["warps"], r["stages"]): r["current"] for r in rows}
    fwd = [key for key in by if key[0] == "fwd"]
    assert fwd and len(by) == 2 * len(fwd)
    for key in fwd:
        primal, jvp = by[key], by[("fwd+jvp", *key[1:])]
        assert primal["tensor_core"] > 0 and jvp["tensor_core"] == 3 * primal["tensor_core"]
        assert primal["exp2"] >= key[1] * key[2] / (32 * key[3])  # one exp2 per score, spread over the threads
        assert jvp["loop_instructions"] > primal["loop_instructions"] and jvp["registers"] <= 255
        # the fused loop also stages the tangents' K and V tiles in shared memory
        assert jvp["shared_memory_bytes"] > primal["shared_memory_bytes"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "bench/kernel_sass.py"), "--baseline", "no-such-rev"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no-such-rev" in bad.stderr and "Traceback" not in bad.stderr


# A loop as Hopper kernels with TMA loads lay it out: an mbarrier wait whose retry path sits after
# the kernel's end and returns into the loop by an unconditional branch. That branch's span holds
# more tensor-core instructions (the loop's second half and the epilogue) than the loop itself.
RETRY_PATH_SASS = """
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ ;
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P4, [UR33], R21 ;
        /*0020*/               @!P4 BRA 0xa0 ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR16], R24 ;
        /*0040*/                   MUFU.EX2 R3, R3 ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR20], R24 ;
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR24], R24 ;
        /*0080*/                   EXIT ;
        /*00a0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P4, [UR33], R21 ;
        /*00b0*/               @!P4 BRA 0xa0 ;
        /*00c0*/                   BRA 0x30 ;
"""


def test_kernel_sass_main_loop_is_not_a_retry_path():
    code = ("import json, sys; sys.path.insert(0, 'bench'); from kernel_sass import main_loop_stats; "
            "print(json.dumps(main_loop_stats(sys.stdin.read())))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, input=RETRY_PATH_SASS, capture_output=True,
                         text=True, check=True, timeout=120)
    stats = json.loads(run.stdout)
    assert (stats["loop_instructions"], stats["tensor_core"], stats["exp2"]) == (5, 1, 1)  # 0x10 .. 0x50
    assert stats["common_path_instructions"] == 5  # the branch to the retry path leaves the loop


def test_attention_bench_reports_the_kernel_and_tflops(tmp_path):
    out = tmp_path / "att.json"
    subprocess.run([sys.executable, "-m", "bench.attention_jvp", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    (row,) = json.loads(out.read_text())["rows"]  # without CUDA: one tiny interpreter case
    assert {"triton fwd", "triton fwd+jvp", "triton fwd+jvp lazy", "kernel fwd+jvp", "triton bwd",
            "triton bwd atomic", "triton bwd sdpa"} <= set(row["tflops"])
    assert row["results"]["kernel fwd+jvp"]["ms"] > 0
    assert set(row["tiles"]) == {"fwd", "fwd+jvp", "bwd dk dv", "bwd dq", "bwd dk dv + atomic dq", "fwd+jvp lazy"}
    assert all(re.fullmatch(r"\d+ x \d+, warps \d+, stages \d+", t) for t in row["tiles"].values()), row["tiles"]


def test_step_bytes_counts_the_compiled_steps_traffic(tmp_path):
    def run(*extra):
        out = tmp_path / "bytes.json"
        subprocess.run([sys.executable, str(ROOT / "bench/step_bytes.py"), "--cases", "fm", "--batch", "2",
                        "--depth", "2", "--aux-head-depth", "1", "--out", str(out), *extra],
                       check=True, capture_output=True, timeout=600)
        return json.loads(out.read_text())
    (r,) = run("--kernels")["results"]
    assert r["gflop"] > 0 and r["generated_kernel_GB"] > 0 and r["extern_kernel_GB"] > 0 and r["kernels"] > 10
    h100, h200 = r["H100"], r["H200"]
    assert h100["roofline_ms"] == pytest.approx(h100["matmul_ms"] + h100["generated_kernel_ms"])
    assert 0 < h100["mfu_ceiling"] < h200["mfu_ceiling"] < 1  # same peak, more bandwidth
    groups = r["top_kernel_groups"]
    assert any(g["group"].startswith("extern") for g in groups) and all(g["GB"] > 0 for g in groups)
    # --kernels lists each graph's kernels, which add up to the totals, with the buffers they touch
    listed = [k for graph in ("forward", "backward") for k in r["kernels_by_graph"][graph]]
    assert len(listed) == r["kernels"] and all(k["writes"] for k in listed)
    assert sum(k["MB"] for k in listed) == pytest.approx(1e3 * (r["generated_kernel_GB"] + r["extern_kernel_GB"]))
    assert any(re.search(r": bfloat16\[\d+(, \d+)*\]$", w) for k in listed for w in k["writes"])
    # --inductor sets an inductor option for the run: realizing every buffer read more than once
    # (threshold 1, default 4) leaves more kernels
    realized = run("--inductor", "realize_reads_threshold=1")
    assert realized["meta"]["args"]["inductor"] == [["realize_reads_threshold", 1]]
    assert realized["results"][0]["kernels"] > r["kernels"]


def test_compiled_fast_step_copies_no_attention_gradient(tmp_path):
    """attention_tail_tangent slices q, k, v into plain and tangent rows when compiled: inductor folds
    the slices' zero-filled gradients into RoPE's backward. A split there (eager's choice) makes the
    backward cat the two rows' gradients in copy kernels of their own (18 `cat` kernels here)."""
    out = tmp_path / "bytes.json"
    subprocess.run([sys.executable, str(ROOT / "bench/step_bytes.py"), "--cases", "fast", "--batch", "4",
                    "--depth", "2", "--aux-head-depth", "1", "--top", "1000", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    (r,) = json.loads(out.read_text())["results"]
    groups = {g["group"] for g in r["top_kernel_groups"]}
    assert "cat" not in groups and any("slice_scatter" in g for g in groups), sorted(groups)


@pytest.fixture(scope="module")
def bench():
    """bench/jvp_throughput.py as a module, loaded once."""
    spec = importlib.util.spec_from_file_location("jvp_throughput", ROOT / "bench/jvp_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inductor_options_are_set_with_their_types(bench):
    import torch._inductor.config as config
    p = argparse.ArgumentParser()
    bench.add_inductor_arg(p)
    args = p.parse_args(["--inductor", "realize_reads_threshold=8", "--inductor", "combo_kernels=True",
                         "--inductor", "realize_opcount_threshold=30"])  # the last is unset (None) by default
    keys = ("realize_reads_threshold", "combo_kernels", "realize_opcount_threshold")
    with config.patch({k: getattr(config, k) for k in keys}):  # restored on exit
        bench.set_inductor_options(args.inductor)
        assert (config.realize_reads_threshold, config.combo_kernels, config.realize_opcount_threshold) == (8, True, 30)


@pytest.mark.parametrize("option,message", [("realize_reads_threshold=x", "realize_reads_threshold takes int values"),
                                            ("no_such_option=1", "expected KEY=VALUE"),
                                            ("realize_reads_threshold", "expected KEY=VALUE"),
                                            ("combo_kernels=maybe", "combo_kernels takes bool values")])
def test_bad_inductor_options_get_one_line_errors_while_parsing(option, message, capsys, bench):
    p = argparse.ArgumentParser(prog="jvp_throughput.py")
    bench.add_inductor_arg(p)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--inductor", option])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.strip().splitlines()[-1].startswith("jvp_throughput.py: error:")


def test_gpu_run_dry_lists_every_stage_and_its_arguments_parse(tmp_path):
    """DRY=1 bench/gpu_run.sh runs nothing: it lists each stage's commands and checks that every
    bench script accepts its arguments, so a wrong flag is found before device time is spent."""
    script = (ROOT / "bench/gpu_run.sh").read_text()
    stages = re.search(r"unknown stage \$stage \(([^)]*)\)", script).group(1).split(", ")
    wheels = tmp_path / "wheels"  # the train stage's tyro travels as a wheel: DRY reads only the names
    wheels.mkdir()
    (wheels / "tyro-1.0-py3-none-any.whl").touch()
    env = os.environ | {"DRY": "1", "OUT": str(tmp_path), "STAGES": " ".join(stages), "WHEELS": str(wheels)}
    r = subprocess.run(["bash", str(ROOT / "bench/gpu_run.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "unknown stage" not in r.stdout and ": 0 refused" in r.stdout
    checked = [line for line in r.stdout.splitlines() if line.startswith("ok: ")]
    assert len(checked) >= len(stages) and all(f"--out {tmp_path}" in line for line in checked)
    assert re.search(r"^ok \(\d+ tests\): -m pytest", r.stdout, re.M)  # the check stage's kernel tests select some
    # INDUCTOR: options for the mfu stages, checked like any argument (a bad key is refused before the device)
    for options, ok in (("realize_reads_threshold=8", True), ("no_such_option=1", False)):
        r = subprocess.run(["bash", str(ROOT / "bench/gpu_run.sh")], cwd=ROOT, capture_output=True, text=True,
                           env=env | {"STAGES": "mfu-b", "INDUCTOR": options}, timeout=300)
        assert (r.returncode == 0) == ok and ("1 refused" in r.stdout) != ok, r.stdout[-2000:]
        assert f"--inductor {options} --out {tmp_path}/mfu_mit-b_b128_" in r.stdout
    # without tyro's wheel the train stage is refused before any device time is spent
    r = subprocess.run(["bash", str(ROOT / "bench/gpu_run.sh")], cwd=ROOT, capture_output=True, text=True,
                       env=env | {"STAGES": "train", "WHEELS": str(tmp_path / "none")}, timeout=300)
    assert r.returncode == 1 and "refused (exit error: train.py needs tyro" in r.stdout, r.stdout[-2000:]
    bad = tmp_path / "bad.txt"
    bad.write_text("bench/jvp_throughput.py --batch 4 --no-such-flag\n-m bench.attention_jvp --reps many\n"
                   "-m pytest -n 4 tests/test_attention_triton.py -k no_such_test\n"
                   "train.py --steps 1\n")  # imports tyro, which the device image lacks
    r = subprocess.run([sys.executable, str(ROOT / "bench/check_commands.py"), str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "4 commands: 4 refused" in r.stdout, r.stdout
    assert "refused (imports tyro, which the device image lacks): train.py" in r.stdout


def test_gpu_train_check_learns_and_compares_resumed_weights(tmp_path):
    """bench/gpu_train_check.py (the train stage): train.py's runs, the judge's report, and the resume
    comparison; on the CPU here, a few steps."""
    out = tmp_path / "train.json"
    subprocess.run([sys.executable, str(ROOT / "bench/gpu_train_check.py"), "--steps", "4", "--resume-steps", "4",
                    "--eval-samples", "4", "--no-compile", "--resume-attn-backends", "auto", "--work",
                    str(tmp_path / "runs"), "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    learn = report["learn"]["imf"]
    assert learn["eval"]["n"] == 4 and 0 <= learn["eval"]["agreement"] <= 1 and learn["wall_s"] > 0
    resume = report["resume"]["auto"]
    assert resume["stopped_at"] == 2 and set(resume["wall_s"]) == {"straight", "straight_again", "split", "resumed"}
    for pair in ("straight_vs_straight", "straight_vs_resumed"):  # the CPU path is exact
        assert resume[pair]["identical"] and resume[pair]["max_abs_diff"] == 0 and resume[pair]["tensors"] > 100
    spec = importlib.util.spec_from_file_location("gpu_train_check", ROOT / "bench/gpu_train_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    compare = module.compare
    a = {"w": torch.zeros(3), "v": torch.ones(2)}
    c = compare(a, {"w": torch.tensor([0.0, 0.5, 0.0]), "v": torch.ones(2)})
    assert not c["identical"] and c["max_abs_diff"] == 0.5 and c["worst_tensor"] == "w" and c["tensors_differing"] == 1
