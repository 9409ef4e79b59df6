"""PNG figures of an artifact: training curves, confusion matrix, ROC curves, reliability diagram."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from classifier.metrics import reliability_bins, roc_curve


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: the node has no display
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: Mapping[str, Sequence[float]], path: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in history and len(history[key]):
                axis.plot(range(1, len(history[key]) + 1), history[key], style, label=key)
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def confusion_matrix(
    matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = ""
) -> Path:
    plt = _pyplot()
    data = np.asarray(matrix)
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.imshow(data, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes)
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    threshold = data.max() / 2.0 if data.size else 0
    for (row, col), value in np.ndenumerate(data):
        axis.text(
            col, row, str(value), ha="center", va="center", color="white" if value > threshold else "black"
        )
    axis.set_title(title or "confusion matrix")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def roc_and_reliability(
    y_true: npt.NDArray[np.int64], probabilities: npt.NDArray[np.float64], classes: Sequence[str], path: Path
) -> Path:
    plt = _pyplot()
    figure, (roc_axis, cal_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for index, name in enumerate(classes):
        positive = y_true == index
        if positive.any() and (~positive).any():
            fpr, tpr = roc_curve(positive, probabilities[:, index])
            roc_axis.plot(fpr, tpr, label=name)
    roc_axis.plot([0, 1], [0, 1], ":", color="grey")
    roc_axis.set_xlabel("1 - specificity")
    roc_axis.set_ylabel("sensitivity")
    roc_axis.set_title("one-vs-rest ROC")
    if roc_axis.get_legend_handles_labels()[0]:
        roc_axis.legend()
    else:  # images of one class only (a site's own normal images): no curve is defined
        roc_axis.text(0.5, 0.5, "ROC undefined: images of one class only", ha="center", va="center")
    bins = reliability_bins(probabilities, y_true)
    centres = [row["confidence"] for row in bins]
    accuracies = [row["accuracy"] for row in bins]
    cal_axis.plot([0, 1], [0, 1], ":", color="grey")
    cal_axis.plot(centres, accuracies, "o-")
    cal_axis.set_xlabel("confidence")
    cal_axis.set_ylabel("accuracy")
    cal_axis.set_title("reliability")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
