"""The node's SCP and SCU over real loopback associations (in-process pynetdicom peers)."""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import ssl
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    KeyObjectSelectionDocumentStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import aes, part10, scu
from dicom_node.errors import AssociationError, ConfigurationError
from dicom_node.ingest import Ingestor, IngestResult
from dicom_node.logconfig import configure_logging
from dicom_node.scp import StorageScp, build_scp, failure_response
from dicom_node.settings import DicomSettings, LoggingSettings, TlsSettings
from dicom_node.statuses import Status
from dicom_node.store import db
from dicom_node.store.files import FileStore
from dicom_node.store.models import AeRole, Instance, InstanceState
from dicom_node.tls import client_context, server_context
from tests import peers
from tests.node_datasets import make_cr, make_non_image, write

pytestmark = pytest.mark.network

CALLER = "TESTSCU"
SENTINEL = "ZZNETSENTINEL"


@dataclass
class Listener:
    scp: StorageScp
    sessions: sessionmaker[Session]
    store: FileStore


def _listener(tmp_path: Path, *, ingestor_class: type[Ingestor] = Ingestor,
              ssl_context: ssl.SSLContext | None = None, settings: DicomSettings | None = None) -> Listener:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    db.upgrade(engine)
    sessions = db.make_session_factory(engine)
    with sessions() as session, session.begin():
        aes.add(session, aes.AeSpec(CALLER, AeRole.CALLER, "127.0.0.1"), "test")
    store = FileStore(tmp_path / "instances")
    settings = settings or DicomSettings(port=0, bind_address="127.0.0.1")
    scp = build_scp(settings, ingestor_class(sessions, store), sessions, ssl_context=ssl_context)
    scp.start()
    return Listener(scp, sessions, store)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    node = _listener(tmp_path)
    yield node
    node.scp.stop()


def _jpeg_baseline(ds: Dataset) -> Dataset:
    pixels = (ds.pixel_array >> 4).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds["PixelData"].VR = "OB"
    return ds


def _variants() -> dict[str, Dataset]:
    out: dict[str, Dataset] = {}
    for name, syntax in (("explicit", ExplicitVRLittleEndian), ("implicit", ImplicitVRLittleEndian),
                         ("deflated", DeflatedExplicitVRLittleEndian)):
        ds = make_cr(seed=len(out))
        ds.file_meta.TransferSyntaxUID = syntax
        out[name] = ds
    for name, syntax in (("rle", RLELossless), ("jpeg-ls", JPEGLSLossless), ("jpeg2000", JPEG2000Lossless)):
        ds = make_cr(seed=len(out))
        ds.compress(syntax)
        out[name] = ds
    out["jpeg-baseline"] = _jpeg_baseline(make_cr(seed=len(out)))
    sc = make_cr(seed=len(out))
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    out["secondary-capture"] = sc
    return out


def _roundtrip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


def test_every_transfer_syntax_is_stored_as_sent_and_decodes(listener: Listener) -> None:
    variants = _variants()
    sent = {name: _roundtrip(ds) for name, ds in variants.items()}
    statuses = scu.send(list(sent.values()), "127.0.0.1", listener.scp.port, "CXRNODE", calling_aet=CALLER)
    assert statuses == [0] * len(sent)
    with listener.sessions() as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
    for name, ds in sent.items():
        row = rows[ds.SOPInstanceUID]
        assert row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID, name
        stored = dcmread(listener.store.path(row.file_path))
        assert np.array_equal(stored.pixel_array, ds.pixel_array), name


def test_a_deflated_data_set_past_the_inflation_limit_is_refused_and_the_listener_goes_on(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few kilobytes of deflated zeros that would inflate past the limit (2 MB here; 256 MB in service):
    0xA700 with the reason, nothing kept, and the next instance on the same association is stored. The
    review's 780 kB C-STORE took 1 GB of the listener's memory before."""
    monkeypatch.setattr(part10, "MAX_INFLATED_BYTES", 2 << 20)
    bomb = make_cr(rows=1100, columns=1024)
    bomb.PixelData = bytes(len(bomb.PixelData))
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    after = make_cr()
    after.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    statuses = scu.send([_roundtrip(bomb), _roundtrip(after)], "127.0.0.1", listener.scp.port, "CXRNODE",
                        calling_aet=CALLER)
    assert [int(status) for status in statuses] == [0xA700, 0x0000]
    assert statuses[0].reason == 'Error Comment: "the deflated data set inflates past 2 MB"'
    with listener.sessions() as session:
        assert list(session.scalars(select(Instance.sop_instance_uid))) == [after.SOPInstanceUID]
    assert len(list(listener.store.root.rglob("*.dcm"))) == 1


def _bounded_listener(tmp_path: Path) -> Listener:
    """A listener that takes data sets up to 1 MiB (256 MiB in service)."""
    return _listener(tmp_path, settings=DicomSettings(port=0, bind_address="127.0.0.1",
                                                      max_object_bytes=1 << 20))


def test_a_c_store_past_the_object_limit_is_refused_unkept_and_the_association_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom gathered every fragment of a C-STORE, however many: a 1.8 GB object filled the listener's
    memory and was answered 0x0110 after a MemoryError (review). Past dicom.max_object_bytes it is 0xA700
    with the reason, nothing of it kept, one WARNING without patient data, and the next instance on the
    same association is stored."""
    node = _bounded_listener(tmp_path)
    big = make_cr(rows=1024, columns=1024, patient_name=SENTINEL)  # a 2 MiB data set
    after = make_cr()
    try:
        with caplog.at_level(logging.INFO, logger="dicom_node"):
            statuses = scu.send([big, after], "127.0.0.1", node.scp.port, "CXRNODE", calling_aet=CALLER)
    finally:
        node.scp.stop()
    assert [int(status) for status in statuses] == [0xA700, 0x0000]
    assert statuses[0].reason == 'Error Comment: "data set of 2.0 MB is over dicom.max_object_bytes (1 MB)"'
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"C-STORE from {CALLER} refused with REFUSED_OUT_OF_RESOURCES (0xA700): data set of 2.0 MB is over "
        "dicom.max_object_bytes (1 MB)"
    ]
    assert SENTINEL not in caplog.text
    with node.sessions() as session:
        assert list(session.scalars(select(Instance.sop_instance_uid))) == [after.SOPInstanceUID]
    assert len(list(node.store.root.rglob("*.dcm"))) == 1


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and r.name.startswith("dicom_node")]


