"""Every class a shipped model can output has a code; standard codes are the standard's."""

from __future__ import annotations

import pytest

from classifier.types import INDETERMINATE
from reporting import codes
from reporting.errors import UnknownLabelError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("label", "value", "scheme"),
    [
        ("covid", "840539006", "SCT"),
        ("COVID-19", "840539006", "SCT"),
        ("pneumonia", "233604007", "SCT"),
        ("normal", "17621005", "SCT"),
        (INDETERMINATE, "82334004", "SCT"),
        ("non-covid", "CXR-NONCOVID", codes.LOCAL_SCHEME),
        ("non_covid", "CXR-NONCOVID", codes.LOCAL_SCHEME),
        (" Non  COVID ", "CXR-NONCOVID", codes.LOCAL_SCHEME),  # compared as the evaluation compares labels
    ],
)
def test_labels_map_to_codes(label: str, value: str, scheme: str) -> None:
    concept = codes.finding_for(label)
    assert (concept.code.value, concept.code.scheme_designator) == (value, scheme)
    assert len(concept.code.meaning) <= 64  # Code Meaning is an LO
    assert len(concept.probability_code.value) <= 16  # Code Value is an SH
    assert concept.probability_code.scheme_designator == codes.LOCAL_SCHEME


def test_probability_codes_are_distinct_per_class() -> None:
    labels = ["covid", "normal", "pneumonia", "non-covid"]
    assert len({codes.finding_for(label).probability_code.value for label in labels}) == len(labels)


def test_unknown_label_is_refused() -> None:
    with pytest.raises(UnknownLabelError):
        codes.finding_for("tuberculosis")
    with pytest.raises(UnknownLabelError):  # a data label the evaluation reads as normal, not a model class
        codes.finding_for("No Finding")
