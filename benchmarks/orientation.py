"""Pictures the wrong way up: what the novelty check alone lets through, and what the turn check adds.

    PYTHONPATH=. python benchmarks/orientation.py MODEL_DIR /work/shared/data/cxr3

The model's validation pictures, as they are and turned by a quarter turn either way and upside down, go
through ``Classifier.predict_images`` (the console's path: a picture has no Patient Orientation, so every
one gets the turn check). Columns: refused by the novelty check alone (what read such images before the
turn check), flagged as the wrong way up by the turn check, refused by either check now, the accuracy
of what each lets through, and the turn check's median cost per image (its probe reads the features the
prediction computed; only an image it calls turned is read again, turned back). The same again after
degradations another pipeline applies (those of the robustness table, which the check was not fitted
with): a degraded upright picture flagged as turned would be a good image refused.
Prints a table and, as the last line, a JSON object.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable

from PIL import Image

from benchmarks import table
from benchmarks.novelty import model_with_check
from classifier.dataset import LabelledImage
from classifier.evaluation import parse_degradation
from classifier.inference import read_image_file
from classifier.types import Prediction

TURNS: tuple[tuple[str, Image.Transpose | None], ...] = (
    ("not turned", None),
    ("quarter turn anticlockwise", Image.Transpose.ROTATE_90),
    ("upside down", Image.Transpose.ROTATE_180),
    ("quarter turn clockwise", Image.Transpose.ROTATE_270),
)
BATCH = 16
DEGRADATIONS = (
    "none", "jpeg:30", "downscale:0.35", "noise:0.03", "crop:0.85", "jpeg:40+downscale:0.5+gamma:1.3"
)


def _accuracy(pairs: list[tuple[Prediction, str]]) -> float | None:
    return sum(p.top_class == label for p, label in pairs) / len(pairs) if pairs else None


def _row(degradation: str, turn: str, pairs: list[tuple[Prediction, str]]) -> dict[str, object]:
    novelty_passes = [(p, label) for p, label in pairs if not p.unfamiliar]
    both_pass = [(p, label) for p, label in novelty_passes if not p.looks_turned]
    return {
        "degradation": degradation,
        "pictures": turn,
        "images": len(pairs),
        "refused_novelty_alone": len(pairs) - len(novelty_passes),
        "flagged_turned": sum(p.looks_turned for p, _ in pairs),
        "refused_either": len(pairs) - len(both_pass),
        "accuracy_passed_novelty_alone": _accuracy(novelty_passes),
        "accuracy_passed_either": _accuracy(both_pass),
        "turn_check_ms_median": statistics.median(p.timings_ms["turn_check"] for p, _ in pairs),
    }


def _pictures(
    items: list[LabelledImage], degrade: Callable[[Image.Image], Image.Image] | None, turn: Image.Transpose | None
) -> list[Image.Image]:
    pictures = []
    for item in items:
        picture = read_image_file(item.path)  # as the console and `cxr-node classify` read it
        if not isinstance(picture, Image.Image):
            raise SystemExit(f"{item.path.name}: the validation images are pictures, not DICOM")
        if degrade is not None:
            picture = degrade(picture.convert("L"))
        pictures.append(picture if turn is None else picture.transpose(turn))
    return pictures


def main(argv: list[str] | None = None) -> int:
    classifier, _, validation = model_with_check(__doc__ or "", argv)
    rows = []
    for degradation in DEGRADATIONS:
        degrade = parse_degradation(degradation)
        for name, turn in TURNS:
            predictions: list[Prediction] = []
            for start in range(0, len(validation), BATCH):
                pictures = _pictures(validation[start : start + BATCH], degrade, turn)
                predictions += classifier.predict_images(pictures, heatmap=False)
            pairs = [(p, item.label) for p, item in zip(predictions, validation, strict=True)]
            rows.append(_row(degradation, name, pairs))

    print(f"model {classifier.info.version}; turn check: classifier.novelty.TurnProbe, novelty turned back")
    columns = [("degradation", ""), ("pictures", ""), ("images", ""), ("refused: novelty", ""),
               ("flagged turned", ""), ("either", ""), ("acc. passed: novelty", ".3f"), ("+ turn check", ".3f"), ("turn ms", ".1f")]
    keys = ["degradation", "pictures", "images", "refused_novelty_alone", "flagged_turned", "refused_either",
            "accuracy_passed_novelty_alone", "accuracy_passed_either", "turn_check_ms_median"]
    print(table.render(columns, [[row[key] for key in keys] for row in rows]))
    print(json.dumps({"model": classifier.info.version, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
