"""Helpers shared by the command-line tests."""
import contextlib
from typing import Iterator, List, Sequence
from unittest import mock

import pytest

import engine.train
import main


def one_error_line(capsys, argv: Sequence[str], code: int = 2, starts: str = "main.py: error: ") -> str:
    """Run ``main.main(argv)``; check its exit code, that stderr is one line starting with ``starts`` and
    holds no traceback; return that line."""
    exit_code = main.main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_code == code and len(lines) == 1 and lines[0].startswith(starts), err
    assert "Traceback" not in err
    return lines[0]


def fails(capsys, *argv: str) -> str:
    """The one error line of a run refused as bad input (exit code 2)."""
    return one_error_line(capsys, argv)


@contextlib.contextmanager
def stopped_by_ctrl_c_in_epoch(epoch: int) -> Iterator[None]:
    """Training inside the block is stopped by Ctrl-C (a KeyboardInterrupt) when epoch ``epoch`` starts, so
    last.pt holds epoch ``epoch - 1``; the block must end by that interrupt. The real epoch loop is
    restored on leaving."""
    real, calls = engine.train.train_one_epoch, []

    def stops_at_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with mock.patch.object(engine.train, "train_one_epoch", stops_at_epoch), pytest.raises(KeyboardInterrupt):
        yield


@contextlib.contextmanager
def epochs_trained() -> Iterator[List[int]]:
    """A list that gains one entry for each epoch trained inside the block (the real epoch loop runs)."""
    real, calls = engine.train.train_one_epoch, []

    def counts_epoch(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with mock.patch.object(engine.train, "train_one_epoch", counts_epoch):
        yield calls
