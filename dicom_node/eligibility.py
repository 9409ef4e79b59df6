"""Which received images the classifier may look at.

The models were trained on frontal chest radiographs (CR/DX, PA or AP) of adults. Anything else is stored
and acknowledged, but SKIPPED with a reason a user can read in the console — never silently classified.
Absent attributes are accepted: many modalities leave Body Part Examined or View Position empty, and many
sites remove the birth date.
A child is recognised by Patient Age (0010,1010) or, without it, by Patient's Birth Date and Study Date:
the default model calls most radiographs of young children COVID-19 (model card, "Images from other
sources"), so a patient younger than ``pipeline.minimum_patient_age_years`` (18 by default) is not
classified. The reason names the limit, never the patient's age. A header that gives no age at all (no
Patient Age, no birth date: many anonymised archives) is classified with a caution the PDF, the SR and
the console show (:meth:`AgePolicy.cautions`), or skipped when ``pipeline.skip_unknown_age`` is set.
A DX image *for processing* (raw detector values, before the vendor's image processing) is stored for the
record but not classified: the models only ever saw images processed for display.

The header can be wrong or empty, so the pixels are checked too: an image the model's novelty check
(:mod:`classifier.novelty`) finds unlike every training image is skipped the same way, and so is one that
looks the wrong way up once turned head up by its Patient Orientation, or like a negative
(``Prediction.doubt`` says why), unless ``pipeline.skip_unfamiliar`` is off: the finding then carries that
caution to the console, PDF and SR.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime

import pydicom
from pydicom.uid import DigitalXRayImageStorageForProcessing

from classifier.preprocess import number_of_frames
from dicom_node.settings import ADULT_AGE_YEARS, PipelineSettings
from dicom_node.sop_classes import not_an_image
from dicom_node.store.models import Instance, Study

ELIGIBLE_MODALITIES = frozenset({"CR", "DX"})
CHEST_BODY_PARTS = frozenset({"CHEST"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
# Age String (AS): three digits and a unit; lenient about padding and case, as senders are, and about a
# missing unit, read as years: every one of the 26,684 CR headers of the RSNA Pneumonia Detection Challenge
# (torchxrayvision's kaggle_stage_2_train_images_dicom_headers.csv.gz) gives a bare number ("58", "7").
_AGE_STRING = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_YEARS_PER_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}
#: Older than this, an age is a placeholder (a Study Date of 99991231, an age of "999Y"), not a patient's.
OLDEST_PLAUSIBLE_AGE_YEARS = 130


@dataclass(frozen=True)
class Eligibility:
    """The verdict for one image; ``reason`` says why it is not analysed (empty when eligible), for the
    console and the database. ``check`` names the check that refused it without the header's values, for
    the log: a site may write free text into a coded attribute (a name in Body Part Examined)."""

    eligible: bool
    reason: str = ""
    check: str = ""


MODEL_SCOPE = "The model reads frontal chest radiographs (CR/DX, PA/AP) of adults only."
UNKNOWN_AGE = "the header gives no patient age (no Patient Age, no Patient's Birth Date with a Study Date)"


@dataclass(frozen=True)
class AgePolicy:
    """Whom the node classifies by age: ``pipeline.minimum_patient_age_years`` (0: every age) and
    ``pipeline.skip_unknown_age`` (a header without an age: skipped, or classified with a caution)."""

    minimum_years: float = ADULT_AGE_YEARS
    skip_unknown: bool = False

    @classmethod
    def of(cls, pipeline: PipelineSettings) -> AgePolicy:
        return cls(minimum_years=pipeline.minimum_patient_age_years, skip_unknown=pipeline.skip_unknown_age)

    def refusal(self, age_years: float | None) -> str | None:
        """Why a patient of this age (None: unknown) is not classified; None: they are."""
        if self.minimum_years <= 0:
            return None
        if age_years is None:
            return UNKNOWN_AGE if self.skip_unknown else None
        if age_years < self.minimum_years:
            return f"the patient is younger than {self.minimum_years:g} years by Patient Age or Birth Date"
        return None

    def cautions(self, age_years: float | None) -> bool:
        """Whether a classified image carries the unknown-age caution: the header gives no age and the
        node was asked to check it (a site that classifies every age has chosen so)."""
        return age_years is None and self.minimum_years > 0 and not self.skip_unknown


DEFAULT_AGE_POLICY = AgePolicy()  # adults by the header; a header without an age classified with a caution


def not_classified(reason: str) -> str:
    """The sentence the console shows for an image it will not classify, whichever check refused it."""
    return f"Not classified: {reason}. {MODEL_SCOPE}"


def _date(value: str) -> date | None:
    try:
        return datetime.strptime((value or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _birthday(born: date, year: int) -> date:
    """``born``'s birthday in ``year``: 1 March in a common year for 29 February, the last day a date
    can hold for a year past 9999."""
    if year > date.max.year:
        return date.max
    try:
        return born.replace(year=year)
    except ValueError:  # born on 29 February, a common year
        return date(year, 3, 1)


def age_in_years(*, patient_age: str = "", birth_date: str = "", study_date: str = "") -> float | None:
    """The patient's age at the examination: Patient Age (AS, e.g. "004Y", "018M"; a bare "58" is years)
    or, without a readable one, the years from Patient's Birth Date to Study Date. None when neither says,
    when they contradict themselves (a birth after the study) or when the age is past
    :data:`OLDEST_PLAUSIBLE_AGE_YEARS` (a placeholder date)."""
    match = _AGE_STRING.match(patient_age or "")
    if match:
        stated = int(match.group(1)) * _YEARS_PER_UNIT[match.group(2).upper()]
        return stated if stated <= OLDEST_PLAUSIBLE_AGE_YEARS else None
    born, examined = _date(birth_date), _date(study_date)
    if born is None or examined is None or examined < born:
        return None
    years = examined.year - born.year - ((examined.month, examined.day) < (born.month, born.day))
    if years > OLDEST_PLAUSIBLE_AGE_YEARS:
        return None
    last, following = _birthday(born, born.year + years), _birthday(born, born.year + years + 1)
    span = (following - last).days
    return years + (examined - last).days / span if span > 0 else float(years)


def assess(
    *,
    modality: str,
    body_part: str,
    view_position: str,
    sop_class_uid: str,
    age_years: float | None = None,
    ages: AgePolicy = DEFAULT_AGE_POLICY,
) -> Eligibility:
    """Decide from the header values (already read from the dataset or the database); ``age_years`` is
    :func:`age_in_years` (None: unknown), judged by ``ages``."""
    modality = (modality or "").strip().upper()
    body_part = (body_part or "").strip().upper()
    view = (view_position or "").strip().upper()
    not_image = not_an_image(sop_class_uid)
    if not_image is not None:  # a dose SR, a report, a PDF: stored for the study, never analysed
        return Eligibility(False, not_image, "not an image")
    if modality not in ELIGIBLE_MODALITIES:
        return Eligibility(False, f"modality {modality or '(none)'} is not CR or DX", "modality")
    if (sop_class_uid or "").strip() == DigitalXRayImageStorageForProcessing:
        reason = "a DX image for processing (raw detector data), not for presentation"
        return Eligibility(False, reason, "for processing")
    if body_part and body_part not in CHEST_BODY_PARTS:
        return Eligibility(False, f"body part {body_part} is not CHEST", "body part")
    if view and view not in FRONTAL_VIEWS:
        return Eligibility(False, f"view position {view} is not frontal (PA/AP)", "view position")
    refusal = ages.refusal(age_years)
    if refusal is not None:
        return Eligibility(False, refusal, "patient age")
    return Eligibility(True)


def study_age(study: Study) -> float | None:
    """The patient's age at a stored study, from its own and its patient's rows (None: unknown)."""
    return age_in_years(
        patient_age=study.patient_age, birth_date=study.patient.birth_date, study_date=study.study_date
    )


def assess_instance(instance: Instance, *, ages: AgePolicy = DEFAULT_AGE_POLICY) -> Eligibility:
    """Decide for a stored instance from its own, its series', study's and patient's rows."""
    series = instance.series
    return assess(
        modality=series.modality,
        body_part=series.body_part_examined,
        view_position=instance.view_position,
        sop_class_uid=instance.sop_class_uid,
        age_years=study_age(series.study),
        ages=ages,
    )


