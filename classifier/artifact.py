"""A model artifact folder: ``model.keras`` + ``model.json`` (+ plots). The JSON is the model's identity
and its preprocessing contract; its ``sha256`` pins the weights file so a swapped file is refused."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from classifier.errors import ClassifierError, ModelArtifactError, OutputError
from classifier.preprocess import PreprocessSpec
from classifier.types import ModelInfo, identity_problem, label_key

LOGGER = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METADATA_FILE = "model.json"
METRICS_FILE = "metrics.json"  # what an evaluation writes (classifier.evaluation)
FORMAT_VERSION = 1
STAGING_PREFIX = ".new-"  # a file written, not yet in place (write_metadata)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ArtifactMetadata:
    """The content of model.json."""

    name: str  # architecture name
    version: str
    classes: tuple[str, ...]
    preprocess: PreprocessSpec
    gradcam_layer: str
    sha256: str
    created: str  # ISO 8601 UTC
    data: Mapping[str, Any] = field(default_factory=dict)  # data summary, split, command line
    training: Mapping[str, Any] = field(default_factory=dict)  # recipe and history
    validation: Mapping[str, Any] = field(default_factory=dict)  # metrics on the validation split
    novelty: Mapping[str, Any] = field(default_factory=dict)  # density check + turn probe, if fitted
    lungs: Mapping[str, Any] = field(default_factory=dict)  # the lung model's sha256, if cropped to lungs

    def __post_init__(self) -> None:
        for key, text in (("name", self.name), ("version", self.version)):
            if problem := identity_problem(text):
                raise ValueError(f"the model {key} {text[:80]!r} {problem}")

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            version=self.version,
            classes=self.classes,
            input_size=self.preprocess.input_size,
            sha256=self.sha256,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "classes": list(self.classes),
            "input_size": list(self.preprocess.input_size),
            "preprocessing": self.preprocess.to_dict(),
            "gradcam_layer": self.gradcam_layer,
            "sha256": self.sha256,
            "created": self.created,
            "data": dict(self.data),
            "training": dict(self.training),
            "validation": dict(self.validation),
            **({"novelty": dict(self.novelty)} if self.novelty else {}),
            **({"lungs": dict(self.lungs)} if self.lungs else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactMetadata:
        """Refuses another format version (its fields may mean something else) and a top-level input size
        that is not the preprocessing's (the one the model is fed)."""
        found = data.get("format") if isinstance(data, Mapping) else None
        if type(found) is not int or found != FORMAT_VERSION:  # not ``true``, which equals 1
            raise ModelArtifactError(f"model.json format {found!r}: this node reads format {FORMAT_VERSION}")
        try:
            metadata = cls(
                name=_text(data, "name"),
                version=_text(data, "version"),
                classes=tuple(str(c) for c in data["classes"]),
                preprocess=PreprocessSpec.from_dict(data["preprocessing"]),
                gradcam_layer=_text(data, "gradcam_layer"),
                sha256=_digest(data["sha256"]),
                created=_text(data, "created", ""),
                data=_record(data, "data"),
                training=_record(data, "training"),
                validation=_record(data, "validation"),
                novelty=_record(data, "novelty"),
                lungs=_record(data, "lungs"),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ModelArtifactError(f"model.json is incomplete or invalid: {exc}") from exc
        classes = data["classes"]
        named = isinstance(classes, list) and all(isinstance(c, str) and c.strip() for c in classes)
        if not named or len({label_key(c) for c in classes}) != len(classes):
            # a repeated name collapsed two probabilities into one ("covid" 0.17 where the model said 0.73)
            raise ModelArtifactError(f"model.json classes {classes!r} are not a list of distinct names")
        recorded = data.get("input_size", metadata.preprocess.input_size)
        if not isinstance(recorded, list | tuple) or list(recorded) != list(metadata.preprocess.input_size):
            raise ModelArtifactError(
                f"model.json input_size {data['input_size']} is not the preprocessing's "
                f"{list(metadata.preprocess.input_size)}"
            )
        return metadata


def _text(data: Mapping[str, Any], key: str, default: str | None = None) -> str:
    """A text field of model.json: ``"version": null`` became the text "None" in every report."""
    value = data[key] if default is None else data.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} {value!r} is not text")
    return value


def _record(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """An object field of model.json, empty when absent: ``"novelty": []`` turned the novelty, turn and
    negative checks off without a word."""
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} is not an object")
    return dict(value)


def _digest(value: object) -> str:
    """A recorded sha256 as :func:`sha256_file` writes it (lower case): tools print it in upper case too
    (PowerShell's Get-FileHash), which was then refused as not matching."""
    if not isinstance(value, str) or len(value) != 64 or value.lower().strip("0123456789abcdef"):
        raise ValueError(f"sha256 {value!r} is not a hex digest")
    return value.lower()


