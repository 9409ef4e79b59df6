"""Composition root: builds the node's parts from settings and runs them until SIGTERM/SIGINT.

Only this module (and the CLI) wires packages together; every part receives its collaborators.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import aes, audit, outbox
from dicom_node.errors import ConfigurationError
from dicom_node.ingest import Ingestor
from dicom_node.jobs import StudySettler, build_scheduler
from dicom_node.listeners import ListenerWorkers, build_listener_workers
from dicom_node.scp import StorageScp, build_scp
from dicom_node.settings import Settings
from dicom_node.store import db
from dicom_node.store.files import FileStore
from dicom_node.store.models import AeRole
from dicom_node.store.parts import open_store

LOGGER = logging.getLogger(__name__)


class _WebServer(Protocol):
    @property
    def port(self) -> int: ...

    def start(self) -> None: ...
    def stop(self) -> None: ...


@dataclass
class Node:
    """A running (or ready to run) node. Build it with :func:`build_node`."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    file_store: FileStore
    scheduler: BackgroundScheduler
    settler: StudySettler
    ingestor: Ingestor
    scp: StorageScp
    on_study_ready: list[Callable[[int], None]] = field(default_factory=list)
    listeners: ListenerWorkers | None = None  # extra listener processes on the same port
    web: _WebServer | None = None
    pipeline: Any = None  # dicom_node.pipeline.PipelineService once started
    _started: bool = False
    _lock: db.NodeLock = field(init=False)

    def __post_init__(self) -> None:
        self._lock = db.NodeLock(self.engine)

    @property
    def dicom_port(self) -> int:
        """The port the listener is bound to (differs from settings when configured as 0)."""
        return self.scp.port

    def listening(self) -> bool:
        """This process's DICOM listener accepts associations (the listener processes share its socket)."""
        return self.scp.listening

    def holds_lock(self) -> bool:
        """This node is still the one node on its database (see :class:`dicom_node.store.db.NodeLock`)."""
        return self._lock.held()

    def start(self) -> None:
        """Migrate the schema, seed AEs from settings, start timers, the listener and the console."""
        if self._started:
            return
        self._lock.acquire()  # before anything runs: a second node on this database stops here
        started: list[Callable[[], None]] = []  # how to stop each part that has started, in order
        try:
            self._start(started)
        except BaseException:
            # a part that fails to start (the console's port in use) stops those before it: the listener
            # went on accepting images for a node that was exiting, cut off mid-association (review).
            # The intake first: the pipeline's stop waits (up to 30 s) for a model still loading, and the
            # listener accepted associations meanwhile (review): it stops first, this process's
            # listener at once, side by side with the listener processes (one still starting takes seconds)
            intake = [self.scp.stop, *([self.listeners.stop] if self.listeners is not None else [])]
            _side_by_side([_failed_start_stop(stop) for stop in started if stop in intake])
            for stop in reversed(started):
                if stop not in intake:
                    _failed_start_stop(stop)()
            self.pipeline = None
            self._lock.release()
            raise

    def _start(self, started: list[Callable[[], None]]) -> None:
        db.upgrade(self.engine)
        with self.engine.connect() as connection:
            missing = db.missing_privileges(connection)
        if missing:  # every image would be refused, and the PACS told to retry, until someone looks
            raise ConfigurationError(db.privileges_advice(missing))
        seed_aes(self.session_factory, self.settings)
        self.file_store.remove_stale_temporaries()
        self.pipeline = _attach_pipeline(self)
        self.scheduler.start()
        started.append(lambda: self.scheduler.shutdown(wait=True))
        self.settler.start()
        started.append(self.settler.stop)
        self.scp.start()
        started.append(self.scp.stop)
        if self.listeners is not None:
            self.listeners.start(self.scp.socket)
            started.append(self.listeners.stop)
        if self.pipeline is not None:
            self.pipeline.start()
            started.append(self.pipeline.stop)
        if self.settings.web.enabled:
            self.web = _start_web(self)
        self._started = True
        LOGGER.info("node %r started: AE title %s, DICOM port %d, database %s", self.settings.node.name,
                    self.settings.dicom.ae_title, self.dicom_port, db.describe_url(self.engine.url))

    def stop(self) -> None:
        """Stop accepting, finish running timers, release the database."""
        if not self._started:
            return
        self._started = False
        if self.web is not None:
            self.web.stop()
            self.web = None
        # The listener processes, this process's listener and the pipeline each wait for their own work
        # (15, 10 and 30 s at most): side by side, so that the sum stays inside systemd's
        # TimeoutStopSec (60 s), which one after the other it could pass, ending in SIGKILL.
        stops: list[Callable[[], None]] = [self.scp.stop]
        if self.listeners is not None:
            stops.append(self.listeners.stop)
        if self.pipeline is not None:
            stops.append(self.pipeline.stop)
        _side_by_side(stops)
        self.pipeline = None
        self.settler.stop()
        self.scheduler.shutdown(wait=True)
        self.file_store.close()
        self._lock.release()
        self.engine.dispose()
        LOGGER.info("node stopped")

    def serve_forever(self, *, on_started: Callable[[Node], None] | None = None) -> None:
        """Start, then block until SIGTERM or SIGINT, then stop gracefully."""
        stop = threading.Event()

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            LOGGER.info("signal %s received: stopping", signal.Signals(signum).name)
            stop.set()

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        lost = threading.Event()
        try:
            self.start()
            if on_started is not None:
                on_started(self)
            watch = threading.Thread(target=self._watch_lock, args=(stop, lost), name="node-lock")
            watch.daemon = True
            watch.start()
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if lost.is_set():
            raise ConfigurationError(db.ANOTHER_NODE)

    def _watch_lock(self, stop: threading.Event, lost: threading.Event) -> None:
        """Take the lock again after a database restart, before a second node can start; if one did
        meanwhile, stop: two nodes on one database fail each other's studies. On a thread of its own: a
        check waiting on a database that does not answer must not hold up a stop (SIGTERM)."""
        while not stop.wait(self.settings.database.lock_check_seconds):
            if self._lock.check() is db.LockState.TAKEN:
                LOGGER.critical("another cxr-node took this database's node lock while the database was "
                                "away: stopping this node")
                lost.set()
                stop.set()


