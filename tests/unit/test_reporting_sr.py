"""The SR a PACS viewer shows: right study, right patient, the finding and probabilities that survive a
write/read cycle under strict validation, and the same document when rebuilt."""

from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Iterator, Sequence

import highdicom as hd
import pydicom
import pytest
from pydicom import config
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from reporting import codes
from reporting.errors import InconsistentStudyError, UnknownLabelError
from reporting.sr import build_sr
from reporting.types import AnalysedImage
from tests.unit.test_reporting_cases import (
    ANALYSED_AT,
    BINARY,
    MESSY_VALUES,
    NESTED_TEXT,
    NODE,
    analysed,
    doubted_study,
    japanese_source,
    messy_source,
    nested_text_source,
    radiograph,
    sparse_source,
    three_image_study,
    unicode_source,
)

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore:The string .* person name:UserWarning")]


@pytest.fixture
def strict() -> Iterator[None]:
    """Writing and reading raise on invalid values, as highdicom's own tests do."""
    settings = config.settings
    saved = (settings.writing_validation_mode, settings.reading_validation_mode)
    settings.writing_validation_mode = config.RAISE
    settings.reading_validation_mode = config.RAISE
    yield
    settings.writing_validation_mode, settings.reading_validation_mode = saved


def build(images: Sequence[AnalysedImage], sop_uid: str | None = None) -> hd.sr.Comprehensive3DSR:
    return build_sr(
        images,
        NODE,
        series_instance_uid="1.2.826.0.1.3680043.8.498.1001",
        sop_instance_uid=sop_uid or "1.2.826.0.1.3680043.8.498.1002",
        analysed_at=ANALYSED_AT,
    )


def round_trip(sr: pydicom.Dataset) -> hd.sr.Comprehensive3DSR:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    document = hd.sr.srread(io.BytesIO(buffer.getvalue()))
    assert isinstance(document, hd.sr.Comprehensive3DSR)
    return document


