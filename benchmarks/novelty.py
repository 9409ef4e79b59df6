"""How well a model's novelty check tells chest radiographs from anything else.

    PYTHONPATH=. python benchmarks/novelty.py MODEL_DIR /work/shared/data/cxr3

Rows: the validation split of the model (clean, and after the degradations of benchmarks/evaluate.py
and a 70 % crop, which the density was not fitted with), the real CRs of pydicom-data (a chest, RG1,
and a lower leg, RG3), and every other image object in pydicom's and pydicom-data's test files (CT, MR,
NM, US, photographs of faces, colour test patterns; none is a chest radiograph). Columns: how many images, how many the
check calls unfamiliar, and the median and range of the novelty ratio (1.0 is the threshold).
Prints a table and, as the last line, a JSON object.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks import table
from benchmarks.evaluate import DEGRADATIONS as ROBUSTNESS_DEGRADATIONS
from classifier.artifact import read_metadata
from classifier.cli import saying_errors
from classifier.dataset import LabelledImage, load_collection, split_from_record
from classifier.errors import ClassifierError
from classifier.evaluation import parse_degradation, predict_items
from classifier.inference import Classifier, load_input
from classifier.novelty import NoveltyCheck

# The robustness benchmark's degradations, and a tighter crop.
DEGRADATIONS = (*ROBUSTNESS_DEGRADATIONS, "crop:0.7")


def _ratios(classifier: Classifier, inputs: Sequence[np.ndarray]) -> list[float]:
    ratios: list[float] = []
    for start in range(0, len(inputs), 32):
        for prediction in classifier.predict(list(inputs[start : start + 32]), heatmap=False):
            assert prediction.novelty is not None
            ratios.append(prediction.novelty)
    return ratios


def _row(name: str, ratios: Sequence[float] | np.ndarray) -> dict[str, object]:
    values = np.asarray(ratios, dtype=np.float64)
    return {
        "set": name,
        "images": len(values),
        "unfamiliar": int(np.sum(values > 1.0)),
        "median": float(np.median(values)),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def _test_objects() -> list[Path]:
    import pydicom.data

    roots = [Path(pydicom.data.__file__).parent / "test_files"]
    from pydicom.data import get_testdata_file

    rg1 = get_testdata_file("RG1_UNCI.dcm", download=False)
    if rg1 is not None:
        roots.append(Path(str(rg1)).parent)
    return sorted({path for root in roots for path in root.rglob("*.dcm")})


def model_with_check(
    description: str, argv: list[str] | None
) -> tuple[Classifier, NoveltyCheck, list[LabelledImage]]:
    """``MODEL_DIR DATA`` from the command line: the model, its novelty check (which it must have) and its
    validation split of DATA."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    args = parser.parse_args(argv)

    classifier = Classifier.load(args.model)
    check = classifier.novelty
    if check is None:
        raise SystemExit(f"{args.model} has no novelty check: run 'cxr-node novelty {args.model} DATA'")
    _, validation = split_from_record(load_collection(args.data), read_metadata(args.model).data["split"])
    return classifier, check, validation


@saying_errors
def main(argv: list[str] | None = None) -> int:
    classifier, check, validation = model_with_check(__doc__ or "", argv)
    spec, lungs = classifier.spec, classifier.lungs
    rows = []
    for degradation in DEGRADATIONS:
        _, novelty = predict_items(classifier, validation, parse_degradation(degradation))
        rows.append(_row(f"validation, {degradation}", novelty))

    chest: list[np.ndarray] = []
    leg: list[np.ndarray] = []
    others: list[np.ndarray] = []
    for path in _test_objects():
        try:
            model_input = load_input(path, spec, lungs)
        except (ClassifierError, OSError, ValueError):
            continue  # not decodable here (no pixels, unsupported photometry...)
        (chest if path.name.startswith("RG1_") else leg if path.name.startswith("RG3_") else others).append(
            model_input
        )
    rows.append(_row("RG1 (chest CR, 4 encodings)", _ratios(classifier, chest)))
    rows.append(_row("RG3 (lower-leg CR, 4 encodings)", _ratios(classifier, leg)))
    rows.append(_row("other test objects (CT, MR, NM, US, photos, patterns)", _ratios(classifier, others)))

    print(f"model {classifier.info.version}, threshold {check.threshold:.4g}")
    columns = [("set", ""), ("images", ""), ("unfamiliar", ""),
               ("median", ".2f"), ("min", ".2f"), ("max", ".2f")]
    keys = [key for key, _ in columns]
    print(table.render(columns, [[row[key] for key in keys] for row in rows]))
    print(table.json_line({"model": classifier.info.version, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
