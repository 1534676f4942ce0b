"""Write-then-rename, so a killed stage never leaves a file that looks complete.

Files are written beside their final path and renamed over it; a stage's outputs (folders
and files) are staged beside their targets and renamed into place together at the end
(`publishing`, `publish_dir`). Nothing is renamed into place after a SIGINT/SIGTERM (see
fmnist.signals), and a write that fails for lack of space or permission is one line naming
the final path.
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
from fmnist.errors import FmnistError, OutputError

# Failures of the file system, not of the program: one line naming the path, no traceback.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
WRITE_ERRNOS = DISK_ERRNOS | {errno.EACCES, errno.EPERM, errno.EIO}


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
        raise OutputError(f"{path}: cannot write: {_reason(exc)}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _write_errors_name(path, tmp_path):
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would surprise other readers
            signals.check()
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


class Publication:
    """A stage's outputs, staged beside their targets and renamed into place together.

    `folder(target)` and `file(target)` return where to write each output. `publishing()`
    commits them all when its block succeeds: with signals deferred, each target is moved
    aside and its staged version renamed in; a failure part-way rolls the renamed ones back.
    Only a SIGKILL or power loss inside those few renames can leave a target moved aside;
    the next publication of that target restores it (`_recover`).
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (staged, target)

    def folder(self, target: str | Path) -> Path:
        """An empty hidden folder that becomes `target` (replacing the old one) on commit."""
        target = self._prepare(Path(target))
        try:
            staged = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), suffix=".tmp",
                                           dir=target.parent))
        except OSError as exc:
            raise OutputError(f"{target}: cannot write: {_reason(exc)}") from None
        self._staged.append((staged, target))
        return staged

    def file(self, target: str | Path) -> Path:
        """A hidden path beside `target`; whatever is written there becomes `target`."""
        target = self._prepare(Path(target))
        try:
            fd, name = tempfile.mkstemp(prefix=_staging_prefix(target), suffix=".tmp",
                                        dir=target.parent)
        except OSError as exc:
            raise OutputError(f"{target}: cannot write: {_reason(exc)}") from None
        os.close(fd)
        self._staged.append((Path(name), target))
        return Path(name)

    def target_of(self, path: Path) -> Path | None:
        """The target a staged path (or a path inside a staged folder) will become; a target
        itself (a rename of the commit failed) names itself."""
        for staged, target in self._staged:
            if path == staged or staged in path.parents:
                return target / path.relative_to(staged)
            if path == target:
                return target
        return None

    def _prepare(self, target: Path) -> Path:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{target}: cannot write: {_reason(exc)}") from None
        _recover(target)
        return target

    def commit(self) -> None:
        for staged, target in self._staged:
            _make_readable(staged)
            _keep_hidden_files(target, staged)
        done: list[tuple[Path, Path | None]] = []
        with signals.deferred():
            signals.check()
            try:
                for staged, target in self._staged:
                    old = _move_aside(target)
                    try:
                        os.replace(staged, target)
                    except BaseException:
                        if old is not None:
                            os.replace(old, target)
                        raise
                    done.append((target, old))
            except BaseException:
                for target, old in reversed(done):
                    _put_back(target, old)
                raise
            for _, old in done:
                if old is not None:
                    _remove(old)

    def discard(self) -> None:
        for staged, _ in self._staged:
            _remove(staged)


@contextmanager
def publishing() -> Iterator[Publication]:
    """Stage outputs with the yielded Publication; all are published when the block succeeds,
    none (and no staging leftovers) when it fails or a signal arrives."""
    publication = Publication()
    try:
        try:
            yield publication
            publication.commit()
        except OSError as exc:
            where = publication.target_of(Path(exc.filename)) if exc.filename else None
            if exc.errno not in WRITE_ERRNOS or (exc.filename and where is None):
                raise
            raise OutputError(f"{where or 'output'}: cannot write: {_reason(exc)}") from None
        except FmnistError as exc:  # name the paths the user knows, not the staging ones
            message = str(exc)
            for staged, target in publication._staged:
                message = message.replace(str(staged), str(target))
            raise type(exc)(message) from None
    finally:
        publication.discard()


@contextmanager
def publish_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside `target`; if the block succeeds, it becomes `target`
    (the old folder is deleted only once the new one is in place); otherwise `target` is left
    as it was."""
    with publishing() as publication:
        yield publication.folder(target)


def _staging_prefix(target: Path) -> str:
    """`.name.PID.`: a later run removes a leftover only once its process is gone."""
    return f".{target.name}.{os.getpid()}."


def _aside_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.old.tmp")


def _move_aside(target: Path) -> Path | None:
    if not (target.exists() or target.is_symlink()):
        return None
    old = _aside_path(target)
    _remove(old)
    os.replace(target, old)
    return old


def _put_back(target: Path, old: Path | None) -> None:
    """Undo one rename of a commit: the new target out, the old one back."""
    trash = target.with_name(f".{target.name}.{os.getpid()}.new.tmp")
    os.replace(target, trash)
    if old is not None:
        os.replace(old, target)
    _remove(trash)


def _recover(target: Path) -> None:
    """Clean up after killed runs: restore a target a commit had moved aside, then remove the
    staging leftovers of processes that no longer exist."""
    for path in sorted(target.parent.glob(f".{target.name}.*.tmp")):
        parts = path.name[len(target.name) + 2:].split(".")
        pid = int(parts[0]) if parts[0].isdigit() else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue  # another process's live staging
        if parts[1:2] == ["old"] and not (target.exists() or target.is_symlink()):
            os.replace(path, target)
        else:
            _remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _keep_hidden_files(target: Path, staged: Path) -> None:
    """Carry over the target folder's hidden files the stage did not write (DVC's .gitignore
    for cached outputs inside it): they are not the stage's to delete."""
    if not staged.is_dir() or not target.is_dir() or target.is_symlink():
        return
    for path in target.iterdir():
        if path.name.startswith(".") and path.is_file() and not (staged / path.name).exists():
            shutil.copy2(path, staged / path.name)


@contextmanager
def _write_errors_name(path: Path, tmp: Path) -> Iterator[None]:
    """A full disk or read-only folder while writing `tmp`: one line naming `path`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS or (exc.filename and Path(exc.filename) != tmp):
            raise
        raise OutputError(f"{path}: cannot write: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    """The system's one-line reason (h5py's strerror can hold a whole error stack)."""
    if exc.errno:
        return os.strerror(exc.errno)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _make_readable(path: Path) -> None:
    """The usual permissions (umask), not mkdtemp/mkstemp's owner-only ones."""
    mask = _umask()
    if not path.is_dir():
        path.chmod(0o666 & ~mask)
        return
    path.chmod(0o777 & ~mask)
    for child in path.rglob("*"):
        child.chmod((0o777 if child.is_dir() else 0o666) & ~mask)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, data: Any) -> None:
    """Sorted keys and a trailing newline: identical data gives identical bytes."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
