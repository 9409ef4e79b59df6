"""Score an artifact on labelled images: metrics JSON + PNG figures, optionally after degrading them.

Degradations check that a model reads the lung and not the archive: the same images, re-encoded or
re-scaled the way another hospital's pipeline would, should get the same answers. Spelled
``kind:value`` and combinable with ``+``: ``jpeg:30`` (re-encode at JPEG quality 30), ``downscale:0.4``
(shrink then enlarge back), ``gamma:0.7``, ``crop:0.85`` (keep the central fraction), ``pad:0.1`` (black
frame of that fraction), ``noise:0.03`` (Gaussian, fixed seed).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageOps

from classifier import plots
from classifier.artifact import METADATA_FILE, METRICS_FILE
from classifier.dataset import (
    DatasetError,
    LabelledImage,
    fold_relabel,
    load_collection,
    load_gray,
    named_failure,
    trained_among,
    writable_output,
)
from classifier.errors import ClassifierError, ModelArtifactError, OutputError
from classifier.inference import MIN_SIDE, Classifier, load_input
from classifier.metrics import classification_report
from classifier.preprocess import gray_to_uint8, image_to_model_input, read_image_file, reduced_gray
from classifier.types import INDETERMINATE, Doubt, Prediction, doubt_of, label_key

LOGGER = logging.getLogger(__name__)

BATCH = 32


def _jpeg(image: Image.Image, quality: float) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("L").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return Image.open(buffer).convert("L")


def _downscale(image: Image.Image, factor: float) -> Image.Image:
    small = image.resize(
        (max(8, round(image.width * factor)), max(8, round(image.height * factor))), Image.Resampling.BILINEAR
    )
    return small.resize(image.size, Image.Resampling.BILINEAR)


def _gamma(image: Image.Image, gamma: float) -> Image.Image:
    table = [round(255.0 * (value / 255.0) ** gamma) for value in range(256)]
    return image.convert("L").point(table)


def _crop(image: Image.Image, keep: float) -> Image.Image:
    """The central ``keep`` of each side, never fewer than the :data:`MIN_SIDE` pixels the model reads: a
    crop to 5 % of a 461-px image (23 px) was refused as too small and ended the whole evaluation."""
    width, height = image.size
    dx, dy = (min(round(side * (1 - keep) / 2), max(0, (side - MIN_SIDE) // 2)) for side in (width, height))
    return image.crop((dx, dy, width - dx, height - dy))


def _pad(image: Image.Image, fraction: float) -> Image.Image:
    if fraction == 0:  # no frame: pad:0 added one pixel round the image
        return image
    border = max(1, round(min(image.size) * fraction))
    return ImageOps.expand(image.convert("L"), border=border, fill=0)


def _noise(image: Image.Image, sigma: float) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    noisy = np.clip(arr + rng.normal(0.0, sigma, arr.shape), 0.0, 1.0)
    return Image.fromarray((noisy * 255.0 + 0.5).astype(np.uint8))


def _bits(image: Image.Image, bits: float) -> Image.Image:
    """The picture as a 16-bit PNG of a ``bits``-bit radiograph would hold it (1 to 16 bits; last in a
    chain: the 8-bit steps above would clip its values)."""
    top = (1 << int(min(16.0, max(1.0, bits)))) - 1
    levels = np.asarray(image.convert("L"), dtype=np.float64) / 255.0 * top
    buffer = io.BytesIO()
    Image.fromarray(np.round(levels).astype(np.uint16)).save(buffer, format="PNG")
    buffer.seek(0)
    return Image.open(buffer)


DEGRADATIONS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "jpeg": _jpeg,
    "downscale": _downscale,
    "gamma": _gamma,
    "crop": _crop,
    "pad": _pad,
    "noise": _noise,
    "bits": _bits,
}


# What each value means, and so may be: gamma:-1 divided by zero and crop:1.5 framed the image in black.
_RANGES: dict[str, tuple[float, float, str]] = {
    "jpeg": (1, 100, "a JPEG quality from 1 to 100"),
    "downscale": (0.01, 1, "a scale from 0.01 to 1"),
    "gamma": (0.05, 20, "a gamma from 0.05 to 20"),
    "crop": (0.05, 1, f"the fraction kept, from 0.05 to 1 (at least {MIN_SIDE} px a side)"),
    "pad": (0, 1, "a frame's fraction of the shorter side, from 0 to 1"),
    "noise": (0, 1, "a noise level from 0 to 1"),
    "bits": (1, 16, "a bit depth from 1 to 16"),
}


def parse_degradation(text: str) -> Callable[[Image.Image], Image.Image] | None:
    """``"jpeg:30+downscale:0.5"`` → a function applying both in order; ``"none"`` → None. Each value must be
    in its kind's range, and ``bits`` comes last: every other step works on 8 bits and clipped its 16-bit
    values to white."""
    if text in ("", "none"):
        return None
    steps: list[tuple[Callable[[Image.Image, float], Image.Image], float]] = []
    parts = text.split("+")
    for number, part in enumerate(parts, start=1):
        kind, _, value = part.partition(":")
        try:
            steps.append((DEGRADATIONS[kind], float(value)))
        except (KeyError, ValueError):
            raise ValueError(
                f"unknown degradation {part!r}; use kind:value with kind in {', '.join(DEGRADATIONS)}"
            ) from None
        low, high, meaning = _RANGES[kind]
        if not low <= steps[-1][1] <= high:  # NaN too
            raise ValueError(f"degradation {part!r}: the value must be {meaning}")
        if kind == "bits" and number != len(parts):
            raise ValueError(f"degradation {part!r} must come last (the steps after it work on 8 bits)")

    def apply(image: Image.Image) -> Image.Image:
        for function, value in steps:
            image = function(image, value)
        return image

    return apply


def _as_picture(path: Path, min_side: int) -> Image.Image:
    """A file as the 8-bit grey picture a degradation works on: a DICOM image as its displayed grey levels
    (VOI, polarity and orientation applied), a picture as the model reads it (a 16-bit PNG scaled by its
    bit depth: Pillow's ``convert("L")`` would clip it to white), so each is degraded, none skipped. Both
    at the size the DICOM path reduces to: a picture was degraded at full size, so the same noise or
    down-sampling hit the same radiograph four times harder as DICOM (covid 0.54 against 0.90)."""
    gray = reduced_gray(load_gray(path, min_side=min_side), min_side)  # a DICOM image is already
    return Image.fromarray(gray_to_uint8(gray), mode="L")


def predict_items(
    classifier: Classifier,
    items: Sequence[LabelledImage],
    degrade: Callable[[Image.Image], Image.Image] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """N×C probabilities for labelled files (DICOM or PIL-readable), and N novelty ratios of the model inputs
    as they are (NaN when the model has no novelty check): the novelty score alone, without the turn and
    negative checks :func:`score_items` applies as the node does."""
    rows: list[np.ndarray] = []
    novelty: list[float] = []
    for start in range(0, len(items), BATCH):
        inputs = []
        for item in items[start : start + BATCH]:
            with named_failure(item.path, "cannot be evaluated"):  # one unreadable file: say which
                if degrade is None:
                    inputs.append(load_input(item.path, classifier.spec, classifier.lungs))
                else:
                    picture = _as_picture(item.path, max(classifier.spec.input_size))
                    inputs.append(image_to_model_input(degrade(picture), classifier.spec, classifier.lungs))
        for prediction in classifier.predict(inputs, heatmap=False):
            rows.append(np.array(list(prediction.probabilities.values())))
            novelty.append(np.nan if prediction.novelty is None else prediction.novelty)
    return np.asarray(rows, dtype=np.float64), np.asarray(novelty, dtype=np.float64)


def score_items(
    classifier: Classifier,
    items: Sequence[LabelledImage],
    degrade: Callable[[Image.Image], Image.Image] | None = None,
) -> tuple[np.ndarray, list[Prediction]]:
    """N×C probabilities for labelled files, and their predictions as the node makes them: a DICOM image
    head up by its header and a picture as the console reads it, each through the model's own checks
    (negative, wrong way up, unfamiliar), so that :attr:`Prediction.doubt` is what the node would skip.
    :func:`predict_items` gave the novelty score alone, which for inverted images refused 46 of 176 where
    the node's checks refuse all 176 (review)."""
    min_side = max(classifier.spec.input_size)
    predictions: list[Prediction] = []
    for start in range(0, len(items), BATCH):
        batch = items[start : start + BATCH]
        sources: list[pydicom.Dataset | Image.Image] = []
        for item in batch:
            with named_failure(item.path, "cannot be evaluated"):
                sources.append(
                    read_image_file(item.path) if degrade is None
                    else degrade(_as_picture(item.path, min_side))
                )
        try:
            predictions.extend(_predict_sources(classifier, sources))
        except ModelArtifactError:
            raise  # the model is broken, not one of the images
        except ClassifierError:  # one image the model cannot read: find it, and name it
            for item, source in zip(batch, sources, strict=True):
                with named_failure(item.path, "cannot be evaluated"):
                    predictions.extend(_predict_sources(classifier, [source]))
    rows = [list(prediction.probabilities.values()) for prediction in predictions]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(classifier.info.classes)), predictions


