"""Ensembles: several trained members merged into one ordinary Keras model.

Members differ in their seed (weights, shuffling, augmentation) or in their architecture; they share the
classes, the train/validation split and the preprocessing up to the final normalisation. The merged model
runs every member's trunk on the same input, concatenates their last feature maps into one layer named
like the members' Grad-CAM layer, and averages the members' logits with a single dense layer (block
weights / N, mean bias) — so the node loads, predicts and explains it exactly like a single model, and
Grad-CAM shows the evidence of all members. It needs heads of the form feature map → global average
pooling → (dropout) → dense softmax ``predictions``, which is what the architectures here have.

Members of different architectures are joined where their differences are exact to bridge: a member
whose input normalisation is an affine map of the first member's (``unit`` ↔ ``signed``) gets that map
as a ``Rescaling`` layer, and a coarser feature map is repeated (nearest-neighbour up-sampling by an
integer factor) to the finest one's size, which leaves its global average — and so the logits — unchanged.

A member may itself be a merged ensemble: it counts as many networks as it holds, so adding a network to a
shipped ensemble gives exactly the merge of all of them (`cxr-node ensemble OUT ENSEMBLE NEW`), without
the first members' own folders.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from classifier import plots
from classifier.architectures import GRADCAM_LAYER, get_architecture
from classifier.artifact import (
    MODEL_FILE,
    ArtifactMetadata,
    load_keras_file,
    read_metadata,
    sha256_file,
    staged,
    write_metadata,
)
from classifier.dataset import label_indices, load_collection, load_grays, split_from_record, writable_output
from classifier.errors import EnsembleError, OptionError, OutputError
from classifier.metrics import classification_report
from classifier.preprocess import PreprocessSpec, finish_gray, normalisation_change
from classifier.types import IDENTITY_MAX_CHARS, identity_problem

if TYPE_CHECKING:
    from classifier.training import TrainingConfig

LOGGER = logging.getLogger(__name__)


def merge_members(
    members: Sequence[Any],
    normalisations: Sequence[str] | None = None,
    weights: Sequence[int] | None = None,
) -> Any:
    """One Keras model averaging the logits of ``members`` (see the module text for the form needed).

    ``normalisations``: each member's input normalisation; the merged model takes the first one's.
    ``weights``: how many networks each member stands for (an ensemble of n counts n), so that merging an
    ensemble with another model gives the plain mean over all their networks; default 1 each.
    """
    import keras
    from keras import layers

    if len(members) < 2:
        raise EnsembleError("an ensemble needs at least two members")
    for member in members:
        _check_head(member)
    normalisations = list(normalisations or ["unit"] * len(members))
    counts = list(weights or [1] * len(members))
    if len(normalisations) != len(members) or len(counts) != len(members):
        raise ValueError("one normalisation and one weight per member")
    if min(counts) < 1:
        raise ValueError("member weights count networks: 1 or more")
    first = members[0]
    inputs = keras.Input(shape=tuple(first.input_shape[1:]), name="image")
    maps = [member.get_layer(GRADCAM_LAYER).output.shape[1:3] for member in members]
    height, width = max(int(h) for h, _ in maps), max(int(w) for _, w in maps)
    features = []
    for index, (member, normalisation) in enumerate(zip(members, normalisations, strict=True), start=1):
        x = inputs
        if normalisation != normalisations[0]:
            scale, offset = normalisation_change(normalisations[0], normalisation)
            x = layers.Rescaling(scale, offset, name=f"member{index}_{normalisation}")(x)
        x = keras.Model(member.inputs, member.get_layer(GRADCAM_LAYER).output, name=f"member{index}")(x)
        map_height, map_width = (int(v) for v in x.shape[1:3])
        if (map_height, map_width) != (height, width):
            if height % map_height or width % map_width:
                raise EnsembleError(
                    f"feature maps {map_height}x{map_width} and {height}x{width} do not tile; cannot merge"
                )
            x = layers.UpSampling2D(
                (height // map_height, width // map_width), interpolation="nearest", name=f"member{index}_tile"
            )(x)
        features.append(x)
    merged = layers.Concatenate(name=GRADCAM_LAYER)(features)
    pooled = layers.GlobalAveragePooling2D(name="gap")(merged)
    dense = layers.Dense(int(first.output_shape[-1]), activation="softmax", name="predictions")
    outputs = dense(pooled)
    kernels, biases = zip(*(member.get_layer("predictions").get_weights() for member in members), strict=True)
    shares = np.asarray(counts, dtype=np.float64) / sum(counts)
    dense.set_weights([
        np.concatenate([kernel * share for kernel, share in zip(kernels, shares, strict=True)], axis=0),
        np.sum([bias * share for bias, share in zip(biases, shares, strict=True)], axis=0),
    ])  # fmt: skip
    return keras.Model(inputs, outputs, name=f"{first.name}_ensemble{len(members)}")


def member_records(meta: ArtifactMetadata) -> list[dict[str, Any]]:
    """What ``model.json`` records of the networks in an artifact: one, or an ensemble's members."""
    nested = meta.training.get("ensemble", {}).get("members")
    if nested:
        return [dict(member) for member in nested]
    return [
        {
            "architecture": meta.name,
            "version": meta.version,
            "seed": meta.training.get("seed"),
            "best_epoch": meta.training.get("best_epoch"),
            "validation": {k: meta.validation.get(k) for k in ("accuracy", "macro_f1")},
            "recipe": meta.training.get("recipe", {}),
            "seconds_per_epoch": meta.training.get("seconds_per_epoch"),
        }
    ]


