"""The model card's figures against scikit-learn, the reference implementation other groups report with:
the node computes its metrics in plain NumPy (no scikit-learn on the node), and for any labels and
probabilities — ties, absent classes, a single image — they are scikit-learn's."""

from __future__ import annotations

import warnings

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as reference

from classifier.metrics import brier_score, classification_report, log_loss, roc_curve

pytestmark = pytest.mark.interop

CLASSES = ("covid", "normal", "pneumonia", "other")


@st.composite
def _scored_images(draw: st.DrawFn) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """True classes and probability rows; weights on a coarse grid, so that tied scores (within a class and
    between a row's classes) are common, and some classes may be absent from the truth."""
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
        assert ours["recall"] == ours["sensitivity"] == pytest.approx(recall[index])
        assert ours["f1"] == pytest.approx(f1[index])
        (tn, fp), _ = one_vs_rest[index]
        assert ours["specificity"] == pytest.approx(tn / (tn + fp) if tn + fp else 0.0)
        positive = truth == index
        if positive.all() or not positive.any():
            assert ours["roc_auc"] is None  # undefined; scikit-learn warns and answers nan
            continue
        assert ours["roc_auc"] == pytest.approx(reference.roc_auc_score(positive, probabilities[:, index]))
        fpr, tpr, _ = reference.roc_curve(positive, probabilities[:, index], drop_intermediate=False)
        our_fpr, our_tpr = roc_curve(positive, probabilities[:, index])
        assert our_fpr == pytest.approx(fpr.tolist()) and our_tpr == pytest.approx(tpr.tolist())
    assert report["macro_precision"] == pytest.approx(precision.mean())
    assert report["macro_recall"] == pytest.approx(recall.mean())
    assert report["macro_f1"] == pytest.approx(f1.mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one image or one class present: scikit-learn warns, still answers
        expected_log_loss = reference.log_loss(truth, probabilities, labels=labels)
        expected_brier = reference.brier_score_loss(truth, probabilities, labels=labels, scale_by_half=False)
    assert log_loss(probabilities, truth) == report["log_loss"] == pytest.approx(expected_log_loss)
    assert brier_score(probabilities, truth) == report["brier_score"] == pytest.approx(expected_brier)
