"""Parsing and validation of received objects: each defect maps to its named DIMSE status."""

from __future__ import annotations

import functools
import io
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node import part10
from dicom_node.errors import DatasetTooLargeError, InvalidDatasetError, NodeError, UndecodableDatasetError
from dicom_node.ingest import Ingestor
from dicom_node.part10 import (
    check_pixel_data,
    decodable_transfer_syntaxes,
    file_meta_pydicom,
    parse_instance,
    parse_network_dataset,
    part10_prefix,
    require_uid,
)
from dicom_node.sop_classes import ACCEPTED_SOP_CLASSES, IMAGE_SOP_CLASSES
from dicom_node.statuses import Status
from dicom_node.store.db import make_engine, make_session_factory, upgrade
from dicom_node.store.files import FileStore
from tests.node_datasets import make_cr, to_bytes

pytestmark = pytest.mark.unit


def _dataset_part(data: bytes) -> bytes:
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    return data[meta_end:]


def test_a_valid_instance_parses_from_file_and_from_network_bytes() -> None:
    ds = make_cr()
    data = to_bytes(ds)
    assert parse_instance(data).SOPInstanceUID == ds.SOPInstanceUID
    parsed = parse_network_dataset(_dataset_part(data), transfer_syntax=ExplicitVRLittleEndian,
                                   sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID)
    assert parsed.PatientID == "PID-1"
    check_pixel_data(parsed, ExplicitVRLittleEndian)


def test_the_stored_prefix_plus_received_bytes_is_a_valid_part10_file() -> None:
    ds = make_cr()
    body = _dataset_part(to_bytes(ds))
    rebuilt = parse_instance(part10_prefix(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian) + body)
    assert rebuilt.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert rebuilt.PixelData == ds.PixelData


def _parse_deflated(data: bytes, how: str, *, cut: int = 0) -> Dataset:
    """``data``, a deflated Part 10 file less its last ``cut`` bytes, parsed as an upload gives it or as a
    C-STORE carries it."""
    if how == "file":
        return parse_instance(data[: len(data) - cut])
    meta = dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    body = _dataset_part(data)
    return parse_network_dataset(body[: len(body) - cut], transfer_syntax=DeflatedExplicitVRLittleEndian,
                                 sop_class_uid=meta.MediaStorageSOPClassUID,
                                 sop_instance_uid=meta.MediaStorageSOPInstanceUID)


@pytest.mark.parametrize("how", ["file", "network"])
def test_a_deflated_instance_reads_as_pydicom_reads_it(how: str) -> None:
    path = get_testdata_file("image_dfl.dcm")
    assert path is not None
    data = Path(path).read_bytes()
    parsed = _parse_deflated(data, how)
    assert parsed == dcmread(io.BytesIO(data))  # every element of the data set alike
    if how == "file":
        assert parsed.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian


def _deflated_cr(rows: int) -> bytes:
    ds = make_cr(rows=rows, columns=1024)
    ds.PixelData = bytes(len(ds.PixelData))  # zeros: a few kilobytes once deflated
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return to_bytes(ds)


