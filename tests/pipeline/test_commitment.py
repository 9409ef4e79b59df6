"""Storage commitment: the outbox asks (N-ACTION), the node's listener records the PACS's report
(N-EVENT-REPORT), time-outs ask again, and reports the node cannot take are refused with a status.

The PACS is a pynetdicom AE that stores, answers N-ACTION and reports on an association it opens to the
node's own listener (:func:`dicom_node.scp.build_scp`), as Orthanc does; the interop tier does the same
with a real Orthanc (tests/interop/test_storage_commitment.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import aes, commitment, scu
from dicom_node.errors import AssociationError
from dicom_node.ingest import Ingestor
from dicom_node.outbox import NOT_KEPT, Outbox, requeue
from dicom_node.scp import StorageScp, build_scp
from dicom_node.settings import DicomSettings, OutboxSettings
from dicom_node.store.db import session_scope
from dicom_node.store.files import FileStore
from dicom_node.store.models import AeRole, CommitmentState, Delivery, DeliveryState, Instance, RemoteAe
from tests.node_process import wait_until
from tests.pipeline.storepeer import StorePeer
from tests.pipeline.test_outbox import _deliveries

pytestmark = pytest.mark.network

INSTANCE = "1.2.840.10008.1.20.1.1"
#: The storage commitment time-out of the tests that wait for it: the calls a test makes within it must
#: fall within it on a loaded CI machine too (0.3 s did not: CI run 41)
WINDOW = 1.5


#: How a PACS that reports on the request's own association answers: (kept, {not kept: Failure Reason})
Verdict = tuple[list[str], dict[str, int]]


class CommitPeer(StorePeer):
    """A PACS that stores, answers N-ACTION with ``action_status`` and keeps the requests it got. With
    ``verdict`` it then reports on the request's own association, as PS3.4 J.3.3 allows and some PACSs do
    (Orthanc opens an association of its own: :func:`report`)."""

    def __init__(self, action_status: int = 0x0000, action_seconds: float = 0.0,
                 verdict: Callable[[list[str]], Verdict] | None = None) -> None:
        super().__init__()
        self.action_status = action_status
        self.action_seconds = action_seconds  # how long it takes to answer an N-ACTION
        self.verdict = verdict
        self.requests: list[tuple[str, list[str]]] = []  # (Transaction UID, SOP Instance UIDs)
        self.report_statuses: list[int] = []  # the node's answers to reports on the request's association
        self.answered_at: list[float] = []  # when it answered each N-ACTION (time.monotonic)
        self.released_at: list[float] = []  # when each association was released (time.monotonic)
        self._to_report: dict[Association, tuple[str, list[str], dict[str, int]]] = {}
        self.aborted = 0  # associations the node aborted

    def _record_request(self, event: Event) -> tuple[str, list[str]]:
        """The request's Transaction UID and SOP Instance UIDs, kept in ``requests``."""
        info = event.action_information
        request = (str(info.TransactionUID),
                   [str(item.ReferencedSOPInstanceUID) for item in info.ReferencedSOPSequence])
        self.requests.append(request)
        return request

    def _on_action(self, event: Event) -> tuple[int, None]:
        time.sleep(self.action_seconds)
        transaction, uids = self._record_request(event)
        if self.verdict is not None:  # reported once the N-ACTION response has gone (_on_pdu_sent)
            self._to_report[event.assoc] = (transaction, *self.verdict(uids))
        self.answered_at.append(time.monotonic())
        return self.action_status, None

    def _on_pdu_sent(self, event: Event) -> None:
        if isinstance(event.pdu, P_DATA_TF) and event.assoc in self._to_report:
            report = self._to_report.pop(event.assoc)
            threading.Thread(target=self._report_here, args=(event.assoc, *report)).start()

    def _report_here(self, assoc: Association, transaction: str, kept: list[str], failed: dict[str, int]
                     ) -> None:
        info, kind = report_information(transaction, kept, failed)
        status, _ = assoc.send_n_event_report(info, kind, StorageCommitmentPushModel, INSTANCE)
        self.report_statuses.append(int(status.Status) if "Status" in status else -1)

    def _on_released(self, event: Event) -> None:
        self.released_at.append(time.monotonic())

    def _on_aborted(self, event: Event) -> None:
        self.aborted += 1

    def start(self) -> CommitPeer:
        from pynetdicom import AllStoragePresentationContexts

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(StorageCommitmentPushModel)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_N_ACTION, self._on_action), (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_PDU_SENT, self._on_pdu_sent), (evt.EVT_ABORTED, self._on_aborted)])
        return self


