"""Download: the first source with an intact copy wins, per file; failures are one clear line.

Sources are built from the real files (checksums in constants are the real ones): local folders
with damaged copies, and a real HTTP server on 127.0.0.1 serving the real .gz files.
"""

from __future__ import annotations

import copy
import gzip
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from fmnist.constants import RAW_FILES, RAW_SHA256
from fmnist.download import decompressed_sha256, download_all, fetch_file
from fmnist.errors import FmnistError

REPO = Path(__file__).resolve().parents[1]
REAL = Path("/usr/share/datasets/fashion-mnist")
NAMES = list(RAW_FILES.values())
SMALL = RAW_FILES["test_labels"]

pytestmark = pytest.mark.skipif(
    not all((REAL / name).is_file() for name in NAMES),
    reason=f"the real Fashion-MNIST files are not in {REAL}",
)


class _Handler(BaseHTTPRequestHandler):
    """GET /<mode>/<name>: good (the real file), wrong (other content), hangup (cut short)."""

    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requests.append(self.path)
        mode, _, name = self.path.strip("/").partition("/")
        if mode not in ("good", "wrong", "hangup") or not (REAL / name).is_file():
            self.send_error(404)
            return
        body = (REAL / name).read_bytes()
        if mode == "wrong":
            body = gzip.compress(b"these are not the files you are looking for", mtime=0)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (1000 if mode == "hangup" else 0)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if mode == "hangup" else body)
        self.close_connection = mode == "hangup"

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
