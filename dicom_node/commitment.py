"""Storage commitment (Storage Commitment Push Model, PS3.4 Annex J): does the PACS keep what it was sent?

A C-STORE success says that the PACS received an object, not that it keeps it: a routing rule or a filter
may drop it, a disk may fail before the archive has it. For a destination set to storage commitment
(``remote_ae.storage_commitment``) each delivered object goes on (``delivery.commitment``):

- DUE: delivered; the outbox asks the PACS, one N-ACTION per batch under a new Transaction UID
  (:meth:`dicom_node.outbox.Outbox.request_commitments`, :func:`dicom_node.scu.request_commitment`);
- REQUESTED: asked (marked just before the request goes, overdue until it has gone: :func:`take_due`).
  The PACS's N-EVENT-REPORT comes on an association it opens to the node's listener or on the request's,
  and is recorded here (:func:`apply_report`):
  - COMMITTED: the PACS keeps the object;
  - not kept (a Failed SOP Sequence item): the delivery is sent again, and is DEAD after
    ``outbox.refused_attempts`` such answers in a row (:func:`dicom_node.outbox.record_commitment_report`);
- no report within ``outbox.commitment_timeout_seconds``: asked again under a new Transaction UID, up to
  ``outbox.commitment_requests`` requests, then UNCONFIRMED, with why. A request that failed (no
  association, no answer, a failure status) stays REQUESTED, with why, and is asked again so too. A
  delivery whose PACS would not take the request (it does not offer the service, or refused the N-ACTION)
  is UNCONFIRMED at once.

DUE and REQUESTED are set on DELIVERED deliveries only, and every way out of DELIVERED (sent again after
a report, an operator's resend) forgets them (:func:`forget`): the queries below look them up by the
commitment index alone. With the state in them too, SQLite walked every delivered row (30 ms a sweep at
100,000 studies, against 0.3 ms).

This module holds the rules on the rows; it sends and listens for nothing itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload

from dicom_node.errors import InvalidReportError, UnknownEventTypeError
from dicom_node.store.models import CommitmentState, Delivery, DeliveryState

LOGGER = logging.getLogger(__name__)

#: The outcome of a delivery attempt (delivery_attempt.outcome) that the PACS answered with success and
#: then reported, by storage commitment, that it does not keep.
NOT_KEPT = "not kept"
#: At most this many objects in one request (an N-ACTION of a batch; the outbox's batches are as large)
REQUEST_LIMIT = 64
#: The states in which the outbox is to ask, or awaits a report. Only a DELIVERED delivery is in one: one
#: that leaves DELIVERED (sent again) has its commitment forgotten (:func:`forget`). So the outbox's
#: lookups go by these from the index on (commitment, commitment_at), not by state=delivered, which finds
#: every object ever delivered.
ACTIVE = (CommitmentState.DUE, CommitmentState.REQUESTED)
#: N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3): all objects kept; some not
ALL_KEPT, SOME_FAILED = 1, 2

#: Failure Reason (0008,1197) values, PS3.4 J.3.3.1.1 (and C.14.1.1 of PS3.3)
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class / instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}


def failure_words(code: int | None) -> str:
    """A Failure Reason in words with its code: "no such object instance (0x0112)"."""
    if code is None:
        return "no reason given"
    return f"{FAILURE_REASONS.get(code, 'failure reason')} (0x{code:04X})"


@dataclass(frozen=True)
class Report:
    """A storage commitment result as the PACS sent it (PS3.4 J.3.3)."""

    transaction_uid: str
    kept: frozenset[str]  # SOP Instance UIDs in the Referenced SOP Sequence
    failed: dict[str, int | None]  # SOP Instance UID -> Failure Reason (Failed SOP Sequence)


def parse_report(event_type_id: int | None, info: Dataset | None) -> Report:
    """The Event Information of an N-EVENT-REPORT of the Storage Commitment Push Model SOP Instance."""
    if event_type_id not in (ALL_KEPT, SOME_FAILED):
        raise UnknownEventTypeError(f"event type {event_type_id} is not a storage commitment result (1 or 2)")
    if info is None or not str(info.get("TransactionUID", "") or "").strip():
        raise InvalidReportError("the report carries no Transaction UID")

    def uids(keyword: str) -> list[Dataset]:
        return list(info.get(keyword) or [])

    kept = frozenset(str(item.get("ReferencedSOPInstanceUID", "")) for item in uids("ReferencedSOPSequence"))
    failed: dict[str, int | None] = {}
    for item in uids("FailedSOPSequence"):
        reason = item.get("FailureReason")
        failed[str(item.get("ReferencedSOPInstanceUID", ""))] = int(reason) if reason is not None else None
    failed = {k: v for k, v in failed.items() if k}
    # An object in both sequences contradicts itself: the PACS did not commit to it, so it is not kept
    return Report(str(info.TransactionUID).strip(), kept - {""} - failed.keys(), failed)


@dataclass(frozen=True)
class Request:
    """One N-ACTION to send: its Transaction UID, the deliveries it asks about and their objects."""

    transaction_uid: str
    delivery_pks: tuple[int, ...]
    objects: tuple[tuple[str, str], ...]  # (SOP Class UID, SOP Instance UID)


def delivered(delivery: Delivery, *, asks_commitment: bool) -> None:
    """A C-STORE success: the delivery's commitment is to be asked for (DUE), or is not asked for."""
    delivery.commitment = CommitmentState.DUE if asks_commitment else None
    delivery.commitment_uid = None
    delivery.commitment_at = None
    delivery.commitment_requests = 0
    delivery.commitment_note = ""


