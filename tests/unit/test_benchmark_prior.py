"""benchmarks/prior.py: which class weights it takes out, and how."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.posthoc import called
from benchmarks.prior import reweigh, training_weights

pytestmark = pytest.mark.unit

CLASSES = ("covid", "normal", "pneumonia")


def test_weights_of_a_single_recipe_and_of_merged_members() -> None:
    single = [{"recipe": {"class_weights": {"0": 3.0, "1": 0.75, "2": 0.5}}}]
    merged = [
        {"recipe": {"class_weights": {"0": 3.0, "1": 1.0, "2": 1.0}}},
        {"recipe": {"class_weights": None}},  # a member trained without weights counts as ones
    ]
    assert training_weights(single, CLASSES).tolist() == [3.0, 0.75, 0.5]
    assert training_weights(merged, CLASSES).tolist() == [2.0, 1.0, 1.0]
    assert training_weights([{"recipe": {}}], CLASSES).tolist() == [1.0, 1.0, 1.0]


def test_strength_zero_changes_nothing_and_one_removes_the_prior() -> None:
    weights = np.array([4.0, 1.0, 1.0])
    probabilities = np.array([[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]])
    assert np.allclose(reweigh(probabilities, weights, 0.0), probabilities)
    adjusted = reweigh(probabilities, weights, 1.0)
    assert np.allclose(adjusted.sum(axis=1), 1.0)
    # 0.5/4 against 0.25 and 0.25: COVID-19 falls from the top class to a fifth
    assert np.allclose(adjusted[0], [0.2, 0.4, 0.4])
    assert np.allclose(adjusted[1], [0.5, 0.25, 0.25])
    # one constant per class keeps the order of p(covid) across images, hence its AUC
    assert adjusted[1, 0] > adjusted[0, 0]


def test_called_gives_indeterminate_below_the_threshold() -> None:
    probabilities = np.array([[0.2, 0.4, 0.4], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    assert called(probabilities, CLASSES, 0.5) == ["indeterminate", "covid", "pneumonia"]