def _side_by_side(stops: Sequence[Callable[[], None]]) -> None:
    """Run ``stops`` on threads of their own and wait for all: each waits for its own work."""
    threads = [threading.Thread(target=stop, name=f"stop-{index}") for index, stop in enumerate(stops)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _failed_start_stop(stop: Callable[[], None]) -> Callable[[], None]:
    """``stop`` for a part of a node that did not start: a failure is logged, the other parts still stop."""

    def run() -> None:
        try:
            stop()
        except Exception:
            LOGGER.exception("stopping a part of a node that did not start failed")

    return run


def build_node(settings: Settings) -> Node:
    """Factory for the whole node; nothing listens or runs until :meth:`Node.start`."""
    store = open_store(settings)
    engine, session_factory, file_store = store.engine, store.session_factory, store.file_store
    scheduler = build_scheduler(engine)
    callbacks: list[Callable[[int], None]] = []
    settler = StudySettler(
        scheduler, session_factory, settle_seconds=settings.pipeline.settle_seconds, callbacks=callbacks
    )
    ingestor = Ingestor(session_factory, file_store, on_stored=settler.on_stored,
                        results_dir=settings.results_dir)
    # results a PACS reported it does not keep: this process's outbox sends them again
    listeners = build_listener_workers(settings, settler.study_stored,
                                       on_resend=lambda destination_pk: outbox.wake([destination_pk]))
    scp = build_scp(settings.dicom, ingestor, session_factory, outbox_settings=settings.outbox)
    return Node(
        settings=settings,
        engine=engine,
        session_factory=session_factory,
        file_store=file_store,
        scheduler=scheduler,
        settler=settler,
        ingestor=ingestor,
        scp=scp,
        listeners=listeners,
        on_study_ready=callbacks,
    )


def seed_aes(session_factory: sessionmaker[Session], settings: Settings) -> None:
    """Create/update the callers and destinations listed in settings (audited as the system)."""
    with session_factory() as session, session.begin():
        for dest in settings.dicom.destinations:
            aes.upsert(session, aes.AeSpec(dest.ae_title, AeRole.DESTINATION, dest.host, dest.port, dest.tls,
                                           storage_commitment=dest.storage_commitment), audit.SYSTEM)
        for caller in settings.dicom.callers:
            aes.upsert(session, aes.AeSpec(caller.ae_title, AeRole.CALLER, caller.host,
                                           reply_to=caller.reply_to), audit.SYSTEM)


def _attach_pipeline(node: Node) -> Any:
    """Subscribe the pipeline (classify, report, deliver) to "study ready" events, before timers run."""
    from dicom_node.pipeline import attach

    return attach(node, node.settings)


def _start_web(node: Node) -> _WebServer | None:
    """Start the console if its package is installed (the node runs without it).

    The console stores uploads through the node's ingestor (its file store; the settle timer is armed at
    once) and classifies with the pipeline's model rather than loading a second copy.
    """
    try:
        from dicom_node.web import create_app
        from dicom_node.web.server import WebServer
        from dicom_node.web.services import NodeConsoleServices
    except ImportError as exc:
        LOGGER.warning("web console not available (%s); running without it", exc.name or "import failed")
        return None
    settings = node.settings
    pipeline = node.pipeline.pipeline if node.pipeline is not None else None
    services = NodeConsoleServices(
        settings,
        node.session_factory,
        ingestor=node.ingestor,
        classifier_loader=(lambda: pipeline.classifier) if pipeline is not None else None,
    )
    app = create_app(settings, node.session_factory, services)
    server = WebServer(app, settings.web.host, settings.web.port,
                       trusted_proxies=[str(address) for address in settings.web.trusted_proxies])
    server.start()
    LOGGER.info("web console on http://%s:%d", settings.web.host, server.port)
    return server
