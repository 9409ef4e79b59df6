"""Reading a labelled collection as hospitals have one: a PACS export with linked patient folders and
reports beside the images, layout folders under the classes, spreadsheet manifests. Every image is read
once or the reason it cannot be is said; nothing is left out or counted twice without a word."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from classifier import cli
from classifier.dataset import (
    DatasetError,
    LabelledImage,
    load_collection,
    split_by_fold,
    split_by_group,
    split_from_record,
    writable_output,
)

pytestmark = pytest.mark.unit


def picture(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def dicom(path: Path, *, image: bool, patient: str | None = None) -> Path:
    """A CR image, or a Basic Text SR (no Rows, no Pixel Data), saved without a suffix as storescp does."""
    ds = pydicom.Dataset()
    if patient is not None:
        ds.PatientID = patient
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1" if image else "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID, ds.SOPInstanceUID,
    )
    if image:
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.arange(256, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_linked_patient_folder_is_read_and_a_link_loop_read_once(tmp_path: Path) -> None:
    """Python's rglob does not follow linked folders: a patient folder linked into the export was left
    out without a word (four of five normal images gone)."""
    data = tmp_path / "data"
    picture(data / "covid" / "c1.png")
    picture(data / "normal" / "n1.png")
    picture(tmp_path / "elsewhere" / "P2" / "n2.png")
    picture(tmp_path / "elsewhere" / "P2" / "n3.png")
    (data / "normal" / "P2").symlink_to(tmp_path / "elsewhere" / "P2")
    (tmp_path / "elsewhere" / "P2" / "again").symlink_to(tmp_path / "elsewhere" / "P2")  # a loop
    found = sorted((item.label, item.path.name, item.group) for item in load_collection(data))
    assert found == [
        ("covid", "c1.png", "covid/c1.png"), ("normal", "n1.png", "normal/n1.png"),
        ("normal", "n2.png", "folder:p2"), ("normal", "n3.png", "folder:p2"),
    ]


def test_one_file_linked_under_two_classes_is_refused_and_twice_under_one_read_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It was counted in both classes, and the split could put it on both sides."""
    picture(tmp_path / "covid" / "c1.png")
    picture(tmp_path / "normal" / "n1.png")
    (tmp_path / "normal" / "n1-copy.png").symlink_to(tmp_path / "normal" / "n1.png")
    caplog.set_level(logging.WARNING, logger="classifier.dataset")
    assert [item.path.resolve().name for item in load_collection(tmp_path)] == ["c1.png", "n1.png"]
    assert "1 images reached twice through links are read once" in caplog.text
    (tmp_path / "covid" / "c2.png").symlink_to(tmp_path / "normal" / "n1.png")
    with pytest.raises(DatasetError, match=r"covid/c2.png and normal/n1(-copy)?.png are one file \(linked\) under the "
                                           r"classes covid and normal"):
        load_collection(tmp_path)


def test_a_folder_that_cannot_be_read_is_an_error_not_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rglob passes over a folder it may not list. Its refusal is made here as the kernel makes it for a
    folder of another user (the tests run as root, who may list any)."""
    picture(tmp_path / "covid" / "c1.png")
    picture(tmp_path / "normal" / "P3" / "n1.png")
    listed = os.scandir

    def scandir(path: str) -> Any:
        if Path(path).name == "P3":
            raise PermissionError(13, "Permission denied", str(path))
        return listed(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DatasetError, match=r"cannot read the folder normal/P3: Permission denied"):
        load_collection(tmp_path)


def test_a_pacs_export_s_reports_beside_its_images_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A structured report in a storescp export stopped evaluation and training: "SR000001 cannot be
    read: the object has no Pixel Data"."""
    picture(tmp_path / "covid" / "c1.png")
    dicom(tmp_path / "normal" / "STUDY1" / "CR000001", image=True)
    dicom(tmp_path / "normal" / "STUDY1" / "SR000001", image=False)
    caplog.set_level(logging.WARNING, logger="classifier.dataset")
    assert [item.path.name for item in load_collection(tmp_path)] == ["c1.png", "CR000001"]
    assert "class folder normal: 1 files skipped, not pictures" in caplog.text
    assert caplog.text.rstrip().endswith("or DICOM images: 1 DICOM without an image")


