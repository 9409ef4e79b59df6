"""Facts about the analysed study shared by every result object (one study per result)."""

from __future__ import annotations

import copy
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone

from highdicom import PatientSexValues
from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.valuerep import DA, DT, TM

from classifier.types import ModelInfo
from reporting.errors import InconsistentStudyError
from reporting.types import AnalysedImage, Revision

UTF8 = "ISO_IR 192"  # Specific Character Set of every object we write: any patient name encodes

# Type 2 attributes of the Patient and General Study modules: present in every result, empty when unknown.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_FIRST_BULK_GROUP = Tag(0x6000, 0x0000)  # overlays, pixel data and padding are never needed here


def _single(value: object) -> object:
    """``value`` if it is one value; a name written with a backslash reads as several."""
    if isinstance(value, MultiValue):
        raise ValueError("more than one value")
    return value


def _with_caret(value: object) -> object:
    """A name of one component ("ward", "ANONYMOUS") is valid DICOM, but highdicom's Secondary Capture
    warns about it, quoting the name (a WARNING line for every study from such a sender): taken out and
    put back as it is, like the values highdicom refuses."""
    if "^" not in str(value):
        raise ValueError("a name of one component")
    return value


# What highdicom parses when it builds an object from a source header. Real headers carry values it
# refuses (Patient's Sex "U", a birth "date" of 1970, an hour of 25, a name that reads as two), and one of
# them would stop the result.
_PARSED_BY_HIGHDICOM: dict[str, Callable[[object], object]] = {
    "PatientSex": lambda value: PatientSexValues(str(value)),
    "PatientBirthDate": lambda value: DA(str(value)),
    "StudyDate": lambda value: DA(str(value)),
    "StudyTime": lambda value: TM(str(value)),
    "PatientName": lambda value: _with_caret(_single(value)),
    "ReferringPhysicianName": lambda value: _with_caret(_single(value)),
}

LOGGER = logging.getLogger(__name__)


def check_one_study(images: Sequence[AnalysedImage]) -> str:
    """Study Instance UID shared by ``images``; results never mix studies."""
    if not images:
        raise InconsistentStudyError("no analysed images")
    uids = {str(image.source.get("StudyInstanceUID", "")) for image in images}
    if len(uids) != 1 or "" in uids:
        raise InconsistentStudyError(f"analysed images span {len(uids)} studies or lack a Study Instance UID")
    return uids.pop()


def distinct_models(images: Sequence[AnalysedImage]) -> list[ModelInfo]:
    """The models behind the results, each once, in order of first use."""
    models: dict[tuple[str, str], ModelInfo] = {}
    for image in images:
        model = image.prediction.model
        models.setdefault((model.name, model.version), model)
    return list(models.values())


def header(source: Dataset) -> Dataset:
    """A copy of ``source`` without bulk data, with missing Type 2 patient/study attributes present but empty,
    declared UTF-8.

    Builders read identifiers from it without touching the caller's dataset or copying its pixels.
    """
    result = _decoded(source, top=True)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in result:
            setattr(result, keyword, None)
    # values are already decoded text; whatever the source's encoding (e.g. ISO 2022 IR 87), ours is UTF-8
    result.SpecificCharacterSet = UTF8
    return result


_PATIENT_AND_STUDY_IES = ("Patient", "Study")


def patient_and_study(source: Dataset) -> Dataset:
    """The root attributes of ``source``'s Patient and Study modules (Patient, General Study, Patient
    Study, Clinical Trial ...), those a result copies from its first source, as :func:`header` gives them:
    decoded, to be written as UTF-8. Empty for a SOP Class highdicom does not know."""
    iod = get_sop_class_iod_map().get(str(source.get("SOPClassUID", "")))
    result = Dataset()
    if iod is None:
        return result
    decoded = header(source)
    attributes = get_module_attribute_map()
    for module in get_iod_module_map()[iod]:
        if module["ie"] not in _PATIENT_AND_STUDY_IES:
            continue
        for attribute in attributes[module["key"]]:
            keyword = str(attribute["keyword"])
            if not attribute["path"] and keyword in source and keyword in decoded:
                result[keyword] = decoded[keyword]
    return result


