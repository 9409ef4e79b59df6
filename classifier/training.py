"""Train an architecture on a labelled collection and write a model artifact folder.

Defaults are the architecture's published recipe (classifier.architectures); the command line may
override epochs, batch size and learning rate. The validation split is by group and is run through the
*inference* preprocessing (NumPy), so the recorded validation metrics are what the node will see.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from classifier import plots
from classifier.architectures import (
    DEFAULT_WEIGHTS,
    MAX_SEED,
    MIN_INPUT_SIZE,
    Architecture,
    Recipe,
    Stage,
    get_architecture,
    set_trainable,
)
from classifier.artifact import MODEL_FILE, ArtifactMetadata, sha256_file, staged, write_metadata
from classifier.augmentation import (
    REFRAME_SOURCE_SCALE,
    augment_batch,
    finish_batch,
    get_augmentation,
    mixup_batch,
    reframe_mask,
)
from classifier.dataset import (
    TRAIN_DIGESTS,
    DatasetError,
    LabelledImage,
    class_names,
    draw_split,
    fold_relabel,
    image_digests,
    load_collection,
    load_grays,
    relabel,
    split_fingerprint,
    summary,
    writable_output,
)
from classifier.errors import OptionError
from classifier.lungs import LUNG_EPOCHS, LungCropper, train_lung_model_on_split
from classifier.metrics import classification_report
from classifier.preprocess import PreprocessSpec, finish_gray
from classifier.types import identity_problem

LOGGER = logging.getLogger(__name__)

PRECISE_BN_IMAGES = 256  # clean training images averaged for the BatchNorm statistics


@dataclass(frozen=True)
class TrainingConfig:
    architecture: str
    data: Path
    output: Path
    validation_fraction: float | None = None  # held out by patient group (default: the recipe's)
    seed: int = 42  # weights, shuffling and augmentation
    split_seed: int | None = None  # the train/validation split (default: ``seed``)
    fold: int | None = None  # validate on this fold of a group k-fold split instead of a fraction
    folds: int = 5
    epochs: int | None = None  # overrides every stage's epochs
    batch_size: int | None = None
    learning_rate: float | None = None  # overrides every stage's learning rate
    augmentation: str | None = None
    centre_crop: float | None = None  # overrides the architecture's PreprocessSpec.centre_crop
    input_size: int | None = None  # square input side, overrides the architecture's PreprocessSpec.input_size
    mixup: float | None = None  # overrides the recipe's mixup α (0 = off)
    average_last: int | None = None  # the model is the mean of the last N epochs' weights (SWA)
    lung_model: Path | None = None  # a lung U-Net folder (classifier.lungs): crop every image to its lungs
    lung_masks: Path | None = None  # or train that U-Net first, on the training split's images with masks here
    lung_epochs: int = LUNG_EPOCHS
    weights: str | None = None  # backbone weights ("imagenet" default for transfer models)
    relabel: Mapping[str, str] | None = None  # {old: new} labels, applied after the split (dataset.relabel)
    version: str | None = None
    steps_per_epoch: int | None = None  # cap, for smoke tests
    progress: bool = True

    def __post_init__(self) -> None:
        counts = {
            "epochs": self.epochs,
            "batch size": self.batch_size,
            "steps per epoch": self.steps_per_epoch,
            "lung epochs": self.lung_epochs,
            "averaged epochs": self.average_last,
        }
        for name, count in counts.items():
            if count is not None and count < 1:  # 0 epochs wrote an untrained model as if trained
                raise OptionError(f"the {name} must be at least 1, not {count}")
        for name, seed in (("seed", self.seed), ("split seed", self.split_seed)):
            if seed is not None and not 0 <= seed <= MAX_SEED:  # Keras' and NumPy's range
                raise OptionError(f"the {name} must be 0 to {MAX_SEED}, not {seed}")
        if self.input_size is not None and self.input_size < MIN_INPUT_SIZE:
            raise OptionError(f"the input size is at least {MIN_INPUT_SIZE} pixels, not {self.input_size}")
        if self.centre_crop is not None and not 0.3 <= self.centre_crop <= 1.0:
            raise OptionError(f"the centre crop keeps a fraction in [0.3, 1], not {self.centre_crop}")

    @property
    def drawn_split_seed(self) -> int:
        """The seed of the train/validation split: ``split_seed`` when given, else the training seed."""
        return self.seed if self.split_seed is None else self.split_seed

    def held_out_fraction(self, recipe: Recipe) -> float:
        """The fraction held out by patient group: the one given, else the recipe's (its paper's)."""
        return recipe.validation_fraction if self.validation_fraction is None else self.validation_fraction

    @property
    def backbone_weights(self) -> str:
        """The ``weights`` to build the network with: the ones given, else the architecture's default."""
        return DEFAULT_WEIGHTS if self.weights is None else self.weights

    def preprocess_for(self, architecture: Architecture) -> PreprocessSpec:
        """The architecture's preprocessing with this run's centre crop and input size."""
        spec = architecture.preprocess
        if self.centre_crop is not None:
            spec = replace(spec, centre_crop=self.centre_crop)
        if self.input_size is not None:
            spec = replace(spec, input_size=(self.input_size, self.input_size))
        return spec

    def split_record(self, recipe: Recipe) -> dict[str, Any]:
        """The ``split`` entry of model.json this run draws its train/validation split by."""
        split: dict[str, Any] = {"by": "group", "seed": self.drawn_split_seed}
        if self.fold is None:
            split["validation_fraction"] = self.held_out_fraction(recipe)
        else:
            split.update(fold=self.fold, folds=self.folds)
        if mapping := fold_relabel(self.relabel or {}):
            split["relabel"] = mapping
        return split


