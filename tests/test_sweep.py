"""tools/sweep.py: resume, summary arithmetic, plot, the commands it plans, and one tiny real sweep."""
import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from cli_helpers import epochs_trained, stopped_by_ctrl_c_in_epoch
from tools import sweep
from tools import sweep_report
from tools import sweep_rows
from tools import stats as sweep_stats

METHODS = ["none", "tk", "tk_n"]
LEVELS = [{"name": "light", "schedule": 1}, {"name": "heavy", "schedule": 3}]


def write_config(tmp_path: Path, **overrides) -> str:
    config = {
        "out_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"), "seeds": [0, 1],
        "methods": METHODS, "levels": LEVELS, "protocols": ["offtheshelf", "finetune"],
        "main_args": {"data_name": "digits"}, "baseline_args": {"epochs": 2}, "finetune_args": {"epochs": 1},
        "offtheshelf_args": {"benchmark": True},
    }
    config.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


class FakeMain:
    """Stands in for main.run: records each run's options (by dest), writes the checkpoint a baseline
    leaves, returns made-up results that depend on the method, schedule and seed."""

    def __init__(self, fail_on: str = "", interrupt_after: int = -1):
        self.calls: List[Dict[str, Any]] = []
        self.fail_on = fail_on
        self.interrupt_after = interrupt_after

    def __call__(self, options: Dict[str, Any]) -> Dict[str, float]:
        if len(self.calls) == self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append(options)
        if self.fail_on and self.fail_on in sweep.command_line(options):
            raise ValueError("made-up failure")
        out = Path(options["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "last.pt").write_text("weights")
        k, seed = int(options["schedule"]), int(options["seed"])
        results = {"accuracy": 90.0 - k - 0.5 * seed + (0.25 if options["method"] == "tk_n" else 0.0),
                   "best_accuracy": 90.0, "gflops": 0.01 * (10 - k), "throughput": 1000.0 + 100 * k,
                   "gmacs_thop": 0.004, "params_m": 0.3}
        if options.get("benchmark"):
            results["speedup"] = 1.0 + 0.1 * k
        return results


@pytest.fixture
def no_plot(monkeypatch):
    """The resume tests need runs.csv only: skip drawing pareto.png (slow) there."""
    monkeypatch.setattr(sweep_report, "plot_pareto", lambda rows, path, levels: None)


def run_sweep(config_path: str, fake: FakeMain, *extra: str) -> int:
    return sweep.main(["--config", config_path, *extra], run_fn=fake, schedule=lambda method, level: level.schedule)


def read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# 2 seeds x (baseline + 2 protocols x (none + 2 methods x 2 levels))
PLANNED = 2 * (1 + 2 * (1 + 2 * 2))


# --- resume ---------------------------------------------------------------------------------------

def test_a_finished_sweep_runs_nothing_again(tmp_path, no_plot):
    config = write_config(tmp_path)
    first = FakeMain()
    assert run_sweep(config, first) == 0
    rows = read_csv(tmp_path / "out" / "runs.csv")
    assert len(first.calls) == len(rows) == PLANNED
    assert len({sweep_rows.row_key(r) for r in rows}) == PLANNED

    again = FakeMain()
    assert run_sweep(config, again) == 0
    assert again.calls == []
    assert read_csv(tmp_path / "out" / "runs.csv") == rows


def test_an_interrupted_sweep_continues_where_it_stopped(tmp_path, no_plot):
    config = write_config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, FakeMain(interrupt_after=7))
    saved = read_csv(tmp_path / "out" / "runs.csv")
    assert len(saved) == 7

    rest = FakeMain()
    assert run_sweep(config, rest) == 0
    rows = read_csv(tmp_path / "out" / "runs.csv")
    assert len(rest.calls) == PLANNED - 7
    assert rows[:7] == saved  # rows already there are kept as they were
    assert len({sweep_rows.row_key(r) for r in rows}) == len(rows) == PLANNED
    done_before = {r["command"] for r in saved}
    assert not any(sweep.command_line(options) in done_before for options in rest.calls)


def test_rows_present_are_skipped_and_missing_ones_run(tmp_path, no_plot):
    config = write_config(tmp_path)
    run_sweep(config, FakeMain())
    csv_path = tmp_path / "out" / "runs.csv"
    rows = read_csv(csv_path)
    dropped = [r for r in rows if r["protocol"] == "finetune" and r["method"] == "tk_n"]
    sweep_rows.write_rows(csv_path, [r for r in rows if r not in dropped])

    fake = FakeMain()
    run_sweep(config, fake)
    assert len(fake.calls) == len(dropped) == 4
    assert all(options["method"] == "tk_n" and not options.get("eval_only") for options in fake.calls)
    assert len(read_csv(csv_path)) == PLANNED


def test_runs_csv_keeps_the_whole_sweeps_order_whichever_part_ran_last(tmp_path, no_plot):
    config = write_config(tmp_path)
    csv_path = tmp_path / "out" / "runs.csv"
    assert run_sweep(config, FakeMain(), "--methods", "tk_n", "--seeds", "1") == 0
    assert run_sweep(config, FakeMain(), "--levels", "heavy") == 0
    assert run_sweep(config, FakeMain(), "--methods", "tk,tk_n", "--levels", "light") == 0
    in_parts = [sweep_rows.row_key(r) for r in read_csv(csv_path)]

    csv_path.unlink()
    assert run_sweep(config, FakeMain()) == 0
    assert in_parts == [sweep_rows.row_key(r) for r in read_csv(csv_path)]


def test_a_runs_csv_written_out_of_order_is_put_in_order(tmp_path, no_plot):
    config = write_config(tmp_path)
    csv_path = tmp_path / "out" / "runs.csv"
    run_sweep(config, FakeMain())
    rows = read_csv(csv_path)
    sweep_rows.write_rows(csv_path, rows[::-1])

    fake = FakeMain()
    assert run_sweep(config, fake) == 0
    assert fake.calls == [] and read_csv(csv_path) == rows


def test_a_lost_baseline_checkpoint_is_retrained_once(tmp_path, no_plot):
    config = write_config(tmp_path)
    run_sweep(config, FakeMain())
    csv_path = tmp_path / "out" / "runs.csv"
    rows = read_csv(csv_path)
    sweep_rows.write_rows(csv_path, [r for r in rows if not (r["protocol"] == "finetune" and r["seed"] == "1")])
    os.remove(tmp_path / "work" / "baseline" / "seed1" / "last.pt")

    fake = FakeMain()
    run_sweep(config, fake)
    assert fake.calls[0]["method"] == "none"
    assert "checkpoint" not in fake.calls[0]  # the baseline of seed 1, trained again
    assert len(fake.calls) == 1 + 5
    rows = read_csv(csv_path)
    assert len(rows) == PLANNED
    assert sum(r["protocol"] == "baseline" for r in rows) == 2


def test_a_failed_run_is_left_out_and_retried(tmp_path, no_plot):
    config = write_config(tmp_path)
    assert run_sweep(config, FakeMain(fail_on="--model tk --reduce_token 3 --seed 0")) == 1
    rows = read_csv(tmp_path / "out" / "runs.csv")
    assert len(rows) == PLANNED - 2  # the offtheshelf and finetune runs of tk heavy, seed 0

    retry = FakeMain()
    assert run_sweep(config, retry) == 0
    assert len(retry.calls) == 2
    assert len(read_csv(tmp_path / "out" / "runs.csv")) == PLANNED


# --- summary arithmetic -----------------------------------------------------------------------------

def row(protocol, method, level, schedule, seed, accuracy, gflops=0.02, throughput=1000.0, speedup=""):
    return {"protocol": protocol, "method": method, "level": level, "schedule": str(schedule),
            "seed": str(seed), "accuracy": str(accuracy), "gflops": str(gflops), "throughput": str(throughput),
            "speedup": str(speedup), "command": "python main.py"}


HAND_ROWS = [
    row("baseline", "none", "-", 0, 0, 90.0, gflops=0.03, throughput=900),
    row("baseline", "none", "-", 0, 1, 91.0, gflops=0.03, throughput=1000),
    row("baseline", "none", "-", 0, 2, 92.0, gflops=0.03, throughput=1100),
    row("finetune", "tk", "light", 2, 0, 80.0, speedup=1.1),
    row("finetune", "tk", "light", 2, 1, 82.0, speedup=1.2),
    row("finetune", "tk", "light", 2, 2, 87.0, speedup=1.3),
    row("finetune", "tk_n", "light", 2, 0, 81.0),
    row("finetune", "tk_n", "light", 2, 1, 85.0),
    row("finetune", "tk_n", "light", 2, 2, 86.0),
    row("offtheshelf", "tk_n", "light", 2, 0, 70.0),
]


def test_mean_and_sample_std():
    mean, std = sweep_stats.mean_std([80.0, 82.0, 87.0])
    assert mean == pytest.approx(83.0)
    assert std == pytest.approx(math.sqrt((9 + 1 + 16) / 2))  # 3.6056: n - 1 in the denominator
    assert math.isnan(sweep_stats.mean_std([70.0])[1])


def test_summary_table_shows_mean_and_std_over_seeds(tmp_path):
    path = tmp_path / "summary.md"
    sweep_report.write_summary(HAND_ROWS, path, ["light"], [("tk_n", "tk")])
    text = path.read_text()
    assert "| baseline | none | - | 0 | 91.00 ± 1.00 | 0.0300 ± 0.0000 | 1000 ± 100 | – | 3 |" in text
    assert "| finetune | tk | light | 2 | 83.00 ± 3.61 | 0.0200 ± 0.0000 | 1000 ± 0 | 1.20 ± 0.10 | 3 |" in text
    assert "| finetune | tk_n | light | 2 | 84.00 ± 2.65 |" in text  # 81, 85, 86: std sqrt(7)
    assert "| offtheshelf | tk_n | light | 2 | 70.00 |" in text  # one seed: no spread
    # paired by seed: 81-80, 85-82, 86-87 = 1, 3, -1: mean 1, std 2; tk_n ahead in 2 of 3
    # t = 1 / (2 / sqrt 3) = 0.9; 95% t-interval 1 ± 4.303 * 2 / sqrt 3 = 1 ± 4.97
    assert "| finetune | light | tk_n − tk | 1.00 ± 2.00 | [-3.97, 5.97] | t = 0.9, 2 df | 2/3 seeds |" in text
    lines = text.splitlines()
    assert lines.index(next(l for l in lines if l.startswith("| baseline"))) < \
        lines.index(next(l for l in lines if l.startswith("| offtheshelf")))


def test_finetune_speedup_comes_from_the_same_schedule_off_the_shelf(tmp_path, no_plot):
    run_sweep(write_config(tmp_path, seeds=[0]), FakeMain())
    rows = read_csv(tmp_path / "out" / "runs.csv")
    pick = {(r["protocol"], r["method"], r["level"]): r for r in rows}
    assert float(pick["offtheshelf", "tk", "heavy"]["speedup"]) == pytest.approx(1.3)  # main.py --benchmark's own
    assert pick["finetune", "tk", "heavy"]["speedup"] == pick["offtheshelf", "tk", "heavy"]["speedup"]
    assert pick["baseline", "none", "-"]["speedup"] == ""


def test_finetune_speedup_without_off_the_shelf_runs_is_over_the_baseline(tmp_path, no_plot):
    run_sweep(write_config(tmp_path, seeds=[0], protocols=["finetune"]), FakeMain())
    rows = read_csv(tmp_path / "out" / "runs.csv")
    heavy = next(r for r in rows if r["method"] == "tk" and r["level"] == "heavy")
    assert float(heavy["speedup"]) == pytest.approx(1300.0 / 1000.0)  # fake throughput 1000 + 100 k


# --- plot ---------------------------------------------------------------------------------------------

def test_pareto_plot_is_written(tmp_path):
    path = tmp_path / "pareto.png"
    sweep_report.plot_pareto(HAND_ROWS, path, ["light"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_sweep_writes_all_three_files(tmp_path):
    run_sweep(write_config(tmp_path, seeds=[0]), FakeMain())
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"runs.csv", "summary.md", "pareto.png"}


# --- the plan -----------------------------------------------------------------------------------------

def test_planned_options_and_their_command_lines(tmp_path):
    import shlex

    import main

    config = sweep.load_config(write_config(tmp_path, seeds=[3]), {})
    plan = sweep.plan_runs(config, lambda method, level: level.schedule)
    assert [s.protocol for s in plan[:1]] == ["baseline"]
    for spec in plan:
        args = main.parse_args([], settings=spec.options)  # what the sweep runs
        assert spec.command.startswith("python main.py ")
        assert vars(main.parse_args(shlex.split(spec.command)[2:])) == vars(args)  # what runs.csv says
        assert (args.method, args.seed, args.output_dir) == (spec.method, 3, spec.options["output_dir"])
        assert args.eval_only == (spec.protocol == "offtheshelf")
        assert args.benchmark == (spec.protocol == "offtheshelf")
        if spec.protocol != "offtheshelf":
            assert args.epochs == {"baseline": 2, "finetune": 1}[spec.protocol]
        checkpoint = str(tmp_path / "work" / "baseline" / "seed3" / "last.pt")
        assert args.checkpoint == (None if spec.protocol == "baseline" else checkpoint)


def test_levels_keep_rate_and_matched_flops():
    import copy

    import timm

    import pruning.models  # noqa: F401  (registers the small ViTs)
    from pruning.flops import analytic_flops
    from pruning.patch import apply_patch
    from pruning.schedules import keep_rate_schedule

    model = timm.create_model("vit_pico_patch4_28", num_classes=10)
    resolver = sweep.LevelResolver(model)
    assert resolver.schedule("tk", sweep.Level("k", schedule=[0, 1, 2, 3, 4, 5])) == [0, 1, 2, 3, 4, 5]
    keep = sweep.Level.from_dict({"name": "r70", "keep_rate": 0.7, "at_blocks": [1, 3]})
    assert resolver.schedule("evit", keep) == keep_rate_schedule(50, 6, 0.7, [1, 3])
    matched = sweep.Level.from_dict({"name": "f70", "flops_ratio": 0.7})
    base = analytic_flops(model)
    for method in ("tk_n", "evit", "tome"):
        schedule = resolver.schedule(method, matched)
        patched = apply_patch(copy.deepcopy(model), method, schedule)
        assert analytic_flops(patched) / base == pytest.approx(0.7, abs=0.02)
    assert sweep.schedule_text([0, 12, 3]) == "0,12,3"


def test_a_level_can_be_limited_to_some_protocols(tmp_path):
    levels = [{"name": "light", "schedule": 2, "protocols": ["offtheshelf"]}, {"name": "heavy", "schedule": 4}]
    config = sweep.load_config(write_config(tmp_path, seeds=[0], methods=["none", "tk_n"], levels=levels), {})
    plan = sweep.plan_runs(config, lambda method, level: level.schedule)
    runs = {(spec.protocol, spec.level) for spec in plan if spec.method == "tk_n"}
    assert runs == {("offtheshelf", "light"), ("offtheshelf", "heavy"), ("finetune", "heavy")}
    with pytest.raises(ValueError, match="protocols must be a list"):
        sweep.Level.from_dict({"name": "x", "schedule": 2, "protocols": ["fine-tune"]})


def test_a_level_needs_exactly_one_mode():
    with pytest.raises(ValueError, match="levels"):
        sweep.Level.from_dict({"name": "x", "schedule": 2, "keep_rate": 0.5})
    with pytest.raises(ValueError, match="at_blocks"):
        sweep.Level.from_dict({"name": "x", "keep_rate": 0.5})


# --- one tiny real sweep --------------------------------------------------------------------------------

def test_tiny_real_sweep_on_digits(tmp_path):
    config = write_config(
        tmp_path, seeds=[0], methods=["none", "tk_n"], levels=[{"name": "k2", "schedule": 2}],
        main_args={"data_name": "digits", "train_subset": 256, "test_subset": 128, "batch_size": 64,
                   "bench_warmup": 0, "bench_steps": 1},
        baseline_args={"epochs": 1}, finetune_args={"epochs": 1}, offtheshelf_args={"benchmark": True})
    assert sweep.main(["--config", config]) == 0
    rows = read_csv(tmp_path / "out" / "runs.csv")
    assert [(r["protocol"], r["method"]) for r in rows] == [
        ("baseline", "none"), ("offtheshelf", "none"), ("offtheshelf", "tk_n"), ("finetune", "none"),
        ("finetune", "tk_n")]
    by = {(r["protocol"], r["method"]): r for r in rows}
    # evaluating the baseline without compression gives the baseline's own accuracy
    assert float(by["offtheshelf", "none"]["accuracy"]) == pytest.approx(float(by["baseline", "none"]["accuracy"]))
    assert float(by["offtheshelf", "tk_n"]["gflops"]) < float(by["baseline", "none"]["gflops"])
    assert all(r["speedup"] for r in rows if r["protocol"] != "baseline")
    assert (tmp_path / "out" / "pareto.png").exists()


def test_a_run_stopped_mid_training_is_resumed_exactly_and_other_settings_start_afresh(tmp_path):
    options = {"data_name": "digits", "train_subset": 96, "test_subset": 64, "batch_size": 32, "epochs": 2,
               "method": "tk_n", "schedule": "2", "seed": 0, "output_dir": str(tmp_path / "stopped")}
    with stopped_by_ctrl_c_in_epoch(2):
        sweep.run_main(options)
    last = tmp_path / "stopped" / "last.pt"
    assert sweep.stopped_run_to_resume(options) == str(last)
    assert sweep.stopped_run_to_resume({**options, "lr": 0.123}) is None  # another run's settings
    assert sweep.stopped_run_to_resume({**options, "data_root": "elsewhere"}) == str(last)  # where it reads may move

    with epochs_trained() as counted:
        resumed = sweep.run_main(options)
    assert len(counted) == 1  # epoch 2 only: resumed, not run again
    whole = sweep.run_main({**options, "output_dir": str(tmp_path / "whole")})
    assert resumed["accuracy"] == whole["accuracy"]
    assert epochs_logged(tmp_path / "stopped") == epochs_logged(tmp_path / "whole")  # each epoch once, the same
    assert sweep.stopped_run_to_resume(options) is None  # finished: a rerun starts afresh

    with stopped_by_ctrl_c_in_epoch(2):  # stopped again, then asked for with another lr: a new run replaces it
        sweep.run_main(options)
    sweep.run_main({**options, "lr": 0.123})
    assert [epoch["epoch"] for epoch in epochs_logged(tmp_path / "stopped")] == [1, 2]
    assert yaml.safe_load((tmp_path / "stopped" / "config.yaml").read_text())["lr"] == 0.123


def test_a_run_stopped_after_training_but_before_its_results_is_evaluated_not_trained_again(tmp_path):
    options = {"data_name": "digits", "train_subset": 96, "test_subset": 64, "batch_size": 32, "epochs": 1,
               "method": "tk_n", "schedule": "2", "seed": 0, "output_dir": str(tmp_path / "run")}
    whole = sweep.run_main(options)
    (tmp_path / "run" / "results.json").unlink()  # as a stop during the final evaluation leaves the folder
    assert sweep.stopped_run_to_resume(options) == str(tmp_path / "run" / "last.pt")

    with epochs_trained() as counted:
        again = sweep.run_main(options)
    assert counted == []  # nothing trained again
    assert again["accuracy"] == whole["accuracy"] and again["best_accuracy"] == whole["best_accuracy"]
    assert [epoch["epoch"] for epoch in epochs_logged(tmp_path / "run")] == [1]
    assert (tmp_path / "run" / "results.json").exists()


def epochs_logged(run_folder: Path) -> List[Dict[str, Any]]:
    """log.jsonl's epochs without their times."""
    lines = (run_folder / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]


# --- the sweep behaves like main.py (issue 12) -------------------------------------------------------

def one_sweep_error(capsys, argv) -> str:
    """sweep.main's exit code 2 and its one stderr line."""
    assert sweep.main(argv, run_fn=FakeMain(), schedule=lambda method, level: level.schedule) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sweep.py: error: ") and "Traceback" not in err[0], err
    return err[0]


def test_unknown_yaml_keys_are_refused(tmp_path, capsys):
    config = write_config(tmp_path)
    text = yaml.safe_load(open(config))
    text["method"] = text.pop("methods")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(text))
    line = one_sweep_error(capsys, ["--config", str(tmp_path / "typo.yaml")])
    assert "unknown key 'method'" in line and "did you mean 'methods'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layer, value, message", [
    ("main_args", {"data_name": "digits", "epocs": 3}, "main_args: unknown option 'epocs'"),
    ("finetune_args", {"epochs": "many"}, "finetune_args: argument --epochs: expected an integer"),
    ("levels", [{"name": "x", "reduce_tokens": 2}], "levels: x: unknown key 'reduce_tokens'"),
])
def test_bad_main_options_are_refused_in_one_line(tmp_path, capsys, layer, value, message):
    line = one_sweep_error(capsys, ["--config", write_config(tmp_path, **{layer: value})])
    assert message in line


