"""Labelled image collections (a folder of class sub-folders or a manifest CSV) and the group-aware split.

The split is by *group* (patient, or source publication), never by image: two views of one patient on
both sides of the split make the validation score a memory test.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import pydicom

from classifier.artifact import METADATA_FILE, METRICS_FILE, sha256_file, writable_folder
from classifier.errors import ClassifierError, reason_for
from classifier.preprocess import (
    LungFinder,
    PreprocessSpec,
    dataset_to_gray,
    dataset_to_upright_gray,
    fit_gray,
    is_dicom_file,
    pil_to_gray,
    read_image_file,
)
from classifier.types import label_key

LOGGER = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ClassifierError):
    """The labelled collection is empty, malformed or unusable for the requested split."""


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str  # as :func:`load_collection` reads it: folded by ``types.label_key``
    group: str  # patient/source key; the path itself when the collection has none


def _is_image(path: Path) -> bool:
    """A picture by its suffix, or a DICOM file by suffix or preamble (not the DICOMDIR index of a medium)."""
    if not path.is_file() or path.name.upper() == "DICOMDIR":
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(path)


_NOT_AN_IMAGE = "DICOM without an image"  # how the skipped-files warning counts them


@dataclass(frozen=True)
class _DicomHeader:
    image: bool  # False for an object with no image: a report, key object, presentation state or PDF
    patient: str | None  # the Patient ID as a group (:func:`group_key`), None when empty or unreadable


def _dicom_header(path: Path) -> _DicomHeader:
    """What the split needs from a DICOM file's header. An object with no image, as a PACS export holds
    beside its images, is told by the absent Rows, which every image object has. A file whose header
    cannot be read is taken as an image of no known patient, so that its reading says why."""
    try:
        header = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Rows", "PatientID"]
        )
        patient = group_key(str(header.get("PatientID", "") or ""))
    except Exception:  # noqa: BLE001 — pydicom raises many types for a damaged file; reading it says which
        return _DicomHeader(image=True, patient=None)
    image = not ("SOPClassUID" in header and "Rows" not in header)  # a file cut short has neither
    return _DicomHeader(image=image, patient=f"{_PATIENT}{patient}" if patient else None)


_PATIENT = "patient:"  # the group of a DICOM image's Patient ID, apart from sub-folder and file groups


def _files_under(class_dir: Path) -> list[Path]:
    """Every file under ``class_dir``, sorted, through linked folders too (a PACS export may link a
    patient's folder in), each real folder once. A folder that cannot be read is an error: its images
    were left out without a word."""
    seen: set[Path] = set()

    def refuse(exc: OSError) -> None:
        where = Path(exc.filename).relative_to(class_dir.parent) if exc.filename else class_dir.name
        raise DatasetError(f"cannot read the folder {where}: {exc.strerror or type(exc).__name__}")

    found: list[Path] = []
    for folder, folders, files in os.walk(class_dir, followlinks=True, onerror=refuse):
        real = Path(folder).resolve()
        if real in seen:  # a link back up the tree, or a second link to one folder
            folders.clear()
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        found.extend(Path(folder) / name for name in files)
    return sorted(found)


def writable_output(output: Path, data: Path) -> Path:
    """:func:`classifier.artifact.writable_folder`, refused first when ``output`` lies in a folder that is
    read by its class sub-folders: the output made a class of its own (an empty one, refused on every
    later run; or, once written, its plots trained as images of a class named after it)."""
    data, output = Path(data), Path(output)
    if data.is_dir() and not (data / "manifest.csv").is_file():
        if output.resolve().is_relative_to(data.resolve()):
            raise DatasetError(
                f"the output folder {output} is inside the data folder {data}, whose sub-folders are its "
                "classes; write it elsewhere"
            )
    return writable_folder(output)


def _hidden(relative: Path) -> bool:
    """A dot file or folder (macOS ``._x.png`` resource forks, ``.DS_Store``, ``.git``): not an image."""
    return any(part.startswith(".") for part in relative.parts)


def _existing(path: Path) -> Path:
    """``path``, or a clear error for a link to a file that is gone (it was skipped without a word, and
    the evaluation scored fewer images than the folder holds)."""
    if path.is_symlink() and not path.exists():
        raise DatasetError(f"{path} is a link to a file that does not exist")
    return path


def load_collection(source: Path) -> list[LabelledImage]:
    """A folder ``source/<class>/<image>`` or a CSV manifest with columns ``file,label[,group]`` (files
    relative to the manifest's folder). Sorted, so the order never depends on the file system.

    In a folder, an image directly in its class folder is its own group; images under a sub-folder
    (``<class>/<patient>/...``, as a PACS export is laid out) share the group of that sub-folder's name,
    whatever class it is under, so one patient's images stay on one side of every split. DICOM images
    of one Patient ID are one group too, with the sub-folders they are in. A manifest row without a
    group takes its DICOM image's Patient ID, else its file.

    Labels are folded as :func:`classifier.types.label_key` compares them (``COVID``, `` covid `` and
    ``Covid`` are the class ``covid``), as evaluation matches them to a model's classes."""
    source = Path(source)
    if source.is_file():
        items = _load_manifest(source)
        _log_source(source, items, "listed in this manifest")
        return items
    if not source.is_dir():
        raise DatasetError(f"no such folder or manifest: {source}")
    manifest = source / "manifest.csv"
    if manifest.is_file():  # it alone says which files are images of which class
        items = _load_manifest(manifest)
        _log_source(source, items, "listed in its manifest.csv (its class sub-folders are not read)")
        return items
    class_dirs = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"no images in class sub-folders of {source}")
    patients: dict[Path, str] = {}
    items = _each_file_once(
        source, [item for folder in class_dirs for item in _class_folder(source, folder, patients)]
    )
    items = _joined_by_patient(items, patients)
    _check_folder_groups(source, items, patients)
    loose = sum(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in source.iterdir())
    if loose:  # beside the class folders, so of no class: said, as the class folders' other files are
        LOGGER.warning(
            "%s: %d image(s) beside the class sub-folders are of no class and not read", source, loose
        )
    _log_folded(source, [class_dir.name for class_dir in class_dirs])
    _log_source(source, items, "in its class sub-folders (it has no manifest.csv)")
    return items


def _log_source(source: Path, items: Sequence[LabelledImage], where: str) -> None:
    """One line saying what a collection was read from: a folder's manifest.csv takes the place of its
    class sub-folders, which a reader of the folder may not expect."""
    LOGGER.info("%s: %d images of %d classes %s", source, len(items), len(class_names(items)), where)


def _class_folder(source: Path, class_dir: Path, patients: dict[Path, str]) -> list[LabelledImage]:
    """The images of one class folder, each DICOM image's Patient ID put in ``patients``. Other files (a
    ``.webp``, notes; not dot files or a DICOMDIR) are counted by suffix in one warning, and a folder
    without images is refused: both vanished without a word, the second with its class."""
    outputs = sorted(name for name in OUTPUT_FILES if (class_dir / name).is_file())
    if outputs:
        raise DatasetError(
            f"class folder {class_dir.name} of {source} holds {', '.join(outputs)}: it is a model or "
            "evaluation output, not a class of images; move it out of the data folder"
        )
    items: list[LabelledImage] = []
    skipped: Counter[str] = Counter()
    label = label_key(class_dir.name)
    for path in _files_under(class_dir):
        if _hidden(path.relative_to(class_dir)):
            continue
        if _is_image(_existing(path)):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                header = _dicom_header(path)
                if not header.image:
                    skipped[_NOT_AN_IMAGE] += 1
                    continue
                if header.patient:
                    patients[path] = header.patient
            items.append(LabelledImage(path, label, _folder_group(path.relative_to(source))))
        elif path.is_file() and path.name.upper() != "DICOMDIR":
            skipped[path.suffix.lower() or "without suffix"] += 1
    kinds = ", ".join(f"{count} {suffix}" for suffix, count in sorted(skipped.items()))
    if not items:
        others = f" ({sum(skipped.values())} other files: {kinds})" if skipped else ""
        raise DatasetError(
            f"class folder {class_dir.name} of {source} holds no images{others}; add its images or move "
            "it out of the folder"
        )
    if skipped:
        LOGGER.warning(
            "class folder %s: %d files skipped, not pictures (%s) or DICOM images: %s",
            class_dir.name, sum(skipped.values()), " ".join(IMAGE_SUFFIXES), kinds,
        )  # fmt: skip
    return items


# What a model artifact and an evaluation write at their top level
OUTPUT_FILES = (METADATA_FILE, METRICS_FILE)


def _each_file_once(source: Path, items: Sequence[LabelledImage]) -> list[LabelledImage]:
    """``items`` with a file reached twice through links read once; under two classes it is refused, as a
    manifest listing a file with two labels is (it was counted in both, and could sit on both sides of
    the split)."""
    first: dict[Path, LabelledImage] = {}
    kept: list[LabelledImage] = []
    for item in items:
        earlier = first.setdefault(item.path.resolve(), item)
        if earlier is item:
            kept.append(item)
        elif earlier.label != item.label:
            raise DatasetError(
                f"{source}: {earlier.path.relative_to(source)} and {item.path.relative_to(source)} are one "
                f"file (linked) under the classes {earlier.label} and {item.label}; keep it in one"
            )
    if len(kept) < len(items):
        LOGGER.warning(
            "%s: %d images reached twice through links are read once", source, len(items) - len(kept)
        )
    return kept


def _joined_by_patient(items: Sequence[LabelledImage], patients: Mapping[Path, str]) -> list[LabelledImage]:
    """``items`` with the groups of one Patient ID joined into one: a DICOM file directly in its class
    folder was its own group, so two images of one patient, as ``storescp`` or a PACS export writes them
    side by side, could be on both sides of the split; a patient whose studies an export put in two
    sub-folders was two patients. Groups no Patient ID joins keep their names, so the split of a
    collection of pictures, or of DICOM files without a Patient ID, is the one drawn before."""
    parent: dict[str, str] = {}

    def root(group: str) -> str:
        while (up := parent.get(group, group)) != group:
            group = up
        return group

    for item in items:
        if patient := patients.get(item.path):
            first, second = sorted((root(item.group), root(patient)))
            if first != second:
                parent[second] = first
    return [replace(item, group=root(item.group)) for item in items]


# A patient's images across classes that are half a collection: a few in a tiny one, not this many
_LAYOUT_MIN_IMAGES = 10


def _check_folder_groups(
    source: Path, items: Sequence[LabelledImage], patients: Mapping[Path, str]
) -> None:
    """Refuse one group that holds half the collection or more, across classes and at least
    :data:`_LAYOUT_MIN_IMAGES` images: a sub-folder of a class folder is read as a patient, so a layout
    folder (``<class>/images/``) made all images one patient, and the split trained on one folder and
    validated on another. Groups a Patient ID joined are checked by :func:`_check_patient_groups`."""
    for members in _group_members(items).values():
        if any(item.path in patients for item in members):
            continue
        labels = {item.label for item in members}
        if len(labels) > 1 and 2 * len(members) >= len(items) and len(members) >= _LAYOUT_MIN_IMAGES:
            name = members[0].path.relative_to(source).parts[1]
            raise DatasetError(
                f"{source}: the sub-folder name {name!r} holds {len(members)} of {len(items)} images, "
                f"under the classes {', '.join(sorted(labels))}. A sub-folder of a class folder is read as "
                "one patient, whose images stay on one side of the split; put the images directly in their "
                "class folders, or list them in a manifest.csv with a group column"
            )
    _check_patient_groups(source, items, patients)


def _check_patient_groups(source: Path, items: Sequence[LabelledImage], patients: Container[Path]) -> None:
    """Refuse a group joined by one Patient ID that holds, with at least :data:`_LAYOUT_MIN_IMAGES`
    images, half the collection across classes or every image of its class: an export that replaced
    every Patient ID by one (``ANONYMOUS``) made one patient of them, and the split then validated no
    image of that class, with a warning only (review). The message does not repeat the ID, which may
    name a patient. ``patients``: the images whose group their Patient ID gave."""
    per_class = Counter(item.label for item in items)
    for members in _group_members(items).values():
        if len(members) < _LAYOUT_MIN_IMAGES or not any(item.path in patients for item in members):
            continue
        labels = sorted({item.label for item in members})
        if len(labels) > 1 and 2 * len(members) >= len(items):
            held = f"{len(members)} of {len(items)} images, under the classes {', '.join(labels)},"
        elif len(labels) == 1 and len(members) == per_class[labels[0]] and len(per_class) > 1:
            held = f"all {len(members)} images of the class {labels[0]}"
        else:
            continue
        raise DatasetError(
            f"{source}: {held} share a Patient ID (an export that replaced them all by one?). A DICOM "
            "image's Patient ID is read as its patient, whose images stay on one side of the split; list "
            "the images in a manifest.csv with a group column"
        )


def _log_folded(source: Path, spellings: Sequence[str]) -> None:
    """One line naming the labels read as one class because they differ only in case or spaces."""
    by_class: dict[str, set[str]] = defaultdict(set)
    for spelling in spellings:
        by_class[label_key(spelling)].add(spelling.strip())
    merged = {name: sorted(found) for name, found in sorted(by_class.items()) if len(found) > 1}
    if merged:
        LOGGER.info(
            "%s: labels read as one class each: %s", source.name,
            "; ".join(f"{', '.join(map(repr, found))} as {name}" for name, found in merged.items()),
        )  # fmt: skip


def group_key(text: str) -> str:
    """A patient's group as compared: case and runs of white space set aside, so that ``P001``, ``p001``
    and ``P001 `` are one patient, never on both sides of a split (they were, review)."""
    return " ".join(text.split()).casefold()


def _folder_group(relative: Path) -> str:
    """The group of the image at ``relative`` (``<class>/...``) to the collection: ``<class>/<image>``
    for one directly in its class folder, else its sub-folder's name (see :func:`load_collection`)."""
    return relative.as_posix() if len(relative.parts) == 2 else f"folder:{group_key(relative.parts[1])}"


def _load_manifest(manifest: Path) -> list[LabelledImage]:
    """The images a manifest lists, each once: a file listed again with the same label and group is read
    once (one warning says how many), with another label or group it is refused (it was counted twice,
    and could be on both sides of the split)."""
    items: list[LabelledImage] = []
    spellings: list[str] = []
    first: dict[Path, tuple[int, str, str | None]] = {}  # path: its first line, label and given group
    by_patient: set[Path] = set()  # the rows without a group whose image's Patient ID gave one
    repeated = 0
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(handle)
            reader.fieldnames = _manifest_columns(manifest, reader.fieldnames)
            for row in reader:
                if not any(isinstance(value, str) and value.strip() for value in row.values()):
                    continue  # a row of empty fields (",,"), as spreadsheets save formatted empty rows
                line, item = reader.line_num, _manifest_row(manifest, reader.line_num, row)
                spellings.append(str(row["label"]))
                listed = (item.label, _given_group(row))
                earlier = first.setdefault(item.path, (line, *listed))
                if earlier[0] == line:
                    items.append(item)
                    if listed[1] is None and item.group.startswith(_PATIENT):
                        by_patient.add(item.path)
                elif earlier[1:] == listed:
                    repeated += 1
                else:
                    how = f"as {earlier[1]} and {item.label}" if earlier[1] != item.label else "in two groups"
                    raise DatasetError(
                        f"{manifest}: {str(row['file']).strip()} is listed on lines {earlier[0]} and {line} "
                        f"{how}; list each file once"
                    )
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{manifest} is not a UTF-8 CSV file: {type(exc).__name__}") from exc
    if not items:
        raise DatasetError(f"{manifest} lists no images")
    if repeated:
        LOGGER.warning(
            "%s: %d rows repeat an earlier row's file, label and group; each file is read once",
            manifest.name, repeated,
        )  # fmt: skip
    _log_folded(manifest, spellings)
    _check_patient_groups(manifest, items, by_patient)
    return sorted(items, key=lambda item: str(item.path))


def _manifest_columns(manifest: Path, header: Sequence[str] | None) -> list[str]:
    """The header's column names folded as labels are (``Group`` and `` group`` are ``group``): a column
    matched only when spelt exactly made every image its own group, and one patient could then be on both
    sides of the split. Refused without ``file`` and ``label`` or with a name twice."""
    columns = [name.strip().casefold() for name in header or ()]
    if not {"file", "label"} <= set(columns):
        raise DatasetError(f"{manifest} needs the columns file,label[,group]")
    if twice := sorted({name for name in columns if name and columns.count(name) > 1}):
        raise DatasetError(f"{manifest} has the column {', '.join(twice)} twice; keep one")
    return columns


def _manifest_row(
    manifest: Path, line: int, row: Mapping[str | None, str | list[str] | None]
) -> LabelledImage:
    """One manifest row as an image (its label folded, see :func:`load_collection`), or a DatasetError
    naming its line (a short row has no label)."""
    file, label = row.get("file"), row.get("label")
    if not isinstance(file, str) or not file.strip() or not isinstance(label, str) or not label.strip():
        raise DatasetError(f"{manifest}, line {line}: every row needs a file and a label")
    try:
        path = (manifest.parent / file.strip()).resolve()
        present = path.is_file()
    except (OSError, ValueError, RuntimeError) as exc:  # too long a name, a NUL byte, a link loop
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
            "a loop of links" if isinstance(exc, RuntimeError) else str(exc)
        )
        raise DatasetError(
            f"{manifest}, line {line}: the file {file.strip()!r} cannot be found ({why})"
        ) from exc
    if not present:
        raise DatasetError(f"{manifest}: missing file {file}")
    patient = _dicom_header(path).patient if path.suffix.lower() not in IMAGE_SUFFIXES else None
    group = _given_group(row) or patient or file.strip()
    return LabelledImage(path=path, label=label_key(label), group=group)


