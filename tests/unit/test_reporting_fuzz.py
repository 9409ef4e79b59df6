"""Results under any header: a PACS's odd values never cost a study its SR and PDF.

The header values are set as a file carries them (raw bytes, read only when used), in any character set,
so the builders meet what pydicom makes of them: text, a name with a backslash that reads as several
values, an Instance Number of 1e999 that no reader can take. Every case must still give an SR and an
Encapsulated PDF that can be written, or a :class:`ReportingError` that says why.
"""

from __future__ import annotations

import io

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from reporting.encapsulated import build_encapsulated_pdf
from reporting.errors import ReportingError
from reporting.pdf import build_pdf
from reporting.secondary_capture import build_heatmap_sc
from reporting.sr import build_sr
from tests.node_datasets import set_raw
from tests.unit.test_reporting_cases import ANALYSED_AT, NODE, analysed, radiograph

pytestmark = pytest.mark.unit

KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDescription", "InstitutionName",
    "SeriesNumber", "InstanceNumber", "BodyPartExamined", "ViewPosition", "Laterality",
)  # fmt: skip
VALUES = st.one_of(
    st.text(max_size=80),
    st.sampled_from([
        "", " ", "\\", "A\\B\\C", "^^^^", "=^=", "20241350", "1970", "256199", "-1", "1e999", "abc",
        "Müller^Zoë", "山田^太郎", "\x00", "x" * 200,
    ]),
)  # fmt: skip
CHARACTER_SETS = (None, "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87", "GB18030", "ISO_IR 6", "BOGUS")


@st.composite
def sources(draw: st.DrawFn) -> pydicom.Dataset:
    ds = radiograph()
    character_set = draw(st.sampled_from(CHARACTER_SETS))
    if character_set is not None:
        set_raw(ds, "SpecificCharacterSet", character_set.encode())
    for keyword in draw(st.lists(st.sampled_from(KEYWORDS), max_size=6, unique=True)):
        set_raw(ds, keyword, draw(VALUES).encode("utf-8", "replace"))
    return ds


def _written(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every invalid value: by design
@settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(sources())
def test_any_header_gives_an_sr_and_a_pdf_or_a_reporting_error(source: pydicom.Dataset) -> None:
    image = analysed(source, with_preview=False, with_heatmap=False)
    try:
        sr = build_sr([image], NODE, series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
                      analysed_at=ANALYSED_AT)  # fmt: skip
        pdf = build_pdf([image], NODE, analysed_at=ANALYSED_AT)
        document = build_encapsulated_pdf(pdf, source, NODE, series_instance_uid=generate_uid(),
                                          sop_instance_uid=generate_uid())  # fmt: skip
    except ReportingError as exc:
        assert str(exc)
        return
    assert _written(sr) and _written(document) and pdf.startswith(b"%PDF-")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every invalid value: by design
@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(sources())
def test_any_header_gives_a_heat_map_secondary_capture_or_a_reporting_error(source: pydicom.Dataset) -> None:
    try:
        capture = build_heatmap_sc(analysed(source), NODE, series_instance_uid=generate_uid(),
                                   sop_instance_uid=generate_uid())  # fmt: skip
    except ReportingError as exc:
        assert str(exc)
        return
    assert _written(capture)


def test_a_name_that_reads_as_several_values_and_a_number_too_large_still_give_results() -> None:
    source = radiograph()
    set_raw(source, "PatientName", b"Doe^John\\Roe^Richard")  # a backslash in a name splits it
    set_raw(source, "InstanceNumber", b"1e999")  # no reader can take it; it is left out
    image = analysed(source, with_preview=False, with_heatmap=False)
    sr = build_sr([image], NODE, series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
                  analysed_at=ANALYSED_AT)  # fmt: skip
    assert list(sr.PatientName) == ["Doe^John", "Roe^Richard"]  # as the PACS holds it, for its matching
    assert build_pdf([image], NODE, analysed_at=ANALYSED_AT).startswith(b"%PDF-")
