"""Exceptions that end a run with one clear line instead of a traceback (see ``main.main``)."""
import signal


class CLIError(Exception):
    """Bad input: the message names the option to change; ``main()`` prints it and exits with 2."""

    exit_code = 2


class TrainingDiverged(CLIError):
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

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name
