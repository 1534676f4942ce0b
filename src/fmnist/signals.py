"""Ctrl-C and SIGTERM end a stage the same way: an exception that runs every `finally`.

Python turns SIGINT into KeyboardInterrupt, but one raised inside a finalizer (h5py closing a
file, for one) is printed and swallowed, and SIGTERM kills without any cleanup at all. So both
signals are recorded here as well as raised, and `check()` runs before anything is published:
a swallowed interrupt can no longer let a stage publish its outputs and exit 0.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None
_deferring = 0


class Interrupted(KeyboardInterrupt):
    """Raised by the first SIGINT or SIGTERM; `exit_code` is the shell's 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def interrupted(signum: int) -> str:
    """What a stage's one line says when a signal ends it."""
    return f"interrupted ({signal.Signals(signum).name})"


def handle_signals_while_importing(stage: str) -> None:
    """The first call of a stage script, before its imports: Ctrl-C or SIGTERM while they run
    (torch alone takes seconds) ends the stage with its one line and the shell's exit code,
    not an import traceback. Nothing is written before `run_stage`, whose `install()` then
    takes the signals over."""
    if threading.current_thread() is not threading.main_thread():
        return

    def leave(signum: int, _frame: FrameType | None) -> None:
        global _received
        if _received is None:  # recorded, should a finalizer swallow the exit: check() stops
            _received = signum
        print(f"{stage}: {interrupted(signum)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    for signum in HANDLED:
        signal.signal(signum, leave)


def install() -> None:
    """Handle SIGINT and SIGTERM in this process (only the main thread may install handlers)."""
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            signal.signal(signum, _handle)
        sys.unraisablehook = _quiet_about_interrupts(sys.unraisablehook)


def _quiet_about_interrupts(hook):  # noqa: ANN001, ANN202 - sys.unraisablehook's own type
    """No "Exception ignored in ..." traceback for an interrupt a finalizer swallowed: it is
    recorded, and `check()` raises it again where it can stop the stage."""
    if getattr(hook, "quiet_about_interrupts", False):
        return hook

    def quiet(unraisable: object) -> None:
        if not isinstance(getattr(unraisable, "exc_value", None), Interrupted):
            hook(unraisable)

    quiet.quiet_about_interrupts = True  # type: ignore[attr-defined]
    return quiet


def _handle(signum: int, _frame: FrameType | None) -> None:
    global _received
    if _received is None:  # the first signal decides the exit code
        _received = signum
    if not _deferring:  # inside `deferred()`, the block finishes first
        raise Interrupted(_received)


@contextmanager
def deferred() -> Iterator[None]:
    """A block no signal interrupts (the renames that publish outputs): a signal arriving
    inside it is raised when it ends."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring:
        check()


def received() -> int | None:
    """The signal this process received, if any."""
    return _received


def check() -> None:
    """Raise Interrupted if a signal arrived, even one whose exception was swallowed."""
    if _received is not None:
        raise Interrupted(_received)


def reset() -> None:
    """Forget a received signal (tests run several stages in one process)."""
    global _received, _deferring
    _received = None
    _deferring = 0


@contextmanager
def restored() -> Iterator[None]:
    """On leaving, the SIGINT/SIGTERM handlers, sys.unraisablehook (`install` wraps it) and the
    record put back as they were: a command that installs for its own duration (`fmnist
    predict`), a test."""
    handlers = {signum: signal.getsignal(signum) for signum in HANDLED}
    hook = sys.unraisablehook
    try:
        yield
    finally:
        reset()
        sys.unraisablehook = hook
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