def read_json(path: Path) -> Any:
    """A JSON file that an artifact holds, or a :class:`ModelArtifactError` naming it: not UTF-8, not JSON,
    nested past what Python's parser reaches (a RecursionError escaped) or with a number of more digits
    than Python converts (a ValueError escaped, and the CLI printed a traceback)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelArtifactError(f"{path} is not valid JSON: {exc}") from exc


def writable_folder(folder: Path) -> Path:
    """``folder``, created if need be, once a file could be written in it; else an :class:`OutputError`.

    Train, ensemble and evaluate check their output before they read the data: they found a file of
    that name, or a folder they may not write, only when saving, after an hour of training."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot write to {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror or type(exc).__name__}") from exc
    return folder


def staged(path: Path) -> Path:
    """Where a file of an artifact is written before it takes ``path``'s place: beside it (one file
    system, so the move is a rename), hidden, and with the same suffix (Keras saves only to ``.keras``)."""
    return path.with_name(STAGING_PREFIX + path.name)


def _flush_to_disk(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_metadata(folder: Path, metadata: ArtifactMetadata, files: Sequence[Path] = ()) -> Path:
    """Write model.json and put ``files``, written at their :func:`staged` names, in their places with it.

    A model is often retrained, merged or given a novelty check in the folder a node loads it from. Until
    every new file is complete and on disk, the old ones stay: an interruption (Ctrl-C, a full disk, a
    power cut) leaves the old model whole, never a new ``model.keras`` cut short beside the old model.json.
    Then the files are renamed into place, model.json last; an interruption in those microseconds leaves
    files whose sha256 differ from model.json's record, which loading refuses."""
    path = folder / METADATA_FILE
    try:  # NaN or Infinity is not JSON: a strict reader of model.json refuses the whole file
        text = json.dumps(metadata.to_dict(), indent=2, sort_keys=False, allow_nan=False)
    except ValueError as exc:
        for done in files:
            staged(done).unlink(missing_ok=True)  # the old files stay, with nothing half-written beside them
        raise ModelArtifactError(f"{METADATA_FILE} would record a value that is not a finite number") from exc
    staged(path).write_text(text + "\n", encoding="utf-8")
    for done in (*files, path):
        _flush_to_disk(staged(done))
    for done in (*files, path):
        os.replace(staged(done), done)
    for parent in dict.fromkeys(done.parent for done in (*files, path)):
        try:
            _flush_to_disk(parent)  # the renames themselves
        except OSError:  # a file system that cannot sync a folder (some network ones): the files are in place
            LOGGER.debug("the renames in %s could not be flushed to disk", parent.name)
    return path


def read_metadata(folder: Path, *, verify: bool = True) -> ArtifactMetadata:
    """model.json of an artifact folder; with ``verify`` the weights file must match its recorded hash."""
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not path.is_file():
        raise ModelArtifactError(f"no {METADATA_FILE} in {folder}")
    metadata = ArtifactMetadata.from_dict(read_json(path))
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise ModelArtifactError(f"no {MODEL_FILE} in {folder}")
    if verify and sha256_file(model_path) != metadata.sha256:
        raise ModelArtifactError(f"{model_path} does not match the sha256 recorded in {METADATA_FILE}")
    return metadata


def load_verified_keras(path: Path, sha256: str, recorded_in: str = METADATA_FILE) -> Any:
    """The Keras file at ``path`` as ``recorded_in`` pins it by ``sha256``: read once, hashed, and loaded
    from a private copy of those bytes. Hashed first and loaded by name later, a retraining that renamed
    its new model.keras into place in between (:func:`write_metadata`) was loaded as the old model: new
    weights in every report under the old version (review). A copy that cannot be written (a full or
    read-only temporary folder) is an error naming the folder, not an OSError traceback."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelArtifactError(f"{path} cannot be read: {exc.strerror or type(exc).__name__}") from exc
    if hashlib.sha256(data).hexdigest() != sha256.lower():
        raise ModelArtifactError(f"{path} does not match the sha256 recorded in {recorded_in}")
    try:
        scratch = tempfile.TemporaryDirectory(prefix="cxr-model-")
    except OSError as exc:
        raise ModelArtifactError(
            f"{path} cannot be loaded: no working copy in {tempfile.gettempdir()} ({exc.strerror})"
        ) from exc
    with scratch as folder:
        copy = Path(folder) / path.name
        try:
            copy.write_bytes(data)
        except OSError as exc:
            raise ModelArtifactError(
                f"{path} cannot be loaded: no room for a working copy in {tempfile.gettempdir()} "
                f"({exc.strerror or type(exc).__name__})"
            ) from exc
        return load_keras_file(copy, shown=path)


def load_keras_file(
    path: Path, error: type[ClassifierError] = ModelArtifactError, *, shown: Path | None = None
) -> Any:
    """A saved Keras model, uncompiled; a file Keras cannot read (cut short after it was hashed, a member's
    CRC wrong, a layer configuration this Keras cannot rebuild) is an ``error`` naming it, not Keras' or
    zipfile's own exception. Keras raises what its parsing meets: besides OSError, ValueError, TypeError
    and BadZipFile, a KeyError for an archive without config.json and a RecursionError for a nested one
    escaped as tracebacks (review), so every exception of the load is the artifact's. ``shown`` is the
    path the message names (the file ``path`` was copied from)."""
    import keras

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 — see above; the type is named, the file's content is not
        raise error(f"{shown or path} cannot be loaded: {type(exc).__name__}") from exc
