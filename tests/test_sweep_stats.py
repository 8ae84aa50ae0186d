"""tools/sweep.py, issue 15: a fixed baseline checkpoint, method-restricted levels, matched-cost levels,
the statistics of summary.md (bootstrap, McNemar, t-intervals), --jobs and the v2 config."""
import concurrent.futures
import contextlib
import csv
import copy
import math
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tools import sweep
from tools import sweep_report
from tools import sweep_rows
from tools import stats as sweep_stats
from test_sweep import FakeMain, read_csv, write_config  # noqa: E402  (tests/ is on the path)

ROOT = Path(__file__).resolve().parent.parent


def fixed_config(tmp_path: Path, **overrides) -> str:
    checkpoint = tmp_path / "trained" / "last.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text("weights")
    levels = [{"name": "f80", "schedule": 1}, {"name": "k3", "schedule": 3, "methods": ["tk", "tk_n"]}]
    return write_config(tmp_path, **{"baseline_checkpoint": str(checkpoint), "seeds": [0, 1, 2],
                                     "methods": ["none", "tk", "tk_n", "tome"], "levels": levels, **overrides})


def run_fake(config: str, fake, *extra: str) -> int:
    return sweep.main(["--config", config, *extra], run_fn=fake, schedule=lambda method, level: level.schedule)


@pytest.fixture
def no_plot(monkeypatch):
    monkeypatch.setattr(sweep_report, "plot_pareto", lambda rows, path, levels: None)


# --- a fixed baseline ----------------------------------------------------------------------------------

def test_a_fixed_baseline_is_evaluated_not_trained(tmp_path):
    config = sweep.load_config(fixed_config(tmp_path), {})
    plan = sweep.plan_runs(config, lambda method, level: level.schedule)
    checkpoint = str(tmp_path / "trained" / "last.pt")
    baseline = [s for s in plan if s.protocol == "baseline"]
    assert len(baseline) == 1 and baseline[0].needs == checkpoint
    assert baseline[0].options["eval_only"] and baseline[0].options["benchmark"]
    assert baseline[0].options["checkpoint"] == checkpoint and baseline[0].options["method"] == "none"
    # off the shelf: once (evaluation does not depend on the seed); tk and tk_n at both levels, tome at f80 only
    offtheshelf = [s for s in plan if s.protocol == "offtheshelf"]
    assert sorted((s.method, s.level) for s in offtheshelf) == [
        ("none", "-"), ("tk", "f80"), ("tk", "k3"), ("tk_n", "f80"), ("tk_n", "k3"), ("tome", "f80")]
    assert {s.seed for s in offtheshelf} == {0} and all(s.options["eval_only"] for s in offtheshelf)
    finetune = [s for s in plan if s.protocol == "finetune"]
    assert len(finetune) == 6 * 3 and {s.seed for s in finetune} == {0, 1, 2}
    assert all(s.options["checkpoint"] == checkpoint and not s.options.get("eval_only") for s in finetune)
    assert all(s.options["save_predictions"] for s in plan)
    assert len(plan) == 1 + 6 + 18
    import main

    for spec in plan:  # what runs.csv says is what runs
        assert vars(main.parse_args(shlex.split(spec.command)[2:])) == vars(main.parse_args([], settings=spec.options))


def test_a_stochastic_method_is_evaluated_once_per_seed_off_the_shelf(tmp_path):
    """random draws other tokens with every seed, so even an evaluation of the fixed baseline runs once per seed;
    low_norm, deterministic, once."""
    config = sweep.load_config(fixed_config(tmp_path, methods=["none", "tk", "random", "low_norm"]), {})
    plan = sweep.plan_runs(config, lambda method, level: level.schedule)
    seeds = {}
    for spec in plan:
        seeds.setdefault((spec.protocol, spec.method, spec.level), []).append(spec.seed)
    assert seeds["offtheshelf", "random", "f80"] == [0, 1, 2] and seeds["offtheshelf", "low_norm", "f80"] == [0]
    assert seeds["offtheshelf", "tk", "f80"] == [0] and seeds["finetune", "random", "f80"] == [0, 1, 2]
    assert ("offtheshelf", "random", "k3") not in seeds  # k3 runs tk and tk_n only
    assert [spec.options["seed"] for spec in plan if spec.protocol == "offtheshelf" and spec.method == "random"] == \
        [0, 1, 2]
    assert len({spec.options["output_dir"] for spec in plan}) == len(plan)


