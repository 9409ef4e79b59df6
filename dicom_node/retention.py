"""Retention: remove received pixel files ``storage.retention_days`` after their study was done with.

Rows are kept (the console still lists the study and its finding); ``instance.purged_at`` records when
the file went. A study qualifies when it is finished — ANALYSED or SKIPPED — and every delivery of its
result objects is DELIVERED; the days count from the last of its image receipts, its analysis and its
deliveries, so results that reached the PACS only after a long outage keep their images for the full
period. Only images that were analysed or skipped go: FAILED studies and images, and studies with
undelivered or dead results, keep their files, so an operator can still act on them. Each run that removes
files writes one audit event (row ids only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.jobs import MEMORY_STORE
from dicom_node.store.db import session_scope
from dicom_node.store.files import fsync_directory
from dicom_node.store.models import (
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    ResultObject,
    Series,
    Study,
    StudyState,
    utcnow,
)

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

LOGGER = logging.getLogger(__name__)

JOB_ID = "retention:purge"
INTERVAL_SECONDS = 3600.0
#: The first run after start: soon, so that a run a crash cut short (files removed, the transaction that
#: records it lost) is recorded and audited then, not an hour later.
FIRST_RUN_SECONDS = 60.0
BATCH = 500

_active: Retention | None = None


def run_scheduled() -> None:
    """APScheduler entry point (a textual reference kept in the persistent job store)."""
    retention = _active
    if retention is not None:
        retention.purge()


@dataclass(frozen=True)
class PurgeReport:
    purged: int
    missing: int  # files already gone (rows marked anyway)


class Retention:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        storage_dir: Path,
        retention_days: float | None,
        *,
        scheduler: BaseScheduler | None = None,
        interval_seconds: float = INTERVAL_SECONDS,
        fsync: bool = True,
    ) -> None:
        self.session_factory = session_factory
        self.storage_dir = storage_dir
        self.retention_days = retention_days
        self.scheduler = scheduler
        self.interval_seconds = interval_seconds
        self.fsync = fsync  # storage.fsync: removals made durable before they are recorded

    def start(self) -> None:
        """Become this process's retention and run hourly, the first run :data:`FIRST_RUN_SECONDS` after
        start (it was one interval after)."""
        global _active
        _active = self
        if self.scheduler is None:
            return
        if self.retention_days is None:
            return
        self.scheduler.add_job(
            run_scheduled,
            "interval",
            seconds=self.interval_seconds,
            next_run_time=datetime.now(UTC)
            + timedelta(seconds=min(FIRST_RUN_SECONDS, self.interval_seconds)),
            id=JOB_ID,
            jobstore=MEMORY_STORE,
            replace_existing=True,
            coalesce=True,
            max_instances=1,
        )

    def stop(self) -> None:
        global _active
        if _active is self:
            _active = None

    def purge(self, now: datetime | None = None, actor: str = audit.SYSTEM) -> PurgeReport:
        """Remove every qualifying file; returns how many went."""
        if self.retention_days is None:
            return PurgeReport(0, 0)
        cutoff = (now or utcnow()) - timedelta(days=self.retention_days)
        purged = missing = 0
        after = 0  # the last instance looked at: one whose file stays is not looked at again in this run
        while True:
            with session_scope(self.session_factory) as session:
                candidates = self._candidates(session, cutoff, after)
                if not candidates:
                    break
                after = candidates[-1].id
                removed: dict[Path, list[tuple[Instance, bool]]] = {}  # by directory; and if it was there
                for instance in candidates:
                    path = self.storage_dir / instance.file_path
                    try:
                        path.unlink()
                        there = True
                    except FileNotFoundError:
                        there = False
                    except OSError as exc:
                        # Left for the next run; the others go. Not the path: it holds the image's UIDs.
                        LOGGER.warning("retention could not remove the file of instance %d (%s: %s); it is "
                                       "tried again at the next run", instance.id, type(exc).__name__,
                                       exc.strerror or "no reason given")
                        continue
                    removed.setdefault(path.parent, []).append((instance, there))
                ids: list[int] = []
                for directory, instances in removed.items():
                    if not self._sync(directory, [instance.id for instance, _ in instances]):
                        continue
                    for instance, there in instances:
                        instance.purged_at = utcnow()
                        ids.append(instance.id)
                        purged, missing = (purged + 1, missing) if there else (purged, missing + 1)
                if ids:
                    audit.record(
                        session,
                        actor,
                        "retention.purge",
                        "instance",
                        {"instance_ids": ids, "retention_days": self.retention_days},
                    )
            if len(candidates) < BATCH:
                break
        if purged or missing:
            LOGGER.info("retention removed %d pixel file(s) (%d already gone)", purged, missing)
        return PurgeReport(purged, missing)

    def _sync(self, directory: Path, instance_ids: list[int]) -> bool:
        """Make the removals in ``directory`` durable before their rows say so: unsynced, a power cut could
        bring a purged image back, patient data that retention no longer looks at. False when it failed:
        the rows stay unmarked, and the next run finds the files gone (or removes them again)."""
        if not self.fsync:
            return True
        try:
            fsync_directory(directory)
        except OSError as exc:
            LOGGER.warning("retention could not make the removal of the file(s) of instance(s) %s durable "
                           "(%s: %s); tried again at the next run", ", ".join(map(str, instance_ids)),
                           type(exc).__name__, exc.strerror or "no reason given")
            return False
        return True

    @staticmethod
    def _candidates(session: Session, cutoff: datetime, after: int = 0) -> list[Instance]:
        # Looked up for each study that is otherwise due (few: most are purged or too young) through the
        # result objects' index; as NOT IN, every delivery ever made was read on each hourly run.
        not_yet = (  # a result still to deliver, or delivered within the period
            select(Delivery.id)
            .join(ResultObject, Delivery.result_object_pk == ResultObject.id)
            .where(
                ResultObject.study_pk == Study.id,
                or_(
                    Delivery.state.not_in((DeliveryState.DELIVERED, DeliveryState.SUPERSEDED)),
                    Delivery.delivered_at >= cutoff,
                ),
            )
            .exists()
        )
        return list(
            session.scalars(
                select(Instance)
                .join(Series)
                .join(Study)
                .where(
                    Instance.purged_at.is_(None),
                    Instance.state.in_((InstanceState.ANALYSED, InstanceState.SKIPPED)),
                    Study.state.in_((StudyState.ANALYSED, StudyState.SKIPPED)),
                    Study.last_received_at < cutoff,
                    or_(Study.analysed_at.is_(None), Study.analysed_at < cutoff),
                    ~not_yet,
                    *([Instance.id > after] if after else []),
                )
                .order_by(Instance.id)
                .limit(BATCH)
            )
        )
