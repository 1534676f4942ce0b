"""The evaluate stage: batched inference, its output files, and DVC reading them for real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from project_files import write_prepared

from fmnist.accel import prepare_inference, select_backend
from fmnist.constants import CLASS_NAMES
from fmnist.data import Prepared, Split, load_prepared
from fmnist.errors import FmnistError
from fmnist.evaluate import (
    CONFUSION_PLOT,
    HEADLINE_METRICS,
    PER_CLASS_PLOT,
    ROC_PLOT,
    confusion_records,
    most_confident_mistakes,
    per_class_records,
    roc_records,
    run,
    top_confusions,
    write_records,
)
from fmnist.inference import predict_logits
from fmnist.loading import load_model
from fmnist.metrics import roc_curves, softmax
from fmnist.model import build_model
from fmnist.modelfile import save_model
from fmnist.params import load_params

REPO = Path(__file__).resolve().parents[1]
K = len(CLASS_NAMES)
TINY_MODEL = {"channels": [4], "convs_per_block": 1, "batch_norm": True, "dropout": 0.0,
              "hidden": 8}
FIGURES = ("roc.png", "confusion_matrix.png", "misclassified.png", "per_class.png")
GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY_MODEL)


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose brightness and a bright column depend on the label, so predictions vary."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % K
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, :, 2 + 2 * label] = 255
        images[i, 10:18, 10:18] += np.uint8(15 * label)
    return images, labels


def _write_prepared(root: Path) -> Path:
    """A prepared file under the project root `root`, as preprocess lays it out."""
    splits = {name: Split(*_images(n, seed))
              for name, n, seed in (("train", 40, 1), ("val", 20, 2), ("test", 120, 3))}
    return write_prepared(root, Prepared(**splits), seed=42, val_fraction=0.1)


def _params(**evaluate: int) -> dict:
    params = load_params(REPO / "params.yaml")
    params["evaluate"] = {**params["evaluate"], **evaluate}
    return params


@pytest.fixture
def stage_inputs(tmp_path: Path) -> tuple[Path, Path]:
    model_path = tmp_path / "models/model.pth"
    save_model(_tiny_model(), TINY_MODEL, model_path)
    return model_path, _write_prepared(tmp_path)


# --- inference ---------------------------------------------------------------------------


def test_predict_logits_does_not_depend_on_batch_size() -> None:
    model, (images, _) = _tiny_model(), _images(50)
    one_batch = predict_logits(model, images, batch_size=1000)
    small_batches = predict_logits(model, images, batch_size=7)
    assert one_batch.shape == (50, K) and one_batch.dtype == np.float32
    np.testing.assert_allclose(small_batches, one_batch, rtol=1e-5, atol=1e-5)


def test_predict_logits_uses_eval_mode_and_restores_training_mode() -> None:
    model = _tiny_model()
    model.train()
    images, _ = _images(20)
    first = predict_logits(model, images, batch_size=8)
    second = predict_logits(model, images, batch_size=8)
    assert model.training
    # In train mode, batch norm would use batch statistics and batches of 8 would differ.
    np.testing.assert_array_equal(first, second)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(images).float().unsqueeze(1)).numpy()
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)


def test_bf16_backend_gives_float32_logits_close_to_float32_ones() -> None:
    model, (images, _) = _tiny_model(), _images(30)
    backend = select_backend({"enabled": False, "dtype": "bfloat16"})
    bf16 = predict_logits(prepare_inference(model, backend), images, batch_size=16,
                          backend=backend)
    fp32 = predict_logits(model, images, batch_size=16)
    assert bf16.dtype == np.float32
    assert not np.array_equal(bf16, fp32)  # autocast really ran
    np.testing.assert_allclose(bf16, fp32, atol=0.1)


def test_predict_logits_rejects_normalized_float_images() -> None:
    with pytest.raises(FmnistError, match="uint8"):
        predict_logits(_tiny_model(), np.zeros((2, 28, 28), np.float32), batch_size=2)
    with pytest.raises(FmnistError, match="shape"):
        predict_logits(_tiny_model(), np.zeros((2, 1, 28, 28), np.uint8), batch_size=2)


# --- small helpers -------------------------------------------------------------------------


def test_most_confident_mistakes_come_first_and_correct_ones_never() -> None:
    y = np.array([0, 1, 2, 3])
    probs = np.full((4, K), 0.0)
    probs[0, 5], probs[0, 0] = 0.6, 0.4  # wrong at 0.6
    probs[1, 1] = 1.0  # right
    probs[2, 7], probs[2, 2] = 0.9, 0.1  # wrong at 0.9
    probs[3, 4], probs[3, 3] = 0.6, 0.4  # wrong at 0.6, later index
    assert most_confident_mistakes(y, probs, 10).tolist() == [2, 0, 3]
    assert most_confident_mistakes(y, probs, 1).tolist() == [2]


def test_top_confusions_are_largest_off_diagonal_cells() -> None:
    counts = np.diag(np.full(K, 50))
    counts[6, 0], counts[0, 6], counts[4, 2] = 9, 4, 7
    assert top_confusions(counts, CLASS_NAMES, 2) == [("Shirt", "T-shirt/top", 9),
                                                     ("Coat", "Pullover", 7)]


def test_plot_rows_have_the_declared_fields_and_no_thresholds() -> None:
    y = np.arange(40) % K
    probs = softmax(np.random.default_rng(0).normal(size=(40, K)))
    roc = roc_records(roc_curves(y, probs, CLASS_NAMES))
    assert {tuple(sorted(row)) for row in roc} == {("class", "fpr", "tpr")}
    assert {row["class"] for row in roc} == set(CLASS_NAMES)
    confusion = confusion_records(y, probs.argmax(axis=1), CLASS_NAMES)
    assert len(confusion) == 40
    assert confusion[0] == {"actual": "T-shirt/top", "predicted": CLASS_NAMES[probs[0].argmax()]}


# --- the whole stage -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_metrics_are_those_of_the_float32_model_that_export_ships(
    tmp_path: Path, stage_inputs: tuple[Path, Path], dtype: str
) -> None:
    model_path, data_path = stage_inputs
    # as the train stage records it
    save_model(_tiny_model(), TINY_MODEL, model_path,
               extra={"training": {"backend": {"dtype": dtype}}})
    params = _params(flip_tta=False)
    out = tmp_path / "reports/evaluate"
    saved = run(params, model_path=model_path, data_path=data_path, out_dir=out).metrics

    test = load_prepared(data_path).test
    fp32 = predict_logits(load_model(model_path), test.images, batch_size=1000).argmax(1)
    assert saved["accuracy"] == round(float(np.mean(fp32 == test.labels)), 6)
    assert saved["backend"]["dtype"] == "float32"
    if dtype == "float32":
        assert "bfloat16_inference" not in saved
        return
    bf16 = saved["bfloat16_inference"]
    assert 0 <= bf16["predictions_differ"] <= saved["n_samples"]
    assert isinstance(bf16["predictions_differ"], int)
    assert "bfloat16 autocast" in (out / "report.md").read_text()


def test_flip_tta_scores_the_mean_of_image_and_mirror(
    tmp_path: Path, stage_inputs: tuple[Path, Path]
) -> None:
    model_path, data_path = stage_inputs
    test = load_prepared(data_path).test
    plain = load_model(model_path)
    logits = predict_logits(plain, test.images, batch_size=1000)
    mirrored = predict_logits(plain, np.ascontiguousarray(test.images[:, :, ::-1]),
                              batch_size=1000)
    expected = float(np.mean((logits + mirrored).argmax(1) == test.labels))
    saved = run(_params(flip_tta=True), model_path=model_path, data_path=data_path,
                out_dir=tmp_path / "out").metrics
    assert saved["accuracy"] == round(expected, 6)


def test_run_writes_every_output_with_all_metric_keys(
    tmp_path: Path, stage_inputs: tuple[Path, Path]
) -> None:
    model_path, data_path = stage_inputs
    out = tmp_path / "reports/evaluate"
    evaluation = run(_params(misclassified_shown=9), model_path=model_path, data_path=data_path,
                     out_dir=out)

    # metrics.json: the headline numbers only (what `dvc exp show` lists), all floats.
    saved = json.loads((out / "metrics.json").read_text())
    assert list(saved) == sorted(HEADLINE_METRICS)
    assert all(isinstance(value, float) for value in saved.values())
    assert saved == {key: evaluation.metrics[key] for key in HEADLINE_METRICS}
    # run.json: every other summary number and the backend strings, no per-class rows.
    details = json.loads((out / "run.json").read_text())
    for key in ("top2_accuracy", "precision_weighted", "recall_weighted", "f1_weighted"):
        assert isinstance(details[key], float), key
    assert details["n_samples"] == 120 and details["backend"]["dtype"] == "float32"
    assert "per_class" not in details and not set(details) & set(saved)
    # the temperature fitted on the validation split, for export to ship
    calibration_file = json.loads((out / "calibration.json").read_text())
    assert calibration_file["temperature"] == details["temperature"] > 0
    assert saved["ece_calibrated"] <= saved["ece"] + 0.05
    assert not any("second" in key or "per_s" in key for key in _flat_keys(details))
    # per-class numbers: a DVC plot, one row per class in class order.
    rows = json.loads((out / PER_CLASS_PLOT).read_text())
    assert [row["class"] for row in rows] == list(CLASS_NAMES)
    assert set(rows[0]) == {"class", "precision", "recall", "f1", "iou", "auc", "support"}
    assert rows[0]["f1"] == evaluation.metrics["per_class"][CLASS_NAMES[0]]["f1"]

    roc = json.loads((out / ROC_PLOT).read_text())
    assert {row["class"] for row in roc} == set(CLASS_NAMES)
    assert len(json.loads((out / CONFUSION_PLOT).read_text())) == 120
    for name in FIGURES:
        with Image.open(out / "figures" / name) as image:
            assert image.format == "PNG" and image.width > 300
    report = (out / "report.md").read_text()
    assert "| Shirt |" in report and "T-shirt/top" in report
    assert f"{saved['accuracy']:.4f}" in report
    assert not list(out.rglob("*.tmp"))


def test_identical_runs_write_identical_bytes(
    tmp_path: Path, stage_inputs: tuple[Path, Path]
) -> None:
    model_path, data_path = stage_inputs
    files = ("metrics.json", "run.json", "report.md", ROC_PLOT, CONFUSION_PLOT, PER_CLASS_PLOT,
             *(f"figures/{name}" for name in FIGURES))
    written = []
    for name in ("a", "b"):
        run(_params(), model_path=model_path, data_path=data_path, out_dir=tmp_path / name)
        written.append({f: (tmp_path / name / f).read_bytes() for f in files})
    assert written[0] == written[1]


def test_stage_script_fails_in_one_line_without_a_model(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    _write_prepared(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages/evaluate.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: ") and "model.pth" in lines[0]


# --- DVC reads the files -------------------------------------------------------------------


def _dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A git + DVC repository whose dvc.yaml declares evaluate's plots as the project does."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _dvc(repo, "git", "init", "-q")
    _dvc(repo, "git", "commit", "-q", "--allow-empty", "-m", "initial")
    _dvc(repo, "dvc", "init", "-q")
    _dvc(repo, "dvc", "config", "core.analytics", "false")
    (repo / ".dvc/plots").mkdir()
    shutil.copy(REPO / ".dvc/plots/roc_by_class.json", repo / ".dvc/plots/roc_by_class.json")
    # Top-level metrics and plots take the stage's paths and plot settings, not `cache`.
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]
    metrics = [next(iter(entry)) for entry in stage["metrics"]]
    plots = [
        {path: {k: v for k, v in settings.items() if k not in ("cache", "persist")}}
        for entry in stage["plots"]
        for path, settings in entry.items()
    ]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"metrics": metrics, "plots": plots}))
    return repo


def test_dvc_renders_roc_by_class_and_confusion_plots(dvc_repo: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.arange(300) % K
    logits = rng.normal(size=(300, K))
    logits[np.arange(300), y] += 2
    probs = softmax(logits)
    out = dvc_repo / "reports/evaluate"
    write_records(out / ROC_PLOT, roc_records(roc_curves(y, probs, CLASS_NAMES)))
    write_records(out / CONFUSION_PLOT, confusion_records(y, probs.argmax(axis=1), CLASS_NAMES))
    per_class = {name: {"precision": 0.9, "recall": 0.8, "f1": 0.5 + i / 20, "iou": 0.7,
                        "auc": 0.99, "support": 30} for i, name in enumerate(CLASS_NAMES)}
    write_records(out / PER_CLASS_PLOT, per_class_records(per_class))

    shown = json.loads(_dvc(dvc_repo, "dvc", "plots", "show", "--json"))
    assert not shown.get("errors"), shown.get("errors")
    roc = shown["data"]["reports/evaluate/plots/roc.json"][0]
    confusion = shown["data"]["reports/evaluate/plots/confusion.json"][0]
    roc_spec = json.dumps(roc["content"])
    assert '"field": "class"' in roc_spec and '"field": "rev"' in roc_spec
    assert "<DVC_METRIC" not in roc_spec  # every anchor of the template was filled
    data = roc["content"]["data"]["values"]
    assert {row["class"] for row in data} == set(CLASS_NAMES)
    assert {"fpr", "tpr", "class", "rev"} <= set(data[0])
    assert '"field": "actual"' in json.dumps(confusion["content"])
    bars = shown["data"]["reports/evaluate/plots/per_class.json"][0]["content"]
    assert {row["class"] for row in bars["data"]["values"]} == set(CLASS_NAMES)  # slashes kept

    _dvc(dvc_repo, "dvc", "plots", "show", "-o", "html")
    html = (dvc_repo / "html/index.html").read_text()
    assert "ROC, one-vs-rest per class" in html and "Confusion matrix" in html
    assert '"class": "Ankle boot"' in html


def _flat_keys(value: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, item in value.items():
        keys.append(prefix + key)
        if isinstance(item, dict):
            keys += _flat_keys(item, f"{prefix}{key}.")
    return keys
