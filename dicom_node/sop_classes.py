"""The storage SOP classes the node accepts, and which of them it analyses.

Images (CR, DX, Secondary Capture) are stored and, when eligible, classified. The non-image objects a chest
study also holds — a modality's X-Ray Radiation Dose SR, a radiologist's report, a key object selection, a
PDF, a presentation state, and the node's own SR and Encapsulated PDF coming back in a study-level send —
are accepted too, because a PACS sending a whole study (Orthanc's ``/modalities/.../store``, a viewer's
C-MOVE) aborts the whole transfer when one presentation context is refused. They are stored, never
analysed; the node's own results are recognised and not stored again.
"""

from __future__ import annotations

from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ExtensibleSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
)

#: Image storage SOP classes: chest radiography and its secondary captures. Their pixel data is checked
#: on receipt and they are assessed for classification.
IMAGE_SOP_CLASSES: tuple[UID, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

#: Non-image storage SOP classes: stored without pixel checks, SKIPPED as "not an image", never analysed.
NON_IMAGE_SOP_CLASSES: tuple[UID, ...] = (
    BasicTextSRStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    ExtensibleSRStorage,
    XRayRadiationDoseSRStorage,
    KeyObjectSelectionDocumentStorage,
    EncapsulatedPDFStorage,
    GrayscaleSoftcopyPresentationStateStorage,
)

ACCEPTED_SOP_CLASSES: tuple[UID, ...] = IMAGE_SOP_CLASSES + NON_IMAGE_SOP_CLASSES

#: Transfer syntaxes accepted for the non-image classes: uncompressed and deflated (they have no pixel
#: data a compression would apply to).
NON_IMAGE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

#: The SOP class of each kind of result object the node makes (keys: :class:`ResultKind` values).
RESULT_SOP_CLASSES: dict[str, UID] = {
    "sr": Comprehensive3DSRStorage,
    "pdf": EncapsulatedPDFStorage,
    "heatmap_sc": SecondaryCaptureImageStorage,
}

_NON_IMAGE = frozenset(NON_IMAGE_SOP_CLASSES)


def is_image(sop_class_uid: str) -> bool:
    """Whether instances of this class are images the node may analyse (anything not a known non-image
    class counts as one: the pixel checks then decide)."""
    return (sop_class_uid or "").strip() not in _NON_IMAGE


def not_an_image(sop_class_uid: str) -> str | None:
    """Why an instance of this SOP class is not analysed (None: it is an image), naming the class."""
    uid = UID((sop_class_uid or "").strip())
    if uid not in _NON_IMAGE:
        return None
    return f"not an image ({uid.name}): not analysed"
