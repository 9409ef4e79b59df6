"""Which DICOM attribute each header column of the received-object tables holds: one table, read both ways.

Ingest fills a new row's header columns from the received data set (`values`). A result made after an
image's pixel file was removed by retention rebuilds that image's header from its rows (`restore`), so
the SR and PDF still name the patient and study the PACS files them under. Keeping the two directions on
one table means a column added for one cannot be forgotten by the other.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from pydicom import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import Integer, String, Table

from dicom_node.store.models import Base

LOGGER = logging.getLogger(__name__)

# (column, DICOM keywords): the first keyword with a value fills the column; `restore` writes the first.
Columns = tuple[tuple[str, tuple[str, ...]], ...]

PATIENT_IDENTITY: Columns = (("patient_id", ("PatientID",)), ("issuer_of_patient_id", ("IssuerOfPatientID",)))
PATIENT_DEMOGRAPHICS: Columns = (
    ("name", ("PatientName",)),
    ("birth_date", ("PatientBirthDate",)),
    ("sex", ("PatientSex",)),
)
STUDY: Columns = (
    ("accession_number", ("AccessionNumber",)),
    ("study_date", ("StudyDate",)),
    ("patient_age", ("PatientAge",)),
    ("study_time", ("StudyTime",)),
    ("study_id", ("StudyID",)),
    ("timezone_offset", ("TimezoneOffsetFromUTC",)),
    ("study_description", ("StudyDescription",)),
    ("referring_physician_name", ("ReferringPhysicianName",)),
)
SERIES: Columns = (
    ("modality", ("Modality",)),
    ("series_number", ("SeriesNumber",)),
    ("body_part_examined", ("BodyPartExamined",)),
    ("series_description", ("SeriesDescription",)),
)
INSTANCE: Columns = (
    ("instance_number", ("InstanceNumber",)),
    ("view_position", ("ViewPosition",)),
    ("image_laterality", ("ImageLaterality", "Laterality")),  # the series' Laterality when the image has none
)

_INTEGER_COLUMN = range(-(2**31), 2**31)  # SQL INTEGER, as PostgreSQL holds it


def text(ds: Dataset, keyword: str, limit: int) -> str:
    """A display value, or "" when absent or undecodable (display fields never fail an ingest). NUL
    characters, which PostgreSQL text cannot hold, are left out. Several values (a backslash in the
    value) are kept as DICOM writes them, joined by a backslash: the Python list's repr was stored,
    "['ID1', 'ID2']", a study date as "['202401"."""
    try:
        value = ds.get(keyword, "")
        if isinstance(value, MultiValue):
            value = "\\".join("" if item is None else str(item) for item in value)
        return ("" if value is None else str(value)).replace("\x00", "").strip()[:limit]
    except (ValueError, TypeError, LookupError, UnicodeError):
        LOGGER.warning("element %s could not be decoded; stored empty", keyword)
        return ""


def integer(ds: Dataset, keyword: str) -> int | None:
    """An integer value, or None when absent, not a number or past what an INTEGER column holds."""
    try:
        value = ds.get(keyword)
        number = None if value in (None, "") else int(value)
    except (TypeError, ValueError, LookupError, OverflowError):
        return None
    return number if number is None or number in _INTEGER_COLUMN else None


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


def values(ds: Dataset, model: type[Base], columns: Columns) -> dict[str, Any]:
    """The ``columns`` of ``model``'s table as ``ds`` gives them: text cut to the column's length,
    integers that the column holds (else None)."""
    table = _table(model)
    row: dict[str, Any] = {}
    for column, keywords in columns:
        kind = table.c[column].type
        value: Any = None if isinstance(kind, Integer) else ""
        for keyword in keywords:
            if isinstance(kind, Integer):
                value = integer(ds, keyword)
            else:
                value = text(ds, keyword, cast(String, kind).length or 2**16)
            if value not in (None, ""):
                break
        row[column] = value
    return row


def restore(ds: Dataset, row: object, columns: Columns) -> None:
    """Write the non-empty ``columns`` of ``row`` (an ORM object) into ``ds`` as their first keyword."""
    for column, keywords in columns:
        value = getattr(row, column)
        if value is not None and value != "":
            setattr(ds, keywords[0], value)

