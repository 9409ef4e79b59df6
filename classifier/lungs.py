"""Lung-field focus: a small U-Net finds the lungs, and the classifier sees only the box around them.

The classes of the training collection are separable by *framing* (COVID-19 figures from papers are tight
crops, the NIH images show neck and shoulders). Cropping every image to its lung fields gives every source
the same frame. A fixed central crop did not do that, and a hand-made threshold crop failed on 12–20 % of
the images (model card), so the lungs are segmented by a network:

- ``build_lung_unet``: a 4-level U-Net on 128×128 equalised grey, 0.49 M parameters.
- ``train_lung_model``: trains it on images whose lung masks are known. The masks used for the shipped
  model are the V7 Labs lung annotations of the Cohen et al. COVID-19 collection, which the PyPI package
  ``torchxrayvision`` carries (``torchxrayvision/data/semantic_masks_v7labs_lungs.zip``); a mask is matched
  to an image by the file name stem of the manifest's ``source`` column. Masks of other sizes are
  stretched onto the image (the annotated copies differ slightly in size from the collection's).
- ``LungCropper``: loads that artifact, predicts the mask of a grey image and returns the box around it
  plus a margin, or ``None`` when the mask is implausible (then the caller keeps the whole image).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from classifier.artifact import ArtifactMetadata, load_verified_keras, read_json, sha256_file
from classifier.dataset import IMAGE_SUFFIXES, LabelledImage, load_gray, named_failure
from classifier.errors import ClassifierError, ModelArtifactError
from classifier.preprocess import Box, FloatImage, equalise, resize_gray

LOGGER = logging.getLogger(__name__)

LUNG_MODEL_FILE = "lungs.keras"
LUNG_META_FILE = "lungs.json"
LUNG_FILES = (LUNG_MODEL_FILE, LUNG_META_FILE)
LUNG_INPUT = 128
LUNG_EPOCHS = 120  # the U-Net's training, as train-lungs and train --lung-masks run it
THRESHOLD = 0.5
MARGIN = 0.06  # of the box's own height/width, on every side
MIN_AREA, MAX_AREA = 0.04, 0.85  # plausible lung fraction of the image
MIN_SIDE = 0.3  # a box narrower or lower than this fraction of the image is not two lungs
MIN_COMPONENT = 0.15  # a second component smaller than this fraction of the largest is not a lung
LABEL_VALUES = 8  # a mask of at most this many values is a label image (drawn flat), not a grey one
UNUSABLE_MASK = "is not a usable lung mask"  # what a mask that cannot be read or used is said to be
PROFILE_MIN = 0.02  # a row/column counts when this fraction of its pixels is lung (ignores specks)


class LungMaskError(ClassifierError):
    """Lung masks are missing or do not match the collection."""


@dataclass(frozen=True)
class MaskedImage:
    image: Path
    mask: Path


def find_masks(data: Path, masks: Path, items: Sequence[LabelledImage] | None = None) -> list[MaskedImage]:
    """Images of ``data`` (a collection with ``manifest.csv``) that have a mask in the folder ``masks``.

    A mask belongs to the image whose manifest ``source`` has the same file name stem (case-insensitive).
    ``items`` restricts the result to those images (a training split).
    """
    manifest = data / "manifest.csv" if data.is_dir() else data
    if not manifest.is_file():
        raise LungMaskError(
            f"{manifest} not found: lung masks are matched through the manifest's source column"
        )
    if not masks.is_dir():
        raise LungMaskError(f"no folder of lung masks at {masks}")
    by_stem: dict[str, Path] = {}
    for path in sorted(masks.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem.lower() in by_stem:  # which one is the image's was up to the folder's order
                raise LungMaskError(
                    f"two lung masks are named {path.stem}: {by_stem[path.stem.lower()].name}, {path.name}"
                )
            by_stem[path.stem.lower()] = path
    allowed = None if items is None else {item.path.resolve() for item in items}
    pairs: list[MaskedImage] = []
    owner: dict[str, Path] = {}
    with manifest.open(newline="") as handle:
        for row in csv.DictReader(handle):
            stem = Path(row.get("source") or row["file"]).stem.lower()
            image = (manifest.parent / row["file"]).resolve()
            if stem not in by_stem:
                continue
            if owner.setdefault(stem, image) != image:  # left/0.png and right/0.png, without a source column
                raise LungMaskError(
                    f"lung mask {by_stem[stem].name} matches two images of {manifest.name} "
                    f"({owner[stem].name}, {image.name}): give the manifest a source column of unique names"
                )
            if allowed is None or image in allowed:
                pairs.append(MaskedImage(image=image, mask=by_stem[stem]))
    if not pairs:
        raise LungMaskError(f"no image of {manifest} has a mask in {masks}")
    usable = []
    for pair in pairs:
        with named_failure(pair.mask, UNUSABLE_MASK):  # a damaged file is named
            try:
                load_mask(pair)
            except LungMaskError:  # drawn without lungs (82 of the 517 v7labs masks): it teaches "no lung"
                continue
        usable.append(pair)
    if len(usable) < len(pairs):
        LOGGER.warning(
            "%d of %d lung masks left out: no plausible lungs (empty, all lung, or drawn inverted)",
            len(pairs) - len(usable),
            len(pairs),
        )
    if not usable:
        raise LungMaskError(f"no mask in {masks} for an image of {manifest} shows plausible lungs")
    return usable


def segmenter_input(gray: FloatImage) -> FloatImage:
    """What the U-Net sees: the whole grey image stretched to 128×128 and equalised."""
    return equalise(resize_gray(gray, (LUNG_INPUT, LUNG_INPUT)))


def load_mask(pair: MaskedImage) -> FloatImage:
    """The binary mask at the U-Net's size, stretched as the image is (whatever size it was drawn at).

    Masks come as 0/255 grey, as label images (0/1, or 1 and 2 for the two lungs; 8 or 16 bits) and as
    lungs painted in a colour; the first reading (grey above 127) took the last two for masks without
    lungs, on which a U-Net trained to a Dice of 0. A mask of a few values (at most
    :data:`LABEL_VALUES`, in its brightest colour channel) is a label image: every value but 0 is lung.
    One of many values (drawn smooth, or saved as JPEG) is lung where brighter than half its maximum.
    A mask whose lungs cover too little or too much of the image, or that reaches round its border
    (drawn inverted: lungs black), is refused."""
    with Image.open(pair.mask) as opened:
        shown: Image.Image = opened
        if opened.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "HSV", "LAB"):
            shown = opened.convert("RGB")  # a palette's colours; transparency is not a lung
        values = np.asarray(shown, dtype=np.float32)
    if values.ndim == 3:
        values = values.max(axis=2)
    peak = float(values.max()) if values.size else 0.0
    labelled = len(np.unique(values)) <= LABEL_VALUES  # at half the maximum, label 1 of 0/1/2 was lost
    mask = values > (0 if labelled else peak / 2)
    fraction = float(mask.mean()) if mask.size else 0.0
    if not MIN_AREA <= fraction <= MAX_AREA:
        raise LungMaskError(
            f"lungs cover {fraction:.0%} of it, not {MIN_AREA:.0%} to {MAX_AREA:.0%} (empty, all lung, or "
            "not a mask)"
        )
    border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    if float(border.mean()) > 0.5:
        raise LungMaskError("lung along most of its edge: is it drawn inverted (lungs black)?")
    stretched = resize_gray(mask.astype(np.float32), (LUNG_INPUT, LUNG_INPUT))
    return (stretched > 0.5).astype(np.float32)


def load_pair(pair: MaskedImage) -> tuple[FloatImage, FloatImage]:
    """(input, mask) at the U-Net's size."""
    with named_failure(pair.image):
        image = segmenter_input(load_gray(pair.image, upright=False))
    with named_failure(pair.mask, UNUSABLE_MASK):
        mask = load_mask(pair)
    return image, mask


