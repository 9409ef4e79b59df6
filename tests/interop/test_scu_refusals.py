"""A PACS that refuses the node's results: the node says why, in the peer's own terms (real DCMTK peers)."""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_node import scu
from dicom_node.errors import AssociationError
from dicom_node.logconfig import QUIET_LOGGERS, configure_logging
from dicom_node.settings import LoggingSettings
from tests import peers
from tests.node_datasets import make_cr
from tests.orthanc import OrthancServer

pytestmark = pytest.mark.interop


def test_a_rejected_association_names_the_result_source_and_reason(tmp_path: Path) -> None:
    """A wrong called AE title: the message said only "association rejected by …", the reason was in
    pynetdicom's ERROR lines only."""
    with peers.dcmqrscp(tmp_path, "PACS2") as port:
        with pytest.raises(AssociationError) as raised:
            scu.echo("127.0.0.1", port, "PACS2X", calling_aet="CXRNODE", timeout=10)
        assert str(raised.value) == (
            f"association rejected by PACS2X at 127.0.0.1:{port} "
            "(permanent; service user: called AE title not recognised)"
        )
        assert scu.echo("127.0.0.1", port, "PACS2", calling_aet="CXRNODE", timeout=10) == 0


def test_an_association_without_an_accepted_context_says_what_the_peer_refused(tmp_path: Path) -> None:
    """A PACS that stores no Computed Radiography (storescp with a CT-only profile) accepts the association
    and refuses every context; pynetdicom aborts it, and the node said "no association … (aborted or timed
    out)". Each object is refused 0x0122 as in an association accepted for other objects: the outbox
    takes that for a refusal of the object, not a network failure to retry for days."""
    with peers.storescp_accepting(tmp_path, "PACS2", "CTImageStorage") as port:
        statuses = scu.send([make_cr(), make_cr()], "127.0.0.1", port, "PACS2", calling_aet="CXRNODE",
                            timeout=10)
        with pytest.raises(AssociationError) as raised:  # an echo has no statuses: it says the same
            scu.echo("127.0.0.1", port, "PACS2", calling_aet="CXRNODE", timeout=10)
    reason = (
        f"PACS2 at 127.0.0.1:{port} accepted none of the proposed presentation contexts (Computed "
        "Radiography Image Storage in Explicit VR Little Endian or Implicit VR Little Endian: SOP class not "
        "supported)"
    )
    assert statuses == [0x0122, 0x0122]
    assert scu.describe(statuses[0]) == f"failure status 0x0122 (not sent: {reason})"
    assert str(raised.value).startswith(f"PACS2 at 127.0.0.1:{port} accepted none of the proposed")


def test_an_object_whose_context_was_refused_says_so(tmp_path: Path) -> None:
    """In an association the peer accepted for other objects: the object's status said only 0x0122."""
    ct = make_cr()
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    with peers.storescp_accepting(tmp_path, "PACS2", "CTImageStorage") as port:
        statuses = scu.send([ct, make_cr()], "127.0.0.1", port, "PACS2", calling_aet="CXRNODE", timeout=10)
    assert statuses == [0x0000, 0x0122]
    assert scu.describe(statuses[1]) == (
        "failure status 0x0122 (not sent: the peer accepted no presentation context for Computed Radiography "
        "Image Storage)"
    )


