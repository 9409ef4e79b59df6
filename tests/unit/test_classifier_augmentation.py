"""Augmentation: the TensorFlow training path ends exactly where the NumPy inference path does."""

from __future__ import annotations

import numpy as np
import pytest

from classifier.augmentation import (
    AUGMENTATIONS,
    augment_batch,
    finish_batch,
    mixup_batch,
    reframe_mask,
)
from classifier.errors import OptionError
from classifier.preprocess import PreprocessSpec, finish_gray

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("normalisation", ["unit", "resnet", "signed"])
def test_training_finish_matches_inference_finish(normalisation: str) -> None:
    import tensorflow as tf

    spec = PreprocessSpec(input_size=(48, 40), normalisation=normalisation, equalisation="histeq")
    rng = np.random.default_rng(0)
    grays = (rng.random((3, 48, 40)) ** 2).astype(np.float32)
    grays[1] = 0.5  # a flat image must not divide by zero
    batch = finish_batch(tf.constant(grays[..., None]), spec).numpy()
    for index, gray in enumerate(grays):
        np.testing.assert_allclose(batch[index], finish_gray(gray, spec), atol=1e-4)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentations_keep_shape_and_range_and_change_pixels(name: str) -> None:
    import tensorflow as tf

    tf.random.set_seed(0)
    yy, xx = np.mgrid[0:64, 0:64]
    grays = np.stack([(np.sin(xx / 5.0) * np.cos(yy / 7.0) + 1) / 2] * 4).astype(np.float32)[..., None]
    augmentation = AUGMENTATIONS[name]
    if augmentation.reframe is None:
        out = augment_batch(tf.constant(grays), augmentation).numpy()
    else:
        labels = tf.constant(np.eye(3, dtype=np.float32)[[0, 1, 2, 1]])
        mask = reframe_mask(("covid", "normal", "pneumonia"), augmentation.reframe)
        sources = tf.image.resize(tf.constant(grays), [128, 128])
        out = augment_batch(tf.constant(grays), augmentation, labels, mask, sources).numpy()
    assert out.shape == grays.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.array_equal(out, grays) == (name == "none")


def test_mixup_blends_images_and_labels_with_the_same_weight_and_keeps_the_own_label_larger() -> None:
    import tensorflow as tf

    tf.random.set_seed(1)
    count = 32
    # Image i is constant i and has a class of its own, so weight and partner can be read back.
    images = tf.constant(np.arange(count, dtype=np.float32)[:, None, None, None] * np.ones((1, 4, 4, 3), np.float32))
    labels = tf.constant(np.eye(count, dtype=np.float32))
    mixed_images, mixed_labels = mixup_batch(images, labels, alpha=0.4)
    mixed_images, mixed_labels = mixed_images.numpy(), mixed_labels.numpy()
    assert mixed_images.shape == (count, 4, 4, 3) and mixed_labels.shape == (count, count)
    np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, atol=1e-6)
    mixed = 0
    for index in range(count):
        own = mixed_labels[index, index]
        assert own >= 0.5 - 1e-6  # the image keeps its own label as the larger part
        others = mixed_labels[index].copy()
        others[index] = 0.0
        partner = int(others.argmax())
        expected = own * index + (1.0 - own) * (partner if others.max() > 0 else index)
        np.testing.assert_allclose(mixed_images[index], expected, atol=1e-4)  # same weight for both
        mixed += int(others.max() > 1e-3)
    assert mixed > count // 2


def test_jpeg_reencoding_degrades_each_image_like_a_lossy_pipeline() -> None:
    import tensorflow as tf

    from classifier.augmentation import _jpeg

    tf.random.set_seed(1)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = (np.sin(xx / 6.0) * np.cos(yy / 9.0) + 1) / 2
    grays = np.stack([smooth + rng.normal(0, 0.05, smooth.shape) for _ in range(3)])[..., None]
    grays = np.clip(grays, 0, 1).astype(np.float32)
    out = tf.function(lambda x: _jpeg(x, 25))(tf.constant(grays)).numpy()  # graph mode, as in tf.data
    assert out.shape == grays.shape and out.dtype == np.float32
    assert 0.0 < np.abs(out - grays).mean() < 0.1  # changed, but still the same picture
    assert np.abs(np.diff(out, axis=2)).mean() < np.abs(np.diff(grays, axis=2)).mean()  # fine noise lost


