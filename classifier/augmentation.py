"""Training-time augmentation of grey batches, in TensorFlow, ending in the model's own normalisation.

Batches enter as grey images already cropped and resized by :func:`classifier.preprocess.fit_gray`
(B×H×W×1, [0, 1]); they leave as model input (B×H×W×3) through :func:`finish_batch`, the TensorFlow twin
of :func:`classifier.preprocess.finish_gray`. Photometric changes are applied *before* equalisation, so
the model learns on what equalisation makes of a degraded image — which is what it meets at inference.

- ``sugandi-table2``: seed 000 Table II, i.e. Keras ``ImageDataGenerator(rotation_range=30,
  width_shift_range=0.2, height_shift_range=0.2, shear_range=0.3, zoom_range=0.1, horizontal_flip=True,
  fill_mode="nearest")`` (``shear_range`` is in degrees there; ``zoom_range`` draws x and y zoom separately).
- ``robust``: rotation ±10°, shift 10 %, shear 5°, zoom 0.8–1.4 drawn per axis (the COVID figures are
  tight crops, the NIH images show shoulders and neck: the field of view must not tell the class) with
  reflection fill; gamma, contrast, blur through down/up-sampling (low-resolution figures from papers) and
  Gaussian noise (each of the last two on half the images, so clean images stay in-distribution) and
  synthetic burnt-in labels, so that sharpness, grey levels, framing and text stop telling the sources apart.
- ``robust-fov``: ``robust`` with one log-uniform zoom 0.85–1.6 for both axes (±10 % aspect): tight
  crops of whole-chest images are as common in training as they are among the COVID figures.
- ``robust-strong``: ``robust`` with the degradations of other pipelines widened: blur down to 30 % of
  the size, noise up to σ 0.03, and JPEG re-encoding at quality 25–95 (each on half the images). A
  network with ImageNet features otherwise reads the fine texture of the NIH archive's images as pneumonia.
- ``robust-reframe``: ``robust`` plus tight framings for the classes whose images all show the whole
  chest. In cxr3 every normal and pneumonia image is an NIH archive film with neck, shoulders and abdomen,
  while the COVID-19 images are figures cropped to the lungs, so "tightly framed" means COVID-19 and a
  hospital's collimated CR is called COVID-19. Zooming every class alike cannot remove that: the figures
  get tighter too, and the classes stay apart. Here half of the normal and pneumonia images are cut to a
  random lung-level box (35–80 % of the area) first, so tight framing stops telling the classes apart.
  The box is cut from a copy at twice the input size and resized down with antialiasing, so a reframed
  image is as sharp as a real tight film: cut from the input-size image and enlarged, every reframed
  image was blurred, and the network learned "tight and sharp" as COVID-19 instead.
- ``robust-strong-reframe``: ``robust-strong`` with the same reframing.
- ``none``: no augmentation (seed 003 trains without).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import tensorflow as tf

from classifier.errors import OptionError
from classifier.preprocess import (
    EQUALISATION_LEVELS,
    IMAGENET_BGR_MEAN,
    PreprocessSpec,
    normalisation_change,
)


@dataclass(frozen=True)
class Geometry:
    rotation_deg: float
    shift: float  # fraction of width/height
    shear_deg: float
    zoom: tuple[float, float]  # scale range, drawn separately for x and y
    flip: bool
    fill_mode: str  # ImageProjectiveTransformV3 fill mode: NEAREST, REFLECT, CONSTANT, WRAP
    # None: x and y zoom drawn independently and uniformly in ``zoom``. A number a: one zoom drawn
    # log-uniformly in ``zoom`` and y = x · U(1-a, 1+a) — a field of view that shrinks as a whole.
    aspect_jitter: float | None = None


@dataclass(frozen=True)
class Photometry:
    gamma_log: float  # gamma = exp(U(-g, g))
    contrast: float  # scale about the mean by U(1-c, 1+c)
    blur_min_scale: float  # down-sample to U(s, 1) of the size and back (1: off)
    noise_sigma: float  # Gaussian noise sigma drawn in U(0, sigma)
    label_probability: float  # chance of a synthetic burnt-in label (bright or dark rectangle)
    jpeg_quality_min: int = 100  # JPEG re-encoding at a quality in U(q, 95) on half the images (100: off)


@dataclass(frozen=True)
class Reframe:
    """Class-conditional random crops, resized back to the frame, before any other change: images of
    ``classes`` are cut with ``probability`` to a box of ``area`` (fraction of the image) and ``aspect``
    (width / height) at a random place, centred horizontally within ``centre_jitter`` of the width."""

    classes: tuple[str, ...]
    probability: float
    area: tuple[float, float]
    aspect: tuple[float, float]
    centre_jitter: float = 0.1
    # vertical placement: the box's centre between these fractions of the height (lungs sit above the
    # middle of a whole-chest film: neck and shoulders above, abdomen below)
    vertical_centre: tuple[float, float] = (0.35, 0.55)


@dataclass(frozen=True)
class Augmentation:
    geometry: Geometry | None
    photometry: Photometry | None
    reframe: Reframe | None = None


_ROBUST_GEOMETRY = Geometry(
    rotation_deg=10.0, shift=0.1, shear_deg=5.0, zoom=(0.8, 1.4), flip=True, fill_mode="REFLECT"
)
_ROBUST_PHOTOMETRY = Photometry(
    gamma_log=0.3, contrast=0.2, blur_min_scale=0.5, noise_sigma=0.015, label_probability=0.3
)

AUGMENTATIONS: dict[str, Augmentation] = {
    "none": Augmentation(geometry=None, photometry=None),
    "sugandi-table2": Augmentation(
        geometry=Geometry(
            rotation_deg=30.0, shift=0.2, shear_deg=0.3, zoom=(0.9, 1.1), flip=True, fill_mode="NEAREST"
        ),
        photometry=None,
    ),
    "robust": Augmentation(_ROBUST_GEOMETRY, _ROBUST_PHOTOMETRY),
    "robust-fov": Augmentation(
        replace(_ROBUST_GEOMETRY, zoom=(0.85, 1.6), aspect_jitter=0.1), _ROBUST_PHOTOMETRY
    ),
    "robust-strong": Augmentation(
        _ROBUST_GEOMETRY,
        replace(_ROBUST_PHOTOMETRY, blur_min_scale=0.3, noise_sigma=0.03, jpeg_quality_min=25),
    ),
}
_WHOLE_CHEST_REFRAME = Reframe(
    classes=("normal", "pneumonia"), probability=0.5, area=(0.35, 0.8), aspect=(0.8, 1.25)
)
AUGMENTATIONS["robust-reframe"] = replace(AUGMENTATIONS["robust"], reframe=_WHOLE_CHEST_REFRAME)
AUGMENTATIONS["robust-strong-reframe"] = replace(AUGMENTATIONS["robust-strong"], reframe=_WHOLE_CHEST_REFRAME)


def _affine_matrices(batch: int, height: int, width: int, geometry: Geometry) -> Any:
    """Output→input projective transforms (8 parameters each) about the image centre, as Keras' layers."""

    def uniform(low: float, high: float) -> Any:
        return tf.random.uniform([batch], low, high)

    angle = uniform(-1.0, 1.0) * geometry.rotation_deg * math.pi / 180.0
    shear = uniform(-1.0, 1.0) * geometry.shear_deg * math.pi / 180.0
    if geometry.aspect_jitter is None:
        zoom_x = uniform(*geometry.zoom)
        zoom_y = uniform(*geometry.zoom)
    else:
        zoom_x = tf.exp(uniform(math.log(geometry.zoom[0]), math.log(geometry.zoom[1])))
        zoom_y = zoom_x * uniform(1.0 - geometry.aspect_jitter, 1.0 + geometry.aspect_jitter)
    shift_x = uniform(-1.0, 1.0) * geometry.shift * width
    shift_y = uniform(-1.0, 1.0) * geometry.shift * height
    flip = tf.where(tf.random.uniform([batch]) < 0.5, -1.0, 1.0) if geometry.flip else tf.ones([batch])
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Inverse map: input = A · output + b, A = R(θ)·Shear·diag(flip/zx, 1/zy)
    a00 = cos * flip / zoom_x
    a01 = (-sin + cos * tf.tan(shear)) / zoom_y
    a10 = sin * flip / zoom_x
    a11 = (cos + sin * tf.tan(shear)) / zoom_y
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    b0 = cx - a00 * cx - a01 * cy + shift_x
    b1 = cy - a10 * cx - a11 * cy + shift_y
    zeros = tf.zeros([batch])
    return tf.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)


