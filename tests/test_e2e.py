"""The whole pipeline for real: DVC commands in a new git repository, on a slice of real data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml
from project_files import deep_update, published_outputs
from test_plots_browser import CHROMIUM, browser_dom, drawn_plots, plot_ids

from fmnist.constants import PREPARED_FILE

REPO = Path(__file__).resolve().parents[1]
DEBIAN_DATA = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not DEBIAN_DATA.is_dir(),
        reason="needs the Debian package dataset-fashion-mnist (bash scripts/install.sh)",
    ),
]

GIT_ENV = {
    "GIT_AUTHOR_NAME": "e2e",
    "GIT_AUTHOR_EMAIL": "e2e@example.invalid",
    "GIT_COMMITTER_NAME": "e2e",
    "GIT_COMMITTER_EMAIL": "e2e@example.invalid",
}

SMALL_SLICE = {
    "data": {"sources": [str(DEBIAN_DATA)]},
    "preprocess": {"train_subset": 2000},
    "train": {"epochs": 1, "batch_size": 128},
    "tune": {"trials": 2, "epochs": 1, "train_subset": 500},
    "export": {"parity_samples": 200},
}


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ENV, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    # Stage commands say `python`: make it the interpreter running the tests.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


# Made by scripts/install.sh, ignored by git, needed by the pipeline's `dvc plots`.
GENERATED_FILES = ["scripts/plots/offline.html"]


def _project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a commit of the work tree would hold."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    return [name for name in out.split("\0") if name and (REPO / name).is_file()]


def _ran_stages(output: str) -> set[str]:
    return {
        stage
        for stage in ("download", "preprocess", "train", "tune", "evaluate", "export")
        if f"Running stage '{stage}'" in output
    }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project in a new git repository, after a first complete `dvc repro`."""
    repo = tmp_path_factory.mktemp("e2e") / "project"
    for name in [*_project_files(), *GENERATED_FILES]:
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    deep_update(params, SMALL_SLICE)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(repo, "git", "init", "-q", "-b", "main")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "project")  # dvclive and `dvc exp` need a commit

    first = _run(repo, "dvc", "repro")
    assert _ran_stages(first.stdout) == {
        "download", "preprocess", "train", "tune", "evaluate", "export"
    }
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "baseline")
    return repo


def test_repro_prepares_the_requested_slice(pipeline: Path) -> None:
    with h5py.File(pipeline / PREPARED_FILE) as prepared:
        sizes = {split: len(prepared[split]["labels"]) for split in ("train", "val", "test")}
    assert sizes == {"train": 2000, "val": 6000, "test": 10000}


def test_repro_writes_every_declared_output(pipeline: Path) -> None:
    for path in [
        "models/model.pth",
        "reports/train/metrics.json",
        "reports/evaluate/metrics.json",
        "reports/evaluate/report.md",
        "reports/evaluate/figures/roc.png",
        "reports/tune/best_params.yaml",
        "reports/tune/metrics.json",
        "export/model.pth",
        "export/weights.h5",
        "export/model.pt2",
        "reports/export/parity.json",
    ]:
        assert (pipeline / path).is_file(), path
    export = json.loads((pipeline / "reports/export/parity.json").read_text())
    assert export["parity_ok"] in (True, 1)


def test_git_add_all_commits_no_data_or_models(pipeline: Path) -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=pipeline, capture_output=True, text=True, check=True
    ).stdout.split()
    heavy = [
        name for name in tracked
        if name.startswith(("data/", "models/", "export/", "checkpoints/"))
        and not name.endswith(".gitignore")
    ]
    assert heavy == []
    assert not [name for name in tracked if name.endswith(".png")]


def test_second_repro_changes_nothing(pipeline: Path) -> None:
    again = _run(pipeline, "dvc", "repro")
    assert _ran_stages(again.stdout) == set()
    status = _run(pipeline, "dvc", "status")
    assert "up to date" in status.stdout


QUALITY_FILES = ("reports/train/metrics.json", "reports/evaluate/metrics.json",
                 "reports/export/parity.json")
TIMING_FILES = ("reports/train/timing.json",)


def test_forced_rerun_gives_byte_identical_quality_metrics(pipeline: Path) -> None:
    before = {name: (pipeline / name).read_bytes() for name in QUALITY_FILES}
    _run(pipeline, "dvc", "repro", "--force", "train", "evaluate", "export")
    after = {name: (pipeline / name).read_bytes() for name in QUALITY_FILES}
    assert after == before
    # Only the timing files may differ: no quality metric changes between identical runs.
    changed = json.loads(_run(pipeline, "dvc", "metrics", "diff", "--json").stdout or "{}")
    assert set(changed) <= set(TIMING_FILES), changed