def report_information(transaction_uid: str | None, kept: list[str], failed: dict[str, int],
                       event_type: int | None = None) -> tuple[Dataset, int]:
    """The Event Information and Event Type ID of a storage commitment result (PS3.4 J.3.3)."""
    info = Dataset()
    if transaction_uid is not None:
        info.TransactionUID = transaction_uid

    def items(uids: list[str]) -> list[Dataset]:
        out = []
        for uid in uids:
            item = Dataset()
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
            item.ReferencedSOPInstanceUID = uid
            if uid in failed:
                item.FailureReason = failed[uid]
            out.append(item)
        return out

    if kept:
        info.ReferencedSOPSequence = items(kept)
    if failed:
        info.FailedSOPSequence = items(list(failed))
    return info, event_type if event_type is not None else (2 if failed else 1)


def report(node_port: int, transaction_uid: str | None, kept: list[str], failed: dict[str, int], *,
           calling: str = "PACS", event_type: int | None = None, scp_role: bool = True) -> int:
    """Send the node a storage commitment result as a PACS does, on an association of its own; returns
    the node's status. ``scp_role``: propose the SCP role (SCP/SCU Role Selection), as the standard has
    it; Orthanc proposes none."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    roles = [build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)] if scp_role else []
    assoc = ae.associate("127.0.0.1", node_port, ae_title="CXRNODE", ext_neg=roles)
    assert assoc.is_established, "the node refused the reporting PACS's association"
    info, kind = report_information(transaction_uid, kept, failed, event_type)
    try:
        status, _ = assoc.send_n_event_report(info, kind, StorageCommitmentPushModel, INSTANCE)
    finally:
        assoc.release()
    return int(status.Status)


@pytest.fixture
def pacs() -> Iterator[CommitPeer]:
    peer = CommitPeer().start()
    yield peer
    peer.stop()


@pytest.fixture
def listener(db: sessionmaker[Session], tmp_path: Path) -> Iterator[tuple[StorageScp, list[int]]]:
    """The node's listener on a free port; PACS is a destination (not a caller); OTHER is a caller."""
    with session_scope(db) as session:
        aes.add(session, aes.AeSpec("OTHER", AeRole.CALLER, "127.0.0.1"), "test")
    woken: list[int] = []
    scp = build_scp(DicomSettings(ae_title="CXRNODE", port=0, bind_address="127.0.0.1"),
                    Ingestor(db, FileStore(tmp_path / "in", fsync=False)), db,
                    outbox_settings=OutboxSettings(refused_attempts=2), on_resend=woken.append)
    scp.start()
    yield scp, woken
    scp.stop()


def _commit_to(db: sessionmaker[Session], destination_pk: int) -> None:
    with session_scope(db) as session:
        session.get_one(RemoteAe, destination_pk).storage_commitment = True


def _rows(db: sessionmaker[Session]) -> dict[int, Delivery]:
    with session_scope(db) as session:
        rows = {d.id: d for d in session.scalars(select(Delivery))}
        session.expunge_all()
        return rows


def _outbox(db: sessionmaker[Session], results: Path, **settings: Any) -> Outbox:
    """An outbox that releases a request's association at once unless told otherwise (these PACSs report
    after the test's next step, on an association of their own)."""
    settings.setdefault("commitment_report_wait_seconds", 0.0)
    return Outbox(db, results, calling_aet="CXRNODE",
                  settings=OutboxSettings(backoff_initial_seconds=60, **settings))


def _asked(db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer, count: int, **settings: Any
           ) -> tuple[int, list[int], Outbox]:
    """``count`` result objects for ``pacs``, set to storage commitment, delivered (and so asked about)
    by an outbox with ``settings``; returns the destination, the deliveries and that outbox."""
    results = tmp_path / "results"
    destination_pk, ids = _deliveries(db, results, pacs.port, count)
    _commit_to(db, destination_pk)
    outbox = _outbox(db, results, **settings)
    outbox.deliver_due(destination_pk)
    return destination_pk, ids, outbox