def test_a_damaged_dicom_file_is_kept_so_that_reading_it_says_why(tmp_path: Path) -> None:
    picture(tmp_path / "covid" / "c1.png")
    damaged = dicom(tmp_path / "normal" / "CR000001", image=True)
    damaged.write_bytes(damaged.read_bytes()[:140])
    assert [item.path.name for item in load_collection(tmp_path)] == ["c1.png", "CR000001"]


def test_a_layout_folder_under_every_class_is_refused_not_read_as_one_patient(tmp_path: Path) -> None:
    """``<class>/images/`` (and ``<class>/masks/``), as a public collection is laid out: every image
    became the patient "images", and the split trained on the masks and validated on the radiographs."""
    for label in ("covid", "normal", "pneumonia"):
        for name in "abcd":
            picture(tmp_path / label / "images" / f"{name}.png")
            picture(tmp_path / label / "masks" / f"{name}.png")
    with pytest.raises(DatasetError, match=r"the sub-folder name '(images|masks)' holds 12 of 24 images, under "
                                           r"the classes covid, normal, pneumonia"):
        load_collection(tmp_path)
    for label in ("covid", "normal", "pneumonia"):  # patients that each span classes stay allowed
        for patient in range(3):
            picture(tmp_path / label / f"P{patient}" / "x.png")
    for label in ("covid", "normal", "pneumonia"):
        for folder in ("images", "masks"):
            for path in (tmp_path / label / folder).iterdir():
                path.unlink()
            (tmp_path / label / folder).rmdir()
    training, validation = split_by_group(load_collection(tmp_path), 0.34, seed=0)
    assert {item.group for item in training}.isdisjoint(item.group for item in validation)


def test_dicom_images_of_one_patient_side_by_side_in_a_class_folder_are_one_group(tmp_path: Path) -> None:
    """storescp writes every image it receives into one folder (``CR.<uid>``): each was its own group, and
    6 of 20 two-image patients had one image in training and the other in validation (review)."""
    for label in ("covid", "normal"):
        for patient in range(10):
            for study in range(2):
                dicom(tmp_path / label / f"CR.{patient}.{study}", image=True, patient=f"{label}-{patient}")
    dicom(tmp_path / "normal" / "CR.anonymous", image=True, patient="")  # no Patient ID: its own group
    items = load_collection(tmp_path)
    assert len(items) == 41 and len({item.group for item in items}) == 21
    for seed in range(5):
        training, validation = split_by_group(items, 0.2, seed=seed)
        assert {item.group for item in training}.isdisjoint(item.group for item in validation)
        assert sum("anonymous" not in item.path.name for item in validation) % 2 == 0  # both or neither


def test_a_patient_s_studies_in_two_sub_folders_are_one_group_with_their_folders(tmp_path: Path) -> None:
    """An export by study (``<class>/<study>/...``) made each study a patient: one patient's two studies
    could be on both sides of the split. A picture in a study folder joins the group of that folder."""
    dicom(tmp_path / "normal" / "STUDY1" / "CR1", image=True, patient="P1")
    dicom(tmp_path / "normal" / "STUDY2" / "CR1", image=True, patient=" p1 ")  # one patient, spelt apart
    picture(tmp_path / "normal" / "STUDY2" / "key-image.png")
    dicom(tmp_path / "normal" / "STUDY3" / "CR1", image=True, patient="P2")
    picture(tmp_path / "covid" / "c1.png")
    groups = {item.path.relative_to(tmp_path).as_posix(): item.group for item in load_collection(tmp_path)}
    assert groups["normal/STUDY1/CR1"] == groups["normal/STUDY2/CR1"] == groups["normal/STUDY2/key-image.png"]
    assert len(set(groups.values())) == 3


