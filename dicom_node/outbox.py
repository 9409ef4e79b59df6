"""Outbox: deliver result objects to their destinations by C-STORE, once, with retries.

Each ``Delivery`` row is one object for one destination. Due deliveries of a destination go in one
association (a batch). A failure is recorded in ``delivery_attempt`` and retried with exponential back-off;
the wake-up is an APScheduler job in the node's persistent job store, and a periodic sweep catches anything
due that lost its wake-up. After ``outbox.max_attempts`` the delivery is DEAD until an operator runs
``cxr-node resend``; so is one the peer refused as such ``outbox.refused_attempts`` times in a row.
A warning status (0xB000...) means the peer kept the object: delivered, recorded. A result file that is
missing or damaged (not what the node wrote) has its study's results made again as a new revision, which
supersedes the delivery; it waits for that instead of going DEAD (:meth:`Outbox._file_lost`).

A destination set to storage commitment is then asked whether it keeps what it was sent
(:mod:`dicom_node.commitment`); an object its PACS reports it does not keep is sent again.

Before sending, the batch is leased (``next_attempt_at`` pushed forward and committed, and renewed while it
is sent) so a concurrent sweep or ``cxr-node resend`` does not send the same object at the same time. A
crash between the peer's answer and our commit re-sends the same SOP Instance UID once; a PACS keeps one
instance for one UID.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import ssl
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, selectinload, sessionmaker

from dicom_node import audit, commitment, storage
from dicom_node.commitment import NOT_KEPT
from dicom_node.errors import (
    AssociationError,
    ConflictError,
    InvalidReportError,
    NodeError,
    NotFoundError,
    describe_exception,
)
from dicom_node.jobs import MEMORY_STORE, PERSISTENT_STORE
from dicom_node.statuses import Status, is_stored, is_warning, refuses_the_object
from dicom_node.store.db import make_read_only_session_factory, session_scope
from dicom_node.store.models import (
    CommitmentState,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    RemoteAe,
    Study,
    StudyState,
    utcnow,
)
from dicom_node.terminal import say

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler
    from pydicom import Dataset
    from pynetdicom.events import Event

    from dicom_node.metrics import NodeMetrics
    from dicom_node.settings import OutboxSettings, Settings, TlsSettings

LOGGER = logging.getLogger(__name__)

#: How a delivery's reason begins when its result file cannot be sent as it is: "result file missing",
#: "result file damaged (…)" (:func:`storage.read_result_file`).
RESULT_FILE = "result file"
REMAKING = "the study's results are being made again (a new revision replaces it)"
#: The end of a DEAD delivery's last error when the peer refused the object itself
#: (:func:`statuses.refuses_the_object`) ``outbox.refused_attempts`` times in a row.
REFUSED = "refused each time: it will be, until the peer's configuration changes; then resend it"
#: How a delivery's reason goes on when the node cannot read what it wrote (the reason begins with the kind).
UNREADABLE = "result file is not a readable DICOM file"
LEASE_SECONDS = 120.0
SWEEP_SECONDS = 30.0
BATCH_LIMIT = 64
SWEEP_JOB_ID = "outbox:sweep"

# The scheduler's persistent job store keeps a textual reference to a module-level function; that
# function finds the outbox of this process here (set by Outbox.start, cleared by Outbox.stop).
_active: Outbox | None = None


def run_scheduled(destination_pk: int) -> None:
    """APScheduler entry point: deliver what is due for one destination."""
    outbox = _active
    if outbox is None:
        # A persisted wake-up firing during start-up, before the outbox runs: start() resumes everything due.
        LOGGER.info("delivery wake-up for destination %d before the outbox started", destination_pk)
        return
    outbox.kick([destination_pk])


def wake(destination_pks: Iterable[int]) -> bool:
    """Ask this process's running outbox to try these destinations now (e.g. after a console resend).

    Returns False when no outbox runs in this process; the node's sweep then finds the work.
    """
    outbox = _active
    if outbox is None:
        return False
    outbox.kick(destination_pks)
    return True


def run_sweep() -> None:
    """APScheduler entry point: deliver whatever is due for every destination."""
    outbox = _active
    if outbox is not None:
        outbox.sweep()


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Delay before retry number ``attempts`` + 1: initial, 2x, 4x, ... capped at ``maximum``.

    The doubling stops once it passes the cap: 2.0 ** 1024 and more overflow a float, and a delivery may
    be tried that often (a large ``max_attempts``, or one waiting for its results to be made again)."""
    delay = float(initial)
    for _ in range(max(0, attempts - 1)):
        if delay >= maximum:
            break
        delay *= 2
    return float(min(maximum, delay))


@dataclass
class BatchReport:
    """What one association to one destination achieved."""

    destination_pk: int
    delivered: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Item:
    delivery_pk: int
    path: Path
    kind: str
    received_at: datetime
    sha256: str | None  # of the file as the node wrote it (None on rows older than migration 0013)