def test_delivered_objects_are_asked_about_and_the_pacs_report_is_recorded_on_each(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer, listener: tuple[StorageScp, list[int]],
) -> None:
    scp, woken = listener
    results = tmp_path / "results"
    destination_pk, ids = _deliveries(db, results, pacs.port, 2)
    _commit_to(db, destination_pk)
    outbox = _outbox(db, results)
    outbox.deliver_due(destination_pk)

    # one N-ACTION for the batch, after the objects, naming both
    assert len(pacs.requests) == 1
    transaction, asked = pacs.requests[0]
    with session_scope(db) as session:
        uids = {d.id: d.result_object.sop_instance_uid for d in session.scalars(select(Delivery))}
    assert sorted(asked) == sorted(uids.values()) and sorted(pacs.received) == sorted(asked)
    rows = _rows(db)
    assert {(r.commitment, r.commitment_uid, r.commitment_requests) for r in rows.values()} == {
        (CommitmentState.REQUESTED, transaction, 1)}

    kept, dropped = ids
    assert report(scp.port, transaction, [uids[kept]], {uids[dropped]: 0x0112}) == 0x0000
    rows = _rows(db)
    assert (rows[kept].state, rows[kept].commitment) == (DeliveryState.DELIVERED, CommitmentState.COMMITTED)
    assert rows[dropped].state is DeliveryState.RETRYING and rows[dropped].commitment is None
    assert rows[dropped].last_status == 0x0112
    assert rows[dropped].last_error == ("the PACS answered success, then reported that it does not keep it "
                                        "(storage commitment: no such object instance (0x0112))")
    assert woken == [destination_pk]  # the outbox sends it again now, not at its back-off

    # sent again and asked about again, under a new transaction; only that object
    outbox.deliver_due(destination_pk)
    assert pacs.received.count(uids[dropped]) == 2 and pacs.received.count(uids[kept]) == 1
    assert len(pacs.requests) == 2 and pacs.requests[1][1] == [uids[dropped]]
    assert pacs.requests[1][0] != transaction
    with session_scope(db) as session:
        history = [a.outcome for a in session.get_one(Delivery, dropped).attempt_history]
    assert history == ["delivered", NOT_KEPT, "delivered"]

    # a late repeat of the first report changes nothing: that transaction is over for this object
    assert report(scp.port, transaction, [], {uids[dropped]: 0x0112}) == 0x0000
    assert _rows(db)[dropped].commitment is CommitmentState.REQUESTED


def test_a_pacs_that_drops_the_object_each_time_makes_it_dead_after_refused_attempts(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer, listener: tuple[StorageScp, list[int]],
) -> None:
    scp, _ = listener  # refused_attempts=2
    results = tmp_path / "results"
    destination_pk, (pk,) = _deliveries(db, results, pacs.port, 1)
    _commit_to(db, destination_pk)
    outbox = _outbox(db, results)
    for _ in range(2):
        outbox.deliver_due(destination_pk)
        transaction, (uid,) = pacs.requests[-1]
        assert report(scp.port, transaction, [], {uid: 0x0110}) == 0x0000
    row = _rows(db)[pk]
    assert row.state is DeliveryState.DEAD and row.next_attempt_at is None
    assert row.last_error.endswith("processing failure (0x0110)); refused each time: it will be, until the "
                                   "peer's configuration changes; then resend it")
    # the operator's resend starts again, with nothing left of the commitment asked before
    with session_scope(db) as session:
        requeue(session, [pk], "admin")
    row = _rows(db)[pk]
    assert (row.state, row.commitment, row.commitment_uid, row.commitment_note) == (
        DeliveryState.PENDING, None, None, "")
    # and its count: the first copy after the resend that the PACS drops is one, not a third in a row
    outbox.deliver_due(destination_pk)
    transaction, (uid,) = pacs.requests[-1]
    assert report(scp.port, transaction, [], {uid: 0x0110}) == 0x0000
    assert _rows(db)[pk].state is DeliveryState.RETRYING


def test_a_report_without_the_scp_role_proposed_is_taken_as_orthanc_sends_it(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer, listener: tuple[StorageScp, list[int]],
) -> None:
    scp, _ = listener
    destination_pk, (pk,), _ = _asked(db, tmp_path, pacs, 1)
    transaction, uids = pacs.requests[0]
    assert report(scp.port, transaction, uids, {}, scp_role=False) == 0x0000
    assert _rows(db)[pk].commitment is CommitmentState.COMMITTED


def test_no_report_in_time_is_asked_again_then_unconfirmed_with_why(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer,
) -> None:
    results = tmp_path / "results"
    destination_pk, (pk,) = _deliveries(db, results, pacs.port, 1)
    _commit_to(db, destination_pk)
    outbox = _outbox(db, results, commitment_timeout_seconds=WINDOW, commitment_requests=2)
    outbox.deliver_due(destination_pk)
    outbox.request_commitments(destination_pk)  # not overdue yet: not asked again
    assert len(pacs.requests) == 1
    time.sleep(WINDOW + 0.1)
    outbox.request_commitments(destination_pk)
    assert len(pacs.requests) == 2 and pacs.requests[1][0] != pacs.requests[0][0]
    assert _rows(db)[pk].commitment is CommitmentState.REQUESTED
    time.sleep(WINDOW + 0.1)
    outbox.request_commitments(destination_pk)
    assert len(pacs.requests) == 2  # not a third time
    row = _rows(db)[pk]
    assert (row.state, row.commitment) == (DeliveryState.DELIVERED, CommitmentState.UNCONFIRMED)
    assert row.commitment_note == ("the PACS did not report on it after 2 storage commitment requests, "
                                   f"{WINDOW:g} s apart")
    with session_scope(db) as session:
        described = commitment.describe(session.get_one(Delivery, pk))
        assert described == f"not confirmed by the PACS: {row.commitment_note}"


