"""A stage script (and `fmnist tune-worker` and `fmnist predict`) handles Ctrl-C and SIGTERM
from its first statement: a signal while it still imports torch (seconds) ends it with its one
line and the shell's exit code, and only when it runs as a script (a spawned tune worker or a
test that imports it keeps its own handlers)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmnist import signals
from fmnist.stage import run_stage

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "preprocess", "train", "tune", "evaluate", "export")
TIMEOUT_S = 120


def _maps_torch(pid: int) -> bool:
    """The process has begun importing torch (Linux: a libtorch library is mapped)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # it has already ended
        return False


# id: (stage name in its messages, arguments); `fmnist tune-worker` is the tune stage elsewhere
COMMANDS = {
    "train": ("train", ["stages/train.py"]),
    "evaluate": ("evaluate", ["stages/evaluate.py"]),
    "export": ("export", ["stages/export.py"]),
    "tune-worker": ("tune", ["-m", "fmnist.cli", "tune-worker"]),
    # not a stage: it writes nothing, and without export/ it would end with exit code 2
    "predict": ("fmnist predict", ["-m", "fmnist.cli", "predict", "shirt.png"]),
}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/PID/maps")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_signal_while_the_stage_still_imports_torch_is_one_line(
    tmp_path: Path, command: str, signum: int
) -> None:
    # no params.yaml here: a stage that got past its imports fails with exit code 2, not 130
    name, args = COMMANDS[command]
    shutil.copytree(REPO / "stages", tmp_path / "stages")
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not _maps_torch(proc.pid):  # torch's import takes about a second after this
            assert proc.poll() is None, f"{name} ended before importing torch: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "timed out waiting for the stage to import torch"
            time.sleep(0.001)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines() == [f"{name}: interrupted ({signal.Signals(signum).name})"]


@pytest.mark.usefixtures("signal_state_restored")
@pytest.mark.parametrize("name", STAGES)
def test_a_stage_imported_as_a_module_leaves_the_signal_handlers_alone(name: str) -> None:
    # multiprocessing's spawn runs a worker's main script as __mp_main__ (tune.workers > 1)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    spec = importlib.util.spec_from_file_location("__mp_main__", REPO / "stages" / f"{name}.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert {signum: signal.getsignal(signum) for signum in before} == before


@pytest.mark.usefixtures("signal_state_restored")
def test_a_signal_whose_exit_was_swallowed_during_the_imports_still_stops_the_stage(
    capsys: pytest.CaptureFixture,
) -> None:
    """A finalizer that swallows the import-time SystemExit: the signal is recorded, and
    run_stage stops before it reads params.yaml or starts the work."""
    started: list[dict] = []
    signals.handle_signals_while_importing("probe")
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs at the next bytecode; never reached
    except SystemExit as exc:  # what a finalizer would swallow
        assert exc.code == 128 + signal.SIGTERM
    assert signals.received() == signal.SIGTERM
    with pytest.raises(SystemExit) as exit_info:
        run_stage("probe", started.append)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert started == []
    assert capsys.readouterr().err.strip().splitlines()[-1] == "probe: interrupted (SIGTERM)"
