"""Study ready → eligibility → classify → findings → SR + PDF (+ heat-map SC) → outbox deliveries.

Every step leaves a committed row before the next one starts, so ``kill -9`` at any moment and a restart
resume where the work stopped and never repeat a visible effect:

1. eligibility: instances not CR/DX frontal chest are SKIPPED with their reason;
2. findings: one ``Finding`` per (instance, model name, model version) — a unique constraint — and its
   heat map saved before the row is committed;
3. result objects: their rows (with freshly generated SOP/Series Instance UIDs) are committed *before* any
   object is built; a rebuild after a crash reuses those UIDs, and a file already written (atomically) is
   never rebuilt — so one study and model version never yields two different SRs. A file lost once its
   object was handed to the outbox (a restore, a lost disk) is made again as the next revision, new UIDs;
4. deliveries: one per (object, destination), created only once the files exist, then handed to the outbox.

Classification runs in one worker thread, off the DICOM and scheduler threads, batching the images of all
studies that are ready at the same time.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from classifier.errors import UnsupportedImageError
from classifier.types import ModelInfo, Prediction, decided_label
from dicom_node import __version__, aes
from dicom_node.eligibility import DEFAULT_AGE_POLICY, AgePolicy, assess_instance, frames_refusal, study_age
from dicom_node.errors import NodeError, ReportingError, StorageError, describe_exception
from dicom_node.sop_classes import RESULT_SOP_CLASSES, is_image, not_an_image
from dicom_node.storage import lost_results, pdf_path
from dicom_node.store import header_columns
from dicom_node.store.db import session_scope, waits_for_a_resource
from dicom_node.store.files import FileStore, kept_value
from dicom_node.store.models import (
    AeRole,
    Delivery,
    DeliveryState,
    Finding,
    Instance,
    InstanceState,
    Job,
    JobKind,
    JobState,
    RemoteAe,
    ResultKind,
    ResultObject,
    Series,
    Study,
    StudyState,
    utcnow,
)

if TYPE_CHECKING:
    from dicom_node.outbox import Outbox
    from dicom_node.settings import Settings
    from reporting.types import AnalysedImage, NodeIdentity, NotAnalysedImage, Revision

LOGGER = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9001
PDF_SERIES_NUMBER = 9002
SC_SERIES_NUMBER = 9003
RETRY_DELAY_SECONDS = 30.0  # the first wait after a retriable failure; it doubles with each attempt
MAX_RETRY_DELAY_SECONDS = 600.0
MAX_WAIT_HOURS = 24.0  # a study still failing for a resource after this long is FAILED, for an alert
# After this long with nothing queued, the worker looks for open jobs no one works on (_resubmit_forgotten)
IDLE_SWEEP_SECONDS = 60.0
MAX_LOAD_RETRY_SECONDS = 1800.0  # a model that fails to load is tried again at most this far apart
#: Why a report names as not analysed an image an earlier model classified (its findings are in the console)
EARLIER_MODEL_ONLY = "analysed by an earlier model only"
FILE_REMOVED = "its file was removed before this model could read it"


def retry_delay(attempts: int) -> float:
    """Seconds before a study whose processing failed for want of a resource (disk, database) is tried
    again: less often the longer the shortage lasts."""
    return float(min(RETRY_DELAY_SECONDS * 2 ** max(attempts - 1, 0), MAX_RETRY_DELAY_SECONDS))


class ImageClassifier(Protocol):
    """What the pipeline needs from :class:`classifier.inference.Classifier`."""

    @property
    def info(self) -> ModelInfo: ...

    def predict(self, images: Sequence[npt.NDArray[np.float32]], *, heatmap: bool = True) -> list[Prediction]: ...

    def predict_datasets(
        self, datasets: Sequence[pydicom.Dataset], *, heatmap: bool = True
    ) -> list[Prediction]: ...

    def predict_datasets_each(
        self, datasets: Sequence[pydicom.Dataset], *, heatmap: bool = True
    ) -> list[Prediction | UnsupportedImageError]: ...

    def predict_images(self, images: Sequence[Image.Image], *, heatmap: bool = True) -> list[Prediction]: ...


@dataclass(frozen=True)
class PipelineConfig:
    """The settings the pipeline acts on (taken from :class:`Settings` by :func:`config_from_settings`)."""

    storage_dir: Path
    results_dir: Path
    identity: NodeIdentity
    batch_size: int = 16
    heatmap: bool = True
    secondary_capture: bool = False
    send_skipped: bool = False
    fixed_destinations: tuple[str, ...] = ()
    fsync: bool = True
    indeterminate_threshold: float = 0.5  # recorded in the SR's algorithm parameters
    skip_unfamiliar: bool = True  # skip images unlike the training images, the wrong way up, or a negative
    ages: AgePolicy = DEFAULT_AGE_POLICY  # whom to classify by the age in the header


def node_identity(settings: Settings) -> NodeIdentity:
    """The node as the device that authored the results; its UID is the installation's
    (:func:`device_uid`)."""
    from reporting.types import NodeIdentity

    return NodeIdentity(
        name=settings.node.name,
        institution_name=settings.node.institution_name,
        manufacturer="cxr-node",
        model_name="CXR AI node",
        software_version=__version__,
        device_uid=device_uid(settings.node.data_dir),
        station_name=settings.dicom.ae_title,
    )


DEVICE_UID_FILE = "device-uid"
_DEVICE_UID = re.compile(r"2\.25\.[1-9][0-9]{0,38}")


def device_uid(data_dir: Path) -> str:
    """The node's Device Observer UID (TID 1004): made at random the first time it is needed (a 2.25 UUID
    UID) and kept in ``data_dir``, which is backed up with the database. It was derived from the AE title
    and the node's name, so every installation that kept the defaults was one device, and renaming the AE
    title made another (review)."""
    return kept_value(
        data_dir / DEVICE_UID_FILE, lambda: generate_uid(prefix=None),
        lambda value: _DEVICE_UID.fullmatch(value) is not None, "a UID of the form 2.25.<number>",
    )


def config_from_settings(settings: Settings) -> PipelineConfig:
    group = settings.pipeline
    return PipelineConfig(
        storage_dir=settings.storage_dir,
        results_dir=settings.results_dir,
        identity=node_identity(settings),
        batch_size=group.batch_size,
        heatmap=group.heatmap or group.secondary_capture,
        secondary_capture=group.secondary_capture,
        send_skipped=group.send_skipped,
        fixed_destinations=tuple(group.fixed_destinations),
        fsync=settings.storage.fsync,
        indeterminate_threshold=group.indeterminate_threshold,
        skip_unfamiliar=group.skip_unfamiliar,
        ages=AgePolicy.of(group),
    )


def load_classifier(settings: Settings) -> ImageClassifier:
    """Load the configured model (the shipped default when none is set). Imports TensorFlow.

    A model with a class the reports have no code for is refused here, at start-up, with the class
    named: loaded, it would classify every study and then fail to build every SR and PDF."""
    from classifier.errors import ModelArtifactError
    from classifier.inference import Classifier, default_model_path
    from reporting.codes import finding_for
    from reporting.errors import UnknownLabelError

    path = settings.pipeline.model_path or default_model_path()
    model = Classifier.load(path, indeterminate_threshold=settings.pipeline.indeterminate_threshold)
    unknown = []
    for label in model.info.classes:
        try:
            finding_for(label)
        except UnknownLabelError:
            unknown.append(label)
    if unknown:
        raise ModelArtifactError(
            f"the model's classes {unknown} have no coded concept for the SR (reporting/codes.py knows "
            "covid, normal, pneumonia and non-covid): its results could not be reported"
        )
    threshold, classes = settings.pipeline.indeterminate_threshold, len(model.info.classes)
    if 0.0 < threshold <= 1.0 / classes:
        # a two-class model's top probability is at least 0.5: at the default threshold a coin toss was
        # reported as a finding, and nothing said that no image could ever be indeterminate (review)
        LOGGER.warning(
            "pipeline.indeterminate_threshold %g marks no image indeterminate with this model of %d classes, "
            "whose top probability is at least %.2f; set it above that", threshold, classes, 1.0 / classes,
        )  # fmt: skip
    return model


# ---------------------------------------------------------------------------------------------
# Durable files
# ---------------------------------------------------------------------------------------------


def dataset_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _safe(text: str) -> str:
    """``text`` as part of a file name. Where characters were replaced or it was cut, a digest of the whole
    keeps apart names that would meet ("m+1" and "m 1"; two versions alike in their first 48 characters):
    one model's heat maps overwrote another's, and its findings showed the other's maps."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:48] or "_"
    if safe != text:
        safe = f"{safe}.{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return safe


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------