def _predict_sources(
    classifier: Classifier, sources: Sequence[pydicom.Dataset | Image.Image]
) -> list[Prediction]:
    """Predictions in the order of ``sources``, DICOM images and pictures each the way the node reads them."""
    datasets = [(i, s) for i, s in enumerate(sources) if isinstance(s, pydicom.Dataset)]
    pictures = [(i, s) for i, s in enumerate(sources) if not isinstance(s, pydicom.Dataset)]
    found: dict[int, Prediction] = {}
    if datasets:
        made = classifier.predict_datasets([s for _, s in datasets], heatmap=False)
        found.update(zip((i for i, _ in datasets), made, strict=True))
    if pictures:
        made = classifier.predict_images([s for _, s in pictures], heatmap=False)
        found.update(zip((i for i, _ in pictures), made, strict=True))
    return [found[i] for i in range(len(sources))]


def doubt_summary(predictions: Sequence[Prediction]) -> dict[str, Any]:
    """How many images the node's own checks would skip (``pipeline.skip_unfamiliar``), by the first reason
    of :func:`classifier.types.doubt_of`, and the median novelty as the node reports it."""
    doubts = [doubt_of(p.novelty, p.better_turn, p.negative) for p in predictions]
    novelty = [p.novelty for p in predictions if p.novelty is not None]
    skipped = sum(doubt is not None for doubt in doubts)
    return {
        "images": skipped,
        "fraction": skipped / len(predictions) if predictions else 0.0,
        **{doubt.value: sum(d is doubt for d in doubts) for doubt in Doubt},
        "novelty_median": float(np.median(novelty)) if novelty else None,
    }


