"""Metrics on hand-built predictions whose answers are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fmnist.constants import CLASS_NAMES
from fmnist.errors import FmnistError
from fmnist.metrics import (
    classification_metrics,
    expected_calibration_error,
    roc_curves,
    rounded,
    softmax,
    thin_curve,
)

K = len(CLASS_NAMES)
PER_CLASS_KEYS = {"precision", "recall", "f1", "iou", "auc", "support"}


def _labels(per_class: int = 10) -> np.ndarray:
    return np.repeat(np.arange(K), per_class)


def _probs(predicted: np.ndarray, second: np.ndarray | None = None, top: float = 1.0) -> np.ndarray:
    """`top` on the predicted class, the rest on `second` (or spread evenly), rows sum to 1."""
    n = len(predicted)
    if second is None:
        probs = np.full((n, K), (1.0 - top) / (K - 1))
    else:
        probs = np.zeros((n, K))
        probs[np.arange(n), second] = 1.0 - top
    probs[np.arange(n), predicted] = top
    return probs


def test_perfect_classifier_scores_one_everywhere() -> None:
    y = _labels()
    result = classification_metrics(y, _probs(y), CLASS_NAMES)
    for key in ("accuracy", "top2_accuracy", "auc_macro", "iou_mean"):
        assert result[key] == 1.0, key
    for average in ("macro", "weighted"):
        for name in ("precision", "recall", "f1"):
            assert result[f"{name}_{average}"] == 1.0
    assert result["log_loss"] < 1e-9
    assert result["ece"] < 1e-9
    assert list(result["per_class"]) == list(CLASS_NAMES)
    for values in result["per_class"].values():
        assert set(values) == PER_CLASS_KEYS
        assert {k: v for k, v in values.items() if k != "support"} == {
            "precision": 1.0, "recall": 1.0, "f1": 1.0, "iou": 1.0, "auc": 1.0
        }
        assert values["support"] == 10


def test_swapping_two_classes_costs_exactly_those_classes() -> None:
    y = _labels()  # 10 images per class; class 0 at 0..9, class 1 at 10..19
    predicted = y.copy()
    predicted[[0, 1]] = 1  # two T-shirts called Trousers
    predicted[[10, 11, 12, 13]] = 0  # four Trousers called T-shirts
    # The true class comes second everywhere, so top-2 is perfect.
    second = np.where(predicted == y, (y + 1) % K, y)
    result = classification_metrics(y, _probs(predicted, second, top=0.9), CLASS_NAMES)

    shirt, trouser = result["per_class"]["T-shirt/top"], result["per_class"]["Trouser"]
    # T-shirt: TP 8, FP 4, FN 2.  Trouser: TP 6, FP 2, FN 4.
    assert shirt["precision"] == pytest.approx(8 / 12)
    assert shirt["recall"] == pytest.approx(8 / 10)
    assert shirt["iou"] == pytest.approx(8 / 14)
    assert trouser["precision"] == pytest.approx(6 / 8)
    assert trouser["recall"] == pytest.approx(6 / 10)
    assert trouser["iou"] == pytest.approx(6 / 12)
    assert trouser["f1"] == pytest.approx(2 * 6 / (2 * 6 + 2 + 4))
    for name in CLASS_NAMES[2:]:
        values = result["per_class"][name]
        assert (values["precision"], values["recall"], values["f1"], values["iou"]) == (1, 1, 1, 1)
    assert result["accuracy"] == pytest.approx(94 / 100)
    assert result["top2_accuracy"] == 1.0
    assert result["iou_mean"] == pytest.approx((8 / 14 + 6 / 12 + 8) / K)


def test_top2_counts_the_true_class_only_in_first_or_second_place() -> None:
    y = _labels()
    predicted = (y + 1) % K  # every prediction wrong
    second = np.where(np.arange(len(y)) % 2 == 0, y, (y + 2) % K)  # true class second for half
    result = classification_metrics(y, _probs(predicted, second, top=0.7), CLASS_NAMES)
    assert result["accuracy"] == 0.0
    assert result["top2_accuracy"] == pytest.approx(0.5)


def test_macro_auc_equals_sklearn_one_vs_rest() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, K, 400)
    logits = rng.normal(size=(400, K))
    logits[np.arange(400), y] += 1.5
    probs = softmax(logits)
    result = classification_metrics(y, probs, CLASS_NAMES)
    assert result["auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    for k, name in enumerate(CLASS_NAMES):
        assert result["per_class"][name]["auc"] == pytest.approx(
            roc_auc_score(y == k, probs[:, k])
        )


def test_absent_class_has_no_auc_and_macro_auc_averages_the_rest() -> None:
    y = _labels()[10:]  # no T-shirts at all
    probs = _probs(y, top=0.8)
    probs[:, 0] += 0.05  # T-shirt scores vary nowhere, the others are perfect
    probs /= probs.sum(axis=1, keepdims=True)
    result = classification_metrics(y, probs, CLASS_NAMES)
    assert result["per_class"]["T-shirt/top"]["auc"] is None
    assert result["per_class"]["T-shirt/top"]["support"] == 0
    assert result["auc_macro"] == 1.0
    assert "T-shirt/top" not in roc_curves(y, probs, CLASS_NAMES)


def test_log_loss_is_mean_negative_log_probability_of_the_true_class() -> None:
    y = _labels()
    probs = _probs(y, top=0.6)
    result = classification_metrics(y, probs, CLASS_NAMES)
    assert result["log_loss"] == pytest.approx(-math.log(0.6))


def test_ece_is_confidence_minus_accuracy_when_all_share_one_bin() -> None:
    y = _labels()
    predicted = y.copy()
    predicted[np.arange(len(y)) % 5 < 2] = (y[np.arange(len(y)) % 5 < 2] + 1) % K  # 60% right
    result = classification_metrics(y, _probs(predicted, top=0.8), CLASS_NAMES)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["ece"] == pytest.approx(0.2)


def test_ece_weights_each_bin_by_its_share() -> None:
    # Bin of 0.95: 4 images, all right (gap 0.05). Bin of 0.55: 4 images, 1 right (gap 0.3).
    y = np.zeros(8, dtype=np.int64)
    probs = np.zeros((8, K))
    probs[:4, 0], probs[:4, 1] = 0.95, 0.05
    probs[4:, 1], probs[4:, 0] = 0.55, 0.45
    probs[4, 0], probs[4, 1] = 0.55, 0.45
    ece = expected_calibration_error(y, probs, bins=10)
    assert ece == pytest.approx(0.5 * 0.05 + 0.5 * abs(0.25 - 0.55))


def test_ece_bins_are_closed_on_the_right() -> None:
    # Confidence exactly 0.5 with 2 bins falls in (0, 0.5], exactly 1.0 in (0.5, 1].
    y = np.array([0, 0])
    probs = np.zeros((2, K))
    probs[0, :2] = 0.5  # right (ties go to the first class) at 0.5: gap 0.5
    probs[1, 1] = 1.0  # wrong at 1.0: gap 1.0
    # Left-closed bins would pool both: |0.5 - 0.75| = 0.25.
    assert expected_calibration_error(y, probs, bins=2) == pytest.approx(0.75)


def test_thinning_keeps_both_ends_and_at_most_the_limit() -> None:
    x = np.sort(np.random.default_rng(1).random(5000))
    x[0], x[-1] = 0.0, 1.0
    y = np.sqrt(x)
    tx, ty = thin_curve(x, y, 200)
    assert len(tx) <= 200
    assert (tx[0], ty[0], tx[-1], ty[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(tx) >= 0)
    short = np.array([0.0, 0.5, 1.0])
    assert thin_curve(short, short, 200)[0] is short


def test_roc_curves_hold_every_class_within_the_point_budget() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, K, 5000)
    probs = softmax(rng.normal(size=(5000, K)))
    curves = roc_curves(y, probs, CLASS_NAMES, max_points=50)
    assert list(curves) == list(CLASS_NAMES)
    for fpr, tpr in curves.values():
        assert len(fpr) <= 50
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_rounding_gives_plain_json_without_negative_zero_or_nan() -> None:
    value = {"a": -1e-12, "b": float("nan"), "c": [1 / 3, float("inf")], "d": 7, "e": None}
    out = rounded(value, 4)
    expected = '{"a": 0.0, "b": null, "c": [0.3333, null], "d": 7, "e": null}'
    assert json.dumps(out, sort_keys=True) == expected


def test_softmax_of_huge_logits_is_finite_and_normalized() -> None:
    probs = softmax(np.array([[1000.0, 0.0] + [-1000.0] * (K - 2)], dtype=np.float32))
    assert np.isfinite(probs).all()
    assert probs.sum() == pytest.approx(1.0)
    assert probs.dtype == np.float64


@pytest.mark.parametrize(
    ("labels", "probs", "message"),
    [
        (np.zeros(3, dtype=np.int64), np.full((3, K - 1), 1 / (K - 1)), "expected shape"),
        (np.array([0, 1, K]), np.full((3, K), 1 / K), "integers in 0..9"),
        (np.zeros(3, dtype=np.int64), np.full((3, K), 0.5), "sum to 1"),
        (np.zeros(0, dtype=np.int64), np.zeros((0, K)), "no samples"),
    ],
)
def test_bad_inputs_raise_one_line_errors(labels, probs, message) -> None:
    with pytest.raises(FmnistError, match=message):
        classification_metrics(labels, probs, CLASS_NAMES)
