"""Evaluate the trained model on the test split: metrics, DVC plot data, figures and a report.

`evaluate_model` is pure (model and arrays in, an `Evaluation` out); `write_outputs` turns an
evaluation into the stage's files; `run` wires both to the pipeline's paths and params.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fmnist import calibration, figures, metrics, report
from fmnist.accel import (
    BFLOAT16_CPU,
    FLOAT32_CPU,
    Backend,
    backend_description,
    dtype_name,
    prepare_inference,
)
from fmnist.atomic import publish_dir, write_json, write_text
from fmnist.constants import CALIBRATION_FILE, EVALUATE_DIR, MODEL_FILE, PREPARED_FILE
from fmnist.data import Split, load_prepared
from fmnist.errors import FmnistError
from fmnist.inference import predict_logits
from fmnist.model import shipped_config
from fmnist.modelfile import model_from_payload, read_model_file

# Inside the output folder; dvc.yaml declares the same paths.
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
REPORT_FILE = "report.md"
ROC_PLOT = "plots/roc.json"
CONFUSION_PLOT = "plots/confusion.json"
PER_CLASS_PLOT = "plots/per_class.json"
# The numbers a reviewer compares run to run (`dvc exp show`, `dvc metrics diff`); everything
# else (weighted variants, per-class rows, backend strings) goes to run.json and the plots.
HEADLINE_METRICS = (
    "accuracy", "precision_macro", "recall_macro", "f1_macro", "iou_mean", "auc_macro", "ece",
    "ece_calibrated", "log_loss",
)
FIGURES_DIR = "figures"
TOP_CONFUSIONS = 5


@dataclass(frozen=True)
class Evaluation:
    """Everything the outputs are made from; `metrics` is what metrics.json holds (rounded)."""

    metrics: dict[str, Any]
    images: np.ndarray  # uint8 (N, 28, 28)
    y_true: np.ndarray  # int64 (N,)
    probs: np.ndarray  # float64 (N, K), rows sum to 1
    class_names: tuple[str, ...]
    backend_label: str

    @property
    def y_pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def evaluate_model(
    model: nn.Module,
    test: Split,
    class_names: Sequence[str],
    *,
    batch_size: int,
    calibration_bins: int,
    backend: Backend | None = None,
    reduced: tuple[Backend, np.ndarray] | None = None,
    temperature: float = 1.0,
) -> Evaluation:
    """Predict the split in batches and compute every metric; the backend is recorded too.

    `temperature` (fitted on the validation split, see fmnist.calibration) adds the test ECE
    and log loss of softmax(logits / temperature) beside the uncalibrated ones.

    `reduced`: (backend, logits) of the same model in a reduced precision (bf16 autocast, as in
    training), reported beside the main metrics as its accuracy and how many predictions differ.
    """
    logits = predict_logits(model, test.images, batch_size=batch_size, backend=backend)
    probs = metrics.softmax(logits)
    values = metrics.classification_metrics(
        test.labels, probs, class_names, calibration_bins=calibration_bins
    )
    calibrated = metrics.softmax(logits / temperature)
    values["temperature"] = temperature
    values["ece_calibrated"] = metrics.expected_calibration_error(
        np.asarray(test.labels), calibrated, bins=calibration_bins
    )
    values["log_loss_calibrated"] = calibration.nll(logits, test.labels, temperature)
    if backend is not None:
        values["backend"] = backend_description(backend)
    if reduced is not None:
        other, other_logits = reduced
        predicted = other_logits.argmax(axis=1)
        values[f"{dtype_name(other.dtype)}_inference"] = {
            "accuracy": float(np.mean(predicted == np.asarray(test.labels))),
            "predictions_differ": int(np.sum(predicted != probs.argmax(axis=1))),
        }
    return Evaluation(
        metrics=metrics.rounded(values),
        images=test.images,
        y_true=np.asarray(test.labels, dtype=np.int64),
        probs=probs,
        class_names=tuple(class_names),
        backend_label=_backend_label(backend),
    )


def run(
    params: dict[str, Any],
    *,
    model_path: str | Path = MODEL_FILE,
    data_path: str | Path = PREPARED_FILE,
    out_dir: str | Path = EVALUATE_DIR,
) -> Evaluation:
    """The evaluate stage: load model and test split, evaluate, publish all outputs as out_dir.

    The metrics are those of the float32 model that export ships (with evaluate.flip_tta).
    When the model file says training ran in bf16, the same model under native bf16 autocast
    is scored beside it. Reads params `evaluate` only.
    """
    settings = params["evaluate"]
    data = load_prepared(data_path)
    payload = read_model_file(model_path)  # torch.load(weights_only=True), validated
    payload["model_config"] = shipped_config(payload["model_config"], settings["flip_tta"])
    if tuple(payload["class_names"]) != tuple(data.class_names):
        raise FmnistError(
            f"model file {model_path}: class names {payload['class_names']} differ from "
            f"{data_path}'s {list(data.class_names)}"
        )
    model = prepare_inference(model_from_payload(payload, model_path), FLOAT32_CPU)
    reduced = None
    if trained_dtype(payload) == dtype_name(BFLOAT16_CPU.dtype):
        logits = predict_logits(
            model, data.test.images, batch_size=settings["batch_size"], backend=BFLOAT16_CPU
        )
        reduced = (BFLOAT16_CPU, logits)
    val_logits = predict_logits(model, data.val.images, batch_size=settings["batch_size"],
                                backend=FLOAT32_CPU)
    temperature = calibration.fit_temperature(val_logits, data.val.labels)
    evaluation = evaluate_model(
        model,
        data.test,
        data.class_names,
        batch_size=settings["batch_size"],
        calibration_bins=settings["calibration_bins"],
        backend=FLOAT32_CPU,
        reduced=reduced,
        temperature=temperature,
    )
    with publish_dir(out_dir) as staging:  # all of them or none: a kill keeps the old ones
        write_outputs(
            evaluation,
            staging,
            calibration_bins=settings["calibration_bins"],
            misclassified_shown=settings["misclassified_shown"],
        )
    return evaluation


def trained_dtype(payload: dict[str, Any]) -> str | None:
    """The compute dtype the train stage recorded in the model file (None if not recorded)."""
    training = payload.get("training")
    backend = training.get("backend") if isinstance(training, dict) else None
    return backend.get("dtype") if isinstance(backend, dict) else None


def write_outputs(
    evaluation: Evaluation,
    out_dir: str | Path,
    *,
    calibration_bins: int,
    misclassified_shown: int,
) -> None:
    """metrics.json, run.json, report.md, the three DVC plot data files and the four figures."""
    out = Path(out_dir)
    ev = evaluation
    names = ev.class_names
    counts = metrics.confusion(ev.y_true, ev.y_pred, len(names))
    headline, details = split_metrics(ev.metrics)
    write_json(out / METRICS_FILE, headline)
    write_json(out / RUN_FILE, details)
    write_json(out / Path(CALIBRATION_FILE).name, {
        "temperature": ev.metrics["temperature"],
        "fitted_on": "validation split",
        "use": "probabilities = softmax(logits / temperature)",
    })
    write_records(out / PER_CLASS_PLOT, per_class_records(ev.metrics["per_class"]))
    plot_curves = metrics.roc_curves(ev.y_true, ev.probs, names)
    write_records(out / ROC_PLOT, roc_records(plot_curves))
    write_records(out / CONFUSION_PLOT, confusion_records(ev.y_true, ev.y_pred, names))

    per_class = ev.metrics["per_class"]
    figure_curves = metrics.roc_curves(ev.y_true, ev.probs, names, max_points=5000)
    aucs = {name: per_class[name]["auc"] for name in names}
    fig_dir = out / FIGURES_DIR
    figures.save(figures.roc_figure(figure_curves, aucs), fig_dir / "roc.png")
    figures.save(figures.confusion_figure(counts, names), fig_dir / "confusion_matrix.png")
    figures.save(figures.per_class_figure(per_class), fig_dir / "per_class.png")
    shown = most_confident_mistakes(ev.y_true, ev.probs, misclassified_shown)
    mistakes = figures.misclassified_figure(
        ev.images[shown],
        [names[i] for i in ev.y_true[shown]],
        [names[i] for i in ev.y_pred[shown]],
        ev.probs[shown].max(axis=1).tolist(),
    )
    figures.save(mistakes, fig_dir / "misclassified.png")

    text = report.render(
        ev.metrics,
        backend=ev.backend_label,
        confusions=top_confusions(counts, names, TOP_CONFUSIONS),
        calibration_bins=calibration_bins,
        figures_dir=FIGURES_DIR,
    )
    write_text(out / REPORT_FILE, text)


def split_metrics(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the headline numbers, everything else but the per-class rows, which are a plot)."""
    headline = {key: values[key] for key in HEADLINE_METRICS}
    details = {k: v for k, v in values.items() if k not in HEADLINE_METRICS and k != "per_class"}
    return headline, details


