"""Issue 20: the README's `python main.py` commands, pasted in the order given, all work on a fresh
folder; `output/latest` names the newest run that holds checkpoints, whatever evaluations and
benchmarks come after it.

Each command runs as written, followed only by options that make it small (fewer epochs, a tiny
benchmark); those never touch what the chain depends on (which folder a run writes, which run
`output/latest` names). Commands that need a GPU (`torchrun`) or a dataset that is not on this
machine are left out, and the test says which.
"""
import os
import re
import shlex
from pathlib import Path
from typing import List

import pytest

import main
from test_docs import FENCE_RE, SHELL_LANGS, shell_lines

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "datasets"
SMALL = {
    "train": ["--epochs", "2", "--bench_steps", "1", "--bench_warmup", "0"],
    "eval": ["--bench_steps", "1", "--bench_warmup", "0"],
    "benchmark": ["--batch_size", "2", "--bench_batch_size", "2", "--bench_steps", "1", "--bench_warmup", "0"],
}


def main_commands(markdown: Path) -> List[List[str]]:
    """The argv of every `python main.py ...` line in the page's shell blocks, in order."""
    commands = []
    for match in FENCE_RE.finditer(markdown.read_text()):
        if match.group(2).lower() in SHELL_LANGS:
            commands += [shlex.split(line)[2:] for line in shell_lines(match.group(3))
                         if line.startswith("python main.py")]
    return commands


def kind(argv: List[str]) -> str:
    return "benchmark" if "--benchmark" in argv else "eval" if "--eval_only" in argv else "train"


def latest(root: Path) -> str:
    return os.readlink(root / "output" / "latest")


def run_chain(page: Path, tmp_path: Path, monkeypatch, capsys) -> List[str]:
    """Runs the page's main.py commands in order in an empty folder; returns what each one did."""
    monkeypatch.chdir(tmp_path)  # a clean clone: its configs/, no output/ yet
    os.symlink(ROOT / "configs", tmp_path / "configs")
    if (SHARED_DATA / "FashionMNIST").is_dir():
        os.symlink(SHARED_DATA, tmp_path / "datasets")  # where the README says to put the data
    done = []
    for argv in main_commands(page):
        if "--config" in argv and "paper" in argv[argv.index("--config") + 1]:
            continue  # the paper's setups: hub weights and a GPU
        if argv == ["--help"]:
            with pytest.raises(SystemExit) as exit_code:
                main.main(argv)
            assert exit_code.value.code == 0 and "--reduce_token" in capsys.readouterr().out
            continue
        before = latest(tmp_path) if (tmp_path / "output" / "latest").exists() else None
        code = main.main(argv + SMALL[kind(argv)] + (["--train_subset", "2000"] if "fashionmnist" in " ".join(argv)
                                                     else []))
        assert code == 0, f"{' '.join(argv)}: {capsys.readouterr().err}"
        folder = re.search(r"run folder: (\S+)", capsys.readouterr().out).group(1)
        if kind(argv) == "train" and "--resume" not in argv:
            assert latest(tmp_path) == os.path.basename(folder), argv  # a training run: latest names it
        else:
            assert latest(tmp_path) == before, argv  # evaluations, benchmarks and resumes leave it alone
        done.append(f"{kind(argv)} {os.path.basename(folder)}")
    return done


def test_the_readmes_commands_work_in_the_order_given(tmp_path, monkeypatch, capsys):
    done = run_chain(ROOT / "README.md", tmp_path, monkeypatch, capsys)
    kinds = [line.split()[0] for line in done]
    # the quick start, another method, two evaluations of its checkpoint, a benchmark, a resume
    assert kinds == ["train", "train", "eval", "eval", "benchmark", "train"], done


def test_the_cli_pages_examples_work_in_the_order_given(tmp_path, monkeypatch, capsys):
    if not (SHARED_DATA / "FashionMNIST").is_dir():
        pytest.skip("Fashion-MNIST is not at ../shared/datasets (configs/fashionmnist.yaml reads it)")
    done = run_chain(ROOT / "docs" / "cli.md", tmp_path, monkeypatch, capsys)
    assert len(done) >= 6, done


def test_evaluations_and_benchmarks_never_move_latest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main.main(["--epochs", "1", "--bench_steps", "1", "--bench_warmup", "0"]) == 0
    trained = latest(tmp_path)
    for extra in (["--eval_only", "--checkpoint", "output/latest/best.pt", "--model", "tome"],
                  ["--eval_only", "--checkpoint", "output/latest/best.pt", "--model", "tk"],
                  ["--benchmark", "--bench_steps", "1", "--bench_warmup", "0"]):
        assert main.main(extra) == 0, capsys.readouterr().err
        assert latest(tmp_path) == trained
    # each run its own folder (names carry the start time to the second, so runs in one second sort by name)
    folders = [p for p in os.listdir("output") if p != "latest"]
    assert len(folders) == 4 and sum(p.endswith("_bench") for p in folders) == 1
