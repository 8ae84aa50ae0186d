"""A full disk or an unwritable --output_dir is reported before training starts, and a disk that
fills up during training never costs the previous checkpoint."""
import errno
import os
from collections import namedtuple

import pytest
import torch

import engine.checkpoint
import main
from engine.errors import CLIError
from cli_helpers import fails

TINY = ["--epochs", "2", "--train_subset", "32", "--test_subset", "16", "--batch_size", "16",
        "--bench_steps", "1", "--bench_warmup", "0"]


def test_too_little_space_is_reported_before_training(capsys, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(engine.checkpoint.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 50_000, 50_000))
    out = tmp_path / "out"
    line = fails(capsys, *TINY, "--output_dir", str(out))
    assert "--output_dir" in line and "0.1 MB free" in line and "last.pt, best.pt" in line
    assert not (out / "log.jsonl").exists() and not (out / "last.pt").exists()  # no epoch ran
    assert "training" not in capsys.readouterr().out


def test_space_check_counts_the_files_it_replaces(tmp_path, monkeypatch):
    """Resuming into the same folder: the last.pt and best.pt there will be overwritten."""
    one = 3 * 10**6
    for name in ("last.pt", "best.pt"):
        (tmp_path / name).write_bytes(b"\0" * one)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(engine.checkpoint.shutil, "disk_usage", lambda path: usage(10**10, 0, one + 10))
    engine.checkpoint.check_free_space(str(tmp_path), one)  # needs 3 * one, 2 * one of which is there
    with pytest.raises(CLIError, match="--output_dir"):
        engine.checkpoint.check_free_space(str(tmp_path / ".."), one)


def test_disk_full_during_training_keeps_the_previous_checkpoint(capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"
    saves = []
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 3:  # epoch 1 wrote last.pt and best.pt; epoch 2's last.pt hits a full disk
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    line = fails(capsys, *TINY, "--output_dir", str(out))
    assert "--output_dir" in line and "the disk is full" in line and "previous last.pt is kept" in line
    assert "--resume" in line
    monkeypatch.undo()
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert not list(out.glob("*.tmp"))


def test_output_dir_below_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    line = fails(capsys, *TINY, "--output_dir", str(tmp_path / "file" / "out"))
    assert "--output_dir" in line and "choose another folder" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir(capsys, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        line = fails(capsys, *TINY, "--output_dir", str(out))
    finally:
        out.chmod(0o700)
    assert "--output_dir" in line and "Permission denied" in line