def _decoded(source: Dataset, *, top: bool = False) -> Dataset:
    """A copy of ``source`` whose every text value, in sequence items too, is decoded in the source's
    character set, so that the copy can be declared UTF-8. A deep copy alone keeps the items' elements
    as they were read: still in their bytes (Latin-1, ISO 2022 escapes), under a UTF-8 label."""
    result = Dataset()
    for tag in source.keys():
        if top and tag >= _FIRST_BULK_GROUP:
            continue
        try:
            element = source[tag]  # decoded in the source's (or the enclosing item's) character set
            if element.VR == "SQ":
                items = [_decoded(item) for item in element.value or []]
        except (ValueError, TypeError, OverflowError, LookupError, NotImplementedError, UnicodeError) as exc:
            # a value no reader can take (an Instance Number of 1e999, a garbled VR): left out, not fatal
            LOGGER.warning("source element %s unreadable (%s); left out of the result", tag, type(exc).__name__)
            continue
        if element.VR == "SQ":
            result.add(DataElement(element.tag, "SQ", DicomSequence(items)))
        else:
            result.add(copy.deepcopy(element))
    if not top and "SpecificCharacterSet" in result:  # an item's own character set (PS3.5 6.1.2.5.1)
        result.SpecificCharacterSet = UTF8
    return result


def header_for_highdicom(source: Dataset) -> tuple[Dataset, dict[str, object]]:
    """:func:`header` with the values highdicom cannot parse emptied, and those values by keyword.

    Give the values back with :func:`put_back` once highdicom has built the object: a result carries the
    study's patient and study attributes exactly as the PACS holds them, or the PACS may see a conflict.
    """
    result = header(source)
    refused: dict[str, object] = {}
    for keyword, parse in _PARSED_BY_HIGHDICOM.items():
        value = result.get(keyword)
        if value is None or value == "":
            continue
        try:
            parse(value)
        except (ValueError, TypeError, OverflowError):
            refused[keyword] = value
            setattr(result, keyword, None)
    return result, refused


def put_back(ds: Dataset, refused: Mapping[str, object]) -> None:
    """Restore the source's own values that :func:`header_for_highdicom` took out (logged once per object
    built, by keyword: the values themselves are patient data)."""
    if refused:
        LOGGER.info("source header values highdicom refuses, copied as they are: %s", ", ".join(sorted(refused)))
    for keyword, value in refused.items():
        setattr(ds, keyword, value)


def derived_uid(*parts: str) -> str:
    """A UID that is a pure function of ``parts``.

    Rebuilding a result (after a crash, for a re-send) must give the same object, so nothing inside it is
    random: its own UIDs are passed in, and the UIDs it mints are derived from them or from the images
    it reports on.
    """
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, chr(0).join(parts)).int}"  # name-based UUID (PS3.5 B.2)


def dicom_date(moment: datetime) -> DA:
    return DA(moment.strftime("%Y%m%d"))


def dicom_time(moment: datetime) -> TM:
    return TM(moment.strftime("%H%M%S"))


def dicom_datetime(moment: datetime) -> DT:
    """Seconds precision, no offset (Timezone Offset From UTC carries it)."""
    return DT(moment.strftime("%Y%m%d%H%M%S"))


FIRST = Revision()
SERIES_NUMBER_STEP = 10  # revision n of an object first in series 9001 is in series 9001 + 10 (n - 1)
LO_LENGTH = 64  # Series Description (LO): at most 64 characters


def revision_series_number(first: int, revision: Revision) -> int:
    """The Series Number of ``revision`` of an object whose first revision has ``first``.

    Each revision is a series of its own (a Series Description is the whole series'), numbered after the
    earlier ones: viewers list a study's series by Series Number, so the latest revision comes last
    wherever the earlier one is shown, and no two series of the study share a number. The last digit
    still tells the kind of object (1 SR, 2 PDF, 3 heat map)."""
    return first + SERIES_NUMBER_STEP * (max(revision.number, 1) - 1)


