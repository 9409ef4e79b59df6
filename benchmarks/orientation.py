"""Pictures the wrong way up or inverted: what the novelty check alone lets through, and what the turn and
negative checks add.

    PYTHONPATH=. python benchmarks/orientation.py MODEL_DIR /work/shared/data/cxr3

The model's validation pictures, as they are, turned by a quarter turn either way and upside down, inverted (a
negative), and mirrored left to right go through ``Classifier.predict_images`` (the console's path: a picture
has no header to say which way is up or which polarity it has). A mirrored picture is not a turn: the model
was trained with horizontal flips, so it should read it as it reads the picture as it is, and no check should
flag it. Columns: refused by the novelty check alone (what read such images before the turn and negative
checks), flagged as the wrong way up, flagged as a negative, refused as unlike the training images both ways
(the probe names a presentation, undone the picture is unfamiliar too, and the density alone let it through),
refused by any check now, the accuracy of what the novelty check alone and all checks let through, and the
checks' median cost per image (their probes read the features the prediction computed; only an image one of
them doubts is read again, turned or inverted back). The same again after degradations another pipeline
applies (those of the robustness table, which the checks were not fitted with): a degraded upright picture
flagged would be a good image refused.
Prints a table and, as the last line, a JSON object.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

from PIL import Image, ImageOps

from benchmarks import table
from benchmarks.novelty import model_with_check
from classifier.cli import saying_errors
from classifier.dataset import LabelledImage
from classifier.evaluation import parse_degradation
from classifier.preprocess import framed_model_input, pil_to_gray, read_image_file
from classifier.types import NOVELTY_LIMIT, Prediction

Edit = Callable[[Image.Image], Image.Image]
VARIANTS: tuple[tuple[str, Edit | None], ...] = (
    ("as they are", None),
    ("quarter turn anticlockwise", lambda p: p.transpose(Image.Transpose.ROTATE_90)),
    ("upside down", lambda p: p.transpose(Image.Transpose.ROTATE_180)),
    ("quarter turn clockwise", lambda p: p.transpose(Image.Transpose.ROTATE_270)),
    ("inverted (a negative)", lambda p: ImageOps.invert(p.convert("L"))),
    ("mirrored (left-right)", ImageOps.mirror),
)
BATCH = 16
DEGRADATIONS = (
    "none", "jpeg:30", "downscale:0.35", "noise:0.03", "crop:0.85", "jpeg:40+downscale:0.5+gamma:1.3"
)  # fmt: skip


def _accuracy(pairs: list[tuple[Prediction, str]]) -> float | None:
    return sum(p.top_class == label for p, label in pairs) / len(pairs) if pairs else None


def _row(
    degradation: str, variant: str, pairs: list[tuple[Prediction, str]], density: list[float | None]
) -> dict[str, object]:
    """``density``: each picture's novelty by the density alone (what read such images before the turn and
    negative checks)."""
    density_refuses = [ratio is not None and ratio > NOVELTY_LIMIT for ratio in density]
    novelty_passes = [pair for pair, refused in zip(pairs, density_refuses, strict=True) if not refused]
    all_pass = [(p, label) for p, label in pairs if p.doubt is None]
    return {
        "degradation": degradation,
        "pictures": variant,
        "images": len(pairs),
        "refused_novelty_alone": sum(density_refuses),
        "flagged_turned": sum(p.looks_turned for p, _ in pairs),
        "flagged_negative": sum(p.negative for p, _ in pairs),
        # the probe names a presentation, undone the picture is unfamiliar too, and the density alone
        # would have let it through
        "unlike_both_ways": sum(
            p.unfamiliar and not refused for (p, _), refused in zip(pairs, density_refuses, strict=True)
        ),
        "refused_any": len(pairs) - len(all_pass),
        "accuracy_passed_novelty_alone": _accuracy(novelty_passes),
        "accuracy_passed_all": _accuracy(all_pass),
        "checks_ms_median": statistics.median(p.timings_ms["input_checks"] for p, _ in pairs),
    }


def read_pictures(items: list[LabelledImage]) -> list[Image.Image]:
    pictures = []
    for item in items:
        picture = read_image_file(item.path)  # as the console and `cxr-node classify` read it
        if not isinstance(picture, Image.Image):
            raise SystemExit(f"{item.path.name}: the validation images are pictures, not DICOM")
        pictures.append(picture)
    return pictures


@saying_errors
def main(argv: list[str] | None = None) -> int:
    classifier, _, validation = model_with_check(__doc__ or "", argv)
    originals = read_pictures(validation)  # read once; every degradation is deterministic
    spec, lungs = classifier.spec, classifier.lungs
    rows = []
    for degradation in DEGRADATIONS:
        degrade = parse_degradation(degradation)
        degraded = originals if degrade is None else [degrade(p.convert("L")) for p in originals]
        for name, edit in VARIANTS:
            pictures = degraded if edit is None else [edit(p) for p in degraded]
            predictions: list[Prediction] = []
            density: list[float | None] = []
            for start in range(0, len(pictures), BATCH):
                batch = pictures[start : start + BATCH]
                predictions += classifier.predict_images(batch, heatmap=False)
                inputs = [framed_model_input(pil_to_gray(p), spec, lungs)[0] for p in batch]
                density += [p.novelty for p in classifier.predict(inputs, heatmap=False)]  # no probe
            pairs = [(p, item.label) for p, item in zip(predictions, validation, strict=True)]
            rows.append(_row(degradation, name, pairs, density))

    print(f"model {classifier.info.version}; checks: classifier.novelty (density, turn and negative probes)")
    columns = [("degradation", ""), ("pictures", ""), ("images", ""), ("refused: novelty", ""),
               ("turned", ""), ("negative", ""), ("unlike both ways", ""), ("any", ""),
               ("acc. passed: novelty", ".3f"), ("all checks", ".3f"), ("checks ms", ".1f")]
    keys = ["degradation", "pictures", "images", "refused_novelty_alone", "flagged_turned", "flagged_negative",
            "unlike_both_ways", "refused_any", "accuracy_passed_novelty_alone", "accuracy_passed_all",
            "checks_ms_median"]
    print(table.render(columns, [[row[key] for key in keys] for row in rows]))
    print(table.json_line({"model": classifier.info.version, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