def report(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def text_values(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code) -> list[str]:
    return [item.TextValue for item in hd.sr.utils.find_content_items(group[0], name=name, recursive=True)]


CASES = {
    "rg1": lambda: [analysed()],
    "unicode": lambda: [analysed(unicode_source())],
    "japanese": lambda: [analysed(japanese_source())],
    "sparse": lambda: [analysed(sparse_source())],
    "three-images": three_image_study,
}


@pytest.mark.parametrize("case", CASES)
def test_finding_and_probabilities_round_trip(case: str, strict: None) -> None:
    images = CASES[case]()
    sr = round_trip(build(images))
    groups = report(sr).get_image_measurement_groups()
    assert len(groups) == len(images)
    for image, group in zip(images, groups, strict=True):
        prediction = image.prediction
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name == codes.IMAGING_FINDING
        assert evaluation.value == codes.finding_for(prediction.label).code
        measured = {m.name.meaning: m.value for m in group.get_measurements()}
        expected = {
            codes.finding_for(label).probability_code.meaning: probability
            for label, probability in prediction.probabilities.items()
        }
        assert measured.keys() == expected.keys()
        for meaning, probability in expected.items():
            assert measured[meaning] == pytest.approx(probability, abs=1e-9)
        assert all(m.unit == codes.PROBABILITY_UNIT for m in group.get_measurements())
        assert group.source_images[0].referenced_sop_instance_uid == image.source.SOPInstanceUID
        assert text_values(group, dcm_codes.DCM.AlgorithmName) == [prediction.model.name]
        assert text_values(group, dcm_codes.DCM.AlgorithmVersion) == [prediction.model.version]
        assert "input_size=150x150" in text_values(group, dcm_codes.DCM.AlgorithmParameters)
    assert len({group.tracking_uid for group in groups}) == len(images)


@pytest.mark.parametrize(
    ("charset", "text"),
    [("ISO_IR 100", NESTED_TEXT), (["", "ISO 2022 IR 87"], "胸部単純撮影"), ("ISO_IR 126", "Ακτινογραφία")],
    ids=["latin-1", "iso2022", "greek"],
)
def test_text_inside_sequences_is_transcoded_to_the_results_utf_8(
    charset: str | list[str], text: str
) -> None:
    """The SR says UTF-8, so every text in it must be UTF-8. The old code deep-copied the source's
    sequences with their items still undecoded: Latin-1 bytes and JIS escape sequences under a UTF-8
    label, which Orthanc showed as "Rntgen Thorax ERSICHT"."""
    sr = round_trip(build([analysed(nested_text_source(charset, text))]))
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert sr.ProcedureCodeSequence[0].CodeMeaning == text
    assert sr.OtherPatientIDsSequence[0].IssuerOfPatientID == text
    raw = io.BytesIO()
    sr.save_as(raw, enforce_file_format=True)
    assert text.encode("utf-8") in raw.getvalue() and b"\x1b" not in raw.getvalue()


def test_a_doubted_image_carries_a_quality_finding(strict: None) -> None:
    """An image classified although the model's own checks doubted it says which check, after its finding."""
    images = doubted_study()
    groups = report(round_trip(build(images))).get_image_measurement_groups()
    expected = [[], [codes.WRONG_WAY_UP], [codes.UNFAMILIAR], [codes.NEGATIVE]]
    for image, group, doubts in zip(images, groups, expected, strict=True):
        evaluations = group.get_qualitative_evaluations()
        assert evaluations[0].name == codes.IMAGING_FINDING
        assert evaluations[0].value == codes.finding_for(image.prediction.label).code
        assert [e.value for e in evaluations[1:]] == doubts
        assert all(e.name == codes.QUALITY_FINDING for e in evaluations[1:])


def test_an_image_without_a_patient_age_carries_a_quality_finding(strict: None) -> None:
    """Classified although its header gives no age: the reader is to confirm an adult, after any doubt."""
    aged, unaged = doubted_study()[:2]
    unaged = dataclasses.replace(unaged, age_unknown=True)
    groups = report(round_trip(build([aged, unaged]))).get_image_measurement_groups()
    assert [e.value for e in groups[0].get_qualitative_evaluations()[1:]] == []
    evaluations = groups[1].get_qualitative_evaluations()
    assert [e.value for e in evaluations[1:]] == [codes.WRONG_WAY_UP, codes.AGE_UNKNOWN]
    assert all(e.name == codes.QUALITY_FINDING for e in evaluations[1:])


@pytest.mark.parametrize("case", CASES)
def test_same_study_and_patient_new_series_truthful_flags(case: str, strict: None) -> None:
    images = CASES[case]()
    source = images[0].source
    sr = round_trip(build(images))
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID not in {image.source.SeriesInstanceUID for image in images}
    assert sr.Modality == "SR"
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == str(source.PatientName)
    assert sr.PatientID == source.PatientID
    assert sr.AccessionNumber == source.get("AccessionNumber", "")
    assert sr.PatientBirthDate == source.get("PatientBirthDate", "")
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    # 09:41:07 UTC, stated in the source's own offset, which the copied study time is in (RG1: -0400)
    assert (str(sr.ContentDate), str(sr.ContentTime)) == ("20261122", "054107")
    assert sr.TimezoneOffsetFromUTC == "-0400"
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {image.source.SOPInstanceUID for image in images}


def test_header_values_highdicom_refuses_are_carried_as_they_are() -> None:
    source = messy_source()
    sr = round_trip(build([analysed(source)]))
    assert {keyword: str(sr.get(keyword)) for keyword in MESSY_VALUES} == MESSY_VALUES
    assert sr.PatientID == source.PatientID and sr.StudyInstanceUID == source.StudyInstanceUID
    assert report(sr).get_image_measurement_groups()  # the finding is there


def test_observer_is_the_node_as_a_device_and_the_algorithm_is_contributing_equipment() -> None:
    sr = round_trip(build([analysed()]))
    (observer,) = report(sr).get_observer_contexts()
    assert observer.observer_type == dcm_codes.DCM.Device
    device = observer.observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.uid == NODE.device_uid
    algorithm = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    ]
    assert len(algorithm) == 1
    assert algorithm[0].PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    assert algorithm[0].ManufacturerModelName == "sugandi-cnn"
    assert algorithm[0].SoftwareVersions == "2026.11.21-ab12cd3"
    # every private ("99") scheme the SR uses is declared (PS3.3 C.12.1.1.3); 99IHE was not (review)
    declared = [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence]
    used: set[str] = set()
    content = copy.deepcopy(sr)
    del content.CodingSchemeIdentificationSequence
    def collect(_: object, element: pydicom.DataElement) -> None:
        if element.keyword == "CodingSchemeDesignator" and str(element.value).startswith("99"):
            used.add(str(element.value))

    content.walk(collect)
    assert declared == [codes.LOCAL_SCHEME, "99IHE"] and used == set(declared)


