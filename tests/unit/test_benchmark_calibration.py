"""benchmarks/calibration.py: temperature scaling and its cross-fit by groups."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.calibration import cross_fit, fit_temperature, group_halves, with_temperature
from classifier.metrics import log_loss

pytestmark = pytest.mark.unit


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def _overconfident(images: int, factor: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), probabilities reported as softmax(factor · z): the honest T is
    ``factor``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, (images, 3))
    honest = _softmax(logits)
    truth = np.array([rng.choice(3, p=row) for row in honest], dtype=np.int64)
    return _softmax(factor * logits), truth


def test_temperature_one_changes_nothing_and_any_keeps_the_top_class_and_the_order() -> None:
    probabilities = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.05, 0.9, 0.05]])
    assert np.allclose(with_temperature(probabilities, 1.0), probabilities)
    for temperature in (0.5, 2.0):
        scaled = with_temperature(probabilities, temperature)
        assert np.allclose(scaled.sum(axis=1), 1.0)
        assert (scaled.argmax(axis=1) == probabilities.argmax(axis=1)).all()
        assert (np.argsort(scaled[:, 0]) == np.argsort(probabilities[:, 0])).all()
    assert with_temperature(probabilities, 0.5)[0, 0] > 0.7 > with_temperature(probabilities, 2.0)[0, 0]


@pytest.mark.parametrize("factor", [0.6, 2.0])
def test_the_fitted_temperature_undoes_over_and_under_confidence(factor: float) -> None:
    probabilities, truth = _overconfident(4000, factor)
    temperature = fit_temperature(probabilities, truth)
    assert temperature == pytest.approx(factor, rel=0.12)
    assert log_loss(with_temperature(probabilities, temperature), truth) < log_loss(probabilities, truth)


def test_group_halves_never_split_a_group() -> None:
    groups = [f"g{index // 3}" for index in range(30)]  # ten groups of three images
    half = group_halves(groups, np.random.default_rng(0))
    inside = {group for group, chosen in zip(groups, half, strict=True) if chosen}
    outside = {group for group, chosen in zip(groups, half, strict=True) if not chosen}
    assert not inside & outside and len(inside) == 5 and len(outside) == 5


def test_cross_fitting_finds_the_honest_temperature_and_scores_it_on_held_out_groups() -> None:
    probabilities, truth = _overconfident(600, 2.0)
    groups = [f"g{index // 2}" for index in range(len(truth))]
    result = cross_fit(probabilities, truth, groups, repeats=3, seed=0)
    assert result["fits"] == 6
    assert result["temperature_mean"] == pytest.approx(2.0, rel=0.25)
    assert result["log_loss_after"] < result["log_loss_before"]
    assert result["log_loss_better"] == 1.0
    honest = cross_fit(_softmax(np.log(probabilities) / 2.0), truth, groups, repeats=3, seed=0)
    assert honest["temperature_mean"] == pytest.approx(1.0, rel=0.25)  # nothing to repair