def _geometric(images: Any, geometry: Geometry) -> Any:
    shape = tf.shape(images)
    transforms = _affine_matrices(shape[0], images.shape[1], images.shape[2], geometry)
    transformed = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode=geometry.fill_mode,
    )
    transformed.set_shape(images.shape)  # the op forgets static height/width
    return transformed


def _coin(shape: Any) -> Any:
    return tf.random.uniform(shape) < 0.5


def _photometric(images: Any, photometry: Photometry) -> Any:
    shape = tf.shape(images)
    batch, height, width = shape[0], images.shape[1], images.shape[2]
    per_image = [batch, 1, 1, 1]
    gamma = tf.exp(tf.random.uniform(per_image, -photometry.gamma_log, photometry.gamma_log))
    images = tf.pow(tf.clip_by_value(images, 1e-6, 1.0), gamma)
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    contrast = tf.random.uniform(per_image, 1.0 - photometry.contrast, 1.0 + photometry.contrast)
    images = tf.clip_by_value((images - mean) * contrast + mean, 0.0, 1.0)
    if photometry.blur_min_scale < 1.0:
        scale = tf.random.uniform([], photometry.blur_min_scale, 1.0)
        small = tf.cast(tf.round(scale * tf.constant([height, width], tf.float32)), tf.int32)
        blurred = tf.image.resize(tf.image.resize(images, small, antialias=True), [height, width])
        images = tf.where(_coin(per_image), blurred, images)
    # Noise and blur on half of the images only: clean, sharp images must stay in-distribution too.
    sigma = tf.random.uniform(per_image, 0.0, photometry.noise_sigma) * tf.cast(_coin(per_image), tf.float32)
    images = images + tf.random.normal(tf.shape(images)) * sigma
    images = tf.clip_by_value(images, 0.0, 1.0)
    if photometry.jpeg_quality_min < 100:
        images = tf.where(_coin(per_image), _jpeg(images, photometry.jpeg_quality_min), images)
    if photometry.label_probability > 0.0:
        images = _synthetic_labels(images, photometry.label_probability)
    return tf.clip_by_value(images, 0.0, 1.0)


