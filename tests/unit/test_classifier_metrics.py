"""Metrics: the numbers in the model card are computed correctly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classifier.metrics import (
    brier_score,
    classification_report,
    expected_calibration_error,
    log_loss,
    reliability_bins,
    roc_auc,
    roc_curve,
)

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


def test_macro_averages_leave_out_a_class_neither_in_the_images_nor_in_the_answers() -> None:
    """A three-class model scored on covid/normal images, answering right every time: its macro figures
    are 1, not 2/3 for a pneumonia class nothing was said about. A class the model answers but the images
    do not have stays in (its precision of 0 is the model's error)."""
    truth = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    report = classification_report(truth, probs, ["covid", "normal", "pneumonia"])
    assert (report["macro_precision"], report["macro_recall"], report["macro_f1"]) == (1.0, 1.0, 1.0)
    assert report["per_class"]["pneumonia"]["support"] == 0
    probs[3] = [0.1, 0.2, 0.7]  # one normal image called pneumonia
    report = classification_report(truth, probs, ["covid", "normal", "pneumonia"])
    assert report["macro_recall"] == pytest.approx(np.mean([1.0, 0.5, 0.0]))
    assert report["macro_precision"] == pytest.approx(np.mean([1.0, 1.0, 0.0]))


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


def test_reliability_bins_log_loss_and_brier_score_by_hand() -> None:
    truth = np.array([0, 0, 1, 1])
    probs = np.array([[0.88, 0.12], [0.95, 0.05], [0.6, 0.4], [0.35, 0.65]])
    bins = reliability_bins(probs, truth, bins=10)
    # top probabilities 0.88, 0.95, 0.6, 0.65: (0.8, 0.9], (0.9, 1.0], (0.5, 0.6], (0.6, 0.7]
    assert [(row["low"], row["images"]) for row in bins] == [
        (pytest.approx(0.5), 1), (pytest.approx(0.6), 1), (pytest.approx(0.8), 1), (pytest.approx(0.9), 1)
    ]
    assert [row["accuracy"] for row in bins] == [0.0, 1.0, 1.0, 1.0]  # the 0.6 image is wrong
    assert bins[0]["confidence"] == pytest.approx(0.6)
    assert log_loss(probs, truth) == pytest.approx(-np.mean(np.log([0.88, 0.95, 0.4, 0.65])))
    assert brier_score(probs, truth) == pytest.approx(np.mean([0.0288, 0.005, 0.72, 0.245]))
    perfect = np.eye(2)[truth]
    assert (log_loss(perfect, truth), brier_score(perfect, truth)) == (pytest.approx(0.0), 0.0)
    assert brier_score(1.0 - perfect, truth) == 2.0  # all certainty on the wrong class
    report = classification_report(truth, probs, ["a", "b"])
    assert report["reliability"] == reliability_bins(probs, truth)
    assert report["log_loss"] == log_loss(probs, truth)
    assert report["expected_calibration_error"] == pytest.approx(
        sum(row["images"] / 4 * abs(row["accuracy"] - row["confidence"]) for row in report["reliability"])
    )


def test_rates_without_cases_to_measure_are_undefined_not_zero() -> None:
    """A site scoring the model on its own normal images: there are no COVID cases, so COVID sensitivity
    is undefined, and so is normal specificity (no other images); the report said 0.0 for both while
    giving None for the AUC beside them."""
    truth = np.array([1, 1, 1])
    probs = np.array([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    per_class = classification_report(truth, probs, ["covid", "normal", "pneumonia"])["per_class"]
    covid, normal = per_class["covid"], per_class["normal"]
    assert covid["sensitivity"] is None and covid["specificity"] == pytest.approx(2 / 3)
    assert normal["specificity"] is None and normal["sensitivity"] == pytest.approx(2 / 3)
    assert per_class["normal"]["roc_auc"] is None


@pytest.mark.parametrize(
    ("truth", "probs", "message"),
    [
        ([0, 1], [[2.0, -1.0], [0.5, 0.5]], "not be negative"),  # logits, not probabilities
        ([0, 1], [[2.0, 1.0], [0.5, 0.5]], "sum to 1"),  # logits of one sign
        ([0, 1], [[0.6, 0.6], [0.5, 0.5]], "sum to 1"),  # separate scores: an ECE of 0.4 was given
        ([0, 1], [[np.nan, 0.5], [0.5, 0.5]], "finite"),
        ([0, 1], [[np.inf, 0.5], [0.5, 0.5]], "finite"),
        ([0.7, 1.2], [[0.9, 0.1], [0.5, 0.5]], "whole class indices"),  # read as 0 and 1
        ([], np.zeros((0, 2)), "no images"),  # accuracy 0.0 and ECE 0.0 of nothing
        ([0, -1], [[0.9, 0.1], [0.5, 0.5]], "class indices"),  # -1 wrapped round to the last class
        ([0, 2], [[0.9, 0.1], [0.5, 0.5]], "class indices"),  # an IndexError
    ],
)
def test_inputs_that_are_not_probabilities_and_class_indices_are_refused(
    truth: list[float], probs: list[list[float]], message: str
) -> None:
    """The old code returned an ECE of 1.17 for logits and counted label -1 as right; each check says its
    own reason (one message for all let a removed check pass every test)."""
    with pytest.raises(ValueError, match=message):
        classification_report(np.array(truth), np.array(probs), ["a", "b"])


def test_the_roc_figure_of_one_class_says_so_without_a_warning(tmp_path: Path) -> None:
    """A site's own normal images: matplotlib warned "No artists with labels found" and drew an empty
    panel."""
    import warnings

    from classifier import plots

    probs = np.array([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.roc_and_reliability(np.array([1, 1, 1]), probs, ["a", "b", "c"], tmp_path / "roc.png")
    assert (tmp_path / "roc.png").stat().st_size > 0


def test_images_beside_the_class_folders_are_said_to_be_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from classifier.dataset import load_collection

    for name in ("covid/a.png", "normal/b.png", "stray.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("L", (40, 40)).save(tmp_path / name)
    with caplog.at_level("WARNING"):
        assert len(load_collection(tmp_path)) == 2
    assert "1 image(s) beside the class sub-folders are of no class and not read" in caplog.text
