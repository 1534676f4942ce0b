"""reports/evaluate/report.md: the evaluation in Markdown, readable without the pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_HEADLINE = (
    ("accuracy", "Accuracy"),
    ("top2_accuracy", "Top-2 accuracy"),
    ("f1_macro", "F1 (macro)"),
    ("f1_weighted", "F1 (weighted)"),
    ("precision_macro", "Precision (macro)"),
    ("recall_macro", "Recall (macro)"),
    ("auc_macro", "ROC AUC (macro, one-vs-rest)"),
    ("iou_mean", "Mean IoU (Jaccard)"),
    ("log_loss", "Log loss"),
    ("ece", "Expected calibration error"),
    ("ece_calibrated", "ECE after temperature scaling"),
    ("log_loss_calibrated", "Log loss after temperature scaling"),
)
_PER_CLASS = (
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("f1", "F1"),
    ("iou", "IoU"),
    ("auc", "AUC"),
    ("support", "Images"),
)
FIGURES = (
    ("roc.png", "ROC curves, one-vs-rest"),
    ("confusion_matrix.png", "Confusion matrix, row-normalized"),
    ("per_class.png", "Precision, recall, F1 and IoU per class"),
    ("misclassified.png", "Most confident mistakes"),
)


def render(
    metrics: Mapping[str, Any],
    *,
    backend: str,
    confusions: list[tuple[str, str, int]],
    calibration_bins: int,
    figures_dir: str = "figures",
) -> str:
    """The whole report; same metrics give the same text (no dates, no timings).

    `backend` says how the logits were computed (e.g. "the native backend in bfloat16");
    `confusions` lists the most frequent (actual, predicted, count) mistakes, largest first.
    """
    lines = [
        "# Evaluation on the Fashion-MNIST test split",
        "",
        f"{metrics['n_samples']:,} test images, never seen in training or model selection. "
        f"Predictions are the arg-max of the softmax, computed with {backend}.",
        "",
        "| Metric | Value |",
        "|---|---:|",
    ]
    for key, label in _HEADLINE:
        if key in ("ece", "ece_calibrated"):
            label = f"{label} ({calibration_bins} bins)"
        lines.append(f"| {label} | {_fmt(metrics.get(key))} |")
    reduced = metrics.get("bfloat16_inference")
    if reduced:
        lines += [
            "",
            f"The same model under bfloat16 autocast, as it was trained: accuracy "
            f"{_fmt(reduced['accuracy'])}, {reduced['predictions_differ']:,} of "
            f"{metrics['n_samples']:,} predictions differ from the float32 ones above.",
        ]
    lines += [
        "",
        "## Per class",
        "",
        "| Class | " + " | ".join(label for _, label in _PER_CLASS) + " |",
        "|---|" + "---:|" * len(_PER_CLASS),
    ]
    for name, values in metrics["per_class"].items():
        cells = " | ".join(_fmt(values.get(key)) for key, _ in _PER_CLASS)
        lines.append(f"| {_escape(name)} | {cells} |")
    if confusions:
        lines += ["", "## Most frequent confusions", "", "| Actual | Predicted | Images |",
                  "|---|---|---:|"]
        lines += [f"| {_escape(a)} | {_escape(p)} | {n} |" for a, p, n in confusions]
    lines += ["", "## Figures"]
    for name, title in FIGURES:
        lines += ["", f"![{title}]({figures_dir}/{name})"]
    lines += [
        "",
        "## Definitions",
        "",
        "Precision, recall, F1 and IoU (Jaccard: TP / (TP + FP + FN)) of a class treat that "
        "class as positive; macro averages weigh classes equally, weighted ones by their "
        "image count. AUC is one-vs-rest on the softmax probability of the class. Top-2 "
        "accuracy counts an image as right when its class is among the two most probable. "
        "The expected calibration error is the mean, over equal-width bins of the top "
        "probability weighted by their image share, of |accuracy - mean top probability|. "
        "Temperature scaling divides the logits by one number T fitted on the validation "
        f"split (here T = {_fmt(metrics.get('temperature'))}); the exported model carries T, "
        "so `fmnist predict` prints those calibrated probabilities.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")