def build_lung_unet(size: int = LUNG_INPUT, widths: Sequence[int] = (16, 32, 64, 128)) -> Any:
    """U-Net (Ronneberger et al. 2015) with batch norm: 1-channel input, lung probability output."""
    from tensorflow import keras

    def block(x: Any, filters: int) -> Any:
        for _ in range(2):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.Activation("relu")(x)
        return x

    inputs = keras.Input((size, size, 1), name="grey")
    x = inputs
    skips = []
    for filters in widths[:-1]:
        x = block(x, filters)
        skips.append(x)
        x = keras.layers.MaxPooling2D()(x)
    x = block(x, widths[-1])
    for filters, skip in zip(reversed(widths[:-1]), reversed(skips), strict=True):
        x = keras.layers.UpSampling2D(interpolation="bilinear")(x)
        x = keras.layers.Concatenate()([x, skip])
        x = block(x, filters)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", name="lungs")(x)
    return keras.Model(inputs, outputs, name="lungs-unet")


def dice(predicted: npt.NDArray[Any], truth: npt.NDArray[Any]) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty)."""
    p, t = predicted.astype(bool), truth.astype(bool)
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(p, t).sum()) / total


def components(mask: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.int32], list[int]]:
    """4-connected components of a binary mask: a label image (0 = background, 1… = components) and the
    size of each component (index 0 unused). Union-find over the runs of each row, so it costs a few
    hundred Python steps on a 128×128 mask instead of one per pixel."""
    runs: list[tuple[int, int, int]] = []  # (row, start, end)
    parent: list[int] = []

    def find(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    previous: list[int] = []
    for row in range(mask.shape[0]):
        padded = np.concatenate(([False], mask[row], [False]))
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        current = []
        for start, end in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            index = len(runs)
            runs.append((row, start, end))
            parent.append(index)
            current.append(index)
            for other in previous:
                _, other_start, other_end = runs[other]
                if other_start < end and start < other_end:
                    root_a, root_b = find(index), find(other)
                    if root_a != root_b:
                        parent[max(root_a, root_b)] = min(root_a, root_b)
        previous = current
    labels = np.zeros(mask.shape, dtype=np.int32)
    numbers: dict[int, int] = {}
    sizes = [0]
    for index, (row, start, end) in enumerate(runs):
        root = find(index)
        if root not in numbers:
            numbers[root] = len(sizes)
            sizes.append(0)
        labels[row, start:end] = numbers[root]
        sizes[numbers[root]] += end - start
    return labels, sizes


def lung_mask(probability: FloatImage) -> npt.NDArray[np.bool_]:
    """The two largest components of the thresholded map (two lungs), dropping specks and stray
    blobs smaller than :data:`MIN_COMPONENT` of the largest."""
    labels, sizes = components(probability > THRESHOLD)
    if len(sizes) <= 1:
        return np.zeros(probability.shape, dtype=bool)
    ranked = sorted(range(1, len(sizes)), key=lambda n: sizes[n], reverse=True)[:2]
    keep = [n for n in ranked if sizes[n] >= MIN_COMPONENT * sizes[ranked[0]]]
    return np.isin(labels, keep)


def mask_box(probability: FloatImage) -> Box | None:
    """The box around the predicted lungs plus :data:`MARGIN`, in fractions; ``None`` if implausible."""
    mask = lung_mask(probability)
    area = float(mask.mean())
    if not MIN_AREA <= area <= MAX_AREA:
        return None
    height, width = mask.shape
    rows = np.flatnonzero(mask.sum(axis=1) >= PROFILE_MIN * width)
    cols = np.flatnonzero(mask.sum(axis=0) >= PROFILE_MIN * height)
    if rows.size == 0 or cols.size == 0:
        return None
    top, bottom = float(rows[0]) / height, float(rows[-1] + 1) / height
    left, right = float(cols[0]) / width, float(cols[-1] + 1) / width
    if bottom - top < MIN_SIDE or right - left < MIN_SIDE:
        return None
    dy, dx = MARGIN * (bottom - top), MARGIN * (right - left)
    return Box(max(0.0, top - dy), min(1.0, bottom + dy), max(0.0, left - dx), min(1.0, right + dx))


class LungCropper:
    """A trained lung U-Net artifact (``lungs.keras`` + ``lungs.json``): grey image → lung box."""

    def __init__(self, model: Any, metadata: dict[str, Any]) -> None:
        self._model = model
        self.metadata = metadata
        self._forward: Any | None = None

    @classmethod
    def load(cls, folder: Path, *, recorded: str | None = None) -> LungCropper:
        """The lung model in ``folder``, checked against its lungs.json and, when given, the sha256 that
        the classifier's model.json ``recorded`` for it."""
        meta_path, model_path = folder / LUNG_META_FILE, folder / LUNG_MODEL_FILE
        if not meta_path.is_file() or not model_path.is_file():
            raise ModelArtifactError(
                f"{folder} is not a lung model (needs {LUNG_MODEL_FILE} and {LUNG_META_FILE})"
            )
        metadata = read_json(meta_path)
        if not isinstance(metadata, dict):
            raise ModelArtifactError(f"{meta_path} does not hold a JSON object")
        if not metadata.get("sha256"):  # the trainer records it; without it a swapped file would go unnoticed
            raise ModelArtifactError(f"{LUNG_META_FILE} records no sha256 for {LUNG_MODEL_FILE}")
        digest = str(metadata["sha256"]).lower()  # as sha256_file writes it; tools also print upper case
        if recorded is not None and digest != str(recorded).lower():
            raise ModelArtifactError(f"{folder} is not the lung model that model.json records (sha256)")
        model = load_verified_keras(model_path, digest, LUNG_META_FILE)  # the bytes hashed are those loaded
        if tuple(model.input_shape) != (None, LUNG_INPUT, LUNG_INPUT, 1):
            raise ModelArtifactError(f"{model_path} is not a lung U-Net (input {model.input_shape})")
        return cls(model, metadata)

    def probabilities(self, grays: Sequence[FloatImage]) -> npt.NDArray[np.float32]:
        """N×128×128 lung probabilities of whole grey images."""
        if not grays:
            return np.zeros((0, LUNG_INPUT, LUNG_INPUT), dtype=np.float32)
        batch = np.stack([segmenter_input(gray) for gray in grays])[..., None]
        if self._forward is None:
            import tensorflow as tf

            signature = [tf.TensorSpec((None, LUNG_INPUT, LUNG_INPUT, 1), tf.float32)]
            # One traced graph for every batch size: an eager Keras call costs ~15 ms of Python.
            self._forward = tf.function(lambda x: self._model(x, training=False), input_signature=signature)
        return np.asarray(self._forward(batch), dtype=np.float32)[..., 0]

    def box(self, gray: FloatImage) -> Box | None:
        return mask_box(self.probabilities([gray])[0])