def test_binary_model_labels_are_coded() -> None:
    negative = analysed(probabilities={"covid": 0.2, "non-covid": 0.8}, model=BINARY)
    group = report(round_trip(build([negative]))).get_image_measurement_groups()[0]
    assert group.get_qualitative_evaluations()[0].value == codes.NOT_COVID_19
    positive = analysed(probabilities={"covid": 0.9, "non-covid": 0.1}, model=BINARY)
    group = report(round_trip(build([positive]))).get_image_measurement_groups()[0]
    assert group.get_qualitative_evaluations()[0].value == codes.COVID_19


def test_rebuilding_gives_the_same_document() -> None:
    """The pipeline may rebuild after a crash: same UIDs in, same bytes out (no random UIDs, no clock)."""

    def encoded() -> bytes:
        buffer = io.BytesIO()
        build([analysed()]).save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    assert encoded() == encoded()


def test_source_dataset_is_not_modified() -> None:
    source = sparse_source()
    before = copy.deepcopy(source)  # pydicom.Dataset(source) shares its elements: equal whatever happened
    build([analysed(source)])
    assert "AccessionNumber" not in source
    assert source == before


def test_refuses_images_of_different_studies() -> None:
    other = radiograph()
    other.StudyInstanceUID = str(generate_uid())
    with pytest.raises(InconsistentStudyError):
        build([analysed(), analysed(other)])
    with pytest.raises(InconsistentStudyError):
        build([])


def test_refuses_a_class_it_cannot_code() -> None:
    with pytest.raises(UnknownLabelError):
        build([analysed(probabilities={"tuberculosis": 0.7, "normal": 0.3})])


