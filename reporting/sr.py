"""DICOM Comprehensive 3D SR with a TID 1500 Measurement Report, as IHE AI Results (AIR) describes it.

One TID 1501 measurement group per analysed image: tracking identifier and UID, the source image, the lung as
finding site, the finding as a coded qualitative evaluation, each class probability as a numeric measurement,
and the algorithm's identification. An image the model's own checks doubted (unfamiliar, or the wrong way up)
and the node classified anyway gets a second evaluation, a "Quality Finding" that says which
(:func:`reporting.codes.doubt_code`); so does one whose header gives no patient age
(``AnalysedImage.age_unknown``, :data:`reporting.codes.AGE_UNKNOWN`). The observer is the node as a device
(TID 1004); the Contributing Equipment Sequence names the algorithm ("Processing Algorithm", IHE AIR). The
document is complete but not verified by a person, and preliminary: it supports a radiologist's reading, it is
not one.

No TID 1600 Image Library: highdicom's entry descriptors for CR/DX demand Imager Pixel Spacing and Patient
Orientation, which many radiographs (RG1_UNCI.dcm among them) lack; the evidence sequence and each group's
source image reference identify the images instead.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from classifier.types import ModelInfo, Prediction
from reporting import codes
from reporting.study import (
    FIRST,
    UTF8,
    check_one_study,
    date_result,
    derived_uid,
    distinct_models,
    header_for_highdicom,
    in_study_time,
    put_back,
    revision_description,
    revision_series_number,
)
from reporting.types import AnalysedImage, NodeIdentity, Revision

LOGGER = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI chest X-ray classification (decision support)"
SHORT_DESCRIPTION = "AI chest X-ray classification"  # a later revision's, with its number
TRACKING_NAMESPACE = "cxr-node image classification"  # with the image's SOP Instance UID: its tracking UID


def algorithm_parameters(model: ModelInfo, extra: Mapping[str, str] | None = None) -> list[str]:
    """``key=value`` strings recorded as Algorithm Parameters (TID 4019)."""
    height, width = model.input_size
    params = [f"input_size={height}x{width}", f"classes={','.join(model.classes)}"]
    if model.sha256:
        params.append(f"sha256={model.sha256}")
    params.extend(f"{key}={value}" for key, value in (extra or {}).items())
    return params


def tracking_uid(source_sop_instance_uid: str) -> str:
    """The Tracking Unique Identifier of one image's classification: a function of the image's SOP
    Instance UID alone, so that every revision of a study's SR (a late image makes one) tracks the same
    image under the same UID and a viewer can follow its finding from one revision to the next."""
    return derived_uid(TRACKING_NAMESPACE, source_sop_instance_uid)


def _measurement_group(
    image: AnalysedImage,
    index: int,
    extra_parameters: Mapping[str, str] | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one image."""
    prediction: Prediction = image.prediction
    algorithm = hd.sr.AlgorithmIdentification(
        name=prediction.model.name,
        version=prediction.model.version,
        parameters=algorithm_parameters(prediction.model, extra_parameters),
    )
    source_uid = str(image.source.SOPInstanceUID)
    finding = codes.finding_for(prediction.label)
    measurements = [
        hd.sr.Measurement(
            name=codes.finding_for(label).probability_code,
            value=float(probability),
            unit=codes.PROBABILITY_UNIT,
        )
        for label, probability in prediction.probabilities.items()
    ]
    evaluations = [hd.sr.QualitativeEvaluation(name=codes.IMAGING_FINDING, value=finding.code)]
    doubt = codes.doubt_code(prediction)
    if doubt is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(name=codes.QUALITY_FINDING, value=doubt))
    if image.age_unknown:
        evaluations.append(hd.sr.QualitativeEvaluation(name=codes.QUALITY_FINDING, value=codes.AGE_UNKNOWN))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(source_uid),
            identifier=f"Image {index + 1} classification",
        ),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.LUNG)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(image.source.SOPClassUID),
                referenced_sop_instance_uid=source_uid,
            )
        ],
    )


def build_sr(
    images: Sequence[AnalysedImage],
    node: NodeIdentity,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9001,
    analysed_at: datetime,
    algorithm_parameters_extra: Mapping[str, str] | None = None,
    revision: Revision = FIRST,
    predecessors: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """The structured report of one study's classification.

    ``algorithm_parameters_extra`` adds run-time parameters (e.g. ``{"indeterminate_threshold": "0.5"}``)
    to those recorded from the model artifact. The same inputs always give the same document.

    A later ``revision`` (a late image) is told apart from the SR it replaces in a viewer's series list:
    Instance Number is the revision, Series Number ``series_number`` (the first revision's) moved on by
    :func:`~reporting.study.revision_series_number`, and the Series Description names the revision and
    the report it replaces. ``predecessors`` are the earlier revisions of the SR (their Study, Series,
    SOP Class and SOP Instance UIDs suffice): the Predecessor Documents Sequence references them.
    """
    check_one_study(images)
    moment, offset = in_study_time(analysed_at, images[0].source)
    observer = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=node.device_uid,
            name=node.station_name or node.name,
            manufacturer_name=node.manufacturer,
            model_name=node.model_name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=[
            _measurement_group(image, index, algorithm_parameters_extra)
            for index, image in enumerate(images)
        ],
    )
    evidence, refused = zip(*(header_for_highdicom(image.source) for image in images), strict=True)
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=revision_series_number(series_number, revision),
        sop_instance_uid=sop_instance_uid,
        instance_number=revision.number,
        manufacturer=node.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=node.institution_name or None,
        contributing_equipment=[
            algorithm_equipment(model, node, moment) for model in distinct_models(images)
        ],
        requested_procedures=requested_procedures(evidence) or None,
        coding_schemes=codes.private_scheme_identification(node.manufacturer),
        previous_versions=list(predecessors) or None,
    )
    put_back(sr, refused[0])  # highdicom copies the patient and study of the first evidence item
    _stamp(sr, node, moment, offset)
    sr.SeriesDescription = revision_description(
        SERIES_DESCRIPTION, SHORT_DESCRIPTION, revision, images[0].source
    )
    LOGGER.debug("built SR with %d measurement groups", len(images))
    return sr


