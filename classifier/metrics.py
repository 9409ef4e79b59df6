"""Classification metrics in plain NumPy (no scikit-learn on the node): what the model card reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

ECE_BINS = 15


def confusion_matrix(
    y_true: npt.NDArray[np.int64], y_pred: npt.NDArray[np.int64], n: int
) -> npt.NDArray[np.int64]:
    """Rows: true class; columns: predicted class."""
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _rankdata(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Average ranks (1-based), ties sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def roc_auc(positive: npt.NDArray[np.bool_], score: npt.NDArray[np.float64]) -> float | None:
    """Area under the ROC curve (Mann–Whitney U); None when one side is empty."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _rankdata(score.astype(np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(
    positive: npt.NDArray[np.bool_], score: npt.NDArray[np.float64]
) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) over all thresholds, for plotting.

    One point per distinct score: tied images cross the threshold together, so a tie is one diagonal
    segment, whatever their order, and the curve's area is :func:`roc_auc`."""
    if score.size == 0:
        return [0.0], [0.0]
    order = np.argsort(-score, kind="mergesort")
    hits = positive[order]
    sorted_score = score[order]
    last_of_each_score = np.r_[np.nonzero(np.diff(sorted_score))[0], len(sorted_score) - 1]
    tps = np.concatenate([[0], np.cumsum(hits)[last_of_each_score]])
    fps = np.concatenate([[0], np.cumsum(~hits)[last_of_each_score]])
    return (fps / max(fps[-1], 1)).tolist(), (tps / max(tps[-1], 1)).tolist()


def reliability_bins(
    probabilities: npt.NDArray[np.float64], y_true: npt.NDArray[np.int64], bins: int = ECE_BINS
) -> list[dict[str, float | int]]:
    """The reliability diagram as numbers: for each equal-width bin of top-class probability (low, high]
    that holds images, how many, their mean top probability and how often the top class was right."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows: list[dict[str, float | int]] = []
    for number in range(bins):
        mask = index == number
        if mask.any():
            rows.append(
                {
                    "low": round(float(edges[number]), 6),
                    "high": round(float(edges[number + 1]), 6),
                    "images": int(mask.sum()),
                    "confidence": float(confidence[mask].mean()),
                    "accuracy": float(correct[mask].mean()),
                }
            )
    return rows


def expected_calibration_error(
    probabilities: npt.NDArray[np.float64], y_true: npt.NDArray[np.int64], bins: int = ECE_BINS
) -> float:
    """Top-label ECE with equal-width confidence bins: |accuracy − confidence| weighted by bin size."""
    rows = reliability_bins(probabilities, y_true, bins=bins)
    gaps = sum(row["images"] * abs(row["accuracy"] - row["confidence"]) for row in rows)
    return _safe_div(gaps, len(y_true))


def log_loss(probabilities: npt.NDArray[np.float64], y_true: npt.NDArray[np.int64]) -> float:
    """Mean negative log probability of the true class (natural log; a probability of 0 counts as 1e-12)."""
    if len(y_true) == 0:
        return 0.0
    chosen = probabilities[np.arange(len(y_true)), y_true]
    return float(-np.mean(np.log(np.clip(chosen, 1e-12, 1.0)))) + 0.0  # + 0.0: no "-0.0" in the JSON


def brier_score(probabilities: npt.NDArray[np.float64], y_true: npt.NDArray[np.int64]) -> float:
    """Mean over images of the squared distance between the probabilities and the one-hot truth
    (0 is perfect, 2 the worst)."""
    if len(y_true) == 0:
        return 0.0
    one_hot = np.eye(probabilities.shape[1])[y_true]
    return float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))


def _mean(values: Sequence[float | int | None]) -> float:
    return float(np.mean([float(value or 0.0) for value in values])) if values else 0.0


def _safe_div(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def classification_report(
    y_true: Sequence[int] | npt.NDArray[np.int64],
    probabilities: npt.NDArray[np.float64],
    classes: Sequence[str],
) -> dict[str, Any]:
    """Confusion matrix, accuracy, per-class and macro precision/recall/F1, sensitivity/specificity,
    one-vs-rest ROC AUC, and how honest the probabilities are (ECE, log loss, Brier score, reliability
    bins) — a JSON-ready dict."""
    given = np.asarray(y_true)
    if given.size == 0:  # accuracy 0.0 and an ECE of 0.0 of nothing read as figures
        raise ValueError("no images to score")
    if given.dtype.kind not in "iu" and not np.array_equal(given, np.round(given)):  # 0.7 was read as 0
        raise ValueError("true labels must be whole class indices")
    truth = given.astype(np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    n = len(classes)
    if probs.shape != (len(truth), n):
        raise ValueError(f"probabilities have shape {probs.shape}, expected {(len(truth), n)}")
    if truth.min() < 0 or truth.max() >= n:
        raise ValueError(f"true labels must be class indices 0..{n - 1}")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities must be finite numbers")
    if (probs < 0).any():
        raise ValueError("probabilities must not be negative (logits?)")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probabilities must sum to 1 per image (logits, or scores of separate classes?)")
    predicted = probs.argmax(axis=1)
    matrix = confusion_matrix(truth, predicted, n)
    total = int(matrix.sum())
    per_class: dict[str, dict[str, float | int | None]] = {}
    for index, name in enumerate(classes):
        tp = int(matrix[index, index])
        fn = int(matrix[index].sum()) - tp
        fp = int(matrix[:, index].sum()) - tp
        tn = total - tp - fn - fp
        precision = _safe_div(tp, tp + fp)
        recall = _safe_div(tp, tp + fn)
        # Sensitivity without positives and specificity without negatives are undefined (None, as is the
        # AUC then), not 0: a site scoring the model on its own normal images must not read a
        # specificity of 0 for the normal class. Precision, recall and F1 keep scikit-learn's 0.
        per_class[name] = {
            "support": tp + fn,
            "precision": precision,
            "recall": recall,
            "f1": _safe_div(2 * precision * recall, precision + recall),
            "sensitivity": recall if tp + fn else None,
            "specificity": _safe_div(tn, tn + fp) if tn + fp else None,
            "roc_auc": roc_auc(truth == index, probs[:, index]),
        }
    aucs = [v["roc_auc"] for v in per_class.values() if v["roc_auc"] is not None]
    # Macro averages over the classes the images or the answers have (scikit-learn's default labels): a
    # class with neither, e.g. pneumonia when a three-class model is scored on covid/normal data, would
    # add a precision, recall and F1 of 0 that say nothing about the model.
    seen = [
        per_class[name] for index, name in enumerate(classes) if matrix[index].any() or matrix[:, index].any()
    ]
    return {
        "classes": list(classes),
        "images": total,
        "confusion_matrix": matrix.tolist(),
        "accuracy": _safe_div(float(np.trace(matrix)), total),
        "macro_precision": _mean([v["precision"] for v in seen]),
        "macro_recall": _mean([v["recall"] for v in seen]),
        "macro_f1": _mean([v["f1"] for v in seen]),
        "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
        "expected_calibration_error": expected_calibration_error(probs, truth),
        "log_loss": log_loss(probs, truth),
        "brier_score": brier_score(probs, truth),
        "reliability": reliability_bins(probs, truth),
        "per_class": per_class,
    }