def forget(delivery: Delivery) -> None:
    """The delivery is to be sent again: what was asked about its last copy no longer applies."""
    delivery.commitment = None
    delivery.commitment_uid = None
    delivery.commitment_at = None
    delivery.commitment_requests = 0


#: The note on a delivery whose destination was set not to be asked any more while it awaited the PACS
SWITCHED_OFF = "storage commitment was switched off for this destination before the PACS confirmed it"


def stop_asking(session: Session, destination_pk: int) -> int:
    """The destination is no longer set to storage commitment: its deliveries still to be asked about or
    awaiting a report are not asked (again), and say why. (The PACS may not report any more: the listener
    takes reports only from destinations set to it.) Returns how many."""
    # locked in id order first, as a report's rows are (apply_report): an UPDATE alone locks them in the
    # order it finds them, and could deadlock with a report arriving meanwhile on PostgreSQL
    pks = session.scalars(
        select(Delivery.id)
        .where(Delivery.destination_pk == destination_pk, Delivery.commitment.in_(ACTIVE))
        .order_by(Delivery.id)
        .with_for_update()
    ).all()
    if pks:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(pks), Delivery.commitment.in_(ACTIVE))
            .values(commitment=None, commitment_uid=None, commitment_at=None, commitment_note=SWITCHED_OFF)
            .execution_options(synchronize_session="fetch")
        )
    return len(pks)


def _unconfirmed(delivery: Delivery, now: datetime, note: str) -> None:
    delivery.commitment = CommitmentState.UNCONFIRMED
    delivery.commitment_at = now
    delivery.commitment_note = note


def expire(session: Session, destination_pk: int, now: datetime, *, timeout_seconds: float,
           max_requests: int) -> int:
    """Requests of this destination left unanswered for ``timeout_seconds``: asked again (DUE), or
    UNCONFIRMED after ``max_requests``. Returns how many went UNCONFIRMED."""
    overdue = session.scalars(
        select(Delivery)
        .where(
            Delivery.destination_pk == destination_pk,
            Delivery.commitment == CommitmentState.REQUESTED,
            Delivery.commitment_at <= now - timedelta(seconds=timeout_seconds),
        )
        .with_for_update(skip_locked=True)
    ).all()
    given_up = 0
    for delivery in overdue:
        if delivery.state is not DeliveryState.DELIVERED:  # never so (see the module); left alone if it were
            continue
        if delivery.commitment_requests >= max_requests:
            _unconfirmed(delivery, now, f"the PACS did not report on it after {delivery.commitment_requests} "
                                        f"storage commitment requests, {timeout_seconds:g} s apart")
            given_up += 1
        else:
            delivery.commitment = CommitmentState.DUE
    return given_up


def take_due(session: Session, destination_pk: int, now: datetime, *, timeout_seconds: float
             ) -> Request | None:
    """The destination's DUE deliveries (up to :data:`REQUEST_LIMIT`) as one request, marked REQUESTED
    under a new Transaction UID. The caller commits before it sends: the PACS may report at once.

    They are marked as asked ``timeout_seconds`` ago, overdue, until :func:`request_sent` says the request
    went: a node stopped in between (a crash, a kill) asks again when it starts, instead of waiting out
    the time-out for a report on a request the PACS never got. The outbox asks for a destination in one
    thread at a time and only looks for overdue requests before it marks new ones, so a request on its
    way is not taken for overdue."""
    deliveries = session.scalars(
        select(Delivery)
        .where(
            Delivery.destination_pk == destination_pk,
            Delivery.commitment == CommitmentState.DUE,
        )
        .options(selectinload(Delivery.result_object))
        .order_by(Delivery.id)
        .limit(REQUEST_LIMIT)
        .with_for_update(skip_locked=True)
    ).all()
    deliveries = [d for d in deliveries if d.state is DeliveryState.DELIVERED]  # all of them (the module)
    if not deliveries:
        return None
    uid = str(generate_uid())
    for delivery in deliveries:
        delivery.commitment = CommitmentState.REQUESTED
        delivery.commitment_uid = uid
        delivery.commitment_at = now - timedelta(seconds=timeout_seconds)
        delivery.commitment_requests += 1
        delivery.commitment_note = ""  # why an earlier request failed, if one did
    objects = tuple((d.result_object.sop_class_uid, d.result_object.sop_instance_uid) for d in deliveries)
    return Request(uid, tuple(d.id for d in deliveries), objects)


def request_sent(session: Session, request: Request, now: datetime) -> None:
    """The PACS took ``request``: its objects still awaiting the report wait for it from ``now``."""
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_(request.delivery_pks), Delivery.commitment_uid == request.transaction_uid,
               Delivery.commitment == CommitmentState.REQUESTED)
        .values(commitment_at=now)
    )