def destinations_for(session: Session, calling_aes: Iterable[str], fixed: Iterable[str]) -> list[RemoteAe]:
    """Where a study's results go: each caller's ``reply_to`` plus the fixed destinations (enabled ones)."""
    found: dict[int, RemoteAe] = {}
    for title in calling_aes:
        if not title:
            continue
        caller = aes.find(session, title, AeRole.CALLER)
        if caller is not None and caller.reply_to is not None and caller.reply_to.enabled:
            found[caller.reply_to.id] = caller.reply_to
    for title in fixed:
        destination = aes.find(session, title, AeRole.DESTINATION)
        if destination is None:
            LOGGER.warning("fixed destination %s is not a registered destination AE", title)
        elif destination.enabled:
            found[destination.id] = destination
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    """An eligible instance read for classification (kept in memory for the report's preview)."""

    instance_pk: int
    study_pk: int
    dataset: pydicom.Dataset
    read_ms: float


@dataclass
class _Cycle:
    """Per-cycle memory: datasets and previews already read, so reports do not read pixels twice."""

    datasets: dict[int, pydicom.Dataset] = field(default_factory=dict)
    previews: dict[int, npt.NDArray[np.uint8] | None] = field(default_factory=dict)
    # studies with an image whose file could not be read for a reason that passes: tried again later
    waiting: dict[int, StorageError] = field(default_factory=dict)


