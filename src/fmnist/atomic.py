"""Write-then-rename, so a killed stage never leaves a file that looks complete.

Files are written beside their final path and renamed over it; whole output folders are
built in a hidden sibling folder and swapped in (`publish_dir`). Nothing is renamed into place
after a SIGINT/SIGTERM (see fmnist.signals), and a write that fails for lack of space or
permission is one line naming the final path.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fmnist import signals
from fmnist.errors import FmnistError

# Failures of the file system, not of the program: one line naming the path, no traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.EFBIG, errno.EIO})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise FmnistError(f"{path}: cannot write: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _write_errors_name(path):
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would surprise other readers
            signals.check()
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def publish_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside `target`; if the block succeeds, it becomes `target`.

    The old folder is moved aside and deleted only after the new one is in place; on any
    failure (or signal) the staging folder is removed and `target` is left as it was. Staging
    folders of killed runs are removed first, so none piles up.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            _remove(stale)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        )
    except OSError as exc:
        raise FmnistError(f"{target}: cannot write: {exc.strerror or exc}") from None
    try:
        with _write_errors_name(target):
            yield staging
            _make_readable(staging)
            signals.check()
            _replace_dir(staging, target)
    except FmnistError as exc:  # name the folder the user knows, not the staging one
        raise FmnistError(str(exc).replace(str(staging), str(target))) from None
    finally:
        _remove(staging)


@contextmanager
def _write_errors_name(path: Path) -> Iterator[None]:
    """A full disk or read-only folder inside the block: one line naming `path`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise FmnistError(f"{path}: cannot write: {exc.strerror}") from None


def _replace_dir(staging: Path, target: Path) -> None:
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}.tmp")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _make_readable(folder: Path) -> None:
    """The usual permissions (umask), not mkdtemp/mkstemp's owner-only ones."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, data: Any) -> None:
    """Sorted keys and a trailing newline: identical data gives identical bytes."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
