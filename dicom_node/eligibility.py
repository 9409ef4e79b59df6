"""Which received images the classifier may look at.

The models were trained on frontal chest radiographs (CR/DX, PA or AP). Anything else is stored and
acknowledged, but SKIPPED with a reason a user can read in the console — never silently classified.
Absent attributes are accepted: many modalities leave Body Part Examined or View Position empty.
A DX image *for processing* (raw detector values, before the vendor's image processing) is stored for the
record but not classified: the models only ever saw images processed for display.

The header can be wrong or empty, so the pixels are checked too: an image the model's novelty check
(:mod:`classifier.novelty`) finds unlike every training image is skipped the same way, and so is one that
looks the wrong way up once turned head up by its Patient Orientation, or like a negative
(``Prediction.doubt`` says why), unless ``pipeline.skip_unfamiliar`` is off: the finding then carries that
caution to the console, PDF and SR.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom
from pydicom.uid import DigitalXRayImageStorageForProcessing

from dicom_node.store.models import Instance

ELIGIBLE_MODALITIES = frozenset({"CR", "DX"})
CHEST_BODY_PARTS = frozenset({"CHEST"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})


@dataclass(frozen=True)
class Eligibility:
    """The verdict for one image; ``reason`` says why it is not analysed (empty when eligible)."""

    eligible: bool
    reason: str = ""


MODEL_SCOPE = "The model reads frontal chest radiographs (CR/DX, PA/AP) only."


def not_classified(reason: str) -> str:
    """The sentence the console shows for an image it will not classify, whichever check refused it."""
    return f"Not classified: {reason}. {MODEL_SCOPE}"


def assess(*, modality: str, body_part: str, view_position: str, sop_class_uid: str) -> Eligibility:
    """Decide from four header values (already read from the dataset or the database)."""
    modality = (modality or "").strip().upper()
    body_part = (body_part or "").strip().upper()
    view = (view_position or "").strip().upper()
    if modality not in ELIGIBLE_MODALITIES:
        return Eligibility(False, f"modality {modality or '(none)'} is not CR or DX")
    if (sop_class_uid or "").strip() == DigitalXRayImageStorageForProcessing:
        return Eligibility(False, "a DX image for processing (raw detector data), not for presentation")
    if body_part and body_part not in CHEST_BODY_PARTS:
        return Eligibility(False, f"body part {body_part} is not CHEST")
    if view and view not in FRONTAL_VIEWS:
        return Eligibility(False, f"view position {view} is not frontal (PA/AP)")
    return Eligibility(True)


def assess_instance(instance: Instance) -> Eligibility:
    """Decide for a stored instance from its own and its series' rows."""
    series = instance.series
    return assess(
        modality=series.modality,
        body_part=series.body_part_examined,
        view_position=instance.view_position,
        sop_class_uid=instance.sop_class_uid,
    )


def assess_dataset(dataset: pydicom.Dataset) -> Eligibility:
    """Decide from a dataset's own header (an upload in the console, before anything is stored)."""
    return assess(
        modality=str(dataset.get("Modality", "") or ""),
        body_part=str(dataset.get("BodyPartExamined", "") or ""),
        view_position=str(dataset.get("ViewPosition", "") or ""),
        sop_class_uid=str(dataset.get("SOPClassUID", "") or ""),
    )
