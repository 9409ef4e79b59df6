"""Which images the classifier sees: frontal chest CR/DX of adults, everything else SKIPPED with a reason."""

from __future__ import annotations

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

from dicom_node.eligibility import (
    OLDEST_PLAUSIBLE_AGE_YEARS,
    UNKNOWN_AGE,
    AgePolicy,
    age_in_years,
    assess,
    assess_dataset,
)
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


@pytest.mark.parametrize(
    ("patient_age", "years"),
    [
        ("004Y", 4.0), ("018M", 1.5), ("026W", 0.498), ("073D", 0.2), ("45y", 45.0), (" 090Y ", 90.0),
        ("58", 58.0), ("7", 7.0),  # no unit, as in the RSNA Pneumonia Detection Challenge's CR headers: years
    ],
)  # fmt: skip
def test_patient_age_is_read_in_every_unit(patient_age: str, years: float) -> None:
    assert age_in_years(patient_age=patient_age) == pytest.approx(years, abs=1e-3)


@pytest.mark.parametrize(
    ("birth_date", "study_date", "years"),
    [
        ("20000101", "20180101", 18.0),
        ("20010101", "20181231", 17.997),  # a day before the 18th birthday: still 17
        ("20040229", "20220228", 17.997),  # born on 29 February: of age on 1 March of a common year
        ("20040229", "20220301", 18.0),
        ("19400305", "20040826", 64.477),  # RG1: 174 days after the 64th birthday
    ],
)
def test_without_patient_age_the_age_is_counted_in_calendar_years(
    birth_date: str, study_date: str, years: float
) -> None:
    assert age_in_years(birth_date=birth_date, study_date=study_date) == pytest.approx(years, abs=1e-3)


@pytest.mark.parametrize(
    ("patient_age", "birth_date", "study_date"),
    [
        ("", "", ""),
        ("", "20000101", ""),  # no study date
        ("", "20200101", "20100101"),  # born after the study
        ("", "2000", "20180101"),  # not a DA
        ("old", "", ""),
        ("", "20000229", "99991231"),  # a placeholder study date: once a ValueError (year 10000)
        ("999Y", "", ""),  # the largest age string, a placeholder
        ("", "18500101", "20240101"),  # 174 years
    ],
)
def test_an_age_the_header_does_not_give_is_unknown(
    patient_age: str, birth_date: str, study_date: str
) -> None:
    assert age_in_years(patient_age=patient_age, birth_date=birth_date, study_date=study_date) is None


def test_a_birth_on_the_last_day_a_date_can_hold_is_counted_without_error() -> None:
    assert age_in_years(birth_date="99991231", study_date="99991231") == 0.0  # once year 10000's ValueError


def test_patient_age_takes_precedence_over_the_birth_date() -> None:
    assert age_in_years(patient_age="030Y", birth_date="20100101", study_date="20200101") == 30.0
    unreadable = age_in_years(patient_age="years", birth_date="20100101", study_date="20200101")
    assert unreadable == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("age", "minimum", "eligible"),
    [(4.0, 18.0, False), (17.99, 18.0, False), (18.0, 18.0, True), (64.0, 18.0, True), (None, 18.0, True),
     (4.0, 0.0, True), (15.0, 12.0, True)],
)  # fmt: skip
def test_patients_younger_than_the_minimum_are_skipped(
    age: float | None, minimum: float, eligible: bool
) -> None:
    verdict = assess(
        modality="CR", body_part="CHEST", view_position="PA", sop_class_uid=ComputedRadiographyImageStorage,
        age_years=age, ages=AgePolicy(minimum_years=minimum),
    )  # fmt: skip
    assert verdict.eligible is eligible
    if not eligible:
        assert verdict.reason == f"the patient is younger than {minimum:g} years by Patient Age or Birth Date"


@pytest.mark.parametrize(
    ("policy", "refused", "cautioned"),
    [(AgePolicy(), False, True), (AgePolicy(skip_unknown=True), True, False),
     (AgePolicy(minimum_years=0), False, False),
     (AgePolicy(minimum_years=0, skip_unknown=True), False, False)],
)  # fmt: skip
def test_an_unknown_age_is_classified_with_a_caution_or_skipped(
    policy: AgePolicy, refused: bool, cautioned: bool
) -> None:
    """A site that classifies every age (minimum 0) has chosen so: no caution, nothing skipped."""
    verdict = assess(
        modality="CR", body_part="CHEST", view_position="PA", sop_class_uid=ComputedRadiographyImageStorage,
        age_years=None, ages=policy,
    )  # fmt: skip
    assert verdict.eligible is not refused
    assert verdict.reason == (UNKNOWN_AGE if refused else "")
    assert policy.cautions(None) is cautioned
    assert not policy.cautions(64.0) and not policy.cautions(4.0)


def test_a_real_cr_of_a_child_is_skipped_and_the_reason_names_no_age() -> None:
    ds = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"), stop_before_pixels=True)
    assert assess_dataset(ds).eligible  # born 1940, examined 2004
    ds.PatientAge = "007Y"
    verdict = assess_dataset(ds)
    assert not verdict.eligible
    assert "7" not in verdict.reason
    assert assess_dataset(ds, ages=AgePolicy(minimum_years=0)).eligible
    with pytest.warns(UserWarning, match="Invalid value for VR AS"):  # no unit: not a valid AS, yet seen
        ds["PatientAge"].value = "7"  # (RSNA Pneumonia Detection Challenge): read as years
    assert not assess_dataset(ds).eligible
    del ds.PatientAge
    ds.PatientBirthDate = "19990101"
    assert not assess_dataset(ds).eligible


@settings(max_examples=400)
@given(
    patient_age=st.one_of(st.text(max_size=6), st.from_regex(r"\A\d{1,3}[DWMY]?\Z")),
    birth_date=st.one_of(st.text(max_size=10), st.from_regex(r"\A\d{8}\Z")),
    study_date=st.one_of(st.text(max_size=10), st.from_regex(r"\A\d{8}\Z")),
)
def test_any_age_header_gives_a_plausible_age_or_none(patient_age: str, birth_date: str, study_date: str) -> None:
    """Whatever a header holds, the age policy gets an age a patient can have, or "unknown"."""
    years = age_in_years(patient_age=patient_age, birth_date=birth_date, study_date=study_date)
    assert years is None or 0.0 <= years <= OLDEST_PLAUSIBLE_AGE_YEARS
