"""Publishing outputs all or nothing: staged beside their targets, renamed in together,
rolled back on failure, recovered after a kill, never interrupted by a signal half-way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist import atomic, signals
from fmnist.atomic import publish_dir, publishing
from fmnist.errors import FmnistError


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _old_outputs(root: Path) -> None:
    (root / "reports").mkdir(parents=True)
    (root / "reports" / "metrics.json").write_text("old")
    (root / "model.pth").write_text("old model")


def test_folder_and_file_are_published_together(tmp_path: Path) -> None:
    _old_outputs(tmp_path)
    with publishing() as outputs:
        (outputs.folder(tmp_path / "reports") / "metrics.json").write_text("new")
        outputs.file(tmp_path / "model.pth").write_text("new model")
        assert _tree(tmp_path)["model.pth"] == "old model"  # nothing moves before the end
    assert _tree(tmp_path) == {"model.pth": "new model", "reports/metrics.json": "new"}


def test_a_failure_in_the_block_publishes_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    _old_outputs(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(FmnistError, match="refused"), publishing() as outputs:
        (outputs.folder(tmp_path / "reports") / "metrics.json").write_text("new")
        outputs.file(tmp_path / "model.pth").write_text("new model")
        raise FmnistError("refused")
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "reports"]


def test_a_failed_rename_mid_commit_rolls_the_first_ones_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _old_outputs(tmp_path)
    before = _tree(tmp_path)
    real_replace = os.replace
    calls = []

    def failing_replace(src: str | Path, dst: str | Path) -> None:
        calls.append((Path(src).name, Path(dst).name))
        if Path(dst) == tmp_path / "model.pth" and ".old." not in Path(src).name:
            raise OSError(28, "No space left on device", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(FmnistError, match="model.pth: cannot write: No space left on device"):
        with publishing() as outputs:
            (outputs.folder(tmp_path / "reports") / "metrics.json").write_text("new")
            outputs.file(tmp_path / "model.pth").write_text("new model")
    monkeypatch.undo()
    assert _tree(tmp_path) == before  # reports/ was renamed in, then back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "reports"]
    assert any(dst == "reports" for _, dst in calls)


def test_a_target_moved_aside_by_a_killed_commit_is_restored(tmp_path: Path) -> None:
    (tmp_path / ".reports.999999999.old.tmp").mkdir()  # no such process: it was killed
    (tmp_path / ".reports.999999999.old.tmp" / "metrics.json").write_text("last good")
    (tmp_path / ".reports.999999999.x1y2.tmp").mkdir()  # its staging, half-written
    with pytest.raises(FmnistError), publish_dir(tmp_path / "reports"):
        raise FmnistError("this run fails too")
    assert _tree(tmp_path) == {"reports/metrics.json": "last good"}


def test_a_live_process_staging_is_left_alone(tmp_path: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".reports.{other.pid}.abcd.tmp"
        live.mkdir()
        with publish_dir(tmp_path / "reports") as staging:
            (staging / "a.json").write_text("{}")
        assert live.is_dir()
    finally:
        other.kill()
        other.wait()


def test_hidden_files_the_stage_did_not_write_stay(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / ".gitignore").write_text("/figures\n")  # DVC's, for a cached out
    (tmp_path / "reports" / "stale.json").write_text("{}")
    with publish_dir(tmp_path / "reports") as staging:
        (staging / "metrics.json").write_text("{}")
    assert _tree(tmp_path / "reports") == {".gitignore": "/figures\n", "metrics.json": "{}"}


def test_a_signal_during_the_commit_waits_until_every_rename_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _old_outputs(tmp_path)
    signals.install()
    real_replace = os.replace
    sent = []

    def replace_then_signal(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        if not sent:  # after the very first rename of the commit
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        with pytest.raises(signals.Interrupted) as raised, publishing() as outputs:
            (outputs.folder(tmp_path / "reports") / "metrics.json").write_text("new")
            outputs.file(tmp_path / "model.pth").write_text("new model")
            monkeypatch.setattr(atomic.os, "replace", replace_then_signal)
        assert raised.value.signum == signal.SIGTERM
    finally:
        monkeypatch.undo()
        signals.reset()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # the commit finished before the signal was raised: all new, nothing aside
    assert _tree(tmp_path) == {"model.pth": "new model", "reports/metrics.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "reports"]


def test_a_signal_before_the_commit_publishes_nothing(tmp_path: Path) -> None:
    _old_outputs(tmp_path)
    before = _tree(tmp_path)
    signals.install()
    try:
        with pytest.raises(signals.Interrupted), publishing() as outputs:
            (outputs.folder(tmp_path / "reports") / "metrics.json").write_text("new")
            try:
                os.kill(os.getpid(), signal.SIGINT)
            except signals.Interrupted:
                pass  # swallowed, as h5py's finalizers do
    finally:
        signals.reset()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert _tree(tmp_path) == before
