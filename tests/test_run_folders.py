"""Issue 12, what a new user hits in the first hour: runs never overwrite each other, --resume does what
it says, values that cannot be honoured are said, and the documented sample output is what main.py prints."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import engine.checkpoint
import engine.outputs
import engine.train
import main
from cli_helpers import fails, stopped_by_ctrl_c_in_epoch
import engine.model
from engine.model import create_model
from pruning.patch import apply_patch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "1", "--train_subset", "48", "--test_subset", "32", "--batch_size", "16",
        "--bench_steps", "1", "--bench_warmup", "0"]


def run(*argv):
    return main.run(main.parse_args([*TINY, *argv]))


def run_folders(root):
    return sorted(p for p in os.listdir(root) if p not in ("latest", "LATEST"))


# ----------------------------------------------------------------------------------------------
# runs never overwrite each other

def test_each_run_gets_its_own_folder_and_latest_points_to_the_newest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run()
    first = run_folders("output")
    assert len(first) == 1 and re.fullmatch(r"\d{8}-\d{6}_vit_pico_patch2_8_tk_n_k2", first[0]), first
    assert f"run folder: {os.path.join('output', first[0])}" in capsys.readouterr().out
    run("--model", "tome", "--reduce_token", "3")
    folders = run_folders("output")
    assert len(folders) == 2
    second = [f for f in folders if f not in first][0]
    assert second.endswith("_vit_pico_patch2_8_tome_k3")
    assert os.readlink(os.path.join("output", "latest")) == second
    for folder in folders:  # each keeps its own checkpoints and a log of one run
        assert {"best.pt", "last.pt", "config.yaml", "results.json"} <= set(os.listdir(os.path.join("output", folder)))
        assert len(open(os.path.join("output", folder, "log.jsonl")).read().splitlines()) == 1
    # evaluating a run's checkpoint writes a folder of its own, never into the training run's
    trained = os.path.join("output", "latest", "best.pt")
    before = open(os.path.join("output", second, "results.json")).read()
    run("--eval_only", "--checkpoint", trained)
    assert len(run_folders("output")) == 3 and open(os.path.join("output", second, "results.json")).read() == before
    assert os.readlink(os.path.join("output", "latest")) == second  # it holds no checkpoints: latest stays


def test_two_runs_in_the_same_second_get_two_folders(tmp_path):
    a = engine.outputs.RunFolder(str(tmp_path / "output" / "20261125-134501_x"), unique=True, points_latest=True).open()
    b = engine.outputs.RunFolder(str(tmp_path / "output" / "20261125-134501_x"), unique=True, points_latest=True).open()
    assert a != b and os.path.isdir(a) and os.path.isdir(b) and b.endswith("-2")
    assert os.readlink(tmp_path / "output" / "latest") == os.path.basename(b)


def test_latest_is_a_text_file_where_symlinks_fail(tmp_path, monkeypatch):
    def no_symlinks(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(engine.checkpoint.os, "symlink", no_symlinks)
    path = engine.outputs.RunFolder(str(tmp_path / "output" / "20261125-134501_x"), unique=True, points_latest=True).open()
    assert (tmp_path / "output" / "LATEST").read_text() == os.path.basename(path) + "\n"
    assert not (tmp_path / "output" / "latest").exists() and not list((tmp_path / "output").glob(".latest*"))


@pytest.mark.parametrize("name", ["results.json", "config.yaml", "last.pt", "best.pt", "log.jsonl"])
def test_an_output_dir_with_another_runs_files_is_refused(capsys, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("another run")
    line = fails(capsys, *TINY, "--output_dir", str(out))
    assert f"--output_dir {out} already holds another run's files ({name})" in line and "--overwrite" in line
    assert ("--resume" in line) == (name == "last.pt")
    assert os.listdir(out) == [name] and (out / name).read_text() == "another run"  # untouched


def test_overwrite_replaces_the_earlier_run(tmp_path):
    out = tmp_path / "out"
    run("--output_dir", str(out), "--epochs", "2")
    run("--output_dir", str(out), "--overwrite")
    assert len((out / "log.jsonl").read_text().splitlines()) == 1  # the new run's one epoch only
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_a_run_that_fails_before_training_leaves_the_folder_as_it_found_it(capsys, tmp_path):
    new = tmp_path / "new" / "out"
    fails(capsys, *TINY, "--output_dir", str(new), "--data_name", "CIFAR10", "--data_root", str(tmp_path / "data"),
          "--no-download")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    fails(capsys, *TINY, "--output_dir", str(existing), "--reduce_token", "1,2,3")  # refused once the model is built
    assert os.listdir(existing) == ["notes.txt"]


def test_a_run_that_fails_before_a_checkpoint_removes_the_folder_it_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def dies(*args, **kwargs):
        raise RuntimeError("made-up failure in the first epoch")

    monkeypatch.setattr(engine.train, "train_one_epoch", dies)
    with pytest.raises(RuntimeError):
        run()
    assert not os.path.exists("output")


# ----------------------------------------------------------------------------------------------
# resume does what it says

def write_folder(root) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            os.makedirs(root / split / name)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")


def interrupted_run(tmp_path, *argv):
    """A run stopped by Ctrl-C in its second epoch (last.pt holds epoch 1)."""
    out = tmp_path / "run"
    with stopped_by_ctrl_c_in_epoch(2):
        run("--output_dir", str(out), "--epochs", "2", *argv)
    return out


def test_resume_takes_data_root_from_the_checkpoint(tmp_path, monkeypatch):
    write_folder(tmp_path / "images")
    out = interrupted_run(tmp_path, "--data_name", "folder", "--arch", "vit_pico_patch4_32",
                          "--data_root", str(tmp_path / "images"), "--batch_size", "4", "--train_subset", "0",
                          "--test_subset", "0")
    monkeypatch.chdir(tmp_path / "run")  # where "datasets" (the default --data_root) is not
    resumed = main.run(main.parse_args(["--resume", str(out / "last.pt"), "--bench_steps", "1"]))
    assert resumed["epochs"] == 2 and resumed["data_name"] == "folder"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2]  # one run, each epoch once


def test_epochs_cannot_change_on_resume(capsys, tmp_path):
    out = interrupted_run(tmp_path)
    for epochs in ("3", "30"):  # 30 is the default: given all the same
        line = fails(capsys, "--resume", str(out / "last.pt"), "--epochs", epochs)
        assert f"--epochs {epochs} differs from the run's 2" in line and f"--checkpoint {out / 'last.pt'}" in line
    line = fails(capsys, "--resume", str(out / "last.pt"), "--lr", "0.1")
    assert "--lr 0.1" in line and "keeps its settings" in line
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_resume_into_another_runs_folder_is_refused(capsys, tmp_path):
    out = interrupted_run(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text("{}")
    line = fails(capsys, "--resume", str(out / "last.pt"), "--output_dir", str(other))
    assert "already holds another run's files (results.json)" in line


# ----------------------------------------------------------------------------------------------
# values that cannot be honoured are said

def test_tokens_per_block_agree_with_a_real_forward():
    for method, k, reduce_at in [("tk_n", 2, None), ("tome", 20, None), ("evit", 3, "attn"), ("tk", 20, "attn")]:
        model = apply_patch(create_model("vit_pico_patch2_8", 10, 1), method, k, reduce_at=reduce_at)
        seen = []
        model.blocks[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[1]))
        for block in model.blocks:
            block.register_forward_hook(lambda module, inputs, output: seen.append(
                (output[0] if isinstance(output, tuple) else output).shape[1]))
        model.eval()(torch.randn(2, 1, 8, 8))
        assert engine.model.tokens_per_block(model) == seen, (method, k)


def test_reduce_token_beyond_the_tokens_left_is_said(capsys, tmp_path):
    out = tmp_path / "out"
    assert main.main([*TINY, "--reduce_token", "20", "--output_dir", str(out)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("main.py: warning: --reduce_token 20"), captured.err
    assert "tokens 17 → 2 → 2 → 2 → 2" in warnings[0]
    assert re.search(r"^tokens +17 → 2 → 2 → 2 → 2$", captured.out, re.M)
    assert json.loads((out / "results.json").read_text())["tokens_per_block"] == [17, 2, 2, 2, 2]


def test_tokens_of_the_default_run(capsys, tmp_path):
    out = tmp_path / "out"
    assert main.main([*TINY, "--output_dir", str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and re.search(r"^tokens +17 → 15 → 13 → 11 → 9$", captured.out, re.M)
    assert json.loads((out / "results.json").read_text())["tokens_per_block"] == [17, 15, 13, 11, 9]


@pytest.mark.parametrize("option, size, split", [("--test_subset", "100000", "test 360"),
                                                  ("--train_subset", "1438", "train 1437")])
def test_a_subset_larger_than_the_split_is_refused(capsys, tmp_path, option, size, split):
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), option, size)
    name, n = split.split()
    assert f"{option} {size}: the {name} split of digits has only {n} images" in line
    assert not (tmp_path / "out").exists()


def test_a_mistyped_data_root_leaves_no_folders(capsys, tmp_path, monkeypatch):
    import torchvision.datasets.mnist as mnist

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(mnist, "download_and_extract_archive", offline)  # after torchvision made its folders
    typo = tmp_path / "dataets"
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), "--data_name", "FashionMNIST",
                 "--data_root", str(typo))
    assert "download failed" in line
    assert os.listdir(tmp_path) == []
    # an existing --data_root keeps what it had, and gains nothing
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("x")
    fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), "--data_name", "FashionMNIST",
          "--data_root", str(tmp_path / "data"))
    assert os.listdir(tmp_path / "data") == ["mine.txt"]


@pytest.mark.parametrize("option", ["--checkpoint", "--resume"])
def test_a_text_file_is_not_a_checkpoint(capsys, tmp_path, option):
    text = tmp_path / "notes.pt"
    text.write_text("hello, these are my notes\n")
    mode = ["--eval_only"] if option == "--checkpoint" else []
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "out"), *mode, option, str(text))
    assert f"{option}: {text} is not a PyTorch checkpoint or safetensors file (it starts with 'hello" in line
    assert "Error" not in line


# ----------------------------------------------------------------------------------------------
# the documented sample output is what main.py prints

def shape(line: str) -> str:
    """A summary line with its measured numbers (and the dashes' length) left out."""
    return re.sub(r"\d[\d,.]*", "N", re.sub(r"^-+$", "---", line.rstrip()))


def test_the_documented_summary_is_what_main_prints(tmp_path, monkeypatch, capsys):
    text = open(os.path.join(ROOT, "docs", "cli.md")).read()
    documented = re.search(r"```\n(Summary\n.*?)```", text, re.S).group(1).splitlines()
    monkeypatch.chdir(tmp_path)
    assert main.main(TINY) == 0
    out = capsys.readouterr().out.splitlines()
    printed = out[out.index("Summary"):]
    assert [shape(line) for line in printed] == [shape(line) for line in documented]