@pytest.mark.parametrize("status, final", [(0x0122, True), (0x0110, False)])
def test_a_refused_request_is_unconfirmed_at_once_and_a_failed_one_asked_again(
    db: sessionmaker[Session], tmp_path: Path, status: int, final: bool,
) -> None:
    """0x0122: the PACS does not offer the service, and would refuse again; 0x0110 may pass."""
    pacs = CommitPeer(action_status=status).start()
    try:
        results = tmp_path / "results"
        destination_pk, (pk,) = _deliveries(db, results, pacs.port, 1)
        _commit_to(db, destination_pk)
        _outbox(db, results, commitment_requests=3).deliver_due(destination_pk)
    finally:
        pacs.stop()
    row = _rows(db)[pk]
    assert row.state is DeliveryState.DELIVERED
    expected = CommitmentState.UNCONFIRMED if final else CommitmentState.REQUESTED  # asked after the time-out
    assert row.commitment is expected, row.commitment_note
    assert f"failure status 0x{status:04X}" in row.commitment_note


def test_a_destination_not_set_to_commitment_is_not_asked(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer,
) -> None:
    results = tmp_path / "results"
    destination_pk, (pk,) = _deliveries(db, results, pacs.port, 1)
    _outbox(db, results).deliver_due(destination_pk)
    assert pacs.requests == [] and _rows(db)[pk].commitment is None


def test_reports_the_node_cannot_take_are_refused_and_change_nothing(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer, listener: tuple[StorageScp, list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    scp, woken = listener
    destination_pk, (pk,), _ = _asked(db, tmp_path, pacs, 1)
    transaction, (uid,) = pacs.requests[0]

    assert report(scp.port, transaction, [uid], {}, event_type=3) == 0x0113  # no such event type
    assert report(scp.port, None, [uid], {}) == 0x0115  # no Transaction UID
    # a caller of the node that is not the PACS asked: it may not answer for it
    assert report(scp.port, transaction, [uid], {}, calling="OTHER") == 0x0115
    assert "the transaction was asked of PACS, not of OTHER" in caplog.text
    # a transaction the node does not know: success, nothing to record
    assert report(scp.port, generate_uid(), [uid], {}) == 0x0000
    assert "for a transaction the node is not waiting for" in caplog.text
    row = _rows(db)[pk]
    assert (row.commitment, row.commitment_uid) == (CommitmentState.REQUESTED, transaction)
    assert woken == []


def test_a_destination_may_report_and_echo_but_not_store(
    db: sessionmaker[Session], tmp_path: Path, listener: tuple[StorageScp, list[int]],
) -> None:
    from pydicom import dcmread

    from tests import peers

    scp, _ = listener
    with session_scope(db) as session:
        aes.add(session, aes.AeSpec("PACS", AeRole.DESTINATION, "127.0.0.1", 104, storage_commitment=True),
                "test")
        aes.add(session, aes.AeSpec("PLAIN", AeRole.DESTINATION, "127.0.0.1", 105), "test")
    ds = dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))  # a chest CR the node would store from a caller
    ae = AE(ae_title="PACS")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CXRNODE")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        response = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert response.Status == 0x0124
    assert response.ErrorComment == "PACS is not an allowed caller of this node"
    with session_scope(db) as session:
        assert session.scalar(select(Instance.id)) is None  # nothing stored
    # a destination not set to storage commitment is refused as any stranger is
    with pytest.raises(AssociationError, match="rejected by CXRNODE .* calling AE title not recognised"):
        scu.echo("127.0.0.1", scp.port, "CXRNODE", calling_aet="PLAIN", timeout=10)


def test_a_sender_asking_the_node_to_commit_is_refused_as_not_authorised_with_why(
    db: sessionmaker[Session], listener: tuple[StorageScp, list[int]], caplog: pytest.LogCaptureFixture,
) -> None:
    """A modality set to ask every destination for storage commitment got 0x0110 (processing failure)
    from pynetdicom, which it retries and alarms on; the node is not the archive."""
    scp, _ = listener
    ae = AE(ae_title="OTHER")  # an allowed caller
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CXRNODE")
    assert assoc.is_established
    request = Dataset()
    request.TransactionUID = generate_uid()
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    item.ReferencedSOPInstanceUID = generate_uid()
    request.ReferencedSOPSequence = [item]
    try:
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, INSTANCE)
    finally:
        assoc.release()
    assert status.Status == 0x0124
    assert status.ErrorComment == "this node is not an archive: ask the PACS for storage commitment"
    assert "N-ACTION from OTHER refused with 0x0124" in caplog.text


