"""Every stage, attacked the way machines fail: a full disk, a read-only checkout, Ctrl-C and
SIGTERM. Each must end with one line and its exit code, remove its temporary files, and leave
the previous outputs exactly as they were.

The stage scripts run for real on a slice of the real data in a project copy; the full disk is
a small tmpfs filled up, the read-only checkout a tmpfs remounted read-only (both need root's
mount; the tests skip without it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from project_files import deep_update, published_outputs

REPO = Path(__file__).resolve().parents[1]
DEBIAN_DATA = Path("/usr/share/datasets/fashion-mnist")
STAGES = ("download", "preprocess", "train", "tune", "evaluate", "export")
SLICE = {
    "data": {"sources": [str(DEBIAN_DATA)]},
    "preprocess": {"train_subset": 500},
    "train": {"epochs": 1, "batch_size": 128, "threads": 1},
    "tune": {"trials": 2, "epochs": 1, "train_subset": 200},
    "export": {"parity_samples": 50},
}
# What each stage writes; the full disk leaves room for about half of it, so that a write
# fails part-way (after the first files), not at the first byte.
OUTPUTS = {
    "download": ["data/raw"],
    "preprocess": ["data/prepared"],
    "train": ["models", "reports/train"],
    "tune": ["reports/tune"],
    "evaluate": ["reports/evaluate"],
    "export": ["export", "reports/export"],
}
TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(
    not DEBIAN_DATA.is_dir(),
    reason="needs the Debian package dataset-fashion-mnist (bash scripts/install.sh)",
)


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/fmnist-mount-probe-{uuid.uuid4().hex}")
    probe.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and mount (tmpfs)")


def _stage(cwd: Path, name: str, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, f"stages/{name}.py"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _run_stage(cwd: Path, name: str) -> tuple[int, str]:
    proc = _stage(cwd, name)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, err


def _size(root: Path, names: list[str]) -> int:
    return sum(p.stat().st_size for name in names for p in (root / name).rglob("*")
               if p.is_file())


def _leftovers(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.name.endswith(".tmp")]


def _assert_one_line_failure(name: str, err: str, expected: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{name}: ") and expected in last, err[-3000:]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy after one successful run of every stage on a slice of the data."""
    root = tmp_path_factory.mktemp("failures") / "project"
    shutil.copytree(REPO / "stages", root / "stages")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    deep_update(params, SLICE)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in STAGES:
        code, err = _run_stage(root, name)
        assert code == 0, f"{name}: {err[-3000:]}"
    return root


@contextmanager
def _tmpfs_copy(project: Path, *, free: int | None = None, read_only: bool = False
                ) -> Iterator[Path]:
    """The project (less checkpoints/) on its own tmpfs, then filled to `free` bytes or
    remounted read-only."""
    mount = Path(f"/tmp/fmnist-tmpfs-{uuid.uuid4().hex}")
    mount.mkdir()
    size = sum(p.stat().st_size for p in project.rglob("*") if p.is_file()) + (32 << 20)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                   check=True)
    try:
        copy = mount / "project"
        # Without its finished study, tune has a new one to write.
        shutil.copytree(project, copy, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
        if free is not None:
            _fill(mount / "filler", free)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield copy
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
        mount.rmdir()


def _fill(path: Path, free: int) -> None:
    """Write zeros until the disk is full, then give back what leaves `free` bytes free."""
    chunk = b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
    stats = os.statvfs(path.parent)
    available = stats.f_bavail * stats.f_frsize
    if free > available:
        os.truncate(path, path.stat().st_size - (free - available))


@needs_mount
@pytest.mark.parametrize("name", STAGES)
def test_full_disk_is_one_line_and_keeps_the_previous_outputs(project: Path, name: str) -> None:
    with _tmpfs_copy(project, free=_size(project, OUTPUTS[name]) // 2) as copy:
        before = published_outputs(copy)
        code, err = _run_stage(copy, name)
        assert code == 1, err[-3000:]
        assert _leftovers(copy) == []
        assert published_outputs(copy) == before
        _assert_one_line_failure(name, err, "No space left on device")


@needs_mount
@pytest.mark.parametrize("name", STAGES)
def test_read_only_checkout_is_one_line_and_changes_nothing(project: Path, name: str) -> None:
    with _tmpfs_copy(project, read_only=True) as copy:
        before = published_outputs(copy)
        code, err = _run_stage(copy, name)
        assert code == 1, err[-3000:]
        _assert_one_line_failure(name, err, "Read-only file system")
        assert published_outputs(copy) == before


def _new_temporary_file(root: Path, before: set[Path]) -> bool:
    """Work under way: a temporary file or folder that was not there before (any name a
    stage gives them ends in .tmp), or resume state (a training checkpoint, a tune study)."""
    return any(p not in before for p in root.rglob("*.tmp")) or any(
        p.is_file() for p in (root / "checkpoints").rglob("*"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(("name", "delay"), [
    ("download", 0.0),
    ("preprocess", 0.0),
    ("preprocess", 0.2),
    ("preprocess", 0.4),
    ("train", 0.0),
    ("tune", 0.5),
    ("evaluate", 0.2),
    ("export", 0.5),
])
def test_signal_ends_the_stage_with_its_code_and_leaves_the_previous_outputs(
    project: Path, tmp_path: Path, name: str, delay: float, signum: int
) -> None:
    copy = tmp_path / "project"
    shutil.copytree(project, copy, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
    if name in ("train", "tune"):  # long enough to be caught mid-way
        params = yaml.safe_load((copy / "params.yaml").read_text())
        params["train"]["epochs"] = 4
        params["tune"]["epochs"] = 4
        (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = published_outputs(copy)
    existing = set(copy.rglob("*.tmp"))
    proc = _stage(copy, name)
    deadline = time.monotonic() + TIMEOUT_S
    while not _new_temporary_file(copy, existing):
        assert proc.poll() is None, f"{name} ended before it wrote anything: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the stage to start writing"
        time.sleep(0.01)
    time.sleep(delay)
    assert proc.poll() is None, "the stage ended before the signal: make it longer"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert _leftovers(copy) == []
    assert published_outputs(copy) == before
    _assert_one_line_failure(name, err, f"interrupted ({signal.Signals(signum).name})")