def _network_identity(record: Mapping[str, Any]) -> str:
    """What makes a member network the one it is (:func:`member_records`), without what differs between
    two runs of it (its version's date, its speed): the same seed trained twice gives the same weights in
    another file, and merged with itself, as two members or inside an ensemble, it weighed double."""
    return json.dumps({k: v for k, v in record.items() if k not in ("version", "seconds_per_epoch")},
                      sort_keys=True, default=str)


def _check_head(model: Any) -> None:
    from keras import layers

    try:
        features = model.get_layer(GRADCAM_LAYER)
        predictions = model.get_layer("predictions")
    except ValueError as exc:
        raise EnsembleError(
            f"model {model.name!r} has no {GRADCAM_LAYER!r}/'predictions' layers to merge"
        ) from exc
    after = model.layers[model.layers.index(features) + 1 : model.layers.index(predictions)]
    kinds = [type(layer) for layer in after]
    if kinds not in ([layers.GlobalAveragePooling2D], [layers.GlobalAveragePooling2D, layers.Dropout]):
        raise EnsembleError(f"model {model.name!r}: the head is not pooling → dense and cannot be merged")
    if predictions.get_config().get("activation") != "softmax":
        raise EnsembleError(f"model {model.name!r}: 'predictions' is not a softmax layer")


def _unprinted(meta: ArtifactMetadata) -> dict[str, Any]:
    """The ``split`` entry of a member's model.json without its fingerprint, which one trained before
    fingerprints were recorded does not have."""
    return {key: value for key, value in meta.data.get("split", {}).items() if key != "fingerprint"}


def _printed_split(folders: Sequence[Path], metas: Sequence[ArtifactMetadata]) -> tuple[Path, dict[str, Any]]:
    """The split the members share, from the first that recorded its fingerprint (and that member's
    folder), to check the data against; an EnsembleError if members recorded different fingerprints."""
    splits = [(folder, dict(meta.data.get("split", {}))) for folder, meta in zip(folders, metas, strict=True)]
    printed = [(folder, split) for folder, split in splits if "fingerprint" in split]
    if any(split["fingerprint"] != printed[0][1]["fingerprint"] for _, split in printed):
        raise EnsembleError(
            "ensemble members were trained on different data: their split fingerprints differ"
        )
    return printed[0] if printed else splits[0]


def _lung_digest(metadata: ArtifactMetadata) -> str:
    """The lung model a member crops with, by sha256, in either case (a digest copied by hand is often
    upper case, and loading accepts it)."""
    return str(metadata.lungs.get("sha256") or "").lower()


def _ensemble_name(parts: Sequence[str]) -> str:
    """The members' names joined by "+", or as many as fit in a report's 64 characters and how many more
    there are (the members are named in model.json): Lite1 and Lite2 beside the shipped pair made a name
    of 67 characters, which no report can carry."""
    for shown in range(len(parts), 0, -1):
        name = "+".join(parts[:shown]) + (f"+{len(parts) - shown} more" if shown < len(parts) else "")
        if len(name) <= IDENTITY_MAX_CHARS:
            return name
    return f"ensemble of {len(parts)}"