LABEL_ALIASES = {
    "covid-19": "covid",
    "covid19": "covid",
    "non-covid-19": "non-covid",
    "noncovid": "non-covid",
    "no-finding": "normal",
}


def _label_key(label: str) -> str:
    key = label_key(label)
    return LABEL_ALIASES.get(key, key)


def class_indices(labels: Iterable[str], classes: Sequence[str]) -> dict[str, int]:
    """Each data label's index among a model's ``classes``: the same name, or the same once case,
    spaces and underscores are set aside and a few spellings of one class are read as one (``COVID-19``
    is ``covid``, ``No Finding`` is ``normal``), as a hospital's export folders may name them."""
    keys = [_label_key(name) for name in classes]
    distinct = set(labels)
    found: dict[str, int] = {}
    for label in distinct:
        if label in classes:
            found[label] = classes.index(label)
        elif _label_key(label) in keys:
            found[label] = keys.index(_label_key(label))
    unknown = sorted(distinct - set(found))
    if unknown:
        hint = "; merge classes with relabel, e.g. non-covid=normal,pneumonia" if len(classes) == 2 else ""
        raise DatasetError(f"labels {unknown} are not classes of the model {list(classes)}{hint}")
    return found


def _scored_data(
    classifier: Classifier, collection: Sequence[LabelledImage], split: str, relabel: Mapping[str, str] | None
) -> dict[str, Any]:
    """The report's ``data`` entry: which images were scored, and how many of them the model was
    trained on (a WARNING when some were; ``training_images_by``: how that was told)."""
    by: str | None = "split"
    if split == "validation":
        trained: int | None = 0
    elif split == "train":
        trained = len(collection)
    else:
        overlap = trained_among(collection, classifier.metadata.data)
        trained = None if overlap is None else overlap.images
        by = None if overlap is None else overlap.by
        if overlap is not None and overlap.images and overlap.by == "fingerprint":
            LOGGER.warning(
                "%d of these %d images are images the model was trained on (its recorded split, drawn "
                "again): the figures are not a held-out score; --split validation scores the others",
                overlap.images, len(collection),
            )  # fmt: skip
        elif overlap is not None and overlap.by == "sha256":
            LOGGER.warning(
                "%d of these %d images are images the model was trained on (their files, by the digests "
                "its model.json keeps of its training images): the figures are not a held-out score; "
                "score data without them, or the model's own data with --split validation",
                overlap.images, len(collection),
            )  # fmt: skip
        elif overlap is not None and overlap.images:
            LOGGER.warning(
                "these data have as many images and groups of each class on each side of the model's "
                "recorded split as the data it was trained on (it records no fingerprint to check them "
                "by): if they are those data, %d of these %d images are its training images and the "
                "figures are not a held-out score; --split validation scores the others",
                overlap.images, len(collection),
            )  # fmt: skip
    return {
        "split": split, "images": len(collection), "training_images": trained, "training_images_by": by,
        "relabel": dict(relabel or {}),
    }