def _given_group(row: Mapping[str | None, str | list[str] | None]) -> str | None:
    """A manifest row's group as compared (:func:`group_key`); None when the row names none."""
    group = row.get("group")
    return (group_key(group) or None) if isinstance(group, str) else None


def class_names(items: Sequence[LabelledImage]) -> tuple[str, ...]:
    """The classes of ``items``, sorted: their labels, folded when read (:func:`load_collection`)."""
    return tuple(sorted({item.label for item in items}))


def _group_members(items: Sequence[LabelledImage]) -> dict[str, list[LabelledImage]]:
    """The images of each group, in the order of ``items``."""
    by_group: dict[str, list[LabelledImage]] = defaultdict(list)
    for item in items:
        by_group[item.group].append(item)
    return by_group


def _groups(items: Sequence[LabelledImage]) -> tuple[dict[str, list[LabelledImage]], dict[str, str]]:
    """The images of each group, and each group's class: the majority label of its images, the first by
    name on a tie (not the first met, which made the split depend on the order of ``items``)."""
    by_group = _group_members(items)
    group_class = {group: _majority(members) for group, members in by_group.items()}
    return by_group, group_class


def _majority(members: Sequence[LabelledImage]) -> str:
    counts = Counter(item.label for item in members)
    return min(counts, key=lambda label: (-counts[label], label))


