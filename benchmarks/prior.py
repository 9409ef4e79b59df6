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

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks import table
from benchmarks.posthoc import Probabilities, called, parser, score
from classifier.cli import saying_errors
from classifier.ensemble import member_records
from classifier.metrics import classification_report

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


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


@saying_errors
def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__ or "")
    arguments.add_argument("--strengths", type=float, nargs="*", default=list(STRENGTHS))
    args = arguments.parse_args(argv)

    scored = score(args.model, args.data, args.wheels)
    classifier, classes, truth, clean = scored.classifier, scored.classes, scored.truth, scored.probabilities
    threshold = classifier.indeterminate_threshold
    weights = training_weights(member_records(scored.metadata), classes)
    rg1_row, others, validation = scored.rg1, scored.others, scored.validation

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
    print(table.json_line({"model": classifier.info.version, "weights": weights.tolist(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