def test_a_fixed_baseline_sweep_runs_and_fills_the_speedups(tmp_path, no_plot):
    fake = FakeMain()
    assert run_fake(fixed_config(tmp_path), fake) == 0
    assert not any(call["method"] == "none" and not call.get("checkpoint") for call in fake.calls)  # none trained
    rows = read_csv(tmp_path / "out" / "runs.csv")
    assert len(rows) == 25
    assert [r["protocol"] for r in rows][:1] == ["baseline"]
    finetune = [r for r in rows if r["protocol"] == "finetune" and r["method"] == "tk"]
    shelf = {r["level"]: r["speedup"] for r in rows if r["protocol"] == "offtheshelf" and r["method"] == "tk"}
    assert all(r["speedup"] == shelf[r["level"]] for r in finetune)  # every seed: the one off-the-shelf measure


def test_a_missing_fixed_baseline_dry_runs_and_is_refused_up_front_when_run(tmp_path, no_plot, capsys):
    config = fixed_config(tmp_path)
    (tmp_path / "trained" / "last.pt").unlink()
    assert run_fake(config, FakeMain(), "--dry_run") == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 25
    fake = FakeMain()
    assert run_fake(config, fake) == 2  # bad input: one line, nothing run
    assert fake.calls == []
    assert capsys.readouterr().err.startswith("sweep.py: error: baseline_checkpoint: ")


def test_more_seeds_later_add_fine_tunes_without_evaluating_the_fixed_baseline_again(tmp_path, no_plot):
    config = fixed_config(tmp_path, seeds=[0])
    assert run_fake(config, FakeMain()) == 0
    fake = FakeMain()
    assert run_fake(config, fake, "--seeds", "1,2") == 0
    assert {(c["seed"], bool(c.get("eval_only"))) for c in fake.calls} == {(1, False), (2, False)}
    rows = read_csv(tmp_path / "out" / "runs.csv")
    assert [r["seed"] for r in rows if r["protocol"] in ("baseline", "offtheshelf")] == ["0"] * 7


def test_levels_option_runs_only_the_levels_named_and_the_summary_keeps_every_level(tmp_path, no_plot):
    config = fixed_config(tmp_path, seeds=[0])
    assert run_fake(config, FakeMain(), "--protocols", "offtheshelf") == 0
    fake = FakeMain()
    assert run_fake(config, fake, "--levels", "k3", "--protocols", "finetune") == 0
    ran = sorted((c["method"], c["schedule"]) for c in fake.calls if not c.get("eval_only"))
    assert ran == [("none", "0"), ("tk", "3"), ("tk_n", "3")]  # method none compresses at no level: it runs
    header = next(line for line in (tmp_path / "out" / "summary.md").read_text().splitlines()
                  if line.startswith("| method | offtheshelf"))
    assert header == "| method | offtheshelf f80 | offtheshelf k3 | finetune k3 |"


def test_an_unknown_level_name_is_one_line(tmp_path, capsys):
    assert run_fake(fixed_config(tmp_path), FakeMain(), "--levels", "k9") == 2
    err = capsys.readouterr().err.strip()
    assert err == "sweep.py: error: --levels: unknown level 'k9'; the config's levels are f80, k3"


def test_per_seed_baselines_still_train_when_no_checkpoint_is_named(tmp_path, no_plot):
    fake = FakeMain()
    assert run_fake(write_config(tmp_path, seeds=[0, 1]), fake) == 0
    trained = [c for c in fake.calls if c["method"] == "none" and not c.get("checkpoint")]
    assert len(trained) == 2


def test_level_methods_are_checked():
    with pytest.raises(ValueError, match="methods"):
        sweep.Level.from_dict({"name": "k2", "schedule": 2, "methods": ["tk", "tkn"]})


def test_compare_best_is_accepted_and_typos_refused(tmp_path):
    sweep.load_config(write_config(tmp_path, compare=[["tome", "best"]]), {})
    with pytest.raises(ValueError, match="compare"):
        sweep.load_config(write_config(tmp_path, compare=[["tome", "bset"]]), {})


# --- matched cost --------------------------------------------------------------------------------------

