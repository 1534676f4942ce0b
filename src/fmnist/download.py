"""Fetch the four Fashion-MNIST files from the first source that has them intact.

A source is a local folder (Debian's dataset-fashion-mnist, an offline CI) or a URL base (the
public mirrors). Each file is checked by the SHA-256 of its decompressed bytes, because the
Debian copies are re-gzipped with other headers.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import shutil
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from fmnist.atomic import atomic_path
from fmnist.constants import RAW_FILES, RAW_SHA256
from fmnist.errors import FmnistError

CHUNK = 1 << 20


def decompressed_sha256(path: Path) -> str:
    """SHA-256 of the gunzipped content; a truncated or corrupt stream is an FmnistError."""
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
    except EOFError:
        raise FmnistError("truncated gzip stream") from None
    except (OSError, zlib.error) as exc:
        raise FmnistError(f"not a valid gzip file ({exc})") from None
    return digest.hexdigest()


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _fetch_url(url: str, dest: Path, timeout: float) -> None:
    received, total = 0, None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            # disable=None: a progress bar on a terminal only, never in logs or captured stderr.
            with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                      leave=False, file=sys.stderr, disable=None) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise FmnistError(f"HTTP {exc.code} {exc.reason}") from None
    except http.client.HTTPException as exc:  # IncompleteRead, BadStatusLine: not OSErrors
        raise FmnistError(f"broken HTTP response ({type(exc).__name__})") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FmnistError(f"unreachable ({reason})") from None
    # http.client reads a connection closed early as a normal end of data.
    if total is not None and received != total:
        raise FmnistError(f"incomplete download ({received} of {total} bytes)")


def fetch_file(source: str, name: str, dest: Path, timeout: float) -> None:
    """Copy or download `name` from `source` to `dest` atomically, verified, or raise."""
    with atomic_path(dest) as tmp:
        if _is_url(source):
            _fetch_url(f"{source.rstrip('/')}/{name}", tmp, timeout)
        else:
            origin = Path(source) / name
            if not origin.is_file():
                raise FmnistError("no such file")
            try:
                shutil.copyfile(origin, tmp)
            except OSError as exc:
                raise FmnistError(f"cannot copy ({exc.strerror or exc})") from None
        if decompressed_sha256(tmp) != RAW_SHA256[name]:
            raise FmnistError("checksum mismatch")


def download_all(sources: list[str], out_dir: str | Path, *, timeout: float = 30) -> list[str]:
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
                fetch_file(source, name, out_dir / name, timeout)
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