def test_each_image_names_the_model_that_classified_it() -> None:
    """A study re-analysed after a model upgrade may mix versions; each group says which one it was."""
    old, new = analysed(), analysed(probabilities={"covid": 0.2, "non-covid": 0.8}, model=BINARY)
    new.source.SOPInstanceUID = str(generate_uid())
    sr = round_trip(build([old, new]))
    versions = [
        text_values(group, dcm_codes.DCM.AlgorithmVersion)
        for group in report(sr).get_image_measurement_groups()
    ]
    assert versions == [[old.prediction.model.version], [BINARY.version]]
    algorithms = {
        item.SoftwareVersions
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == codes.PROCESSING_ALGORITHM.value
    }
    assert algorithms == {old.prediction.model.version, BINARY.version}


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The node's local zone set to one that is not UTC: on a UTC machine (CI) local time is UTC, and a
    report stamped in UTC passed (review)."""
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("new_york")
def test_a_study_without_an_offset_gets_a_report_in_local_time_without_one() -> None:
    """PS3.3 C.12.1.1.8: one Timezone Offset From UTC covers every date and time of the instance, the copied
    Study Date and Time included. A source without one has local times, so the SR states none either and
    gives the analysis time in the node's local zone; it used to say "+0000" and so relabel the study time
    as UTC."""
    source = radiograph()
    del source.TimezoneOffsetFromUTC
    sr = build([analysed(source)])
    local = ANALYSED_AT.astimezone()
    assert local.utcoffset() != ANALYSED_AT.utcoffset()
    assert "TimezoneOffsetFromUTC" not in sr
    assert (sr.StudyDate, sr.StudyTime) == (source.StudyDate, source.StudyTime)
    assert (str(sr.ContentDate), str(sr.ContentTime)) == (local.strftime("%Y%m%d"), local.strftime("%H%M%S"))


def test_the_modalitys_contributing_equipment_keeps_its_own_time() -> None:
    """highdicom lists the acquisition equipment of the source with the source's acquisition time; only the
    items the node adds (the algorithm, highdicom itself) carry the analysis time."""
    source = radiograph()
    source.AcquisitionDateTime = "20040826185059"
    sr = build([analysed(source)])
    stamps = {
        item.PurposeOfReferenceCodeSequence[0].CodeMeaning: str(item.get("ContributionDateTime", ""))
        for item in sr.ContributingEquipmentSequence
    }
    assert stamps["Acquisition Equipment"] == "20040826185059"
    assert stamps["Processing Algorithm"] == "20261122054107"


def test_the_sr_names_the_order_its_images_answered() -> None:
    """The Referenced Request Sequence (PS3.3 C.17.2) was left out: a RIS could not file the AI result
    with the order. It names each requested procedure of the images' Request Attributes, with the study's
    accession number; an image that names no order gives no sequence."""
    source = radiograph()
    request = pydicom.Dataset()
    request.RequestedProcedureID, request.RequestedProcedureDescription = "RP-77", "CHEST 2 VIEWS"
    source.RequestAttributesSequence = [request]
    other = pydicom.Dataset()  # a second order the same images answered, with its own numbers
    other.RequestedProcedureID, other.AccessionNumber = "RP-2", "ACC-OTHER"
    other.PlacerOrderNumberImagingServiceRequest = "PLACER-2"
    source.RequestAttributesSequence.append(other)
    sr = round_trip(build([analysed(source)]))
    first, second = sr.ReferencedRequestSequence
    assert first.StudyInstanceUID == source.StudyInstanceUID
    assert first.AccessionNumber == source.AccessionNumber
    assert (first.RequestedProcedureID, first.RequestedProcedureDescription) == ("RP-77", "CHEST 2 VIEWS")
    # the second order under its own accession and placer number, not the study's (review)
    assert second.AccessionNumber == "ACC-OTHER"
    assert second.PlacerOrderNumberImagingServiceRequest == "PLACER-2"
    orderless = radiograph()
    del orderless.AccessionNumber
    assert "ReferencedRequestSequence" not in round_trip(build([analysed(orderless)]))


def test_an_order_under_the_study_s_accession_number_keeps_the_study_s_issuer() -> None:
    """A modality copies the worklist's Accession Number into the Request Attributes item, seldom its
    Issuer of Accession Number: the study-level issuer was then left out of the SR's Referenced Request
    item, though it names the same accession, and a RIS that needs the issuer to match an accession
    number across its namespaces could not file the result (review). An order under another accession
    number does not take the study's issuer."""
    source = radiograph()
    source.AccessionNumber = "ACC-1"
    issuer = pydicom.Dataset()
    issuer.LocalNamespaceEntityID = "HOSP-A"
    source.IssuerOfAccessionNumberSequence = [issuer]
    same, other = pydicom.Dataset(), pydicom.Dataset()
    same.AccessionNumber, same.RequestedProcedureID = "ACC-1", "RP-1"
    other.AccessionNumber, other.RequestedProcedureID = "ACC-2", "RP-2"
    source.RequestAttributesSequence = [same, other]
    first, second = round_trip(build([analysed(source)])).ReferencedRequestSequence
    assert first.AccessionNumber == "ACC-1"
    assert [item.LocalNamespaceEntityID for item in first.IssuerOfAccessionNumberSequence] == ["HOSP-A"]
    assert second.AccessionNumber == "ACC-2" and "IssuerOfAccessionNumberSequence" not in second