class Pipeline:
    """Processes ready studies in one worker thread; :meth:`process` is also callable synchronously."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        config: PipelineConfig,
        classifier_loader: Callable[[], ImageClassifier],
        *,
        outbox: Outbox | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.config = config
        self._loader = classifier_loader
        self._classifier: ImageClassifier | None = None
        self._classifier_lock = threading.Lock()
        self.outbox = outbox
        # Result files get the same atomic, fsync'ed writes as received instances.
        self.results = FileStore(config.results_dir, fsync=config.fsync)
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._pending: set[int] = set()
        self._busy = 0
        self._running: set[int] = set()  # the studies of the cycle under way
        self._waiting: set[int] = set()  # studies with a retry timer armed (_retry_later)
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._warm = threading.Event()
        self._next_load_try = 0.0  # monotonic time of the idle sweep's next try at a model that failed
        self._load_retry_seconds = IDLE_SWEEP_SECONDS

    # Lifecycle ------------------------------------------------------------------------------

    @property
    def classifier(self) -> ImageClassifier:
        with self._classifier_lock:
            if self._classifier is None:
                started = time.perf_counter()
                self._classifier = self._loader()
                info = self._classifier.info
                LOGGER.info(
                    "model %s %s loaded in %.1f s", info.name, info.version, time.perf_counter() - started
                )
            return self._classifier

    def start(self) -> None:
        """Start the worker and resume every study whose job is still PENDING or RUNNING. A result file a
        crash left half-written (an SR or PDF naming the patient) is removed first, as received ones are:
        the study's round makes it again."""
        if self._thread is not None:
            return
        self.results.remove_stale_temporaries()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="cxr-pipeline", daemon=True)
        self._thread.start()
        for study_pk in self.unfinished_studies():
            self.submit(study_pk)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def model_ready(self) -> bool:
        """False while the model loads and warms up at start-up, and when it cannot be loaded."""
        return self._warm.is_set()

    def unfinished_studies(self) -> list[int]:
        with session_scope(self.session_factory) as session:
            rows = session.scalars(
                select(Job.study_pk)
                .where(
                    Job.kind == JobKind.STUDY_READY,
                    Job.state.in_((JobState.PENDING, JobState.RUNNING)),
                    Job.study_pk.is_not(None),
                )
                .order_by(Job.id)
            )
            return list(dict.fromkeys(int(pk) for pk in rows if pk is not None))

    def submit(self, study_pk: int) -> None:
        """The ``Node.on_study_ready`` callback: queue the study and return at once."""
        with self._idle:
            if study_pk in self._pending:
                return
            self._pending.add(study_pk)
        self._queue.put(study_pk)

    @property
    def queue_depth(self) -> int:
        with self._idle:
            return len(self._pending) + self._busy

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or running (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return True

    def _load_model(self, *, report: bool) -> bool:
        """Load and warm up the model unless it is ready; True when it is. The idle sweep calls this again
        (``report`` off: the start-up logged why): a model folder still being copied when the node started,
        or mended later, is taken up without a restart, and the studies held for it are resumed. Before,
        model_ready stayed False and the held studies waited for a restart (review). The sweep's tries
        at a model that keeps failing space out, from a minute to half an hour."""
        if self._warm.is_set():
            return True
        now = time.monotonic()
        if not report and now < self._next_load_try:
            return False
        try:
            classifier = self.classifier
        except Exception:
            if report:
                LOGGER.exception("the classifier could not be loaded; studies stay PENDING")
            # A model refused after a full load (classes the reports cannot code) costs seconds of CPU a
            # try: the tries space out, doubling to MAX_LOAD_RETRY_SECONDS (review)
            self._next_load_try = now + self._load_retry_seconds
            self._load_retry_seconds = min(2 * self._load_retry_seconds, MAX_LOAD_RETRY_SECONDS)
            return False
        if self._stopping.is_set():  # stopped while the model loaded: the node exits without a warm-up
            return False             # of seconds first (review)
        self._warm_up(classifier)
        self._warm.set()
        return True

    def _run(self) -> None:
        self._load_model(report=True)
        while not self._stopping.is_set():
            try:
                first = self._queue.get(timeout=IDLE_SWEEP_SECONDS)
            except queue.Empty:
                self._resubmit_forgotten()
                continue
            if first is None:
                break
            batch = [first]
            while len(batch) < self.config.batch_size:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._stopping.set()
                    break
                batch.append(more)
            with self._idle:
                for pk in batch:
                    self._pending.discard(pk)
                self._busy += len(batch)
                self._running.update(batch)
            try:
                self.process(batch)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # not only Exception: a Rust panic (pyo3) is not one
                # One cycle's failure must not end the worker: every later study would wait for a restart
                # that met the same study first. The message stays out of the log (it may quote PHI).
                LOGGER.error(
                    "pipeline cycle for studies %s failed: %s", batch, describe_exception(exc, stack=True)
                )
            finally:
                with self._idle:
                    self._busy -= len(batch)
                    self._running.difference_update(batch)
                    self._idle.notify_all()

    def _resubmit_forgotten(self) -> int:
        """Queue the studies whose job is open in the database while this process neither holds, runs nor
        waits to retry them; returns how many. A database outage could leave such studies: a claim or a
        failure that could not be written dropped them from the queue, and they waited for a restart
        while /healthz said "ok" (review: 133 studies after a PostgreSQL restart)."""
        if not self._load_model(report=False):
            return 0  # no model yet: they wait for it
        try:
            open_jobs = self.unfinished_studies()
        except Exception as exc:
            LOGGER.warning("looking for studies left unprocessed failed (%s); trying again later",
                           type(exc).__name__)
            return 0
        with self._idle:
            forgotten = [pk for pk in open_jobs
                         if pk not in self._pending and pk not in self._running and pk not in self._waiting]
        for study_pk in forgotten:
            self.submit(study_pk)
        if forgotten:
            LOGGER.warning("%d study(ies) had an open job nothing was working on (a database outage); "
                           "processing them now", len(forgotten))
        return len(forgotten)

    def _retry_later(self, study_pk: int, delay: float) -> None:
        """Queue the study again after ``delay`` seconds."""
        with self._idle:
            self._waiting.add(study_pk)
        timer = threading.Timer(delay, self._retry_now, args=(study_pk,))
        timer.daemon = True
        timer.start()

    def _retry_now(self, study_pk: int) -> None:
        with self._idle:
            self._waiting.discard(study_pk)
        self.submit(study_pk)

    def _warm_up(self, classifier: ImageClassifier) -> None:
        """One throw-away prediction and report before the first study: the first real one would otherwise
        pay ~1-2 s of TensorFlow tracing and highdicom/reportlab first-use costs. Synthetic data, no PHI."""
        from reporting.encapsulated import build_encapsulated_pdf
        from reporting.pdf import build_pdf
        from reporting.sr import build_sr
        from reporting.types import AnalysedImage

        started = time.perf_counter()
        try:
            height, width = classifier.info.input_size
            prediction = classifier.predict(
                [np.zeros((height, width, 3), dtype=np.float32)], heatmap=self.config.heatmap
            )[0]
            source = pydicom.Dataset()
            source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
            source.SOPInstanceUID, source.SeriesInstanceUID, source.StudyInstanceUID = (
                generate_uid(), generate_uid(), generate_uid())
            source.Modality = "CR"
            source.PatientName, source.PatientID = "WARM^UP", "WARMUP"
            image = AnalysedImage(source=source, prediction=prediction, preview=np.zeros((64, 64), np.uint8))
            now = utcnow()
            identity = self.config.identity
            dataset_bytes(build_sr([image], identity, series_instance_uid=generate_uid(),
                                   sop_instance_uid=generate_uid(), analysed_at=now))
            pdf = build_pdf([image], identity, analysed_at=now)
            dataset_bytes(build_encapsulated_pdf(pdf, source, identity, series_instance_uid=generate_uid(),
                                                 sop_instance_uid=generate_uid(), created_at=now))
        except Exception as exc:  # a failed warm-up only costs the first study some latency
            LOGGER.warning("warm-up failed (%s); the first study will be slower", type(exc).__name__)
            return
        LOGGER.info("pipeline warmed up in %.1f s", time.perf_counter() - started)

    # One cycle --------------------------------------------------------------------------------

    def process(self, study_pks: Sequence[int]) -> None:
        """Run the whole pipeline for these studies; safe to repeat (idempotent)."""
        cycle = _Cycle()
        claimed: list[int] = []
        for pk in study_pks:
            try:
                if self._claim(pk):
                    claimed.append(pk)
            except Exception as exc:  # the database went away: each study is retried, not dropped
                self._fail(pk, exc)
        if not claimed:
            return
        try:
            info = self.classifier.info
        except Exception as exc:
            # No model is a configuration problem, not the study's: keep the work for the next start.
            LOGGER.error("no classifier (%s); %d study(ies) stay queued", type(exc).__name__, len(claimed))
            self._release(claimed, f"model unavailable ({type(exc).__name__})")
            return
        self._warm.set()  # loaded here after a failed start: ready (a warm-up would only save latency now)
        try:
            self._classify(claimed, info, cycle)
        except Exception as exc:
            for pk in claimed:
                self._fail(pk, exc)
            return
        for pk in claimed:
            if self._stopping.is_set():
                break  # shutting down: the rest stay RUNNING and resume at the next start
            if pk in cycle.waiting:
                self._fail(pk, cycle.waiting[pk])
                continue
            try:
                self._finish_study(pk, info, cycle)
            except Exception as exc:
                self._fail(pk, exc)

    def _claim(self, study_pk: int) -> bool:
        """Mark the study's open jobs RUNNING and sort out ineligible instances (SKIPPED + reason)."""
        with session_scope(self.session_factory) as session:
            study = session.get(Study, study_pk)
            if study is None:
                LOGGER.warning("study %d vanished before processing", study_pk)
                return False
            now = utcnow()
            for job in self._open_jobs(session, study_pk):
                job.state = JobState.RUNNING
                job.attempts += 1
                job.started_at = job.started_at or now
            if study.state in (StudyState.RECEIVED, StudyState.READY, StudyState.FAILED):
                study.state = StudyState.PROCESSING
            for instance in self._instances(session, study_pk):
                if instance.state is not InstanceState.RECEIVED:
                    continue
                verdict = assess_instance(instance, ages=self.config.ages)
                if not verdict.eligible:
                    instance.state = InstanceState.SKIPPED
                    instance.state_reason = verdict.reason
                    LOGGER.info("instance %d skipped by the %s check", instance.id, verdict.check)
        return True

    @staticmethod
    def _open_jobs(session: Session, study_pk: int) -> list[Job]:
        return list(
            session.scalars(
                select(Job).where(
                    Job.study_pk == study_pk,
                    Job.kind == JobKind.STUDY_READY,
                    Job.state.in_((JobState.PENDING, JobState.RUNNING)),
                )
            )
        )

    @staticmethod
    def _instances(session: Session, study_pk: int) -> list[Instance]:
        return list(
            session.scalars(
                select(Instance)
                .join(Series)
                .where(Series.study_pk == study_pk)
                .options(selectinload(Instance.series).selectinload(Series.study).selectinload(Study.patient))
                .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
            )
        )

    # Classification ---------------------------------------------------------------------------

    def _classify(self, study_pks: Sequence[int], info: ModelInfo, cycle: _Cycle) -> None:
        """Classify eligible instances without a finding for this model, ``batch_size`` at a time: those
        received, and those an earlier model analysed whose files are kept. A report covers the images of
        its model only, so after a model change a late image's report left the study's earlier images out
        without a word (review); they are classified again with the late one."""
        with session_scope(self.session_factory) as session:
            candidates = session.scalars(
                select(Instance)
                .join(Series)
                .where(
                    Series.study_pk.in_(study_pks),
                    (Instance.state == InstanceState.RECEIVED)
                    | ((Instance.state == InstanceState.ANALYSED) & Instance.purged_at.is_(None)),
                    ~Instance.findings.any(
                        (Finding.model_name == info.name) & (Finding.model_version == info.version)
                    ),
                )
                .options(selectinload(Instance.series).selectinload(Series.study).selectinload(Study.patient))
                .order_by(Instance.id)
            )
            # An instance that arrived after the claim is assessed in the next cycle, never here.
            todo = [
                (i.id, i.file_path, i.series.study_pk)
                for i in candidates
                if assess_instance(i, ages=self.config.ages).eligible
            ]
            # Eligible instances that already have a finding (a crash after the commit) are done.
            for instance in session.scalars(
                select(Instance)
                .join(Series)
                .where(
                    Series.study_pk.in_(study_pks),
                    Instance.state == InstanceState.RECEIVED,
                    Instance.findings.any(
                        (Finding.model_name == info.name) & (Finding.model_version == info.version)
                    ),
                )
            ):
                instance.state = InstanceState.ANALYSED
        size = max(1, self.config.batch_size)
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            loaded = [
                item for item in (self._read(pk, path, study, cycle) for pk, path, study in chunk
                                  if study not in cycle.waiting)
                if item
            ]
            if loaded:
                self._predict_and_store(loaded, info, cycle)

    def _read(self, instance_pk: int, file_path: str, study_pk: int, cycle: _Cycle) -> _Loaded | None:
        """The stored image, its header checked first: an object of many frames or too many pixels was read
        whole before it was refused, a batch of them at once (12 images of 288 MB: 4.3 GB, and MemoryError
        recorded as "stored file unreadable"; review). Such an image is now skipped from its header."""
        started = time.perf_counter()
        path = self.config.storage_dir / file_path
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            refusal = frames_refusal(header) or _size_refusal(header)  # what the database rows do not keep
            ds = None if refusal is not None else _read_dataset(path)
        except Exception as exc:
            if _passes(exc):  # its study is tried again later (Pipeline._fail), the image left RECEIVED
                LOGGER.warning("instance %d: stored file could not be read now (%s); its study is tried "
                               "again later", instance_pk, type(exc).__name__)
                cycle.waiting[study_pk] = _read_later(instance_pk, exc)
                return None
            self._mark_instance(instance_pk, InstanceState.FAILED, f"stored file unreadable ({type(exc).__name__})")
            LOGGER.warning("instance %d: stored file unreadable (%s)", instance_pk, type(exc).__name__)
            return None
        if ds is None:
            self._mark_instance(instance_pk, InstanceState.SKIPPED, refusal or "")
            LOGGER.info("instance %d skipped: %s", instance_pk, refusal)
            return None
        return _Loaded(instance_pk, study_pk, ds, (time.perf_counter() - started) * 1000.0)

    def _predict_and_store(self, loaded: list[_Loaded], info: ModelInfo, cycle: _Cycle) -> None:
        from classifier.preprocess import display_image

        classifier = self.classifier
        started = time.perf_counter()
        try:
            # An image that cannot be read has its reason in its place; the others are one batch.
            datasets = [item.dataset for item in loaded]
            outcomes = classifier.predict_datasets_each(datasets, heatmap=self.config.heatmap)
            results: list[tuple[_Loaded, Prediction | BaseException]]
            results = list(zip(loaded, outcomes, strict=True))
        except Exception:
            # Anything else (the model, memory) must not sink the batch: one by one, to find what fails.
            LOGGER.warning("batch of %d failed; classifying one by one", len(loaded))
            results = []
            for item in loaded:
                try:
                    results.append(
                        (item, classifier.predict_datasets([item.dataset], heatmap=self.config.heatmap)[0])
                    )
                except Exception as exc:
                    results.append((item, exc))
        batch_ms = (time.perf_counter() - started) * 1000.0
        stored: list[tuple[int, Finding]] = []
        for item, outcome in results:
            if isinstance(outcome, UnsupportedImageError):
                self._mark_instance(item.instance_pk, InstanceState.SKIPPED, f"image not supported: {outcome}")
                continue
            if isinstance(outcome, BaseException):
                self._mark_instance(
                    item.instance_pk, InstanceState.FAILED, f"classification failed ({type(outcome).__name__})"
                )
                LOGGER.error("instance %d: classification failed (%s)", item.instance_pk, type(outcome).__name__)
                continue
            refusal = outcome.doubt
            if refusal is not None and self.config.skip_unfamiliar:
                self._mark_instance(item.instance_pk, InstanceState.SKIPPED, refusal)
                LOGGER.info("instance %d: skipped by the model's own checks", item.instance_pk)
                continue
            heatmap_path = self._save_heatmap(item.instance_pk, info, outcome.heatmap)
            timings = {str(k): float(v) for k, v in outcome.timings_ms.items()}
            timings.update(read=round(item.read_ms, 2), batch=round(batch_ms, 2), batch_size=len(loaded))
            finding = Finding(
                instance_pk=item.instance_pk,
                model_name=info.name,
                model_version=info.version,
                label=outcome.label,
                top_class=outcome.top_class,
                confidence=outcome.confidence,
                probabilities={str(k): float(v) for k, v in outcome.probabilities.items()},
                timings_ms=timings,
                heatmap_path=heatmap_path,
                novelty=outcome.novelty,
                better_turn=outcome.better_turn,
                negative=outcome.negative,
            )
            stored.append((item.instance_pk, finding))
            # Keep what the report needs, the header and the preview, not the pixels: a cycle classifies
            # up to batch_size studies before it reports any (504 held data sets took 3.9 GB).
            cycle.previews[item.instance_pk] = _preview(display_image, item.dataset, item.instance_pk)
            cycle.datasets[item.instance_pk] = _without_pixels(item.dataset)
        with session_scope(self.session_factory) as session:
            for instance_pk, finding in stored:
                session.add(finding)
                instance = session.get(Instance, instance_pk)
                if instance is not None:
                    instance.state = InstanceState.ANALYSED
                    instance.state_reason = ""
        LOGGER.info("classified %d image(s) in %.0f ms", len(stored), batch_ms)

    def _save_heatmap(self, instance_pk: int, info: ModelInfo, heatmap: Any) -> str | None:
        if heatmap is None:
            return None
        relative = f"heatmaps/{instance_pk}-{_safe(info.name)}-{_safe(info.version)}.npy"
        buffer = BytesIO()
        np.save(buffer, np.asarray(heatmap, dtype=np.float32))
        self.results.write(relative, [buffer.getvalue()])
        return relative

    def _mark_instance(self, instance_pk: int, state: InstanceState, reason: str) -> None:
        with session_scope(self.session_factory) as session:
            instance = session.get(Instance, instance_pk)
            if instance is not None:
                instance.state = state
                instance.state_reason = reason

    # Results ------------------------------------------------------------------------------------

    def _finish_study(self, study_pk: int, info: ModelInfo, cycle: _Cycle) -> None:
        with session_scope(self.session_factory) as session:
            instances = self._instances(session, study_pk)
            analysed = [i for i in instances if i.state is InstanceState.ANALYSED]
            skipped = [i for i in instances if i.state is InstanceState.SKIPPED]
            failed = [i for i in instances if i.state is InstanceState.FAILED]
            waiting = [i for i in instances if i.state is InstanceState.RECEIVED]
            current = _with_finding(session, [i.id for i in analysed], info)
        if waiting:
            # Instances that arrived while this cycle ran: go round again.
            self.submit(study_pk)
            return
        if analysed and not current:
            # Every analysed image has an earlier model's findings only, and this model could not read
            # it again (its file removed by retention): this model has nothing to report, and the study
            # was FAILED, "analysed images could not be reloaded", though the earlier results stand (review)
            removed = all(i.purged_at is not None for i in analysed)
            reason = (f"{EARLIER_MODEL_ONLY} ({FILE_REMOVED}): its results stand, this model made none"
                      if removed else f"{EARLIER_MODEL_ONLY}: its results stand, this model made none")
            self._finalise(study_pk, StudyState.ANALYSED, reason, [])
            return
        if analysed:
            objects = self._ensure_result_rows(study_pk, info, [i.id for i in analysed])
            objects = self._build_missing(study_pk, info, objects, cycle)
            for instance in analysed:  # pixels of a finished study need not wait for the whole batch
                cycle.datasets.pop(instance.id, None)
                cycle.previews.pop(instance.id, None)
            state, reason = StudyState.ANALYSED, ""
        elif failed:
            self._finalise(study_pk, StudyState.FAILED, "no image could be analysed", [], job_failed=True)
            return
        else:
            # The reason is the images' (a dose SR's "not an image" told the radiologist nothing about
            # the radiograph, review); a study of only non-images gives theirs.
            images = [i for i in skipped if is_image(i.sop_class_uid)]
            reasons = sorted({i.state_reason for i in images or skipped if i.state_reason})
            reason = "; ".join(reasons or ["no image in the study"])
            state = StudyState.SKIPPED
            objects = []
            # the "not analysed" notice is about images; a study of only a dose SR or a report gets none
            if self.config.send_skipped and images:
                objects = self._ensure_skipped_rows(study_pk, info, [i.id for i in images])
                self._build_skipped(study_pk, objects, reason)
        self._finalise(study_pk, state, reason, objects)

    def _ensure_result_rows(self, study_pk: int, info: ModelInfo, analysed_pks: list[int]) -> list[int]:
        kinds = [ResultKind.SR, ResultKind.PDF]
        if self.config.secondary_capture and self._has_heatmap(analysed_pks, info):
            kinds.append(ResultKind.HEATMAP_SC)
        return self._ensure_rows(study_pk, info, kinds, analysed_pks)

    def _ensure_skipped_rows(self, study_pk: int, info: ModelInfo, skipped_pks: list[int]) -> list[int]:
        return self._ensure_rows(study_pk, info, [ResultKind.PDF], skipped_pks)

    def _has_heatmap(self, analysed_pks: list[int], info: ModelInfo) -> bool:
        with session_scope(self.session_factory) as session:
            return (
                session.scalar(
                    select(Finding.id).where(
                        Finding.instance_pk.in_(analysed_pks),
                        Finding.model_name == info.name,
                        Finding.model_version == info.version,
                        Finding.heatmap_path.is_not(None),
                    )
                )
                is not None
            )

    def _ensure_rows(
        self, study_pk: int, info: ModelInfo, kinds: list[ResultKind], covers: list[int]
    ) -> list[int]:
        """Get or create one ResultObject per kind that reports on the instances ``covers``, with its UIDs,
        committed before anything is built.

        The latest revision of a kind is reused while it covers the same instances (a rebuild after a
        crash repeats its UIDs). An image that arrived after it was made changes the set: the next revision
        is a new object, so the PACS gets results that include the late image; the study's analysis time
        becomes that of the new revision. So it is when a file of a latest revision already handed to the
        outbox is gone (a restore, a lost disk): that object may be on a PACS under its UIDs, so every kind
        is made again, from the database, as the next revision (a SR and PDF that state one analysis)."""
        covered = sorted(covers)
        sop_classes = {kind: RESULT_SOP_CLASSES[kind.value] for kind in ResultKind}
        for _ in range(2):
            try:
                with session_scope(self.session_factory) as session:
                    study = session.get(Study, study_pk)
                    if study is None:
                        raise ReportingError(f"study {study_pk} vanished")
                    now = utcnow()  # the analysis time of every object this call makes
                    if study.analysed_at is None:
                        study.analysed_at = now
                    model = (info.name, info.version)
                    lost = [
                        r.id for r in lost_results(session, self.config.results_dir, study_pk)
                        if r.sent and r.kind in kinds and (r.model_name, r.model_version) == model
                    ]
                    ids: list[int] = []
                    for kind in kinds:
                        latest = session.scalar(
                            select(ResultObject)
                            .where(
                                ResultObject.study_pk == study_pk,
                                ResultObject.kind == kind,
                                ResultObject.model_name == info.name,
                                ResultObject.model_version == info.version,
                            )
                            .order_by(ResultObject.revision.desc())
                            .limit(1)
                        )
                        if latest is not None and not lost and _covers(session, latest, covered):
                            ids.append(latest.id)
                            continue
                        if latest is not None:
                            why = "files of its results missing" if lost else "a changed set of images"
                            LOGGER.info("study %d: %s revision %d for %s", study_pk, kind.value,
                                        latest.revision + 1, why)
                            study.analysed_at = now
                        sop_uid = generate_uid()
                        row = ResultObject(
                            study_pk=study_pk,
                            kind=kind,
                            model_name=info.name,
                            model_version=info.version,
                            sop_class_uid=sop_classes[kind],
                            sop_instance_uid=sop_uid,
                            series_instance_uid=generate_uid(),
                            file_path=f"{study_pk}/{kind.value}-{sop_uid}.dcm",
                            revision=1 if latest is None else latest.revision + 1,
                            covers=covered,
                            created_at=now,  # the analysis time it states: a later revision names it
                        )
                        session.add(row)
                        session.flush()
                        ids.append(row.id)
                    return ids
            except IntegrityError:
                LOGGER.info("result rows for study %d created concurrently; reloading", study_pk)
        raise ReportingError(f"could not create result rows for study {study_pk}")

    def _build_missing(
        self, study_pk: int, info: ModelInfo, object_pks: list[int], cycle: _Cycle
    ) -> list[int]:
        """Build and write every result object whose file does not exist yet; returns the objects to send.

        The heat-map Secondary Capture is optional: when no image has both a heat map and a preview (its
        pixels purged, its heat map file lost), it is left out and its row removed, and the SR and PDF go
        out as usual rather than the whole study failing."""
        from reporting.encapsulated import build_encapsulated_pdf
        from reporting.pdf import build_pdf
        from reporting.secondary_capture import build_heatmap_sc
        from reporting.sr import build_sr

        with session_scope(self.session_factory) as session:
            rows = [session.get(ResultObject, pk) for pk in object_pks]
            study = session.get(Study, study_pk)
            assert study is not None and study.analysed_at is not None
            analysed_at = _aware(study.analysed_at)
            missing = [r for r in rows if r is not None and not (self.config.results_dir / r.file_path).is_file()]
            if not missing:
                return object_pks
            earlier = {row.id: _earlier_revisions(session, row) for row in missing}
            study_uid = study.study_instance_uid
            images = self._analysed_images(session, study_pk, info, cycle)
            not_analysed = self._not_analysed(session, study_pk, info)
        if not images:
            raise ReportingError(f"study {study_pk}: analysed images could not be reloaded")
        identity = self.config.identity
        started = time.perf_counter()
        left_out: list[int] = []
        digests: dict[int, str] = {}  # the SHA-256 of each object's DICOM file, as written
        try:
            for row in missing:
                path = row.file_path
                revision = _revision(row, earlier[row.id])
                if row.kind is ResultKind.SR:
                    sr = build_sr(
                        images,
                        identity,
                        series_instance_uid=row.series_instance_uid,
                        sop_instance_uid=row.sop_instance_uid,
                        series_number=SR_SERIES_NUMBER,
                        analysed_at=analysed_at,
                        algorithm_parameters_extra={
                            "indeterminate_threshold": f"{self.config.indeterminate_threshold:g}"
                        },
                        revision=revision,
                        predecessors=[self._predecessor(e, study_uid) for e in earlier[row.id]],
                    )
                    digests[row.id] = self.results.write(path, [dataset_bytes(sr)]).sha256
                elif row.kind is ResultKind.PDF:
                    pdf = build_pdf(images, identity, analysed_at=analysed_at, revision=revision,
                                    threshold=self.config.indeterminate_threshold, not_analysed=not_analysed)
                    self.results.write(pdf_path(path), [pdf])
                    encapsulated = build_encapsulated_pdf(
                        pdf,
                        images[0].source,
                        identity,
                        series_instance_uid=row.series_instance_uid,
                        sop_instance_uid=row.sop_instance_uid,
                        series_number=PDF_SERIES_NUMBER,
                        created_at=analysed_at,
                        referenced=[image.source for image in images],
                        revision=revision,
                    )
                    digests[row.id] = self.results.write(path, [dataset_bytes(encapsulated)]).sha256
                elif row.kind is ResultKind.HEATMAP_SC:
                    shown = [i for i in images if i.prediction.heatmap is not None and i.preview is not None]
                    with_map = shown[0] if shown else None
                    if with_map is None:
                        LOGGER.warning("study %d: no image has both a heat map and a preview; no heat-map "
                                       "Secondary Capture", study_pk)
                        left_out.append(row.id)
                        continue
                    sc = build_heatmap_sc(
                        with_map,
                        identity,
                        series_instance_uid=row.series_instance_uid,
                        sop_instance_uid=row.sop_instance_uid,
                        series_number=SC_SERIES_NUMBER,
                        created_at=analysed_at,
                        revision=revision,
                    )
                    digests[row.id] = self.results.write(path, [dataset_bytes(sc)]).sha256
        except Exception as exc:
            # The files written before the failure (a full disk at the PDF, say) stay and are not made
            # again: their checksums are recorded now, or a later damage to them would go out unnoticed.
            self._record_digests_written_before(study_pk, digests)
            if isinstance(exc, NodeError):
                raise
            raise ReportingError(f"building results for study {study_pk} failed ({type(exc).__name__})") from exc
        LOGGER.info(
            "study %d: %d result object(s) built in %.0f ms",
            study_pk,
            len(missing) - len(left_out),
            (time.perf_counter() - started) * 1000.0,
        )
        self._record_digests(digests)
        if left_out:
            with session_scope(self.session_factory) as session:
                for pk in left_out:
                    sent = session.scalar(select(Delivery.id).where(Delivery.result_object_pk == pk))
                    unsent = sent is None
                    unbuilt = session.get(ResultObject, pk)
                    if unbuilt is not None and unsent:
                        session.delete(unbuilt)
        return [pk for pk in object_pks if pk not in left_out]

    def _predecessor(self, earlier: ResultObject, study_uid: str) -> pydicom.Dataset:
        """An earlier revision of an SR as its Predecessor Documents Sequence references it: its file's
        header, or, once the file is gone, the UIDs its row recorded (the same four the reference needs)."""
        path = self.config.results_dir / earlier.file_path
        if path.is_file():
            return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_PREDECESSOR_TAGS)
        ds = pydicom.Dataset()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = earlier.series_instance_uid
        ds.SOPClassUID = earlier.sop_class_uid
        ds.SOPInstanceUID = earlier.sop_instance_uid
        return ds

    def _not_analysed(self, session: Session, study_pk: int, info: ModelInfo) -> list[NotAnalysedImage]:
        """The study's images stored and not classified (skipped or failed), with the node's reasons: the
        PDF names them. A lateral view beside a classified PA one vanished from the report (review). A
        report, key object or PDF of the study is no image, and is not named. So is named an image an
        earlier model analysed whose file was removed before this model could read it: the report of this
        model holds only its own findings, and left that image out without a word."""
        from reporting.types import NotAnalysedImage

        instances = self._instances(session, study_pk)
        current = _with_finding(session, [i.id for i in instances], info)
        named: list[NotAnalysedImage] = []
        for instance in instances:
            if not_an_image(instance.sop_class_uid) is not None:
                continue
            if instance.state in (InstanceState.SKIPPED, InstanceState.FAILED):
                reason = instance.state_reason or "not analysed"
                named.append(NotAnalysedImage(header_from_rows(instance), reason))
            elif instance.state is InstanceState.ANALYSED and instance.id not in current:
                removed = instance.purged_at is not None
                reason = f"{EARLIER_MODEL_ONLY}; {FILE_REMOVED}" if removed else EARLIER_MODEL_ONLY
                named.append(NotAnalysedImage(header_from_rows(instance), reason))
        return named

    def _analysed_images(
        self, session: Session, study_pk: int, info: ModelInfo, cycle: _Cycle
    ) -> list[AnalysedImage]:
        """Predictions rebuilt from the committed Finding rows (the same path after a crash).

        Reads rows inside ``session`` but pixels outside any lock-holding work: the files are read
        after the rows are collected.
        """
        from classifier.preprocess import display_image
        from reporting.study import patient_and_study
        from reporting.types import AnalysedImage

        instances = self._instances(session, study_pk)
        study = session.get(Study, study_pk)  # already loaded with its instances
        age_unknown = study is not None and self.config.ages.cautions(study_age(study))
        rows: list[tuple[int, Path | None, pydicom.Dataset, Finding]] = []
        for instance in instances:
            if instance.state is not InstanceState.ANALYSED:
                continue
            finding = session.scalar(
                select(Finding).where(
                    Finding.instance_pk == instance.id,
                    Finding.model_name == info.name,
                    Finding.model_version == info.version,
                )
            )
            if finding is None:
                continue
            # One report, one rule: its SR records the current threshold for every image, so an image an
            # earlier revision labelled under another threshold is labelled anew, here and in the console
            # (review: the same probabilities were "COVID-19" and "Indeterminate" in one report).
            label = decided_label(finding.top_class, finding.confidence, self.config.indeterminate_threshold)
            if finding.label != label:
                LOGGER.info("instance %d: labelled anew under the threshold %g", instance.id,
                            self.config.indeterminate_threshold)
                finding.label = label
            path = self.config.storage_dir / instance.file_path if instance.purged_at is None else None
            rows.append((instance.id, path, header_from_rows(instance), finding))
        # "Image N" keeps its number in every revision: images an earlier SR reported on come first, in
        # that SR's order, and a late image follows them even when its series or instance number is lower
        first = _first_reported(session, study_pk, info)
        rows.sort(key=lambda row: first.get(row[0], sys.maxsize))  # stable: otherwise by series, instance
        session.commit()  # release the database before reading pixel files
        datasets: list[pydicom.Dataset] = []
        for instance_pk, path, header, _finding in rows:
            ds = cycle.datasets.get(instance_pk)
            if ds is None:
                ds = header if path is None else _read_again(_read_dataset, path, instance_pk, header)
                cycle.datasets[instance_pk] = ds
            datasets.append(ds)
        # The results copy their patient and study modules from the first image. Once retention removed its
        # file, the database gives only the columns it keeps: the Other Patient IDs, the Issuer of Accession
        # Number and the like went missing from a later revision, though an image of the study on disk
        # holds them (review). Such an image lends them; numbering and references stay the removed one's.
        on_disk = [ds for (_pk, path, _header, _finding), ds in zip(rows, datasets, strict=True)
                   if path is not None]
        if on_disk:
            study_modules = patient_and_study(on_disk[0])
            for (_pk, path, _header, _finding), ds in zip(rows, datasets, strict=True):
                if path is None:
                    _lend(ds, study_modules)
        images: list[AnalysedImage] = []
        for (instance_pk, _path, _header, finding), ds in zip(rows, datasets, strict=True):
            if instance_pk not in cycle.previews:
                cycle.previews[instance_pk] = _preview(display_image, ds, instance_pk)
            images.append(
                AnalysedImage(
                    source=ds,
                    prediction=self._prediction(finding, info),
                    preview=cycle.previews[instance_pk],
                    age_unknown=age_unknown,
                )
            )
        return images

    def _prediction(self, finding: Finding, info: ModelInfo) -> Prediction:
        heatmap = None
        if finding.heatmap_path:
            path = self.config.results_dir / finding.heatmap_path
            if path.is_file():
                heatmap = np.load(path).astype(np.float32)
        return Prediction(
            label=finding.label,
            top_class=finding.top_class,
            probabilities={str(k): float(v) for k, v in finding.probabilities.items()},
            model=info,
            heatmap=heatmap,
            timings_ms={str(k): float(v) for k, v in (finding.timings_ms or {}).items()},
            novelty=finding.novelty,
            better_turn=finding.better_turn or 0,
            negative=bool(finding.negative),
        )

    def _build_skipped(self, study_pk: int, object_pks: list[int], reason: str) -> None:
        """For ``send_skipped``: an Encapsulated PDF telling the reader the study was not analysed."""
        from reporting.encapsulated import build_encapsulated_pdf
        from reporting.pdf import NOT_ANALYSED_TITLE, build_not_analysed_pdf

        with session_scope(self.session_factory) as session:
            rows = [session.get(ResultObject, pk) for pk in object_pks]
            missing = [r for r in rows if r is not None and not (self.config.results_dir / r.file_path).is_file()]
            if not missing:
                return
            study = session.get(Study, study_pk)
            assert study is not None
            if study.analysed_at is None:
                study.analysed_at = utcnow()
            analysed_at = _aware(study.analysed_at)
            instances = self._instances(session, study_pk)
            if not instances:
                return
            # the notice is about each of them (its page gives each one's reason): its sources
            referenced = [header_from_rows(each) for each in instances]
            # its patient and study modules from an image on disk: the rows of one retention removed keep
            # a few of them only (the Other Patient IDs, the Issuer of Accession Number went, review)
            on_disk = [each for each in instances if each.purged_at is None]
            instance = (on_disk or instances)[0]
            path = self.config.storage_dir / instance.file_path
            source = header_from_rows(instance)
            if instance.purged_at is None:
                source = _read_again(_read_header, path, instance.id, source)
            revisions = {row.id: _revision(row, _earlier_revisions(session, row)) for row in missing}
        digests: dict[int, str] = {}
        for row in missing:
            revision = revisions[row.id]
            pdf = build_not_analysed_pdf(
                self.config.identity, reason=reason, analysed_at=analysed_at, revision=revision
            )
            self.results.write(pdf_path(row.file_path), [pdf])
            encapsulated = build_encapsulated_pdf(
                pdf,
                source,
                self.config.identity,
                series_instance_uid=row.series_instance_uid,
                sop_instance_uid=row.sop_instance_uid,
                series_number=PDF_SERIES_NUMBER,
                title=NOT_ANALYSED_TITLE,
                created_at=analysed_at,
                referenced=referenced,
                revision=revision,
                identifies_patient=False,  # the notice's page names no patient (build_not_analysed_pdf)
            )
            digests[row.id] = self.results.write(row.file_path, [dataset_bytes(encapsulated)]).sha256
        self._record_digests(digests)

    def _record_digests(self, digests: dict[int, str]) -> None:
        """Record the SHA-256 of each result file just written: the outbox and the check for results to
        make again compare the file with it (a file damaged since is made again, not sent). A crash before
        this leaves it None, and the file is then checked by reading it as DICOM."""
        if not digests:
            return
        with session_scope(self.session_factory) as session:
            for pk, sha256 in digests.items():
                session.execute(update(ResultObject).where(ResultObject.id == pk).values(sha256=sha256))

    def _record_digests_written_before(self, study_pk: int, digests: dict[int, str]) -> None:
        """:meth:`_record_digests` on the way out of a failed round; a failure to record them is logged
        (the round's own error is the one that counts, and a file without one is read as DICOM)."""
        try:
            self._record_digests(digests)
        except Exception as exc:
            LOGGER.warning("study %d: the checksums of %d result file(s) written before the failure were not "
                           "recorded (%s)", study_pk, len(digests), describe_exception(exc))

    def _finalise(
        self,
        study_pk: int,
        state: StudyState,
        reason: str,
        object_pks: list[int],
        *,
        job_failed: bool = False,
    ) -> None:
        """One delivery per (object, destination), study and jobs final — one transaction.

        Unless an image of the study arrived while its results were built: a PROCESSING study is not
        reopened by ingest and its settle timer readies nothing, so the study goes round again instead
        (these objects are then superseded before they are sent). The study row is locked first, and
        ingest updates that row before it inserts an instance, so either the image is seen here or its
        ingest finds the study finished and reopens it."""
        destination_pks: list[int] = []
        with session_scope(self.session_factory) as session:
            study = session.get(Study, study_pk, with_for_update=True)
            if study is None:
                return
            late = session.scalar(
                select(Instance.id).join(Series)
                .where(Series.study_pk == study_pk, Instance.state == InstanceState.RECEIVED).limit(1)
            )
            if late is None:
                destination_pks = self._record_final(session, study, state, reason, object_pks, job_failed)
        if late is not None:
            LOGGER.info("study %d: an image arrived while its results were built; going round again", study_pk)
            self.submit(study_pk)
            return
        LOGGER.info("study %d %s with %d result object(s)", study_pk, state.value, len(object_pks))
        if self.outbox is not None and destination_pks:
            self.outbox.kick(destination_pks)

    def _record_final(
        self, session: Session, study: Study, state: StudyState, reason: str, object_pks: list[int],
        job_failed: bool,
    ) -> list[int]:
        """Deliveries, study state and jobs of a finished study; returns the destinations to kick."""
        destination_pks: list[int] = []
        study_pk = study.id
        if object_pks:
            callers = {study.calling_ae} | set(
                session.scalars(
                    select(Instance.calling_ae).join(Series).where(Series.study_pk == study_pk).distinct()
                )
            )
            destinations = destinations_for(session, sorted(callers), self.config.fixed_destinations)
            if not destinations:
                LOGGER.warning("study %d: no destination configured for its results", study_pk)
            now = utcnow()
            for object_pk in object_pks:
                existing = set(
                    session.scalars(select(Delivery.destination_pk).where(Delivery.result_object_pk == object_pk))
                )
                for destination in destinations:
                    if destination.id not in existing:
                        session.add(
                            Delivery(
                                result_object_pk=object_pk,
                                destination_pk=destination.id,
                                state=DeliveryState.PENDING,
                                next_attempt_at=now,
                            )
                        )
            destination_pks = [d.id for d in destinations]
            _supersede_earlier_revisions(session, object_pks)
        study.state = state
        study.state_reason = reason
        if state is StudyState.ANALYSED and study.analysed_at is None:
            study.analysed_at = utcnow()
        for job in self._open_jobs(session, study_pk):
            job.state = JobState.FAILED if job_failed else JobState.DONE
            job.error = reason if job_failed else ""
            job.finished_at = utcnow()
        return destination_pks

    def _release(self, study_pks: Sequence[int], reason: str) -> None:
        """Put claimed studies back (jobs PENDING, study READY) so a restart picks them up."""
        with session_scope(self.session_factory) as session:
            for study_pk in study_pks:
                for job in self._open_jobs(session, study_pk):
                    job.state = JobState.PENDING
                    job.error = reason
                study = session.get(Study, study_pk)
                if study is not None and study.state is StudyState.PROCESSING:
                    study.state = StudyState.READY
                    study.state_reason = reason

    def _fail(self, study_pk: int, exc: BaseException) -> None:
        """A failure that passes by itself (:func:`waits_for_a_resource`) puts the job back, READY, to be
        tried again after :func:`retry_delay`, for up to ``MAX_WAIT_HOURS``: the sender was told the
        images are stored, and their results must follow. Other errors mark job and study FAILED."""
        retry = waits_for_a_resource(exc)
        summary = str(exc) if isinstance(exc, NodeError) else type(exc).__name__
        LOGGER.error(
            "study %d: processing failed (%s): %s", study_pk, summary, describe_exception(exc, stack=True)
        )
        delay = RETRY_DELAY_SECONDS
        try:
            with session_scope(self.session_factory) as session:
                jobs = self._open_jobs(session, study_pk)
                attempts = max((job.attempts for job in jobs), default=1)
                delay = retry_delay(attempts)
                # the time already spent waiting for a resource, from the delays (not from when the job
                # first started: a study held for a missing model has waited for no resource)
                waited = sum(retry_delay(attempt) for attempt in range(1, attempts))
                if retry and waited >= MAX_WAIT_HOURS * 3600:
                    retry, summary = False, f"gave up after {MAX_WAIT_HOURS:g} hours: {summary}"
                for job in jobs:
                    job.state = JobState.PENDING if retry else JobState.FAILED
                    job.error = summary
                    if not retry:
                        job.finished_at = utcnow()
                study = session.get(Study, study_pk)
                if study is not None:
                    study.state = StudyState.READY if retry else StudyState.FAILED
                    waiting = f"waiting to try again in {delay:.0f} s: {summary}"
                    study.state_reason = waiting if retry else summary
        except NodeError as unrecorded:
            if not waits_for_a_resource(unrecorded):
                LOGGER.error("study %d: could not record the failure; it resumes at the next start", study_pk)
                return
            # the database is away: nothing was written, and the study is tried again all the same
            LOGGER.error("study %d: could not record the failure (%s); trying again in %.0f s",
                         study_pk, type(unrecorded).__name__, delay)
            retry = True
        if retry:
            self._retry_later(study_pk, delay)


