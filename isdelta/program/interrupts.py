"""Ctrl-C and SIGTERM stop a run at the next safe point, always.

Python turns SIGINT into a KeyboardInterrupt in the main thread at the next bytecode it runs. If
that bytecode belongs to a finaliser (a ``__del__``, a weakref callback, a generator the garbage
collector closes), the exception is printed as "Exception ignored in …" and dropped, and the run
goes on to the end as if the signal had never come: seen once in about fourteen runs of the
Ctrl-C test while the update step freed its tensors. So the handler installed here also records
the signal, and every safe point (a stage's start and end, each part saved to the output folder:
:func:`check`) raises KeyboardInterrupt again while one is pending.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["check", "handled", "pending"]

_pending: list[int] = []  # the signals received since `handled` was entered


def pending() -> bool:
    """Whether a Ctrl-C or SIGTERM came and the run has not stopped yet."""
    return bool(_pending)


def check() -> None:
    """A safe point: raise KeyboardInterrupt if a signal came (and was perhaps swallowed)."""
    if _pending:
        raise KeyboardInterrupt


def _handler(signum, frame) -> None:
    _pending.append(signum)
    raise KeyboardInterrupt


@contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM (a scheduler's stop, ``kill``) both raise KeyboardInterrupt and are
    remembered until the block ends. Only the main thread can install a handler; elsewhere the
    block runs with Python's own. A signal ignored when the block starts stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # a SIGINT ignored from the start (a job started in the background with `&`) stays ignored
    signals = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, _handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _pending.clear()