class Outbox:
    """Sends due deliveries; one instance per node process."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        results_dir: Path,
        *,
        calling_aet: str,
        settings: OutboxSettings,
        tls: TlsSettings | None = None,
        scheduler: BaseScheduler | None = None,
        metrics: NodeMetrics | None = None,
        workers: int = 2,
        max_pdu: int | None = None,
        dimse_timeout: float | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.max_pdu = max_pdu  # offered to the PACS: dicom.max_pdu, as by the listener (None: scu's default)
        self.dimse_timeout = dimse_timeout  # the wait for each response: dicom.dimse_timeout (None: scu's)
        self.results_dir = results_dir
        self.calling_aet = calling_aet
        self.settings = settings
        self.tls = tls
        self.scheduler = scheduler
        self.metrics = metrics
        self.workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._stopping = threading.Event()  # set by stop(): the batch being sent is the last

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        scheduler: BaseScheduler | None = None,
        metrics: NodeMetrics | None = None,
    ) -> Outbox:
        return cls(
            session_factory,
            settings.results_dir,
            calling_aet=settings.dicom.ae_title,
            settings=settings.outbox,
            tls=settings.dicom.tls,  # its certificates, whether or not the node's own listener is on TLS
            scheduler=scheduler,
            metrics=metrics,
            max_pdu=settings.dicom.max_pdu,
            dimse_timeout=settings.dicom.dimse_timeout,
        )

    # Lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Become this process's outbox, schedule the sweep and resume everything that is due.

        A delivery under lease is left to its lease: the process sending it may be alive (`cxr-node resend`
        is another process), and made due here it went a second time. One leased by a process that died
        is due a lease later (:data:`LEASE_SECONDS`, no longer renewed), when the sweep sends it."""
        global _active
        _active = self
        self._stopping.clear()
        if self.scheduler is not None:
            self.scheduler.add_job(
                run_sweep,
                "interval",
                seconds=SWEEP_SECONDS,
                id=SWEEP_JOB_ID,
                jobstore=MEMORY_STORE,
                replace_existing=True,
                coalesce=True,
                max_instances=1,
            )
        # Every destination with work: due batches go now, the others get their back-off wake-up re-armed.
        self.kick(self._destinations_with_work())

    def stop(self) -> None:
        """Stop taking work; batches being sent finish (their rows are leased, so nothing is lost), and
        no further batch is leased: the rest waits for the next start. A stop that sent every due batch
        first took minutes after an outage, past systemd's time-out, whose SIGKILL cut a batch short,
        its answers unrecorded, and the restarted node sent it a second time."""
        global _active
        if _active is self:
            _active = None
        self._stopping.set()
        with self._locks_guard:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    # Scheduling -----------------------------------------------------------------------------

    def kick(self, destination_pks: Iterable[int], at: datetime | None = None) -> None:
        """Deliver to these destinations now (or wake up at ``at``).

        Sending happens on the outbox's own threads, so a slow peer never holds the scheduler's workers
        (which also fire the settle timers). Without a scheduler (CLI, tests) it is synchronous.
        """
        for pk in dict.fromkeys(destination_pks):
            if self.scheduler is None:
                self.deliver_due(pk)
            elif at is None:
                self._submit(pk)
            else:
                # A later retry is a wake-up in the persistent store, so a restart keeps the back-off.
                self.scheduler.add_job(
                    run_scheduled,
                    "date",
                    run_date=at,
                    args=[pk],
                    id=f"outbox:destination:{pk}",
                    jobstore=PERSISTENT_STORE,
                    replace_existing=True,
                    misfire_grace_time=None,
                    coalesce=True,
                    max_instances=1,
                )

    def _submit(self, destination_pk: int) -> None:
        with self._locks_guard:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cxr-outbox")
            executor = self._executor
        try:
            executor.submit(self._deliver_logged, destination_pk)
        except RuntimeError:
            LOGGER.info("outbox stopping: destination %d waits for the next start", destination_pk)

    def _deliver_logged(self, destination_pk: int) -> None:
        try:
            self.deliver_due(destination_pk)
        except Exception as exc:  # the rows stay due; the sweep retries
            LOGGER.error("delivery to destination %d failed (%s)", destination_pk, type(exc).__name__)

    def sweep(self) -> None:
        self.kick(self._destinations_with_work(due_only=True))

    def _destinations_with_work(self, *, due_only: bool = False) -> list[int]:
        """Destinations with deliveries to send or commitments to ask for. It only reads: in a write
        transaction the sweep every 30 s queued for SQLite's write lock behind each image being stored, and
        while another program held the file it failed after 30 s, that round's work left undone."""
        now = utcnow()
        with session_scope(make_read_only_session_factory(self.session_factory)) as session:
            query = select(Delivery.destination_pk).where(
                Delivery.state.in_((DeliveryState.PENDING, DeliveryState.RETRYING))
            )
            if due_only:
                query = query.where(Delivery.next_attempt_at <= now)
            # storage commitment to ask for, or asked for without a report in time (by the commitment index
            # alone: see dicom_node.commitment)
            overdue = now - timedelta(seconds=self.settings.commitment_timeout_seconds)
            asking = select(Delivery.destination_pk).where(
                or_(Delivery.commitment == CommitmentState.DUE,
                    (Delivery.commitment == CommitmentState.REQUESTED) & (Delivery.commitment_at <= overdue)),
            )
            return sorted(set(session.scalars(query.distinct())) | set(session.scalars(asking.distinct())))

    def _lock(self, destination_pk: int) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(destination_pk, threading.Lock())

    # Delivery ---------------------------------------------------------------------------------

    def deliver_due(self, destination_pk: int, *, ask_commitment: bool = True) -> BatchReport:
        """Send every due delivery of one destination, a batch per association, until none is due; then,
        unless told not to, ask for storage commitment (:meth:`request_commitments`)."""
        report = BatchReport(destination_pk)
        lock = self._lock(destination_pk)
        if not lock.acquire(blocking=False):
            return report  # the running batch re-checks for due work before it returns
        try:
            while not self._stopping.is_set():
                batch = self._lease(destination_pk)
                if batch is None:
                    break
                destination, items = batch
                with self._renewing(destination.id, [item.delivery_pk for item in items]):
                    outcomes = self._send(destination, items)
                delivered, failed = len(report.delivered), len(report.failed)
                self._record(destination, items, outcomes, report)
                # This batch's counts, not the round's: once one batch had gone, a round went on trying
                # every remaining batch after the peer went down.
                if (len(report.delivered) == delivered and len(report.failed) > failed
                        and any(_went_out(outcome) for outcome in outcomes.values())
                        and self._hold_back(destination_pk, [item.delivery_pk for item in items])):
                    break  # the peer is down: wait for the back-off instead of hammering it
            if ask_commitment and not self._stopping.is_set():  # else asked at the next start
                self.request_commitments(destination_pk)
        finally:
            lock.release()
        self._schedule_next(destination_pk)
        return report

    def _hold_back(self, destination_pk: int, batch: list[int]) -> bool:
        """After a batch of which nothing went: the destination's other due deliveries wait for the
        earliest retry of the batch (no attempt counted). Left due, they made the wake-up armed after the
        round (:meth:`_schedule_next`) fire at once, and the next batch went to the peer that is down.
        False when none of the batch is retrying (each DEAD: the peer refused those objects as such)."""
        now = utcnow()
        with session_scope(self.session_factory) as session:
            retry_at = session.scalar(
                select(func.min(Delivery.next_attempt_at))
                .where(Delivery.id.in_(batch), Delivery.state == DeliveryState.RETRYING)
            )
            if retry_at is None:
                return False
            session.execute(
                update(Delivery)
                .where(Delivery.destination_pk == destination_pk,
                       Delivery.state.in_((DeliveryState.PENDING, DeliveryState.RETRYING)),
                       Delivery.next_attempt_at <= now)
                .values(next_attempt_at=retry_at)
                .execution_options(synchronize_session=False)
            )
        return True

    def _lease(self, destination_pk: int) -> tuple[RemoteAe, list[_Item]] | None:
        now = utcnow()
        with session_scope(self.session_factory) as session:
            destination = session.get(RemoteAe, destination_pk)
            if destination is None or not destination.enabled:
                return None
            deliveries = list(
                session.scalars(
                    select(Delivery)
                    .where(
                        Delivery.destination_pk == destination_pk,
                        Delivery.state.in_((DeliveryState.PENDING, DeliveryState.RETRYING)),
                        Delivery.next_attempt_at <= now,
                    )
                    .options(selectinload(Delivery.result_object))
                    .order_by(Delivery.id)
                    .limit(BATCH_LIMIT)
                    .with_for_update(skip_locked=True)
                )
            )
            if not deliveries:
                return None
            lease_until = now + timedelta(seconds=LEASE_SECONDS)
            study_pks = {d.result_object.study_pk for d in deliveries}
            received = {
                pk: at for pk, at in session.execute(select(Study.id, Study.last_received_at).where(Study.id.in_(study_pks)))
            }
            items = []
            for delivery in deliveries:
                delivery.next_attempt_at = lease_until
                obj = delivery.result_object
                items.append(
                    _Item(delivery.id, self.results_dir / obj.file_path, obj.kind.value,
                          _aware(received[obj.study_pk]), obj.sha256)
                )
            session.expunge(destination)
        return destination, items

    @contextlib.contextmanager
    def _renewing(self, destination_pk: int, delivery_pks: list[int]) -> Iterator[None]:
        """Keep the batch's lease while it is sent. A batch may take longer than :data:`LEASE_SECONDS`
        (64 objects to a slow archive, each up to a DIMSE time-out): once its lease ran out, another
        process (`cxr-node resend`) leased the objects still being sent and sent them a second time. A
        process that dies stops renewing, and its batch is due again a lease later."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(LEASE_SECONDS / 3):
                try:
                    with session_scope(self.session_factory) as session:
                        session.execute(
                            update(Delivery)
                            .where(Delivery.id.in_(delivery_pks),
                                   Delivery.state.in_((DeliveryState.PENDING, DeliveryState.RETRYING)))
                            .values(next_attempt_at=utcnow() + timedelta(seconds=LEASE_SECONDS))
                        )
                except Exception as exc:  # tried again a third of a lease later
                    LOGGER.warning("destination %d: the lease of a batch being sent was not renewed (%s)",
                                   destination_pk, type(exc).__name__)

        thread = threading.Thread(target=renew, name="cxr-outbox-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _send(self, destination: RemoteAe, items: list[_Item]) -> dict[int, tuple[int | None, str]]:
        """Send the batch in one association; returns each delivery's status (None: no answer) and
        reason, for :meth:`_record`."""
        from pydicom import dcmread

        from dicom_node import scu

        # Each file is read on its own: one missing or unreadable object is that delivery's failure, not
        # the whole batch's (its batch-mates, other studies' results among them, go out regardless).
        outcomes: dict[int, tuple[int | None, str]] = {}
        present: list[_Item] = []
        datasets: list[Dataset] = []
        for item in items:
            # The reason never names the file: its name holds the object's SOP Instance UID.
            data, problem = storage.read_result_file(item.path, item.sha256)
            if data is None:  # _record says what becomes of it
                outcomes[item.delivery_pk] = (None, f"{RESULT_FILE} {problem}")
                continue
            try:
                dataset = dcmread(io.BytesIO(data))
            except Exception as exc:  # what the node wrote is unreadable: a defect of the node itself
                outcomes[item.delivery_pk] = (None, f"the {item.kind} {UNREADABLE} ({type(exc).__name__})")
                continue
            present.append(item)
            datasets.append(dataset)
        if present:
            statuses: Sequence[int]  # scu.StoreStatus: each with the peer's Error Comment
            try:
                context = self._tls_context() if destination.tls else None
                statuses = scu.send(
                    datasets,
                    destination.host or "",
                    int(destination.port or 0),
                    destination.ae_title,
                    calling_aet=self.calling_aet,
                    tls=context,
                    max_pdu=scu.DEFAULT_MAX_PDU if self.max_pdu is None else self.max_pdu,
                    dimse_timeout=self.dimse_timeout,
                )
            except NodeError as exc:
                error = str(exc)
                # An association lost mid-batch: the objects answered before it keep their status.
                statuses = exc.statuses if isinstance(exc, AssociationError) else []
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc.strerror or exc}"
                statuses = []
            except Exception as exc:  # an unexpected failure is an attempt that failed, not a lost batch
                error = f"unexpected {type(exc).__name__}"
                LOGGER.error("destination %d: sending failed (%s)", destination.id, error, exc_info=False)
                statuses = []
            else:
                error = "no response"
            for index, item in enumerate(present):
                if index < len(statuses):  # the peer's answer, with its Error Comment if it gave one
                    outcomes[item.delivery_pk] = (int(statuses[index]), scu.describe(statuses[index]))
                else:
                    outcomes[item.delivery_pk] = (None, error)
        return outcomes

    def _after_failure(self, delivery: Delivery, now: datetime, report: BatchReport, *,
                       final: bool = True, refused: bool = False) -> None:
        if retry_or_dead(delivery, now, self.settings, final=final, refused=refused):
            report.dead.append(delivery.id)
        report.failed.append(delivery.id)

    def _refused_in_a_row(self, session: Session, delivery: Delivery) -> int:
        """How many of the delivery's last attempts in a row the peer answered with a status that refuses
        the object itself (counted up to what ``refused_attempts`` needs; this attempt, already counted in
        ``delivery.attempts``, not included). Only attempts since the last resend count, as the attempt
        budget does: after a resend, one more refusal made the delivery DEAD again at once (review)."""
        wanted = min(self.settings.refused_attempts - 1, delivery.attempts - 1)
        if wanted <= 0:
            return 0
        answers = session.execute(
            select(DeliveryAttempt.status, DeliveryAttempt.outcome)
            .where(DeliveryAttempt.delivery_pk == delivery.id)
            .order_by(DeliveryAttempt.id.desc())
            .limit(wanted)
        ).all()
        count = 0
        for status, outcome in answers:  # a copy the PACS took, then reported not kept, is no refusal
            if status is None or outcome != "failed" or not refuses_the_object(status):
                break
            count += 1
        return count

    def _tls_context(self) -> ssl.SSLContext:
        from dicom_node.settings import TlsSettings
        from dicom_node.tls import client_context

        # Without TLS settings, the system's public CAs (client_context checks the host name then).
        return client_context(self.tls or TlsSettings())

    def _record(
        self,
        destination: RemoteAe,
        items: list[_Item],
        outcomes: dict[int, tuple[int | None, str]],
        report: BatchReport,
    ) -> None:
        from dicom_node import scu

        now = utcnow()
        latencies: list[tuple[str, float]] = []
        reasons: set[str] = set()  # why deliveries failed (peer, address, status: no patient data)
        # ``report`` is the whole round's; the log line says what this batch did
        before = len(report.delivered), len(report.failed), len(report.dead)
        with session_scope(self.session_factory) as session:
            for item in items:
                # Locked: a new revision superseding this delivery meanwhile waits for this record, or
                # has committed and is seen here.
                delivery = session.get(Delivery, item.delivery_pk, with_for_update=True)
                if delivery is None:
                    continue
                status, error = outcomes[item.delivery_pk]
                delivery.attempts += 1
                delivery.last_status = status
                if status is not None and is_stored(status):
                    outcome = "warning" if is_warning(status) else "delivered"
                    delivery.state = DeliveryState.DELIVERED
                    commitment.delivered(delivery, asks_commitment=destination.storage_commitment)
                    delivery.delivered_at = now
                    delivery.next_attempt_at = None
                    delivery.last_error = error if outcome == "warning" else ""
                    note = delivery.last_error
                    report.delivered.append(delivery.id)
                    latencies.append((item.kind, (now - item.received_at).total_seconds()))
                else:
                    outcome = "failed" if status is not None else "error"
                    note = error or f"failure status 0x{status or 0:04X}"
                    # One a later revision superseded while this attempt ran is not tried again.
                    if delivery.state is not DeliveryState.SUPERSEDED:
                        final, refused = True, False
                        if error.startswith(RESULT_FILE):
                            note, final = self._file_lost(session, delivery, error)
                        elif status is not None and refuses_the_object(status):
                            refused = self._refused_in_a_row(session, delivery) + 1 >= \
                                self.settings.refused_attempts
                        delivery.last_error = f"{note}; {REFUSED}" if refused else note
                        reasons.add(scu.for_log(note))
                        self._after_failure(delivery, now, report, final=final, refused=refused)
                session.add(
                    DeliveryAttempt(
                        delivery_pk=delivery.id,
                        at=now,
                        status=status,
                        outcome=outcome,
                        error=note if outcome != "delivered" else "",
                    )
                )
        delivered, failed, dead = (len(report.delivered) - before[0], len(report.failed) - before[1],
                                   len(report.dead) - before[2])
        if failed:  # one line that names the destination and says why (the console shows it too)
            LOGGER.warning(
                "destination %d (%s): %d delivered, %d failed (%s), %d dead",
                destination.id,
                destination.ae_title,
                delivered,
                failed,
                "; ".join(sorted(reasons)),
                dead,
            )
        elif delivered:
            LOGGER.info("destination %d (%s): %d delivered", destination.id, destination.ae_title, delivered)
        if self.metrics is not None:
            for kind, seconds in latencies:
                self.metrics.observe_delivery(kind, seconds)

    def _file_lost(self, session: Session, delivery: Delivery, what: str) -> tuple[str, bool]:
        """Why a delivery whose result file is gone or damaged (``what``) failed, and whether that is
        final (it may go DEAD).

        The node can make the object again from the database: its study goes round the pipeline once
        more, and a new revision (new UIDs) of its results supersedes this delivery. Until then the
        delivery waits, retrying, and does not go DEAD. Only the latest revision is made again, and only
        once: a delivery still here after that round, or whose study failed, fails with the reason."""
        obj = delivery.result_object
        study = session.get(Study, obj.study_pk)
        state = study.state if study is not None else None
        remaking = f"{what}: {REMAKING}"
        if state in (StudyState.RECEIVED, StudyState.READY, StudyState.PROCESSING):
            return remaking, False  # a round is coming or running: it makes the study's lost results again
        lost = {r.id for r in storage.lost_results(session, self.results_dir, obj.study_pk)}
        finished = state in (StudyState.ANALYSED, StudyState.SKIPPED)
        if finished and obj.id in lost and not delivery.last_error.endswith(REMAKING):
            storage.reopen_to_remake(session, obj.study_pk)
            LOGGER.warning("delivery %d: the file of result object %d is %s; study %d's results are made "
                           "again", delivery.id, obj.id, what.removeprefix(f"{RESULT_FILE} "), obj.study_pk)
            return remaking, False
        if obj.id not in lost:
            if storage.later_revision(session, obj):
                return f"{what}: a later revision replaced it; restore the file from the backup", True
            return what, False  # it reads whole now (a passing read error): the next attempt sends it
        if state is StudyState.FAILED:
            return f"{what}, and the study's processing failed: see the study's reason", True
        return f"{what}, and making the study's results again did not replace it", True

    def _schedule_next(self, destination_pk: int) -> None:
        """Arm the wake-up for the earliest retry of this destination.

        None for a destination that is disabled (or gone): its deliveries were not leased, so the
        earliest is due already, and a wake-up for it fired at once, and again, for as long as it stayed
        disabled. The sweep finds them once it is enabled again."""
        if self.scheduler is None:
            return
        with session_scope(self.session_factory) as session:
            destination = session.get(RemoteAe, destination_pk)
            if destination is None or not destination.enabled:
                return
            earliest = session.scalar(
                select(Delivery.next_attempt_at)
                .where(
                    Delivery.destination_pk == destination_pk,
                    Delivery.state.in_((DeliveryState.PENDING, DeliveryState.RETRYING)),
                    Delivery.next_attempt_at.is_not(None),
                )
                .order_by(Delivery.next_attempt_at)
                .limit(1)
            )
        if earliest is not None:
            self.kick([destination_pk], at=max(_aware(earliest), utcnow()))


    # Storage commitment ------------------------------------------------------------------------

    def request_commitments(self, destination_pk: int) -> None:
        """Ask the destination to commit to the objects it was delivered and not yet asked about, one
        N-ACTION per :data:`commitment.REQUEST_LIMIT` objects; requests unanswered for
        ``outbox.commitment_timeout_seconds`` are asked again (:mod:`dicom_node.commitment`)."""
        from dicom_node import scu

        # Overdue requests are looked for once a round: a request of this round is not overdue in it (on a
        # slow machine with a short time-out it was asked again at once).
        expired = False
        while True:
            now = utcnow()
            with session_scope(self.session_factory) as session:
                destination = session.get(RemoteAe, destination_pk)
                if destination is None or not destination.enabled:
                    return
                if not destination.storage_commitment:  # switched off since these were delivered
                    commitment.stop_asking(session, destination_pk)
                    return
                given_up = 0
                if not expired:
                    given_up = commitment.expire(session, destination_pk, now,
                                                 timeout_seconds=self.settings.commitment_timeout_seconds,
                                                 max_requests=self.settings.commitment_requests)
                    expired = True
                # committed before the N-ACTION goes: the PACS may report before it answers
                request = commitment.take_due(session, destination_pk, now,
                                              timeout_seconds=self.settings.commitment_timeout_seconds)
                session.expunge(destination)
            if given_up:
                LOGGER.warning("destination %d (%s): %d delivered objects not confirmed: no storage "
                               "commitment report", destination.id, destination.ae_title, given_up)
            if request is None:
                return
            final, why = False, ""

            def answered(uid: str = request.transaction_uid) -> bool:  # on the node's listener
                try:
                    with session_scope(self.session_factory) as session:
                        return not commitment.awaiting(session, uid)
                except Exception as exc:  # the request was taken: wait on to the end, fail nothing
                    LOGGER.debug("storage commitment: report not looked up (%s)", type(exc).__name__)
                    return False

            try:
                context = self._tls_context() if destination.tls else None
                status = scu.request_commitment(
                    request.transaction_uid, request.objects, destination.host or "",
                    int(destination.port or 0),
                    destination.ae_title, calling_aet=self.calling_aet, tls=context,
                    max_pdu=scu.DEFAULT_MAX_PDU if self.max_pdu is None else self.max_pdu,
                    dimse_timeout=self.dimse_timeout, on_report=self._take_report,
                    report_wait=self.settings.commitment_report_wait_seconds, answered=answered,
                )
            except NodeError as exc:
                why = str(exc)
            except OSError as exc:
                why = f"{type(exc).__name__}: {exc.strerror or exc}"
            except Exception as exc:  # a failed request, as in _send: the objects were delivered all the same
                why = f"unexpected {type(exc).__name__}"
                LOGGER.error("destination %d: storage commitment request failed (%s)", destination.id, why)
            else:
                if status == 0:
                    LOGGER.info("destination %d (%s): storage commitment requested (%d objects)",
                                destination.id, destination.ae_title, len(request.objects))
                    try:
                        with session_scope(self.session_factory) as session:
                            commitment.request_sent(session, request, utcnow())
                    except Exception as exc:  # still overdue: asked again at the next round, not lost
                        LOGGER.warning("destination %d: storage commitment request not recorded as sent (%s)",
                                       destination.id, type(exc).__name__)
                    continue
                # a PACS that refuses the request as such (0x0122: it does not offer the service) would again
                why, final = scu.describe(status), refuses_the_object(status)
            LOGGER.warning("destination %d (%s): storage commitment request for %d objects not taken (%s)",
                           destination.id, destination.ae_title, len(request.objects), scu.for_log(why))
            with session_scope(self.session_factory) as session:
                commitment.request_not_taken(session, request, utcnow(), why, final=final,
                                             max_requests=self.settings.commitment_requests)
            if not final:
                return  # no association or no answer: asked again after the time-out

    def _take_report(self, event: Event) -> int:
        """A storage commitment report on the association of the request (the PACS did not open its own).
        Objects it says are not kept are due now: the round that ends with this request schedules the next
        at once (:meth:`_schedule_next`), which sends them."""
        status, _resend = take_commitment_report(event, self.session_factory, self.settings)
        return status


def _went_out(outcome: tuple[int | None, str]) -> bool:
    """Whether a delivery of a batch was sent (or tried): not one whose result file could not be read."""
    status, error = outcome
    return status is not None or not (error.startswith(RESULT_FILE) or UNREADABLE in error)


def retry_or_dead(delivery: Delivery, now: datetime, settings: OutboxSettings, *, final: bool = True,
                  refused: bool = False, why: str = "the peer refused the object itself, each time") -> bool:
    """After a failed attempt: DEAD after ``max_attempts``, or at once when ``refused`` (the peer refused
    the object itself ``refused_attempts`` times in a row), else RETRYING with exponential back-off. Not
    ``final``: the node is making the object again, and the delivery waits for that, retrying, however many
    attempts. Returns whether it went DEAD."""
    if final and (refused or delivery.attempts >= settings.max_attempts):
        delivery.state = DeliveryState.DEAD
        delivery.next_attempt_at = None
        LOGGER.warning("delivery %d is DEAD after %d attempts (%s)", delivery.id, delivery.attempts,
                       why if refused else "retried in vain")
        return True
    delivery.state = DeliveryState.RETRYING
    delay = backoff_seconds(delivery.attempts, settings.backoff_initial_seconds, settings.backoff_max_seconds)
    delivery.next_attempt_at = now + timedelta(seconds=delay)
    return False


def not_kept_in_a_row(session: Session, delivery: Delivery, wanted: int) -> int:
    """How many of the delivery's last copies in a row the PACS took and then reported not kept (up to
    ``wanted``; the copies it took in between do not break the run, a failed attempt does). Only copies
    sent since the last resend count: each has its attempt, and the one reported on now has no report yet."""
    count = 0
    wanted = min(wanted, delivery.attempts - 1)
    outcomes = session.scalars(
        select(DeliveryAttempt.outcome).where(DeliveryAttempt.delivery_pk == delivery.id)
        .order_by(DeliveryAttempt.id.desc()).limit(2 * wanted + 2)
    )
    for outcome in outcomes:
        if outcome in ("delivered", "warning"):
            continue
        if outcome != NOT_KEPT or count >= wanted:
            break
        count += 1
    return count


def record_commitment_report(
    session_factory: sessionmaker[Session],
    calling_ae: str,
    event_type_id: int | None,
    info: Dataset | None,
    settings: OutboxSettings,
) -> tuple[int, int | None]:
    """Record a PACS's storage commitment result (an N-EVENT-REPORT the listener received); returns the
    status to answer, and the destination whose outbox should be woken to send objects again. An object
    reported not kept is due again now, and is DEAD with why after ``outbox.refused_attempts`` such
    reports in a row: a PACS that drops it will drop it again."""
    def refused(exc: InvalidReportError) -> tuple[int, None]:
        LOGGER.warning("storage commitment report from %s refused with 0x%04X: %s", calling_ae,
                       int(exc.status), exc)
        return int(exc.status), None

    try:
        report = commitment.parse_report(event_type_id, info)
    except InvalidReportError as exc:
        return refused(exc)
    now = utcnow()
    dead = 0
    try:
        with session_scope(session_factory) as session:
            applied = commitment.apply_report(session, calling_ae, report, now)
            for delivery, reason in applied.not_kept:
                note = (f"the PACS answered success, then reported that it does not keep it (storage "
                        f"commitment: {commitment.failure_words(reason)})")
                every_time = not_kept_in_a_row(session, delivery, settings.refused_attempts) + 1 \
                    >= settings.refused_attempts
                session.add(DeliveryAttempt(delivery_pk=delivery.id, at=now, status=reason, outcome=NOT_KEPT,
                                            error=note))
                delivery.last_status = reason
                delivery.last_error = f"{note}; {REFUSED}" if every_time else note
                delivery.delivered_at = None
                if retry_or_dead(delivery, now, settings, refused=every_time,
                                 why="the PACS took it and then did not keep it, each time"):
                    dead += 1
                else:
                    delivery.next_attempt_at = now  # the PACS is up: it just reported
    except InvalidReportError as exc:
        return refused(exc)
    if applied.destination_pk is None:
        LOGGER.warning("storage commitment report from %s for a transaction the node is not waiting for "
                       "(%d objects; asked again since, or sent again): nothing recorded", calling_ae,
                       applied.unmatched)
        return 0, None
    if applied.repeated and not applied.committed and not applied.not_kept:
        LOGGER.info("storage commitment report from %s repeats one recorded already (%d objects): nothing "
                    "changed", calling_ae, applied.repeated)
        return 0, None
    level = logging.WARNING if applied.not_kept else logging.INFO
    LOGGER.log(level, "storage commitment report from %s: %d kept, %d not kept (%d sent again, %d dead)%s",
               calling_ae, len(applied.committed), len(applied.not_kept), len(applied.not_kept) - dead, dead,
               f", {applied.unmatched} not asked about" if applied.unmatched else "")
    return 0, applied.destination_pk if len(applied.not_kept) > dead else None


def take_commitment_report(event: Event, session_factory: sessionmaker[Session], settings: OutboxSettings
                           ) -> tuple[int, int | None]:
    """An N-EVENT-REPORT from a PACS (PS3.4 J.3.3) on any association, the node's listener's or the one
    the outbox asked on: recorded when it is a storage commitment result, refused with a status when not.
    Returns the status to answer and the destination whose outbox should send objects again."""
    from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

    assoc = event.assoc
    peer = str((assoc.acceptor if assoc.is_requestor else assoc.requestor).ae_title).strip()
    request = event.request
    if str(getattr(request, "AffectedSOPClassUID", "")) != str(StorageCommitmentPushModel):
        return int(Status.NO_SUCH_EVENT_TYPE), None
    try:
        info = event.event_information
    except Exception as exc:  # the Event Information would not decode
        LOGGER.warning("storage commitment report from %s unreadable: %s", peer, describe_exception(exc))
        return int(Status.INVALID_ARGUMENT_VALUE), None
    try:
        return record_commitment_report(session_factory, peer, getattr(request, "EventTypeID", None), info,
                                        settings)
    except Exception as exc:  # the PACS reports again when it gets a failure
        LOGGER.error("storage commitment report from %s not recorded: %s", peer, describe_exception(exc))
        return int(Status.PROCESSING_FAILURE), None


# ---------------------------------------------------------------------------------------------
# Dead letters: resend (CLI and web console)
# ---------------------------------------------------------------------------------------------


def dead_deliveries(session: Session) -> list[Delivery]:
    return list(
        session.scalars(
            select(Delivery)
            .where(Delivery.state == DeliveryState.DEAD)
            .options(selectinload(Delivery.destination), selectinload(Delivery.result_object))
            .order_by(Delivery.id)
        )
    )


RESENDABLE_STATES = frozenset({DeliveryState.DEAD, DeliveryState.DELIVERED})


def requeue(session: Session, delivery_pks: Sequence[int] | None, actor: str) -> list[Delivery]:
    """Send deliveries again now, audited as "delivery.resend" (all DEAD ones when ``delivery_pks`` is None).

    The one rule for the CLI and the console: a DEAD delivery (after the PACS is fixed) or a DELIVERED one
    (the PACS lost it) may be resent; a PENDING/RETRYING one is already being tried and is refused with
    :class:`ConflictError`. The attempt budget starts again; the history in ``delivery_attempt`` is kept.
    """
    if delivery_pks is None:
        chosen = dead_deliveries(session)
    else:
        chosen = []
        for pk in delivery_pks:
            delivery = session.get(Delivery, pk)
            if delivery is None:
                raise NotFoundError(f"no delivery with id {pk}")
            if delivery.state not in RESENDABLE_STATES:
                reason = ("a later revision replaced it" if delivery.state is DeliveryState.SUPERSEDED
                          else "it is already being tried")
                raise ConflictError(f"delivery {pk} is {delivery.state.value}: {reason}")
            chosen.append(delivery)
    now = utcnow()
    for delivery in chosen:
        audit.record(
            session,
            actor,
            "delivery.resend",
            f"delivery:{delivery.id}",
            {
                "destination_pk": delivery.destination_pk,
                "previous_attempts": delivery.attempts,
                "previous_state": delivery.state.value,
            },
        )
        delivery.state = DeliveryState.PENDING
        delivery.attempts = 0
        delivery.next_attempt_at = now
        delivery.delivered_at = None
        commitment.forget(delivery)
        delivery.commitment_note = ""
    session.flush()
    return chosen


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``cxr-node resend`` to the CLI."""
    parser = subparsers.add_parser(
        "resend",
        help="send dead (or delivered) result deliveries again",
        description="Put DEAD (or DELIVERED) deliveries back in the outbox and try them now (audited). "
        "Without arguments, lists the dead deliveries.",
    )
    parser.add_argument("delivery_ids", nargs="*", type=int, metavar="DELIVERY_ID")
    parser.add_argument("--all-dead", action="store_true", help="every dead delivery")
    if not any(action.dest == "config" for action in parser._actions):
        # SUPPRESS: a --config given before the subcommand is not overwritten by this default.
        parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                            help="YAML settings file (default: $CXR_NODE_CONFIG)")
    parser.set_defaults(func=_resend_command)