def awaiting(session: Session, transaction_uid: str) -> bool:
    """Whether any object of the transaction still awaits the PACS's report."""
    return session.scalar(
        select(Delivery.id).where(Delivery.commitment_uid == transaction_uid,
                                  Delivery.commitment == CommitmentState.REQUESTED).limit(1)
    ) is not None


def request_not_taken(session: Session, request: Request, now: datetime, why: str, *, final: bool,
                      max_requests: int) -> None:
    """The PACS did not take ``request``. ``final`` (it refused the request, or does not offer the service):
    UNCONFIRMED with ``why``. Otherwise (no association, no answer, a failure status) asked again as an
    unanswered request is, after the time-out (:func:`expire`), until ``max_requests`` requests; then
    UNCONFIRMED. (Asked again at once, the sweep's every 30 s used the requests up in a minute of a PACS's
    restart, and the objects were never confirmed.)"""
    for delivery in session.scalars(select(Delivery).where(Delivery.id.in_(request.delivery_pks),
                                                           Delivery.commitment_uid == request.transaction_uid,
                                                           Delivery.commitment == CommitmentState.REQUESTED)):
        if final or delivery.commitment_requests >= max_requests:
            _unconfirmed(delivery, now, f"the PACS did not take the storage commitment request: {why}")
        else:
            delivery.commitment_at = now  # REQUESTED: the time-out counts from now
            delivery.commitment_note = f"the storage commitment request failed ({why}); it is asked again"


@dataclass
class Applied:
    """What one report changed."""

    destination_pk: int | None = None
    committed: list[int] = field(default_factory=list)
    not_kept: list[tuple[Delivery, int | None]] = field(default_factory=list)  # with the Failure Reason
    unmatched: int = 0  # objects the report names that the transaction did not ask about
    repeated: int = 0  # objects a report of the transaction said were kept already (the PACS sent it again)


def apply_report(session: Session, calling_ae: str, report: Report, now: datetime) -> Applied:
    """Record ``report`` on the deliveries its transaction asked about.

    Only the AE the node asked may answer: a report from another AE title changes nothing
    (:class:`InvalidReportError`). A transaction the node does not know (its deliveries were sent again,
    or it was asked again under a new UID) changes nothing either; the caller logs it and answers success,
    since the PACS can do nothing better. Objects the report leaves out stay REQUESTED until the time-out.
    A report sent again (the PACS did not get the node's answer) changes nothing it recorded already, but an
    object it now says is not kept is not. Not-kept deliveries come back with their commitment forgotten;
    the caller sends them again."""
    deliveries: Sequence[Delivery] = session.scalars(
        select(Delivery)
        .where(Delivery.commitment_uid == report.transaction_uid,
               Delivery.commitment.in_((CommitmentState.REQUESTED, CommitmentState.UNCONFIRMED,
                                        CommitmentState.COMMITTED)))
        .options(selectinload(Delivery.result_object), selectinload(Delivery.destination))
        .order_by(Delivery.id)  # locked in the order a flush updates them (requeue): no deadlock with it
        .with_for_update()
    ).all()
    applied = Applied()
    if not deliveries:
        applied.unmatched = len(report.kept) + len(report.failed)
        return applied
    destination = deliveries[0].destination
    if destination.ae_title.strip() != calling_ae.strip():
        raise InvalidReportError(f"the transaction was asked of {destination.ae_title}, not of {calling_ae}")
    applied.destination_pk = destination.id
    by_uid: dict[str, Delivery] = {d.result_object.sop_instance_uid: d for d in deliveries}
    for uid in report.kept:
        delivery = by_uid.get(uid)
        if delivery is None or delivery.state is not DeliveryState.DELIVERED:
            applied.unmatched += 1
            continue
        if delivery.commitment is CommitmentState.COMMITTED:
            applied.repeated += 1
            continue
        delivery.commitment = CommitmentState.COMMITTED
        delivery.commitment_at = now
        delivery.commitment_note = ""
        applied.committed.append(delivery.id)
    for uid, reason in report.failed.items():
        delivery = by_uid.get(uid)
        if delivery is None or delivery.state is not DeliveryState.DELIVERED:
            applied.unmatched += 1
            continue
        forget(delivery)
        delivery.commitment_note = f"not kept by the PACS: {failure_words(reason)}"
        applied.not_kept.append((delivery, reason))
    return applied


def describe(delivery: Delivery) -> str:
    """The delivery's commitment in words for the console and the CLI; "" when it was not asked for."""
    state = delivery.commitment
    if state is None:
        return delivery.commitment_note
    words = {
        CommitmentState.DUE: "storage commitment to be requested",
        CommitmentState.REQUESTED: "awaiting the PACS's storage commitment",
        CommitmentState.COMMITTED: "kept by the PACS (storage commitment)",
        CommitmentState.UNCONFIRMED: "not confirmed by the PACS",
    }[state]
    return f"{words}: {delivery.commitment_note}" if delivery.commitment_note else words
