"""The entry point of every stage script: one-line errors and exit codes, no tracebacks."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from fmnist import signals
from fmnist.errors import FmnistError, ParamsError
from fmnist.params import load_params

EXIT_FAILED = 1
EXIT_BAD_PARAMS = 2


def run_stage(name: str, main: Callable[[dict[str, Any]], None]) -> None:
    """Validate params.yaml, then run `main(params)`; expected failures exit with one line.

    Ctrl-C and SIGTERM exit 130 and 143 (the shell's 128 + signal) after every `finally` ran,
    so nothing half-written is left and nothing is published; also when a library turned the
    interrupt into an error of its own.
    """
    signals.install()
    try:
        signals.check()  # a signal during the imports whose exit a finalizer swallowed
        params = load_params()
        main(params)
        signals.check()  # an interrupt swallowed somewhere (a finalizer) still fails the stage
    except Exception as exc:  # noqa: BLE001 - sorted below; bugs keep their traceback
        _exit_if_interrupted(name)
        if isinstance(exc, ParamsError):
            _fail(name, str(exc), EXIT_BAD_PARAMS)
        if isinstance(exc, FmnistError):
            _fail(name, str(exc), EXIT_FAILED)
        if isinstance(exc, OSError):  # the file system's failures no library turned into ours
            where = f"{exc.filename}: " if exc.filename else ""
            reason = exc.strerror.strip().splitlines()[0] if exc.strerror else str(exc)
            _fail(name, f"{where}{reason}", EXIT_FAILED)
        raise
    except KeyboardInterrupt:
        _exit_if_interrupted(name)
        _fail(name, signals.interrupted(signal.SIGINT), 128 + signal.SIGINT)


def _exit_if_interrupted(name: str) -> None:
    signum = signals.received()
    if signum is not None:
        _fail(name, signals.interrupted(signum), 128 + signum)


def _fail(name: str, message: str, code: int) -> None:
    print(f"{name}: {message}", file=sys.stderr)
    sys.exit(code)
