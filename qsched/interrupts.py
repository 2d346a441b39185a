"""Ctrl-C and SIGTERM: stop cleanly between writes, never in the middle of one.

:func:`terminate_as_interrupt` makes SIGTERM behave like Ctrl-C (a ``KeyboardInterrupt``) for the duration of a
command, so both end the same way (the CLI prints how to resume and exits 130). :func:`deferred_interrupts`
holds SIGINT/SIGTERM back while a file is being written: a signal that arrives then is delivered right after
the write completes, so no result file is ever left half written. Both only act in the main thread (the only
one Python delivers signals to); elsewhere they do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

__all__ = ["terminate_as_interrupt", "deferred_interrupts", "EXIT_INTERRUPTED"]

#: Exit status of an interrupted command (128 + SIGINT, the shell's convention).
EXIT_INTERRUPTED = 130
_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``KeyboardInterrupt`` like SIGINT does (both naming the signal; a
    SIGINT handler other than Python's default is left alone)."""
    if not _main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return
    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_interrupt)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        old[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back inside the block and deliver the first one that arrived when it ends."""
    if not _main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []
    old = {s: signal.getsignal(s) for s in _SIGNALS}
    for s in _SIGNALS:
        signal.signal(s, lambda signum, frame: pending.append((signum, frame)))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pending:
            signum, frame = pending[0]
            handler = old.get(signum)
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL and signum == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)