def test_reframing_crops_only_the_named_classes_to_a_tighter_field() -> None:
    """Whole-chest images are cut to a lung-level box; the other class's images are left bit for bit.
    The test image has a bright 4-pixel frame (the film edge) and a dark centre square: reframed images
    lose the frame and show the centre larger."""
    import tensorflow as tf

    from classifier.augmentation import Reframe

    tf.random.set_seed(3)
    size, count = 64, 200
    gray = np.full((size, size), 0.5, np.float32)
    gray[:4, :] = gray[-4:, :] = gray[:, :4] = gray[:, -4:] = 1.0
    gray[24:40, 24:40] = 0.0
    images = tf.constant(np.repeat(gray[None, :, :, None], count, axis=0))
    classes = ("covid", "normal", "pneumonia")
    label_index = np.arange(count) % 3
    labels = tf.constant(np.eye(3, dtype=np.float32)[label_index])
    reframe = Reframe(classes=("normal", "pneumonia"), probability=0.5, area=(0.25, 0.7), aspect=(0.8, 1.25),
                      vertical_centre=(0.45, 0.55))  # fmt: skip
    only_reframing = AUGMENTATIONS["none"].__class__(geometry=None, photometry=None, reframe=reframe)
    sources = tf.image.resize(images, [2 * size, 2 * size], method="nearest")
    out = augment_batch(images, only_reframing, labels, reframe_mask(classes, reframe), sources).numpy()[..., 0]

    changed = np.array([not np.array_equal(out[i], gray) for i in range(count)])
    assert not changed[label_index == 0].any()  # covid: never touched
    share = changed[label_index > 0].mean()
    assert 0.35 < share < 0.65  # half of the whole-chest images
    for image in out[changed]:
        assert (image > 0.9).mean() < 0.75 * (gray > 0.9).mean()  # less of the film edge in view
        assert (image < 0.25).mean() > 1.4 * (gray < 0.25).mean()  # the centre square is magnified

    with pytest.raises(OptionError, match="none of which is in the data"):
        reframe_mask(("bright", "dark"), reframe)
    with pytest.raises(ValueError, match="pass the labels"):
        augment_batch(images, only_reframing, labels, reframe_mask(classes, reframe))
    with pytest.raises(ValueError, match="needs sources of 128x128"):
        augment_batch(images, only_reframing, labels, reframe_mask(classes, reframe), images)


def test_reframed_crops_keep_the_detail_of_the_source() -> None:
    """A box cut from the 2x copy and antialiased down keeps detail that the input-size image has lost:
    fine lines (2 px period at 2x) are visible in the reframed crop as in a real crop of the film, where
    cropping the small image and enlarging it would show a flat grey."""
    import tensorflow as tf
    from PIL import Image

    from classifier.augmentation import Reframe

    size = 64
    rng = np.random.default_rng(5)
    source = rng.uniform(0.2, 0.8, (2 * size, 2 * size)).astype(np.float32)  # fine, film-grain-like detail
    small = np.asarray(Image.fromarray(source).resize((size, size), Image.BILINEAR), np.float32)  # antialiased
    centre = Reframe(classes=("normal",), probability=1.0, area=(0.64, 0.64), aspect=(1.0, 1.0),
                     centre_jitter=0.0, vertical_centre=(0.5, 0.5))  # fmt: skip  # the central 80 %
    only = AUGMENTATIONS["none"].__class__(geometry=None, photometry=None, reframe=centre)
    out = augment_batch(
        tf.constant(small[None, :, :, None]), only, tf.constant([[0.0, 1.0]]), reframe_mask(("covid", "normal"), centre),
        tf.constant(source[None, :, :, None]),
    ).numpy()[0, :, :, 0]  # fmt: skip

    lo, hi = round(0.1 * 2 * size), round(0.9 * 2 * size)
    real_crop = np.asarray(Image.fromarray(source[lo:hi, lo:hi]).resize((size, size), Image.BILINEAR), np.float32)
    lo, hi = round(0.1 * size), round(0.9 * size)
    enlarged = np.asarray(Image.fromarray(small[lo:hi, lo:hi]).resize((size, size), Image.BILINEAR), np.float32)

    def detail(image: np.ndarray) -> float:  # mean absolute difference of neighbouring pixels
        return float(np.abs(np.diff(image, axis=1)).mean())

    assert detail(out) > 1.3 * detail(enlarged)
    assert abs(detail(out) - detail(real_crop)) < 0.25 * detail(real_crop)


def test_the_train_help_names_every_augmentation() -> None:
    """The CLI does not import TensorFlow to list them, so its help text is checked against the table."""
    import argparse

    from classifier import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    train = next(
        action.choices["train"] for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    (option,) = [action for action in train._actions if "--augmentation" in action.option_strings]
    named = option.help.split("(")[1].rstrip(")").split(", ")
    assert sorted(named) == sorted(AUGMENTATIONS)


def test_each_epoch_draws_its_augmentation_afresh_and_reproducibly() -> None:
    """A new iterator each epoch restarted the unseeded random ops: batch k of every epoch got the same
    transforms, only the shuffle changing which image took them (review). One stream over the epochs
    draws anew; a second stage draws other values; the same seed gives the same stream."""
    import tensorflow as tf

    from classifier.training import training_stream

    images = np.zeros((8, 4), dtype=np.float32)  # eight identical images: only the draws differ

    def prepare(batch: object, labels: object) -> tuple[object, object]:
        return tf.random.uniform([4]), labels

    def draws(stage: int) -> list[np.ndarray]:
        keras_seed(3)
        stream = training_stream((images, np.zeros(8)), 4, prepare, seed=3, stage=stage)
        return [batch.numpy() for batch, _ in stream.take(4)]  # two epochs of two batches

    first = draws(1)
    assert not np.array_equal(first[0], first[2]) and not np.array_equal(first[1], first[3])
    assert all(np.array_equal(a, b) for a, b in zip(first, draws(1), strict=True))
    assert not np.array_equal(first[0], draws(2)[0])


def keras_seed(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)