def test_a_pdu_announcing_more_than_the_listener_reads_is_aborted_unread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An association request is read before anyone is known: one announcing 100 MB had the listener keep
    whatever came of it for the ACSE time-out (30 s: gigabytes on a LAN), from any address. Its header is
    now refused, nothing after it read (its body read as PDU headers gave thousands of errors and
    A-ABORTs), and the connection closed."""
    node = _bounded_listener(tmp_path)
    try:
        with caplog.at_level(logging.INFO, logger="dicom_node"), socket.create_connection(
            ("127.0.0.1", node.scp.port), timeout=5
        ) as conn:
            conn.sendall(struct.pack(">BBL", 0x01, 0, 100_000_000) + bytes(1 << 20))
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := conn.recv(4096):  # until the node closes: a time-out fails the test
                    answer += chunk
        a_abort = len(answer) == 10 and answer.startswith(b"\x07\x00\x00\x00\x00\x04")
        assert answer == b"" or a_abort
        assert _errors(caplog) == [
            "PDU of type 0x01 announcing 100000000 bytes, over the 1048576 this listener reads: aborted"
        ]
        assert scu.echo("127.0.0.1", node.scp.port, "CXRNODE", calling_aet=CALLER) == 0  # it goes on
    finally:
        node.scp.stop()


@pytest.mark.parametrize("sent", [b"", struct.pack(">BBL", 0x01, 0, 100_000_000)])
def test_a_connection_ended_before_its_association_request_frees_its_slot_at_once(
    tmp_path: Path, sent: bytes
) -> None:
    """The association thread of a connection that closed (a load balancer's probe, a port scan) or was
    aborted for a refused PDU before any association request waited out the ACSE time-out, 30 s, counted
    among the listener's associations: one such connection every 2 s kept all 16 slots taken and every
    modality rejected (review)."""
    node = _listener(tmp_path, settings=DicomSettings(port=0, bind_address="127.0.0.1", max_associations=2,
                                                      max_object_bytes=1 << 20))
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", node.scp.port), timeout=5) as conn:
                if sent:  # then read until the node closes, after its A-ABORT; else close at once
                    conn.sendall(sent)
                    with contextlib.suppress(ConnectionResetError):
                        while conn.recv(4096):
                            pass
        deadline = time.monotonic() + 5
        while len(node.scp.ae.active_associations) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scu.echo("127.0.0.1", node.scp.port, "CXRNODE", calling_aet=CALLER, timeout=5) == 0
    finally:
        node.scp.stop()

def test_a_p_data_pdu_past_the_offered_maximum_length_aborts_the_association(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender ignoring the Maximum Length the node offered (PS3.8 D.1) put a whole 2 MiB object in one
    PDU, which the node read whole before dicom.max_object_bytes could bound it (review: 8 MiB read
    against a 1 MiB limit)."""
    from pynetdicom.dimse import DIMSEServiceProvider

    offered = DIMSEServiceProvider.maximum_pdu_size
    monkeypatch.setattr(DIMSEServiceProvider, "maximum_pdu_size",
                        property(lambda dimse: 0 if dimse.assoc.is_requestor else offered.fget(dimse)))
    node = _bounded_listener(tmp_path)
    try:
        ae = AE(ae_title=CALLER)
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        with caplog.at_level(logging.INFO, logger="dicom_node"):
            assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="CXRNODE")
            assert assoc.is_established and assoc.acceptor.maximum_length == 131072
            big = make_cr(rows=1024, columns=1024)
            big.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            assoc.send_c_store(big)
            assoc.abort()
    finally:
        node.scp.stop()
    assert assoc.is_aborted
    assert len(_errors(caplog)) == 1
    assert _errors(caplog)[0].startswith("PDU of type 0x04 announcing ")
    assert _errors(caplog)[0].endswith(" bytes, over the 131072 this listener reads: aborted")
    with node.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_a_c_store_whose_command_ends_beside_its_data_in_one_pdu_is_refused_with_a_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sender may put the command set's last fragment and the data set in one P-DATA-TF (PS3.8 E.2
    allows it). Its class is known only once that fragment is decoded: the C-STORE was taken for a
    message of unknown class and its association aborted, instead of 0xA700 (review)."""
    from pynetdicom.dsutils import encode
    from pynetdicom.pdu_primitives import P_DATA

    node = _listener(tmp_path, settings=DicomSettings(port=0, bind_address="127.0.0.1",
                                                      max_object_bytes=1 << 20, max_pdu=8 << 20))
    try:
        ae = AE(ae_title=CALLER)
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        with caplog.at_level(logging.INFO, logger="dicom_node"):
            assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="CXRNODE")
            assert assoc.is_established
            big = make_cr(rows=1024, columns=1024)
            command = Dataset()
            command.CommandField, command.MessageID, command.Priority = 0x0001, 1, 0
            command.AffectedSOPClassUID, command.AffectedSOPInstanceUID = big.SOPClassUID, big.SOPInstanceUID
            command.CommandDataSetType = 0x0000
            context = assoc.accepted_contexts[0].context_id
            pdu = P_DATA()
            pdu.presentation_data_value_list = [
                [context, b"\x03" + encode(command, True, True)],
                [context, b"\x02" + encode(big, False, True)],
            ]
            assoc.dul.send_pdu(pdu)
            refusal = "refused with REFUSED_OUT_OF_RESOURCES (0xA700): data set of 2.0 MB"
            deadline = time.monotonic() + 10
            while refusal not in caplog.text and assoc.is_established and time.monotonic() < deadline:
                time.sleep(0.05)
            assert refusal in caplog.text
            assert assoc.is_established and not assoc.is_aborted  # the association goes on
            assoc.release()
    finally:
        node.scp.stop()
    assert _errors(caplog) == []

def test_a_data_set_past_the_limit_on_a_message_other_than_c_store_aborts_the_association(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a C-STORE's data set was bounded: a C-ECHO (or a commitment report) carrying 2 MiB was kept
    whole, past a 1 MiB dicom.max_object_bytes (review). Cut short it could read as a shorter valid
    message, and it has no status to be refused with: its association is aborted."""
    from io import BytesIO

    from pynetdicom.dimse_messages import C_ECHO_RQ

    node = _bounded_listener(tmp_path)
    try:
        ae = AE(ae_title=CALLER)
        ae.add_requested_context(Verification)
        with caplog.at_level(logging.INFO, logger="dicom_node"):
            assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="CXRNODE")
            assert assoc.is_established
            message = C_ECHO_RQ()
            message.command_set.CommandField = 0x0030
            message.command_set.MessageID = 7
            message.command_set.AffectedSOPClassUID = Verification
            message.command_set.CommandDataSetType = 0x0001  # a data set follows
            message.data_set = BytesIO(bytes(2 << 20))
            for pdu in message.encode_msg(assoc.accepted_contexts[0].context_id, 16382):
                assoc.dul.send_pdu(pdu)
            deadline = time.monotonic() + 10
            while assoc.is_established and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        node.scp.stop()
    assert assoc.is_aborted
    assert len(_errors(caplog)) == 1
    assert _errors(caplog)[0].startswith("a C_ECHO_RQ data set of ")
    assert _errors(caplog)[0].endswith(
        " bytes or more, over the 1048576 this listener keeps: association aborted"
    )

