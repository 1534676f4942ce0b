"""The project's one exception type for expected failures (bad params, bad files, bad input)."""


def first_line(exc: BaseException) -> str:
    """An exception's first line of text, or its type's name: the detail a one-line error shows."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class FmnistError(Exception):
    """A user-facing failure: printed as one line by the stage entry point, never a traceback."""


class ParamsError(FmnistError):
    """params.yaml is unreadable or violates the schema; stages exit with code 2."""


class OutputError(FmnistError):
    """An output could not be written (full disk, read-only folder): retrying elsewhere, such
    as the next download source, cannot help."""
