"""The model card's figures against reference implementations: scikit-learn, which other groups report
with, and for the calibration error the library of Kumar, Liang & Ma (NeurIPS 2019, ``uncertainty-
calibration``; Guo et al.'s top-label ECE with equal-width bins). The node computes its metrics in plain
NumPy (no scikit-learn on the node), and for any labels and probabilities — ties, absent classes, a single
image, confidences on a bin edge — they are the references'."""

from __future__ import annotations

import warnings

import calibration
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as reference

from classifier.metrics import (
    ECE_BINS,
    brier_score,
    classification_report,
    expected_calibration_error,
    log_loss,
    reliability_bins,
    roc_curve,
)

pytestmark = pytest.mark.interop

CLASSES = ("covid", "normal", "pneumonia", "other")


@st.composite
def _scored_images(draw: st.DrawFn) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """True classes and probability rows; weights on a coarse grid, so that tied scores (within a class and
    between a row's classes) and top probabilities on a bin edge (1/3, 0.4, 0.6, ...) are common, and some
    classes may be absent from the truth."""
    classes = draw(st.integers(2, len(CLASSES)))
    images = draw(st.integers(1, 40))
    truth = draw(st.lists(st.integers(0, classes - 1), min_size=images, max_size=images))
    weights = draw(st.lists(st.integers(1, 6), min_size=images * classes, max_size=images * classes))
    rows = np.asarray(weights, dtype=np.float64).reshape(images, classes)
    return np.asarray(truth, dtype=np.int64), rows / rows.sum(axis=1, keepdims=True)


@settings(max_examples=300, deadline=None)
@given(_scored_images())
def test_the_report_is_scikit_learns(case: tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]) -> None:
    truth, probabilities = case
    classes = probabilities.shape[1]
    labels = list(range(classes))
    predicted = probabilities.argmax(axis=1)
    report = classification_report(truth, probabilities, CLASSES[:classes])

    assert report["confusion_matrix"] == reference.confusion_matrix(truth, predicted, labels=labels).tolist()
    assert report["accuracy"] == pytest.approx(reference.accuracy_score(truth, predicted))
    precision, recall, f1, support = reference.precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0.0
    )
    # per class: [[tn, fp], [fn, tp]]
    one_vs_rest = reference.multilabel_confusion_matrix(truth, predicted, labels=labels)
    for index, name in enumerate(CLASSES[:classes]):
        ours = report["per_class"][name]
        assert ours["support"] == support[index]
        assert ours["precision"] == pytest.approx(precision[index])
        assert ours["recall"] == pytest.approx(recall[index])
        # sensitivity without positives and specificity without negatives are undefined: None, not 0
        assert ours["sensitivity"] == (pytest.approx(recall[index]) if support[index] else None)
        assert ours["f1"] == pytest.approx(f1[index])
        (tn, fp), _ = one_vs_rest[index]
        assert ours["specificity"] == (pytest.approx(tn / (tn + fp)) if tn + fp else None)
        positive = truth == index
        if positive.all() or not positive.any():
            assert ours["roc_auc"] is None  # undefined; scikit-learn warns and answers nan
            continue
        assert ours["roc_auc"] == pytest.approx(reference.roc_auc_score(positive, probabilities[:, index]))
        fpr, tpr, _ = reference.roc_curve(positive, probabilities[:, index], drop_intermediate=False)
        our_fpr, our_tpr = roc_curve(positive, probabilities[:, index])
        assert our_fpr == pytest.approx(fpr.tolist()) and our_tpr == pytest.approx(tpr.tolist())
    # macro averages: scikit-learn's default labels, the classes in the truth or the predictions
    for key in ("precision", "recall", "f1"):
        expected = getattr(reference, f"{key}_score")(truth, predicted, average="macro", zero_division=0.0)
        assert report[f"macro_{key}"] == pytest.approx(expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one image or one class present: scikit-learn warns, still answers
        expected_log_loss = reference.log_loss(truth, probabilities, labels=labels)
        expected_brier = reference.brier_score_loss(truth, probabilities, labels=labels, scale_by_half=False)
    assert log_loss(probabilities, truth) == report["log_loss"] == pytest.approx(expected_log_loss)
    assert brier_score(probabilities, truth) == report["brier_score"] == pytest.approx(expected_brier)


@settings(max_examples=300, deadline=None)
@given(_scored_images(), st.sampled_from([10, ECE_BINS, 20]))
def test_the_calibration_error_is_the_reference_s(
    case: tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]], bins: int
) -> None:
    truth, probabilities = case
    assert sum(int(row["images"]) for row in reliability_bins(probabilities, truth, bins=bins)) == len(truth)
    ours = expected_calibration_error(probabilities, truth, bins=bins)
    assert ours == pytest.approx(calibration.get_ece(probabilities, truth, num_bins=bins), abs=1e-12)
    if bins == ECE_BINS:
        report = classification_report(truth, probabilities, CLASSES[: probabilities.shape[1]])
        assert report["expected_calibration_error"] == pytest.approx(ours, abs=1e-12)