@pytest.mark.interop
def test_storescu_past_the_object_limit_is_told_0xa700_and_the_listener_never_holds_the_object(
    tmp_path: Path,
) -> None:
    """DCMTK's storescu sends a 32 MiB radiograph to a listener that takes 1 MiB: it shows 0xA700 and the
    node's reason, and the listener's Python memory (tracemalloc: every buffer the object passes through)
    peaks far below the object, which it held whole, and then a copy, before (review: 1.8 GB object,
    MemoryError). An instance sent after it is stored."""
    big, small = make_cr(rows=4096, columns=4096), make_cr()
    paths = [write(big, tmp_path / "big.dcm"), write(small, tmp_path / "small.dcm")]
    node = _bounded_listener(tmp_path)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = subprocess.run(
            [peers.executable("storescu"), "-d", "-nh", "-aet", CALLER, "-aec", "CXRNODE", "127.0.0.1",
             str(node.scp.port), *map(str, paths)], capture_output=True, text=True, timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        node.scp.stop()
    output = result.stdout + result.stderr
    assert "0xa700" in output.lower() and "is over dicom.max_object_bytes (1 MB)" in output, output
    assert peak < 8 << 20, f"the listener held {peak >> 20} MiB of a 32 MiB object"
    with node.sessions() as session:
        assert list(session.scalars(select(Instance.sop_instance_uid))) == [small.SOPInstanceUID]


def test_a_dimse_n_request_on_a_storage_context_is_aborted_with_a_warning(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom handed an N-CREATE on the CR context to the C-STORE handler, which answered it with a
    C-STORE response, 0x0110, and logged "C-STORE ... failed unexpectedly: AttributeError" (review)."""
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.scp.port, ae_title="CXRNODE")
    assert assoc.is_established
    with caplog.at_level(logging.INFO, logger="dicom_node"):
        attributes = Dataset()
        attributes.PatientID = "PID-1"
        status, _ = assoc.send_n_create(attributes, ComputedRadiographyImageStorage, "1.2.3.4")
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not assoc.is_established and assoc.is_aborted
    assert status == Dataset()  # no response: the association was aborted
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"N-CREATE request from {CALLER} on a storage presentation context refused: association aborted"
    ]
    assert scu.echo("127.0.0.1", listener.scp.port, "CXRNODE", calling_aet=CALLER) == 0  # the node goes on


def _send_on_context(assoc: Any, abstract_syntax: str) -> None:
    """Every later request of ``assoc`` goes on the presentation context of ``abstract_syntax``, whatever
    its own SOP class: what a non-conformant SCU does, and pynetdicom's own never would."""
    choose = assoc._get_valid_context

    def on_that_context(ab_syntax: str, *args: Any, **kwargs: Any) -> Any:
        return choose(abstract_syntax, *args, **kwargs)

    assoc._get_valid_context = on_that_context


def test_a_c_find_on_a_storage_context_is_aborted_with_a_warning_not_a_traceback(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom handed a C-FIND on the CR context to the Storage service class, which failed on it: an
    ERROR with a traceback in the node's log and an abort without a word (review)."""
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.scp.port, ae_title="CXRNODE")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID = "STUDY", "PID-1"
    with caplog.at_level(logging.INFO):
        _send_on_context(assoc, ComputedRadiographyImageStorage)
        answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
    assert assoc.is_aborted and all(status == Dataset() for status, _ in answers)
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("dicom_node")]
    assert [r.getMessage() for r in warned] == [
        f"C-FIND request from {CALLER} on a storage presentation context refused: association aborted"
    ]
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    assert scu.echo("127.0.0.1", listener.scp.port, "CXRNODE", calling_aet=CALLER) == 0


@pytest.mark.parametrize(
    ("context", "sop_class", "status"),
    [
        (StorageCommitmentPushModel, StorageCommitmentPushModel, Status.SOP_CLASS_NOT_SUPPORTED),
        (Verification, Verification, Status.SOP_CLASS_NOT_SUPPORTED),
        (ComputedRadiographyImageStorage, "1.2.3.4", Status.DATASET_DOES_NOT_MATCH_SOP_CLASS),
        (ComputedRadiographyImageStorage, StudyRootQueryRetrieveInformationModelFind,
         Status.DATASET_DOES_NOT_MATCH_SOP_CLASS),
    ],
    ids=["storage-commitment", "verification", "unknown-class", "query-class"],
)
def test_a_c_store_naming_a_class_that_is_not_a_storage_class_is_refused_with_a_status(
    listener: Listener, caplog: pytest.LogCaptureFixture, context: str, sop_class: str, status: Status
) -> None:
    """pynetdicom hands a C-STORE to the service class its SOP class names: on the Verification context the
    sender was answered a C-ECHO success, which it read as stored (nothing was); on the Storage Commitment
    context, or naming a Query/Retrieve or unknown class, an ERROR with a traceback and an abort (review)."""
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(context, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.scp.port, ae_title="CXRNODE")
    assert assoc.is_established
    ds = make_cr()
    ds.SOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    try:
        with caplog.at_level(logging.INFO):
            _send_on_context(assoc, context)
            answer = assoc.send_c_store(ds)
            assert assoc.is_established  # the association goes on
    finally:
        assoc.release()
    assert answer.Status == status and "storage SOP class" in answer.ErrorComment
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warned] == ["dicom_node.reactor"]
    assert warned[0].getMessage().startswith(f"C-STORE from {CALLER} refused with ")
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    with listener.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_unknown_caller_is_rejected_and_echo_succeeds_for_a_known_one(listener: Listener) -> None:
    assert scu.echo("127.0.0.1", listener.scp.port, "CXRNODE", calling_aet=CALLER) == 0
    reason = r"rejected by CXRNODE at .* \(permanent; service user: calling AE title not recognised\)"
    with pytest.raises(AssociationError, match=reason):
        scu.echo("127.0.0.1", listener.scp.port, "CXRNODE", calling_aet="NOBODY")