# ---------------------------------------------------------------------------------------------
# Reading stored instances
# ---------------------------------------------------------------------------------------------

#: Read errors of a file that is there and sound, which pass: a network file system's I/O error or stale
#: handle, a time-out, too many open files, memory short for a moment.
_PASSING_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR,
                             errno.ENOMEM, errno.ENFILE, errno.EMFILE, errno.ENOBUFS})


def _passes(exc: BaseException) -> bool:
    """Whether reading a stored file failed for a reason that passes. Such an image failed for good as
    "stored file unreadable", and its study with it, until an image of it was sent again (review)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno in _PASSING_ERRNOS)


def _read_later(instance_pk: int, exc: BaseException) -> StorageError:
    """The retriable error of a read that failed for a reason that passes (:func:`_passes`)."""
    return StorageError(f"instance {instance_pk}: stored file could not be read now ({type(exc).__name__})")


def _read_again(
    read: Callable[[Path], pydicom.Dataset], path: Path, instance_pk: int, header: pydicom.Dataset
) -> pydicom.Dataset:
    """A stored image read again for a report (its picture, or its header for a "not analysed" notice).
    A read error that passes holds its study back (a retriable StorageError), as it does while
    classifying; a file gone or damaged leaves the header its rows keep, as for an image retention
    removed: its findings stand. Either failed the study for good, its late image unreported (review)."""
    try:
        return read(path) if path.is_file() else header
    except Exception as exc:
        if _passes(exc):
            raise _read_later(instance_pk, exc) from exc
        LOGGER.warning("instance %d: stored file unreadable (%s); reported without its picture",
                       instance_pk, type(exc).__name__)
        return header


def _size_refusal(header: pydicom.Dataset) -> str | None:
    """Why an image is too large to classify, by its header's Rows and Columns (None: it is not, or they
    cannot be read, which the decoder then says), in the words the classifier refuses it with."""
    from classifier.preprocess import check_header_size

    try:
        check_header_size(header)
    except UnsupportedImageError as exc:
        return f"image not supported: {exc}"
    return None


def _read_dataset(path: Path) -> pydicom.Dataset:
    """Read with the classifier's reader when it has one (reduced-resolution JPEG 2000)."""
    try:
        from classifier.preprocess import read_dataset
    except ImportError:
        return pydicom.dcmread(path)
    return read_dataset(path)


