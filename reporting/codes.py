"""Coded concepts of the results, and the mapping from the classifier's class labels to them.

Standard codes where they exist (checked against DICOM PS3.16 via pydicom's code dictionary, and the SNOMED CT
International release for the two disorders pydicom's dictionary predates):

- COVID-19: SCT 840539006, FSN "Disease caused by severe acute respiratory syndrome coronavirus 2 (disorder)";
  the Code Meaning is its preferred term "COVID-19" because the FSN exceeds the 64 characters of an LO.
- Pneumonia: SCT 233604007 "Pneumonia".
- Normal: SCT 17621005 "Normal" (qualifier value).
- Indeterminate: SCT 82334004 "Indeterminate" (qualifier value; DICOM CID 4220).

No standard concept exists for the binary model's "non-covid" class nor for a per-class probability, so these
use the local coding scheme :data:`LOCAL_SCHEME` (a private "99" designator, PS3.16 8.2), defined here:

- ``CXR-NONCOVID`` "No COVID-19 pattern": the binary model's negative class.
- ``CXR-P-<CLASS>`` "Probability of <finding>": the model's softmax output for that class, unit UCUM "1".
- ``CXR-UNFAMILIAR`` "Unlike the model's training images": the model's novelty check doubted the image
  (``classifier.novelty``), recorded as a (111052, DCM, "Quality Finding") when the node classified it anyway.
  An image that looked the wrong way up is recorded with the standard (130461, DCM, "Inappropriate Patient
  Orientation") instead.
- ``CXR-NEGATIVE`` "Image looks inverted (a negative)": the model's negative check found bone dark and lungs
  light, so the display polarity (Photometric Interpretation, Presentation LUT Shape) is wrong or was lost;
  recorded the same way, with this local code.
- ``CXR-AGE-UNKNOWN`` "Patient age not in the header": the node classified an image whose header gives
  neither Patient Age nor Patient's Birth Date, so it could not check the patient is an adult (the models
  were trained on adults); recorded the same way, so that a reader confirms the patient's age.
"""

from __future__ import annotations

from dataclasses import dataclass

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from classifier.types import INDETERMINATE, Doubt, Prediction, doubt_of, label_key
from reporting.errors import UnknownLabelError

LOCAL_SCHEME = "99CXRNODE"

COVID_19 = Code("840539006", "SCT", "COVID-19")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
NORMAL = Code("17621005", "SCT", "Normal")
INDETERMINATE_CODE = Code("82334004", "SCT", "Indeterminate")
NOT_COVID_19 = Code("CXR-NONCOVID", LOCAL_SCHEME, "No COVID-19 pattern")

# Concept name of the qualitative evaluation holding the result. Not (121071, DCM, "Finding"): TID 1501
# reserves that name for the group's finding type, and highdicom reads such an item as that, not as an
# evaluation.
IMAGING_FINDING = Code("365853002", "SCT", "Imaging finding")
QUALITY_FINDING: Code = codes.DCM.QualityFinding  # (111052, DCM): why the model's checks doubted the image
UNFAMILIAR = Code("CXR-UNFAMILIAR", LOCAL_SCHEME, "Unlike the model's training images")
NEGATIVE = Code("CXR-NEGATIVE", LOCAL_SCHEME, "Image looks inverted (a negative)")
WRONG_WAY_UP: Code = codes.DCM.InappropriatePatientOrientation  # (130461, DCM)
AGE_UNKNOWN = Code("CXR-AGE-UNKNOWN", LOCAL_SCHEME, "Patient age not in the header")
PROBABILITY_UNIT = codes.UCUM.NoUnits  # ("1", UCUM, "no units"): probabilities in [0, 1]
IMAGING_PROCEDURE = codes.SCT.ImagingProcedure  # (363679005, SCT, "Imaging procedure"), CID 100
LUNG = Code("39607008", "SCT", "Lung")  # finding site of every result (meaning as used in PS3.16 CIDs)
DIAGNOSTIC_IMAGING_REPORT = codes.LN.DiagnosticImagingReport  # (18748-4, LN), CID 7000 document title
# IHE RAD AI Results (AIR), Contributing Equipment purpose of reference for the AI algorithm; IHE defines it
# with a temporary code until DICOM assigns one to CID 7005.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")


@dataclass(frozen=True)
class FindingConcept:
    """A classifier label with its code and the words a radiologist reads."""

    key: str  # short upper-case id, part of the local probability code
    code: Code
    display: str  # what the radiologist reads, e.g. "COVID-19"

    @property
    def probability_code(self) -> Code:
        """Concept name of the numeric measurement holding this class's probability."""
        return Code(f"CXR-P-{self.key}"[:16], LOCAL_SCHEME, f"Probability of {self.display}")


_COVID = FindingConcept("COVID", COVID_19, "COVID-19")
_BY_LABEL: dict[str, FindingConcept] = {
    "covid": _COVID,
    "covid-19": _COVID,
    "pneumonia": FindingConcept("PNEUMONIA", PNEUMONIA, "Pneumonia"),
    "normal": FindingConcept("NORMAL", NORMAL, "Normal"),
    "non-covid": FindingConcept("NONCOVID", NOT_COVID_19, "No COVID-19 pattern"),
    INDETERMINATE: FindingConcept("INDETERMINATE", INDETERMINATE_CODE, "Indeterminate"),
}


def finding_for(label: str) -> FindingConcept:
    """The coded concept of a classifier label, compared as :func:`classifier.types.label_key` does
    (case-insensitive, "_" and " " read as "-").

    Call it for each of a model's classes when the model is loaded to reject an unknown class early.
    """
    try:
        return _BY_LABEL[label_key(label)]
    except KeyError:
        raise UnknownLabelError(f"no coded concept for class label {label!r}") from None


def private_scheme_identification(responsible_organization: str) -> list[CodingSchemeIdentificationItem]:
    """Coding Scheme Identification Sequence items declaring the private schemes an SR uses (PS3.3
    C.12.1.1.3): :data:`LOCAL_SCHEME`, and IHE's temporary one of :data:`PROCESSING_ALGORITHM` (left
    undeclared before: review)."""
    return [
        CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME,
            name="CXR node local codes (reporting/codes.py)",
            responsible_organization=responsible_organization,
        ),
        CodingSchemeIdentificationItem(
            designator=PROCESSING_ALGORITHM.scheme_designator,
            name="IHE temporary codes (IHE RAD AI Results)",
            responsible_organization="IHE",
        ),
    ]


_DOUBT_CODES = {Doubt.NEGATIVE: NEGATIVE, Doubt.WRONG_WAY_UP: WRONG_WAY_UP, Doubt.UNFAMILIAR: UNFAMILIAR}


def doubt_code(prediction: Prediction) -> Code | None:
    """The coded reason the model's own checks doubted an image it classified (``None``: they did not):
    :func:`classifier.types.doubt_of`, the verdict ``Prediction.doubt`` says in words."""
    doubt = doubt_of(prediction.novelty, prediction.better_turn, prediction.negative)
    return None if doubt is None else _DOUBT_CODES[doubt]
