"""Taking the class weights back out at inference: does it stop the pull towards COVID-19?

Both members of the default model were trained with inverse-frequency class weights (COVID-19 about 3.0,
normal and pneumonia about 0.75), which tells the network that COVID-19 is four times as common as it is in
the training images. Its probabilities carry that prior. Dividing each class's probability by its weight
raised to a strength ``s`` and renormalising (``s = 1`` removes the weights' prior entirely; the
logit-adjustment of Menon et al., ICLR 2021) moves undecided images away from COVID-19. COVID-vs-rest AUC
cannot change (one constant added to one logit keeps the order of p(covid)); the other figures can.

    PYTHONPATH=. python benchmarks/prior.py MODEL_DIR /work/shared/data/cxr3 [--wheels W ...]

One row per strength: the validation split (the group split of model.json) and, with ``--wheels`` (the
``pneumonia_model_package`` wheels of ``other_sources.py``), what the images of other sources are called.
The real CR ``RG1_UNCI`` of pydicom-data gets its p(covid). Prints a table and, as the last line, a JSON
object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from benchmarks import table
from benchmarks.orientation import read_pictures
from benchmarks.other_sources import read_wheel
from benchmarks.testdata import pydicom_data_file
from classifier.artifact import read_metadata
from classifier.dataset import load_collection, split_from_record
from classifier.ensemble import member_records
from classifier.inference import Classifier
from classifier.metrics import classification_report
from classifier.preprocess import read_dataset
from classifier.types import INDETERMINATE

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
Probabilities = npt.NDArray[np.float64]


def training_weights(records: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> npt.NDArray[np.float64]:
    """The class weights the model's networks were trained with, in class order: ``records`` are
    :func:`classifier.ensemble.member_records` (one, or a merged model's members, averaged); all ones for a
    network trained without."""
    weights = np.ones((len(records), len(classes)))
    for row, record in enumerate(records):
        for index, value in (record.get("recipe", {}).get("class_weights") or {}).items():
            weights[row, int(index)] = float(value)
    return np.asarray(weights.mean(axis=0), dtype=np.float64)


def reweigh(probabilities: Probabilities, weights: npt.NDArray[np.float64], strength: float) -> Probabilities:
    """Each row divided by ``weights ** strength``, renormalised to sum to 1."""
    adjusted = np.asarray(probabilities, dtype=np.float64) / np.power(weights, strength)
    return np.asarray(adjusted / adjusted.sum(axis=1, keepdims=True), dtype=np.float64)


def called(probabilities: Probabilities, classes: Sequence[str], threshold: float) -> list[str]:
    """The label of each row as the node gives it: the top class, or indeterminate below ``threshold``."""
    return [classes[int(row.argmax())] if row.max() >= threshold else INDETERMINATE for row in probabilities]


def _probabilities(
    classifier: Classifier, pictures: Sequence[Image.Image]
) -> tuple[Probabilities, list[bool]]:
    classes = classifier.info.classes
    rows: list[list[float]] = []
    doubted: list[bool] = []
    for start in range(0, len(pictures), 16):
        for prediction in classifier.predict_images(pictures[start : start + 16], heatmap=False):
            rows.append([prediction.probabilities[name] for name in classes])
            doubted.append(prediction.doubt is not None)  # the node refuses these
    return np.asarray(rows, dtype=np.float64), doubted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--wheels", type=Path, nargs="*", default=[], help="pneumonia_model_package wheels")
    parser.add_argument("--strengths", type=float, nargs="*", default=list(STRENGTHS))
    args = parser.parse_args(argv)

    metadata = read_metadata(args.model)
    classifier = Classifier.load(args.model)
    classes = classifier.info.classes
    threshold = classifier.indeterminate_threshold
    weights = training_weights(member_records(metadata), classes)
    _, validation = split_from_record(load_collection(args.data), metadata.data["split"])
    truth = np.asarray([classes.index(item.label) for item in validation], dtype=np.int64)
    clean, _ = _probabilities(classifier, read_pictures(validation))
    others = {
        name: (items, *_probabilities(classifier, [image for _, _, image in items]))
        for wheel in args.wheels
        for name, items in read_wheel(wheel).items()
    }
    rg1 = classifier.predict_datasets([read_dataset(pydicom_data_file("RG1_UNCI.dcm"))])
    rg1_row = np.asarray([[rg1[0].probabilities[name] for name in classes]], dtype=np.float64)

    rows: list[dict[str, Any]] = []
    for strength in args.strengths:
        report = classification_report(truth, reweigh(clean, weights, strength), classes)
        row: dict[str, Any] = {
            "strength": strength,
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
            "ece": report["expected_calibration_error"],
            **{f"recall_{name}": values["recall"] for name, values in report["per_class"].items()},
            "confusion_matrix": report["confusion_matrix"],
            "rg1_p_covid": float(reweigh(rg1_row, weights, strength)[0, classes.index("covid")]),
        }
        for name, (items, probabilities, doubted) in others.items():
            labels = called(reweigh(probabilities, weights, strength), classes, threshold)
            kept = [
                (label, item[1])
                for label, item, doubt in zip(labels, items, doubted, strict=True)
                if not doubt
            ]
            short = name.split(",")[0]  # "Kermany 2018", "adult web images"
            row[f"{short}: called covid"] = sum(label == "covid" for label, _ in kept)
            row[f"{short}: agree"] = sum(label == truth_label for label, truth_label in kept)
        rows.append(row)

    print(f"model {classifier.info.version}; class weights {np.round(weights, 3).tolist()}"
          f" ({', '.join(classes)}); validation split {len(validation)} images")  # fmt: skip
    keys = [key for key in rows[0] if key != "confusion_matrix"]
    headers = {"macro_f1": "macro-F1", "ece": "ECE", "rg1_p_covid": "RG1 p(covid)"}
    columns = [
        (headers.get(key, key.replace("_", " ").replace(": called", "").replace(":", "")),
         ".2f" if key == "strength" else ".3f" if isinstance(rows[0][key], float) else "d")
        for key in keys
    ]  # fmt: skip
    print(table.render(columns, [[row[key] for key in keys] for row in rows]))
    print(json.dumps({"model": classifier.info.version, "weights": weights.tolist(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