def test_matched_flops_levels_cost_the_same_for_every_method_and_respect_reduce_at():
    import timm

    import pruning.models  # noqa: F401
    from pruning.flops import analytic_flops
    from pruning.patch import apply_patch
    from pruning.schedules import matched_flops_schedule

    model = timm.create_model("vit_nano_patch4_28", num_classes=10, in_chans=1)
    base = analytic_flops(model)
    resolver = sweep.LevelResolver(model)
    for ratio in (0.8, 0.65, 0.5):
        level = sweep.Level.from_dict({"name": f"f{ratio}", "flops_ratio": ratio})
        for method in ("tk", "tk_n", "evit", "evit_n", "n_wa", "a_wn", "tome"):
            schedule = resolver.schedule(method, level)
            assert schedule == matched_flops_schedule(model, method, ratio * base)
            patched = apply_patch(copy.deepcopy(model), method, schedule)  # the method's own reduce_at
            assert analytic_flops(patched) / base == pytest.approx(ratio, abs=0.02), (method, ratio)
    # tome reduces between attention and MLP: its schedule differs from one placed after the block
    level = sweep.Level.from_dict({"name": "f65", "flops_ratio": 0.65})
    assert sweep.LevelResolver(model).schedule("tome", level) != \
        sweep.LevelResolver(model, reduce_at="block").schedule("tome", level)


def test_runs_csv_records_schedules_environment_and_analytic_gflops(tmp_path, no_plot):
    class WithExtras(FakeMain):
        def __call__(self, options):
            results = super().__call__(options)
            k = int(options["schedule"])
            results.update(schedule_per_block=[k, k + 1], removed_per_block=[k, 1], analytic_gflops=0.5 - 0.01 * k,
                           prop_attn="on",
                           environment={"python": "3", "torch": "2.x", "timm": "1.x", "numpy": "2.x",
                                        "device": "Some CPU", "threads": 1})
            return results

    run_fake(fixed_config(tmp_path), WithExtras())
    rows = read_csv(tmp_path / "out" / "runs.csv")
    row = next(r for r in rows if r["method"] == "tk" and r["level"] == "k3")
    assert (row["schedule"], row["schedule_per_block"], row["removed_per_block"]) == ("3", "3,4", "3,1")
    assert (row["analytic_gflops"], row["prop_attn"]) == ("0.47", "on")
    assert (row["torch"], row["timm"], row["numpy"], row["device"], row["threads"]) == \
        ("2.x", "1.x", "2.x", "Some CPU", "1")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "- torch 2.x, timm 1.x, numpy 2.x; Some CPU; 1 threads: 25 runs" in summary


# --- statistics ------------------------------------------------------------------------------------------

def test_bootstrap_ci_is_seeded_and_is_the_straightforward_loop():
    correct = (np.arange(500) % 7 != 0).astype(float) * 100  # 85.8% right
    mean, low, high = sweep_stats.bootstrap_ci(correct, resamples=300, seed=5)
    rng = np.random.default_rng(5)
    means = [correct[rng.integers(0, 500, 500)].mean() for _ in range(300)]
    assert (low, high) == tuple(np.percentile(means, [2.5, 97.5]))
    assert mean == pytest.approx(correct.mean())
    assert sweep_stats.bootstrap_ci(correct, resamples=300, seed=5) == (mean, low, high)
    assert sweep_stats.bootstrap_ci(correct, resamples=300, seed=6) != (mean, low, high)
    # close to the normal approximation of a proportion
    p = correct.mean() / 100
    half = 196 * math.sqrt(p * (1 - p) / 500)
    assert low == pytest.approx(mean - half, abs=1.0) and high == pytest.approx(mean + half, abs=1.0)


def test_ratio_of_medians_resamples_rounds_as_pairs():
    rng = np.random.default_rng(1)
    drift = 1 + rng.uniform(0, 0.5, 40)  # a machine whose speed drifts from round to round moves both timings
    bound, method = 0.070 * drift, 0.075 * drift * (1 + rng.normal(0, 0.002, 40))
    ratio, low, high = sweep_stats.bootstrap_ratio_of_medians(bound, method, resamples=200, seed=3)
    draws = np.random.default_rng(3)
    ratios = []
    for _ in range(200):
        rounds = draws.integers(0, 40, 40)
        ratios.append(np.median(bound[rounds]) / np.median(method[rounds]))
    assert (low, high) == tuple(np.percentile(ratios, [2.5, 97.5]))
    assert ratio == np.median(bound) / np.median(method)
    # paired, the interval is about the method's own 0.2 % noise, not the drift's 50 %
    assert low < 70 / 75 < high and high - low < 0.02
    unpaired = sweep_stats.bootstrap_ratio_of_medians(bound, rng.permutation(method), resamples=200, seed=3)
    assert unpaired[2] - unpaired[1] > 5 * (high - low)
    with pytest.raises(ValueError, match="same non-zero length"):
        sweep_stats.bootstrap_ratio_of_medians(bound, method[:-1])