def _jpeg(images: Any, quality_min: int) -> Any:
    """Each image of the batch re-encoded as JPEG at its own quality in U(quality_min, 95)."""
    qualities = tf.random.uniform([tf.shape(images)[0]], quality_min, 96, dtype=tf.int32)

    def encode(pair: tuple[Any, Any]) -> Any:
        image, quality = pair
        return tf.image.adjust_jpeg_quality(image, quality)

    encoded = tf.map_fn(encode, (images, qualities), fn_output_signature=tf.float32)
    encoded.set_shape(images.shape)
    return encoded


def _synthetic_labels(images: Any, probability: float) -> Any:
    """A rectangle of saturated grey near a random edge — the burnt-in letters of web figures."""
    shape = tf.shape(images)
    batch, height, width = shape[0], images.shape[1], images.shape[2]
    rows = tf.reshape(tf.range(height, dtype=tf.float32), [1, height, 1, 1])
    cols = tf.reshape(tf.range(width, dtype=tf.float32), [1, 1, width, 1])
    box_h = tf.random.uniform([batch, 1, 1, 1], 0.03, 0.09) * height
    box_w = tf.random.uniform([batch, 1, 1, 1], 0.05, 0.2) * width
    top = tf.where(tf.random.uniform([batch, 1, 1, 1]) < 0.5, 0.02 * height, 0.85 * height)
    left = tf.random.uniform([batch, 1, 1, 1], 0.02, 0.75) * width
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    apply = tf.random.uniform([batch, 1, 1, 1]) < probability
    value = tf.where(tf.random.uniform([batch, 1, 1, 1]) < 0.8, 1.0, 0.0)
    return tf.where(inside & apply, value, images)