@pytest.mark.parametrize("how", ["file", "network"])
def test_a_deflated_data_set_inflating_past_the_limit_is_refused_out_of_resources_for_good(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydicom inflates a deflated data set whole: 280 kB of deflated zeros became 288 MB in the listener
    and a console upload alike (review). Inflation now stops at the limit (2 MB here)."""
    monkeypatch.setattr(part10, "MAX_INFLATED_BYTES", 2 << 20)
    under, over = _deflated_cr(rows=1000), _deflated_cr(rows=1030)  # 2,048,000 and 2,109,440 pixel bytes
    assert len(over) < 20_000
    assert _parse_deflated(under, how).Rows == 1000
    with pytest.raises(DatasetTooLargeError, match="the deflated data set inflates past 2 MB") as refused:
        _parse_deflated(over, how)
    assert refused.value.status is Status.REFUSED_OUT_OF_RESOURCES and not refused.value.retriable


@pytest.mark.parametrize("how", ["file", "network"])
def test_a_deflated_stream_cut_short_is_cannot_understand(how: str) -> None:
    data = _deflated_cr(rows=64)
    with pytest.raises(UndecodableDatasetError):
        _parse_deflated(data, how, cut=40)


@pytest.mark.parametrize("cut", [1, 9, 700, 8000])
def test_truncation_anywhere_is_cannot_understand(cut: int) -> None:
    ds = make_cr()
    with pytest.raises(UndecodableDatasetError) as caught:
        body = _dataset_part(to_bytes(ds))[:-cut]
        ds_net = parse_network_dataset(body, transfer_syntax=ExplicitVRLittleEndian,
                                       sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID)
        check_pixel_data(ds_net, ExplicitVRLittleEndian)
    assert caught.value.status is Status.CANNOT_UNDERSTAND


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the values it cannot finish
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_cut_inside_a_sequence_is_cannot_understand(syntax: str, tmp_path: Path) -> None:
    """pydicom reads sequences as it meets them and fails inside an item with OSError or struct.error:
    those were answered 0x0110 "processing failure". Every cut of a header with nested sequences, as the
    listener ingests it, is now a refusal the sender understands (a cut between elements leaves no Pixel
    Data, which is refused too)."""
    ds = make_cr()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D3000", "SRT", "Chest"
    ds.AnatomicRegionSequence = [code]
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = ds.SOPClassUID, "1.2.3.4"
    source.PurposeOfReferenceCodeSequence = [code]
    ds.SourceImageSequence = [source]
    ds["AnatomicRegionSequence"].value.is_undefined_length = False  # one of each length encoding
    if syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    body = _dataset_part(to_bytes(ds))
    header = body.index(b"\xe0\x7f\x10\x00")  # up to Pixel Data
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    upgrade(engine)
    ingestor = Ingestor(make_session_factory(engine), FileStore(tmp_path / "files", fsync=False))
    try:
        for cut in range(1, header):
            with pytest.raises(NodeError) as caught:
                ingestor.ingest_network(body[:cut], sop_class_uid=ds.SOPClassUID,
                                        sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=syntax,
                                        calling_ae="MODALITY")  # fmt: skip
            assert caught.value.status in (Status.CANNOT_UNDERSTAND, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    finally:
        engine.dispose()


def _with_request_attributes(
    request: Dataset, syntax: str
) -> tuple[bytes, Callable[[bytes], Dataset]]:
    """A CR's C-STORE data set in ``syntax`` whose Request Attributes Sequence, of defined length, holds
    ``request``, and the node's parse of such bytes."""
    ds = make_cr()
    ds.RequestAttributesSequence = [request]
    ds["RequestAttributesSequence"].value.is_undefined_length = False
    if syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    parse = functools.partial(parse_network_dataset, transfer_syntax=syntax, sop_class_uid=ds.SOPClassUID,
                              sop_instance_uid=ds.SOPInstanceUID)
    return _dataset_part(to_bytes(ds)), parse


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_sequence_item_longer_than_its_sequence_is_cannot_understand(syntax: str) -> None:
    """An item of a defined-length sequence that claims 64 bytes where 24 are: pydicom read what was there
    and the node stored it, though dcmdump reports "Length of element larger than explicit length of
    surrounding item" (review). The same object whole is stored."""
    request = Dataset()
    request.RequestedProcedureID, request.ScheduledProcedureStepID = "RP-1", "SPS-1"
    body, parse = _with_request_attributes(request, syntax)
    assert parse(body).RequestAttributesSequence[0].RequestedProcedureID == "RP-1"
    item = body.index(b"\xfe\xff\x00\xe0")  # the item's tag, then its length
    (length,) = struct.unpack("<L", body[item + 4:item + 8])
    corrupt = body[:item + 4] + struct.pack("<L", length + 40) + body[item + 8:]
    with pytest.raises(UndecodableDatasetError, match="a sequence item is longer than its sequence"):
        parse(corrupt)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_an_element_longer_than_its_nested_item_is_cannot_understand(syntax: str) -> None:
    """One level down: a Code Meaning in an item of a sequence inside a sequence's item claims 40 bytes
    more than its item has. The check followed only the top-level sequence's items, so the node stored
    what dcmdump calls "Length of element larger than explicit length of surrounding item" (review)."""
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "RPID1", "99LOCAL", "Chest PA"
    request = Dataset()
    request.RequestedProcedureID = "RP-1"
    request.ScheduledProtocolCodeSequence = [code]
    request["ScheduledProtocolCodeSequence"].value.is_undefined_length = False
    body, parse = _with_request_attributes(request, syntax)
    parsed = parse(body).RequestAttributesSequence[0].ScheduledProtocolCodeSequence[0]
    assert parsed.CodeMeaning == "Chest PA"
    meaning = body.index(b"\x08\x00\x04\x01")  # (0008,0104) Code Meaning
    if syntax == ImplicitVRLittleEndian:
        (length,) = struct.unpack("<L", body[meaning + 4:meaning + 8])
        corrupt = body[:meaning + 4] + struct.pack("<L", length + 40) + body[meaning + 8:]
    else:
        (length,) = struct.unpack("<H", body[meaning + 6:meaning + 8])
        corrupt = body[:meaning + 6] + struct.pack("<H", length + 40) + body[meaning + 8:]
    with pytest.raises(UndecodableDatasetError, match="a data element is longer than its sequence item"):
        parse(corrupt)


def test_wrong_transfer_syntax_bytes_are_cannot_understand() -> None:
    ds = make_cr()
    body = _dataset_part(to_bytes(ds))  # explicit VR bytes announced as implicit
    with pytest.raises(NodeError) as caught:
        parsed = parse_network_dataset(body, transfer_syntax=ImplicitVRLittleEndian,
                                       sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID)
        check_pixel_data(parsed, ImplicitVRLittleEndian)
    assert caught.value.status in (Status.CANNOT_UNDERSTAND, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS)


def test_an_unknown_value_representation_is_cannot_understand_at_once() -> None:
    """pydicom reads an element whose VR bytes were garbled and fails only when its value is used; the
    listener must answer "cannot understand" for it, not a processing failure from a later read."""
    ds = make_cr()
    body = bytearray(_dataset_part(to_bytes(ds)))
    at = body.index(b"\x10\x00\x10\x00PN")  # Patient's Name (0010,0010), explicit VR
    body[at + 4 : at + 6] = b"PZ"
    with pytest.raises(UndecodableDatasetError, match="unknown value representation") as caught:
        parse_network_dataset(bytes(body), transfer_syntax=ExplicitVRLittleEndian,
                              sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID)
    assert caught.value.status is Status.CANNOT_UNDERSTAND


@st.composite
def corrupted_network_datasets(draw: st.DrawFn) -> tuple[bytes, str, str, str]:
    """A CR's data set as a C-STORE carries it, with bytes of its header overwritten, inserted or zeroed."""
    syntax = draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    ds = make_cr()
    data = to_bytes(ds)
    if syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
        data = to_bytes(ds)
    body = bytearray(_dataset_part(data))
    at = draw(st.integers(0, min(len(body), 700) - 1))  # the header, before Pixel Data
    patch = draw(st.binary(min_size=1, max_size=8))
    kind = draw(st.sampled_from(["overwrite", "insert", "zero"]))
    if kind == "overwrite":
        body[at : at + len(patch)] = patch
    elif kind == "insert":
        body[at:at] = patch
    else:
        body[at : at + len(patch)] = bytes(len(patch))
    return bytes(body), syntax, ds.SOPClassUID, ds.SOPInstanceUID


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every invalid value: by design
# one node store for all examples: the function-scoped tmp_path is shared on purpose
@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=corrupted_network_datasets())
def test_a_corrupted_data_set_is_stored_or_refused_with_its_dimse_status(
    tmp_path: Path, case: tuple[bytes, str, str, str]
) -> None:
    """What the listener does with the bytes of one C-STORE: parse, check, write the file and the rows
    (SQLite). Every outcome is a stored instance or a NodeError whose status the sender understands;
    another exception would be answered 0x0110 "processing failure" without saying what was wrong."""
    body, syntax, sop_class, sop_instance = case
    if not (tmp_path / "node.sqlite3").exists():
        upgrade(make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}"))
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    try:
        ingestor = Ingestor(make_session_factory(engine), FileStore(tmp_path / "files", fsync=False))
        ingestor.ingest_network(body, sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                transfer_syntax=syntax, calling_ae="MODALITY")  # fmt: skip
    except NodeError as exc:
        assert exc.status in (Status.CANNOT_UNDERSTAND, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    finally:
        engine.dispose()


@pytest.mark.parametrize("keyword", ["SOPClassUID", "SOPInstanceUID"])
def test_missing_identity_is_dataset_does_not_match(keyword: str) -> None:
    ds = make_cr()
    delattr(ds, keyword)
    with pytest.raises(InvalidDatasetError) as caught:
        parse_instance(to_bytes(ds))
    assert caught.value.status is Status.DATASET_DOES_NOT_MATCH_SOP_CLASS


def test_missing_or_short_pixel_data() -> None:
    ds = make_cr()
    del ds.PixelData
    with pytest.raises(InvalidDatasetError):
        check_pixel_data(parse_instance(to_bytes(ds)), ExplicitVRLittleEndian)
    short = make_cr()
    short.Rows = 128  # says more pixels than it carries
    with pytest.raises(UndecodableDatasetError):
        check_pixel_data(parse_instance(to_bytes(short)), ExplicitVRLittleEndian)


def test_native_ybr_full_422_pixel_data_of_its_subsampled_length_is_accepted() -> None:
    """PS3.3 C.7.6.3.1.2: uncompressed YBR_FULL_422 holds two chroma samples per pair of pixels, two
    thirds of three samples a pixel. Such a Secondary Capture, which pydicom and the classifier read, was
    refused 0xC210 as truncated; one a third shorter still is."""
    ds = make_cr()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(ds.Rows * ds.Columns * 2)
    parsed = parse_instance(to_bytes(ds))
    check_pixel_data(parsed, UID(ExplicitVRLittleEndian))
    assert parsed.pixel_array.shape == (ds.Rows, ds.Columns, 3)
    ds.PixelData = bytes(ds.Rows * ds.Columns * 4 // 3)
    with pytest.raises(UndecodableDatasetError, match="shorter"):
        check_pixel_data(parse_instance(to_bytes(ds)), UID(ExplicitVRLittleEndian))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_encapsulated_pixel_data_in_a_native_transfer_syntax_is_cannot_understand(syntax: str) -> None:
    """A compressed image whose transfer syntax was relabelled native (a router that changed the UID and
    not the pixels): Pixel Data of undefined length, its fragments long enough to pass the length check.
    It was stored and acknowledged, and pydicom then read the fragments' bytes, item tags and JPEG stream,
    as pixel values: noise handed to the model."""
    ds = make_cr()
    ds.file_meta.TransferSyntaxUID = syntax
    fragments = encapsulate([b"\xff\xd8" + bytes(2 * len(ds.PixelData)) + b"\xff\xd9"])
    del ds.PixelData
    header = b"\xe0\x7f\x10\x00" + (b"" if syntax == ImplicitVRLittleEndian else b"OB\x00\x00")
    pixel_data = header + b"\xff\xff\xff\xff" + fragments + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    body = _dataset_part(to_bytes(ds)) + pixel_data
    parsed = parse_network_dataset(body, transfer_syntax=syntax, sop_class_uid=ds.SOPClassUID,
                                   sop_instance_uid=ds.SOPInstanceUID)
    with pytest.raises(UndecodableDatasetError, match="encapsulated") as caught:
        check_pixel_data(parsed, UID(syntax))
    assert caught.value.status is Status.CANNOT_UNDERSTAND


@pytest.mark.parametrize("keyword", ["SamplesPerPixel", "NumberOfFrames"])
def test_a_zero_samples_per_pixel_or_frame_count_is_dataset_does_not_match(keyword: str) -> None:
    """``value or 1`` read a stated 0 as 1, and the image was accepted, to be refused at analysis."""
    ds = make_cr()
    setattr(ds, keyword, 0)
    with pytest.raises(InvalidDatasetError, match="zero dimensions"):
        check_pixel_data(parse_instance(to_bytes(ds)), ExplicitVRLittleEndian)


def test_a_binary_value_of_the_wrong_length_is_cannot_understand() -> None:
    """Rows (US) written with 3 bytes: pydicom raises BytesLengthException when it is read, which the
    sender got as 0x0110 (an unexpected failure) instead of 0xC210."""
    data = to_bytes(make_cr())
    rows = bytes.fromhex("2800 1000 5553 0200".replace(" ", ""))  # (0028,0010) US, length 2
    at = data.index(rows)
    broken = data[:at] + rows[:6] + b"\x03\x00" + data[at + 8 : at + 10] + b"\x00" + data[at + 10 :]
    with pytest.raises(UndecodableDatasetError) as caught:
        check_pixel_data(parse_instance(broken), ExplicitVRLittleEndian)
    assert caught.value.status is Status.CANNOT_UNDERSTAND


def test_sop_identity_must_match_the_request() -> None:
    ds = make_cr()
    with pytest.raises(InvalidDatasetError):
        parse_instance(to_bytes(ds), expect_sop_instance="1.2.3.4")


def test_offered_syntaxes_cover_the_issue_list() -> None:
    offered = set(decodable_transfer_syntaxes())
    for uid in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50",
                "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
                "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"):
        assert uid in offered
    assert len(IMAGE_SOP_CLASSES) == 4


def test_the_conformance_statement_lists_exactly_the_syntaxes_offered() -> None:
    """§2.3 is what a hospital's integration engineer configures senders by: it must not miss a syntax the
    listener accepts (it missed Explicit VR Big Endian and the three HTJ2K ones) nor list one it refuses."""
    text = (Path(__file__).parents[2] / "docs" / "conformance-statement.md").read_text(encoding="utf-8")
    section = text.split("### 2.3", 1)[1].split("\n### ", 1)[0]
    listed = re.findall(r"^\|[^|]+\| (1\.2\.840\.10008\.1\.2[0-9.]*) \|$", section, flags=re.MULTILINE)
    assert len(listed) == len(set(listed))
    assert set(listed) == {str(uid) for uid in decodable_transfer_syntaxes()}


def test_the_conformance_statement_marks_scp_exactly_the_sop_classes_accepted() -> None:
    """§1 is what a PACS administrator checks a study-level send against: the node refused the SR and PDF
    classes, which the statement said, and Orthanc then aborted every such send (review)."""
    text = (Path(__file__).parents[2] / "docs" / "conformance-statement.md").read_text(encoding="utf-8")
    section = text.split("## 1. Overview", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|[^|]+\| (1\.2\.840\.10008\.[0-9.]+) \|[^|]+\| (Yes|No)[^|]*\|$", section,
                      flags=re.MULTILINE)
    assert {uid for uid, scp in rows if scp == "Yes"} == {*ACCEPTED_SOP_CLASSES, "1.2.840.10008.1.1"}


@pytest.mark.parametrize("sop_instance", ["1.2.3", "1.2.34", "1.2.826.0.1.3680043.8.498.12345678901234567890"])
def test_fast_file_meta_matches_pydicom_byte_for_byte(sop_instance: str) -> None:
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.4.90"):
        fast = part10_prefix("1.2.840.10008.5.1.4.1.1.1", sop_instance, syntax)
        assert fast == file_meta_pydicom("1.2.840.10008.5.1.4.1.1.1", sop_instance, syntax)


def test_file_meta_refuses_a_non_uid() -> None:
    with pytest.raises(InvalidDatasetError):
        part10_prefix("1.2.840.10008.5.1.4.1.1.1", "1.2.x", ExplicitVRLittleEndian)


@pytest.mark.parametrize("uid", ["1.2.3²", "1.2.٣", "1..2", "1.2.", "1.2.3a", "1.2.3 4"])
def test_a_uid_that_is_not_ascii_digits_and_dots_is_an_invalid_dataset(uid: str) -> None:
    ds = make_cr()
    ds.SOPInstanceUID = uid
    with pytest.raises(InvalidDatasetError, match="not a valid UID"):
        require_uid(ds, "SOPInstanceUID")


def _file_meta_element(tag: int, value: bytes, *, implicit: bool) -> bytes:
    """One element of group 0002 as a sender that copied a file's meta into its data set writes it."""
    value += b"\x00" * (len(value) % 2)
    if implicit:
        return struct.pack("<HHI", 0x0002, tag, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag, b"UI", len(value)) + value


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    DeflatedExplicitVRLittleEndian])
def test_file_meta_elements_inside_a_c_store_data_set_do_not_override_the_stored_files_meta(
    syntax: str, tmp_path: Path
) -> None:
    """PS3.5 7.1: group 0002 belongs to a file's meta, never to a data set. A sender that copied a file's
    meta into its C-STORE data set (here one naming JPEG Baseline, the file it once sent) had those
    elements stored right after the node's own file meta, where every reader takes them for the meta:
    pydicom read the stored CR as JPEG Baseline and its pixels could not be decoded (DCMTK: "Invalid Element
    (0002,0010) found in data set"). They are left out of the stored file and the parsed data set."""
    ds = make_cr()
    ds.file_meta.TransferSyntaxUID = syntax
    body = _dataset_part(to_bytes(ds))
    implicit = syntax == ImplicitVRLittleEndian
    stray = _file_meta_element(0x0002, b"1.2.840.10008.5.1.4.1.1.7", implicit=implicit) + _file_meta_element(
        0x0010, b"1.2.840.10008.1.2.4.50", implicit=implicit)
    if syntax == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        sent = packer.compress(stray + part10.inflate(body)) + packer.flush()
    else:
        sent = stray + body
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    upgrade(engine)
    store = FileStore(tmp_path / "files", fsync=False)
    try:
        Ingestor(make_session_factory(engine), store).ingest_network(
            sent, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=syntax,
            calling_ae="MODALITY")
    finally:
        engine.dispose()
    [stored] = (tmp_path / "files").glob("*/*/*.dcm")
    read = dcmread(stored)
    assert read.file_meta.TransferSyntaxUID == syntax
    assert read.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert not [tag for tag in read.keys() if tag.group == 0x0002]
    assert read.pixel_array.tobytes() == ds.PixelData
