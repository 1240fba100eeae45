"""Stopping on SIGINT and SIGTERM: at once (the command-line tools), or, while a run can save
its state, at the end of the epoch in flight. No torch: the grid's planning uses it too.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (see stop_on_signals). A KeyboardInterrupt, not an Exception, so
    that the `except Exception` around decoders and readers cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)  # args (signum,): pickles across processes
        self.signum = signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's 128 + signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, each of `signums` raises Interrupted(signum) in the main thread, so the
    work stops at once through its `finally` blocks (temp files removed, nothing half-written
    kept) and the caller can exit cleanly; the previous handlers are restored on leaving. Off the
    main thread, where Python cannot set handlers, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum: int, _frame) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            # None: a handler not set from Python; the default is the closest we can restore.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


class StopRequest:
    """While training with a checkpoint: the first SIGINT/SIGTERM asks the run to save its state
    at the end of the epoch and stop (an epoch is well under a second on a GPU); a second one
    stops at once, losing that epoch. Where signals already raise Interrupted (the CLIs'
    stop_on_signals) the same handlers are put back on leaving."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.signum = log, None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._ask) for s in STOP_SIGNALS}
        return self

    def _ask(self, signum: int, _frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        self.log(f"[train] {signal.Signals(signum).name}: saving the state at the end of this "
                 "epoch, then stopping (send it again to stop at once)")

    def __exit__(self, *_exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