def evaluate(
    model: Path,
    data: Path,
    *,
    output: Path | None = None,
    degrade: str = "none",
    items: Sequence[LabelledImage] | None = None,
    relabel: Mapping[str, str] | None = None,
    split: str = "all",
) -> dict[str, Any]:
    """Metrics of ``model`` on ``data`` (folder of class sub-folders or manifest CSV); writes
    ``metrics.json``, ``confusion_matrix.png`` and ``roc_reliability.png`` into ``output`` if given.

    ``split`` names which side of the model's recorded split ``items`` are ("validation", "train"), or
    "all" for the whole data; the report's ``data`` entry records it and how many of the images scored
    the model was trained on (:func:`classifier.dataset.trained_among`; None: cannot be told), and a
    WARNING says so when some were: the shipped model scored 0.917 on all of cxr3, 0.841 on its
    validation images (review).

    ``relabel`` ({old: new}, :func:`classifier.dataset.parse_relabel`) merges the data's classes first,
    e.g. normal and pneumonia into a two-class model's non-covid. Labels then match the model's classes
    as :func:`class_indices` reads them."""
    if output is not None:
        if (Path(output) / METADATA_FILE).is_file():  # its confusion_matrix.png is the model's own figure
            raise OutputError(
                f"cannot write the evaluation into {output}: it holds a model, whose validation figures "
                "it would replace; write it elsewhere"
            )
        writable_output(output, data)  # before the scoring, not after it
    classifier = Classifier.load(model)
    classes = classifier.info.classes
    collection = list(items) if items is not None else load_collection(data)
    if not collection:
        raise DatasetError("no images to evaluate")
    merged = fold_relabel(relabel or {})
    labels = [merged.get(label_key(item.label), item.label) for item in collection]
    index = class_indices(labels, classes)
    truth = np.array([index[label] for label in labels], dtype=np.int64)
    probabilities, predictions = score_items(classifier, collection, parse_degradation(degrade))
    report = classification_report(truth, probabilities, classes)
    if classifier.novelty is not None:
        # The node skips these (pipeline.skip_unfamiliar); the metrics above still count them.
        report["doubted"] = doubt_summary(predictions)
    # Below the threshold the node answers "indeterminate"; the metrics above use the top class.
    undecided = [p.label == INDETERMINATE for p in predictions]
    decided = [i for i, flag in enumerate(undecided) if not flag]
    report["indeterminate"] = {
        "threshold": classifier.indeterminate_threshold,
        "images": sum(undecided),
        "accuracy_of_the_rest": (
            float(np.mean(probabilities[decided].argmax(axis=1) == truth[decided])) if decided else None
        ),
    }
    report["model"] = {
        "name": classifier.info.name,
        "version": classifier.info.version,
        "sha256": classifier.info.sha256,
    }
    report["degradation"] = degrade
    report["data"] = _scored_data(classifier, collection, split, relabel)
    if output is not None:
        (output / METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        plots.confusion_matrix(
            report["confusion_matrix"], classes, output / "confusion_matrix.png",
            title="confusion matrix" if degrade == "none" else f"confusion matrix ({degrade})",
        )
        plots.roc_and_reliability(truth, probabilities, classes, output / "roc_reliability.png")
    return report