def _partition(
    items: Sequence[LabelledImage], validation_groups: set[str], too_few: str
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """(train, validation) with the images of ``validation_groups`` on the validation side."""
    train = [item for item in items if item.group not in validation_groups]
    validation = [item for item in items if item.group in validation_groups]
    if not train or not validation:
        raise DatasetError(too_few)
    return train, validation


def split_by_group(
    items: Sequence[LabelledImage], validation_fraction: float, seed: int
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Stratified group split: per class (a group's majority label), whole groups go to validation until
    about ``validation_fraction`` of that class's images are there. Deterministic for a seed.

    A group that would take a class past twice its target stays in training (one patient or source with
    most of a class's images would otherwise be the whole validation set of that class, or most of it),
    unless every group is: then the smallest goes, so that no class is left unvalidated. A class whose
    validation share still ends far from the fraction is named in a warning."""
    if not 0.0 < validation_fraction < 1.0:
        raise DatasetError("the validation fraction must be between 0 and 1")
    by_group, group_class = _groups(items)
    rng = random.Random(seed)
    validation_groups: set[str] = set()
    for label in sorted(set(group_class.values())):
        groups = sorted(g for g, c in group_class.items() if c == label)
        rng.shuffle(groups)
        total = sum(len(by_group[g]) for g in groups)
        target = validation_fraction * total
        taken = 0
        for group in groups[:-1]:  # keep at least one group of every class for training
            if taken >= target:
                break
            if taken + len(by_group[group]) > 2 * target:
                continue
            validation_groups.add(group)
            taken += len(by_group[group])
        if not taken and len(groups) > 1:  # every group too large: the smallest, rather than no image at all
            smallest = min(groups, key=lambda g: (len(by_group[g]), g))
            validation_groups.add(smallest)
            taken = len(by_group[smallest])
        if not target / 2 <= taken <= 2 * target:
            LOGGER.warning(
                "class %s: %d of %d images in validation (target %.0f); its groups are too few or too large "
                "for a balanced split", label, taken, total, target,
            )
    train, validation = _partition(items, validation_groups, "too few groups for a train/validation split")
    if absent := _unvalidated(items, validation, set(group_class.values())):
        # a class that is the majority of no group was not split for, and its groups all in training
        LOGGER.warning(
            "class %s: no image in validation; its images are in groups of other classes' patients",
            ", ".join(absent),
        )  # fmt: skip
    return train, validation


def _unvalidated(
    items: Sequence[LabelledImage], validation: Sequence[LabelledImage], said: Container[str]
) -> list[str]:
    """The labels of ``items`` no image of ``validation`` has, but those in ``said`` (warned of already)."""
    validated = {item.label for item in validation}
    return sorted(label for label in {item.label for item in items} - validated if label not in said)


def split_by_fold(
    items: Sequence[LabelledImage], fold: int, folds: int, seed: int
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Group k-fold cross-validation: the ``fold``-th of ``folds`` validation sets and the rest.

    Per class (a group's majority label), the shuffled groups go one by one to the fold holding the
    fewest images of that class so far, so every fold gets about 1/k of each class and no group is in
    two folds. Deterministic for a seed; the k validation sets partition the collection.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise DatasetError("the fold must be one of at least two folds")
    by_group, group_class = _groups(items)
    rng = random.Random(seed)
    fold_groups: list[set[str]] = [set() for _ in range(folds)]
    for label in sorted(set(group_class.values())):
        groups = sorted(g for g, c in group_class.items() if c == label)
        rng.shuffle(groups)
        sizes = [0] * folds
        for group in groups:
            target = min(range(folds), key=lambda index: (sizes[index], index))
            fold_groups[target].add(group)
            sizes[target] += len(by_group[group])
    train, validation = _partition(items, fold_groups[fold], "too few groups for this many folds")
    if absent := _unvalidated(items, validation, ()):
        # a class with fewer groups than folds; its figures in this fold (and the epoch kept) leave it out
        LOGGER.warning(
            "fold %d of %d validates no group of class %s: it has fewer groups than folds",
            fold, folds, ", ".join(absent),
        )  # fmt: skip
    return train, validation


def split_from_record(
    items: Sequence[LabelledImage], record: Mapping[str, Any], *, model: str = "the model"
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """The train/validation split a model was trained with, from the ``split`` entry of its model.json,
    with the labels it was trained on (its ``relabel``, if it merged classes after the split).

    The split is drawn anew from the recorded seed on whatever ``items`` are given: on other data (a
    subset, an image changed) it would call images the model was trained on validation images. So it is
    checked against the fingerprint training recorded (:func:`split_fingerprint`), and refused with a
    DatasetError naming ``model`` if it differs. A model trained before fingerprints were recorded
    cannot be checked: a warning says so. A model.json without a split seed is refused: the split drawn
    with the default seed put 7 of 9 of another model's training images on the validation side."""
    if not isinstance(record, Mapping) or "seed" not in record:
        raise DatasetError(
            f"{model} records no split (no seed in its model.json): which images it was validated on cannot "
            "be told, and scored as validation some would be images it was trained on"
        )
    train, validation = draw_split(items, record)
    recorded = record.get("fingerprint")
    if not isinstance(recorded, Mapping):
        LOGGER.warning(
            "%s records no fingerprint of its split (it was trained before they were): the split drawn "
            "anew by its seed cannot be checked against the data it was trained on", model,
        )  # fmt: skip
        return train, validation
    found = split_fingerprint(train, validation)
    if found != dict(recorded):
        sides = ("train_images", "validation_images")
        counts = [f"{values.get(sides[0])} training and {values.get(sides[1])} validation images"
                  for values in (recorded, found)]  # fmt: skip
        what = "" if counts[0] != counts[1] else " (as many, but other images or labels)"
        raise DatasetError(
            f"the data differ from those {model} was trained on: its split held {counts[0]}, these data "
            f"give {counts[1]}{what}; scored as validation, some would be images it was trained on"
        )
    return train, validation


def draw_split(
    items: Sequence[LabelledImage], record: Mapping[str, Any]
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """The train/validation split that the ``split`` entry of a model.json describes, drawn on ``items``
    and relabelled by its ``relabel``, unchecked: what training draws before it records the fingerprint."""
    mapping: Mapping[str, str] = record.get("relabel") or {}
    _require_labels(items, mapping)
    seed = int(record.get("seed", 42))
    if record.get("fold") is not None:
        train, validation = split_by_fold(items, int(record["fold"]), int(record.get("folds", 5)), seed)
    else:
        train, validation = split_by_group(items, float(record.get("validation_fraction", 0.2)), seed)
    return relabel(train, mapping, strict=False), relabel(validation, mapping, strict=False)


#: The key of the digests of its training images in the ``train`` entry of a model.json's ``data``.
TRAIN_DIGESTS = "sha256"
#: The hexadecimal digits of an image file's sha256 that model.json keeps (:func:`image_digests`): 64
#: bits, which two different files share by chance once in about 10^19 pairs.
DIGEST_DIGITS = 16


#: How the training images among some data were told (:class:`TrainingOverlap`): by the model's split drawn
#: again on them, known by its fingerprint or, for a model trained before fingerprints, only by its counts;
#: or by their files, among the digests model.json keeps of its training images (:func:`image_digests`).
OverlapBy = Literal["fingerprint", "counts", "sha256"]


class TrainingOverlap(NamedTuple):
    """How many images of some data a model was trained on (:func:`trained_among`)."""

    images: int
    by: OverlapBy


def trained_among(items: Sequence[LabelledImage], data_record: Mapping[str, Any]) -> TrainingOverlap | None:
    """How many of ``items`` a model was trained on, by the ``data`` entry of its model.json: by the split
    it records, drawn again on them, when the draw gives that split. It is known by its fingerprint; for a
    model trained before fingerprints, only by the images and groups of each class on each side, which
    other data of the same make-up match too (review). On other data (the training data with images added,
    some of them among others) the draw gives another split: a superset of the training data was null
    (unknown), its figures, which count the training images, without a warning (review). The training
    images are then known by their files, by the digests model.json keeps of them (:func:`image_digests`).

    None when it cannot be told: data that do not match the split, and a model.json that keeps no digests
    (trained before it kept them) or data none of whose files is a training image."""
    drawn = _drawn_again(items, data_record)
    return drawn if drawn is not None else _known_files(items, data_record)


def _drawn_again(items: Sequence[LabelledImage], data_record: Mapping[str, Any]) -> TrainingOverlap | None:
    """The training images of ``items`` when the split recorded in ``data_record`` drawn on them is that
    split (:func:`trained_among`); else None."""
    record = data_record.get("split") if isinstance(data_record, Mapping) else None
    if not isinstance(record, Mapping) or "seed" not in record:
        return None
    try:
        train, validation = draw_split(items, record)
    except DatasetError:
        return None
    recorded = record.get("fingerprint")
    if isinstance(recorded, Mapping):
        same = split_fingerprint(train, validation) == dict(recorded)
    else:
        same = all(
            dict(Counter(item.label for item in side)) == (data_record.get(name) or {}).get("per_class")
            and len({item.group for item in side}) == (data_record.get(name) or {}).get("groups")
            for name, side in (("train", train), ("validation", validation))
        )
    if not same:
        return None
    return TrainingOverlap(len(train), "fingerprint" if isinstance(recorded, Mapping) else "counts")


def _known_files(items: Sequence[LabelledImage], data_record: Mapping[str, Any]) -> TrainingOverlap | None:
    """How many of ``items`` are, byte for byte, files the model was trained on, by the digests of its
    training images that ``data_record`` keeps (``train.sha256``, :func:`image_digests`); None when it
    keeps none, or none of ``items`` is one: a training image converted or exported again is not known
    by its file, so no match does not show that none was trained on (None, not 0)."""
    train = data_record.get("train") if isinstance(data_record, Mapping) else None
    recorded = train.get(TRAIN_DIGESTS) if isinstance(train, Mapping) else None
    if not isinstance(recorded, str):
        return None
    known = set(recorded.split())
    found = sum(_digest(item.path) in known for item in items)
    return TrainingOverlap(found, "sha256") if found else None


def image_digests(items: Sequence[LabelledImage]) -> str:
    """What model.json keeps of its training images to know them again among other data
    (:func:`trained_among`): the start (:data:`DIGEST_DIGITS` hexadecimal digits) of each image file's
    sha256, sorted, each once, separated by spaces. 17 bytes an image, on one line of model.json. No file
    or group name: they may name a patient."""
    return " ".join(sorted({_digest(item.path) for item in items}))


def _digest(path: Path) -> str:
    with named_failure(path):
        return sha256_file(path)[:DIGEST_DIGITS]


def split_fingerprint(
    train: Sequence[LabelledImage], validation: Sequence[LabelledImage]
) -> dict[str, Any]:
    """What model.json records of a split to know it again: the sha256 over the validation images'
    labels and file contents, sorted (where the data lie, and in what order, does not count), and the
    number of images on each side. No file or group name: they may name a patient."""
    lines = []
    for item in validation:
        with named_failure(item.path):
            lines.append(f"{item.label}\t{sha256_file(item.path)}\n")
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode())
    return {
        "validation_sha256": digest.hexdigest(),
        "validation_images": len(validation),
        "train_images": len(train),
    }


def parse_relabel(specs: Sequence[str]) -> dict[str, str]:
    """``NEW=OLD[,OLD...]`` specs (e.g. ``non-covid=normal,pneumonia``) → ``{old: new}``, both folded as
    labels are (:func:`load_collection`).

    How a three-class collection trains or scores a two-class model (Nie et al.'s COVID-19 / non-COVID)."""
    mapping: dict[str, str] = {}
    for spec in specs:
        new, sep, olds = spec.partition("=")
        sources = [label_key(old) for old in olds.split(",") if old.strip()]
        if not sep or not new.strip() or not sources:
            raise DatasetError(
                f"relabel {spec!r}: expected NEW=OLD[,OLD...], e.g. non-covid=normal,pneumonia"
            )
        for old in sources:
            if mapping.get(old, label_key(new)) != label_key(new):
                raise DatasetError(f"relabel: {old!r} is given two new labels")
            mapping[old] = label_key(new)
    return mapping


def fold_relabel(mapping: Mapping[str, str]) -> dict[str, str]:
    """``{old: new}`` with both sides folded as labels are (a mapping given in code or recorded in an
    older model.json may spell them otherwise)."""
    return {label_key(old): label_key(new) for old, new in mapping.items()}


def relabel(
    items: Sequence[LabelledImage], mapping: Mapping[str, str], *, strict: bool = True
) -> list[LabelledImage]:
    """The images with each label that ``mapping`` names replaced (groups and paths unchanged).

    ``strict``: a label to replace that no image has is an error, because a typo would otherwise train on
    the classes unmerged."""
    mapping = fold_relabel(mapping)
    if strict:
        _require_labels(items, mapping)
    return [replace(item, label=mapping.get(item.label, item.label)) for item in items]


def _require_labels(items: Sequence[LabelledImage], mapping: Mapping[str, str]) -> None:
    missing = sorted(set(fold_relabel(mapping)) - {item.label for item in items})
    if missing:
        raise DatasetError(f"relabel: no image is labelled {missing}")


@contextmanager
def named_failure(path: Path, what: str = "cannot be read") -> Iterator[None]:
    """A failure to read or decode ``path`` inside the block becomes one :class:`DatasetError` that names the
    file once ("cut.jpg cannot be read: not a readable image (…)"), its folders left out (they may name a
    patient). The readers below say what is wrong without naming the file; the caller that knows which file
    it was uses this."""
    try:
        yield
    except (ClassifierError, OSError) as exc:  # a truncated or undecodable file: say which
        raise DatasetError(f"{path.name} {what}: {reason_for(exc, path)}") from exc


def load_gray(path: Path, *, upright: bool = True, min_side: int = 256) -> npt.NDArray[np.float32]:
    """Grey [0, 1] image of a PNG/JPEG/... or DICOM file, through the inference preprocessing: a DICOM
    image head up by its Patient Orientation, unless ``upright`` is off (to match a mask drawn on it),
    reduced as :func:`~classifier.preprocess.dataset_to_gray` does for ``min_side`` (inference passes the
    model's input size)."""
    source = read_image_file(path)
    if isinstance(source, pydicom.Dataset):
        return dataset_to_upright_gray(source, min_side) if upright else dataset_to_gray(source, min_side)
    return pil_to_gray(source)


def load_grays(
    items: Sequence[LabelledImage], spec: PreprocessSpec, lungs: LungFinder | None = None
) -> npt.NDArray[np.float32]:
    """N×H×W grey images cropped and resized by the spec (not yet equalised): the training cache."""
    out = np.empty((len(items), *spec.input_size), dtype=np.float32)
    for index, item in enumerate(items):
        with named_failure(item.path):
            out[index] = fit_gray(load_gray(item.path, min_side=max(spec.input_size)), spec, lungs)
    return out


def label_indices(items: Sequence[LabelledImage], classes: Sequence[str]) -> list[int]:
    """Each image's index among a model's ``classes``, matched as labels are folded: a model trained before
    they were may spell its classes otherwise (``COVID``, ``Normal``)."""
    keys = {label_key(name): index for index, name in enumerate(classes)}
    unknown = sorted({item.label for item in items if label_key(item.label) not in keys})
    if unknown:
        raise DatasetError(f"labels {unknown} are not classes of the model {list(classes)}")
    return [keys[label_key(item.label)] for item in items]


def summary(items: Sequence[LabelledImage]) -> dict[str, object]:
    """Counts recorded in model.json (no file names: they may carry identifiers)."""
    return {
        "images": len(items),
        "groups": len({item.group for item in items}),
        "per_class": dict(sorted(Counter(item.label for item in items).items())),
    }
