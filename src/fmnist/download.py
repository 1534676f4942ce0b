"""Fetch the four Fashion-MNIST files from the first source that has them intact.

A source is a local folder (Debian's dataset-fashion-mnist, an offline CI) or a URL base (the
public mirrors). Each file is checked by the SHA-256 of its decompressed bytes, because the
Debian copies are re-gzipped with other headers.

A URL source is bounded twice per file: it may not announce or send more than the file's known
size (RAW_GZ_BYTES), and it must deliver the whole file before a deadline. `timeout` alone
bounds each socket read, so a source that trickles a byte at a time would never end.
Every file, from any source, is also refused once it inflates past its known decompressed size
(RAW_BYTES): a gzip bomb in a folder or a mirror.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import shutil
import socket
import sys
import threading
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fmnist.atomic import DISK_ERRNOS, atomic_path
from fmnist.constants import RAW_BYTES, RAW_FILES, RAW_GZ_BYTES, RAW_SHA256, URL_SCHEMES
from fmnist.errors import FmnistError, OutputError

CHUNK = 1 << 20
# The slowest source still waited for: the default deadline of a file is `timeout` to start
# plus its known size at this rate (about 7 minutes for the 26 MB training images).
MIN_BYTES_PER_S = 64 * 1024


def decompressed_sha256(path: Path, limit: int | None = None) -> str:
    """SHA-256 of the gunzipped content; a truncated or corrupt stream, or one inflating past
    `limit` bytes (checked as it is read), is an FmnistError."""
    digest = hashlib.sha256()
    size = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if limit is not None and size > limit:
                    raise FmnistError(f"decompresses to more than its known {limit:,} bytes")
                digest.update(chunk)
    except EOFError:
        raise FmnistError("truncated gzip stream") from None
    except (OSError, zlib.error) as exc:
        raise FmnistError(f"not a valid gzip file ({exc})") from None
    return digest.hexdigest()


def _is_url(source: str) -> bool:
    return source.startswith(tuple(f"{scheme}://" for scheme in URL_SCHEMES))


def default_deadline(name: str, timeout: float) -> float:
    """Seconds one source gets for `name`: a slow link is waited for, a trickle is not."""
    return timeout + RAW_GZ_BYTES[name] / MIN_BYTES_PER_S


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: nothing left to end


class _Deadline:
    """Shuts down every connection of one download when its time is up.

    That ends whichever read is blocked, the ones inside http.client (status line, headers,
    TLS handshake) too, which a check between our own reads could not reach.
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._socks:
                sock.close()

    def watch(self, sock: socket.socket) -> socket.socket:
        # A duplicate, because TLS detaches the original; shutdown acts on the connection.
        with self._lock:
            self._socks.append(sock.dup())
            if self.expired:
                _shut(self._socks[-1])
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shut(sock)


class _Watching:
    """Mixin for urllib's handlers: each connection they open (redirects too) is watched."""

    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        def connection(host: str, **conn_kwargs: Any) -> http.client.HTTPConnection:
            conn = http_class(host, **conn_kwargs)
            create = conn._create_connection  # http.client's hook for the socket it connects
            conn._create_connection = lambda *args: self.deadline.watch(create(*args))
            return conn

        return super().do_open(connection, req, **kwargs)


class _WatchingHTTP(_Watching, urllib.request.HTTPHandler):
    pass


class _WatchingHTTPS(_Watching, urllib.request.HTTPSHandler):
    pass


def _fetch_url(url: str, dest: Path, timeout: float, limit: int, seconds: float) -> None:
    with _Deadline(seconds) as deadline:
        try:
            _download(url, dest, timeout, limit, deadline)
        except FmnistError:
            if not deadline.expired:
                raise
        if deadline.expired:  # also when the cut connection looked like a normal end of data
            raise FmnistError(f"not complete within its {seconds:g} s deadline")


def _download(url: str, dest: Path, timeout: float, limit: int, deadline: _Deadline) -> None:
    received, total = 0, None
    opener = urllib.request.build_opener(_WatchingHTTP(deadline), _WatchingHTTPS(deadline))
    try:
        with opener.open(url, timeout=timeout) as response, dest.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            if total is not None and total > limit:
                raise FmnistError(f"announces {total} bytes, more than its known {limit}")
            # disable=None: a progress bar on a terminal only, never in logs or captured stderr.
            with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                      leave=False, file=sys.stderr, disable=None) as bar:
                # At most one byte past the known size is read, and none of it is written.
                while chunk := response.read(min(CHUNK, limit + 1 - received)):
                    received += len(chunk)
                    if received > limit:
                        raise FmnistError(f"more than its known {limit} bytes")
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise FmnistError(f"HTTP {exc.code} {exc.reason}") from None
    except http.client.HTTPException as exc:  # IncompleteRead, BadStatusLine: not OSErrors
        raise FmnistError(f"broken HTTP response ({type(exc).__name__})") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            raise  # our disk, not the source: atomic_path names the file, no next source
        reason = getattr(exc, "reason", None) or exc
        raise FmnistError(f"unreachable ({reason})") from None
    # http.client reads a connection closed early as a normal end of data.
    if total is not None and received != total:
        raise FmnistError(f"incomplete download ({received} of {total} bytes)")


def fetch_file(
    source: str, name: str, dest: Path, timeout: float, deadline: float | None = None
) -> None:
    """Copy or download `name` from `source` to `dest` atomically, verified, or raise.

    A download gets `deadline` seconds in all (default: `default_deadline`); local copies
    are not bounded, so that any gzip of the original files works from a folder.
    """
    with atomic_path(dest) as tmp:
        if _is_url(source):
            seconds = default_deadline(name, timeout) if deadline is None else deadline
            _fetch_url(f"{source.rstrip('/')}/{name}", tmp, timeout, RAW_GZ_BYTES[name], seconds)
        else:
            origin = Path(source) / name
            if not origin.is_file():
                raise FmnistError("no such file")
            try:
                shutil.copyfile(origin, tmp)
            except OSError as exc:
                if exc.errno in DISK_ERRNOS:
                    raise
                raise FmnistError(f"cannot copy ({exc.strerror or exc})") from None
        if decompressed_sha256(tmp, RAW_BYTES[name]) != RAW_SHA256[name]:
            raise FmnistError("checksum mismatch")


def download_all(
    sources: list[str], out_dir: str | Path, *, timeout: float = 30, deadline: float | None = None
) -> list[str]:
    """Each file from the first source that serves it intact; returns the source per file.

    A file found after failures is reported with them (one line); when a file fails
    everywhere, the one-line error names every source and why.
    """
    out_dir = Path(out_dir)
    used = []
    for name in RAW_FILES.values():
        failures = []
        for source in sources:
            try:
                fetch_file(source, name, out_dir / name, timeout, deadline)
            except OutputError:
                raise  # a full disk fails every source alike: stop, naming the file
            except FmnistError as exc:
                failures.append(f"{source}: {exc}")
                continue
            if failures:
                print(f"download: {name}: from {source} after " + "; ".join(failures),
                      file=sys.stderr)
            used.append(source)
            break
        else:
            raise FmnistError(f"{name}: every source failed: " + "; ".join(failures))
    return used
