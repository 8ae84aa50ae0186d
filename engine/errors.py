"""How a run ends without a traceback (see ``main.main``): the exceptions, and the one formatter of their line.

- :class:`CLIError`: bad input (an option, a file); with ``data.DataError`` (a dataset) :data:`BAD_INPUT`, exit code 2.
- :class:`TrainingDiverged`: a numerical failure (the loss became NaN or inf), not bad input; exit code 3.
- :class:`Interrupted`: SIGINT/SIGTERM after ``last.pt`` was written; exit code 128 + the signal.
"""
import re
import sys
from typing import Optional

from data.datasets import DataError


class CLIError(Exception):
    """Bad input: the message names the option to change; ``main()`` prints it and exits with 2.

    ``data.DataError`` (a dataset that cannot be read) is the same kind of error from the layer below:
    catch :data:`BAD_INPUT` to catch both.
    """

    exit_code = 2


BAD_INPUT = (CLIError, DataError)  # what ends a run as bad input (exit code 2)


class TrainingDiverged(Exception):
    """The training loss became NaN or inf; the checkpoints on disk are the last good state (exit 3)."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after ``last.pt`` was written (exit 128 + the signal number).

    A KeyboardInterrupt, so that callers that stop on Ctrl-C (the sweep) stop on it too.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def one_line(err: BaseException, *, named: bool = False, limit: Optional[int] = None) -> str:
    """The message of ``err`` as one line.

    An error re-raised from a DataLoader worker carries the worker's traceback, whose last line is
    the message. ``named``: an error from a library quoted inside one of ours: its type and first
    line (the lines after it are advice for another context). ``limit``: at most that many characters.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        lines = [re.sub(r"^[\w.]+: ", "", lines[-1])]
    if named:
        text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    else:
        text = " ".join(lines)
    return text[:limit] if limit else text


def first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message, else its type's name (a library's later lines are
    advice for another context)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def report_error(prog: str, err: BaseException) -> int:
    """``prog: error: <first line>`` on stderr, as argparse words it; returns the exit code (the error's own,
    else 2: bad input). The one ending of every command line's bad input."""
    print(f"{prog}: error: {first_line(err)}", file=sys.stderr)
    return getattr(err, "exit_code", 2)