def test_the_sr_names_every_order_its_images_answered_once() -> None:
    """Only the first image's orders were named: a study whose second image answered another order was
    filed under the first alone (review)."""
    first_image, second_image = radiograph(), radiograph()
    second_image.SOPInstanceUID = str(generate_uid())
    for image, procedure in ((first_image, "RP-1"), (second_image, "RP-2")):
        request = pydicom.Dataset()
        request.RequestedProcedureID = procedure
        image.RequestAttributesSequence = [request]
    third_image = copy.deepcopy(second_image)  # the same order again: named once
    third_image.SOPInstanceUID = str(generate_uid())
    sr = round_trip(build([analysed(first_image), analysed(second_image), analysed(third_image)]))
    assert [item.RequestedProcedureID for item in sr.ReferencedRequestSequence] == ["RP-1", "RP-2"]


def test_an_image_naming_its_order_by_accession_alone_adds_no_second_item_for_that_order() -> None:
    """An image without Request Attributes names its order by the study's Accession Number alone (an image
    whose file retention removed, rebuilt from the database, is one). Beside an image that details the same
    order it added a second Referenced Request item, the same accession with no Requested Procedure ID:
    revision 2 of a study's SR named two orders where revision 1 named one (review)."""
    bare, detailed = radiograph(), radiograph()
    detailed.SOPInstanceUID = str(generate_uid())
    request = pydicom.Dataset()
    request.AccessionNumber, request.RequestedProcedureID = bare.AccessionNumber, "RP-1"
    detailed.RequestAttributesSequence = [request]
    sr = round_trip(build([analysed(bare), analysed(detailed)]))
    assert [(i.AccessionNumber, i.RequestedProcedureID) for i in sr.ReferencedRequestSequence] == [
        (bare.AccessionNumber, "RP-1")
    ]
    other = radiograph()  # an accession no other image details: still named
    other.SOPInstanceUID, other.AccessionNumber = str(generate_uid()), "ACC-OTHER"
    sr = round_trip(build([analysed(bare), analysed(detailed), analysed(other)]))
    assert [i.AccessionNumber for i in sr.ReferencedRequestSequence] == [bare.AccessionNumber, "ACC-OTHER"]


def test_an_images_tracking_uid_is_the_same_in_every_sr_that_reports_on_it() -> None:
    """Tracking UIDs follow the image, not the document: revision 2 of a study's SR (new SOP Instance
    UID) tracks the same image under the same UID. The old code derived it from the SR's own UID."""
    images = three_image_study()
    one = report(round_trip(build(images, "1.2.826.0.1.3680043.8.498.1002"))).get_image_measurement_groups()
    two_images = round_trip(build(images[:2], "1.2.826.0.1.3680043.8.498.1003"))
    two = report(two_images).get_image_measurement_groups()
    assert [group.tracking_uid for group in two] == [group.tracking_uid for group in one[:2]]
    assert len({group.tracking_uid for group in one}) == len(images)


@pytest.mark.usefixtures("new_york")
@pytest.mark.parametrize("offset", ["-1400", "-1201", "+1401", "+0960"])
def test_a_source_offset_outside_the_dicom_range_is_not_copied_into_the_report(offset: str) -> None:
    """PS3.5 allows offsets from -1200 to +1400. A source stating another (a modality's clock set wrong) is
    read as stating none: the report no longer repeats the invalid value, and its times are local."""
    source = radiograph()
    source.TimezoneOffsetFromUTC = offset
    sr = build([analysed(source)])
    local = ANALYSED_AT.astimezone()
    assert "TimezoneOffsetFromUTC" not in sr
    assert (str(sr.ContentDate), str(sr.ContentTime)) == (local.strftime("%Y%m%d"), local.strftime("%H%M%S"))