# ------------------------------------------------------------------------------------------ training


def _geometry(seed: int) -> Any:
    """Random flip, rotation ±10°, zoom and shift (built once: the layers hold their seed state)."""
    from tensorflow import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(10 / 360, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomZoom((-0.3, 0.25), fill_mode="constant", seed=seed + 2),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=seed + 3),
        ]
    )


def _augment(geometry: Any, images: Any, masks: Any) -> tuple[Any, Any]:
    """The same random geometry on image and mask; gamma and noise on the image only."""
    import tensorflow as tf

    stacked = geometry(tf.concat([images, masks], axis=-1), training=True)
    image, mask = stacked[..., :1], tf.cast(stacked[..., 1:] > 0.5, tf.float32)
    batch = tf.shape(image)[0]
    gamma = tf.exp(tf.random.uniform((batch, 1, 1, 1), -0.4, 0.4))
    image = tf.clip_by_value(image, 1e-6, 1.0) ** gamma
    image = image + tf.random.normal(tf.shape(image), 0.0, tf.random.uniform((batch, 1, 1, 1), 0.0, 0.04))
    return tf.clip_by_value(image, 0.0, 1.0), mask


def train_lung_model(
    train: Sequence[MaskedImage],
    validation: Sequence[MaskedImage],
    output: Path,
    *,
    epochs: int = 120,
    batch_size: int = 8,
    seed: int = 42,
    version: str | None = None,
) -> dict[str, Any]:
    """Train the U-Net, write ``lungs.keras`` + ``lungs.json`` to ``output``, return the metadata."""
    import tensorflow as tf
    from tensorflow import keras

    if not train:
        raise LungMaskError("no training images with lung masks")
    held_out = _read_held_out(validation)  # now: a damaged one was found only after every epoch
    keras.utils.set_random_seed(seed)
    pairs = [load_pair(pair) for pair in train]
    images = np.stack([p[0] for p in pairs])[..., None]
    masks = np.stack([p[1] for p in pairs])[..., None]
    model = build_lung_unet()
    steps = max(1, math.ceil(len(images) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, epochs * steps)
    optimizer = keras.optimizers.Adam(schedule)

    def loss_fn(truth: Any, predicted: Any) -> Any:
        bce = keras.losses.binary_crossentropy(truth, predicted)
        overlap = tf.reduce_sum(truth * predicted, axis=(1, 2, 3))
        total = tf.reduce_sum(truth + predicted, axis=(1, 2, 3))
        return tf.reduce_mean(bce) + tf.reduce_mean(1.0 - (2.0 * overlap + 1.0) / (total + 1.0))

    geometry = _geometry(seed)

    @tf.function  # type: ignore[untyped-decorator]
    def step(x: Any, y: Any) -> Any:
        x, y = _augment(geometry, x, y)
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        losses = [
            float(step(tf.constant(images[idx]), tf.constant(masks[idx])))
            for idx in (order[i : i + batch_size] for i in range(0, len(order), batch_size))
        ]
        if epoch % 20 == 0 or epoch == epochs - 1:
            LOGGER.info("lungs epoch %d/%d loss %.4f", epoch + 1, epochs, float(np.mean(losses)))

    output.mkdir(parents=True, exist_ok=True)
    model_path = output / LUNG_MODEL_FILE
    model.save(model_path, include_optimizer=False)
    cropper = LungCropper(model, {})
    metadata: dict[str, Any] = {
        "name": "lungs-unet",
        "version": version or f"lungs-unet-{datetime.now(UTC):%Y%m%d}",
        "input_size": [LUNG_INPUT, LUNG_INPUT],
        "threshold": THRESHOLD,
        "margin": MARGIN,
        "training": {"images": len(train), "epochs": epochs, "batch_size": batch_size, "seed": seed},
        "validation": _dice(cropper, held_out) if held_out else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "sha256": sha256_file(model_path),
    }
    (output / LUNG_META_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def train_lung_model_on_split(
    data: Path,
    masks: Path,
    train_items: Sequence[LabelledImage],
    held_out_items: Sequence[LabelledImage],
    output: Path,
    **options: Any,
) -> tuple[dict[str, Any], int, int]:
    """Train on the masked images among ``train_items`` and report Dice on those among ``held_out_items``
    (none there: no Dice). Returns the metadata and both counts; ``options`` go to :func:`train_lung_model`."""
    train_pairs = find_masks(data, masks, train_items)
    try:
        held_pairs = find_masks(data, masks, held_out_items)
    except LungMaskError:
        held_pairs = []
    metadata = train_lung_model(train_pairs, held_pairs, output, **options)
    return metadata, len(train_pairs), len(held_pairs)


def _read_held_out(pairs: Sequence[MaskedImage]) -> list[tuple[FloatImage, FloatImage]]:
    """(grey image as stored, mask) of each pair; a file that cannot be read is named."""
    held_out = []
    for pair in pairs:
        with named_failure(pair.image):
            gray = load_gray(pair.image, upright=False)  # the mask is drawn on the stored pixels
        with named_failure(pair.mask, UNUSABLE_MASK):
            held_out.append((gray, load_mask(pair)))
    return held_out


def _dice(cropper: LungCropper, held_out: Sequence[tuple[FloatImage, FloatImage]]) -> dict[str, float]:
    scores, fallbacks = [], 0
    for gray, mask in held_out:
        probability = cropper.probabilities([gray])[0]
        scores.append(dice(probability > THRESHOLD, mask))
        fallbacks += mask_box(probability) is None
    return {
        "images": len(held_out),
        "dice_mean": float(np.mean(scores)),
        "dice_min": float(np.min(scores)),
        "whole_image_fallbacks": fallbacks,
    }


def evaluate_lung_model(cropper: LungCropper, pairs: Sequence[MaskedImage]) -> dict[str, float]:
    """Mean Dice of the network's thresholded masks (before the two-component clean-up), and how often
    the crop box falls back to the whole image."""
    return _dice(cropper, _read_held_out(pairs))


def artifact_lungs(artifact: Path, metadata: ArtifactMetadata) -> LungCropper | None:
    """The lung model that crops a classifier artifact's input (``ARTIFACT/lungs/``), held to the sha256
    its model.json records, or None when the input is not cropped: checked against its own lungs.json only,
    another U-Net swapped in cropped every image differently under the same model identity."""
    if not metadata.preprocess.lung_crop:
        return None
    recorded = metadata.lungs.get("sha256")
    if not recorded:
        raise ModelArtifactError("model.json records no sha256 for its lung model")
    return LungCropper.load(artifact / "lungs", recorded=str(recorded))


def stage_lung_model(source: Path, artifact: Path) -> list[Path]:
    """Write the lung model into a classifier artifact (``ARTIFACT/lungs/``), so it ships with it, at its
    files' staged names; their places, for :func:`classifier.artifact.write_metadata` to put them there
    with the model.json that records them."""
    from classifier.artifact import staged

    target = artifact / "lungs"
    target.mkdir(parents=True, exist_ok=True)
    places = [target / name for name in LUNG_FILES]
    for place in places:
        staged(place).write_bytes((source / place.name).read_bytes())
    return places


def copy_lung_model(source: Path, artifact: Path) -> Path:
    """The lung model copied into ``ARTIFACT/lungs/`` at once (:func:`stage_lung_model`, then in place)."""
    from classifier.artifact import staged

    for place in stage_lung_model(source, artifact):
        staged(place).replace(place)
    return artifact / "lungs"
