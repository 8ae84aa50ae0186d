"""Helpers shared by the command-line tests."""
from typing import Sequence

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
