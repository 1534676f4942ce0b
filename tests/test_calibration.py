"""Temperature scaling: the fitted T undoes a known miscalibration, and only probabilities move."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fmnist.calibration import fit_temperature, nll, read_temperature
from fmnist.errors import FmnistError
from fmnist.metrics import expected_calibration_error, softmax


def _calibrated_logits(n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z): calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, 10))
    p = softmax(z)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z, labels


@pytest.mark.parametrize("scale", [0.5, 3.0])  # under- and over-confident
def test_fitted_temperature_undoes_a_known_scaling_of_calibrated_logits(scale: float) -> None:
    z, labels = _calibrated_logits()
    fitted = fit_temperature(z * scale, labels)
    assert fitted == pytest.approx(scale, rel=0.05)
    assert nll(z * scale, labels, fitted) < nll(z * scale, labels)
    before = expected_calibration_error(labels, softmax(z * scale))
    after = expected_calibration_error(labels, softmax(z * scale / fitted))
    assert after < before / 2


def test_temperature_never_changes_the_predicted_class() -> None:
    z, labels = _calibrated_logits(2000)
    t = fit_temperature(z * 3.0, labels)
    np.testing.assert_array_equal((z * 3.0 / t).argmax(axis=1), z.argmax(axis=1))


def test_logits_that_differ_in_their_last_bits_give_the_same_temperature() -> None:
    """Another CPU's kernels change logits in the last bits: the shipped bytes must not move."""
    z, labels = _calibrated_logits(3000, seed=1)
    nudged = np.nextafter(z, np.inf)  # one ulp up, every logit
    assert repr(fit_temperature(z, labels)) == repr(fit_temperature(nudged, labels))


@pytest.mark.parametrize(("content", "message"), [
    (None, "not found"),
    ("{", "unreadable calibration"),
    (json.dumps({"temperature": -1}), "outside"),
    (json.dumps({"temperature": "hot"}), "outside"),
    (json.dumps({"temperature": True}), "outside"),
])
def test_unusable_calibration_file_is_one_line(tmp_path: Path, content: str | None,
                                               message: str) -> None:
    path = tmp_path / "calibration.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(FmnistError, match=message):
        read_temperature(path)
