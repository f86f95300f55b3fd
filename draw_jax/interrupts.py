"""The signals that end a training run early, and how a run holds them back.

Ctrl-C (SIGINT) reaches Python as ``KeyboardInterrupt``. SIGTERM, what
``timeout``, ``docker stop``, ``kill`` and job schedulers send, kills a Python
process outright by default: no message, writers not closed. While a run trains,
``sigterm_as_interrupt`` turns it into ``Terminated``, a ``KeyboardInterrupt``,
so both end the run the same way (the last completed checkpoint named, files
closed); ``deferred`` holds both back while a checkpoint is written.

A command can ask for more (``exit_promptly``): from then on either signal
prints one line and ends the process at once, even while XLA compiles or a
computation runs in C++, where Python cannot raise an exception until the call
returns (and raising one when it does has crashed the process). The training
loop uses this while nothing can be lost (start-up, the first compile,
evaluations) and switches back to exceptions (``as_exceptions``) around its
steps and saves, which must end cleanly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np

__all__ = [
    "Terminated",
    "agree",
    "as_exceptions",
    "deferred",
    "describe",
    "exit_promptly",
    "prompt_exit_active",
    "recorded",
    "signal_of",
    "sigterm_as_interrupt",
]

# What ``deferred`` holds back.
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C while ``sigterm_as_interrupt`` is active."""


def describe(sig: signal.Signals) -> str:
    """ "interrupted" (Ctrl-C) or "stopped by SIGTERM": how a message names what ended a run."""
    return "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"


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
    Under ``exit_promptly`` it already raises ``Terminated`` whenever the prompt
    exit is suspended, so this block changes nothing there.
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


class _PromptExit:
    """SIGINT and SIGTERM end the process from a watcher thread (``signal.set_wakeup_fd``).

    Python runs signal handlers only in the main thread, between bytecodes; the
    C-level handler also writes the signal's number to the wakeup pipe at once,
    and the watcher, blocked on that pipe, prints the message and exits.
    """

    def __init__(self) -> None:
        self.message: Callable[[signal.Signals], str] = lambda sig: "interrupted"
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous: dict[int, object] = {}
        self._suspended = 0
        threading.Thread(target=self._watch, name="draw_jax-prompt-exit", daemon=True).start()
        self._arm()

    def _arm(self) -> None:
        for s in _SIGNALS:
            previous = signal.getsignal(s)
            if previous is signal.SIG_IGN:  # ignored (a background job's SIGINT): stays ignored
                continue
            self._previous[s] = previous
            signal.signal(s, lambda signum, frame: None)  # the watcher acts; the main thread goes on
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def _disarm(self) -> None:
        signal.set_wakeup_fd(-1)
        for s, previous in self._previous.items():
            # Never SIGTERM's default action, even for an instant: it kills the process with no
            # message, and a signal may arrive before the caller installs its own handler
            # (``as_exceptions``, ``recorded``). Until then, SIGTERM raises ``Terminated``.
            if s == signal.SIGTERM and previous is signal.SIG_DFL:
                previous = _raise_terminated
            signal.signal(s, previous)
        self._previous = {}

    def _watch(self) -> None:
        while True:
            data = os.read(self._read, 1)
            if not data:
                return
            if self._suspended or data[0] not in self._previous:
                continue
            sig = signal.Signals(data[0])
            try:
                sys.stderr.write(f"{self.message(sig)}\n")
                sys.stderr.flush()
            finally:
                os._exit(128 + sig)

    def suspend(self) -> None:
        if self._suspended == 0:
            self._disarm()
        self._suspended += 1

    def resume(self) -> None:
        self._suspended -= 1
        if self._suspended == 0:
            self._arm()


_prompt: _PromptExit | None = None


def exit_promptly(message: Callable[[signal.Signals], str] | str) -> None:
    """From now on SIGINT or SIGTERM prints ``message`` and exits at once with 128 + its number.

    For a command's ``__main__`` (a library never calls it: a notebook keeps
    its KeyboardInterrupt). Calling it again replaces the message, which may
    be a function of the signal. Main thread only (elsewhere a no-op).
    """
    global _prompt
    if not _in_main_thread():
        return
    if _prompt is None:
        _prompt = _PromptExit()
    _prompt.message = message if callable(message) else (lambda sig, text=message: text)


@contextlib.contextmanager
def recorded() -> Iterator[list[signal.Signals]]:
    """Inside the block SIGINT and SIGTERM are only recorded, in the list it yields, and
    not raised at all: the caller decides when to stop (a run of several processes stops
    when all have agreed to, at the same step). ``exit_promptly`` is suspended meanwhile."""
    received: list[signal.Signals] = []
    if not _in_main_thread():
        yield received
        return
    if _prompt is not None:
        _prompt.suspend()
    previous = {}
    for s in _SIGNALS:  # an ignored signal (a background job's SIGINT) stays ignored
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, lambda signum, frame: received.append(signal.Signals(signum)))
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if _prompt is not None:
            _prompt.resume()


def agree(
    received: list[signal.Signals], due: bool, gather: Callable[[np.ndarray], np.ndarray]
) -> tuple[signal.Signals | None, bool]:
    """What the processes of one run agree on after a call: the signal to stop on, and
    whether a save is due.

    ``received``: the signals this process recorded (``recorded``); ``due``: whether its
    own clock says a timed checkpoint is due; ``gather``: an all-gather over the processes,
    [2] int32 -> [processes, 2] (``multihost_utils.process_allgather``). Returns the
    strongest signal any process recorded (SIGTERM over SIGINT: a scheduler's stop outranks
    a Ctrl-C) or None, and whether any process's clock is due, the same on every process.
    """
    mine = np.array([max(map(int, received), default=0), int(due)], np.int32)
    every = np.asarray(gather(mine)).reshape(-1, 2)
    strongest = int(every[:, 0].max())
    return (signal.Signals(strongest) if strongest else None), bool(every[:, 1].max())


def prompt_exit_active() -> bool:
    """Whether ``exit_promptly`` was called in this process."""
    return _prompt is not None


@contextlib.contextmanager
def as_exceptions() -> Iterator[None]:
    """Inside the block ``exit_promptly`` is suspended: Ctrl-C raises KeyboardInterrupt again
    and SIGTERM ``Terminated`` (``sigterm_as_interrupt``). Outside any ``exit_promptly`` this
    does nothing."""
    if _prompt is None or not _in_main_thread():
        yield
        return
    _prompt.suspend()
    try:
        with sigterm_as_interrupt():
            yield
    finally:
        _prompt.resume()