def _header(dataset: pydicom.Dataset, keyword: str) -> str:
    return str(dataset.get(keyword, "") or "")


def dataset_age(dataset: pydicom.Dataset) -> float | None:
    """The patient's age at the examination by a dataset's own header (None: unknown)."""
    return age_in_years(
        patient_age=_header(dataset, "PatientAge"),
        birth_date=_header(dataset, "PatientBirthDate"),
        study_date=_header(dataset, "StudyDate"),
    )


def assess_dataset(dataset: pydicom.Dataset, *, ages: AgePolicy = DEFAULT_AGE_POLICY) -> Eligibility:
    """Decide from a dataset's own header (an upload in the console, before anything is stored)."""
    verdict = assess(
        modality=_header(dataset, "Modality"),
        body_part=_header(dataset, "BodyPartExamined"),
        view_position=_header(dataset, "ViewPosition"),
        sop_class_uid=_header(dataset, "SOPClassUID"),
        age_years=dataset_age(dataset),
        ages=ages,
    )
    refusal = frames_refusal(dataset) if verdict.eligible else None
    return verdict if refusal is None else Eligibility(False, refusal, "frames")


def frames_refusal(dataset: pydicom.Dataset) -> str | None:
    """Why a multi-frame image is not classified (None: it has one frame). The model reads one radiograph;
    classifying only the first frame of several, without a word of it in the results, would let a reader
    take the finding for all of them. CR and DX images have one frame; several mean something else."""
    frames = number_of_frames(dataset)  # an unreadable count is 1: the decoder decides
    if frames <= 1:
        return None
    return f"a multi-frame image ({frames} frames); the model reads single radiographs"