def test_a_collection_of_pictures_keeps_the_groups_it_had(tmp_path: Path) -> None:
    """Only a Patient ID joins groups: a model's split, drawn anew from its seed by ``ensemble``,
    ``novelty`` and ``evaluate --split``, is the same for pictures as when it was trained."""
    picture(tmp_path / "covid" / "c1.png")
    picture(tmp_path / "normal" / "P1" / "n1.png")
    dicom(tmp_path / "normal" / "P2" / "CR1", image=True)
    assert [item.group for item in load_collection(tmp_path)] == ["covid/c1.png", "folder:p1", "folder:p2"]


def test_one_patient_id_for_half_a_collection_across_classes_is_refused_without_naming_it(
    tmp_path: Path,
) -> None:
    """An export that replaced every Patient ID by one made the whole collection one patient."""
    for label in ("covid", "normal"):
        for index in range(6):
            dicom(tmp_path / label / f"CR.{index}", image=True, patient="DOE^JANE")
    with pytest.raises(DatasetError, match=r"12 of 12 images, under the classes covid, normal, share a "
                                           r"Patient ID") as refused:
        load_collection(tmp_path)
    assert "DOE" not in str(refused.value) and "manifest.csv with a group column" in str(refused.value)


def test_one_patient_id_for_a_whole_class_is_refused(tmp_path: Path) -> None:
    """30 COVID-19 images exported as ANONYMOUS became one patient: the split validated none of them, with a
    warning, and trained on (review)."""
    for index in range(12):
        dicom(tmp_path / "covid" / f"CR.{index}", image=True, patient="ANONYMOUS")
        dicom(tmp_path / "normal" / f"CR.{index}", image=True, patient=f"P{index}")
    with pytest.raises(DatasetError, match="all 12 images of the class covid share a Patient ID") as refused:
        load_collection(tmp_path)
    assert "ANONYMOUS" not in str(refused.value)
    listed = tmp_path / "list.csv"  # a manifest without groups takes the same Patient IDs: refused alike
    listed.write_text("file,label\n" + "".join(f"{label}/CR.{index},{label}\n"
                                               for label in ("covid", "normal") for index in range(12)))
    with pytest.raises(DatasetError, match="all 12 images of the class covid share a Patient ID"):
        load_collection(listed)
    listed.write_text("file,label,group\n" + "".join(f"{label}/CR.{index},{label},{label}{index}\n"
                                                     for label in ("covid", "normal") for index in range(12)))
    assert len({item.group for item in load_collection(listed)}) == 24  # groups given: they are used


