"""SIGINT (Ctrl-C) and SIGTERM (schedulers, ``kill``, torchrun) while training: finish the step, then stop.

The handler only records the signal; the training loop looks at it after every step, writes
``last.pt`` and raises :class:`engine.errors.Interrupted`. A second Ctrl-C stops at once (the last
complete ``last.pt`` on disk stays valid: files are written atomically).
"""
import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal:
    """Context manager: while inside, SIGINT/SIGTERM set :attr:`signum` instead of ending the process.

    Handlers can only be set from the main thread; elsewhere (a run started from a worker thread)
    signals keep their previous behaviour and :attr:`signum` stays None.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the step
        self.signum = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_stop_signals(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: loader processes leave SIGINT/SIGTERM to the main process.

    Ctrl-C reaches every process of the terminal's group, loader workers included; a worker that
    died from it would make the main process fail instead of writing ``last.pt``.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
