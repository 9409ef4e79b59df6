"""Scheduling: APScheduler 3 with a persistent job store in the node's own database.

Study settle: the first instance of a study arms a timer ``settle_seconds`` ahead. When it fires it looks
at the study's ``last_received_at``; if an instance arrived since, the timer is re-armed for the new
deadline, otherwise one ``Job(kind=STUDY_READY)`` row is created (unique dedupe key, so exactly once even
if the timer fires twice), the study becomes READY and the ``on_study_ready`` callbacks run. Timers live in
the database, and at start-up every study still RECEIVED is re-armed, so a restart — even ``kill -9`` —
loses nothing. Arming once per study (not per instance) keeps the C-STORE path free of scheduler writes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.ingest import IngestResult
from dicom_node.store.db import session_scope
from dicom_node.store.models import (
    SCHEDULER_JOBS,
    Instance,
    InstanceState,
    Job,
    JobKind,
    JobState,
    Series,
    Study,
    StudyState,
    utcnow,
)

LOGGER = logging.getLogger(__name__)

PERSISTENT_STORE = "default"
MEMORY_STORE = "memory"
JOB_TABLE = SCHEDULER_JOBS.name  # created by the migrations, not by APScheduler
SWEEP_SECONDS = 30.0

# Persistent jobs are stored as a textual reference to a module-level function plus its arguments; the
# function finds the live settler through this registry, filled by StudySettler.start().
_SETTLERS: dict[str, StudySettler] = {}


class NodeScheduler(BackgroundScheduler):  # type: ignore[misc]  # APScheduler 3 is untyped
    """APScheduler's background scheduler, whose thread outlives a database outage.

    APScheduler 3 guards only the job store's ``get_due_jobs``: an error in ``update_job``,
    ``remove_job`` or ``get_next_run_time`` (the database restarted while a round ran) ended its thread
    for good, and no settle timer, delivery or purge ran until the node was restarted (review: in 2 of 5
    PostgreSQL restarts). A failed round is tried again after ``jobstore_retry_interval`` seconds; a job
    it had started may run once more then, which every job of the node allows (they check the database
    for what is left to do)."""

    _store_failing = False

    def _process_jobs(self) -> float | None:
        try:
            wait: float | None = super()._process_jobs()
        except Exception as exc:
            if not self._store_failing:
                LOGGER.error("scheduler: the job store failed (%s); trying again every %g s",
                             type(exc).__name__, self.jobstore_retry_interval)
                self._store_failing = True
            return float(self.jobstore_retry_interval)
        if self._store_failing:
            LOGGER.info("scheduler: the job store answers again")
            self._store_failing = False
        return wait


def build_scheduler(engine: Engine, *, max_workers: int = 4) -> BackgroundScheduler:
    """A background scheduler whose default job store is a table in the node's database."""
    return NodeScheduler(
        jobstores={
            PERSISTENT_STORE: SQLAlchemyJobStore(engine=engine, tablename=JOB_TABLE),
            MEMORY_STORE: MemoryJobStore(),
        },
        executors={"default": ThreadPoolExecutor(max_workers=max_workers)},
        job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
        timezone="UTC",
    )


def settle_job_id(study_pk: int) -> str:
    return f"settle-study-{study_pk}"


def study_ready_dedupe_key(study_pk: int) -> str:
    return f"study:{study_pk}"


def scheduler_alive(scheduler: BackgroundScheduler) -> bool:
    """The scheduler runs and its thread is alive. ``running`` alone is a flag: it stayed true after an
    exception ended the thread, and /healthz said "ok" while no timer, delivery or purge ran any more."""
    thread = getattr(scheduler, "_thread", None)  # APScheduler 3's BackgroundScheduler
    return bool(scheduler.running) and (thread is None or thread.is_alive())


def fire_settle_timer(settler_name: str, study_pk: int) -> None:
    """Entry point of a persisted settle timer (referenced by name in the job store)."""
    settler = _SETTLERS.get(settler_name)
    if settler is None:
        LOGGER.error("settle timer for study %d fired but settler %r is not running", study_pk, settler_name)
        return
    settler.settle(study_pk)