def _covers(session: Session, result: ResultObject, covered: list[int]) -> bool:
    """Whether ``result`` reports on exactly the instances ``covered``. A row made before revisions
    existed (no ``covers``, migration 0008) reports on what the study had when it was made: it covers
    the set unless one of them arrived after it."""
    if result.covers is not None:
        return sorted(result.covers) == covered
    later = session.scalar(
        select(func.count()).select_from(Instance)
        .where(Instance.id.in_(covered), Instance.received_at > result.created_at)
    )
    return not later


_PREDECESSOR_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"]


def _earlier_revisions(session: Session, row: ResultObject) -> list[ResultObject]:
    """The earlier revisions of ``row``'s object (same study, kind and model), the latest first."""
    return list(session.scalars(
        select(ResultObject)
        .where(
            ResultObject.study_pk == row.study_pk,
            ResultObject.kind == row.kind,
            ResultObject.model_name == row.model_name,
            ResultObject.model_version == row.model_version,
            ResultObject.revision < row.revision,
        )
        .order_by(ResultObject.revision.desc())
    ))


def _revision(row: ResultObject, earlier: Sequence[ResultObject]) -> Revision:
    """Which revision ``row`` is, and the analysis time of the one it replaces (the latest earlier one)."""
    from reporting.types import Revision

    return Revision(row.revision, _aware(earlier[0].created_at) if earlier else None)


