"""Download: the first source with an intact copy wins, per file; failures are one clear line.

Sources are built from the real files (checksums in constants are the real ones): local folders
with damaged copies, and a real HTTP server on 127.0.0.1 serving the real .gz files, or hostile
answers (endless, trickling, oversized). A hostile mode gives up after a few seconds or tens of
MB by itself, so that without the limits under test a test fails instead of hanging.
"""

from __future__ import annotations

import copy
import gzip
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import fmnist.download
from fmnist.constants import RAW_BYTES, RAW_FILES, RAW_GZ_BYTES, RAW_SHA256
from fmnist.download import decompressed_sha256, download_all, fetch_file
from fmnist.errors import FmnistError

REPO = Path(__file__).resolve().parents[1]
REAL = Path("/usr/share/datasets/fashion-mnist")
NAMES = list(RAW_FILES.values())
SMALL = RAW_FILES["test_labels"]
HOSTILE_SECONDS = 4  # how long a trickling mode keeps at it before giving up
HOSTILE_BYTES = 32 << 20  # how much an endless mode sends before giving up (> every file)

pytestmark = pytest.mark.skipif(
    not all((REAL / name).is_file() for name in NAMES),
    reason=f"the real Fashion-MNIST files are not in {REAL}",
)


def _upstream(name: str) -> bytes:
    """Upstream's .gz bytes: Debian's copy with the file name put back into the gzip header."""
    body = (REAL / name).read_bytes()
    assert body[3] == 0, "expected a gzip header without optional fields"
    return body[:3] + b"\x08" + body[4:10] + name.removesuffix(".gz").encode() + b"\0" + body[10:]