def test_a_destination_switched_off_storage_commitment_is_not_asked_again_and_says_why(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer,
) -> None:
    """Switched off with requests outstanding: the node asked the PACS again after the time-out (which it no
    longer lets report: its association is refused), then showed the objects as not confirmed."""
    results = tmp_path / "results"
    destination_pk, ids = _deliveries(db, results, pacs.port, 2)
    _commit_to(db, destination_pk)
    outbox = _outbox(db, results, commitment_timeout_seconds=WINDOW)
    outbox.deliver_due(destination_pk)
    assert len(pacs.requests) == 1
    with session_scope(db) as session:  # as the console and the CLI change it
        aes.update(session, destination_pk, aes.AeSpec("PACS", AeRole.DESTINATION, "127.0.0.1", pacs.port),
                   "admin")
    assert {r.commitment for r in _rows(db).values()} == {None}  # at once: no report is taken now
    time.sleep(WINDOW + 0.1)
    outbox.request_commitments(destination_pk)
    assert len(pacs.requests) == 1  # not asked again
    rows = _rows(db)
    assert {(r.state, r.commitment, r.commitment_uid) for r in rows.values()} == {
        (DeliveryState.DELIVERED, None, None)}
    with session_scope(db) as session:
        assert {commitment.describe(session.get_one(Delivery, pk)) for pk in ids} == {
            "storage commitment was switched off for this destination before the PACS confirmed it"}
    assert outbox._destinations_with_work() == []  # nothing left to sweep for


def test_objects_delivered_as_storage_commitment_is_switched_off_are_not_asked_about(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer,
) -> None:
    """The outbox read the destination's setting when it leased the batch; switched off before it
    recorded the answers, the objects were due to be asked about all the same."""
    results = tmp_path / "results"
    destination_pk, (pk,) = _deliveries(db, results, pacs.port, 1)
    with session_scope(db) as session:
        delivery = session.get_one(Delivery, pk)
        delivery.state, delivery.commitment = DeliveryState.DELIVERED, CommitmentState.DUE
    _outbox(db, results).request_commitments(destination_pk)
    assert pacs.requests == []
    row = _rows(db)[pk]
    assert (row.commitment, row.commitment_note) == (None, commitment.SWITCHED_OFF)


def test_an_object_reported_both_kept_and_failed_is_not_taken_as_kept(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer, listener: tuple[StorageScp, list[int]],
) -> None:
    """A report that contradicts itself for an object (in the Referenced and the Failed SOP Sequence)
    does not commit the PACS to it: it was shown as kept, and counted among objects not asked about."""
    scp, woken = listener
    destination_pk, (pk,), _ = _asked(db, tmp_path, pacs, 1)
    transaction, (uid,) = pacs.requests[0]
    assert report(scp.port, transaction, [uid], {uid: 0x0110}) == 0x0000
    row = _rows(db)[pk]
    assert (row.state, row.commitment) == (DeliveryState.RETRYING, None)
    assert row.commitment_note == "not kept by the PACS: processing failure (0x0110)"
    assert woken == [destination_pk]


def test_a_failed_request_is_asked_again_after_the_time_out_not_at_each_sweep(
    db: sessionmaker[Session], tmp_path: Path,
) -> None:
    """A PACS that fails the N-ACTION (or is unreachable) for a minute: the sweep (every 30 s) asked again
    at once each time, and the objects were "not confirmed" for good after commitment_requests sweeps."""
    pacs = CommitPeer(action_status=0x0110).start()
    try:
        results = tmp_path / "results"
        destination_pk, (pk,) = _deliveries(db, results, pacs.port, 1)
        _commit_to(db, destination_pk)
        outbox = _outbox(db, results, commitment_timeout_seconds=WINDOW, commitment_requests=3)
        outbox.deliver_due(destination_pk)
        for _ in range(3):  # sweeps within the time-out
            outbox.request_commitments(destination_pk)
        assert len(pacs.requests) == 1
        row = _rows(db)[pk]
        assert (row.commitment, row.commitment_requests) == (CommitmentState.REQUESTED, 1)
        assert row.commitment_note == ("the storage commitment request failed (failure status 0x0110); it is "
                                       "asked again")
        assert outbox._destinations_with_work(due_only=True) == []
        pacs.action_status = 0x0000
        time.sleep(WINDOW + 0.1)
        outbox.request_commitments(destination_pk)  # after the time-out: asked again, and taken
        assert len(pacs.requests) == 2
        row = _rows(db)[pk]
        assert (row.commitment, row.commitment_requests, row.commitment_note) == (
            CommitmentState.REQUESTED, 2, "")
    finally:
        pacs.stop()


