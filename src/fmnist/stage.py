"""The entry point of every stage script: one-line errors and exit codes, no tracebacks."""

from __future__ import annotations

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
    so nothing half-written is left and nothing is published.
    """
    signals.install()
    try:
        params = load_params()
        main(params)
        signals.check()  # an interrupt swallowed somewhere (a finalizer) still fails the stage
    except ParamsError as exc:
        _fail(name, str(exc), EXIT_BAD_PARAMS)
    except FmnistError as exc:
        _fail(name, str(exc), EXIT_FAILED)
    except OSError as exc:  # the file system's failures that no library turned into ours
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(name, f"{where}{exc.strerror or exc}", EXIT_FAILED)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, signals.Interrupted) else signals.HANDLED[0]
        _fail(name, f"interrupted ({signals.Interrupted(signum)})", 128 + signum)


def _fail(name: str, message: str, code: int) -> None:
    print(f"{name}: {message}", file=sys.stderr)
    sys.exit(code)