def requested_procedures(sources: Sequence[Dataset]) -> list[Dataset]:
    """The Referenced Request Sequence (PS3.3 C.17.2) of a study's SR: the orders the images answered,
    as their Request Attributes Sequence (or, without one, their Accession Number) names them, so that a
    RIS or viewer files the AI result with each order (IHE RAD TF-2x A.2); every image's, each order once
    (the first image's alone left out a second order the study's other images answered, review). Empty
    when the images name no order: the SR then answers none."""
    items: list[Dataset] = []
    seen: set[tuple[str, ...]] = set()
    for source in sources:
        for item in _requests_of(source):
            key = tuple(str(item.get(keyword) or "") for keyword in _REQUEST_KEY)
            if key not in seen:
                seen.add(key)
                items.append(item)
    # An image without Request Attributes names its order by the Accession Number alone (one whose file
    # retention removed, rebuilt from the database, among them): beside an image detailing that order it
    # is the same order, not a second one with no Requested Procedure ID (review).
    detailed = {key[0] for key in seen if any(key[1:])}
    return [item for item in items if any(_order_numbers(item)) or item.AccessionNumber not in detailed]


def _order_numbers(item: Dataset) -> list[str]:
    """What, besides the Accession Number, tells one order of a Referenced Request item from another."""
    return [str(item.get(keyword) or "") for keyword in _REQUEST_KEY[1:]]


_REQUEST_KEY = (
    "AccessionNumber", "RequestedProcedureID", "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
)


def _requests_of(source: Dataset) -> list[Dataset]:
    """One image's orders, as :func:`requested_procedures` reads them."""
    accession = str(source.get("AccessionNumber") or "")
    requests = list(source.get("RequestAttributesSequence") or [])
    if not accession and not requests:
        return []
    items = []
    for request in requests or [Dataset()]:
        # each request's own accession and order numbers (one study may answer two orders), else the study's
        own = request if request.get("AccessionNumber") else source
        item = Dataset()
        item.StudyInstanceUID = source.StudyInstanceUID
        item.AccessionNumber = str(own.get("AccessionNumber") or "")
        # the study's issuer also qualifies a request's own Accession Number when it is the study's: a
        # modality copies the worklist's number into the request, seldom its issuer (review)
        issuer = own.get("IssuerOfAccessionNumberSequence")
        if issuer is None and item.AccessionNumber == accession:
            issuer = source.get("IssuerOfAccessionNumberSequence")
        if issuer is not None:
            item.IssuerOfAccessionNumberSequence = copy.deepcopy(issuer)
        item.ReferencedStudySequence = []
        for keyword in ("PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest"):
            setattr(item, keyword, str(request.get(keyword) or ""))
        item.RequestedProcedureID = str(request.get("RequestedProcedureID") or "")
        item.RequestedProcedureDescription = str(request.get("RequestedProcedureDescription") or "")
        item.RequestedProcedureCodeSequence = copy.deepcopy(
            request.get("RequestedProcedureCodeSequence") or []
        )
        items.append(item)
    return items


def algorithm_equipment(
    model: ModelInfo, node: NodeIdentity, analysed_at: datetime
) -> hd.ContributingEquipment:
    """Contributing Equipment item naming the algorithm, purpose "Processing Algorithm" (IHE AIR).

    highdicom only accepts the baseline codes of CID 7005, so the item is built as Processing Equipment and
    its purpose replaced by the IHE code.
    """
    equipment = hd.ContributingEquipment(
        manufacturer=node.manufacturer,
        purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        institution_name=node.institution_name or None,
        station_name=node.station_name or None,
        contribution_datetime=analysed_at,
        contribution_description="Chest radiograph classification (decision support, not a diagnosis)",
    )
    equipment.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(codes.PROCESSING_ALGORITHM)]
    return equipment


def _stamp(
    sr: hd.sr.Comprehensive3DSR, node: NodeIdentity, analysed_at: datetime, offset: str | None
) -> None:
    """Attributes highdicom leaves to the caller: character set, times, series and equipment details.
    ``analysed_at`` is in the study's time (:func:`~reporting.study.in_study_time`), ``offset`` its
    Timezone Offset From UTC (None: the study states none, so neither does the report)."""
    sr.SpecificCharacterSet = UTF8
    date_result(sr, analysed_at, offset)
    sr.ManufacturerModelName = node.model_name
    sr.SoftwareVersions = node.software_version
    if node.station_name:
        sr.StationName = node.station_name
