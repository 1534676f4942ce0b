"""The evaluate stage's PNG figures, drawn headless and written atomically.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no global state, Agg canvas), and
saved without the "Software" metadata so the same numbers give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fmnist.atomic import atomic_path

DPI = 110
_COLORS = [f"C{i}" for i in range(10)]


def save(fig: Figure, path: str | Path) -> None:
    """PNG to a temporary file beside `path`, renamed over it when complete."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})


def roc_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], aucs: Mapping[str, float | None]
) -> Figure:
    """One-vs-rest ROC per class, AUC in the legend; right panel zooms into the top-left corner."""
    fig = Figure(figsize=(12, 5.6), layout="constrained")
    full, zoom = fig.subplots(1, 2)
    for i, (name, (fpr, tpr)) in enumerate(curves.items()):
        auc = aucs.get(name)
        label = f"{name} (AUC {auc:.4f})" if auc is not None else name
        for ax in (full, zoom):
            ax.plot(fpr, tpr, color=_COLORS[i % 10], linewidth=1.4, label=label)
    full.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    full.set(xlim=(0, 1), ylim=(0, 1.01), title="ROC, one-vs-rest")
    zoom.set(xlim=(0, 0.2), ylim=(0.6, 1.005), title="Top-left corner (zoom)")
    for ax in (full, zoom):
        ax.set(xlabel="false positive rate", ylabel="true positive rate")
        ax.grid(alpha=0.3)
    zoom.legend(loc="lower right", fontsize=8)
    return fig


def confusion_figure(counts: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Row-normalized confusion matrix (each actual class sums to 1), percentages in cells."""
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    k = len(class_names)
    fig = Figure(figsize=(8.5, 7.5), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the actual class")
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                color = "white" if shares[i, j] > 0.5 else "black"
                ax.text(j, i, f"{100 * shares[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color=color)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted", ylabel="actual", title="Confusion matrix (% of each actual class)")
    return fig


def misclassified_figure(
    images: np.ndarray,
    actual: Sequence[str],
    predicted: Sequence[str],
    confidence: Sequence[float],
) -> Figure:
    """A grid of mistakes, each titled "true → predicted (p)"; the caller picks and orders them."""
    n = len(images)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(max(2.2 * cols, 5.0), 2.3 * rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    if n == 0:
        axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    shown = zip(axes[:n], images, actual, predicted, confidence, strict=True)
    for ax, image, true, pred, p in shown:
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{true} → {pred} ({p:.2f})", fontsize=8)
    fig.suptitle("Most confident mistakes\ntrue → predicted (probability of the prediction)",
                 fontsize=11)
    return fig


def per_class_figure(per_class: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Precision, recall, F1 and IoU per class as grouped bars."""
    names = list(per_class)
    series = ("precision", "recall", "f1", "iou")
    labels = {"precision": "precision", "recall": "recall", "f1": "F1", "iou": "IoU"}
    width = 0.8 / len(series)
    x = np.arange(len(names))
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax = fig.subplots()
    for i, key in enumerate(series):
        values = [per_class[name][key] for name in names]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=labels[key],
               color=_COLORS[i])
    # Good models score 0.8-1.0 everywhere: start the axis near the lowest bar, not at 0.
    lowest = min(per_class[name][key] for name in names for key in series)
    bottom = max(0.0, math.floor(lowest * 10) / 10 - 0.1)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set(ylim=(bottom, 1.0), ylabel=f"score (axis from {bottom:.1f})",
           title="Per-class quality (test split)")
    ax.yaxis.grid(alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside upper center", ncols=len(series), fontsize=9)
    return fig