def per_class_records(per_class: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """DVC plot rows {class, precision, recall, f1, iou, auc, support}, in class-name order."""
    return [{"class": name, **values} for name, values in per_class.items()]


def roc_records(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[dict[str, Any]]:
    """DVC plot rows {class, fpr, tpr}, curve by curve in threshold order.

    Thresholds are left out: the first one is +inf, which JSON cannot hold.
    """
    digits = metrics.PLOT_DIGITS
    rows: list[dict[str, Any]] = []
    for name, (fpr, tpr) in curves.items():
        previous = None
        for x, y in zip(fpr.tolist(), tpr.tolist(), strict=True):
            point = (round(x, digits) + 0.0, round(y, digits) + 0.0)
            if point != previous:
                rows.append({"class": name, "fpr": point[0], "tpr": point[1]})
            previous = point
    return rows


def confusion_records(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, str]]:
    """One {actual, predicted} row per image, as DVC's `confusion` template counts them."""
    return [
        {"actual": class_names[a], "predicted": class_names[p]}
        for a, p in zip(y_true.tolist(), y_pred.tolist(), strict=True)
    ]


def write_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """A JSON list, one compact row per line: small, valid JSON, and readable in a git diff."""
    rows = [json.dumps(row, sort_keys=True, separators=(",", ":")) for row in records]
    write_text(path, "[\n" + ",\n".join(rows) + "\n]\n" if rows else "[]\n")


def most_confident_mistakes(y_true: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    """Indices of up to n misclassified images, most confident first (ties: lower index)."""
    wrong = np.flatnonzero(probs.argmax(axis=1) != y_true)
    confidence = probs[wrong].max(axis=1)
    order = np.lexsort((wrong, -confidence))
    return wrong[order[:n]]


def top_confusions(
    counts: np.ndarray, class_names: Sequence[str], n: int
) -> list[tuple[str, str, int]]:
    """The n largest off-diagonal cells as (actual, predicted, count), ties in class order."""
    cells = [
        (-int(counts[a, p]), a, p)
        for a in range(len(class_names))
        for p in range(len(class_names))
        if a != p and counts[a, p] > 0
    ]
    return [(class_names[a], class_names[p], -c) for c, a, p in sorted(cells)[:n]]


def _backend_label(backend: Backend | None) -> str:
    if backend is None or backend == FLOAT32_CPU:
        return "plain PyTorch in float32 (the model export ships)"
    return f"the {backend.name} backend in {dtype_name(backend.dtype)} on {backend.device}"