def _architectures(records: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """The architectures of the networks the members hold (:func:`member_records`), each once in order: not
    the members' names split at "+", which read a shortened name's "+2 more" as a member (review)."""
    return list(dict.fromkeys(str(member["architecture"]) for record in records for member in record))


def _default_version(name: str, members: int, created: datetime) -> str:
    """The name, the number of networks and the date; without the name when that is too long."""
    stamp = f"ensemble{members}-{created:%Y%m%d%H%M}"
    return f"{name}-{stamp}" if len(name) + 1 + len(stamp) <= IDENTITY_MAX_CHARS else stamp


def _member_version(version: str | None, architecture: str, seed: int) -> str:
    """A member's version: the ensemble's, its architecture and seed; without the ensemble's when too long."""
    made = f"{version or 'member'}-{architecture}-seed{seed}"
    return made if identity_problem(made) is None else f"member-{architecture}-seed{seed}"


def build_ensemble(
    member_folders: Sequence[Path],
    output: Path,
    data: Path,
    *,
    version: str | None = None,
    argv: Sequence[str] | None = None,
) -> ArtifactMetadata:
    """Merge trained artifacts into ``output`` and score the merged model on their validation split."""
    if any(Path(output).resolve() == Path(folder).resolve() for folder in member_folders):
        raise OutputError(
            f"cannot write the ensemble into {output}: it is a member's folder, whose model it would replace"
        )
    writable_output(output, data)
    metas = [read_metadata(folder) for folder in member_folders]
    first = metas[0]
    for meta in metas[1:]:
        if (meta.classes, _lung_digest(meta), _unprinted(meta)) != (
            first.classes,
            _lung_digest(first),
            _unprinted(first),
        ):
            raise EnsembleError("ensemble members must share classes, lung model and split")
    _check_preprocessing([meta.preprocess for meta in metas])
    printed, split = _printed_split(member_folders, metas)
    _, val_items = split_from_record(load_collection(data), split, model=f"model {printed}")
    records = [member_records(meta) for meta in metas]  # an ensemble member stands for all of its own
    networks = [_network_identity(member) for record in records for member in record]
    if len({meta.sha256 for meta in metas}) != len(metas) or len(set(networks)) != len(networks):
        raise EnsembleError(
            "ensemble members must be different networks: one is given twice (the same file, or the same "
            "architecture, seed and recipe trained again on this split, or a member of an ensemble given)"
        )
    members = [load_keras_file(folder / MODEL_FILE, EnsembleError) for folder in member_folders]
    model = merge_members(
        members, [meta.preprocess.normalisation for meta in metas], [len(record) for record in records]
    )
    name = _ensemble_name(_architectures(records))

    spec = first.preprocess
    from classifier.lungs import artifact_lungs, stage_lung_model

    lungs = artifact_lungs(member_folders[0], first)  # the members share it (checked above); it ships
    inputs = np.stack([finish_gray(gray, spec) for gray in load_grays(val_items, spec, lungs)])
    truth = np.array(label_indices(val_items, first.classes), dtype=np.int64)
    report = classification_report(truth, model.predict(inputs, batch_size=32, verbose=0), first.classes)

    output.mkdir(parents=True, exist_ok=True)  # other files there (MODEL_CARD.md) are kept
    model_path = output / MODEL_FILE
    model.save(staged(model_path))
    files = [model_path]
    if lungs is not None:
        files += stage_lung_model(member_folders[0] / "lungs", output)
    created = datetime.now(UTC).replace(microsecond=0)
    metadata = ArtifactMetadata(
        name=name,
        version=version or _default_version(name, len(members), created),
        classes=first.classes,
        preprocess=spec,
        gradcam_layer=GRADCAM_LAYER,
        sha256=sha256_file(staged(model_path)),
        created=created.isoformat(),
        data={**first.data, "split": split, "command": " ".join(argv) if argv else first.data.get("command")},
        training={
            "ensemble": {
                "combination": "mean of the members' logits (one softmax)",
                "parameters": int(model.count_params()),
                "members": [member for record in records for member in record],
            },
        },
        validation=report,
        lungs=first.lungs,
    )
    write_metadata(output, metadata, files)
    plots.confusion_matrix(
        report["confusion_matrix"], first.classes, output / "confusion_matrix.png", title="validation"
    )
    (output / "training_curves.png").unlink(missing_ok=True)  # a single model's curves: not this one's
    return metadata


def check_mergeable(configs: Sequence[TrainingConfig]) -> None:
    """What would stop the merge once every member had trained (and their folders were gone), checked
    before the first one trains: each member's options fit its recipe (``--average-last``), its weights
    are on the machine, the members share their preprocessing, and their untrained networks merge (a head
    that ends in pooling, feature maps that tile at this input size, input normalisations that convert)."""
    from classifier.training import check_recipe_options

    architectures = {member.architecture: get_architecture(member.architecture) for member in configs}
    for member in configs:
        check_recipe_options(member)
        architectures[member.architecture].check_weights(member.backbone_weights)
    specs = [member.preprocess_for(architectures[member.architecture]) for member in configs]
    _check_preprocessing(specs)  # so one input size for all
    # one untrained network per architecture: members of one architecture (seeds) merge as one does twice
    untrained = {
        name: architecture.build(2, weights=None, input_size=specs[0].input_size)
        for name, architecture in architectures.items()
    }
    try:
        networks = [untrained[member.architecture] for member in configs]
        merge_members(networks, [spec.normalisation for spec in specs])
    except ValueError as exc:
        raise EnsembleError(f"ensemble members cannot be merged: {exc}") from exc


def _check_preprocessing(specs: Sequence[PreprocessSpec]) -> None:
    """Members read their images alike: the same preprocessing but for an input scale one converts."""
    first = specs[0]
    for spec in specs[1:]:
        if replace(spec, normalisation=first.normalisation) != first:
            raise EnsembleError("ensemble members must share their preprocessing (input size, crops, lungs)")
        try:
            normalisation_change(first.normalisation, spec.normalisation)
        except ValueError as exc:
            raise EnsembleError(f"ensemble members cannot be merged: {exc}") from exc


def train_ensemble(
    config: TrainingConfig,
    seeds: Sequence[int],
    argv: Sequence[str] | None = None,
    architectures: Sequence[str] | None = None,
) -> ArtifactMetadata:
    """Train one member per seed — or, with ``architectures``, one member per architecture, each with its
    own recipe and ``config.seed`` — on one split (that of ``config.split_seed``, default
    ``config.seed``) and merge them into ``config.output``; the members' own folders are not kept."""
    from classifier.training import shared_lung_model, train  # TensorFlow, augmentation: not for merging

    if architectures:
        members = [(architecture, config.seed) for architecture in architectures]
    else:
        members = [(config.architecture, seed) for seed in seeds]
    if len(set(members)) != len(members) or len(members) < 2:
        raise OptionError("an ensemble needs at least two different seeds or architectures")
    writable_output(config.output, config.data)  # before the members train, not after
    # One split for every member: the first architecture's held-out fraction unless the caller gave one
    fraction = config.held_out_fraction(get_architecture(members[0][0]).recipe)
    scratch = Path(tempfile.mkdtemp(prefix="cxr-ensemble-"))
    try:
        configs = [
            replace(
                config, architecture=architecture, output=scratch / f"{number}-{architecture}-seed{seed}",
                seed=seed, split_seed=config.drawn_split_seed, validation_fraction=fraction,
                version=_member_version(config.version, architecture, seed),
            )  # fmt: skip
            for number, (architecture, seed) in enumerate(members, start=1)
        ]
        check_mergeable(configs)
        if config.lung_masks is not None:  # one U-Net for all: the merge needs the members to share it
            lungs = shared_lung_model(configs[0], scratch / "lungs")
            configs = [replace(member, lung_masks=None, lung_model=lungs) for member in configs]
        folders = []
        for number, member in enumerate(configs, start=1):
            LOGGER.info(
                "ensemble member %d of %d (%s, seed %d)",
                number, len(configs), member.architecture, member.seed,
            )  # fmt: skip
            folders.append(train(member, argv=argv).folder)
        return build_ensemble(folders, Path(config.output), Path(config.data), version=config.version, argv=argv)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