class _Handler(BaseHTTPRequestHandler):
    """GET /<mode>/<name>: good (the real file), wrong (other content), hangup (cut short),
    upstream (upstream's exact bytes), endless (data without end), oversized (announces one
    byte more than the known size), trickle-body and trickle-headers (a byte per 20 ms)."""

    requests: list[str] = []
    hostile = ("endless", "oversized", "trickle-body", "trickle-headers")

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requests.append(self.path)
        mode, _, name = self.path.strip("/").partition("/")
        known = ("good", "wrong", "hangup", "upstream", *self.hostile)
        if mode not in known or not (REAL / name).is_file():
            self.send_error(404)
            return
        if mode in self.hostile:
            try:
                self._hostile(mode, name)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client hung up on us: what a limit should do
            return
        if mode == "upstream":
            self._send(_upstream(name))
            return
        body = (REAL / name).read_bytes()
        if mode == "wrong":
            body = gzip.compress(b"these are not the files you are looking for", mtime=0)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "hangup" else body)
        self.close_connection = mode == "hangup"

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _hostile(self, mode: str, name: str) -> None:
        body = (REAL / name).read_bytes()
        if mode == "trickle-headers":
            self._trickle(b"HTTP/1.0 200 OK\r\nX-Slow: " + b"z" * 10_000)
        self.send_response(200)
        if mode == "oversized":
            self.send_header("Content-Length", str(RAW_GZ_BYTES[name] + 1))
        elif mode == "trickle-body":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "trickle-body":
            self._trickle(body)
        elif mode == "endless":
            junk = bytes(1 << 16)
            for _ in range(HOSTILE_BYTES // len(junk)):
                self.wfile.write(junk)
        else:
            self.wfile.write(body)

    def _trickle(self, data: bytes) -> None:
        give_up = time.monotonic() + HOSTILE_SECONDS
        for i in range(len(data)):
            if time.monotonic() > give_up:
                raise ConnectionResetError
            self.wfile.write(data[i : i + 1])
            time.sleep(0.02)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """Base URL of a real HTTP server in a thread; its request log is _Handler.requests."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _assert_verified(out: Path) -> None:
    assert _files(out) == sorted(NAMES)
    for name in NAMES:
        assert decompressed_sha256(out / name) == RAW_SHA256[name]


def test_damaged_local_copies_fall_back_to_the_next_source_per_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    truncated = (REAL / RAW_FILES["train_images"]).read_bytes()[:100_000]
    (damaged / RAW_FILES["train_images"]).write_bytes(truncated)
    (damaged / RAW_FILES["train_labels"]).write_bytes(gzip.compress(b"\x00\x00\x08\x01wrong"))
    shutil.copy(REAL / SMALL, damaged / SMALL)  # intact: taken from the first source
    # t10k-images is missing from the damaged folder.
    out = tmp_path / "raw"

    used = download_all([str(damaged), str(REAL)], out)

    assert used == [str(REAL), str(REAL), str(REAL), str(damaged)]
    _assert_verified(out)
    notes = capsys.readouterr().err
    assert "truncated gzip stream" in notes
    assert "checksum mismatch" in notes
    assert "no such file" in notes


def test_http_source_downloads_verified_files(server: str, tmp_path: Path) -> None:
    _Handler.requests.clear()
    used = download_all([f"{server}/good"], tmp_path / "raw", timeout=10)
    assert used == [f"{server}/good"] * 4
    assert sorted(_Handler.requests) == sorted(f"/good/{name}" for name in NAMES)
    _assert_verified(tmp_path / "raw")


def test_unreachable_url_falls_back_to_the_next_source(server: str, tmp_path: Path) -> None:
    closed = _closed_port_url()
    used = download_all([closed, f"{server}/good"], tmp_path / "raw", timeout=5)
    assert used == [f"{server}/good"] * 4
    _assert_verified(tmp_path / "raw")


@pytest.mark.parametrize(
    ("mode", "why"),
    [("wrong", "checksum mismatch"), ("missing", "HTTP 404"), ("hangup", "incomplete download")],
)
def test_failed_http_fetch_leaves_no_file(server: str, tmp_path: Path, mode: str, why: str) -> None:
    out = tmp_path / "raw"
    with pytest.raises(FmnistError, match=why) as exc:
        fetch_file(f"{server}/{mode}", SMALL, out / SMALL, timeout=5)
    assert "\n" not in str(exc.value)
    assert _files(out) == []


def test_failed_local_fetch_leaves_no_file(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / SMALL).write_bytes((REAL / SMALL).read_bytes()[:-9])  # gzip trailer cut off
    out = tmp_path / "raw"
    with pytest.raises(FmnistError, match="truncated gzip stream"):
        fetch_file(str(source), SMALL, out / SMALL, timeout=5)
    assert _files(out) == []


def test_a_gzip_inflating_past_the_known_size_is_refused_without_reading_it_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    # the real labels followed by 3 MiB of zeros (a few KiB of gzip)
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = packer.compress(gzip.decompress((REAL / SMALL).read_bytes()))
    body += b"".join(packer.compress(bytes(1 << 20)) for _ in range(3)) + packer.flush()
    (source / SMALL).write_bytes(body)
    read = []
    real_read = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read",
                        lambda self, n=-1: read.append(n) or real_read(self, n))
    out = tmp_path / "raw"
    with pytest.raises(FmnistError, match=r"decompresses to more than its known 10,008 bytes"):
        fetch_file(str(source), SMALL, out / SMALL, timeout=5)
    assert _files(out) == []
    assert len(read) <= 2  # stopped at the first chunk past the size, not after 3 MiB


@pytest.mark.parametrize("name", NAMES)
def test_known_decompressed_sizes_are_the_real_files_sizes(name: str) -> None:
    assert len(gzip.decompress((REAL / name).read_bytes())) == RAW_BYTES[name]


def test_every_source_failing_is_one_line_naming_each_source_and_why(
    server: str, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    closed = _closed_port_url()
    out = tmp_path / "raw"
    sources = [str(empty), closed, f"{server}/wrong"]
    with pytest.raises(FmnistError) as exc:
        download_all(sources, out, timeout=5)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(NAMES[0])
    assert f"{empty}: no such file" in message
    assert f"{closed}: unreachable" in message
    assert f"{server}/wrong: checksum mismatch" in message
    assert _files(out) == []


def test_download_stage_with_bad_sources_exits_1_with_one_line(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = copy.deepcopy(params)
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    closed = _closed_port_url()
    params["data"].update(sources=[str(empty), closed], timeout_s=5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    result = subprocess.run(
        [sys.executable, str(REPO / "stages" / "download.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("download: ")
    assert str(empty) in lines[0] and closed in lines[0]
    assert "Traceback" not in result.stderr
    assert _files(tmp_path / "data") == []


@contextmanager
def _measured_temp_files(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Sizes the download's temporary files had when each fetch ended (they are deleted after)."""
    sizes: list[int] = []
    real = fmnist.download.atomic_path

    @contextmanager
    def measured(dest: Path) -> Iterator[Path]:
        with real(dest) as tmp:
            try:
                yield tmp
            finally:
                sizes.append(tmp.stat().st_size if tmp.exists() else 0)

    monkeypatch.setattr(fmnist.download, "atomic_path", measured)
    yield sizes


def test_files_of_exactly_their_known_size_are_accepted(server: str, tmp_path: Path) -> None:
    used = download_all([f"{server}/upstream"], tmp_path / "raw", timeout=10)
    assert used == [f"{server}/upstream"] * 4
    for name in NAMES:
        assert (tmp_path / "raw" / name).stat().st_size == RAW_GZ_BYTES[name]
    _assert_verified(tmp_path / "raw")


def test_endless_source_is_cut_at_the_known_size_and_the_next_source_used(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    endless = f"{server}/endless"
    start = time.monotonic()
    with _measured_temp_files(monkeypatch) as sizes:
        used = download_all([endless, str(REAL)], tmp_path / "raw", timeout=5)

    assert time.monotonic() - start < 5
    assert used == [str(REAL)] * 4
    _assert_verified(tmp_path / "raw")
    endless_sizes = sizes[0::2]  # each file: the endless source first, then REAL
    assert all(size <= RAW_GZ_BYTES[name] for size, name in zip(endless_sizes, NAMES, strict=True))
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 4
    for name, note in zip(NAMES, notes, strict=True):
        assert note == (f"download: {name}: from {REAL} after "
                        f"{endless}: more than its known {RAW_GZ_BYTES[name]} bytes")


def test_oversized_content_length_is_refused_before_any_byte_is_written(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    oversized = f"{server}/oversized"
    with _measured_temp_files(monkeypatch) as sizes:
        used = download_all([oversized, str(REAL)], tmp_path / "raw", timeout=5)

    assert used == [str(REAL)] * 4
    _assert_verified(tmp_path / "raw")
    assert sizes[0::2] == [0, 0, 0, 0]
    notes = capsys.readouterr().err
    for name in NAMES:
        known = RAW_GZ_BYTES[name]
        assert f"{oversized}: announces {known + 1} bytes, more than its known {known}" in notes


@pytest.mark.parametrize("mode", ["trickle-body", "trickle-headers"])
def test_trickling_source_is_dropped_at_its_deadline_for_the_next_source(
    server: str, tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trickle = f"{server}/{mode}"
    start = time.monotonic()
    # A byte every 20 ms never trips the 5 s timeout per read; only the deadline ends it.
    used = download_all([trickle, str(REAL)], tmp_path / "raw", timeout=5, deadline=0.5)

    assert time.monotonic() - start < 4 * 0.5 + 2
    assert used == [str(REAL)] * 4
    _assert_verified(tmp_path / "raw")
    notes = capsys.readouterr().err.splitlines()
    assert [note.split(" after ", 1)[1] for note in notes] == [
        f"{trickle}: not complete within its 0.5 s deadline"
    ] * 4
    assert _files(tmp_path / "raw") == sorted(NAMES)  # no temporary file left behind
