"""Training → artifact → inference → evaluation on tiny synthetic radiograph-like images."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from classifier import cli, training
from classifier.architectures import get_architecture
from classifier.artifact import ArtifactMetadata, read_metadata
from classifier.dataset import (
    DatasetError,
    LabelledImage,
    class_names,
    draw_split,
    load_collection,
    load_grays,
    parse_relabel,
    relabel,
    split_by_fold,
    split_by_group,
    split_from_record,
)
from classifier.errors import ModelArtifactError, OptionError, OutputError, UnsupportedImageError
from classifier.evaluation import class_indices, evaluate, parse_degradation, predict_items
from classifier.inference import Classifier
from classifier.preprocess import PreprocessSpec, pil_to_gray
from classifier.training import TrainingConfig, class_weights, shared_lung_model, train
from classifier.types import INDETERMINATE

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def artifact(collection: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("model") / "tiny"
    config = TrainingConfig(
        architecture="cxr-compact",
        data=collection,
        output=output,
        epochs=2,
        steps_per_epoch=2,
        batch_size=4,
        input_size=96,  # not the architecture's 224: the artifact must carry its own input size
        version="tiny-1",
        progress=False,
    )
    train(config, argv=["cxr-node", "train", str(collection), str(output)])
    return output


def test_split_keeps_every_group_on_one_side(collection: Path) -> None:
    items = load_collection(collection)
    assert len(items) == 24 and {i.group for i in items} >= {"dark-patient0"}
    train_items, val_items = split_by_group(items, 0.25, seed=1)
    assert not {i.group for i in train_items} & {i.group for i in val_items}
    assert {i.label for i in val_items} == {"bright", "dark"}
    assert split_by_group(items, 0.25, seed=1) == (train_items, val_items)  # reproducible


def _grouped(label: str, sizes: list[int]) -> list[LabelledImage]:
    return [LabelledImage(Path(f"{label}-{g}-{i}.png"), label, f"{label}-{g}")
            for g, size in enumerate(sizes) for i in range(size)]


@pytest.mark.parametrize("seed", range(6))
def test_a_group_much_larger_than_the_validation_share_stays_in_training(seed: int) -> None:
    """One patient (or source) with 60 of a class's 100 images: drawn first, the old split put all 60 in
    validation against a target of 20, and trained on 40, without a word."""
    items = _grouped("covid", [60] + [1] * 40) + _grouped("normal", [1] * 100)
    _, validation = split_by_group(items, 0.2, seed=seed)
    covid = sum(item.label == "covid" for item in validation)
    assert 18 <= covid <= 22, covid


def test_the_split_does_not_depend_on_the_order_of_the_images() -> None:
    """A group with as many images of one class as of another counted as the class met first."""
    tied = [LabelledImage(Path(f"t{g}-{label}.png"), label, f"tied-{g}") for g in range(20)
            for label in ("normal", "pneumonia")]
    items = tied + _grouped("normal", [1] * 40) + _grouped("pneumonia", [1] * 40)
    forwards, backwards = split_by_group(items, 0.2, seed=5), split_by_group(items[::-1], 0.2, seed=5)
    assert {i.path for i in forwards[1]} == {i.path for i in backwards[1]}


def test_a_class_left_without_validation_images_is_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two groups of 50 and 2: the 50 would be nearly the whole class. Two of 30 and 25: both are past
    twice the target, and the class was left with no validation image at all; the smallest goes."""
    caplog.set_level(logging.WARNING)
    items = _grouped("covid", [50, 2]) + _grouped("normal", [1] * 100)
    for seed in range(4):
        _, validation = split_by_group(items, 0.2, seed=seed)
        assert sum(item.label == "covid" for item in validation) == 2
    assert "class covid: 2 of 52 images in validation (target 10)" in caplog.text
    items = _grouped("covid", [30, 25]) + _grouped("normal", [5] * 20)
    _, validation = split_by_group(items, 0.2, seed=0)
    assert sum(item.label == "covid" for item in validation) == 25


