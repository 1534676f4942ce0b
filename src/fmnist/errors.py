"""The project's one exception type for expected failures (bad params, bad files, bad input)."""


class FmnistError(Exception):
    """A user-facing failure: printed as one line by the stage entry point, never a traceback."""


class ParamsError(FmnistError):
    """params.yaml is unreadable or violates the schema; stages exit with code 2."""