def equalise_batch(images: Any) -> Any:
    """TensorFlow twin of :func:`classifier.preprocess.equalise`, per image of a B×H×W×1 batch."""
    levels_count = EQUALISATION_LEVELS
    shape = tf.shape(images)
    flat = tf.reshape(images, [shape[0], -1])
    levels = tf.cast(tf.clip_by_value(tf.round(flat * (levels_count - 1)), 0, levels_count - 1), tf.int32)
    hist = tf.math.bincount(levels, minlength=levels_count, maxlength=levels_count, axis=-1, dtype=tf.float32)
    cdf = tf.cumsum(hist, axis=-1)
    first = tf.reduce_min(
        tf.where(hist > 0, cdf, tf.fill(tf.shape(cdf), float("inf"))), axis=-1, keepdims=True
    )
    denominator = cdf[:, -1:] - first
    table = tf.where(
        denominator > 0, tf.clip_by_value((cdf - first) / tf.maximum(denominator, 1.0), 0.0, 1.0), 0.0
    )
    return tf.reshape(tf.gather(table, levels, batch_dims=1), shape)


def finish_batch(images: Any, spec: PreprocessSpec) -> Any:
    """B×H×W×1 grey → model input, as :func:`classifier.preprocess.finish_gray` does for one image."""
    if spec.equalisation == "histeq":
        images = equalise_batch(images)
    rgb = tf.repeat(tf.clip_by_value(images, 0.0, 1.0), 3, axis=-1)
    if spec.normalisation == "resnet":
        return rgb[..., ::-1] * 255.0 - tf.constant(IMAGENET_BGR_MEAN)
    if spec.normalisation != "unit":
        scale, offset = normalisation_change("unit", spec.normalisation)
        return rgb * scale + offset
    return rgb


def reframe_mask(classes: Sequence[str], reframe: Reframe) -> list[float]:
    """1.0 for each class (in the model's order) that ``reframe`` crops, else 0.0.

    Raises when none of the reframed classes is among ``classes``: a recipe that silently does nothing
    would be measured as if it had done something."""
    if not any(name in classes for name in reframe.classes):
        names = ", ".join(reframe.classes)
        raise OptionError(f"reframing names classes {names}, none of which is in the data")
    return [1.0 if name in reframe.classes else 0.0 for name in classes]


REFRAME_SOURCE_SCALE = 2  # reframed boxes are cut from the training images at this multiple of the input size