@pytest.mark.parametrize("a_only, b_only", [(0, 0), (3, 3), (12, 30), (0, 9), (41, 17), (400, 460)])
def test_mcnemar_exact_matches_the_binomial_test(a_only, b_only):
    stats = pytest.importorskip("scipy.stats")
    both, neither = 50, 20
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    found = sweep_stats.mcnemar_exact(a, b)
    expected = 1.0 if a_only + b_only == 0 else stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
    assert found[:2] == (a_only, b_only)
    assert found[2] == pytest.approx(expected, rel=1e-9)


def test_t_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 30):
        assert sweep_stats.t_quantile_95(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
    values = [1.0, 3.0, -1.0]
    mean, low, high = sweep_stats.t_interval(values)
    half = stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((1.0, 1.0 - half, 1.0 + half), abs=1e-3)
    assert math.isnan(sweep_stats.t_interval([2.0])[1])


def write_predictions(out: Path, name: str, predicted, labels) -> str:
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    np.savez(out / "predictions" / name, predicted=np.asarray(predicted), labels=np.asarray(labels))
    return f"predictions/{name}"


def shelf_row(method, level, accuracy, predictions="", protocol="offtheshelf", seed=0):
    return {"protocol": protocol, "method": method, "level": level, "schedule": "1", "seed": str(seed),
            "accuracy": str(accuracy), "gflops": "0.01", "throughput": "1000", "speedup": "1.1",
            "predictions": predictions, "command": "python main.py"}


def test_summary_off_the_shelf_paired_bootstrap_and_mcnemar(tmp_path):
    out = tmp_path / "out"
    n = 400
    labels = np.arange(n) % 10
    rng = np.random.default_rng(1)
    right_tk = rng.random(n) < 0.80
    right_tk_n = right_tk.copy()
    right_tk_n[np.flatnonzero(right_tk)[:30]] = False  # tk_n loses 30 images tk gets right
    right_tk_n[np.flatnonzero(~right_tk)[:6]] = True  # and wins 6
    right_tome = rng.random(n) < 0.9
    rows = []
    for method, right in (("tk", right_tk), ("tk_n", right_tk_n), ("tome", right_tome)):
        predicted = np.where(right, labels, (labels + 1) % 10)
        path = write_predictions(out, f"{method}.npz", predicted, labels)
        rows.append(shelf_row(method, "f80", 100 * right.mean(), path))
    sweep_report.write_summary(rows, out / "summary.md", ["f80"], [("tk_n", "tk"), ("tome", "best")])
    text = (out / "summary.md").read_text()

    diff = (right_tk_n.astype(float) - right_tk.astype(float)) * 100
    _, low, high = sweep_stats.bootstrap_ci(diff)
    p = sweep_stats.mcnemar_exact(right_tk_n.tolist(), right_tk.tolist())[2]
    assert high < 0 and p < 0.001
    assert f"| offtheshelf | f80 | {diff.mean():+.2f} | [{low:.2f}, {high:.2f}] | McNemar p = {p:.2g} | tk better |" \
        in text
    assert f"| offtheshelf | f80 | tk_n − tk | {diff.mean():.2f} | [{low:.2f}, {high:.2f}] | McNemar p = {p:.2g} " \
           f"| 6 vs 30 images |" in text
    assert "| offtheshelf | f80 | tome − tk (best pruning) |" in text  # tk beats tk_n here
    _, low, high = sweep_stats.bootstrap_ci(right_tome.astype(float) * 100)
    assert f"| offtheshelf | f80 | tome | {100 * right_tome.mean():.2f} | [{low:.2f}, {high:.2f}] | tk |" in text
    assert f"| offtheshelf | tome | f80 | {100 * right_tome.mean():.2f} | [{low:.2f}, {high:.2f}] | bootstrap over " \
           f"{n} test images |" in text


def test_one_common_seed_is_compared_on_that_seeds_predictions(tmp_path):
    """a ran seeds 0 and 1, b only seed 0: their difference and its interval come from seed 0 of both,
    whatever order runs.csv lists the rows in."""
    out = tmp_path / "out"
    n = 300
    labels = np.arange(n) % 10
    rng = np.random.default_rng(2)
    right = {("tk", 0): rng.random(n) < 0.8, ("tk", 1): rng.random(n) < 0.5, ("tk_n", 0): rng.random(n) < 0.7}
    rows = []
    for (method, seed), correct in right.items():
        predicted = np.where(correct, labels, (labels + 1) % 10)
        path = write_predictions(out, f"{method}{seed}.npz", predicted, labels)
        rows.append(shelf_row(method, "f80", 100 * correct.mean(), path, protocol="finetune", seed=seed))
    rows.reverse()  # seed 1 of tk first
    diff = (right["tk_n", 0].astype(float) - right["tk", 0].astype(float)) * 100
    _, low, high = sweep_stats.bootstrap_ci(diff)
    found = sweep_report.pair_interval(rows, "tk_n", "tk", "finetune", "f80", out)
    assert (found.mean, found.low, found.high) == pytest.approx((diff.mean(), low, high))
    assert sweep_report.paired_differences(rows, "tk_n", "tk", "finetune", "f80") == pytest.approx([diff.mean()])


def test_one_run_against_the_draws_of_random_is_a_bootstrap_of_the_per_image_mean(tmp_path):
    """Off the shelf tk ran once, random once per seed (3 draws): tk − random pairs tk's run with each draw; the
    interval is the bootstrap over the images of tk's correctness minus random's averaged over its draws."""
    out = tmp_path / "out"
    n = 300
    labels = np.arange(n) % 10
    rng = np.random.default_rng(4)
    right_tk = rng.random(n) < 0.85
    draws = [rng.random(n) < 0.6 for _ in range(3)]
    rows = []
    for method, seed, correct in [("tk", 0, right_tk)] + [("random", s, d) for s, d in enumerate(draws)]:
        predicted = np.where(correct, labels, (labels + 1) % 10)
        rows.append(shelf_row(method, "f80", 100 * correct.mean(),
                              write_predictions(out, f"{method}{seed}.npz", predicted, labels), seed=seed))
    per_image = (right_tk.astype(float) - np.mean([d.astype(float) for d in draws], axis=0)) * 100
    mean, low, high = sweep_stats.bootstrap_ci(per_image)
    found = sweep_report.pair_interval(rows, "tk", "random", "offtheshelf", "f80", out)
    assert (found.mean, found.low, found.high) == pytest.approx((mean, low, high))
    assert found.how == f"paired bootstrap over {n} test images, mean of 3 draws" and not found.test
    a_only = sum(int((right_tk & ~d).sum()) for d in draws)
    b_only = sum(int((d & ~right_tk).sum()) for d in draws)
    assert found.ahead == f"{a_only} vs {b_only} images (3 draws)"
    diffs = [100 * (right_tk.mean() - d.mean()) for d in draws]
    assert sweep_report.paired_differences(rows, "tk", "random", "offtheshelf", "f80") == pytest.approx(diffs)
    assert sweep_report.pair_interval(rows, "random", "tk", "offtheshelf", "f80", out).mean == pytest.approx(-mean)
    sweep_report.write_summary(rows, out / "summary.md", ["f80"], [("tk", "random")])
    text = (out / "summary.md").read_text()
    assert f"| offtheshelf | f80 | tk − random (control) | {np.mean(diffs):.2f} ± {np.std(diffs, ddof=1):.2f} " \
           f"| [{low:.2f}, {high:.2f}] | – | {a_only} vs {b_only} images (3 draws) |" in text
    assert "| random (control) |" in text
    # random's own accuracy: the bootstrap over the images of its correctness averaged over the draws
    mean, low, high = sweep_stats.bootstrap_ci(np.mean([d.astype(float) for d in draws], axis=0) * 100)
    assert f"| offtheshelf | random (control) | f80 | {mean:.2f} | [{low:.2f}, {high:.2f}] | bootstrap over {n} " \
           f"test images, mean of 3 draws |" in text


def test_a_control_is_never_the_best_method(tmp_path):
    rows = [shelf_row("tk", "f80", 70.0), shelf_row("low_norm", "f80", 75.0)]
    rows += [shelf_row("random", "f80", acc, seed=s) for s, acc in enumerate((80.0, 81.0, 82.0))]
    lines = sweep_report.best_table(rows, sweep_report.accuracy_intervals(rows, tmp_path), ["f80"], tmp_path)
    assert [line.split(" | ")[2] for line in lines[2:]] == ["tk"]


def test_summary_fine_tuned_differences_are_t_intervals_over_seeds(tmp_path):
    rows = [shelf_row("tk", "f80", acc, protocol="finetune", seed=s) for s, acc in enumerate((80.0, 82.0, 87.0))]
    rows += [shelf_row("tk_n", "f80", acc, protocol="finetune", seed=s) for s, acc in enumerate((81.0, 85.0, 86.0))]
    sweep_report.write_summary(rows, tmp_path / "summary.md", ["f80"], [("tk_n", "tk")])
    text = (tmp_path / "summary.md").read_text()
    assert "| finetune | f80 | +1.00 | [-3.97, 5.97] | t = 0.9, 2 df | no difference shown |" in text
    # best at f80: tk_n (mean 84) over tk (83); its own interval over the 3 seeds
    mean, low, high = sweep_stats.t_interval([81.0, 85.0, 86.0])
    assert f"| finetune | f80 | tk_n | {mean:.2f} | [{low:.2f}, {high:.2f}] | tk | +1.00 | [-3.97, 5.97] |" in text


def test_summary_pivots_each_protocols_intervals_by_method_and_level(tmp_path):
    rows = [shelf_row("tk", "f80", acc, protocol="finetune", seed=s) for s, acc in enumerate((80.0, 82.0, 87.0))]
    rows += [shelf_row("none", "-", acc, protocol="finetune", seed=s) for s, acc in enumerate((90.0, 91.0, 92.0))]
    rows += [shelf_row("tk_n", "f50", 70.0, protocol="finetune")]  # one run, no predictions: no interval
    sweep_report.write_summary(rows, tmp_path / "summary.md", ["f80", "f50"], [("tk_n", "tk")])
    text = (tmp_path / "summary.md").read_text()
    tk, none = sweep_stats.t_interval([80.0, 82.0, 87.0]), sweep_stats.t_interval([90.0, 91.0, 92.0])
    none_cell = f"{none[0]:.2f} [{none[1]:.2f}, {none[2]:.2f}]"
    assert "finetune:\n\n| method | f80 | f50 |\n|---|---|---|\n" in text
    assert f"| none | {none_cell} | {none_cell} |" in text  # uncompressed: every level
    assert f"| tk | {tk[0]:.2f} [{tk[1]:.2f}, {tk[2]:.2f}] |  |" in text  # tk did not run at f50
    assert "| tk_n |  | 70.00 – |" not in text and "| tk_n |  | 70.00 |" in text
    assert "offtheshelf:" not in text  # no off-the-shelf runs: no table


# --- --jobs ----------------------------------------------------------------------------------------------

def test_jobs_respect_the_baselines_and_write_rows_in_plan_order(tmp_path, no_plot):
    """Per-seed baselines with 3 runs at once (threads stand in for processes): no run starts before its
    baseline's checkpoint is there, and runs.csv is the same as one run at a time."""
    class Checking(FakeMain):
        def __call__(self, options):
            if options.get("checkpoint"):
                assert Path(options["checkpoint"]).exists(), "started before its baseline"
            return super().__call__(options)

    config = write_config(tmp_path, seeds=[0, 1, 2])
    plan = sweep.plan_runs(sweep.load_config(config, {}), lambda method, level: level.schedule)
    csv_path = tmp_path / "out" / "runs.csv"
    failed = sweep.execute(plan, csv_path, Checking(), log=lambda line: None, jobs=3,
                           pool_factory=lambda: concurrent.futures.ThreadPoolExecutor(3))
    assert failed == []
    parallel = read_csv(csv_path)
    assert [sweep_rows.row_key(r) for r in parallel] == [spec.key for spec in plan]

    csv_path.unlink()
    sweep.execute(plan, csv_path, FakeMain(), log=lambda line: None)
    drop = sweep_rows.TIMING_FIELDS
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_csv(csv_path)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in parallel]


