"""Ctrl-C and SIGTERM: stop cleanly between writes, never in the middle of one.

:func:`terminate_as_interrupt` makes SIGTERM behave like Ctrl-C (a ``KeyboardInterrupt``) for the duration of a
command, so both end the same way (the CLI prints how to resume and exits 130). :func:`deferred_interrupts`
holds SIGINT/SIGTERM back while a file (or a study record) is being written: a signal that arrives then is
delivered right after the write completes, so nothing stored is ever left half written; :func:`interruptible`
lets signals through again inside such a block, for work that writes nothing. Both only act in the main thread (the only
one Python delivers signals to); elsewhere they do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

__all__ = ["terminate_as_interrupt", "deferred_interrupts", "interruptible", "EXIT_INTERRUPTED"]

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


#: (handlers before, signals received) of each active deferred block, innermost last.
_HELD: list[tuple[dict[int, Any], list[tuple[int, Any]]]] = []


def _deliver(handlers: dict[int, Any], signum: int, frame: Any) -> None:
    handler = handlers.get(signum)
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL and signum == signal.SIGINT:
        raise KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


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
    _HELD.append((old, pending))
    try:
        yield
    finally:
        _HELD.pop()
        for s, h in old.items():
            signal.signal(s, h)
        if pending:
            _deliver(old, *pending[0])


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Inside a :func:`deferred_interrupts` block, let SIGINT/SIGTERM through again (for the long part of the
    work that writes nothing, e.g. scoring a trial while Optuna's writes around it stay whole). A signal held
    back so far is delivered on entry."""
    if not _main_thread() or not _HELD:
        yield
        return
    old, pending = _HELD[-1]
    recorders = {s: signal.getsignal(s) for s in _SIGNALS}
    for s, h in old.items():
        signal.signal(s, h)
    try:
        if pending:
            first = pending[0]
            pending.clear()
            _deliver(old, *first)
        yield
    finally:
        for s, h in recorders.items():
            signal.signal(s, h)