def test_a_class_folder_skips_hidden_files_and_refuses_a_dangling_link(tmp_path: Path) -> None:
    """A macOS copy leaves ``._x.png`` beside every picture (not an image: the evaluation stopped on it);
    a link to a deleted file was dropped without a word, and fewer images were scored than listed."""
    for label in ("covid", "normal"):
        (tmp_path / label).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / label / "x.png")
        (tmp_path / label / "._x.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    (tmp_path / ".thumbnails").mkdir()
    found = [(i.label, i.path.name) for i in load_collection(tmp_path)]
    assert found == [("covid", "x.png"), ("normal", "x.png")]
    (tmp_path / "normal" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DatasetError, match="gone.png is a link to a file that does not exist"):
        load_collection(tmp_path)


def test_files_a_class_folder_cannot_read_are_counted_and_an_empty_class_folder_refused(
    collection: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder of .webp pictures and an empty class folder vanished without a word: the model lost the
    class, the evaluation scored fewer images than the folder holds."""
    for label in ("bright", "dark"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "1.png").write_bytes((collection / label / "1.png").read_bytes())
    Image.open(collection / "dark" / "2.png").save(tmp_path / "dark" / "2.webp")
    (tmp_path / "dark" / "notes.txt").write_text("exported\n")
    (tmp_path / "dim").mkdir()
    (tmp_path / "dim" / "3.webp").write_bytes((tmp_path / "dark" / "2.webp").read_bytes())
    refused = r"class folder dim of .* holds no images \(1 other files: 1 \.webp\)"
    with pytest.raises(DatasetError, match=refused):
        load_collection(tmp_path)
    shutil.rmtree(tmp_path / "dim")
    caplog.clear()
    caplog.set_level(logging.INFO, logger="classifier.dataset")
    assert len(load_collection(tmp_path)) == 2
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("class folder dark: 2 files skipped, not pictures (.png .jpg")
    assert warning.endswith("or DICOM images: 1 .txt, 1 .webp")
    assert f"{tmp_path}: 2 images of 2 classes in its class sub-folders (it has no manifest" in caplog.text


def test_a_folder_s_manifest_takes_the_place_of_its_class_folders_and_says_so(
    collection: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="classifier.dataset")
    load_collection(collection)
    assert "24 images of 2 classes listed in its manifest.csv (its class sub-folders are not" in caplog.text
    for command in ("train", "evaluate", "novelty", "ensemble"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "a folder holding a manifest.csv is read by that manifest alone, not by its sub" in text


def test_a_split_drawn_anew_on_other_data_is_refused(
    artifact: Path, collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """evaluate --split, the novelty fit and ensemble draw the model's split anew from its seed on the data
    given: on a subset, or with an image changed, images it was trained on were scored as validation."""
    split = read_metadata(artifact).data["split"]
    fingerprint = split["fingerprint"]  # counts and a hash: no file or group name
    assert sorted(fingerprint) == ["train_images", "validation_images", "validation_sha256"]
    assert fingerprint["train_images"] + fingerprint["validation_images"] == 24
    moved = tmp_path / "moved"  # the same data elsewhere: the same split
    shutil.copytree(collection, moved)
    assert cli.main(["evaluate", str(artifact), str(moved), "--split", "validation"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == fingerprint["validation_images"]

    rows = list(csv.DictReader((collection / "manifest.csv").open(newline="")))
    kept = [f"{collection / row['file']},{row['label']},{row['group']}\n" for row in rows
            if row["group"] != "dark-patient0"]  # fmt: skip
    subset = tmp_path / "subset.csv"
    subset.write_text("file,label,group\n" + "".join(kept))
    smaller = [len(side) for side in draw_split(load_collection(subset), split)]
    _, validation = split_from_record(load_collection(collection), split)
    changed = tmp_path / "changed"
    shutil.copytree(collection, changed)
    picture = changed / validation[0].path.relative_to(collection)
    pixels = np.asarray(Image.open(picture)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(picture)
    model = tmp_path / "model"  # the novelty fit writes into its model
    shutil.copytree(artifact, model)
    for data, found in (
        (subset, f"these data give {smaller[0]} training and {smaller[1]} validation images;"),
        (changed, "validation images (as many, but other images or labels);"),
    ):
        for argv, named in (
            (["evaluate", str(artifact), str(data), "--split", "validation"], artifact),
            (["evaluate", str(artifact), str(data), "--split", "train"], artifact),
            (["novelty", str(model), str(data), "--rank", "2"], model),
            (["ensemble", str(tmp_path / "out"), str(artifact), str(model), "--data", str(data)], artifact),
        ):
            assert cli.main(argv) == 2, argv
            error = capsys.readouterr().err
            assert error.startswith(f"error: the data differ from those model {named} was trained on: ")
            assert found in error, error

    old = tmp_path / "old"  # trained before fingerprints were recorded, as the shipped model: a warning
    shutil.copytree(artifact, old)
    metadata = json.loads((old / "model.json").read_text())
    del metadata["data"]["split"]["fingerprint"]
    (old / "model.json").write_text(json.dumps(metadata))
    caplog.set_level(logging.WARNING, logger="classifier.dataset")
    assert cli.main(["evaluate", str(old), str(changed), "--split", "validation"]) == 0
    capsys.readouterr()
    assert f"model {old} records no fingerprint of its split" in caplog.text


def test_group_folds_partition_the_collection(collection: Path) -> None:
    items = load_collection(collection)
    folds = [split_by_fold(items, fold, 3, seed=7) for fold in range(3)]
    validations = [{i.path for i in val_items} for _, val_items in folds]
    assert set().union(*validations) == {i.path for i in items}
    assert sum(len(v) for v in validations) == len(items)  # every image validated exactly once
    for train_items, val_items in folds:
        assert not {i.group for i in train_items} & {i.group for i in val_items}
        assert {i.label for i in val_items} == {"bright", "dark"}
    assert split_by_fold(items, 1, 3, seed=7) == folds[1]  # reproducible
    with pytest.raises(DatasetError):
        split_by_fold(items, 3, 3, seed=7)


def test_a_fold_that_validates_no_image_of_a_class_says_so(
    collection: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A class of three groups in five folds: two folds validated no image of it, and their figures and
    the epoch they kept left it out without a word (review)."""
    rows = ["file,label,group"] + [f"{collection}/{label}/{index}.png,{label},{label}-{index}"
                                   for label in ("bright", "dark") for index in range(9)]
    rows += [f"{collection}/dark/{index}.png,rare,rare-{index}" for index in (9, 10, 11)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    items = load_collection(manifest)
    caplog.set_level(logging.WARNING, logger="classifier.dataset")
    without = []
    for fold in range(5):
        caplog.clear()
        _, validation = split_by_fold(items, fold, 5, seed=7)
        if "rare" not in {item.label for item in validation}:
            without.append(fold)
            assert f"fold {fold} of 5 validates no group of class rare" in caplog.text
        else:
            assert "validates no group" not in caplog.text
    assert len(without) == 2


def test_a_fold_that_leaves_a_class_out_of_training_is_refused(
    collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A class of one group lands whole in one fold's validation: that fold trained without it, with a
    class weight of 0, and its figures went into the cross-validation mean without a word (review)."""
    rows = ["file,label,group"] + [f"{collection}/{label}/{index}.png,{label},{label}-{index // 2}"
                                   for label in ("bright", "dark") for index in range(10)]
    rows += [f"{collection}/dark/{index}.png,rare,rare-1" for index in (10, 11)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    config = TrainingConfig(architecture="cxr-compact", data=manifest, output=tmp_path / "model", folds=2,
                            epochs=1, steps_per_epoch=1, batch_size=4, input_size=32, progress=False)
    [fold] = [fold for fold in (0, 1) if any(
        item.label == "rare" for item in split_by_fold(load_collection(manifest), fold, 2, config.seed)[1]
    )]
    with pytest.raises(DatasetError, match="no training image of class rare in this split"):
        train(replace(config, fold=fold), argv=[])
    assert not (tmp_path / "model" / "model.keras").exists()
    # An ensemble's shared lung U-Net trained first (120 epochs by default) and the split was refused after
    def trained(*args: object, **kwargs: object) -> None:
        raise AssertionError("the lung U-Net trained before the split was checked")

    monkeypatch.setattr(training, "_lung_model", trained)
    with pytest.raises(DatasetError, match="no training image of class rare in this split"):
        shared_lung_model(replace(config, fold=fold, lung_masks=tmp_path), tmp_path / "lungs")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"file,label\ndark/1.png\n", "line 2: every row needs a file and a label"),  # a short row
        (b"file,label\ndark/1.png,  \n", "line 2: every row needs a file and a label"),
        (b"file,label\n,dark\n", "line 2: every row needs a file and a label"),
        (b"file,label\ndark/1.png,dark\n\xff\xfe,dark\n", "not a UTF-8 CSV file"),
        (b"name,class\ndark/1.png,dark\n", "needs the columns file,label"),
        (b"file,label,group,Group\ndark/1.png,dark,p1,p2\n", "has the column group twice"),
        (b"file,label\n", "lists no images"),
    ],
)
def test_a_broken_manifest_is_a_dataset_error_that_says_where(
    collection: Path, tmp_path: Path, text: bytes, reason: str
) -> None:
    (tmp_path / "dark").mkdir()
    (tmp_path / "dark" / "1.png").write_bytes((collection / "dark" / "1.png").read_bytes())
    (tmp_path / "manifest.csv").write_bytes(text)
    with pytest.raises(DatasetError, match=reason):
        load_collection(tmp_path)


def test_a_manifest_saved_by_a_spreadsheet_with_a_byte_order_mark_is_read(
    collection: Path, tmp_path: Path
) -> None:
    (tmp_path / "dark").mkdir()
    (tmp_path / "dark" / "1.png").write_bytes((collection / "dark" / "1.png").read_bytes())
    (tmp_path / "manifest.csv").write_bytes("\ufefffile,label,group\ndark/1.png,dark,p1\n".encode())
    [item] = load_collection(tmp_path)
    assert (item.label, item.group) == ("dark", "p1")


def test_a_manifest_header_is_read_as_labels_are_so_a_group_column_is_not_lost(
    collection: Path, tmp_path: Path
) -> None:
    """A ``Group`` column was ignored: every image became its own group, and one patient's images could be
    on both sides of the split."""
    (tmp_path / "dark").mkdir()
    for name in ("1.png", "2.png"):
        (tmp_path / "dark" / name).write_bytes((collection / "dark" / name).read_bytes())
    (tmp_path / "manifest.csv").write_text("File, Label ,Group\ndark/1.png,dark,p1\ndark/2.png,dark,p1\n")
    assert {item.group for item in load_collection(tmp_path)} == {"p1"}


def test_a_file_listed_twice_is_read_once_or_refused(
    collection: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A repeated row counted its image twice; a file listed in two groups could be on both sides of the
    split, and one listed with two labels trained as both."""
    (tmp_path / "dark").mkdir()
    for name in ("1.png", "2.png"):
        (tmp_path / "dark" / name).write_bytes((collection / "dark" / name).read_bytes())
    manifest, rows = tmp_path / "manifest.csv", "file,label,group\ndark/1.png,dark,p1\ndark/2.png,dark,p2\n"
    manifest.write_text(rows + "dark/1.png,Dark,p1\n./dark/2.png,dark, p2\n")
    caplog.set_level(logging.WARNING, logger="classifier.dataset")
    assert [(i.path.name, i.group) for i in load_collection(tmp_path)] == [("1.png", "p1"), ("2.png", "p2")]
    assert "manifest.csv: 2 rows repeat an earlier row's file, label and group" in caplog.text
    for row, reason in (
        ("dark/1.png,bright,p1", "as dark and bright"),
        ("./dark/1.png,dark,p3", "in two groups"),
        ("dark/1.png,dark,", "in two groups"),  # its own group, not p1
    ):
        manifest.write_text(rows + row + "\n")
        with pytest.raises(DatasetError, match=f"{row.split(',')[0]} is listed on lines 2 and 4 {reason}"):
            load_collection(tmp_path)


def test_labels_differing_only_in_case_or_spaces_are_one_class(
    collection: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``BRIGHT``, `` Bright `` and ``bright`` in one manifest trained as three classes (six here), though
    evaluate reads them as one; so do class folders ``Dark`` and ``dark``. One class each, named folded."""
    spellings = {"bright": ("BRIGHT", " Bright ", "bright"), "dark": ("Dark", "dark ", "DARK")}
    rows = ["file,label,group"]
    for label, names in spellings.items():
        for index, source in enumerate(sorted((collection / label).glob("*.png"))):
            rows.append(f"{source},{names[index % 3]},{label}-{index // 2}")
    manifest = tmp_path / "spelt.csv"
    manifest.write_text("\n".join(rows) + "\n")
    caplog.set_level(logging.INFO, logger="classifier.dataset")
    assert class_names(load_collection(manifest)) == ("bright", "dark")
    assert "'BRIGHT', 'Bright', 'bright' as bright" in caplog.text
    config = TrainingConfig(
        architecture="cxr-compact", data=manifest, output=tmp_path / "model", epochs=1, steps_per_epoch=1,
        batch_size=4, input_size=32, progress=False,
    )  # fmt: skip
    result = train(config)
    assert result.metadata.classes == ("bright", "dark")
    assert result.metadata.data["train"]["per_class"].keys() == {"bright", "dark"}
    folders = tmp_path / "folders"
    for name, source in (("Dark", "dark/0.png"), ("dark", "dark/1.png"), ("Bright ", "bright/0.png")):
        (folders / name).mkdir(parents=True)
        (folders / name / "x.png").write_bytes((collection / source).read_bytes())
    assert [item.label for item in load_collection(folders)] == ["bright", "dark", "dark"]
    assert parse_relabel(["Shadow=Dark, DIM"]) == {"dark": "shadow", "dim": "shadow"}


def test_folder_without_manifest_uses_class_subfolders(collection: Path, tmp_path: Path) -> None:
    for label in ("bright", "dark"):
        (tmp_path / label).mkdir()
        for source in (collection / label).glob("*.png"):
            (tmp_path / label / source.name).write_bytes(source.read_bytes())
    items = load_collection(tmp_path)
    assert {i.label for i in items} == {"bright", "dark"} and len(items) == 24


def test_a_16_bit_picture_is_degraded_at_its_own_grey_levels(artifact: Path, tmp_path: Path) -> None:
    """Pillow's convert("L") clips 16-bit values to white; the degradation must see the model's grey."""
    (tmp_path / "dark").mkdir()
    ramp = np.tile(np.linspace(0, 65535, 128), (128, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "dark" / "ramp.png")  # mode I;16
    seen: list[float] = []

    def record(image: Image.Image) -> Image.Image:
        seen.append(float(np.asarray(image.convert("L"), dtype=np.float32).mean()) / 255.0)
        return image

    degrade = parse_degradation("gamma:1.0+noise:0.0001+pad:0.01")
    assert degrade is not None
    classifier, items = Classifier.load(artifact), load_collection(tmp_path)
    predict_items(classifier, items, record)
    predict_items(classifier, items, lambda image: record(degrade(image)))
    assert seen[0] == pytest.approx(0.5, abs=0.01)
    assert seen[1] == pytest.approx(0.5 * (128 / 130) ** 2, abs=0.01)  # the 1-px black frame only


def test_the_bits_degradation_is_a_16_bit_png_holding_fewer_bits() -> None:
    picture = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (8, 1)))
    degrade = parse_degradation("bits:12")
    assert degrade is not None
    png = degrade(picture)
    assert png.format == "PNG" and png.mode.startswith("I")
    assert int(np.asarray(png).max()) == 4095
    np.testing.assert_allclose(pil_to_gray(png), pil_to_gray(picture), atol=1 / 4095)


def test_a_patient_sub_folder_is_one_group(collection: Path, tmp_path: Path) -> None:
    """``<class>/<patient>/<image>``: a patient's images never straddle a split, even across classes."""
    sources = sorted((collection / "dark").glob("*.png"))
    for label in ("bright", "dark"):
        for patient in range(5):
            for view in range(3):
                target = tmp_path / label / f"patient{patient}" / f"view{view}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(sources[view].read_bytes())
    (tmp_path / "dark" / "loose.png").write_bytes(sources[0].read_bytes())
    items = load_collection(tmp_path)
    assert len(items) == 31
    assert {i.group for i in items} == {f"folder:patient{p}" for p in range(5)} | {"dark/loose.png"}
    for fold in range(3):
        train_items, val_items = split_by_fold(items, fold, 3, seed=3)
        assert not {i.group for i in train_items} & {i.group for i in val_items}


def test_a_patient_spelled_two_ways_is_one_group(collection: Path, tmp_path: Path) -> None:
    """``P003`` and ``p003 `` in a manifest, ``Patient7`` and ``patient7`` as folders, were different
    patients: 6 of 20 were on both sides of a split (review)."""
    sources = sorted((collection / "dark").glob("*.png"))
    rows = ["file,label,group"]
    for patient in range(20):
        for spelling, label in ((f"P{patient:03d}", "bright"), (f" p{patient:03d}\t", "dark")):
            name = f"{label}-{patient}.png"
            (tmp_path / name).write_bytes(sources[patient % len(sources)].read_bytes())
            rows.append(f"{name},{label},{spelling}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    items = load_collection(tmp_path / "manifest.csv")
    assert len({item.group for item in items}) == 20
    train_items, val_items = split_by_group(items, 0.2, seed=42)
    assert not {i.group for i in train_items} & {i.group for i in val_items}
    folders = tmp_path / "folders"
    for label, patient in (("bright", "Patient7"), ("dark", "patient7")):
        (folders / label / patient).mkdir(parents=True)
        (folders / label / patient / "a.png").write_bytes(sources[0].read_bytes())
    assert {item.group for item in load_collection(folders)} == {"folder:patient7"}


def test_a_pacs_export_without_file_suffixes_is_evaluated_like_its_pictures(
    artifact: Path, collection: Path, tmp_path: Path
) -> None:
    """storescp and PACS media name DICOM files without ``.dcm``; the DICOMDIR index and notes are no images."""
    from tests.unit.test_classifier_preprocess import make_dataset

    pictures, export = tmp_path / "pictures", tmp_path / "export"
    for label in ("bright", "dark"):
        (pictures / label).mkdir(parents=True)
        (export / label).mkdir(parents=True)
        for source in sorted((collection / label).glob("*.png"))[:3]:
            (pictures / label / source.name).write_bytes(source.read_bytes())
            ds = make_dataset(np.asarray(Image.open(source)), bits_stored=8)
            ds.WindowCenter, ds.WindowWidth = 128, 256
            ds.save_as(export / label / f"CR.{ds.SOPInstanceUID}", enforce_file_format=True)
        (export / label / "notes.txt").write_text("exported from the PACS\n")
    index = make_dataset(np.zeros((2, 2), dtype=np.uint8))
    del index.PixelData
    index.save_as(export / "dark" / "DICOMDIR", enforce_file_format=True)

    items = load_collection(export)
    assert len(items) == 6 and all(item.path.name.startswith("CR.") for item in items)
    from_dicom, from_pictures = evaluate(artifact, export), evaluate(artifact, pictures)
    assert from_dicom["images"] == 6
    assert from_dicom["confusion_matrix"] == from_pictures["confusion_matrix"]
    degraded: list[tuple[str, tuple[int, int]]] = []  # a degradation is applied to DICOM images too

    def record(image: Image.Image) -> Image.Image:
        degraded.append((image.mode, image.size))
        return image

    predict_items(Classifier.load(artifact), items, record)
    assert degraded == [("L", (96, 96))] * 6  # the collection's 96 px pictures


def test_class_weights_balance_the_classes() -> None:
    weights = class_weights(np.array([0, 0, 0, 1]), 2)
    assert weights[1] == pytest.approx(3 * weights[0])


def test_artifact_has_model_metadata_and_plots(artifact: Path) -> None:
    assert {"model.keras", "model.json", "training_curves.png", "confusion_matrix.png"} <= {
        p.name for p in artifact.iterdir()
    }
    metadata = json.loads((artifact / "model.json").read_text())
    for key in (
        "name",
        "version",
        "classes",
        "input_size",
        "preprocessing",
        "data",
        "validation",
        "created",
        "sha256",
    ):
        assert key in metadata
    assert metadata["classes"] == ["bright", "dark"] and metadata["version"] == "tiny-1"
    assert metadata["input_size"] == [96, 96]
    assert metadata["data"]["split"]["by"] == "group"
    assert metadata["data"]["train"]["images"] + metadata["data"]["validation"]["images"] == 24
    assert 0.0 <= metadata["validation"]["accuracy"] <= 1.0
    assert len(metadata["training"]["history"]["loss"]) == 2
    assert (artifact / "model.keras").stat().st_size < 10_000_000


def test_the_seed_recipes_hold_out_what_their_papers_held_out(collection: Path, tmp_path: Path) -> None:
    """Seed 000 trained on 90 % of its images and validated on 10 %; seed 003 validated on 15 %. Every
    architecture held out 20 % unless told. A fraction given still wins, and the split record says which
    fraction was used, so the split can be drawn again."""
    assert get_architecture("sugandi-cnn").recipe.validation_fraction == 0.10
    assert get_architecture("resnet152-transfer").recipe.validation_fraction == 0.15
    assert get_architecture("cxr-compact").recipe.validation_fraction == 0.2
    config = TrainingConfig(
        architecture="sugandi-cnn", data=collection, output=tmp_path / "seed000", epochs=1, steps_per_epoch=1,
        batch_size=4, input_size=32, progress=False,
    )  # fmt: skip
    recorded = train(config).metadata
    assert recorded.data["split"]["validation_fraction"] == 0.10
    assert recorded.data["validation"]["images"] == 4  # one two-image group of each class (of 12 each)
    given = train(replace(config, output=tmp_path / "given", validation_fraction=0.5)).metadata
    assert given.data["split"]["validation_fraction"] == 0.5 and given.data["validation"]["images"] == 12


def _weights(folder: Path) -> list[np.ndarray]:
    import keras

    return [np.asarray(w) for w in keras.saving.load_model(folder / "model.keras", compile=False).get_weights()]


def test_a_seed_reproduces_its_model_bit_for_bit_in_a_new_process(
    artifact: Path, collection: Path, tmp_path: Path
) -> None:
    """The seed fixes the weights' start, the shuffling and every augmentation draw: the fixture's training
    run again as a command in another process gives the same weights and history (on one machine, with the
    same number of threads); another seed on the same split gives other weights."""
    import subprocess
    import sys

    again = tmp_path / "again"
    command = [sys.executable, "-m", "classifier.cli", "train", str(collection), str(again), "--epochs", "2",
               "--steps-per-epoch", "2", "--batch-size", "4", "--input-size", "96", "--version", "tiny-1",
               "--no-progress", "--no-novelty"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).parents[2], timeout=300)
    first, second = read_metadata(artifact), read_metadata(again)
    assert second.training["history"] == first.training["history"]
    assert second.validation == first.validation
    for ours, theirs in zip(_weights(artifact), _weights(again), strict=True):
        np.testing.assert_array_equal(ours, theirs)

    other = tmp_path / "other"
    config = TrainingConfig(
        architecture="cxr-compact", data=collection, output=other, epochs=2, steps_per_epoch=2, batch_size=4,
        input_size=96, seed=7, split_seed=42, progress=False,
    )  # fmt: skip
    train(config)
    assert read_metadata(other).data["split"] == first.data["split"]
    assert any(not np.array_equal(a, b) for a, b in zip(_weights(artifact), _weights(other), strict=True))


def test_classifier_predicts_probabilities_heatmaps_and_indeterminate(
    artifact: Path, collection: Path
) -> None:
    classifier = Classifier.load(artifact)
    assert classifier.info.classes == ("bright", "dark") and classifier.info.version == "tiny-1"
    images = [Image.open(collection / "dark" / "0.png"), Image.open(collection / "bright" / "0.png")]
    predictions = classifier.predict_images(images)
    for prediction in predictions:
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert prediction.label == prediction.top_class  # threshold 0.5 with two classes
        assert prediction.heatmap is not None and prediction.heatmap.shape == classifier.spec.input_size
        assert 0.0 <= prediction.heatmap.min() and prediction.heatmap.max() <= 1.0
        assert {"preprocess", "predict"} <= set(prediction.timings_ms)
    unsure = Classifier.load(artifact, indeterminate_threshold=1.0).predict_images(images, heatmap=False)
    assert all(p.label == INDETERMINATE and p.heatmap is None for p in unsure)


def test_grad_cam_follows_the_class_score_even_when_the_softmax_is_saturated() -> None:
    """A model whose *covid* logit is 200 × the mean of channel 0: a bright patch makes p(covid) exactly 1.0
    in float32, where the gradient of the probability is zero. Grad-CAM weighs the feature maps by the
    gradient of the score before the softmax, so the map still shows the patch and nothing else."""
    import keras

    inputs = keras.Input((8, 8, 3))
    features = keras.layers.Conv2D(2, 1, use_bias=False, name="features")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    head = keras.layers.Dense(3, activation="softmax", name="predictions")
    model = keras.Model(inputs, head(pooled))
    model.get_layer("features").set_weights([np.array([[[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]]])])
    head.set_weights([np.array([[200.0, 0.0, -200.0], [0.0, 1.0, 0.0]]), np.zeros(3)])
    metadata = ArtifactMetadata(
        name="toy",
        version="1",
        classes=("covid", "normal", "pneumonia"),
        preprocess=PreprocessSpec(input_size=(8, 8)),
        gradcam_layer="features",
        sha256="",
        created="2026-12-02T00:00:00Z",
    )
    image = np.zeros((8, 8, 3), dtype=np.float32)
    image[:4, :4, 0] = 1.0  # the patch: channel 0 of the top-left quarter
    image[:, :, 1] = 0.5  # channel 1 feeds the *normal* logit everywhere
    (prediction,) = Classifier(model, metadata).predict([image], heatmap=True)
    assert prediction.label == "covid" and prediction.probabilities["covid"] == 1.0
    assert prediction.heatmap is not None
    assert prediction.heatmap[:3, :3].min() > 0.9 and prediction.heatmap[5:, 5:].max() < 0.1


def _toy_patch_model(height: int, width: int) -> tuple[Any, ArtifactMetadata]:
    """The saturated-softmax toy above, of a non-square input: covid's logit is 200 × channel 0's mean."""
    import keras

    inputs = keras.Input((height, width, 3))
    features = keras.layers.Conv2D(2, 1, use_bias=False, name="features")(inputs)
    head = keras.layers.Dense(3, activation="softmax", name="predictions")
    model = keras.Model(inputs, head(keras.layers.GlobalAveragePooling2D()(features)))
    model.get_layer("features").set_weights([np.array([[[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]]])])
    head.set_weights([np.array([[200.0, 0.0, -200.0], [0.0, 1.0, 0.0]]), np.zeros(3)])
    metadata = ArtifactMetadata(
        name="toy", version="1", classes=("covid", "normal", "pneumonia"),
        preprocess=PreprocessSpec(input_size=(height, width)), gradcam_layer="features", sha256="",
        created="2026-12-02T00:00:00Z",
    )  # fmt: skip
    return model, metadata


def test_a_heat_map_of_a_non_square_input_is_neither_transposed_nor_flipped() -> None:
    """Every heat-map test was square with a patch in the top-left corner, which a transposition leaves
    where it was: a swapped (width, height) passed them all (review)."""
    model, metadata = _toy_patch_model(8, 12)
    image = np.zeros((8, 12, 3), dtype=np.float32)
    image[:4, 8:, 0] = 1.0  # top right
    image[:, :, 1] = 0.5
    (prediction,) = Classifier(model, metadata).predict([image], heatmap=True)
    heat = prediction.heatmap
    assert heat is not None and heat.shape == (8, 12)
    assert heat[:3, 9:].min() > 0.9 and heat[5:, :7].max() < 0.1 and heat[:3, :6].max() < 0.1
    from classifier.inference import heatmap_in_whole_frame
    from classifier.preprocess import Box

    placed = heatmap_in_whole_frame(heat, Box(top=0.5, bottom=1.0, left=0.0, right=0.5))  # bottom left
    assert placed.shape == (8, 12) and placed[:4].max() == 0.0 and placed[:, 6:].max() == 0.0
    assert placed[4, 5] > 0.9 and placed[7, 0] < 0.1  # the patch in the frame's top right, not elsewhere


def test_a_probability_equal_to_the_threshold_is_the_class_and_one_below_is_indeterminate() -> None:
    model, metadata = _toy_patch_model(8, 8)
    image = np.zeros((8, 8, 3), dtype=np.float32)
    image[:, :, 0] = 0.0035  # covid's logit 0.7, normal's 0: a covid probability of about 0.5
    image[:, :, 1] = 0.0
    def label(threshold: float) -> str:
        classifier = Classifier(model, metadata, indeterminate_threshold=threshold)
        return classifier.predict([image], heatmap=False)[0].label

    first = Classifier(model, metadata).predict([image], heatmap=False)[0]
    p = first.probabilities[first.top_class]
    assert 0.3 < p < 0.7
    assert label(p) == first.top_class
    assert label(float(np.nextafter(np.float32(p), np.float32(1.0)))) == INDETERMINATE


def test_dicom_input_gives_the_same_answer_as_png(artifact: Path, collection: Path) -> None:
    from tests.unit.test_classifier_preprocess import make_dataset

    pixels = np.asarray(Image.open(collection / "dark" / "3.png"))
    ds = make_dataset(pixels, bits_stored=8)
    ds.WindowCenter, ds.WindowWidth = 128, 256
    classifier = Classifier.load(artifact)
    from_dicom = classifier.predict_datasets([ds], heatmap=False)[0]
    from_png = classifier.predict_images([Image.open(collection / "dark" / "3.png")], heatmap=False)[0]
    for name in classifier.info.classes:
        assert from_dicom.probabilities[name] == pytest.approx(from_png.probabilities[name], abs=0.02)


def test_inputs_of_another_shape_are_an_unsupported_image_not_a_numpy_error(artifact: Path) -> None:
    classifier = Classifier.load(artifact)
    size = classifier.spec.input_size
    right = np.zeros((*size, 3), dtype=np.float32)
    for images in ([right, np.zeros((size[0] + 1, size[1], 3), dtype=np.float32)], [np.zeros((*size, 1))]):
        with pytest.raises(UnsupportedImageError, match="model input must be"):
            classifier.predict(images, heatmap=False)
        with pytest.raises(UnsupportedImageError, match="model input must be"):
            classifier.embed(images)


def test_a_tampered_model_file_is_refused(artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("model.json", "model.keras"):
        (copy / name).write_bytes((artifact / name).read_bytes())
    with (copy / "model.keras").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelArtifactError, match="sha256"):
        read_metadata(copy)
    with pytest.raises(ModelArtifactError):
        Classifier.load(tmp_path / "nothing-here")


def test_a_model_that_gives_nan_is_a_model_error_not_an_indeterminate_finding(
    artifact: Path, collection: Path, tmp_path: Path
) -> None:
    """Weights of a diverged training (a NaN bias) gave every image "indeterminate" with NaN probabilities,
    which the node stored as a finding, and a bare ValueError from the metrics in an evaluation."""
    import keras

    from classifier.artifact import sha256_file

    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    model = keras.saving.load_model(broken / "model.keras", compile=False)
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel, np.full_like(bias, np.nan)])
    model.save(broken / "model.keras")
    metadata = json.loads((broken / "model.json").read_text())
    metadata["sha256"] = sha256_file(broken / "model.keras")
    (broken / "model.json").write_text(json.dumps(metadata))
    classifier = Classifier.load(broken)
    picture = Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    for heatmap in (False, True):
        with pytest.raises(ModelArtifactError, match="gives probabilities that are not finite numbers"):
            classifier.predict_images([picture], heatmap=heatmap)
    with pytest.raises(ModelArtifactError, match="not finite"):  # not the first image named as unreadable
        evaluate(broken, collection)


def test_a_model_keras_cannot_load_or_that_contradicts_model_json_is_refused(
    artifact: Path, tmp_path: Path
) -> None:
    """What the hash cannot catch: a model.keras hashed as it is but cut short (a copy that failed before it
    was hashed), and a model.json whose input size or classes are not the network's."""
    from classifier.artifact import sha256_file

    metadata = json.loads((artifact / "model.json").read_text())
    whole = (artifact / "model.keras").read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "model.keras").write_bytes(whole[: len(whole) // 2])
    (cut / "model.json").write_text(json.dumps({**metadata, "sha256": sha256_file(cut / "model.keras")}))
    with pytest.raises(ModelArtifactError, match=r"model\.keras cannot be loaded: "):
        Classifier.load(cut)
    size = metadata["input_size"][0] // 2
    for name, changed in (
        ("smaller", {"input_size": [size, size], "preprocessing": {**metadata["preprocessing"],
                                                                   "input_size": [size, size]}}),
        ("more-classes", {"classes": [*metadata["classes"], "other"]}),
    ):  # fmt: skip
        other = tmp_path / name
        other.mkdir()
        (other / "model.keras").write_bytes(whole)
        (other / "model.json").write_text(json.dumps({**metadata, **changed}))
        with pytest.raises(ModelArtifactError, match="contradict model.json"):
            Classifier.load(other)
    # A byte flipped inside a stored member (a bad CRC, hashed as it is): zipfile's BadZipFile escaped.
    flipped = bytearray(whole)
    names = zipfile.ZipFile(io.BytesIO(whole)).infolist()
    weights = next(info for info in names if info.filename.endswith(".h5"))
    flipped[weights.header_offset + 30 + len(weights.filename) + weights.compress_size // 2] ^= 0xFF
    crc = tmp_path / "crc"
    crc.mkdir()
    (crc / "model.keras").write_bytes(bytes(flipped))
    (crc / "model.json").write_text(json.dumps({**metadata, "sha256": sha256_file(crc / "model.keras")}))
    with pytest.raises(ModelArtifactError, match=r"model\.keras cannot be loaded: BadZipFile"):
        Classifier.load(crc)
    # A layer configuration this Keras cannot rebuild (saved by a newer one): Keras' TypeError escaped.
    newer = tmp_path / "newer"
    newer.mkdir()
    with zipfile.ZipFile(io.BytesIO(whole)) as source, zipfile.ZipFile(newer / "model.keras", "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename == "config.json":
                config = json.loads(data)
                config["config"]["layers"][1]["config"]["an_argument_of_a_newer_keras"] = 3
                data = json.dumps(config).encode()
            target.writestr(info, data)
    (newer / "model.json").write_text(json.dumps({**metadata, "sha256": sha256_file(newer / "model.keras")}))
    with pytest.raises(ModelArtifactError, match=r"model\.keras cannot be loaded: TypeError"):
        Classifier.load(newer)
    # A Grad-CAM layer the network does not have failed at the first heat map, not at load.
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "model.keras").write_bytes(whole)
    (layer / "model.json").write_text(json.dumps({**metadata, "gradcam_layer": "nope"}))
    with pytest.raises(ModelArtifactError, match="Grad-CAM layer 'nope'"):
        Classifier.load(layer)
    # Nor one without a feature map (the pooled features): TensorFlow's own error at the first heat map.
    pooled = Classifier.load(artifact)._model.layers[-2].name
    (layer / "model.json").write_text(json.dumps({**metadata, "gradcam_layer": pooled}))
    with pytest.raises(ModelArtifactError, match=f"Grad-CAM layer '{pooled}', whose output .* not a feature"):
        Classifier.load(layer)


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        (lambda metadata: json.dumps({**metadata, "format": 99}).encode(), "format 99"),
        (lambda metadata: json.dumps({**metadata, "input_size": [150, 150]}).encode(), "input_size"),
        (lambda metadata: json.dumps({**metadata, "input_size": 32}).encode(), "input_size"),
        (lambda metadata: json.dumps({**metadata, "preprocessing": {"input_size": [1e309, 32]}}).encode(),
         "incomplete or invalid"),  # fmt: skip
        (lambda metadata: b"\xff\xfe not utf-8", "not valid JSON"),
    ],
)
def test_a_model_json_of_another_format_or_inconsistent_is_refused(
    artifact: Path, tmp_path: Path, written: Callable[[dict[str, Any]], bytes], reason: str
) -> None:
    (tmp_path / "model.keras").write_bytes((artifact / "model.keras").read_bytes())
    (tmp_path / "model.json").write_bytes(written(json.loads((artifact / "model.json").read_text())))
    with pytest.raises(ModelArtifactError, match=reason):
        read_metadata(tmp_path)


def test_evaluate_writes_metrics_and_figures(artifact: Path, collection: Path, tmp_path: Path) -> None:
    report = evaluate(artifact, collection / "manifest.csv", output=tmp_path, degrade="jpeg:40+downscale:0.5")
    assert report["images"] == 24 and report["degradation"] == "jpeg:40+downscale:0.5"
    assert sum(map(sum, report["confusion_matrix"])) == 24
    assert set(report["per_class"]["dark"]) >= {
        "precision",
        "recall",
        "f1",
        "sensitivity",
        "specificity",
        "roc_auc",
    }
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["accuracy"] == report["accuracy"]
    # how far to trust a probability on these images: the reliability bins cover every image once
    assert sum(band["images"] for band in saved["reliability"]) == 24
    assert all(0.0 <= band["accuracy"] <= 1.0 and band["low"] < band["confidence"] <= band["high"]
               for band in saved["reliability"])  # fmt: skip
    assert saved["log_loss"] >= 0.0 and 0.0 <= saved["brier_score"] <= 2.0
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0 and (
        tmp_path / "roc_reliability.png"
    ).stat().st_size > 0
    with pytest.raises(ValueError):
        parse_degradation("sepia:1")


def _with_new_patients(collection: Path, folder: Path, patients: int) -> Path:
    """A copy of ``collection`` in ``folder`` with one new image of each of ``patients`` new patients in
    each class, listed in its manifest: the model's data with images added since."""
    shutil.copytree(collection, folder)
    rng = np.random.default_rng(7)
    with (folder / "manifest.csv").open("a", newline="") as handle:
        writer = csv.writer(handle)
        for label in ("bright", "dark"):
            for index in range(patients):
                name = f"{label}/new-{index}.png"
                Image.fromarray(rng.integers(0, 256, (96, 96), dtype=np.uint8)).save(folder / name)
                writer.writerow([name, label, f"{label}-new-patient{index}"])
    return folder


def test_an_evaluation_says_how_many_of_its_images_the_model_was_trained_on(
    artifact: Path, collection: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``evaluate MODEL DATA`` scored a model's training images with the others without a word, and its
    metrics.json did not say what was scored: the shipped model scored 0.917 on all of cxr3, 0.841 on its
    validation images (review)."""
    data = read_metadata(artifact).data
    trained = data["train"]["images"]
    with caplog.at_level(logging.WARNING, logger="classifier"):
        everything = evaluate(artifact, collection)
    assert everything["data"] == {
        "split": "all", "images": 24, "training_images": trained, "training_images_by": "fingerprint",
        "relabel": {},
    }
    assert f"{trained} of these 24 images are images the model was trained on" in caplog.text
    _, validation = split_from_record(load_collection(collection), data["split"])
    held_out = evaluate(artifact, collection, items=validation, split="validation")
    assert held_out["data"]["training_images"] == 0 and held_out["data"]["images"] == len(validation)
    # some of its images: another split, but its training images are known by their files
    some = load_collection(collection)[:10]
    among = sum(item.path not in {image.path for image in validation} for item in some)
    assert evaluate(artifact, collection, items=some)["data"]["training_images"] == among > 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="classifier"):
        other = evaluate(artifact, _with_new_patients(collection, tmp_path / "more", 3),
                         items=[item for item in load_collection(tmp_path / "more") if "new" in item.group])
    assert other["data"]["training_images"] is None  # other data: which were trained on cannot be told
    assert "trained on" not in caplog.text


def test_an_evaluation_of_the_training_data_with_more_images_finds_the_training_images(
    artifact: Path, collection: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The model's data with images added (more patients exported since, another site's beside them) gave
    another split when drawn again: ``training_images`` was null and no warning said that the figures
    count the model's training images (review). The training images are known by their files' sha256."""
    data = read_metadata(artifact).data
    trained = data["train"]["images"]
    copied = tmp_path / "elsewhere" / "copy"  # the same data in another folder: the split drawn again
    shutil.copytree(collection, copied)
    assert evaluate(artifact, copied)["data"]["training_images_by"] == "fingerprint"
    more = _with_new_patients(collection, tmp_path / "more", 3)
    with caplog.at_level(logging.WARNING, logger="classifier"):
        report = evaluate(artifact, more)
    assert report["data"] == {
        "split": "all", "images": 30, "training_images": trained, "training_images_by": "sha256",
        "relabel": {},
    }
    assert f"{trained} of these 30 images are images the model was trained on" in caplog.text
    digests = data["train"]["sha256"].split()  # the start of each file's sha256: no file or group name
    assert len(digests) == trained and all(re.fullmatch("[0-9a-f]{16}", digest) for digest in digests)
    old = tmp_path / "old"  # trained before model.json kept the digests: it cannot tell
    shutil.copytree(artifact, old)
    metadata = json.loads((old / "model.json").read_text())
    del metadata["data"]["train"]["sha256"]
    (old / "model.json").write_text(json.dumps(metadata))
    assert evaluate(old, more)["data"]["training_images"] is None


def test_without_a_fingerprint_the_training_images_of_an_evaluation_are_told_by_counts_and_said_so(
    artifact: Path, collection: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model trained before fingerprints (the shipped one) records only each side's counts, which other
    data of the same make-up match too: the warning said they were its training images (review)."""
    model = tmp_path / "model"
    shutil.copytree(artifact, model)
    metadata = json.loads((model / "model.json").read_text())
    del metadata["data"]["split"]["fingerprint"]
    (model / "model.json").write_text(json.dumps(metadata))
    with caplog.at_level(logging.WARNING, logger="classifier"):
        report = evaluate(model, collection)
    assert report["data"]["training_images_by"] == "counts"
    assert report["data"]["training_images"] == metadata["data"]["train"]["images"]
    assert "if they are those data, " in caplog.text and "no fingerprint to check them by" in caplog.text


@pytest.mark.usefixtures("restore_logging")
def test_the_evaluate_command_prints_the_per_class_figures(
    artifact: Path, collection: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --output, per-class precision, recall, sensitivity, specificity and AUC were computed and
    thrown away (review)."""
    from classifier import cli

    assert cli.main(["evaluate", str(artifact), str(collection), "--split", "validation"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["per_class"]) == {"bright", "dark"}
    assert printed["data"]["split"] == "validation" and printed["data"]["training_images"] == 0
    assert "reliability" not in printed


def test_an_evaluation_is_not_written_into_a_models_folder(artifact: Path, collection: Path) -> None:
    """``evaluate MODEL DATA -o MODEL`` replaced the model's own validation confusion matrix silently."""
    figure = (artifact / "confusion_matrix.png").read_bytes()
    with pytest.raises(OutputError, match="it holds a model"):
        evaluate(artifact, collection / "manifest.csv", output=artifact)
    assert (artifact / "confusion_matrix.png").read_bytes() == figure
    assert not (artifact / "metrics.json").exists()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("gamma:-1", "a gamma from 0.05 to 20"),  # ZeroDivisionError after the model had loaded
        ("jpeg:nan", "a JPEG quality from 1 to 100"),
        ("jpeg:150", "a JPEG quality from 1 to 100"),  # handed to Pillow as it was
        ("jpeg:inf", "a JPEG quality from 1 to 100"),  # OverflowError
        ("crop:1.5", "the fraction kept"),  # a black frame, not a crop
        ("pad:-0.5", "a frame's fraction"),  # a 1-pixel frame
        ("noise:-0.1", "a noise level"),
        ("downscale:0", "a scale from 0.01 to 1"),
        ("bits:nan", "a bit depth from 1 to 16"),  # 1 bit
        ("bits:12+jpeg:90", "must come last"),  # 89 % of the pixels white
    ],
)
def test_a_degradation_value_out_of_its_range_is_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_degradation(text)
    assert parse_degradation("jpeg:90+gamma:0.7+crop:1+pad:0+bits:12") is not None


def test_cli_classify_prints_one_line_per_file(
    artifact: Path, collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad, fake = tmp_path / "notes.txt", tmp_path / "scan.dcm"
    bad.write_text("not an image")
    fake.write_text("not DICOM either")  # a DICOM name is no DICOM file
    status = cli.main(
        ["classify", "--model", str(artifact), "--json", str(collection / "dark" / "1.png"), str(bad),
         str(fake)]  # fmt: skip
    )
    out = capsys.readouterr()
    assert status == 1  # a file failed
    [line] = [json.loads(text) for text in out.out.strip().splitlines()]
    assert line["top_class"] in ("bright", "dark") and line["model"] == "tiny-1"
    text, dicom = out.err.splitlines()
    assert text == "notes.txt\terror\tnot a readable image"
    assert dicom.startswith("scan.dcm\terror\tnot a readable DICOM file (InvalidDicomError: ")


def test_cli_train_and_evaluate_on_a_folder(
    collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "seed"
    assert (
        cli.main(
            [
                "train",
                str(collection),
                str(output),
                "--architecture",
                "sugandi-cnn",
                "--epochs",
                "1",
                "--steps-per-epoch",
                "1",
                "--no-progress",
                "--seeds",
                "7",  # one seed: that run's weights and split seed, not --seed's default
            ]
        )
        == 0
    )
    assert "validation accuracy" in capsys.readouterr().out
    metadata = json.loads((output / "model.json").read_text())
    assert metadata["name"] == "sugandi-cnn"
    assert metadata["training"]["seed"] == 7 and metadata["data"]["split"]["seed"] == 7
    assert cli.main(["evaluate", str(output), str(collection), "--split", "validation"]) == 0
    assert '"accuracy"' in capsys.readouterr().out


def test_a_truncated_picture_is_named_in_one_error_line(
    artifact: Path, collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hospital's export with one truncated JPEG: ``evaluate`` stops with the file's name and what is
    wrong, ``classify`` reports that file and goes on; no traceback (Pillow's OSError escaped before)."""
    export = tmp_path / "export"
    for label in ("bright", "dark"):
        (export / label).mkdir(parents=True)
        for source in sorted((collection / label).glob("*.png"))[:3]:
            (export / label / source.name).write_bytes(source.read_bytes())
    buffer = io.BytesIO()
    Image.open(collection / "dark" / "1.png").convert("L").save(buffer, format="JPEG")
    truncated = export / "dark" / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert cli.main(["evaluate", str(artifact), str(export)]) == 2
    error = capsys.readouterr().err
    assert "error: cut.jpg cannot be evaluated: the JPEG stream has no end-of-image marker: cut" in error
    assert str(tmp_path) not in error and "Traceback" not in error
    assert error.count("cut.jpg") == 1  # named once, by the command that knows which file it was
    # A degraded evaluation reads its pictures by the same function, and says the same.
    assert cli.main(["evaluate", str(artifact), str(export), "--degrade", "jpeg:30"]) == 2
    assert "error: cut.jpg cannot be evaluated: the JPEG stream has no end-of" in capsys.readouterr().err
    good = export / "dark" / "1.png"
    assert cli.main(["classify", "--model", str(artifact), str(truncated), str(good)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("cut.jpg\terror\tthe JPEG stream has no end-of-image marker: cut short")
    assert captured.out.startswith("1.png\t")
    # Training reads its images through load_grays: the same, named.
    with pytest.raises(DatasetError, match=r"^cut\.jpg cannot be read: the JPEG stream has no end-of-image"):
        items = [LabelledImage(good, "dark", "a"), LabelledImage(truncated, "dark", "b")]
        load_grays(items, PreprocessSpec(input_size=(32, 32)))
    fake = export / "dark" / "scan.dcm"  # pydicom's InvalidDicomError escaped training as a traceback before
    fake.write_text("not DICOM")
    with pytest.raises(DatasetError, match=r"^scan\.dcm cannot be read: not a readable DICOM file \("):
        load_grays([LabelledImage(fake, "dark", "c")], PreprocessSpec(input_size=(32, 32)))
    # So does the novelty fit, on a copy of the training data with one training picture cut short (a
    # validation picture changed makes other data, which the split's fingerprint refuses first).
    copied, model = tmp_path / "copied", tmp_path / "model"
    shutil.copytree(collection, copied)
    shutil.copytree(artifact, model)
    trained, _ = split_from_record(load_collection(collection), read_metadata(artifact).data["split"])
    picture = copied / trained[-1].path.relative_to(collection)
    whole = picture.read_bytes()
    picture.write_bytes(whole[: len(whole) // 2])
    assert cli.main(["novelty", str(model), str(copied), "--rank", "2"]) == 2
    error = capsys.readouterr().err
    assert f"error: {picture.name} cannot be read: not a readable image (" in error
    assert error.count(picture.name) == 1


@pytest.mark.usefixtures("restore_logging")  # the node CLI sets up logging for its process
def test_cli_errors_are_one_line_and_exit_2(
    artifact: Path, collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model, data set or option the command cannot use: 'error: ...' and 2, not a traceback and 1
    (1 stays 'some images could not be classified')."""
    from dicom_node import cli as node_cli

    image = str(collection / "dark" / "1.png")
    for main in (cli.main, node_cli.main):
        assert main(["classify", "--model", str(tmp_path / "nothing-here"), image]) == 2
        assert "error: no model.json" in capsys.readouterr().err
        assert main(["evaluate", str(artifact), str(tmp_path / "missing")]) == 2
        assert "error: no such folder or manifest" in capsys.readouterr().err
        for argv, named in (
            (["classify", "--threshold", "1.5", image], "'1.5' is not a probability"),
            (["evaluate", str(artifact), image, "--degrade", "sepia:1"], "unknown degradation 'sepia:1'"),
        ):
            with pytest.raises(SystemExit) as exited:  # argparse: usage and the reason, exit 2
                main(argv)
            assert exited.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")  # the node CLI sets up logging for its process
def test_an_output_that_cannot_be_written_is_refused_before_the_data_are_read(
    artifact: Path, collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``train DATA afile`` trained, then crashed on a FileExistsError (a folder it may not write: a
    PermissionError in save_model); evaluate -o and ensemble alike. Now one 'error:' line and 2, first."""
    from classifier import dataset, ensemble, evaluation, training
    from dicom_node import cli as node_cli

    def unread(source: Path) -> list[LabelledImage]:
        raise AssertionError("the data were read before the output was checked")

    for module in (dataset, training, ensemble, evaluation):
        monkeypatch.setattr(module, "load_collection", unread)
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    data, model, quick = str(collection), str(artifact), ["--epochs", "1", "--no-progress", "--no-novelty"]
    for main, argv, reason in (
        (cli.main, ["train", data, str(afile), *quick], "it is a file, not a folder"),
        (node_cli.main, ["train", data, str(afile), *quick], "it is a file, not a folder"),
        (cli.main, ["train", data, str(afile / "model"), *quick], "Not a directory"),
        (cli.main, ["train", data, str(afile), "--seeds", "1,2", *quick], "it is a file, not a folder"),
        (cli.main, ["evaluate", model, data, "-o", str(afile)], "it is a file, not a folder"),
        (cli.main, ["evaluate", model, data, "-o", str(afile), "--split", "validation"], "it is a file"),
        (cli.main, ["ensemble", str(afile), model, model, "--data", data, "--no-novelty"], "it is a file"),
    ):
        assert main(argv) == 2, argv
        error = capsys.readouterr().err
        assert f"error: cannot write to {afile}" in error and reason in error and "Traceback" not in error


_WRITE_CHECK = """
import sys
from pathlib import Path
from classifier.artifact import writable_folder
from classifier.errors import OutputError
for target in (Path(sys.argv[1]) / "model", Path(sys.argv[1])):
    try:
        writable_folder(target)
        print("written")
    except OutputError as exc:
        print(exc)
"""


def test_a_folder_that_may_not_be_written_is_an_output_error(tmp_path: Path) -> None:
    """Checked in a process of its own. Root may write any folder (and CI runs as root): there that
    process is root without the capabilities that override file permissions (util-linux setpriv)."""
    import subprocess
    import sys

    tmp_path.chmod(0o555)
    unprivileged = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    unprivileged = unprivileged if os.geteuid() == 0 else []
    root = Path(__file__).parents[2]
    try:
        result = subprocess.run([*unprivileged, sys.executable, "-c", _WRITE_CHECK, str(tmp_path)],
                                capture_output=True, text=True, cwd=root, timeout=120, check=False,
                                env={**os.environ, "PYTHONPATH": str(root)})
    finally:
        tmp_path.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"cannot write to {tmp_path / 'model'}: Permission denied",
                                          f"cannot write to {tmp_path}: Permission denied"]


def test_data_and_options_the_commands_cannot_use_are_one_error_line(
    artifact: Path, collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each was a CRITICAL uncaught ValueError and exit 1: one class, members that cannot be merged,
    a seed twice, an unknown augmentation, an input too small for the network."""
    rows = list(csv.DictReader((collection / "manifest.csv").open(newline="")))
    single = tmp_path / "dark.csv"
    darks = [f"{collection / row['file']},dark\n" for row in rows if row["label"] == "dark"]
    single.write_text("file,label\n" + "".join(darks))
    other = tmp_path / "other-classes"
    shutil.copytree(artifact, other)
    metadata = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**metadata, "classes": ["bright", "dim"]}))
    quick = ["--epochs", "1", "--steps-per-epoch", "1", "--input-size", "32", "--no-progress", "--no-novelty"]
    data, out = str(collection), str(tmp_path / "out")
    for argv, reason in (
        (["train", str(single), out, *quick], "training needs at least two classes; "),
        (["train", data, out, "--seeds", "5,5", *quick], "at least two different seeds or architectures"),
        (["ensemble", out, str(artifact), str(other), "--data", data], "must share classes"),
        (["ensemble", out, str(artifact), "--data", data], "an ensemble needs at least two members"),
    ):
        assert cli.main(argv) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("error: ") and reason in error, error
    for argv, reason in (
        (["train", data, out, "--augmentation", "bogus"], "unknown augmentation 'bogus'; choose one of "),
        (["train", data, out, "--input-size", "8"], "--input-size: 8 is less than 32"),
    ):
        with pytest.raises(SystemExit) as exited:  # argparse: usage and the reason, exit 2
            cli.main(argv)
        assert exited.value.code == 2 and reason in capsys.readouterr().err
    config = TrainingConfig(architecture="cxr-compact", data=collection, output=tmp_path / "m", epochs=1)
    with pytest.raises(OptionError, match="unknown augmentation 'bogus'"):
        train(replace(config, augmentation="bogus"))
    with pytest.raises(OptionError, match="the input size is at least 32 pixels, not 8"):
        replace(config, input_size=8)


def test_counts_and_fractions_out_of_range_are_refused_before_anything_runs(
    artifact: Path, collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--epochs 0`` (or -1) wrote an untrained model as if trained, and exit 0; a batch of 0, a learning
    rate of 0 or below or a validation fraction of 1 failed deep inside, or trained on nonsense."""
    output, data = tmp_path / "model", str(collection)
    train_argv = ["train", data, str(output), "--input-size", "32", "--no-progress", "--no-novelty"]
    for argv, reason in (
        ([*train_argv, "--epochs", "0"], "--epochs: 0 is less than 1"),
        ([*train_argv, "--epochs", "-1"], "--epochs: -1 is less than 1"),
        ([*train_argv, "--epochs", "two"], "--epochs: 'two' is not a whole number"),
        ([*train_argv, "--batch-size", "0"], "--batch-size: 0 is less than 1"),
        ([*train_argv, "--steps-per-epoch", "0"], "--steps-per-epoch: 0 is less than 1"),
        ([*train_argv, "--members", "0"], "--members: 0 is less than 1"),
        ([*train_argv, "--learning-rate", "-0.1"], "--learning-rate: '-0.1' is not a number in (0, ∞)"),
        ([*train_argv, "--learning-rate", "0"], "--learning-rate: '0' is not a number in (0, ∞)"),
        ([*train_argv, "--mixup", "nan"], "--mixup: 'nan' is not a number in [0, ∞)"),
        ([*train_argv, "--average-last", "0"], "--average-last: 0 is less than 1"),
        ([*train_argv, "--validation-fraction", "1"], "--validation-fraction: '1' is not a number in (0, 1)"),
        ([*train_argv, "--centre-crop", "0.1"], "--centre-crop: '0.1' is not a number in [0.3, 1]"),
        ([*train_argv, "--seed", "-1"], "--seed: -1 is less than 0"),  # Keras' raw ValueError, exit 1
        ([*train_argv, "--split-seed", str(2**32)], f"--split-seed: {2**32} is more than {2**32 - 1}"),
        ([*train_argv, "--seeds", "1,-2"], "--seeds: -2 is less than 0"),
        (["novelty", str(artifact), data, "--rank", "0"], "--rank: 0 is less than 1"),
        (["novelty", str(artifact), data, "--quantile", "1"], "--quantile: '1' is not a number in [0.5, 1)"),
    ):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2 and reason in capsys.readouterr().err, argv
    assert not output.exists()
    config = TrainingConfig(architecture="cxr-compact", data=collection, output=output)
    for changed, reason in (({"epochs": 0}, "the epochs must be at least 1, not 0"),
                            ({"batch_size": -4}, "the batch size must be at least 1, not -4"),
                            ({"seed": -1}, "the seed must be 0 to 4294967295, not -1")):  # fmt: skip
        with pytest.raises(OptionError, match=reason):
            replace(config, **changed)


def test_dicom_files_can_be_classified_from_disk(
    artifact: Path, collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.unit.test_classifier_preprocess import make_dataset

    ds = make_dataset(np.asarray(Image.open(collection / "bright" / "2.png")), bits_stored=8)
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).Rows == 96
    assert cli.main(["classify", "--model", str(artifact), str(path)]) == 0
    assert capsys.readouterr().out.startswith("image.dcm\t")


def test_transfer_architecture_trains_from_a_weights_file_and_never_from_random(
    collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from classifier.architectures import LITE_VARIANTS, build_efficientnet_lite_transfer
    from classifier.errors import WeightsUnavailableError

    config = TrainingConfig(
        architecture="efficientnet-lite0-transfer",
        data=collection,
        output=tmp_path / "lite0",
        epochs=1,
        steps_per_epoch=2,
        batch_size=4,
        input_size=64,
        version="lite0-tiny",
        progress=False,
    )
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("CXR_LITE0_WEIGHTS", raising=False)
    monkeypatch.setitem(LITE_VARIANTS, 0, replace(LITE_VARIANTS[0], weights_package="no_such_weights_package"))
    with pytest.raises(WeightsUnavailableError):  # a pretrained architecture never starts from random
        train(config, argv=[])

    backbone = tmp_path / "backbone.weights.h5"  # stands in for the ImageNet file: same layers, 2 classes
    build_efficientnet_lite_transfer(0, num_classes=2, input_size=(64, 64), weights=None, seed=5).save_weights(
        backbone
    )
    monkeypatch.setenv("CXR_LITE0_WEIGHTS", str(backbone))
    train(config, argv=[])
    classifier = Classifier.load(tmp_path / "lite0")
    assert classifier.spec.normalisation == "signed" and classifier.info.version == "lite0-tiny"
    prediction = classifier.predict_images([Image.open(collection / "dark" / "0.png")])[0]
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction.heatmap is not None and prediction.heatmap.shape == (64, 64)


def test_absent_imagenet_weights_stop_training_before_the_images_are_read(
    collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights were looked up when the network was built, after every image had been read (and a lung
    U-Net trained, with --lung-masks)."""
    from classifier import training
    from classifier.errors import WeightsUnavailableError

    def read(*_: object, **__: object) -> None:
        raise AssertionError("images read before the weights were looked up")

    monkeypatch.setattr(training, "load_grays", read)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("CXR_RESNET152_WEIGHTS", raising=False)
    config = TrainingConfig(
        architecture="resnet152-transfer", data=collection, output=tmp_path / "m", epochs=1
    )
    with pytest.raises(WeightsUnavailableError, match="ResNet-152 weights are not on this machine"):
        train(config)


def test_the_seed_003_stages_stop_early_on_a_flat_validation_loss(
    collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nie et al.'s two stages stop early in ``train`` (after 5, then 7 epochs without a better validation
    loss; the best epoch kept), on the small seed-000 network so that the test needs no 230-MB ResNet-152:
    at learning rate 0 the validation loss never improves after epoch 1, so stage 1 stops after 1 + 5
    epochs of 12 and stage 2, whose stopping starts afresh, after 1 + 7. (ReduceLROnPlateau runs beside
    it; a rate of 0 cannot show its cut.) It trains with mixup and the progress bar the CLI shows by
    default, which the other tests leave off."""
    from classifier import architectures

    seed_003 = architectures.get_architecture("resnet152-transfer").recipe
    stages = tuple(replace(stage, unfreeze_last=None) for stage in seed_003.stages)  # no backbone to freeze
    sugandi = architectures.get_architecture("sugandi-cnn")
    two_stage = replace(sugandi, name="sugandi-two-stage", recipe=replace(seed_003, stages=stages))
    monkeypatch.setitem(architectures._ARCHITECTURES, two_stage.name, two_stage)
    config = TrainingConfig(
        architecture=two_stage.name, data=collection, output=tmp_path / "two-stage", epochs=12,
        steps_per_epoch=1, batch_size=4, input_size=32, learning_rate=0.0, mixup=0.2, version="two-stage",
    )  # fmt: skip
    result = train(config, argv=[])
    training = result.metadata.training
    assert [stage["early_stopping"] for stage in training["recipe"]["stages"]] == [5, 7]
    assert training["epochs_run"] == (1 + 5) + (1 + 7) and training["best_epoch"] == 1
    assert len(set(training["history"]["val_loss"])) == 1 and training["recipe"]["mixup"] == 0.2
    progress = capsys.readouterr().err
    assert "stage 1" in progress and "stage 2" in progress


@pytest.mark.usefixtures("restore_logging")  # the node CLI sets up logging for its process
def test_node_cli_train_logs_one_line_an_epoch(
    collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cxr-node train` (the documented command, not only `python -m classifier.cli`) reports its epochs:
    a training run of an hour must not be silent in an unattended log."""
    from dicom_node import cli as node_cli

    argv = ["train", str(collection), str(tmp_path / "model"), "--epochs", "2", "--steps-per-epoch", "1",
            "--batch-size", "4", "--input-size", "32", "--no-progress", "--version", "logged"]  # fmt: skip
    assert node_cli.main(argv) == 0
    epochs = [line for line in capsys.readouterr().err.splitlines() if "classifier.training" in line and " epoch " in line]
    assert [line.split(" epoch ")[1].split(":")[0] for line in epochs] == ["1", "2"]


def test_training_with_reframing_runs_on_whole_chest_classes_and_refuses_data_without_them(
    collection: Path, tmp_path: Path
) -> None:
    """robust-reframe end to end (its 2x source copies through tf.data in graph mode), on a tiny collection
    with the class names it reframes; on data without them it stops before training."""
    rng = np.random.default_rng(2)
    rows = ["file,label,group"]
    for label, value in (("covid", 0.2), ("normal", 0.5), ("pneumonia", 0.8)):
        (tmp_path / "cxr" / label).mkdir(parents=True)
        for index in range(6):
            pixels = np.clip(rng.normal(value, 0.1, (80, 72)), 0, 1)
            Image.fromarray((pixels * 255).astype(np.uint8)).save(tmp_path / "cxr" / label / f"{index}.png")
            rows.append(f"{label}/{index}.png,{label},{label}-{index // 2}")
    (tmp_path / "cxr" / "manifest.csv").write_text("\n".join(rows) + "\n")
    config = TrainingConfig(
        architecture="cxr-compact", data=tmp_path / "cxr", output=tmp_path / "model", epochs=1,
        steps_per_epoch=2, batch_size=8, input_size=48, augmentation="robust-reframe",
        version="reframed", progress=False,
    )  # fmt: skip
    train(config, argv=[])
    assert read_metadata(tmp_path / "model").training["recipe"]["augmentation"] == "robust-reframe"

    with pytest.raises(OptionError, match="none of which is in the data"):
        train(replace(config, data=collection, output=tmp_path / "other"), argv=[])


def test_a_reframing_recipe_without_its_classes_is_refused_before_the_lung_model_and_the_images(
    collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal came after the lung U-Net had trained (120 epochs by default) and every image had been
    read (review)."""
    from classifier import training

    def too_late(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("reached before the reframing was checked")

    monkeypatch.setattr(training, "_lung_model", too_late)
    monkeypatch.setattr(training, "load_grays", too_late)
    config = TrainingConfig(
        architecture="cxr-compact", data=collection, output=tmp_path / "model", epochs=1,
        augmentation="robust-reframe", lung_masks=tmp_path, progress=False,
    )  # fmt: skip
    with pytest.raises(OptionError, match="none of which is in the data"):
        train(config, argv=[])


def _three_classes(collection: Path, folder: Path) -> Path:
    """A manifest in ``folder`` of the tiny collection's images (absolute paths), its dark images split into
    two classes by patient: dark, dim."""
    rows = list(csv.DictReader((collection / "manifest.csv").open(newline="")))
    for row in rows:
        row["file"] = str(collection / row["file"])
        if row["label"] == "dark" and int(row["group"].removeprefix("dark-patient")) >= 3:
            row["label"] = "dim"
    manifest = folder / "three.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_relabel_specs_are_read_and_mistakes_refused() -> None:
    assert parse_relabel(["non-covid=normal,pneumonia"]) == {"normal": "non-covid", "pneumonia": "non-covid"}
    assert parse_relabel(["a=x", "b=y, z"]) == {"x": "a", "y": "b", "z": "b"}
    for specs in (["normal"], ["=normal"], ["non-covid="], ["a=x", "b=x"]):
        with pytest.raises(DatasetError):
            parse_relabel(specs)
    items = [LabelledImage(Path("1.png"), "normal", "g1"), LabelledImage(Path("2.png"), "covid", "g2")]
    assert [i.label for i in relabel(items, {"normal": "non-covid"})] == ["non-covid", "covid"]
    with pytest.raises(DatasetError, match="no image is labelled \\['pneumonai'\\]"):  # a typo never trains
        relabel(items, {"pneumonai": "non-covid"})


def test_data_labels_match_a_model_s_classes_as_a_hospital_export_names_them() -> None:
    classes = ("covid", "normal", "pneumonia")
    assert class_indices(["COVID-19", "No Finding", "Pneumonia", "normal"], classes) == {
        "COVID-19": 0, "No Finding": 1, "Pneumonia": 2, "normal": 1,
    }  # fmt: skip
    assert class_indices(["non_covid", "Covid19", "NonCOVID"], ("covid", "non-covid")) == {
        "non_covid": 1, "Covid19": 0, "NonCOVID": 1,
    }  # fmt: skip
    with pytest.raises(DatasetError, match="relabel, e.g. non-covid=normal,pneumonia"):
        class_indices(["normal", "covid"], ("covid", "non-covid"))
    with pytest.raises(DatasetError, match="\\['effusion'\\] are not classes"):
        class_indices(["effusion", "covid"], classes)


def test_a_merged_class_model_trains_on_the_split_of_the_original_labels(
    collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nie et al.'s COVID-19 / non-COVID model from a three-class collection: the classes are merged after
    the split, so it holds out the very patients a three-class model of the same seed does."""
    manifest = _three_classes(collection, tmp_path)
    output = tmp_path / "merged"
    argv = ["train", str(manifest), str(output), "--architecture", "sugandi-cnn", "--epochs", "1",
            "--steps-per-epoch", "1", "--no-progress", "--seed", "3", "--validation-fraction", "0.25",
            "--relabel", "shadow=dark,dim"]  # fmt: skip
    assert cli.main(argv) == 0
    capsys.readouterr()
    metadata = read_metadata(output)
    assert metadata.classes == ("bright", "shadow")
    assert metadata.data["split"]["relabel"] == {"dark": "shadow", "dim": "shadow"}
    items = load_collection(manifest)
    _, unmerged_validation = split_by_group(items, 0.25, seed=3)
    assert {i.label for i in unmerged_validation} == {"bright", "dark", "dim"}  # stratified on all three
    _, merged_first = split_by_group(relabel(items, {"dark": "shadow", "dim": "shadow"}), 0.25, seed=3)
    # This seed tells the two apart: merged first, other patients would be held out.
    assert {i.path for i in merged_first} != {i.path for i in unmerged_validation}
    _, recorded = split_from_record(items, metadata.data["split"])
    assert [(i.path, i.label) for i in recorded] == [
        (i.path, "bright" if i.label == "bright" else "shadow") for i in unmerged_validation
    ]
    assert metadata.data["validation"]["groups"] == len({i.group for i in unmerged_validation})
    assert metadata.data["validation"]["per_class"] == {
        "bright": sum(i.label == "bright" for i in unmerged_validation),
        "shadow": sum(i.label != "bright" for i in unmerged_validation),
    }
    # Scoring it: the recorded split merges by itself; the whole collection needs the same merge.
    assert cli.main(["evaluate", str(output), str(manifest), "--split", "validation"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == len(unmerged_validation)
    assert cli.main(["evaluate", str(output), str(manifest), "--relabel", "shadow=dark,dim"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 24
    assert cli.main(["evaluate", str(output), str(manifest)]) == 2
    assert "labels ['dark', 'dim'] are not classes of the model" in capsys.readouterr().err
    assert cli.main(["train", str(manifest), str(output), "--relabel", "shadow"]) == 2
    assert "expected NEW=OLD" in capsys.readouterr().err


def test_weight_averaging_keeps_the_mean_of_the_last_epochs_weights(
    collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--average-last N`` (stochastic weight averaging): the saved network's trainable weights are the
    mean of those at the end of the last N epochs, not the last or best epoch's, and its BatchNorm
    statistics are recomputed on clean images for those weights (not averaged, not left from training)."""
    from classifier import training

    seen: list[list[np.ndarray]] = []
    real = training._weight_average

    def recording(keras: Any, first_epoch: int) -> Any:
        average = real(keras, first_epoch)

        class Recording(type(average)):  # type: ignore[misc]
            def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                seen.append([w.numpy() for w in self.model.trainable_weights])
                super().on_epoch_end(epoch, logs)

        return Recording()

    monkeypatch.setattr(training, "_weight_average", recording)
    recomputed: list[list[np.ndarray]] = []  # the trainable weights each BatchNorm recomputation saw
    recompute = training._recompute_batch_norm

    def spying(keras: Any, model: Any, clean_batches: Any) -> None:
        recomputed.append([w.numpy() for w in model.trainable_weights])
        recompute(keras, model, clean_batches)

    monkeypatch.setattr(training, "_recompute_batch_norm", spying)
    config = TrainingConfig(
        architecture="cxr-compact", data=collection, output=tmp_path / "swa", epochs=4, steps_per_epoch=2,
        batch_size=4, input_size=64, average_last=2, version="swa", progress=False,
    )  # fmt: skip
    result = train(config, argv=[])
    training_record = result.metadata.training
    assert training_record["averaged_epochs"] == [3, 4] and training_record["recipe"]["average_last"] == 2
    assert training_record["recipe"]["keep_best"] is False and training_record["best_epoch"] == 4

    import keras

    model = keras.models.load_model(tmp_path / "swa" / "model.keras", compile=False)
    assert len(seen) == 4
    final = [w.numpy() for w in model.trainable_weights]
    for weight, third, fourth in zip(final, seen[2], seen[3], strict=True):
        np.testing.assert_allclose(weight, (third + fourth) / 2, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(weight, fourth) for weight, fourth in zip(final, seen[3], strict=True))
    # precise BatchNorm after each of the 4 epochs, then once more for the averaged weights
    assert len(recomputed) == 5
    for weight, seen_by_last in zip(final, recomputed[-1], strict=True):
        np.testing.assert_array_equal(weight, seen_by_last)


def test_weight_averaging_is_refused_where_it_cannot_hold(collection: Path, tmp_path: Path) -> None:
    """More epochs than the run has, or a recipe that stops early (Nie et al.'s), is refused before any
    data are read, with the reason."""
    base = TrainingConfig(architecture="cxr-compact", data=collection, output=tmp_path / "m", epochs=3)
    with pytest.raises(OptionError, match="cannot average the last 4 of cxr-compact's 3 epochs"):
        train(replace(base, average_last=4), argv=[])
    with pytest.raises(OptionError, match="stops early"):
        train(replace(base, architecture="resnet152-transfer", epochs=None, average_last=2), argv=[])
    with pytest.raises(OptionError, match="averaged epochs must be at least 1"):
        replace(base, average_last=0)
    assert not (tmp_path / "m").exists()


def test_a_stage_that_stops_early_hands_its_best_weights_to_the_next(
    collection: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed 003 stops each stage with EarlyStopping(restore_best_weights=True), so fine-tuning starts from
    the frozen stage's best validation-loss weights; the recipe started it from that stage's last weights,
    up to ``patience`` epochs past the best (review). A copy of the recipe on the small network, at a rate
    that makes stage 1 stop early."""
    import keras

    from classifier import architectures

    resnet = architectures.get_architecture("resnet152-transfer").recipe
    stages = tuple(replace(stage, epochs=8, learning_rate=3e-2, early_stopping_patience=2, unfreeze_last=None)
                   for stage in resnet.stages)
    probe = replace(architectures.get_architecture("cxr-compact"), name="early-stop-probe",
                    recipe=replace(resnet, stages=stages, batch_size=4))
    monkeypatch.setitem(architectures._ARCHITECTURES, probe.name, probe)
    fits: list[tuple[list[np.ndarray], list[float], list[list[np.ndarray]]]] = []  # start, losses, weights
    real_fit = keras.Model.fit

    def fit(model: Any, *args: Any, **kwargs: Any) -> Any:
        start, losses, ends = [w.copy() for w in model.get_weights()], [], []

        class Record(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                losses.append(float((logs or {})["val_loss"]))
                ends.append([w.copy() for w in model.get_weights()])

        fits.append((start, losses, ends))
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), Record()]
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)
    train(TrainingConfig(architecture=probe.name, data=collection, output=tmp_path / "m", input_size=32,
                         progress=False), argv=[])
    (_, losses, ends), (second_start, _, _) = fits
    best = int(np.argmin(losses))
    assert best < len(losses) - 1 < 7  # stage 1 stopped early, after its best epoch
    for start, best_weight in zip(second_start, ends[best], strict=True):
        np.testing.assert_array_equal(start, best_weight)