def test_a_report_sent_twice_is_recorded_once_and_its_repeat_is_no_warning(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer, listener: tuple[StorageScp, list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A PACS that did not get the node's answer to its report sends it again. The repeat was taken for a
    transaction the node does not know (a WARNING that it was asked again since, or sent again)."""
    scp, woken = listener
    destination_pk, (pk,), _ = _asked(db, tmp_path, pacs, 1)
    transaction, (uid,) = pacs.requests[0]
    assert report(scp.port, transaction, [uid], {}) == 0x0000
    first = _rows(db)[pk]
    caplog.clear()
    with caplog.at_level("INFO", logger="dicom_node"):
        assert report(scp.port, transaction, [uid], {}) == 0x0000
    row = _rows(db)[pk]
    assert (row.commitment, row.commitment_at) == (CommitmentState.COMMITTED, first.commitment_at)
    assert [r.levelname for r in caplog.records if "storage commitment report" in r.getMessage()] == ["INFO"]
    assert "repeats one recorded already (1 objects): nothing changed" in caplog.text
    # from another AE title, it is refused as the first would have been
    assert report(scp.port, transaction, [uid], {}, calling="OTHER") == 0x0115
    assert woken == []
    # the PACS's word that it no longer keeps it is taken, though: the object is sent again
    assert report(scp.port, transaction, [], {uid: 0x0110}) == 0x0000
    assert (_rows(db)[pk].state, woken) == (DeliveryState.RETRYING, [destination_pk])


def test_an_unexpected_failure_of_the_request_is_a_failed_request_not_a_failed_delivery(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It escaped deliver_due: the outbox logged the delivery as failed (it was delivered), and the
    destination's next retry was not armed."""
    from dicom_node import scu

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a pynetdicom surprise")

    monkeypatch.setattr(scu, "request_commitment", broken)
    results = tmp_path / "results"
    destination_pk, (pk,) = _deliveries(db, results, pacs.port, 1)
    _commit_to(db, destination_pk)
    report_ = _outbox(db, results).deliver_due(destination_pk)
    assert report_.delivered == [pk]
    row = _rows(db)[pk]
    assert (row.state, row.commitment) == (DeliveryState.DELIVERED, CommitmentState.REQUESTED)
    assert row.commitment_note == ("the storage commitment request failed (unexpected RuntimeError); it is "
                                   "asked again")
    assert "a pynetdicom surprise" not in caplog.text  # its words may quote a dataset


def test_a_request_slower_than_the_time_out_is_not_asked_again_in_the_same_round(
    db: sessionmaker[Session], tmp_path: Path,
) -> None:
    """The outbox looked for overdue requests before each N-ACTION of a round: one answered after the
    time-out (a slow PACS, a loaded machine; CI run 41 on PostgreSQL) was asked again at once."""
    pacs = CommitPeer(action_seconds=0.5).start()
    try:
        _asked(db, tmp_path, pacs, 1, commitment_timeout_seconds=0.3)
    finally:
        pacs.stop()
    assert len(pacs.requests) == 1


def test_a_report_on_the_request_s_own_association_is_recorded_there(
    db: sessionmaker[Session], tmp_path: Path,
) -> None:
    """PS3.4 J.3.3 lets the PACS report on the association of the N-ACTION while it is open. The node
    released it at once, so such a report met a released association; now it waits for it (here with
    no listener at all), records it and answers 0x0000, then releases."""
    pacs = CommitPeer(verdict=lambda uids: (uids[:1], {uid: 0x0112 for uid in uids[1:]})).start()
    try:
        destination_pk, ids, _ = _asked(db, tmp_path, pacs, 2, commitment_report_wait_seconds=30.0)
    finally:
        pacs.stop()
    assert pacs.report_statuses == [0x0000] and len(pacs.requests) == 1
    (transaction, (kept_uid, dropped_uid)), = pacs.requests
    rows = _rows(db)
    with session_scope(db) as session:
        by_uid = {d.result_object.sop_instance_uid: d.id for d in session.scalars(select(Delivery))}
    kept, dropped = rows[by_uid[kept_uid]], rows[by_uid[dropped_uid]]
    assert (kept.state, kept.commitment, kept.commitment_uid) == (
        DeliveryState.DELIVERED, CommitmentState.COMMITTED, transaction)
    assert (dropped.state, dropped.commitment, dropped.last_status) == (DeliveryState.RETRYING, None, 0x0112)
    assert dropped.next_attempt_at is not None  # due now: the PACS is up, it just reported
    # released once the report came, not after the 30 s
    assert len(pacs.released_at) == 2 and pacs.released_at[-1] - pacs.answered_at[0] < 15


def _slow_answers(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.5) -> threading.Event:
    """A delay between the node's taking a report and pynetdicom's sending its answer (a busy CPU).
    Returns an event set once a delayed answer has been made (the node's thread is past the delay)."""
    from pynetdicom.service_class import ServiceClass

    validate = ServiceClass.validate_status
    answered = threading.Event()

    def slow_answer(self: ServiceClass, status: Any, rsp: Any) -> Any:
        if type(rsp).__name__ != "N_EVENT_REPORT":
            return validate(self, status, rsp)
        time.sleep(seconds)  # the busy CPU itself, not a wait for an event
        try:
            return validate(self, status, rsp)
        finally:
            answered.set()

    monkeypatch.setattr(ServiceClass, "validate_status", slow_answer)
    return answered


class ReportsFirst(CommitPeer):
    """A PACS that sends ``reports`` ((Transaction UID or None for the request's, kept UIDs or None for
    all asked) each) on the request's association while it still answers the request, with
    ``action_status``."""

    def __init__(self, action_status: int = 0x0000, reports: Sequence[tuple[str | None, list[str] | None]]
                 = ((None, None),)) -> None:
        super().__init__(action_status=action_status)
        self.reports = reports

    def _on_action(self, event: Event) -> tuple[int, None]:
        transaction, uids = self._record_request(event)

        def send() -> None:
            for uid, kept in self.reports:
                self._report_here(event.assoc, uid or transaction, uids if kept is None else kept, {})

        threading.Thread(target=send).start()
        time.sleep(0.3)
        return self.action_status, None


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("peer", ["reports after the response", "reports before a refusal", "reports twice"])
def test_reports_on_the_request_s_own_association_are_answered_before_the_release(
    db: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peer: str,
) -> None:
    """The node recorded a report, then released the association while pynetdicom had still to send its
    answer (a busy CPU between the two, made here by a delay): the answer met a released association,
    pynetdicom's state machine failed on it (Evt9 in Sta7), the PACS got no status and the outbox hung for
    the ACSE time-out. So too for a report ahead of a refused request, or a second report (a stale one
    first) (review helpers). The release now waits until every report's answer has gone."""
    _slow_answers(monkeypatch)
    pacs = {
        "reports after the response": CommitPeer(verdict=lambda uids: (uids, {})),
        "reports before a refusal": ReportsFirst(action_status=0x0110),
        "reports twice": ReportsFirst(reports=(("2.25.1", ["2.25.2"]), (None, None))),
    }[peer].start()
    try:
        _asked(db, tmp_path, pacs, 1, commitment_report_wait_seconds=30.0)
    finally:
        pacs.stop()
    assert pacs.report_statuses == ([0x0000, 0x0000] if peer == "reports twice" else [0x0000])
    assert {row.commitment for row in _rows(db).values()} == {CommitmentState.COMMITTED}


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_report_taken_too_long_on_the_request_s_association_gets_an_abort_not_a_release(
    db: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Released while the answer is still to come, the association fails as above; aborted, the PACS
    knows its report was not answered and sends it again."""
    from dicom_node import scu

    answered = _slow_answers(monkeypatch, 1.5)
    monkeypatch.setattr(scu, "ANSWER_SECONDS", 0.2)
    pacs = CommitPeer(verdict=lambda uids: (uids, {})).start()
    try:
        _asked(db, tmp_path, pacs, 1, commitment_report_wait_seconds=30.0)
        # the node's late answer is made, its association's thread ends, the PACS's report has its end
        assert answered.wait(30), "the node never answered the report"
        for thread in threading.enumerate():
            if isinstance(thread, Association) and thread.is_requestor:
                thread.join(30)
                assert not thread.is_alive(), "the node's association did not end"
        assert wait_until(lambda: pacs.report_statuses, 30, interval=0.05), "the report got no status"
    finally:
        pacs.stop()
    assert pacs.aborted == 1 and pacs.report_statuses == [-1]
    assert len(pacs.released_at) == 1  # the association of the objects; the request's was aborted


def test_a_report_ahead_of_the_n_action_response_is_taken_too(
    db: sessionmaker[Session], tmp_path: Path,
) -> None:
    """A PACS may send its report while it still answers the request (here 0.3 s later): the N-ACTION
    response must not be mistaken for it, nor it for the response."""
    pacs = ReportsFirst().start()
    try:
        _asked(db, tmp_path, pacs, 1, commitment_report_wait_seconds=30.0)
    finally:
        pacs.stop()
    assert pacs.report_statuses == [0x0000] and len(pacs.requests) == 1
    assert {row.commitment for row in _rows(db).values()} == {CommitmentState.COMMITTED}


def test_the_request_s_association_waits_for_a_report_on_the_listener_no_longer_than_it_takes(
    db: sessionmaker[Session], tmp_path: Path, listener: tuple[StorageScp, list[int]],
) -> None:
    """A PACS that reports on an association of its own (Orthanc) has the request's association released
    as soon as the listener recorded the report, not after the whole wait."""
    scp, _ = listener

    class ReportsElsewhere(CommitPeer):
        def _on_action(self, event: Event) -> tuple[int, None]:
            status, _ = super()._on_action(event)
            transaction, uids = self.requests[-1]
            threading.Thread(target=report, args=(scp.port, transaction, uids, {})).start()
            return status, None

    pacs = ReportsElsewhere().start()
    try:
        _asked(db, tmp_path, pacs, 1, commitment_report_wait_seconds=30.0)
    finally:
        pacs.stop()
    assert {row.commitment for row in _rows(db).values()} == {CommitmentState.COMMITTED}
    assert pacs.released_at[-1] - pacs.answered_at[0] < 15


def test_the_request_s_association_stays_open_for_the_wait_when_no_report_comes(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer,
) -> None:
    _asked(db, tmp_path, pacs, 1, commitment_report_wait_seconds=0.5)
    assert pacs.released_at[-1] - pacs.answered_at[0] >= 0.5
    assert {row.commitment for row in _rows(db).values()} == {CommitmentState.REQUESTED}


def test_a_request_marked_but_never_sent_is_asked_again_at_the_next_start_not_after_the_time_out(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer,
) -> None:
    """The node marks the objects REQUESTED and commits before the N-ACTION goes (the PACS may report at
    once). Stopped in between (a crash, a kill), it waited out the time-out (an hour) for a report on a
    request the PACS never got. Now a request is overdue until it has gone."""
    from dicom_node.store.models import utcnow

    results = tmp_path / "results"
    destination_pk, (pk,) = _deliveries(db, results, pacs.port, 1)
    _commit_to(db, destination_pk)
    with session_scope(db) as session:
        for delivery in session.scalars(select(Delivery)):  # delivered, as the outbox records it
            delivery.state, delivery.next_attempt_at = DeliveryState.DELIVERED, None
            commitment.delivered(delivery, asks_commitment=True)
        lost = commitment.take_due(session, destination_pk, utcnow(), timeout_seconds=3600)
    assert lost is not None and pacs.requests == []  # the node stopped here

    restarted = _outbox(db, results)  # the default time-out: an hour
    assert destination_pk in restarted._destinations_with_work(due_only=True)
    restarted.request_commitments(destination_pk)
    assert len(pacs.requests) == 1 and pacs.requests[0][0] != lost.transaction_uid
    row = _rows(db)[pk]
    assert (row.commitment, row.commitment_uid, row.commitment_requests) == (
        CommitmentState.REQUESTED, pacs.requests[0][0], 2)
    # a request that went is not overdue: the next round does not ask again
    restarted.request_commitments(destination_pk)
    assert len(pacs.requests) == 1


@pytest.mark.usefixtures("restore_logging")  # the node CLI sets up logging for its process
def test_the_resend_command_leaves_storage_commitment_to_the_node(
    db: sessionmaker[Session], tmp_path: Path, pacs: CommitPeer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`cxr-node resend` runs beside the node. Had it asked for storage commitment too, it would have
    taken the node's requests on their way (overdue until sent) for unanswered ones, and asked again or
    given up on them (review helper). It sends; the node's outbox asks."""
    from dicom_node.cli import main as cli_main

    results = tmp_path / "results"
    destination_pk, (pk,) = _deliveries(db, results, pacs.port, 1)
    _commit_to(db, destination_pk)
    with session_scope(db) as session:
        session.get_one(Delivery, pk).state = DeliveryState.DEAD
    config = tmp_path / "node.yaml"
    config.write_text(f"node:\n  data_dir: {tmp_path}\ndicom:\n  ae_title: CXRNODE\n")
    monkeypatch.setenv("CXR_NODE__DATABASE__URL", str(db.kw["bind"].url))
    assert cli_main(["resend", "--config", str(config), str(pk)]) == 0
    assert len(pacs.received) == 1 and pacs.requests == []
    assert _rows(db)[pk].commitment is CommitmentState.DUE
    node = _outbox(db, results)
    assert destination_pk in node._destinations_with_work(due_only=True)  # its sweep asks
    node.request_commitments(destination_pk)
    assert len(pacs.requests) == 1 and _rows(db)[pk].commitment is CommitmentState.REQUESTED