def _sweep(settler_name: str) -> None:
    settler = _SETTLERS.get(settler_name)
    if settler is not None:
        settler.rearm_received()


class StudySettler:
    """Per-study settle timers on a scheduler; turns settled studies into STUDY_READY jobs."""

    def __init__(
        self,
        scheduler: BackgroundScheduler,
        session_factory: sessionmaker[Session],
        *,
        settle_seconds: float,
        callbacks: Sequence[Callable[[int], None]] = (),
        name: str = "node",
    ) -> None:
        self.scheduler = scheduler
        self.session_factory = session_factory
        self.settle_seconds = settle_seconds
        # The node's own list: subscribers added after construction are seen too.
        self.callbacks = callbacks
        self.name = name
        self._armed: set[int] = set()
        self._lock = threading.Lock()
        self._arming = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"settle-arm-{name}")

    # Life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Register, re-arm studies left RECEIVED by a previous run, and sweep periodically.

        The sweep also catches studies stored by paths that do not call :meth:`on_stored`
        (e.g. an upload through another process).
        """
        _SETTLERS[self.name] = self
        self.reopen_stranded()
        self.rearm_received()
        self.scheduler.add_job(
            _sweep, "interval", args=[self.name], seconds=SWEEP_SECONDS, id=f"settle-sweep-{self.name}",
            jobstore=MEMORY_STORE, replace_existing=True,
        )

    def stop(self) -> None:
        self._arming.shutdown(wait=True)
        if _SETTLERS.get(self.name) is self:
            del _SETTLERS[self.name]

    # Arming ----------------------------------------------------------------------------------

    def on_stored(self, result: IngestResult) -> None:
        """Ingest hook: make sure the study has a timer (re-arming is done by the timer itself).

        Arming writes the persistent job store (a second commit); it runs on the arming thread so the
        C-STORE response does not wait for it. Nothing is lost if the process dies first: the study row
        is already committed as RECEIVED, and start-up (and the periodic sweep) re-arm such studies.
        """
        if not result.duplicate or result.reopened:  # reopened: to make its lost results again
            self.study_stored(result.study_pk)

    def study_stored(self, study_pk: int) -> None:
        """A new instance of ``study_pk`` was committed (here or by a listener process): arm its timer."""
        with self._lock:
            if study_pk in self._armed:
                return
        self._arming.submit(self._arm_logged, study_pk)

    def _arm_logged(self, study_pk: int) -> None:
        try:
            self.arm(study_pk)
        except Exception as exc:  # the sweep re-arms it; say so instead of losing the error
            LOGGER.error("settle timer for study %d not armed now (%s); the sweep will retry",
                         study_pk, type(exc).__name__)

    def arm(self, study_pk: int, *, at: datetime | None = None) -> None:
        with self._lock:
            if study_pk in self._armed:
                return
            self._armed.add(study_pk)
        run_date = at or utcnow() + timedelta(seconds=self.settle_seconds)
        try:
            self.scheduler.add_job(
                fire_settle_timer, "date", run_date=run_date, args=[self.name, study_pk],
                id=settle_job_id(study_pk), jobstore=PERSISTENT_STORE, replace_existing=True,
            )
        except Exception:
            with self._lock:
                self._armed.discard(study_pk)
            raise

    def reopen_stranded(self) -> int:
        """Make RECEIVED again the finished studies that hold an image never looked at (earlier versions
        left an image stored while its study's results were built so for good); returns how many."""
        stranded = (
            select(Series.study_pk).join(Instance).where(Instance.state == InstanceState.RECEIVED).distinct()
        )
        finished = (StudyState.ANALYSED, StudyState.SKIPPED)
        try:
            with session_scope(self.session_factory) as session:
                reopened = list(
                    session.scalars(select(Study.id).where(Study.state.in_(finished), Study.id.in_(stranded)))
                )
                if reopened:
                    session.execute(
                        update(Study).where(Study.id.in_(reopened)).values(state=StudyState.RECEIVED, state_reason="")
                    )
        except Exception as exc:
            LOGGER.error("could not look for stranded images: %s", type(exc).__name__)
            return 0
        if reopened:
            LOGGER.warning("studies %s held images never analysed; reopened", reopened)
        return len(reopened)

    def rearm_received(self) -> int:
        """Arm every RECEIVED study without a timer; returns how many were armed."""
        try:
            with self.session_factory() as session:
                studies = session.execute(
                    select(Study.id, Study.last_received_at).where(Study.state == StudyState.RECEIVED)
                ).all()
        except Exception as exc:
            LOGGER.error("settle sweep could not read studies: %s", type(exc).__name__)
            return 0
        armed = 0
        for study_pk, last_received_at in studies:
            if self.scheduler.get_job(settle_job_id(study_pk), jobstore=PERSISTENT_STORE) is not None:
                with self._lock:
                    self._armed.add(study_pk)
                continue
            deadline = _aware(last_received_at) + timedelta(seconds=self.settle_seconds)
            self.arm(study_pk, at=max(deadline, utcnow()))
            armed += 1
        if armed:
            LOGGER.info("re-armed settle timers for %d received studies", armed)
        return armed

    # Firing ----------------------------------------------------------------------------------

    def settle(self, study_pk: int) -> None:
        """Timer callback: ready the study, or re-arm if an instance arrived since the timer was set."""
        with self._lock:
            self._armed.discard(study_pk)
        try:
            outcome = self._settle_in_db(study_pk)
        except Exception as exc:
            LOGGER.error("settling study %d failed (%s); retrying later", study_pk, type(exc).__name__)
            self.arm(study_pk, at=utcnow() + timedelta(seconds=max(self.settle_seconds, 5.0)))
            return
        if isinstance(outcome, datetime):
            self.arm(study_pk, at=outcome)
            return
        if outcome:
            LOGGER.info("study %d ready", study_pk)
            for callback in list(self.callbacks):
                try:
                    callback(study_pk)
                except Exception as exc:
                    LOGGER.error("study-ready callback %s failed for study %d: %s",
                                 getattr(callback, "__qualname__", "?"), study_pk, type(exc).__name__)

    def _settle_in_db(self, study_pk: int) -> datetime | bool:
        """Returns a new deadline, True if the study became ready now, False if nothing to do."""
        try:
            with self.session_factory() as session, session.begin():
                study = session.get(Study, study_pk)
                if study is None or study.state is not StudyState.RECEIVED:
                    return False
                deadline = _aware(study.last_received_at) + timedelta(seconds=self.settle_seconds)
                now = utcnow()
                if deadline > now + timedelta(milliseconds=50):
                    return deadline
                created = open_study_ready_job(session, study_pk)
                study.state = StudyState.READY
                study.ready_at = now
                return created
        except IntegrityError:
            # The job row exists already (a concurrent firing won): exactly once, nothing more to do.
            return False


def open_study_ready_job(session: Session, study_pk: int) -> bool:
    """The study's STUDY_READY job, created or — when a finished study was reopened by a late image —
    opened again; False when it is already open (queued or running: exactly once)."""
    key = study_ready_dedupe_key(study_pk)
    job = session.scalar(select(Job).where(Job.kind == JobKind.STUDY_READY, Job.dedupe_key == key))
    if job is None:
        session.add(Job(kind=JobKind.STUDY_READY, dedupe_key=key, study_pk=study_pk, state=JobState.PENDING))
        session.flush()
        return True
    if job.state in (JobState.PENDING, JobState.RUNNING):
        return False
    # a new round: its retries start again from the first delay (dicom_node.pipeline.retry_delay)
    job.state, job.error, job.started_at, job.finished_at = JobState.PENDING, "", None, None
    job.attempts = 0
    session.flush()
    return True


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes for timezone-aware columns; they are stored in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