def revision_description(first: str, short: str, revision: Revision, source: Dataset) -> str:
    """The Series Description of ``revision``: ``first`` for the first revision; for a later one ``short``
    with the revision number and the analysis time of the report it replaces, in the study's time as
    that report's own Series Date and Time state it, e.g. "AI chest X-ray classification rev 2, replaces
    2026-11-22 18:41" (at most 64 characters, LO)."""
    if revision.number <= 1:
        return first
    suffix = f" rev {revision.number}"
    if revision.replaces is not None:
        moment, _ = in_study_time(revision.replaces, source)
        suffix += f", replaces {moment:%Y-%m-%d %H:%M}"
    return short[: max(LO_LENGTH - len(suffix), 0)].rstrip() + suffix


ACQUISITION_EQUIPMENT = "109101"  # DCM "Acquisition Equipment" (CID 7005)


def date_result(ds: Dataset, moment: datetime, offset: str | None) -> None:
    """A result object's own dates and times: instance creation, series and content at ``moment``, the
    node's Contributing Equipment items restamped, and the Timezone Offset From UTC stated or left out.
    ``moment`` and ``offset`` come from :func:`in_study_time`, so every result of a study (SR, PDF, SC)
    dates itself alike and a rebuild gives the same bytes."""
    for prefix in ("InstanceCreation", "Series", "Content"):
        setattr(ds, f"{prefix}Date", dicom_date(moment))
        setattr(ds, f"{prefix}Time", dicom_time(moment))
    _restamp_contributions(ds, moment)
    if offset is not None:
        ds.TimezoneOffsetFromUTC = offset
    elif "TimezoneOffsetFromUTC" in ds:
        del ds.TimezoneOffsetFromUTC


def _restamp_contributions(ds: Dataset, moment: datetime) -> None:
    """Contribution DateTime of the Contributing Equipment items the node adds (the algorithm, highdicom)
    set to ``moment``: highdicom stamps its own with the wall clock, and the analysis time keeps rebuilds
    identical. The modality's Acquisition Equipment item keeps the source's acquisition time, or none."""
    for item in ds.get("ContributingEquipmentSequence") or []:
        purpose = item.get("PurposeOfReferenceCodeSequence") or []
        if purpose and str(purpose[0].get("CodeValue", "")) == ACQUISITION_EQUIPMENT:
            continue
        item.ContributionDateTime = dicom_datetime(moment)


_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")


def in_study_time(moment: datetime, source: Dataset) -> tuple[datetime, str | None]:
    """``moment`` as the result's own dates and times state it, and the Timezone Offset From UTC to write.

    One offset applies to every date and time of an instance (PS3.3 C.12.1.1.8), the copied Study Date
    and Time included. A source that states its offset keeps it, and the analysis time is given in it. A
    source that does not has local times; the result then gives the analysis time in the node's local
    zone and states no offset either, rather than label the study's local time "+0000"."""
    match = _OFFSET.match(str(source.get("TimezoneOffsetFromUTC") or "").strip())
    minutes = int(match[2]) * 60 + int(match[3]) if match is not None else 0
    # PS3.5 6.2 (DA/DT offsets): -1200 to +1400; an offset outside them is not copied into a result
    if match is not None and int(match[3]) < 60 and minutes <= (14 if match[1] == "+" else 12) * 60:
        zone = timezone(timedelta(minutes=minutes if match[1] == "+" else -minutes))
        return moment.astimezone(zone), match[0]
    return moment.astimezone(), None


def timezone_offset(moment: datetime) -> str | None:
    """``+HHMM`` for an aware datetime (Timezone Offset From UTC), ``None`` for a naive one."""
    offset = moment.utcoffset()
    if offset is None:
        return None
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
