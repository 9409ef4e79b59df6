"""Robustness of a model artifact: its validation split (the group split recorded in model.json), clean
and after re-encoding/degradations another hospital's pipeline could apply, plus its answers on the real
CRs of pydicom-data. A model that reads the source instead of the lung loses accuracy under these.

    PYTHONPATH=. python benchmarks/evaluate.py MODEL_DIR /work/shared/data/cxr3

Prints a table and, as the last line, a JSON object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks import table
from benchmarks.testdata import pydicom_data_file
from classifier.artifact import read_metadata
from classifier.cli import degradation, saying_errors
from classifier.dataset import load_collection, split_from_record
from classifier.evaluation import evaluate
from classifier.inference import Classifier
from classifier.preprocess import read_dataset

DEGRADATIONS = (
    "none",
    "jpeg:30",
    "downscale:0.35",
    "gamma:0.6",
    "gamma:1.6",
    "crop:0.85",
    "pad:0.08",
    "noise:0.03",
    "jpeg:40+downscale:0.5+gamma:1.3",
    "bits:12",
)


@saying_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument(  # the spellings 'cxr-node evaluate --degrade' reads, checked before the model loads
        "--degradations", nargs="+", type=degradation, default=list(DEGRADATIONS), metavar="DEGRADATION"
    )
    args = parser.parse_args(argv)

    split = read_metadata(args.model).data.get("split", {})
    _, validation = split_from_record(load_collection(args.data), split)
    rows = []
    for spelling in args.degradations:
        report = evaluate(args.model, args.data, degrade=spelling, items=validation, split="validation")
        per_class = report["per_class"]
        rows.append(
            {
                "degradation": spelling,
                "accuracy": report["accuracy"],
                "macro_f1": report["macro_f1"],
                "ece": report["expected_calibration_error"],
                **{f"auc_{name}": values["roc_auc"] for name, values in per_class.items()},
                **{f"recall_{name}": values["recall"] for name, values in per_class.items()},
            }
        )
    columns = list(rows[0])[1:]
    print(f"validation split: {len(validation)} images, model {args.model}")
    print(table.render(
        [("degradation", ""), *((c, ".3f") for c in columns)],
        [[row["degradation"], *(row[c] for c in columns)] for row in rows],
    ))

    classifier = Classifier.load(args.model)
    real: dict[str, dict[str, Any]] = {}
    for name in ("RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG3_UNCI.dcm"):
        prediction = classifier.predict_datasets([read_dataset(pydicom_data_file(name))])[0]
        # the node answers no finding for an image its own checks doubt (RG3: unlike the training images)
        real[name] = {**prediction.probabilities, "novelty": prediction.novelty, "doubt": prediction.doubt}
        probabilities = " ".join(f"{k}={v:.3f}" for k, v in prediction.probabilities.items())
        shown = "doubted" if prediction.doubt is not None else prediction.label
        reason = f"  ({prediction.doubt})" if prediction.doubt else ""
        print(f"{name:<14} {shown:<14} {probabilities}{reason}")
    print(table.json_line({"model": classifier.info.version, "validation": rows, "real_cr": real}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