def _with_finding(session: Session, instance_pks: list[int], info: ModelInfo) -> set[int]:
    """Which of these instances have a finding of this model."""
    return set(session.scalars(
        select(Finding.instance_pk).where(
            Finding.instance_pk.in_(instance_pks),
            Finding.model_name == info.name,
            Finding.model_version == info.version,
        )
    ))


def _first_reported(session: Session, study_pk: int, info: ModelInfo) -> dict[int, int]:
    """The first revision of the study's SR (this model) that reported on each instance, by instance."""
    first: dict[int, int] = {}
    revisions = session.execute(
        select(ResultObject.revision, ResultObject.covers)
        .where(
            ResultObject.study_pk == study_pk,
            ResultObject.kind == ResultKind.SR,
            ResultObject.model_name == info.name,
            ResultObject.model_version == info.version,
        )
        .order_by(ResultObject.revision)
    )
    for revision, covers in revisions:
        for instance_pk in covers or ():  # None: made before revisions existed, its order unknown
            first.setdefault(int(instance_pk), int(revision))
    return first


def _read_header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def header_from_rows(instance: Instance) -> pydicom.Dataset:
    """The source's header as the database holds it, for when its pixel file is gone (retention).

    A study's results take their patient and study modules from its first image, so a revision built
    after that image was removed must still name the patient and the study the PACS files it under.
    """
    series = instance.series
    study = series.study
    patient = study.patient
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # the database holds decoded text
    ds.SOPClassUID = instance.sop_class_uid
    ds.SOPInstanceUID = instance.sop_instance_uid
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.StudyInstanceUID = study.study_instance_uid
    for row, columns in (
        (patient, header_columns.PATIENT_IDENTITY + header_columns.PATIENT_DEMOGRAPHICS),
        (study, header_columns.STUDY),
        (series, header_columns.SERIES),
        (instance, header_columns.INSTANCE),
    ):
        header_columns.restore(ds, row, columns)
    return ds


