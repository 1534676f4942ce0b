"""Temperature scaling (Guo et al., ICML 2017): one scalar T fitted on the validation split.

Probabilities become softmax(logits / T): T > 1 softens an over-confident model, T < 1
sharpens an under-confident one (label smoothing makes ours under-confident). The arg-max, and
so accuracy, F1 and IoU, never change: only the probabilities (log loss, ECE) do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from fmnist.constants import MAX_TEMPERATURE, MIN_TEMPERATURE
from fmnist.errors import FmnistError

# Significant digits kept: the fit's own tolerance is far below them, so logits that differ in
# their last bits (another CPU's kernels) still give the same bytes downstream.
DIGITS = 4



def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    logp = log_softmax(scaled, axis=1)
    return float(-logp[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimizing the validation NLL (a bounded 1-D search over log T, far wider than
    any trained model needs), rounded to DIGITS significant digits."""
    result = minimize_scalar(
        lambda log_t: nll(logits, labels, math.exp(log_t)),
        bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(f"{math.exp(result.x):.{DIGITS}g}")


def read_temperature(path: str | Path) -> float:
    """The temperature evaluate wrote (export ships it with the model); one line if unusable."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))["temperature"]
    except FileNotFoundError:
        raise FmnistError(f"{path}: not found: run the evaluate stage first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FmnistError(f"{path}: unreadable calibration ({exc})") from None
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):
        raise FmnistError(f"{path}: temperature {value!r} outside "
                          f"[{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
    return float(value)