def _resend_command(args: argparse.Namespace) -> int:
    from dicom_node.logconfig import configure_logging, for_command
    from dicom_node.settings import load_settings
    from dicom_node.store.parts import command_sessions

    try:
        settings = load_settings(getattr(args, "config", None))
        configure_logging(for_command(settings.logging))
        factory = command_sessions(settings)
    except NodeError as exc:
        say(f"error: {exc}", err=True)
        return 2
    try:
        if not args.all_dead and not args.delivery_ids:
            with session_scope(factory) as session:
                dead = dead_deliveries(session)
                for delivery in dead:
                    say(
                        f"{delivery.id}\t{delivery.result_object.kind.value}\t"
                        f"{delivery.destination.ae_title}\t{delivery.attempts} attempts\t{delivery.last_error}"
                    )
            say(f"{len(dead)} dead deliveries; give DELIVERY_ID... or --all-dead to resend")
            return 0 if not dead else 1
        try:
            with session_scope(factory) as session:
                chosen = requeue(session, None if args.all_dead else args.delivery_ids, audit.cli_actor())
                ids = [d.id for d in chosen]
                destinations = sorted({d.destination_pk for d in chosen})
        except NodeError as exc:
            say(f"error: {exc}", err=True)
            return 2
        outbox = Outbox.from_settings(settings, factory)
        for destination_pk in destinations:
            # Storage commitment is left to the node's outbox (its sweep asks within 30 s): its requests
            # count as overdue while on their way (commitment.take_due), which only the process sending
            # them knows they are not.
            outbox.deliver_due(destination_pk, ask_commitment=False)
        with session_scope(factory) as session:
            states = {d.id: d for d in session.scalars(select(Delivery).where(Delivery.id.in_(ids)))}
            for pk in ids:
                delivery = states[pk]
                note = f" ({delivery.last_error})" if delivery.state is not DeliveryState.DELIVERED else ""
                say(f"{pk}\t{delivery.state.value}{note}")
            undelivered = sum(1 for d in states.values() if d.state is not DeliveryState.DELIVERED)
        return 0 if undelivered == 0 else 1
    finally:
        factory.kw["bind"].dispose()


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
