"""The node's identity settings: what every result object carries must be valid there, or the node is
refused at start-up rather than failing every study when it builds the results."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError
from pydicom.uid import generate_uid

from dicom_node.settings import NodeSettings
from reporting.sr import build_sr
from tests.unit.test_reporting_cases import ANALYSED_AT, NODE, analysed

pytestmark = pytest.mark.unit

LONGEST = "Universitätsklinikum Hamburg-Eppendorf, Diagnostische Radiologie"  # 64 characters


@pytest.mark.parametrize("name", [LONGEST + ".", "North\\South Hospital", "St. Elsewhere\nRadiology"])
def test_an_institution_name_no_result_can_carry_is_refused(name: str) -> None:
    """A 65-character name or one with a backslash was accepted, and highdicom then refused every SR
    ("Long String (LO) must not exceed 64 characters"): every study failed."""
    with pytest.raises(ValidationError, match="institution_name"):
        NodeSettings(institution_name=name)


def test_the_longest_institution_name_accepted_is_one_a_result_carries() -> None:
    assert len(LONGEST) == 64
    settings = NodeSettings(institution_name=f"  {LONGEST} ")
    assert settings.institution_name == LONGEST
    node = dataclasses.replace(NODE, institution_name=settings.institution_name)
    image = analysed(with_preview=False, with_heatmap=False)
    sr = build_sr([image], node, series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
                  analysed_at=ANALYSED_AT)
    assert sr.InstitutionName == LONGEST