@dataclass(frozen=True)
class TrainingResult:
    folder: Path
    metadata: ArtifactMetadata
    seconds_per_epoch: float


def _recipe(architecture: Architecture, config: TrainingConfig) -> Recipe:
    recipe = architecture.recipe
    stages = tuple(
        replace(
            stage,
            epochs=config.epochs if config.epochs is not None else stage.epochs,
            learning_rate=config.learning_rate if config.learning_rate is not None else stage.learning_rate,
        )
        for stage in recipe.stages
    )
    return replace(
        recipe,
        stages=stages,
        batch_size=config.batch_size or recipe.batch_size,
        augmentation=config.augmentation or recipe.augmentation,
        mixup=config.mixup if config.mixup is not None else recipe.mixup,
        validation_fraction=config.held_out_fraction(recipe),
    )


def training_stream(
    tensors: Any, batch_size: int, prepare: Callable[[Any, Any], tuple[Any, Any]], *, seed: int, stage: int
) -> Any:
    """A stage's augmented batches as one stream over all its epochs (``fit`` takes ``steps_per_epoch``
    of it), so that each epoch draws its transforms afresh as ImageDataGenerator does: a new iterator each
    epoch restarted the unseeded random ops, and batch k of every epoch got the same rotations, shifts and
    flips (review). A later stage's ops are traced under a graph seed of their own, reproducibly, so it
    does not repeat the first stage's draws."""
    import tensorflow as tf

    if stage > 1:
        tf.random.set_seed(seed + stage)
    data = tf.data.Dataset.from_tensor_slices(tensors)
    return (
        data.shuffle(int(data.cardinality()), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .repeat()
        .map(prepare, num_parallel_calls=1)
        .prefetch(2)
    )


def class_weights(labels: npt.NDArray[np.int64], n: int) -> dict[int, float]:
    """Inverse-frequency weights, mean 1 over the images ("balanced")."""
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    return {index: float(len(labels) / (n * count)) if count else 0.0 for index, count in enumerate(counts)}


def _callbacks(keras: Any) -> tuple[type, type]:
    class BestWeights(keras.callbacks.Callback):  # type: ignore[misc]
        """Best-validation-loss weights across all stages (the seed's ModelCheckpoint, kept in memory)."""

        def __init__(self) -> None:
            super().__init__()
            self.best = float("inf")
            self.weights: list[Any] | None = None
            self.epoch = 0
            self.best_epoch = 0

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.epoch += 1
            loss = (logs or {}).get("val_loss")
            if loss is not None and loss < self.best:
                self.best, self.best_epoch = float(loss), self.epoch
                self.weights = self.model.get_weights()

    class EpochTimer(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.durations: list[float] = []
            self._start = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.durations.append(time.perf_counter() - self._start)
            logs = logs or {}
            LOGGER.info(  # one line an epoch for unattended runs (--no-progress, cross-validation)
                "epoch %d: %.1f s, loss %.4f, val_loss %.4f, val_accuracy %.3f",
                len(self.durations),
                self.durations[-1],
                logs.get("loss", float("nan")),
                logs.get("val_loss", float("nan")),
                logs.get("val_accuracy", float("nan")),
            )

    return BestWeights, EpochTimer


def _batch_norm_layers(keras: Any, model: Any) -> list[Any]:
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found.extend(_batch_norm_layers(keras, layer))
    return found


def _recompute_batch_norm(keras: Any, model: Any, clean_batches: Any) -> None:
    """Set every BatchNorm's moving statistics to the exact average of its batch statistics over
    ``clean_batches`` (un-augmented training images)."""
    layers = _batch_norm_layers(keras, model)
    momenta = [layer.momentum for layer in layers]
    try:
        for count, batch in enumerate(clean_batches, start=1):
            for layer in layers:
                layer.momentum = (count - 1) / count  # running mean of the batch statistics
            model(batch, training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum


def _precise_batch_norm(keras: Any, clean_batches: Any, val_inputs: Any, val_onehot: Any, loss: Any) -> Any:
    """Callback: at each epoch end, recompute the BatchNorm statistics on the *un-augmented* training
    images, then validate (and report val_loss/val_accuracy itself).

    Moving averages collected on augmented batches do not describe clean images; with them the network
    flipped to one class on the (clean) validation images at random epochs. Training itself uses batch
    statistics, so this changes only what inference sees.
    """

    class PreciseBatchNorm(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            _recompute_batch_norm(keras, self.model, clean_batches)
            probabilities = self.model.predict(val_inputs, batch_size=32, verbose=0)
            if logs is not None:
                logs["val_loss"] = float(loss(val_onehot, probabilities))
                logs["val_accuracy"] = float(np.mean(probabilities.argmax(1) == val_onehot.argmax(1)))

    return PreciseBatchNorm()


def _weight_average(keras: Any, first_epoch: int) -> Any:
    """Callback: the running mean of the weights at the end of epoch ``first_epoch`` (1-based, counted
    across stages) and every later one: stochastic weight averaging (Izmailov et al., UAI 2018). The
    BatchNorm statistics of the mean are not the mean of the statistics; recompute them before use."""

    class WeightAverage(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self.count = 0
            self.weights: list[Any] | None = None

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.epoch += 1
            if self.epoch < first_epoch:
                return
            current = self.model.get_weights()
            self.count += 1
            if self.weights is None:
                self.weights = [np.array(w, np.float64 if w.dtype.kind == "f" else w.dtype) for w in current]
                return
            self.weights = [
                mean + (w - mean) / self.count if w.dtype.kind == "f" else w  # a counter is not averaged
                for mean, w in zip(self.weights, current, strict=True)
            ]

    return WeightAverage()


def _learning_rate(keras: Any, stage: Stage, steps_per_epoch: int) -> Any:
    if stage.schedule == "constant":
        return stage.learning_rate
    if stage.schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {stage.schedule!r}")
    warmup = min(3, max(stage.epochs - 1, 0)) * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=stage.learning_rate / 10.0,
        decay_steps=max(stage.epochs * steps_per_epoch - warmup, 1),
        alpha=0.01,
        warmup_target=stage.learning_rate,
        warmup_steps=warmup,
    )


def _labels(items: Sequence[LabelledImage], classes: Sequence[str]) -> npt.NDArray[np.int64]:
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[item.label] for item in items], dtype=np.int64)


def shared_lung_model(config: TrainingConfig, folder: Path) -> Path:
    """The lung U-Net of ``config.lung_masks``, trained into ``folder`` on the training side of the split
    that ``config`` draws: one for every member of an ensemble (each member trained its own, whose sha256
    differed, and the merge then refused them all after they had trained)."""
    recipe = _recipe(get_architecture(config.architecture), config)
    _, _, train_items, val_items = training_split(config, recipe)  # refused before the U-Net, not after
    _lung_model(config, train_items, val_items, into=folder)
    return folder


def check_recipe_options(config: TrainingConfig) -> None:
    """The options that must fit the architecture's recipe, checked before anything trains (an ensemble
    checks every member's before the first trains: a mixed pair refused the second after the first)."""
    if config.version is not None and (problem := identity_problem(config.version)):
        raise OptionError(f"the version {config.version[:80]!r} {problem}")  # not after the training
    architecture = get_architecture(config.architecture)
    recipe = _recipe(architecture, config)
    if config.average_last is not None:
        if any(stage.early_stopping_patience is not None for stage in recipe.stages):
            raise OptionError(f"{architecture.name} stops early: weight averaging needs fixed epochs")
        if config.average_last > recipe.epochs:
            raise OptionError(f"cannot average the last {config.average_last} of {architecture.name}'s "
                              f"{recipe.epochs} epochs")


def training_split(
    config: TrainingConfig, recipe: Recipe
) -> tuple[tuple[str, ...], dict[str, Any], list[LabelledImage], list[LabelledImage]]:
    """The classes, the split record and the two sides ``config`` trains on, refused when there are fewer
    than two classes or a class has no training image."""
    items = load_collection(config.data)
    split = config.split_record(recipe)
    # The split is drawn on the collection's own labels, so a merged-class model (COVID-19 / non-COVID)
    # holds out the same patients as a model of all the classes.
    classes = class_names(relabel(items, split.get("relabel", {})))
    if len(classes) < 2:
        raise DatasetError(f"training needs at least two classes; {config.data} has only {list(classes)}")
    train_items, val_items = draw_split(items, split)
    trained = np.bincount(_labels(train_items, classes), minlength=len(classes))
    if absent := [name for name, count in zip(classes, trained, strict=True) if not count]:
        # a fold can hold every group of a rare class; its class weight was then 0 and nothing said so
        raise DatasetError(
            f"no training image of class {', '.join(absent)} in this split: all its groups are on the "
            "validation side (fewer folds, or more groups of it)"
        )
    return classes, split, train_items, val_items


LUNGS_IN_TRAINING = ".lungs-new"  # inside the output folder until the new model.json is written


def _lung_model(
    config: TrainingConfig,
    train_items: Sequence[LabelledImage],
    val_items: Sequence[LabelledImage],
    into: Path | None = None,
) -> tuple[LungCropper | None, Path | None]:
    """The lung U-Net to crop with, and its folder: given (``lung_model``), trained here on the training
    split's masked images into ``into`` or OUTPUT/.lungs-new (``lung_masks``; Dice on the validation
    split's), or none. Not straight into OUTPUT/lungs: a run that failed or was stopped after it had
    replaced the U-Net there left the artifact already in OUTPUT unloadable (its model.json records the
    old U-Net's sha256). :func:`train` copies it in with the new model.json."""
    if config.lung_model is None and config.lung_masks is None:
        return None, None
    if config.lung_model is not None and config.lung_masks is not None:
        raise ValueError("give a lung model or lung masks to train one, not both")
    if config.lung_model is not None:
        folder = Path(config.lung_model)
    else:
        folder = into or Path(config.output) / LUNGS_IN_TRAINING
    if config.lung_masks is not None:
        metadata, trained, _ = train_lung_model_on_split(
            config.data, Path(config.lung_masks), train_items, val_items, folder,
            epochs=config.lung_epochs, seed=config.seed,
        )  # fmt: skip
        LOGGER.info("lung model: %d masked training images, validation %s", trained, metadata["validation"])
    return LungCropper.load(folder), folder


def train(config: TrainingConfig, argv: Sequence[str] | None = None) -> TrainingResult:
    """Run the recipe and write ``config.output`` (model.keras, model.json, PNG plots)."""
    import keras
    import tensorflow as tf

    architecture = get_architecture(config.architecture)
    recipe = _recipe(architecture, config)
    check_recipe_options(config)
    spec = config.preprocess_for(architecture)
    augmentation = get_augmentation(recipe.augmentation)
    writable_output(config.output, config.data)  # before an hour of training, not after it
    architecture.check_weights(config.backbone_weights)  # likewise

    classes, split, train_items, val_items = training_split(config, recipe)
    # Before the lung U-Net trains and the images are read (it was after both): a reframing recipe must
    # name one of these classes.
    reframed = None if augmentation.reframe is None else reframe_mask(classes, augmentation.reframe)
    split["fingerprint"] = split_fingerprint(train_items, val_items)  # checked where the split is drawn anew
    trained_files = image_digests(train_items)  # to know them among other data (dataset.trained_among)
    lungs, lung_folder = _lung_model(config, train_items, val_items)
    if lungs is not None:
        spec = replace(spec, lung_crop=True)
    LOGGER.info(
        "training %s on %d images, validating on %d (%d classes)",
        architecture.name,
        len(train_items),
        len(val_items),
        len(classes),
    )

    keras.utils.set_random_seed(config.seed)
    train_gray = load_grays(train_items, spec, lungs)[..., None]
    val_inputs = np.stack([finish_gray(gray, spec) for gray in load_grays(val_items, spec, lungs)])
    y_train, y_val = _labels(train_items, classes), _labels(val_items, classes)
    onehot_train = np.eye(len(classes), dtype=np.float32)[y_train]
    onehot_val = np.eye(len(classes), dtype=np.float32)[y_val]

    grays: tuple[npt.NDArray[np.float32], ...] = (train_gray,)
    if reframed is not None:  # reframed boxes are cut from sharper copies (classifier.augmentation)
        height, width = spec.input_size
        source_spec = replace(spec, input_size=(REFRAME_SOURCE_SCALE * height, REFRAME_SOURCE_SCALE * width))
        grays = (train_gray, load_grays(train_items, source_spec, lungs)[..., None])
    tensors = (grays, onehot_train)

    def prepare(images: Any, labels: Any) -> tuple[Any, Any]:
        batch, sources = images if len(images) == 2 else (images[0], None)
        inputs = finish_batch(augment_batch(batch, augmentation, labels, reframed, sources), spec)
        if recipe.mixup > 0:
            return mixup_batch(inputs, labels, recipe.mixup)
        return inputs, labels

    steps_per_epoch = config.steps_per_epoch or math.ceil(len(train_gray) / recipe.batch_size)
    model = architecture.build(
        len(classes), weights=config.backbone_weights, seed=config.seed, input_size=spec.input_size
    )
    best_weights_cls, timer_cls = _callbacks(keras)
    best, timer = best_weights_cls(), timer_cls()
    average = None
    if config.average_last is not None:
        average = _weight_average(keras, first_epoch=recipe.epochs - config.average_last + 1)
    clean = None
    if recipe.precise_batch_norm or average is not None:
        sample = np.random.default_rng(config.seed).permutation(len(train_gray))[:PRECISE_BN_IMAGES]
        clean = (
            tf.data.Dataset.from_tensor_slices(train_gray[np.sort(sample)])
            .batch(32)
            .map(lambda x: finish_batch(x, spec))
        )
    weights_by_class = class_weights(y_train, len(classes)) if recipe.class_weights else None
    history: dict[str, list[float]] = {}
    for number, stage in enumerate(recipe.stages, start=1):
        set_trainable(model, stage.unfreeze_last)
        learning_rate = _learning_rate(keras, stage, steps_per_epoch)
        optimizer = (
            keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=recipe.weight_decay)
            if recipe.weight_decay
            else keras.optimizers.Adam(learning_rate=learning_rate)
        )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
            metrics=["accuracy"],
        )
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing)
        callbacks: list[Any] = [best, timer] if average is None else [best, average, timer]
        validation: tuple[Any, Any] | None = (val_inputs, onehot_val)
        if recipe.precise_batch_norm:
            callbacks.insert(0, _precise_batch_norm(keras, clean, val_inputs, onehot_val, loss))
            validation = None  # the callback validates after recalibrating
        if stage.early_stopping_patience is not None:
            # as seed 003: a stage that stops early hands its best validation-loss weights to the next
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=stage.early_stopping_patience, restore_best_weights=True
            ))
        if stage.reduce_lr_patience is not None:
            callbacks.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor="val_loss", factor=stage.reduce_lr_factor, patience=stage.reduce_lr_patience
                )
            )
        if config.progress:
            from tqdm.keras import TqdmCallback

            callbacks.append(TqdmCallback(verbose=0, file=sys.stderr, desc=f"stage {number}"))
        fitted = model.fit(
            training_stream(tensors, recipe.batch_size, prepare, seed=config.seed, stage=number),
            epochs=stage.epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=validation,
            validation_batch_size=32,
            class_weight=weights_by_class,
            shuffle=False,  # the tf.data pipeline shuffles (reproducibly, by seed)
            callbacks=callbacks,
            verbose=0,
        )
        for key, values in fitted.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
    averaged: list[int] | None = None
    if average is not None and average.weights is not None:
        dtypes = [w.dtype for w in model.get_weights()]
        model.set_weights([w.astype(dtype) for w, dtype in zip(average.weights, dtypes, strict=True)])
        _recompute_batch_norm(keras, model, clean)
        averaged = [average.epoch - average.count + 1, average.epoch]
        LOGGER.info("the model is the mean of the weights of epochs %d to %d", *averaged)
    elif recipe.keep_best and best.weights is not None:
        model.set_weights(best.weights)
        LOGGER.info("restored the best validation-loss weights (epoch %d)", best.best_epoch)

    probabilities = model.predict(val_inputs, batch_size=32, verbose=0)
    report = classification_report(y_val, probabilities, classes)

    folder = Path(config.output)
    folder.mkdir(parents=True, exist_ok=True)  # other files there (MODEL_CARD.md) are kept
    # An uncompiled functional twin (same layers) saves without the optimizer state: a third of the size.
    model_path = folder / MODEL_FILE
    keras.Model(model.input, model.output, name=model.name).save(staged(model_path))
    created = datetime.now(UTC).replace(microsecond=0)
    seconds_per_epoch = float(np.median(timer.durations)) if timer.durations else 0.0
    metadata = ArtifactMetadata(
        name=architecture.name,
        version=config.version or f"{architecture.name}-{created:%Y%m%d%H%M}",
        classes=classes,
        preprocess=spec,
        gradcam_layer=architecture.gradcam_layer,
        sha256=sha256_file(staged(model_path)),
        created=created.isoformat(),
        data={
            "source": Path(config.data).name,
            "split": split,
            "train": {**summary(train_items), TRAIN_DIGESTS: trained_files},
            "validation": summary(val_items),
            "command": " ".join(argv) if argv else None,
        },
        training={
            "recipe": {
                "batch_size": recipe.batch_size,
                "augmentation": recipe.augmentation,
                "keep_best": recipe.keep_best and averaged is None,
                "average_last": config.average_last,
                "class_weights": weights_by_class,
                "label_smoothing": recipe.label_smoothing,
                "mixup": recipe.mixup,
                "weight_decay": recipe.weight_decay,
                "precise_batch_norm": recipe.precise_batch_norm,
                "stages": [
                    {
                        "epochs": s.epochs,
                        "learning_rate": s.learning_rate,
                        "early_stopping": s.early_stopping_patience,
                        "reduce_lr": s.reduce_lr_patience,
                        "unfreeze_last": s.unfreeze_last,
                        "schedule": s.schedule,
                    }
                    for s in recipe.stages
                ],
            },
            "seed": config.seed,
            "epochs_run": len(timer.durations),
            "steps_per_epoch": steps_per_epoch,  # batches an epoch: one pass, or what --steps-per-epoch set
            "best_epoch": best.best_epoch if recipe.keep_best and averaged is None else len(timer.durations),
            "averaged_epochs": averaged,
            "seconds_per_epoch": round(seconds_per_epoch, 2),
            "parameters": int(model.count_params()),
            "history": {  # an epoch whose loss went NaN (the best weights kept) is null: JSON has no NaN
                key: [round(v, 5) if math.isfinite(v) else None for v in values]
                for key, values in history.items()
            },
        },
        validation=report,
        lungs={"sha256": str(lungs.metadata["sha256"]).lower()} if lungs is not None else {},
    )
    files = [model_path]
    if lung_folder is not None and lung_folder != folder / "lungs":
        from classifier.lungs import stage_lung_model

        files += stage_lung_model(lung_folder, folder)
    write_metadata(folder, metadata, files)
    if lung_folder == folder / LUNGS_IN_TRAINING:
        shutil.rmtree(lung_folder)
    plots.training_curves(history, folder / "training_curves.png")
    plots.confusion_matrix(
        report["confusion_matrix"], classes, folder / "confusion_matrix.png", title="validation"
    )
    return TrainingResult(folder=folder, metadata=metadata, seconds_per_epoch=seconds_per_epoch)