def test_jobs_skip_the_runs_of_a_failed_baseline(tmp_path, no_plot):
    config = write_config(tmp_path, seeds=[0, 1])
    plan = sweep.plan_runs(sweep.load_config(config, {}), lambda method, level: level.schedule)
    failed = sweep.execute(plan, tmp_path / "out" / "runs.csv", FakeMain(fail_on="--epochs 2 --save_predictions --model none "
                                                                                  "--reduce_token 0 --seed 1"),
                           log=lambda line: None, jobs=2, pool_factory=lambda: concurrent.futures.ThreadPoolExecutor(2))
    assert {spec.seed for spec, _ in failed} == {1} and len(failed) == len([s for s in plan if s.seed == 1])


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="jobs"):
        sweep.load_config(write_config(tmp_path, jobs=0), {})


def test_tiny_real_sweep_with_two_jobs_equals_one_job(tmp_path):
    """A real sweep on digits from a fixed baseline, in two processes at once and one at a time: the same
    runs.csv apart from the timing columns, and the same predictions."""
    import main

    baseline = tmp_path / "baseline"
    main.run(main.parse_args(["--model", "none", "--reduce_token", "0", "--train_subset", "256", "--test_subset",
                              "120", "--batch_size", "64", "--epochs", "1", "--bench_steps", "1", "--bench_warmup", "0",
                              "--output_dir", str(baseline)]))
    common = dict(
        seeds=[0, 1], methods=["none", "tk", "tome"], levels=[{"name": "f80", "flops_ratio": 0.8}],
        baseline_checkpoint=str(baseline / "last.pt"), protocols=["offtheshelf", "finetune"],
        main_args={"data_name": "digits", "train_subset": 256, "test_subset": 120, "batch_size": 64,
                   "bench_warmup": 0, "bench_steps": 1},
        finetune_args={"epochs": 1, "train_subset": 128}, offtheshelf_args={"benchmark": True}, threads=1)
    outputs = {}
    for jobs in (2, 1):
        folder = tmp_path / f"jobs{jobs}"
        folder.mkdir()
        config = write_config(folder, jobs=jobs, **common)
        assert sweep.main(["--config", config]) == 0
        outputs[jobs] = read_csv(folder / "out" / "runs.csv")
    assert len(outputs[1]) == 1 + 3 + 3 * 2
    varying = (*sweep_rows.TIMING_FIELDS, "command")  # the command names the run's folder, which differs here

    def comparable(rows):
        return [{k: v for k, v in r.items() if k not in varying} for r in rows]

    assert comparable(outputs[2]) == comparable(outputs[1])
    by = {(r["protocol"], r["method"], r["seed"]): r for r in outputs[1]}
    assert by["offtheshelf", "tome", "0"]["prop_attn"] == "on" and by["finetune", "tome", "1"]["prop_attn"] == "off"
    assert by["offtheshelf", "none", "0"]["accuracy"] == by["baseline", "none", "0"]["accuracy"]
    assert by["baseline", "none", "0"]["speedup"]  # the fixed baseline is benchmarked too
    for r in outputs[1]:
        saved = np.load(tmp_path / "jobs1" / "out" / r["predictions"])
        again = np.load(tmp_path / "jobs2" / "out" / r["predictions"])
        assert (saved["predicted"] == again["predicted"]).all()
        assert 100 * (saved["predicted"] == saved["labels"]).mean() == pytest.approx(float(r["accuracy"]), abs=1e-3)
        assert r["device"] and r["threads"] == "1" and r["torch"]
    text = (tmp_path / "jobs2" / "out" / "summary.md").read_text()
    assert "## Does tk_n beat tk?" in text and "bootstrap over 120 test images" in text


