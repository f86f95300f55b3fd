"""The signals that end a training run early, and how a run holds them back.

Ctrl-C (SIGINT) reaches Python as ``KeyboardInterrupt``. SIGTERM, what
``timeout``, ``docker stop``, ``kill`` and job schedulers send, kills a Python
process outright by default: no message, writers not closed. While a run trains,
``sigterm_as_interrupt`` turns it into ``Terminated``, a ``KeyboardInterrupt``,
so both end the run the same way (the last completed checkpoint named, files
closed); ``deferred`` holds both back while a checkpoint is written.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "deferred", "signal_of", "sigterm_as_interrupt"]

# What ``deferred`` holds back.
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C while ``sigterm_as_interrupt`` is active."""


def signal_of(e: BaseException) -> signal.Signals:
    """SIGTERM for ``Terminated`` (also as a cause or context), else SIGINT."""
    chain = (e, e.__cause__, e.__context__)
    return signal.SIGTERM if any(isinstance(x, Terminated) for x in chain) else signal.SIGINT


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"received {signal.Signals(signum).name}")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises ``Terminated`` instead of killing the process.

    Only where SIGTERM has its default action (a program that installed its own
    handler keeps it) and only in the main thread (where Python runs handlers).
    """
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Holds back SIGINT and SIGTERM inside the block and raises them after it.

    Each then gets the handling it had before the block: SIGINT Python's
    ``KeyboardInterrupt``, SIGTERM ``Terminated`` where ``sigterm_as_interrupt``
    is active, a default action (delivered again) or an ignored signal (dropped).
    """
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        signum = received[0]
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:  # deliver it again, now with its default action
            signal.raise_signal(signum)
        # SIG_IGN (e.g. SIGINT of a background job): ignored, as it would have been