_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _lend(header: pydicom.Dataset, modules: pydicom.Dataset) -> None:
    """Put the patient and study ``modules`` of an image on disk into the ``header`` of a removed image of
    the same study, rebuilt from its rows: a value the image on disk leaves empty keeps the row's."""
    for element in modules:
        if element.value not in (None, "") or element.tag not in header:
            header[element.tag] = copy.deepcopy(element)


def _without_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` with its pixel data dropped (the dataset is the pipeline's own read of the file)."""
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _preview(
    display_image: Callable[[pydicom.Dataset], npt.NDArray[np.uint8]], ds: pydicom.Dataset, instance_pk: int
) -> npt.NDArray[np.uint8] | None:
    if "PixelData" not in ds:
        return None
    try:
        return display_image(ds)
    except Exception as exc:
        LOGGER.warning("instance %d: no preview for the report (%s)", instance_pk, type(exc).__name__)
        return None


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# Composition: pipeline + outbox + retention + metrics on a node
# ---------------------------------------------------------------------------------------------


class NodeLike(Protocol):
    """What :func:`attach` needs from :class:`dicom_node.app.Node`."""

    session_factory: sessionmaker[Session]
    on_study_ready: list[Callable[[int], None]]

    @property
    def scheduler(self) -> Any: ...

    def listening(self) -> bool: ...

    def holds_lock(self) -> bool: ...


_UNDELIVERED = (DeliveryState.PENDING, DeliveryState.RETRYING, DeliveryState.DEAD)


def _supersede_earlier_revisions(session: Session, object_pks: list[int]) -> None:
    """Earlier revisions of these objects that have not reached a destination are not sent any more: a
    PACS that was down while a late image came would otherwise get the old SR and PDF as well as the new
    ones, which report on fewer images. Those already delivered stay as they were sent."""
    for obj in session.scalars(select(ResultObject).where(ResultObject.id.in_(object_pks))):
        if obj.revision <= 1:
            continue
        earlier = select(ResultObject.id).where(
            ResultObject.study_pk == obj.study_pk,
            ResultObject.kind == obj.kind,
            ResultObject.model_name == obj.model_name,
            ResultObject.model_version == obj.model_version,
            ResultObject.revision < obj.revision,
        )
        superseded = list(session.scalars(
            select(Delivery.id).where(
                Delivery.result_object_pk.in_(earlier),
                Delivery.state.in_(_UNDELIVERED),
            )
        ))
        if superseded:
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_(superseded), Delivery.state.in_(_UNDELIVERED))  # not one sent meanwhile
                .values(state=DeliveryState.SUPERSEDED, next_attempt_at=None,
                        last_error=f"superseded by revision {obj.revision}")
            )
            LOGGER.info("study %d: %d undelivered %s deliveries superseded by revision %d",
                        obj.study_pk, len(superseded), obj.kind.value, obj.revision)


@dataclass
class PipelineService:
    """Everything after "study ready", started after the node (its scheduler must be running)."""

    pipeline: Pipeline
    outbox: Outbox
    retention: Any  # dicom_node.retention.Retention
    metrics: Any  # dicom_node.metrics.NodeMetrics
    metrics_server: Any = None  # dicom_node.metrics.MetricsServer | None

    def start(self) -> None:
        self.metrics.activate()
        self.outbox.start()
        self.retention.start()
        self.pipeline.start()
        if self.metrics_server is not None:
            self.metrics_server.start()

    def stop(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.metrics.deactivate()
        self.pipeline.stop()
        self.retention.stop()
        self.outbox.stop()


def attach(
    node: NodeLike,
    settings: Settings,
    *,
    classifier_loader: Callable[[], ImageClassifier] | None = None,
) -> PipelineService:
    """Subscribe the pipeline to the node's "study ready" events and build its companions."""
    from dicom_node.jobs import scheduler_alive
    from dicom_node.metrics import MetricsServer, NodeMetrics
    from dicom_node.outbox import Outbox
    from dicom_node.retention import Retention

    metrics = NodeMetrics(node.session_factory)
    outbox = Outbox.from_settings(settings, node.session_factory, scheduler=node.scheduler, metrics=metrics)
    pipeline = Pipeline(
        node.session_factory,
        config_from_settings(settings),
        classifier_loader or (lambda: load_classifier(settings)),
        outbox=outbox,
    )
    node.on_study_ready.append(pipeline.submit)
    retention = Retention(
        node.session_factory, settings.storage_dir, settings.storage.retention_days, scheduler=node.scheduler,
        fsync=settings.storage.fsync,
    )
    metrics.add_check("dicom_listener", node.listening)  # accepting, not merely given a port
    metrics.add_check("scheduler", lambda: scheduler_alive(node.scheduler))
    metrics.add_check("node_lock", node.holds_lock)  # still the only node on its database
    metrics.add_check("pipeline", lambda: pipeline.alive)
    metrics.add_check("model", lambda: pipeline.model_ready, critical=False)
    metrics.watch_storage({"instances": settings.storage_dir, "results": pipeline.config.results_dir},
                          settings.storage.min_free_bytes)
    server = None
    if settings.metrics.enabled:
        try:
            server = MetricsServer(metrics, settings.metrics.host, settings.metrics.port)
        except OSError as exc:
            # Monitoring must not keep the node from receiving studies: run on, say so loudly.
            logging.getLogger("dicom_node.metrics").error(  # the component it is about, not the pipeline
                "health/metrics listener not started on %s:%d (metrics.port, metrics.host): %s",
                settings.metrics.host, settings.metrics.port, exc.strerror or type(exc).__name__)
    return PipelineService(pipeline, outbox, retention, metrics, server)
