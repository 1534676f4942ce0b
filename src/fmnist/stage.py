"""The entry point of every stage script: one-line errors and exit codes, no tracebacks."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from fmnist.errors import FmnistError, ParamsError
from fmnist.params import load_params

EXIT_FAILED = 1
EXIT_BAD_PARAMS = 2
EXIT_INTERRUPTED = 130


def run_stage(name: str, main: Callable[[dict[str, Any]], None]) -> None:
    """Validate params.yaml, then run `main(params)`; expected failures exit with one line."""
    try:
        params = load_params()
        main(params)
    except ParamsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_PARAMS)
    except FmnistError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
