"""Ensembles: several trained members of one architecture merged into one ordinary Keras model.

Members differ only in their seed (weights, shuffling, augmentation); they share the architecture, the
preprocessing and the train/validation split. The merged model runs every member's convolutional trunk on
the same input, concatenates their last feature maps into one layer named like the members' Grad-CAM layer,
and averages the members' logits with a single dense layer (block weights / N, mean bias) — so the node
loads, predicts and explains it exactly like a single model, and Grad-CAM shows the evidence of all
members. It needs heads of the form feature map → global average pooling → (dropout) → dense softmax
``predictions``, which is what the architectures designed here have.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from classifier import plots
from classifier.architectures import GRADCAM_LAYER
from classifier.artifact import MODEL_FILE, ArtifactMetadata, read_metadata, sha256_file, write_metadata
from classifier.dataset import load_collection, load_grays, split_from_record
from classifier.metrics import classification_report
from classifier.preprocess import finish_gray
from classifier.training import TrainingConfig, train

LOGGER = logging.getLogger(__name__)


def merge_members(members: Sequence[Any]) -> Any:
    """One Keras model averaging the logits of ``members`` (see the module text for the form needed)."""
    import keras
    from keras import layers

    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members")
    for member in members:
        _check_head(member)
    first = members[0]
    inputs = keras.Input(shape=tuple(first.input_shape[1:]), name="image")
    features = [
        keras.Model(member.inputs, member.get_layer(GRADCAM_LAYER).output, name=f"member{index}")(inputs)
        for index, member in enumerate(members, start=1)
    ]
    merged = layers.Concatenate(name=GRADCAM_LAYER)(features)
    pooled = layers.GlobalAveragePooling2D(name="gap")(merged)
    dense = layers.Dense(int(first.output_shape[-1]), activation="softmax", name="predictions")
    outputs = dense(pooled)
    kernels, biases = zip(*(member.get_layer("predictions").get_weights() for member in members), strict=True)
    dense.set_weights([np.concatenate(kernels, axis=0) / len(members), np.mean(biases, axis=0)])
    return keras.Model(inputs, outputs, name=f"{first.name}_ensemble{len(members)}")


def _check_head(model: Any) -> None:
    from keras import layers

    try:
        features = model.get_layer(GRADCAM_LAYER)
        predictions = model.get_layer("predictions")
    except ValueError as exc:
        raise ValueError(f"model {model.name!r} has no {GRADCAM_LAYER!r}/'predictions' layers to merge") from exc
    after = model.layers[model.layers.index(features) + 1 : model.layers.index(predictions)]
    kinds = [type(layer) for layer in after]
    if kinds not in ([layers.GlobalAveragePooling2D], [layers.GlobalAveragePooling2D, layers.Dropout]):
        raise ValueError(f"model {model.name!r}: the head is not pooling → dense and cannot be merged")
    if predictions.get_config().get("activation") != "softmax":
        raise ValueError(f"model {model.name!r}: 'predictions' is not a softmax layer")


def build_ensemble(
    member_folders: Sequence[Path],
    output: Path,
    data: Path,
    *,
    version: str | None = None,
    argv: Sequence[str] | None = None,
) -> ArtifactMetadata:
    """Merge trained artifacts into ``output`` and score the merged model on their validation split."""
    import keras

    metas = [read_metadata(folder) for folder in member_folders]
    first = metas[0]
    for meta in metas[1:]:
        same = (meta.name, meta.classes, meta.preprocess, meta.data.get("split"))
        if same != (first.name, first.classes, first.preprocess, first.data.get("split")):
            raise ValueError("ensemble members must share architecture, classes, preprocessing and split")
    members = [keras.saving.load_model(folder / MODEL_FILE, compile=False) for folder in member_folders]
    model = merge_members(members)

    split = first.data.get("split", {})
    _, val_items = split_from_record(load_collection(data), split)
    spec = first.preprocess
    lungs = None
    if spec.lung_crop:  # members of one split share the lung model: the first one's ships with the merge
        from classifier.lungs import LungCropper, copy_lung_model

        lungs = LungCropper.load(member_folders[0] / "lungs")
        copy_lung_model(member_folders[0] / "lungs", output)
    inputs = np.stack([finish_gray(gray, spec) for gray in load_grays(val_items, spec, lungs)])
    truth = np.array([first.classes.index(item.label) for item in val_items], dtype=np.int64)
    report = classification_report(truth, model.predict(inputs, batch_size=32, verbose=0), first.classes)

    output.mkdir(parents=True, exist_ok=True)  # other files there (MODEL_CARD.md) are kept
    model.save(output / MODEL_FILE)
    created = datetime.now(UTC).replace(microsecond=0)
    metadata = ArtifactMetadata(
        name=first.name,
        version=version or f"{first.name}-ensemble{len(members)}-{created:%Y%m%d%H%M}",
        classes=first.classes,
        preprocess=spec,
        gradcam_layer=GRADCAM_LAYER,
        sha256=sha256_file(output / MODEL_FILE),
        created=created.isoformat(),
        data={**first.data, "command": " ".join(argv) if argv else first.data.get("command")},
        training={
            "ensemble": {
                "combination": "mean of the members' logits (one softmax)",
                "parameters": int(model.count_params()),
                "members": [
                    {
                        "version": meta.version,
                        "seed": meta.training.get("seed"),
                        "best_epoch": meta.training.get("best_epoch"),
                        "validation": {k: meta.validation.get(k) for k in ("accuracy", "macro_f1")},
                    }
                    for meta in metas
                ],
            },
            "recipe": first.training.get("recipe", {}),
            "seconds_per_epoch": first.training.get("seconds_per_epoch"),
        },
        validation=report,
    )
    write_metadata(output, metadata)
    plots.confusion_matrix(
        report["confusion_matrix"], first.classes, output / "confusion_matrix.png", title="validation"
    )
    (output / "training_curves.png").unlink(missing_ok=True)  # a single model's curves: not this one's
    return metadata


def train_ensemble(
    config: TrainingConfig, seeds: Sequence[int], argv: Sequence[str] | None = None
) -> ArtifactMetadata:
    """Train one member per seed on one split (that of ``config.split_seed``, default ``config.seed``)
    and merge them into ``config.output``; the members' own folders are not kept."""
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise ValueError("an ensemble needs at least two different seeds")
    split_seed = config.seed if config.split_seed is None else config.split_seed
    scratch = Path(tempfile.mkdtemp(prefix="cxr-ensemble-"))
    try:
        folders = []
        for number, seed in enumerate(seeds, start=1):
            LOGGER.info("ensemble member %d of %d (seed %d)", number, len(seeds), seed)
            member = replace(
                config, output=scratch / f"seed-{seed}", seed=seed, split_seed=split_seed,
                version=f"{config.version or 'member'}-seed{seed}",
            )
            folders.append(train(member, argv=argv).folder)
        return build_ensemble(folders, Path(config.output), Path(config.data), version=config.version, argv=argv)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
