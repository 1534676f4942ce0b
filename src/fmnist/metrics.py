"""Quality numbers of a classifier from its probabilities, computed by scikit-learn.

Everything here is pure: arrays in, plain dicts and arrays out, no files. Per-class values are
keyed by the class name itself (`per_class["T-shirt/top"]["f1"]`): DVC shows nested keys as
`per_class.T-shirt/top.f1`, a slash and a space are kept verbatim by `dvc metrics show/diff`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import softmax as _softmax
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    jaccard_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
    top_k_accuracy_score,
)

from fmnist.errors import FmnistError

METRIC_DIGITS = 6  # metrics.json: below any real change, above float noise between runs
PLOT_DIGITS = 4  # ROC points: 1e-4 is far below a pixel of a 300 px plot
ROC_MAX_POINTS = 200  # per class, so the plots HTML stays small


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, renormalized so rows sum to 1 as log_loss requires."""
    probs = _softmax(np.asarray(logits, dtype=np.float64), axis=1)
    return probs / probs.sum(axis=1, keepdims=True)


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    calibration_bins: int = 15,
) -> dict[str, Any]:
    """Headline and per-class metrics of probabilities `probs` (N, K) against labels (N,).

    The prediction is the arg-max. AUCs are one-vs-rest on the probabilities; a class without
    positives or without negatives has no AUC (None) and the macro AUC averages the rest.
    Floats are plain Python floats, not yet rounded (see `rounded`).
    """
    y_true, probs = _check(y_true, probs, class_names)
    labels = list(range(len(class_names)))
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    iou = jaccard_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    aucs = [_auc(y_true == k, probs[:, k]) for k in labels]
    defined = [a for a in aucs if a is not None]
    result: dict[str, Any] = {
        "n_samples": len(y_true),
        "accuracy": accuracy_score(y_true, y_pred),
        "top2_accuracy": top_k_accuracy_score(y_true, probs, k=2, labels=labels),
        "log_loss": log_loss(y_true, probs, labels=labels),
        "ece": expected_calibration_error(y_true, probs, bins=calibration_bins),
        "auc_macro": float(np.mean(defined)) if defined else None,
        "iou_mean": jaccard_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
        "per_class": {
            name: {
                "precision": precision[k],
                "recall": recall[k],
                "f1": f1[k],
                "iou": iou[k],
                "auc": aucs[k],
                "support": int(support[k]),
            }
            for k, name in enumerate(class_names)
        },
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        result.update({f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f})
    return _plain(result)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, *, bins: int = 15) -> float:
    """ECE: |accuracy - confidence| per equal-width confidence bin, weighted by the bin's share.

    Confidence is the top probability; bins are (i/B, (i+1)/B], the first one closed at 0.
    scikit-learn has no multi-class ECE, so this is the one metric written out here.
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
            total += gap * in_bin.mean()
    return float(total)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (K, K): rows are the actual class, columns the predicted one."""
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def roc_curves(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    max_points: int = ROC_MAX_POINTS,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One-vs-rest ROC (fpr, tpr) per class, at most `max_points` points each, ends kept.

    A class without positives or negatives has no curve and is left out.
    """
    y_true, probs = _check(y_true, probs, class_names)
    curves = {}
    for k, name in enumerate(class_names):
        positive = y_true == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, k], drop_intermediate=True)
        curves[name] = thin_curve(fpr, tpr, max_points)
    return curves


def thin_curve(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most `max_points` points, evenly spaced along the curve's length, ends included.

    Spacing by arc length (not by index) keeps the shape: a good classifier's ROC has most
    thresholds crowded in its top-left corner.
    """
    if len(x) <= max_points:
        return x, y
    length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    targets = np.linspace(0.0, length[-1], max_points)
    keep = np.unique(np.clip(np.searchsorted(length, targets), 0, len(x) - 1))
    keep = np.union1d(keep, [0, len(x) - 1])
    return x[keep], y[keep]


def rounded(value: Any, digits: int = METRIC_DIGITS) -> Any:
    """Floats rounded to `digits`, no -0.0, NaN/inf as None: identical runs, identical bytes."""
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item, digits) for item in value]
    if isinstance(value, float):
        return round(value, digits) + 0.0 if math.isfinite(value) else None
    return value


def _auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    if positive.all() or not positive.any():
        return None
    return roc_auc_score(positive, score)


def _plain(value: Any) -> Any:
    """numpy scalars to Python ones, recursively: JSON and equality tests see plain numbers."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating | float):
        return float(value)
    return value


def _check(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != k:
        raise FmnistError(f"probabilities: expected shape (N, {k}), got {probs.shape}")
    if y_true.shape != (probs.shape[0],):
        raise FmnistError(f"labels: expected shape ({probs.shape[0]},), got {y_true.shape}")
    if len(y_true) == 0:
        raise FmnistError("labels: no samples to evaluate")
    if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 or y_true.max() >= k:
        raise FmnistError(f"labels: expected integers in 0..{k - 1}")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise FmnistError("probabilities: rows must sum to 1 (apply softmax to logits)")
    return y_true.astype(np.int64), probs / probs.sum(axis=1, keepdims=True)
