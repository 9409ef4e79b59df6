"""The console colours a finding's chip by the concept the SR and the PDF code for its label. By the label's
lower-cased spelling, a model's "Non_COVID", "Non COVID" or "normal " was flagged red while the chip's words
said "No COVID-19 pattern" or "Normal" (review)."""

from __future__ import annotations

import pytest

from dicom_node.web.templating import finding_class, finding_name

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("label", "chip", "words"),
    [
        ("normal", "finding-normal", "Normal"),
        ("normal ", "finding-normal", "Normal"),
        ("NORMAL", "finding-normal", "Normal"),
        ("non-covid", "finding-normal", "No COVID-19 pattern"),
        ("Non_COVID", "finding-normal", "No COVID-19 pattern"),
        ("Non COVID", "finding-normal", "No COVID-19 pattern"),
        ("covid", "finding-flagged", "COVID-19"),
        ("COVID-19", "finding-flagged", "COVID-19"),
        ("pneumonia", "finding-flagged", "Pneumonia"),
        ("indeterminate", "finding-indeterminate", "Indeterminate"),
        ("lesion", "finding-flagged", "Lesion"),  # no coded concept: flagged, as before
    ],
)
def test_a_chip_s_colour_follows_its_words(label: str, chip: str, words: str) -> None:
    assert finding_class(label) == chip
    assert finding_name(label) == words
