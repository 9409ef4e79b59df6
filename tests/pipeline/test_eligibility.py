"""Which images the classifier sees: frontal chest CR/DX only, everything else SKIPPED with a reason."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

from dicom_node.eligibility import assess, assess_dataset
from tests import peers

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("modality", "body_part", "view"),
    [("CR", "CHEST", "PA"), ("DX", "CHEST", "AP"), ("CR", "", ""), ("dx", "chest", "pa"), ("DX", "", "AP")],
)
def test_frontal_chest_radiographs_are_eligible(modality: str, body_part: str, view: str) -> None:
    sop_class = DigitalXRayImageStorageForPresentation if modality.upper() == "DX" else ComputedRadiographyImageStorage
    assert assess(modality=modality, body_part=body_part, view_position=view, sop_class_uid=sop_class).eligible


@pytest.mark.parametrize(
    ("modality", "body_part", "view", "reason"),
    [
        ("CT", "CHEST", "", "modality CT is not CR or DX"),
        ("OT", "", "", "modality OT is not CR or DX"),
        ("", "", "", "modality (none) is not CR or DX"),
        ("CR", "EXTREMITY", "AP", "body part EXTREMITY is not CHEST"),
        ("DX", "CHEST", "LL", "view position LL is not frontal (PA/AP)"),
        ("DX", "CHEST", "LATERAL", "view position LATERAL is not frontal (PA/AP)"),
    ],
)
def test_other_images_are_skipped_with_a_readable_reason(modality: str, body_part: str, view: str, reason: str) -> None:
    verdict = assess(
        modality=modality, body_part=body_part, view_position=view, sop_class_uid=ComputedRadiographyImageStorage
    )
    assert not verdict.eligible
    assert verdict.reason == reason


def test_a_dx_image_for_processing_is_not_classified() -> None:
    verdict = assess(
        modality="DX", body_part="CHEST", view_position="PA", sop_class_uid=DigitalXRayImageStorageForProcessing
    )
    assert not verdict.eligible
    assert verdict.reason == "a DX image for processing (raw detector data), not for presentation"


def test_real_radiographs_from_pydicom_data() -> None:
    def verdict(name: str) -> tuple[bool, str]:
        result = assess_dataset(pydicom.dcmread(peers.pydicom_data_file(name), stop_before_pixels=True))
        return result.eligible, result.reason

    assert verdict("RG1_UNCI.dcm") == (True, "")
    assert verdict("RG3_UNCI.dcm") == (False, "body part EXTREMITY is not CHEST")