def test_a_failed_run_is_named(tmp_path, no_plot, capsys):
    config = write_config(tmp_path)
    assert run_sweep(config, FakeMain(fail_on="--model tk --reduce_token 3 --seed 0")) == 1
    captured = capsys.readouterr()
    assert "failed: offtheshelf tk level heavy seed 0: ValueError: made-up failure" in captured.out
    assert "offtheshelf tk level heavy seed 0" in captured.err


def test_dry_run_of_a_finished_sweep_says_nothing_is_left(tmp_path, no_plot, capsys):
    config = write_config(tmp_path)
    run_sweep(config, FakeMain())
    capsys.readouterr()
    assert run_sweep(config, FakeMain(), "--dry_run") == 0
    assert capsys.readouterr().out.strip() == f"sweep: nothing left to do: all {PLANNED} runs are in " \
                                              f"{tmp_path / 'out' / 'runs.csv'}"


def test_out_dir_moves_the_run_folders_too(tmp_path, no_plot):
    config = write_config(tmp_path)  # work_dir: tmp_path/work in the file
    fake = FakeMain()
    assert run_sweep(config, fake, "--out_dir", str(tmp_path / "elsewhere")) == 0
    assert all(Path(options["output_dir"]).is_relative_to(tmp_path / "elsewhere") for options in fake.calls)
    assert not (tmp_path / "work").exists() and (tmp_path / "elsewhere" / "runs" / "baseline").is_dir()