def test_a_caller_bound_to_its_ipv4_address_may_call_a_dual_stack_listener(tmp_path: Path) -> None:
    """Bound to "::" (IPv4 and IPv6 on one socket, as in many containers) the listener sees an IPv4 peer
    as ::ffff:127.0.0.1, which never equalled the caller's configured 127.0.0.1: every caller bound to a
    host was rejected "calling AE title not recognised"."""
    node = _listener(tmp_path, settings=DicomSettings(port=0, bind_address="::"))
    try:
        assert scu.echo("127.0.0.1", node.scp.port, "CXRNODE", calling_aet=CALLER) == 0
        with node.sessions() as session, session.begin():
            aes.add(session, aes.AeSpec("ELSEWHERE", AeRole.CALLER, "127.0.0.2"), "test")
        with pytest.raises(AssociationError, match="calling AE title not recognised"):
            scu.echo("127.0.0.1", node.scp.port, "CXRNODE", calling_aet="ELSEWHERE")
    finally:
        node.scp.stop()


def test_a_refused_caller_is_told_apart_in_the_log(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    """An AE title allowed from another address, or disabled, was logged "is not an allowed caller" like
    an unknown one, and an operator looked for a typo in the AE title (review)."""
    with listener.sessions() as session, session.begin():
        aes.add(session, aes.AeSpec("ELSEWHERE", AeRole.CALLER, "192.0.2.7"), "test")
        aes.add(session, aes.AeSpec("RETIRED", AeRole.CALLER, enabled=False), "test")
    with caplog.at_level(logging.WARNING, logger="dicom_node"):
        for calling in ("ELSEWHERE", "RETIRED", "NOBODY"):
            with pytest.raises(AssociationError):
                scu.echo("127.0.0.1", listener.scp.port, "CXRNODE", calling_aet=calling)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "association rejected: calling AE 'ELSEWHERE' from 127.0.0.1 is an allowed caller from 192.0.2.7"
        " only",
        "association rejected: calling AE 'RETIRED' from 127.0.0.1 is a disabled caller",
        "association rejected: calling AE 'NOBODY' from 127.0.0.1 is not an allowed caller",
    ]


@pytest.mark.interop
def test_a_wrong_called_ae_title_is_one_warning_naming_it_the_caller_and_its_address(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    """DCMTK echoscu calling "WRONG": the sender saw "Called AE Title Not Recognized", the node's log only
    "Association Released" (pynetdicom rejected it, and its logging is quieted)."""
    command = [peers.executable("echoscu"), "-to", "10", "-aet", CALLER, "-aec", "WRONG", "127.0.0.1",
               str(listener.scp.port)]
    with caplog.at_level(logging.INFO, logger="dicom_node"):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Called AE Title Not Recognized" in result.stdout + result.stderr
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.name == "dicom_node.scp" and warning.getMessage() == (
        f"association rejected: called AE 'WRONG' asked for by calling AE '{CALLER}' from 127.0.0.1 is not "
        "this node's AE title 'CXRNODE'"
    )


class _ExplodingOnce(Ingestor):
    exploded = False

    def ingest_network(self, dataset_bytes: bytes, **kwargs: str) -> IngestResult:  # type: ignore[override]
        if not _ExplodingOnce.exploded:
            _ExplodingOnce.exploded = True
            raise RuntimeError(f"boom with {SENTINEL} inside")
        return super().ingest_network(dataset_bytes, **kwargs)


def test_unexpected_error_is_a_failure_status_the_listener_survives_and_the_text_is_not_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = _listener(tmp_path, ingestor_class=_ExplodingOnce)
    try:
        with caplog.at_level(logging.DEBUG):
            statuses = scu.send([make_cr(), make_cr()], "127.0.0.1", node.scp.port, "CXRNODE", calling_aet=CALLER)
        assert statuses == [0x0110, 0x0000]
        assert "RuntimeError" in caplog.text and SENTINEL not in caplog.text
    finally:
        node.scp.stop()


def test_a_c_store_whose_sop_class_is_not_its_presentation_contexts_is_refused(listener: Listener) -> None:
    """A CR instance sent on the context accepted for DX For Presentation was stored: the request's SOP
    class must be its context's abstract syntax (PS3.7 9.1.1), as the statement's 0xA900 row says (review)."""
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.scp.port, ae_title="CXRNODE")
    assert assoc.is_established
    try:
        _send_on_context(assoc, DigitalXRayImageStorageForPresentation)
        status = assoc.send_c_store(make_cr())
    finally:
        assoc.release()
    assert status.Status == 0xA900 and "presentation context" in status.ErrorComment
    with listener.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_sr_and_pdf_contexts_are_accepted_uncompressed_and_a_dose_sr_is_stored_skipped(
    listener: Listener,
) -> None:
    """Orthanc sends a whole study only when every one of its contexts is accepted: the old node refused
    the SR and Encapsulated PDF classes, and Orthanc answered "Cannot transcode ... to one of [ ]" (review).
    Non-image classes are accepted uncompressed or deflated, not in an image compression."""
    ae = AE(ae_title=CALLER)
    dose, report, pdf = XRayRadiationDoseSRStorage, ComprehensiveSRStorage, EncapsulatedPDFStorage
    for sop_class in (dose, report, pdf, KeyObjectSelectionDocumentStorage, BasicTextSRStorage,
                      EnhancedSRStorage, Comprehensive3DSRStorage):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(ComprehensiveSRStorage, JPEG2000Lossless)
    assoc = ae.associate("127.0.0.1", listener.scp.port, ae_title="CXRNODE")
    assert assoc.is_established
    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        rejected = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.rejected_contexts}
        image = make_cr()
        statuses = [assoc.send_c_store(make_non_image(uid, like=image)).Status for uid in (dose, report)]
        statuses.append(assoc.send_c_store(make_non_image(pdf, like=image, modality="DOC")).Status)
    finally:
        assoc.release()
    assert len(accepted) == 7 and all(syntax == ExplicitVRLittleEndian for _, syntax in accepted)
    assert rejected == {(ComprehensiveSRStorage, JPEG2000Lossless)}
    assert statuses == [0, 0, 0]
    with listener.sessions() as session:
        rows = list(session.scalars(select(Instance)))
        assert sorted(r.state_reason for r in rows) == [
            "not an image (Comprehensive SR Storage): not analysed",
            "not an image (Encapsulated PDF Storage): not analysed",
            "not an image (X-Ray Radiation Dose SR Storage): not analysed",
        ]
        assert all(r.state is InstanceState.SKIPPED for r in rows)
        assert all(listener.store.path(r.file_path).is_file() for r in rows)


