"""Issue 20: the experiment reruns from a clone: the data is named on the command line, a sweep that
cannot run says what to fix and writes no empty report, and a committed row reproduces exactly."""
import shlex
from pathlib import Path

import numpy as np
import pytest

from test_sweep import FakeMain, read_csv, run_sweep, write_config
from tools import sweep

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "datasets"
V2 = ROOT / "results" / "fashionmnist_v2"


def test_data_root_replaces_every_runs_data_root(tmp_path):
    config = write_config(tmp_path, main_args={"data_name": "digits", "data_root": "somewhere/else"})
    fake = FakeMain()
    assert run_sweep(config, fake, "--data_root", str(tmp_path / "data")) == 0
    assert fake.calls and {call["data_root"] for call in fake.calls} == {str(tmp_path / "data")}
    commands = {row["command"] for row in read_csv(tmp_path / "out" / "runs.csv")}
    assert all(f"--data_root {tmp_path / 'data'}" in command for command in commands)


def test_without_data_root_the_configs_own_is_used(tmp_path):
    config = write_config(tmp_path, main_args={"data_name": "digits", "data_root": "somewhere/else"})
    fake = FakeMain()
    assert run_sweep(config, fake) == 0
    assert {call["data_root"] for call in fake.calls} == {"somewhere/else"}


def test_a_sweep_whose_runs_all_fail_writes_no_report_and_says_what_failed(tmp_path, capsys):
    config = write_config(tmp_path, seeds=[0])
    assert run_sweep(config, FakeMain(fail_on="python main.py")) == 1
    out = tmp_path / "out"
    assert not (out / "summary.md").exists() and not (out / "pareto.png").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sweep: error: none of the")
    assert "made-up failure" in err[0] and "--data_root" in err[0]


def test_a_sweep_with_some_runs_done_still_reports_them(tmp_path, capsys):
    config = write_config(tmp_path, seeds=[0])
    assert run_sweep(config, FakeMain(fail_on="--model tk_n")) == 1
    assert (tmp_path / "out" / "summary.md").exists()
    assert "run the sweep again to retry them" in capsys.readouterr().err


def test_a_missing_baseline_checkpoint_is_refused_before_anything_runs(tmp_path, capsys):
    config = write_config(tmp_path, seeds=[0], baseline_checkpoint=str(tmp_path / "no" / "last.pt"))
    fake = FakeMain()
    assert run_sweep(config, fake) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert fake.calls == [] and len(err) == 1
    assert err[0].startswith("sweep.py: error: baseline_checkpoint:") and "--baseline_checkpoint" in err[0]
    assert not (tmp_path / "out").exists()


def training_checkpoint(path: Path, epoch: int, epochs: int, step: int = 0) -> str:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "epoch": epoch, "step": step, "settings": {"epochs": epochs}}, path)
    return str(path)


@pytest.mark.parametrize("epoch, step, where", [(5, 120, "epoch 5/25 and 120 steps"), (24, 0, "epoch 24/25")])
def test_a_baseline_whose_training_has_epochs_left_is_refused_before_anything_runs(tmp_path, capsys, epoch, step,
                                                                                  where):
    checkpoint = training_checkpoint(tmp_path / "baseline" / "last.pt", epoch, 25, step)
    fake = FakeMain()
    assert run_sweep(write_config(tmp_path, seeds=[0], baseline_checkpoint=checkpoint), fake) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert fake.calls == [] and len(err) == 1
    assert f"stopped after {where}" in err[0] and f"python main.py --resume {checkpoint}" in err[0]


def test_a_baseline_whose_training_finished_runs(tmp_path):
    checkpoint = training_checkpoint(tmp_path / "baseline" / "last.pt", 25, 25)
    fake = FakeMain()
    assert run_sweep(write_config(tmp_path, seeds=[0], baseline_checkpoint=checkpoint), fake) == 0
    assert fake.calls


def test_the_experiment_configs_read_the_data_where_the_readme_puts_it():
    """No config depends on the folder the clone sits in: data comes from datasets/ (main.py's default)."""
    import yaml

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        root = config.get("data_root", (config.get("main_args") or {}).get("data_root", "datasets"))
        assert root == "datasets", f"{path.name}: data_root {root!r}"


@pytest.mark.skipif(not (SHARED_DATA / "FashionMNIST" / "raw").is_dir(), reason="Fashion-MNIST not at ../shared/datasets")
def test_one_committed_off_the_shelf_row_reproduces_exactly(tmp_path, monkeypatch):
    """The results README's command for one row, into a new folder, from the repository root: the same
    accuracy and the same prediction for each of the 10,000 test images as the committed row."""
    monkeypatch.chdir(ROOT)
    text = (V2 / "README.md").read_text().replace("\\\n", " ")
    command = next(line for line in text.splitlines() if line.startswith("python tools/sweep.py") and "--out_dir" in line)
    argv = shlex.split(command)[2:]
    out = tmp_path / "rerun"
    argv[argv.index("--out_dir") + 1] = str(out)
    if "--data_root" not in argv:
        argv += ["--data_root", str(SHARED_DATA)]
    assert sweep.main(argv) == 0
    committed = {(r["protocol"], r["method"], r["level"]): r for r in read_csv(V2 / "runs.csv")}
    for row in read_csv(out / "runs.csv"):
        assert row["accuracy"] == committed[row["protocol"], row["method"], row["level"]]["accuracy"]
    ours = np.load(out / "predictions" / "offtheshelf_tk_f50_seed0.npz")
    theirs = np.load(V2 / "predictions" / "offtheshelf_tk_f50_seed0.npz")
    assert np.array_equal(ours["labels"], theirs["labels"])
    assert np.array_equal(ours["predicted"], theirs["predicted"])
