"""A loss that becomes NaN or inf stops the run with one line naming the epoch, the step and the options
likely responsible, and leaves the last good checkpoint as it was."""
import math

import pytest
import torch

import data
import main
from cli_helpers import one_error_line

TINY = ["--epochs", "2", "--train_subset", "64", "--test_subset", "40", "--batch_size", "16",
        "--bench_steps", "1", "--bench_warmup", "0"]


def diverges(capsys, *argv) -> str:
    """main()'s one stderr line for a run stopped by a non-finite loss (exit code 3)."""
    return one_error_line(capsys, argv, code=3, starts="main.py: error: training diverged")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_bad_loss_in_epoch_2_keeps_epoch_1(capsys, tmp_path, monkeypatch, bad):
    out = tmp_path / "out"
    main.run(main.parse_args([*TINY, "--epochs", "1", "--output_dir", str(out / "epoch1")]))
    epoch1 = torch.load(out / "epoch1" / "last.pt", weights_only=True)["model"]

    reads = []
    real = data.Digits.__getitem__

    def getitem(self, index):  # a corrupt image (NaN or inf pixels) in epoch 2's third batch
        image, label = real(self, index)
        reads.append(index)
        return (torch.full_like(image, bad) if len(reads) == 64 + 40 + 33 else image), label

    monkeypatch.setattr(data.Digits, "__getitem__", getitem)
    line = diverges(capsys, *TINY, "--output_dir", str(out))
    assert "the loss is nan at step 3 of 4 in epoch 2/2" in line  # an inf pixel makes NaN too (inf - inf)
    assert "last.pt is left as it was" in line and "--lr" in line and "--amp" not in line
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and not (out / "results.json").exists()
    for name, tensor in last["model"].items():  # the good state after epoch 1, the same as a one-epoch run's
        assert torch.equal(tensor, epoch1[name]), name


def poison_every_image(monkeypatch) -> None:
    """Every training image becomes NaN pixels: the first loss is NaN whatever the release of torch,
    the precision or the learning rate (a large --lr alone may or may not overflow)."""
    real = data.Digits.__getitem__

    def getitem(self, index):
        image, label = real(self, index)
        return torch.full_like(image, math.nan), label

    monkeypatch.setattr(data.Digits, "__getitem__", getitem)


def test_a_loss_that_is_nan_at_the_first_step(capsys, tmp_path, monkeypatch):
    poison_every_image(monkeypatch)
    line = diverges(capsys, *TINY, "--lr", "0.5", "--warmup_epochs", "0", "--output_dir", str(tmp_path))
    assert "the loss is nan at step 1 of 4 in epoch 1/2" in line
    assert "no checkpoint was written yet" in line and "--lr (now 0.5)" in line and "--amp" not in line
    assert not (tmp_path / "last.pt").exists()


def test_amp_is_named_when_on(capsys, tmp_path, monkeypatch):
    poison_every_image(monkeypatch)
    line = diverges(capsys, *TINY, "--amp", "--output_dir", str(tmp_path))
    assert "the loss is nan at step 1" in line and "--lr" in line and "drop --amp" in line