def test_a_manifest_row_without_a_group_takes_its_dicom_image_s_patient(tmp_path: Path) -> None:
    dicom(tmp_path / "a" / "CR1", image=True, patient="P1")
    dicom(tmp_path / "b" / "CR2", image=True, patient="P1")
    dicom(tmp_path / "c" / "CR3", image=True, patient="P1")
    picture(tmp_path / "d.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("file,label,group\na/CR1,normal,\nb/CR2,normal,\nc/CR3,normal,given\nd.png,covid,\n")
    groups = [item.group for item in load_collection(manifest)]
    assert groups[0] == groups[1] != groups[2] == "given"
    assert groups[3] == "d.png" and "P1" not in groups[0] and "p1" in groups[0]


def test_an_output_folder_inside_the_data_folder_is_refused_before_it_is_made(tmp_path: Path) -> None:
    """It became a class: empty, refused on every later run; once written, its plots were trained as the
    images of a class named "results"."""
    picture(tmp_path / "data" / "covid" / "c1.png")
    picture(tmp_path / "data" / "normal" / "n1.png")
    with pytest.raises(DatasetError, match="is inside the data folder .*, whose sub-folders are its classes"):
        writable_output(tmp_path / "data" / "results", tmp_path / "data")
    assert not (tmp_path / "data" / "results").exists()
    assert writable_output(tmp_path / "results", tmp_path / "data").is_dir()
    (tmp_path / "data" / "manifest.csv").write_text("file,label\ncovid/c1.png,covid\nnormal/n1.png,normal\n")
    assert writable_output(tmp_path / "data" / "results", tmp_path / "data").is_dir()  # listed, not folders


def test_cli_evaluate_refuses_an_output_inside_the_data_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture(tmp_path / "covid" / "c1.png")
    picture(tmp_path / "normal" / "n1.png")
    code = cli.main(["evaluate", str(tmp_path / "no-model"), str(tmp_path), "-o", str(tmp_path / "out")])
    assert code == 2
    assert "whose sub-folders are its classes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("written", ["model.json", "metrics.json"])
def test_a_model_or_evaluation_output_among_the_classes_is_refused(written: str, tmp_path: Path) -> None:
    picture(tmp_path / "covid" / "c1.png")
    picture(tmp_path / "results" / "confusion_matrix.png")
    (tmp_path / "results" / written).write_text("{}")
    with pytest.raises(DatasetError, match=f"class folder results of .* holds {written}: it is a model or "
                                           "evaluation output"):
        load_collection(tmp_path)


def test_a_spreadsheet_s_rows_of_empty_fields_are_skipped_as_blank_lines_are(tmp_path: Path) -> None:
    picture(tmp_path / "covid" / "c1.png")
    (tmp_path / "list.csv").write_bytes(b"file,label\r\ncovid/c1.png,covid\r\n,,\r\n , \r\n")
    assert [item.label for item in load_collection(tmp_path / "list.csv")] == ["covid"]


@pytest.mark.parametrize(("listed", "reason"), [
    ("loop", "a loop of links"), ("a\x00b.png", "embedded null byte"), ("x" * 300 + ".png", "File name too long"),
])
def test_a_listed_path_that_cannot_be_looked_up_is_a_dataset_error(
    listed: str, reason: str, tmp_path: Path
) -> None:
    """A link loop, a NUL byte and a name over 255 bytes were tracebacks, not an error line."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"file,label\n{listed},covid\n")
    with pytest.raises(DatasetError, match=f"line 2: the file .* cannot be found \\({reason}\\)"):
        load_collection(manifest)


def test_a_model_that_records_no_split_seed_is_refused_not_given_the_default(tmp_path: Path) -> None:
    """The default seed drew another split: novelty and ``evaluate --split validation`` scored 7 of 9
    images the model had trained on as validation images."""
    for label in ("covid", "normal"):
        for index in range(4):
            picture(tmp_path / label / f"{index}.png", seed=index)
    with pytest.raises(DatasetError, match="model m records no split"):
        split_from_record(load_collection(tmp_path), {"validation_fraction": 0.2}, model="model m")


def test_a_class_that_is_no_group_s_majority_and_left_out_of_validation_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A class whose images are each the minority of a patient's group (one ``rare`` image beside three of
    ``a``) was split for by no group: with its groups all in training, validation held none of it and no
    warning said so (review), as it did for a class that is some group's majority."""
    items = [
        LabelledImage(Path(f"/data/{label}{group}_{k}.png"), label, f"{label}{group}")
        for label in ("a", "b") for group in range(10) for k in range(3)
    ]  # fmt: skip
    items += [LabelledImage(Path(f"/data/rare{group}.png"), "rare", f"a{group}") for group in (0, 1)]
    caplog.set_level(logging.WARNING, logger="classifier.dataset")
    _, validation = split_by_group(items, 0.2, seed=1)
    assert "rare" not in {item.label for item in validation}
    assert "class rare: no image in validation" in caplog.text
    caplog.clear()
    _, validation = split_by_fold(items, 0, 5, seed=1)
    assert "rare" not in {item.label for item in validation}
    assert "fold 0 of 5 validates no group of class rare" in caplog.text