def test_a_run_redone_after_a_crash_reuses_its_folder(tmp_path, monkeypatch):
    """What a crashed attempt left in a run's folder does not stop the retry (run_main overwrites)."""
    import main

    seen = []
    monkeypatch.setattr(main, "run", lambda args: seen.append(args) or {})
    sweep.run_main({"output_dir": str(tmp_path / "run"), "epochs": 1})
    assert seen[0].overwrite and seen[0].output_dir == str(tmp_path / "run")


def test_levels_resolve_on_every_family(tmp_path):
    """A transformers model by --arch hf:FOLDER (SigLIP: no class token, 16 patch tokens): its sizes are the
    library's, its FLOPs matched on the module main.py patches."""
    import main
    from engine.zoo import backbone_of
    from pruning.flops import analytic_flops
    from pruning.schedules import keep_rate_schedule, matched_flops_schedule
    from tiny_folders import save_tiny

    arch = save_tiny(tmp_path, "siglip")
    resolver = sweep.reference_resolver({"arch": arch, "data_name": "digits"})
    module = backbone_of(main.reference_model(main.parse_args(["--arch", arch]))).module
    assert (resolver.depth, resolver.num_tokens, resolver.num_prefix) == (2, 16, 0)
    keep = sweep.Level.from_dict({"name": "r50", "keep_rate": 0.5, "at_blocks": [1]})
    assert resolver.schedule("tk_n", keep) == keep_rate_schedule(16, 2, 0.5, [1], num_prefix=0) == [0, 8]
    matched = sweep.Level.from_dict({"name": "f70", "flops_ratio": 0.7})
    for method in ("tk_n", "tome"):
        assert resolver.schedule(method, matched) == matched_flops_schedule(module, method,
                                                                            0.7 * analytic_flops(module))