# --- the v2 config ---------------------------------------------------------------------------------------

def test_v2_config_dry_runs_without_its_baseline(tmp_path, capsys):
    config = yaml.safe_load((ROOT / "configs" / "sweep_fashionmnist_v2.yaml").read_text())
    assert config["baseline_checkpoint"] == "results/fashionmnist_v2/baseline/last.pt"
    assert config["main_args"]["arch"] == "vit_nano_patch4_28" and config["jobs"] == 2
    assert not config["main_args"].get("train_subset") and not config["main_args"].get("test_subset")
    config.update(out_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
                  baseline_checkpoint=str(tmp_path / "missing.pt"))
    path = tmp_path / "v2.yaml"
    path.write_text(yaml.safe_dump(config))
    assert sweep.main(["--config", str(path), "--dry_run"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    # baseline 1; off the shelf: none + 7 methods x 3 matched levels + tk, tk_n x 3 equal-k levels, and the controls at
    # the 3 matched levels (random once per seed); fine-tune: all but the baseline x 3 seeds
    assert len(commands) == 1 + (28 + 3 * 3 + 3) + 3 * (28 + 6)
    assert sum("--epochs 1" in c for c in commands) == 102
    assert sum("--eval_only --model random" in c for c in commands) == 9


def test_the_committed_v2_runs_are_read_with_todays_names_and_complete(monkeypatch, capsys):
    """results/fashionmnist_v2/runs.csv was written with the old column names (reduce_token; schedule per block)."""
    monkeypatch.chdir(ROOT)
    csv_path = ROOT / "results" / "fashionmnist_v2" / "runs.csv"
    assert "reduce_token" in csv_path.read_text().splitlines()[0]
    rows = sweep_rows.read_rows(csv_path)
    tk = next(r for r in rows if r["protocol"] == "offtheshelf" and r["method"] == "tk" and r["level"] == "k6")
    assert (tk["schedule"], tk["schedule_per_block"]) == ("6", "6,6,6,6,6,6") and "reduce_token" not in tk
    methods = "none,tk,tk_n,evit,evit_n,n_wa,a_wn,tome"  # the methods under test (the controls came later)
    assert sweep.main(["--config", "configs/sweep_fashionmnist_v2.yaml", "--methods", methods, "--dry_run"]) == 0
    assert capsys.readouterr().out.startswith("sweep: nothing left to do: all 113 runs are in")


def test_an_old_runs_csv_keeps_its_rows_when_the_sweep_continues(tmp_path, no_plot):
    config = write_config(tmp_path, seeds=[0])
    plan = sweep.plan_runs(sweep.load_config(config, {}), lambda method, level: level.schedule)
    csv_path = tmp_path / "out" / "runs.csv"
    assert sweep.execute(plan[:3], csv_path, FakeMain(), log=lambda line: None) == []
    old = [{("reduce_token" if k == "schedule" else "schedule" if k == "schedule_per_block" else k): v
            for k, v in r.items() if k != "removed_per_block"} for r in read_csv(csv_path)]
    with open(csv_path, "w", newline="") as f:  # the same rows as the old version wrote them
        writer = csv.DictWriter(f, fieldnames=list(old[0]))
        writer.writeheader()
        writer.writerows(old)
    rest = FakeMain()
    assert sweep.execute(plan, csv_path, rest, log=lambda line: None) == []
    assert len(rest.calls) == len(plan) - 3
    rows = read_csv(csv_path)
    assert [sweep_rows.row_key(r) for r in rows] == [spec.key for spec in plan]
    assert list(rows[0])[:5] == ["protocol", "method", "level", "schedule", "seed"]


def test_an_interrupted_parallel_sweep_keeps_finished_rows_and_continues(tmp_path, no_plot):
    config = write_config(tmp_path, seeds=[0, 1])
    plan = sweep.plan_runs(sweep.load_config(config, {}), lambda method, level: level.schedule)
    csv_path = tmp_path / "out" / "runs.csv"
    with pytest.raises(KeyboardInterrupt):
        sweep.execute(plan, csv_path, FakeMain(interrupt_after=6), log=lambda line: None, jobs=2,
                      pool_factory=lambda: concurrent.futures.ThreadPoolExecutor(2))
    saved = read_csv(csv_path)
    assert 0 < len(saved) <= 7
    rest = FakeMain()
    assert sweep.execute(plan, csv_path, rest, log=lambda line: None, jobs=2,
                         pool_factory=lambda: concurrent.futures.ThreadPoolExecutor(2)) == []
    assert len(rest.calls) == len(plan) - len(saved)
    assert [sweep_rows.row_key(r) for r in read_csv(csv_path)] == [spec.key for spec in plan]


# --- stopping a parallel sweep -------------------------------------------------------------------------

def _children(pid: int) -> list:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and fields[0] != "Z":
                    found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _start_two_long_baselines(tmp_path: Path):
    """``tools/sweep.py`` in a process of its own training two long baselines at once; returns it and its two
    workers once both are training."""
    config = write_config(tmp_path, seeds=[0, 1], methods=["none"], protocols=["offtheshelf"], levels=[{"name": "k1", "schedule": 1}],
                          baseline_args={"epochs": 500}, jobs=2, threads=1)
    sweep_process = subprocess.Popen([sys.executable, "tools/sweep.py", "--config", config], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = tmp_path / "work" / "logs"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        workers = _children(sweep_process.pid)
        training = [p for p in logs.glob("*.log") if "epoch" in p.read_text()] if logs.is_dir() else []
        if len(training) == 2 and len(workers) >= 2:
            return sweep_process, workers
        time.sleep(0.5)
    sweep_process.kill()
    pytest.fail("the two baselines did not start training within 120 s")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_sigterm_stops_a_parallel_sweep_and_its_runs_keep_their_checkpoints(tmp_path):
    sweep_process, workers = _start_two_long_baselines(tmp_path)
    sweep_process.send_signal(signal.SIGTERM)
    output, _ = sweep_process.communicate(timeout=120)
    assert sweep_process.returncode == 128 + signal.SIGTERM, output
    assert "interrupted" in output and "run the same command again to continue" in output
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)
    for seed in (0, 1):  # each run in flight stopped after its step and wrote its checkpoint
        assert (tmp_path / "work" / "baseline" / f"seed{seed}" / "last.pt").is_file()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_workers_end_when_the_sweep_process_is_killed_outright(tmp_path):
    sweep_process, workers = _start_two_long_baselines(tmp_path)
    sweep_process.kill()
    sweep_process.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)