def _implicit_with_a_value_of_the_wrong_length() -> Dataset:
    """A Secondary Capture object as read from an Implicit VR file whose Rows (US) has 3 bytes: sent as it
    is, its bytes go unread; converted to Explicit VR, pydicom must decode the value, and cannot."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=True, little_endian=True)
    rows = struct.pack("<HHI", 0x0028, 0x0010, 3) + b"\x01\x02\x03"
    return dcmread(io.BytesIO(buffer.getvalue() + rows))


def test_an_object_that_cannot_be_encoded_as_the_peer_accepts_it_says_so(
    tmp_path: Path, node_logging: io.StringIO
) -> None:
    """A PACS that takes the object's SOP class in Explicit VR only, and an Implicit VR object that pydicom
    cannot convert: the reason was "the peer accepted no presentation context for …", which it had, and
    the operator went looking at the PACS's configuration. pynetdicom's three ERROR lines (one a
    traceback) for it are kept at INFO, as its others for what the node says itself."""
    with peers.storescp_accepting(tmp_path, "PACS2", "SecondaryCaptureImageStorage",
                                  ("LocalEndianExplicit",)) as port:
        statuses = scu.send([_implicit_with_a_value_of_the_wrong_length()], "127.0.0.1", port, "PACS2",
                            calling_aet="CXRNODE", timeout=10)
    assert statuses == [0x0122]
    assert scu.describe(statuses[0]) == (
        "failure status 0x0122 (not sent: the peer accepted Secondary Capture Image Storage only in Explicit "
        "VR Little Endian, and the object, in Implicit VR Little Endian, cannot be encoded in it)"
    )
    assert " ERROR " not in node_logging.getvalue(), node_logging.getvalue()


def test_orthancs_web_port_is_named_as_such(tmp_path: Path, node_logging: io.StringIO) -> None:
    """A destination entered with Orthanc's HTTP port (8042) instead of its DICOM port (4242): the echo
    test and the delivery said "no association … (aborted or timed out)", and pynetdicom logged an ERROR
    "Unknown PDU type received '0x48'" (the H of HTTP)."""
    orthanc = OrthancServer(tmp_path / "orthanc")
    orthanc.start()
    try:
        with pytest.raises(AssociationError) as raised:
            scu.echo("127.0.0.1", orthanc.http_port, orthanc.ae_title, calling_aet="CXRNODE", timeout=10)
        assert str(raised.value) == (
            f"no association with {orthanc.ae_title} at 127.0.0.1:{orthanc.http_port} (the destination "
            f"answers HTTP, not DICOM: is {orthanc.http_port} its web port?)"
        )
        assert scu.echo("127.0.0.1", orthanc.dicom_port, orthanc.ae_title, calling_aet="CXRNODE") == 0
    finally:
        orthanc.stop()
    assert " ERROR " not in node_logging.getvalue(), node_logging.getvalue()


def test_a_tls_port_called_without_tls_is_suspected(tmp_path: Path, node_logging: io.StringIO) -> None:
    """DCMTK's storescp +tls closes a plain connection without a word: it was "aborted or timed out", with
    pynetdicom's ERROR and the traceback of the reset connection in the log."""
    cert, key = peers.self_signed_certificate(tmp_path, "pacs")
    port = peers.free_port()
    with peers.serving([peers.executable("storescp"), "+tls", str(key), str(cert), "-ic", str(port)], port):
        with pytest.raises(AssociationError) as raised:
            scu.echo("127.0.0.1", port, "PACS", calling_aet="CXRNODE", timeout=10)
    assert str(raised.value) == (
        f"no association with PACS at 127.0.0.1:{port} (the destination closed the connection without "
        "answering; does the port expect TLS?)"
    )
    assert " ERROR " not in node_logging.getvalue(), node_logging.getvalue()


@pytest.fixture
def node_logging() -> Iterator[io.StringIO]:
    """The service's logging (dicom_node.logconfig) into a buffer; the test run's own restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    stream = io.StringIO()
    configure_logging(LoggingSettings(level="INFO"), stream=stream)
    yield stream
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, quiet_level in quiet.items():
        logging.getLogger(name).setLevel(quiet_level)


def test_pynetdicom_adds_no_error_line_to_what_the_node_says(
    tmp_path: Path, node_logging: io.StringIO
) -> None:
    """Operator guide section 6: a failed attempt is one WARNING with the reason. pynetdicom added one to
    three ERROR lines ("Association Rejected", "No accepted presentation contexts", …) that set off ERROR
    alerts."""
    ct = make_cr()
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    (tmp_path / "qr").mkdir()
    with peers.dcmqrscp(tmp_path / "qr", "PACS2") as port, pytest.raises(AssociationError):
        scu.echo("127.0.0.1", port, "PACS2X", calling_aet="CXRNODE", timeout=10)
    with peers.storescp_accepting(tmp_path, "PACS2", "CTImageStorage") as port:
        refused = scu.send([make_cr()], "127.0.0.1", port, "PACS2", calling_aet="CXRNODE", timeout=10)
        assert refused == [0x0122]
        assert scu.send([ct, make_cr()], "127.0.0.1", port, "PACS2", calling_aet="CXRNODE", timeout=10)[1]
    assert " ERROR " not in node_logging.getvalue(), node_logging.getvalue()
    assert "pynetdicom" not in node_logging.getvalue()  # at INFO they are below pynetdicom's WARNING level