def _reframe(images: Any, sources: Any, selected: Any, reframe: Reframe) -> Any:
    """Crop the ``selected`` images (B booleans) to a random box of their ``sources`` (the same images at
    :data:`REFRAME_SOURCE_SCALE` × the size) and resize to the input size; others are unchanged."""
    shape = tf.shape(images)
    batch, height, width = shape[0], images.shape[1], images.shape[2]
    source_size = [height * REFRAME_SOURCE_SCALE, width * REFRAME_SOURCE_SCALE]
    if list(sources.shape[1:3]) != source_size:
        raise ValueError(f"reframing needs sources of {source_size[0]}x{source_size[1]}, not {sources.shape[1:3]}")

    def uniform(low: float, high: float) -> Any:
        return tf.random.uniform([batch], low, high)

    area = uniform(*reframe.area)
    aspect = tf.exp(uniform(math.log(reframe.aspect[0]), math.log(reframe.aspect[1])))
    box_w = tf.minimum(tf.sqrt(area * aspect), 1.0)
    box_h = tf.minimum(tf.sqrt(area / aspect), 1.0)
    centre_x = 0.5 + uniform(-1.0, 1.0) * reframe.centre_jitter
    centre_y = uniform(*reframe.vertical_centre)
    top = tf.clip_by_value(centre_y - box_h / 2, 0.0, 1.0 - box_h)
    left = tf.clip_by_value(centre_x - box_w / 2, 0.0, 1.0 - box_w)
    # the box in whole source pixels, then one antialiased resize: the detail of a real tight film, as the
    # inference path would make it (a second resampling would blur it again)
    rows = tf.cast(tf.round(tf.stack([top, top + box_h], axis=1) * source_size[0]), tf.int32)
    cols = tf.cast(tf.round(tf.stack([left, left + box_w], axis=1) * source_size[1]), tf.int32)

    def crop(args: tuple[Any, Any, Any, Any, Any]) -> Any:
        image, source, row, col, chosen = args

        def cut() -> Any:
            box = source[row[0] : row[1], col[0] : col[1], :]
            return tf.image.resize(box, [height, width], method="bilinear", antialias=True)

        return tf.cond(chosen, cut, lambda: image)  # the others bit for bit, and not resized for nothing

    cropped = tf.map_fn(crop, (images, sources, rows, cols, selected), fn_output_signature=tf.float32)
    cropped.set_shape(images.shape)
    return cropped


def augment_batch(
    images: Any,
    augmentation: Augmentation,
    labels: Any = None,
    reframed: list[float] | None = None,
    sources: Any = None,
) -> Any:
    """Randomly transform a B×H×W×1 grey batch in [0, 1].

    ``labels`` (B×classes one-hot), ``reframed`` (:func:`reframe_mask`) and ``sources`` (the batch at
    :data:`REFRAME_SOURCE_SCALE` × the size) are needed when the augmentation reframes some classes."""
    if augmentation.reframe is not None:
        if labels is None or reframed is None or sources is None:
            raise ValueError("this augmentation reframes by class: pass the labels, reframe mask and sources")
        of_reframed_class = tf.reduce_sum(labels * tf.constant(reframed, tf.float32), axis=-1) > 0.5
        chosen = tf.random.uniform(tf.shape(of_reframed_class)) < augmentation.reframe.probability
        images = _reframe(images, sources, of_reframed_class & chosen, augmentation.reframe)
    if augmentation.geometry is not None:
        images = _geometric(images, augmentation.geometry)
    if augmentation.photometry is not None:
        images = _photometric(images, augmentation.photometry)
    return images


def mixup_batch(images: Any, labels: Any, alpha: float) -> tuple[Any, Any]:
    """Mixup (Zhang et al., 2018): each image and its label blended with another of the batch.

    The weight λ ~ Beta(α, α) is drawn per image and folded to ≥ 0.5, so every mixed image keeps its
    own label as the larger part. Mixing softens what a network can gain from memorising a wrongly
    labelled image, which is why it is tried against the noisy ChestX-ray8 labels.
    """
    batch = tf.shape(images)[0]
    first = tf.random.gamma([batch], alpha)
    second = tf.random.gamma([batch], alpha)
    lam = first / (first + second)
    lam = tf.maximum(lam, 1.0 - lam)
    partner = tf.random.shuffle(tf.range(batch))
    mixed_images = lam[:, None, None, None] * images + (1.0 - lam[:, None, None, None]) * tf.gather(images, partner)
    mixed_labels = lam[:, None] * labels + (1.0 - lam[:, None]) * tf.gather(labels, partner)
    return mixed_images, mixed_labels


def get_augmentation(name: str) -> Augmentation:
    try:
        return AUGMENTATIONS[name]
    except KeyError:
        known = ", ".join(AUGMENTATIONS)
        raise OptionError(f"unknown augmentation {name!r}; choose one of {known}") from None