def test_killed_repro_leaves_no_trusted_half_result_and_next_repro_completes(
    pipeline: Path,
) -> None:
    env = {**os.environ, **GIT_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ['PATH']}"}
    # Three epochs, so that the kill surely lands mid-training: after epoch 1's checkpoint.
    params_file = pipeline / "params.yaml"
    committed = params_file.read_text()
    longer = yaml.safe_load(committed)
    longer["train"]["epochs"] = 3
    params_file.write_text(yaml.safe_dump(longer, sort_keys=False))
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=pipeline, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    checkpoint = pipeline / "checkpoints" / "train.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage it runs, mid-training
    proc.wait()
    params_file.write_text(committed)
    # The previous model or none, never a partial one (a hidden temporary file may remain).
    leftovers = [p.name for p in (pipeline / "models").glob("*") if not p.name.startswith(".")]
    assert leftovers in ([], ["model.pth"])
    if leftovers:
        _run(pipeline, sys.executable, "-c", "import fmnist; fmnist.load_model('models/model.pth')")
    _run(pipeline, "dvc", "repro")
    assert "up to date" in _run(pipeline, "dvc", "status").stdout
    after = {name: (pipeline / name).read_bytes() for name in QUALITY_FILES[:2]}
    assert after == {name: _git_show(pipeline, name) for name in QUALITY_FILES[:2]}


def _git_show(repo: Path, name: str) -> bytes:
    return subprocess.run(["git", "show", f"HEAD:{name}"], cwd=repo, capture_output=True,
                          check=True).stdout


def test_exp_run_with_new_rho_reruns_only_downstream_and_diff_shows_it(pipeline: Path) -> None:
    exp = _run(pipeline, "dvc", "exp", "run", "-S", "train.rho=0.1")
    assert _ran_stages(exp.stdout) == {"train", "evaluate", "export"}
    diff = _run(pipeline, "dvc", "metrics", "diff")
    assert "reports/evaluate/metrics.json" in diff.stdout
    params_diff = _run(pipeline, "dvc", "params", "diff")
    assert "train.rho" in params_diff.stdout


def test_failed_repro_keeps_every_previous_output(pipeline: Path, tmp_path: Path) -> None:
    """DVC deletes a stage's outputs before running it unless they are `persist: true`; the
    stages then publish all or nothing, so a failure leaves the last good result."""
    params_file = pipeline / "params.yaml"
    committed = params_file.read_text()
    before = published_outputs(pipeline)

    def edited(section: str, key: str, value: object) -> str:
        params = yaml.safe_load(committed)
        params[section][key] = value
        return yaml.safe_dump(params, sort_keys=False)

    cases = [  # (params.yaml, command, the stage that must still show as changed)
        (edited("train", "rho", -1), ("dvc", "repro", "train"), "train"),
        (edited("data", "sources", [str(tmp_path / "nowhere")]), ("dvc", "repro", "download"),
         "download"),
        ("", ("dvc", "repro", "preprocess"), None),
    ]
    env = {**os.environ, **GIT_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ['PATH']}"}
    try:
        for text, command, stage in cases:
            params_file.write_text(text)
            proc = subprocess.run(command, cwd=pipeline, env=env, capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode != 0, (text, proc.stdout)
            assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
            assert published_outputs(pipeline) == before, f"{' '.join(command)} changed outputs"
            if stage is not None:
                assert f"{stage}:" in _run(pipeline, "dvc", "status", stage).stdout
    finally:
        params_file.write_text(committed)
    assert "up to date" in _run(pipeline, "dvc", "status").stdout


def test_exp_show_lists_at_most_15_metrics_all_numbers(pipeline: Path) -> None:
    shown = json.loads(_run(pipeline, "dvc", "exp", "show", "--json").stdout)
    files = shown[0]["data"]["metrics"]
    leaves = {}
    for path, content in files.items():
        stack = [(path, content["data"])]
        while stack:
            prefix, value = stack.pop()
            if isinstance(value, dict):
                stack += [(f"{prefix}:{key}", item) for key, item in value.items()]
            else:
                leaves[prefix] = value
    assert 8 <= len(leaves) <= 15, sorted(leaves)
    strings = {k: v for k, v in leaves.items() if not isinstance(v, (int, float))
               or isinstance(v, bool)}
    assert strings == {}


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: scripts/install.sh --test installs it")
@pytest.mark.skipif(not (REPO / GENERATED_FILES[0]).is_file(),
                    reason="no offline plot template: run scripts/install.sh")
@pytest.mark.parametrize("command", [("show",), ("diff", "HEAD")], ids=["show", "diff"])
def test_every_pipeline_plot_draws_offline_in_a_browser(
    pipeline: Path, tmp_path: Path, command: tuple[str, ...]
) -> None:
    out = tmp_path / "dvc_plots"
    _run(pipeline, "dvc", "plots", *command, "-o", str(out))
    page = out / "index.html"
    ids = plot_ids(page)
    assert len(ids) >= 10, ids  # roc, confusion, per-class, 4 training curves, 3 tune plots
    assert drawn_plots(browser_dom(page, tmp_path / "profile"), ids) == ids


def test_plots_show_renders_roc_and_confusion(pipeline: Path) -> None:
    _run(pipeline, "dvc", "plots", "show", "-o", "dvc_plots")
    html = (pipeline / "dvc_plots" / "index.html").read_text()
    # One element per plot, named by its file (dots become underscores), with its data.
    assert "reports_evaluate_plots_roc_json" in html and '"fpr"' in html and '"class"' in html
    assert "reports_evaluate_plots_confusion_json" in html and '"actual"' in html
