"""Learning, not just running: short CPU runs on the built-in data give recognisable 1-NFE samples,
measured by the trainer's final report (the digits judge; the phantom report) on fresh seeds."""
import json

from test_train import small, train


def final_report(out, **flags) -> dict:
    train.main(small(out, **flags))
    return json.loads((out / "eval.json").read_text())


def test_digits_imf_run_gives_class_conditional_digits(tmp_path):
    # 400 steps, about a minute: measured agreement 0.98, Frechet 5.8 (real digits 0.57). Untrained
    # samples are noise: measured agreement 0.12, Frechet 45.
    report = final_report(tmp_path / "digits", steps=400, batch_size=64, warmup_steps=50, log_every=100,
                          sample_every=10_000, ckpt_every=10_000, eval_samples=500, seed=3)
    assert report["agreement"] >= 0.9 and report["frechet"] < 10, report


def test_phantom_pmf_run_gives_heads(tmp_path):
    # The README's phantom command, 400 steps instead of 4,500 (about 70 s): measured precision
    # 0.37 / 0.46, Frechet 1.7 / 1.7 at seeds 4 / 5 (real heads 0.25 at 200 samples); the untrained
    # model 0.00 and about 60.
    report = final_report(tmp_path / "heads", data="phantom3d", image_size=16, patch_size=4, variant="pmf",
                          lr=3e-3, P_mean=-0.4, P_std=1.0, data_proportion=0.1, steps=400, batch_size=32,
                          warmup_steps=100, log_every=100, sample_every=10_000, ckpt_every=10_000,
                          eval_samples=200, seed=4)
    assert report["precision"] >= 0.1 and report["frechet"] < 5.0, report