def test_a_failure_response_carries_a_short_default_repertoire_error_comment() -> None:
    """Error Comment is LO: 64 characters of the default repertoire, no backslash (a value separator)."""
    response = failure_response(Status.IDENTITY_CONFLICT, "Série \\ " + "x" * 80)
    assert response.Status == 0xC211
    assert len(response.ErrorComment) == 64 and response.ErrorComment.endswith("...")
    assert response.ErrorComment.startswith("S?rie / xxx")


def _certificate(tmp_path: Path, name: str = "node") -> tuple[Path, Path]:
    return peers.self_signed_certificate(tmp_path, name)


def test_tls_client_trusts_only_the_configured_ca_bundle(tmp_path: Path) -> None:
    """A PACS certificate the hospital's bundle did not issue is refused, even one a public CA would
    vouch for: with a bundle, the system's CA store is not loaded at all."""
    trusted, _ = _certificate(tmp_path, "trusted")
    cert, key = _certificate(tmp_path)
    with_bundle = client_context(TlsSettings(ca_certificates=trusted))
    assert len(with_bundle.get_ca_certs()) == 1
    assert with_bundle.verify_mode == ssl.CERT_REQUIRED
    server = server_context(TlsSettings(enabled=True, certificate=cert, private_key=key,
                                        require_client_certificate=False))
    node = _listener(tmp_path, ssl_context=server)
    try:
        with pytest.raises(AssociationError):
            scu.echo("127.0.0.1", node.scp.port, "CXRNODE", calling_aet=CALLER, tls=with_bundle, timeout=5)
    finally:
        node.scp.stop()
    assert client_context(TlsSettings()).check_hostname  # public CAs: only for the name they certify


