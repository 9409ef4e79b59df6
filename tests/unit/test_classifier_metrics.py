"""Metrics: the numbers in the model card are computed correctly."""

from __future__ import annotations

import numpy as np
import pytest

from classifier.metrics import classification_report, expected_calibration_error, roc_auc, roc_curve

pytestmark = pytest.mark.unit


def test_report_on_a_known_confusion() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.1, 0.1, 0.8]]
    )
    report = classification_report(truth, probs, ["a", "b", "c"])
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report["accuracy"] == pytest.approx(4 / 6)
    a = report["per_class"]["a"]
    assert (a["precision"], a["recall"], a["specificity"]) == (1.0, pytest.approx(2 / 3), 1.0)
    assert report["per_class"]["c"]["precision"] == pytest.approx(0.5)
    assert report["macro_f1"] == pytest.approx(np.mean([0.8, 0.5, 2 / 3]))


def test_auc_perfect_inverted_and_ties() -> None:
    positive = np.array([True, True, False, False])
    assert roc_auc(positive, np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    assert roc_auc(positive, np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert roc_auc(positive, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert roc_auc(np.array([True, True]), np.array([0.1, 0.2])) is None


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([1, 1, 1, 1])) == pytest.approx(0.75)


def test_the_roc_curve_crosses_a_tie_in_one_diagonal_step_whatever_the_order() -> None:
    positive = np.array([True, False, True, False])
    score = np.array([1.0, 1.0, 0.0, 0.0])
    for order in ([0, 1, 2, 3], [1, 0, 3, 2]):
        fpr, tpr = roc_curve(positive[order], score[order])
        assert (fpr, tpr) == ([0.0, 0.5, 1.0], [0.0, 0.5, 1.0])
        assert float(np.trapezoid(tpr, fpr)) == roc_auc(positive, score) == 0.5