@contextlib.contextmanager
def _node_log() -> Iterator[io.StringIO]:
    """The node's own log handler (its filters included), into a string."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(level="INFO"), stream=stream)
    yield stream


@pytest.mark.usefixtures("restore_logging")
def test_a_tls_destination_the_node_does_not_trust_is_named_so_not_unreachable(tmp_path: Path) -> None:
    """A PACS certificate from another CA was reported as "cannot connect ... (it accepts connections
    again)", the reason only in pynetdicom's ERROR traceback, on every retry (review)."""
    storescp = peers.executable("storescp")
    pacs_cert, pacs_key = _certificate(tmp_path, "pacs")
    hospital_ca, _ = _certificate(tmp_path, "hospital-ca")
    port = peers.free_port()
    node = client_context(TlsSettings(ca_certificates=hospital_ca))
    with peers.serving([storescp, "+tls", str(pacs_key), str(pacs_cert), "-ic", str(port)], port), \
            _node_log() as log:
        with pytest.raises(AssociationError) as refused:
            scu.echo("127.0.0.1", port, "PACS", calling_aet=CALLER, tls=node, timeout=5)
    assert str(refused.value) == (f"cannot connect to PACS at 127.0.0.1:{port} (TLS: the destination's "
                                  "certificate is not trusted (self-signed certificate))")
    assert "ERROR" not in log.getvalue() and "Traceback" not in log.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_cxr_node_echo_calls_a_tls_peer_with_the_nodes_tls_settings(
    cli_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cxr-node echo HOST PORT AET` had no way to speak TLS: a node on TLS, or a new TLS PACS before it is
    added as a destination, could not be checked with it ("does the port expect TLS?")."""
    from dicom_node import cli

    storescp = peers.executable("storescp")
    pacs_cert, pacs_key = _certificate(tmp_path, "pacs")
    node_cert, node_key = _certificate(tmp_path, "node")
    port = peers.free_port()
    cli_env.setenv("CXR_NODE__DICOM__TLS__CERTIFICATE", str(node_cert))
    cli_env.setenv("CXR_NODE__DICOM__TLS__PRIVATE_KEY", str(node_key))
    cli_env.setenv("CXR_NODE__DICOM__TLS__CA_CERTIFICATES", str(pacs_cert))
    with peers.serving([storescp, "+tls", str(pacs_key), str(pacs_cert), "+cf", str(node_cert), "-rc",
                        str(port)], port):
        assert cli.main(["echo", "127.0.0.1", str(port), "PACS", "--tls"]) == 0
    assert f"C-ECHO PACS at 127.0.0.1:{port} (TLS): status 0x0000" in capsys.readouterr().out


@pytest.mark.usefixtures("restore_logging")
def test_a_tls_destination_that_refuses_the_nodes_certificate_says_so(tmp_path: Path) -> None:
    """Under TLS 1.3 the PACS refuses the client's certificate after the handshake: it was "no
    association (aborted or timed out)" (review)."""
    storescp = peers.executable("storescp")
    pacs_cert, pacs_key = _certificate(tmp_path, "pacs")
    node_cert, node_key = _certificate(tmp_path, "node")
    hospital_ca, _ = _certificate(tmp_path, "hospital-ca")  # the PACS trusts it; it did not sign the node's
    port = peers.free_port()
    node = client_context(TlsSettings(ca_certificates=pacs_cert, certificate=node_cert, private_key=node_key))
    with peers.serving([storescp, "+tls", str(pacs_key), str(pacs_cert), "+cf", str(hospital_ca), "-rc",
                        str(port)], port), _node_log() as log:
        with pytest.raises(AssociationError) as refused:
            scu.echo("127.0.0.1", port, "PACS", calling_aet=CALLER, tls=node, timeout=5)
    said = str(refused.value)
    assert said.startswith(f"no association with PACS at 127.0.0.1:{port} (TLS: the destination refused "
                           "the handshake (")
    assert "ALERT" in said
    assert "ERROR" not in log.getvalue() and "Traceback" not in log.getvalue()


@contextlib.contextmanager
def _stand_in(answer: bytes | None) -> Iterator[int]:
    """A loopback peer that reads an association request and sends ``answer`` (None: says nothing and
    keeps the connection open). Yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            connection, _ = server.accept()
            held.append(connection)
            connection.recv(4096)
            if answer is not None:
                connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        thread.join(timeout=5)
        for connection in held:
            connection.close()


def test_a_request_the_peer_aborts_or_leaves_unanswered_is_told_apart() -> None:
    """Both were "no association … (aborted or timed out)": an A-ABORT PDU (PS3.8 9.3.8) is named, and
    silence names the time waited."""
    a_abort = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0)  # service user, no reason
    with _stand_in(a_abort) as port, pytest.raises(AssociationError) as aborted:
        scu.echo("127.0.0.1", port, "PACS", calling_aet=CALLER, timeout=5)
    assert str(aborted.value) == (f"no association with PACS at 127.0.0.1:{port} (the destination aborted "
                                  "the association request (A-ABORT): does it know the node's AE title?)")
    with _stand_in(None) as port, pytest.raises(AssociationError) as silent:
        scu.echo("127.0.0.1", port, "PACS", calling_aet=CALLER, timeout=1.5)
    assert str(silent.value) == (f"no association with PACS at 127.0.0.1:{port} (no answer to the "
                                 "association request within 1.5 s)")


def test_a_tls_file_that_cannot_be_read_is_named_with_its_setting(tmp_path: Path) -> None:
    """"cannot load TLS certificate/key/CA: [Errno 2] No such file or directory" named neither (review)."""
    cert, key = _certificate(tmp_path)
    missing = tmp_path / "hospital-ca.pem"
    with pytest.raises(ConfigurationError) as error:
        server_context(TlsSettings(enabled=True, certificate=cert, private_key=key, ca_certificates=missing))
    assert str(error.value) == f"cannot load dicom.tls.ca_certificates {missing}: No such file or directory"
    with pytest.raises(ConfigurationError, match=rf"^cannot load dicom.tls.certificate {cert}, "
                                                 rf"dicom.tls.private_key {cert}: "):
        client_context(TlsSettings(certificate=cert, private_key=cert))  # a certificate where the key goes


def test_a_private_key_with_a_passphrase_is_refused_in_words_without_a_prompt(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A key encrypted with a passphrase made OpenSSL prompt "Enter PEM pass phrase:" on the terminal: an
    interactive ``serve`` waited there, the outbox thread at its first TLS delivery; under systemd the
    node stopped with "cannot load ...: Invalid argument" (review)."""
    cert, plain_key = _certificate(tmp_path)
    key = tmp_path / "encrypted.key"
    subprocess.run([peers.executable("openssl"), "pkey", "-in", str(plain_key), "-aes256", "-passout",
                    "pass:hospital", "-out", str(key)], check=True, capture_output=True)
    said = (f"cannot load dicom.tls.certificate {cert}, dicom.tls.private_key {key}: the private key is "
            "encrypted with a passphrase, which the node cannot be given; store it decrypted (openssl pkey "
            "-in KEY -out NEW_KEY), readable by the node's user only")
    with pytest.raises(ConfigurationError) as error:
        server_context(TlsSettings(enabled=True, certificate=cert, private_key=key, ca_certificates=cert))
    assert str(error.value) == said
    with pytest.raises(ConfigurationError) as error:
        client_context(TlsSettings(certificate=cert, private_key=key))
    assert str(error.value) == said
    assert "pass phrase" not in capfd.readouterr().err
    assert client_context(TlsSettings(certificate=cert, private_key=plain_key))  # a plain key as before


def test_tls_listener_accepts_tls_and_refuses_plain(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    server = server_context(TlsSettings(enabled=True, certificate=cert, private_key=key,
                                        require_client_certificate=False))
    node = _listener(tmp_path, ssl_context=server)
    try:
        client = client_context(TlsSettings(ca_certificates=cert))
        assert scu.echo("127.0.0.1", node.scp.port, "CXRNODE", calling_aet=CALLER, tls=client) == 0
        with pytest.raises(AssociationError):
            scu.echo("127.0.0.1", node.scp.port, "CXRNODE", calling_aet=CALLER, timeout=5)
    finally:
        node.scp.stop()


def _closed_by_peer(sock: socket.socket, within: float) -> float:
    """Seconds until the node closed ``sock`` (which sends nothing more); fails after ``within``."""
    sock.settimeout(within)
    started = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(65536):
            pass
    return time.monotonic() - started


@pytest.mark.parametrize("holder", ["the node's own writer", "another program"])
def test_the_caller_check_does_not_wait_behind_a_writer(
    listener: Listener, tmp_path: Path, holder: str
) -> None:
    """Every SQLite transaction of the node took the write lock at BEGIN, the association request's check of
    the calling AE title too: it queued behind each image being stored and, while another program held the
    file (the sqlite3 shell, a backup), waited up to 30 s, past the sender's ACSE time-out. A read-only
    transaction reads the last commit and waits for nobody."""
    import sqlite3

    if holder == "another program":
        other = sqlite3.connect(tmp_path / "node.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        release = other.rollback
    else:
        session = listener.sessions()
        session.connection()  # BEGIN IMMEDIATE, behind the node's writer lock
        release = session.close
    try:
        started = time.monotonic()
        assert scu.echo("127.0.0.1", listener.scp.port, "CXRNODE", calling_aet=CALLER, timeout=10) == 0
        assert time.monotonic() - started < 3  # not the 30 s of SQLite's lock time-out
        with pytest.raises(AssociationError, match="calling AE title not recognised"):  # still checked
            scu.echo("127.0.0.1", listener.scp.port, "CXRNODE", calling_aet="STRANGER", timeout=10)
    finally:
        release()


def _associated(port: int) -> tuple[Association, socket.socket]:
    """A pynetdicom association of the allowed caller with the node, and its socket to write raw PDUs to."""
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    assert sock is not None
    return assoc, sock


def _wait_for_a_free_slot(port: int) -> None:
    """Until a C-ECHO succeeds: the listener's thread lets the slot go a moment after the close."""
    def slot_free() -> bool:
        try:
            return scu.echo("127.0.0.1", port, "CXRNODE", calling_aet=CALLER, timeout=5) == 0
        except AssociationError:
            return False

    deadline = time.monotonic() + 10
    while not slot_free():
        assert time.monotonic() < deadline, "the association slot was not freed"
        time.sleep(0.2)


def test_an_association_past_the_limit_is_rejected_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom rejected it with one INFO line the node's logging leaves out: during a burst the PACS
    logged "local limit exceeded" and the node's log showed nothing (review)."""
    node = _listener(tmp_path, settings=DicomSettings(port=0, bind_address="127.0.0.1", max_associations=2))
    held = [_associated(node.scp.port)[0] for _ in range(2)]
    try:
        with caplog.at_level(logging.INFO, logger="dicom_node"), pytest.raises(
            AssociationError, match=r"transient; service provider \(presentation\): local limit exceeded"
        ):
            scu.echo("127.0.0.1", node.scp.port, "CXRNODE", calling_aet=CALLER)
        [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning == (f"association from {CALLER!r} at 127.0.0.1 rejected (transient, local limit "
                           "exceeded): 2 associations already open in this listener process "
                           "(dicom.max_associations)")
    finally:
        for assoc in held:
            assoc.release()
        node.scp.stop()


def test_a_peer_that_stops_in_the_middle_of_a_pdu_loses_its_connection_and_its_slot(tmp_path: Path) -> None:
    """The listener reads a PDU whole, blocking, with no time-out on the connection: a sender that lost
    power or network in the middle of a C-STORE (no FIN) kept its thread and its association slot until
    it closed the connection itself. A few of them and every sender was rejected (review)."""
    settings = DicomSettings(port=0, bind_address="127.0.0.1", acse_timeout=1.5, network_timeout=1.5,
                             max_associations=1)
    node = _listener(tmp_path, settings=settings)
    try:
        with socket.create_connection(("127.0.0.1", node.scp.port)) as raw:  # half an A-ASSOCIATE-RQ
            raw.sendall(struct.pack(">BBL", 0x01, 0, 1000) + bytes(11))
            assert _closed_by_peer(raw, within=10) < 6
        with socket.create_connection(("127.0.0.1", node.scp.port)) as raw:  # one trickled a byte at a time
            raw.sendall(struct.pack(">BBL", 0x01, 0, 1000))
            started = time.monotonic()
            with contextlib.suppress(OSError):  # the node closes it: a send or the read below finds out
                for _ in range(12):
                    time.sleep(0.5)
                    raw.sendall(b"\0")
            _closed_by_peer(raw, within=10)
            assert time.monotonic() - started < 5  # the ACSE time-out (1.5 s) bounds the whole request
        assoc, sock = _associated(node.scp.port)
        sock.sendall(struct.pack(">BBL", 0x04, 0, 100_000) + bytes(500))  # half a P-DATA-TF, then silence
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not assoc.is_established
        _wait_for_a_free_slot(node.scp.port)
    finally:
        node.scp.stop()


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_peer_cut_off_in_the_middle_of_a_pdu_is_one_warning_naming_it_not_an_error(
    listener: Listener, caplog: pytest.LogCaptureFixture, reset: bool
) -> None:
    """A sender killed or powered off in the middle of a C-STORE (its connection closed, or reset) is
    routine trouble of the network, as a peer too slow with a PDU is (a WARNING): it was an ERROR,
    "received PDU shorter than announced" or "... closed before the entire PDU was received", which
    operators alert on, and the first did not say which peer it was (review)."""
    with caplog.at_level(logging.INFO):
        assoc, sock = _associated(listener.scp.port)
        sock.sendall(struct.pack(">BBL", 0x04, 0, 100_000) + bytes(500))  # half a P-DATA-TF
        time.sleep(0.2)  # the listener is reading it
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        deadline = time.monotonic() + 10

        def said() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("dicom_node")]

        while not said() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything said after it
        assoc.abort()
    [warning] = said()
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(f"calling AE {CALLER!r} at 127.0.0.1 cut off in the middle of a PDU")
    _wait_for_a_free_slot(listener.scp.port)


def test_a_peer_that_trickles_a_pdu_after_the_association_is_accepted_loses_its_slot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once associated, each read waited the network time-out for the peer's *next* bytes only: a caller
    sending a P-DATA-TF a byte every half second (a failing NIC, a degrading WAN link, or a peer that
    learnt an accepted AE title) kept its thread and its association slot for ever, and with
    ``max_associations`` of them every real sender was rejected. A PDU must now be whole within the
    network time-out of its first byte."""
    settings = DicomSettings(port=0, bind_address="127.0.0.1", acse_timeout=1.5, network_timeout=1.5,
                             max_associations=1)
    node = _listener(tmp_path, settings=settings)
    try:
        assoc, sock = _associated(node.scp.port)
        # a P-DATA-TF whose data value would be patient data, never sent whole here
        pdu = struct.pack(">BBLLBB", 0x04, 0, 1000, 994, 1, 0) + SENTINEL.encode().ljust(992, b" ")
        started = time.monotonic()
        with caplog.at_level("WARNING"), contextlib.suppress(OSError):  # a send may find it closed
            for byte in pdu[:40]:  # 20 s at most: each byte well within the network time-out
                if not assoc.is_established:
                    break
                sock.sendall(bytes([byte]))
                time.sleep(0.5)
        # the node closes the connection: the requestor's own thread sees that a moment after a send failed
        deadline = time.monotonic() + 3
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not assoc.is_established, "the trickling peer kept its association"
        assert time.monotonic() - started < 8  # the network time-out (1.5 s) bounds the whole PDU
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warnings == [f"calling AE {CALLER!r} at 127.0.0.1 too slow in the middle of a PDU (PDU not "
                            "complete 1.5 s after its first byte (network time-out)); connection closed"]
        assert SENTINEL[:4] not in caplog.text
        _wait_for_a_free_slot(node.scp.port)
    finally:
        node.scp.stop()


def test_a_silent_connection_does_not_hold_up_other_tls_associations(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom shook hands on the one accepting thread without a time-out: a TCP health check or a
    half-open connection that sent nothing stopped every TLS association until it went away."""
    cert, key = _certificate(tmp_path)
    server = server_context(TlsSettings(enabled=True, certificate=cert, private_key=key,
                                        require_client_certificate=False))
    node = _listener(tmp_path, ssl_context=server)
    client = client_context(TlsSettings(ca_certificates=cert))
    try:
        with socket.create_connection(("127.0.0.1", node.scp.port)) as silent, caplog.at_level("INFO"):
            assert scu.echo("127.0.0.1", node.scp.port, "CXRNODE", calling_aet=CALLER, tls=client,
                            timeout=5) == 0
            with socket.create_connection(("127.0.0.1", node.scp.port)) as plain:
                plain.sendall(b"\x01\x00" + bytes(70))  # an A-ASSOCIATE-RQ without TLS: not a handshake
                plain.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    assert plain.recv(100)[:1] in (b"", b"\x15")  # closed, or a TLS alert
            silent.close()
            assert scu.echo("127.0.0.1", node.scp.port, "CXRNODE", calling_aet=CALLER, tls=client) == 0
    finally:
        node.scp.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # the plain A-ASSOCIATE-RQ is a failed handshake worth a warning; the silent connection that closed
    # is what a load balancer's TCP check does every few seconds: INFO
    assert warnings == [
        "TLS handshake with 127.0.0.1 failed: the caller does not speak TLS (WRONG_VERSION_NUMBER)"
    ]
    assert "connection from 127.0.0.1 ended before a TLS handshake" in caplog.text


def _mutual_tls_listener(tmp_path: Path) -> tuple[Listener, Path, tuple[Path, Path]]:
    """A listener on TLS that requires a client certificate: it, its certificate, and the one modality
    certificate (and key) its CA bundle trusts."""
    cert, key = _certificate(tmp_path)
    client_cert, client_key = _certificate(tmp_path, "modality")
    server = server_context(TlsSettings(enabled=True, certificate=cert, private_key=key,
                                        ca_certificates=client_cert, require_client_certificate=True))
    return _listener(tmp_path, ssl_context=server), cert, (client_cert, client_key)


def test_dcmtk_echoes_over_mutual_tls_while_a_connection_stays_silent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hospital's tool against the listener with client certificates required (BCP 195 profile). A
    caller's certificate from another CA is logged with the verification's reason, not only OpenSSL's
    CERTIFICATE_VERIFY_FAILED, which an expired certificate gives too (review)."""
    echoscu = peers.executable("echoscu")
    node, cert, (client_cert, client_key) = _mutual_tls_listener(tmp_path)
    command = [echoscu, "-to", "10", "-aet", CALLER, "-aec", "CXRNODE", "+tls", str(client_key),
               str(client_cert), "+cf", str(cert), "127.0.0.1", str(node.scp.port)]
    try:
        with socket.create_connection(("127.0.0.1", node.scp.port)):
            echo = subprocess.run(command, capture_output=True, text=True, timeout=30)
        stranger_cert, stranger_key = _certificate(tmp_path, "stranger")
        with caplog.at_level("WARNING", logger="dicom_node.scp"):
            stranger = subprocess.run([*command[:8], str(stranger_key), str(stranger_cert), *command[10:]],
                                      capture_output=True, text=True, timeout=30)
    finally:
        node.scp.stop()
    assert echo.returncode == 0, echo.stderr
    assert stranger.returncode != 0  # a certificate the node's CA bundle did not issue
    assert "TLS handshake with 127.0.0.1 failed: the caller's certificate is not trusted (self-signed " \
        "certificate)" in caplog.messages


def test_a_caller_without_a_certificate_or_with_an_older_tls_profile_is_refused_in_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A modality set to DICOM's older AES TLS profile (RSA key exchange), or without a certificate of its
    own, was logged as a bare NO_SHARED_CIPHER or PEER_DID_NOT_RETURN_A_CERTIFICATE (review)."""
    echoscu = peers.executable("echoscu")
    node, cert, (client_cert, client_key) = _mutual_tls_listener(tmp_path)
    command = [echoscu, "-to", "10", "-aet", CALLER, "-aec", "CXRNODE", "+cf", str(cert), "127.0.0.1",
               str(node.scp.port)]
    try:
        with caplog.at_level("WARNING", logger="dicom_node.scp"):
            aes_profile = subprocess.run([*command, "+tls", str(client_key), str(client_cert), "+pa"],
                                         capture_output=True, text=True, timeout=30)
            anonymous = subprocess.run([*command, "+tla"], capture_output=True, text=True, timeout=30)
            bcp195 = subprocess.run([*command, "+tls", str(client_key), str(client_cert)],
                                    capture_output=True, text=True, timeout=30)
    finally:
        node.scp.stop()
    assert aes_profile.returncode != 0 and anonymous.returncode != 0
    assert bcp195.returncode == 0, bcp195.stderr
    assert caplog.messages == [
        "TLS handshake with 127.0.0.1 failed: the caller offers no cipher suite of the BCP 195 TLS profiles "
        "(ECDHE or DHE key exchange); the older AES and Basic DICOM TLS profiles are not supported "
        "(NO_SHARED_CIPHER)",
        "TLS handshake with 127.0.0.1 failed: the caller presented no certificate "
        "(dicom.tls.require_client_certificate) (PEER_DID_NOT_RETURN_A_CERTIFICATE)",
    ]


def test_a_dicom_port_in_use_is_one_error_naming_the_port_and_setting(tmp_path: Path) -> None:
    """A port in use (11112 is a common one) stopped `serve` with a 30-line traceback of pynetdicom's
    server_bind that named neither the port nor the setting (review)."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    db.upgrade(engine)
    sessions = db.make_session_factory(engine)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        scp = build_scp(DicomSettings(port=port, bind_address="127.0.0.1"),
                        Ingestor(sessions, FileStore(tmp_path / "instances")), sessions)
        with pytest.raises(ConfigurationError, match=rf"cannot bind 127\.0\.0\.1:{port} \(dicom\.port"):
            scp.start()
    engine.dispose()
