"""Health and Prometheus metrics: ``/healthz`` and ``/metrics``.

Counts come from the database at scrape time (received, analysed, skipped, delivered, failed, queue depth),
so they survive restarts and agree with the console. The receipt-to-delivery histogram is observed in
process by the outbox. While the database cannot be read, a scrape still answers with the in-process
metrics and ``cxr_node_database_up 0`` in place of the counts. Served by a small threaded WSGI server on
``metrics.port``; the web console can mount :func:`metrics_router` too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, cast
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.commitment import NOT_KEPT
from dicom_node.errors import DatabaseUnavailableError, driver_reason
from dicom_node.logconfig import describe_uncaught
from dicom_node.store import db
from dicom_node.store.db import session_scope
from dicom_node.store.models import (
    CommitmentState,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Instance,
    InstanceState,
    Job,
    JobState,
    Study,
    StudyState,
)

if TYPE_CHECKING:
    from fastapi import APIRouter

LOGGER = logging.getLogger(__name__)

NAMESPACE = "cxr_node"
LATENCY_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


#: While the database stays unreadable, its WARNING is repeated this often (not on every scrape).
DATABASE_DOWN_LOG_INTERVAL = 600.0


class _DatabaseCollector(Collector):
    """Counters and gauges read from the node's tables on each scrape, and ``database_up``.

    While the database cannot be read (PostgreSQL down, the SQLite file unreadable) the scrape must still
    answer: the in-process metrics (the delivery histogram) are what an operator has then. The counts are
    left out rather than reported as 0, and ``database_up`` is 0."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        # a scrape only reads: on SQLite it does not queue behind the images being stored
        self.session_factory = db.make_read_only_session_factory(session_factory)
        self._lock = threading.Lock()
        self._down_since_logged: float | None = None  # monotonic time of the last "cannot be read" WARNING

    def collect(self) -> Iterator[Metric]:
        try:
            families = list(self._read())
        except (SQLAlchemyError, DatabaseUnavailableError, OSError) as exc:
            self._log_down(exc)
            yield _database_up(False)
            return
        self._log_up()
        yield _database_up(True)
        yield from families

    def _log_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._down_since_logged
            if last is not None and now - last < DATABASE_DOWN_LOG_INTERVAL:
                return
            self._down_since_logged = now
        LOGGER.warning(
            "metrics: the database %scannot be read (%s); /metrics leaves out its counts and reports "
            "%s_database_up 0 until it can",
            "" if last is None else "still ", _database_reason(exc), NAMESPACE,
        )

    def _log_up(self) -> None:
        with self._lock:
            was_down, self._down_since_logged = self._down_since_logged is not None, None
        if was_down:
            LOGGER.info("metrics: the database can be read again")

    def _read(self) -> Iterator[Metric]:
        with session_scope(self.session_factory) as session:
            instances = _counts(session, Instance.state)
            studies = _counts(session, Study.state)
            deliveries = _counts(session, Delivery.state)
            # not "committed": most deliveries, a walk of the index at each scrape (deliveries_delivered is
            # there)
            commitments = _counts(session, Delivery.commitment, Delivery.commitment.in_(_OPEN_COMMITMENTS))
            failed_attempts = session.scalar(  # a copy the PACS took and then reported not kept failed too
                select(func.count()).select_from(DeliveryAttempt)
                .where(DeliveryAttempt.outcome.in_(("failed", "error", NOT_KEPT)))
            )
            open_jobs = session.scalar(
                select(func.count()).select_from(Job).where(Job.state.in_((JobState.PENDING, JobState.RUNNING)))
            )
        # Counters only for what never goes down (rows are kept); the rest are states that change (a failed
        # study reprocessed, a dead delivery re-sent), so they are gauges: a counter that drops reads as a
        # reset to rate() and increase().
        yield _counter("instances_received", "Instances received and stored", sum(instances.values()))
        yield _counter("delivery_attempts_failed", "Delivery attempts that failed", failed_attempts or 0)
        yield _gauge("instances_analysed", "Instances classified", instances.get(InstanceState.ANALYSED, 0))
        yield _gauge(
            "instances_skipped",
            "Instances not analysed: not eligible (not a frontal chest CR/DX of an adult) or not an image (SR, PDF)",
            instances.get(InstanceState.SKIPPED, 0),
        )
        yield _gauge(
            "instances_failed", "Instances that could not be analysed", instances.get(InstanceState.FAILED, 0)
        )
        yield _gauge("studies_failed", "Studies whose processing failed", studies.get(StudyState.FAILED, 0))
        yield _gauge(
            "deliveries_delivered", "Result objects delivered to a destination", deliveries.get(DeliveryState.DELIVERED, 0)
        )
        yield _gauge(
            "deliveries_dead", "Deliveries given up (dead letters)", deliveries.get(DeliveryState.DEAD, 0)
        )
        kept = GaugeMetricFamily(
            f"{NAMESPACE}_deliveries_commitment",
            "Delivered objects of destinations set to storage commitment still to be asked about, awaiting "
            "their PACS's report, or not confirmed by it",
            labels=["commitment"],
        )
        for state in _OPEN_COMMITMENTS:
            kept.add_metric([state.value], float(commitments.get(state, 0)))
        yield kept
        depth = GaugeMetricFamily(f"{NAMESPACE}_queue_depth", "Work waiting", labels=["queue"])
        depth.add_metric(["studies"], float(open_jobs or 0))
        depth.add_metric(
            ["deliveries"],
            float(deliveries.get(DeliveryState.PENDING, 0) + deliveries.get(DeliveryState.RETRYING, 0)),
        )
        yield depth


def _database_up(up: bool) -> GaugeMetricFamily:
    documentation = "1 if the database could be read for this scrape, 0 if its counts are missing"
    return _gauge("database_up", documentation, 1.0 if up else 0.0)


def _database_reason(exc: BaseException) -> str:
    """The exception's type and the database driver's first line (host, port, the refusal), never the rest
    of its text; session_scope() wraps a lost connection, so the driver's error may be its cause."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, DBAPIError):
        cause = cause.__cause__
    if isinstance(cause, DBAPIError):
        reason = driver_reason(cause.orig)
        return f"{type(cause).__name__}: {reason}" if reason else type(cause).__name__
    return describe_uncaught(exc).partition("\n")[0]


def _counts(session: Session, column: Any, *where: Any) -> dict[Any, int]:
    """Rows per value of ``column`` (an enum state), of the rows ``where`` says."""
    query = select(column, func.count()).where(*where).group_by(column)
    return {value: int(count) for value, count in session.execute(query)}


#: The storage commitment states the metrics count: those an operator watches (see _read)
_OPEN_COMMITMENTS = (CommitmentState.DUE, CommitmentState.REQUESTED, CommitmentState.UNCONFIRMED)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{NAMESPACE}_{name}", documentation, value=float(value))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", documentation, value=float(value))


class _StorageCollector(Collector):
    """Free bytes of the node's directories (``storage_free_bytes{directory=...}``) and the received
    images' reserve (``storage_reserve_bytes``): below it, every C-STORE is refused with 0xA700."""

    def __init__(self, directories: dict[str, Path], reserve_bytes: int) -> None:
        self.directories = directories
        self.reserve_bytes = reserve_bytes

    def collect(self) -> Iterator[Metric]:
        free = GaugeMetricFamily(f"{NAMESPACE}_storage_free_bytes", "Free bytes on the file system of a "
                                 "node directory", labels=["directory"])
        for name, path in self.directories.items():
            with contextlib.suppress(OSError):  # not there yet: no sample rather than a failed scrape
                free.add_metric([name], float(shutil.disk_usage(path).free))
        yield free
        yield GaugeMetricFamily(f"{NAMESPACE}_storage_reserve_bytes",
                                "Free bytes below which received images are refused (storage.min_free_bytes)",
                                value=float(self.reserve_bytes))


@dataclass
class HealthReport:
    """``ok`` is False when a critical check fails (HTTP 503); ``degraded`` when only others do (200)."""

    ok: bool
    checks: dict[str, bool] = field(default_factory=dict)
    degraded: bool = False

    @property
    def status(self) -> str:
        return "unhealthy" if not self.ok else "degraded" if self.degraded else "ok"


# The metrics of the node running in this process (set by activate()), so that the web console's router
# serves the live histogram and checks without the console having to be handed the object.
_active: NodeMetrics | None = None


class NodeMetrics:
    """The node's metrics registry and health checks (one per node, built by a factory)."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory
        self.registry = CollectorRegistry(auto_describe=True)
        self._database = _DatabaseCollector(session_factory)
        self.registry.register(self._database)
        self.delivery_latency = Histogram(
            "receipt_to_delivery_seconds",
            "Seconds from a study's last received instance to a result object delivered",
            labelnames=["kind"],
            namespace=NAMESPACE,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._checks: dict[str, Callable[[], bool]] = {"database": self._database_ok}
        self._missing_privileges: list[str] = []
        self._informational: set[str] = set()

    def activate(self) -> None:
        """Become the metrics that :func:`metrics_router` serves in this process."""
        global _active
        _active = self

    def deactivate(self) -> None:
        global _active
        if _active is self:
            _active = None

    def observe_delivery(self, kind: str, seconds: float) -> None:
        self.delivery_latency.labels(kind=kind).observe(max(0.0, seconds))

    def add_check(self, name: str, check: Callable[[], bool], *, critical: bool = True) -> None:
        """Register a check. A failing critical one makes /healthz 503 (restart me); a non-critical one
        (e.g. the model still loading, or missing) only marks the node degraded: it still receives."""
        self._checks[name] = check
        if not critical:
            self._informational.add(name)

    def watch_storage(self, directories: dict[str, Path], reserve_bytes: int) -> None:
        """Report the free space of ``directories`` and check the received images' one (the first)
        against ``reserve_bytes``: below it the node refuses every image, and /healthz says "degraded"
        with ``"storage": false`` instead of "ok" (review). Not critical: a restart frees no space."""
        self.registry.register(_StorageCollector(directories, reserve_bytes))
        received = next(iter(directories.values()))
        self.add_check("storage", lambda: shutil.disk_usage(received).free >= reserve_bytes, critical=False)

    def health(self) -> HealthReport:
        checks: dict[str, bool] = {}
        for name, check in self._checks.items():
            try:
                checks[name] = bool(check())
            except Exception as exc:
                LOGGER.warning("health check %s failed (%s)", name, type(exc).__name__)
                checks[name] = False
        failed = {name for name, good in checks.items() if not good}
        return HealthReport(not (failed - self._informational), checks, degraded=bool(failed))

    def _database_ok(self) -> bool:
        """Reachable, and the node's role may read and write its tables: a REVOKE left every image
        refused with "database unavailable" while /healthz said ok (review). It only reads: in a write
        transaction it queued behind every image being stored and, while another program held the SQLite
        file, answered after 30 s, past a probe's time-out."""
        with session_scope(self._database.session_factory) as session:  # read-only, as the scrape
            session.execute(text("SELECT 1"))
            missing = db.missing_privileges(session.connection())
        if missing != self._missing_privileges:
            self._missing_privileges = missing
            if missing:
                LOGGER.error("%s", db.privileges_advice(missing))
            else:
                LOGGER.info("the database role may read and write every table of the node again")
        return not missing


def _health_body(report: HealthReport) -> bytes:
    return json.dumps({"status": report.status, "checks": report.checks}).encode()


def metrics_wsgi_app(metrics: NodeMetrics) -> WsgiApp:
    """``/healthz`` (200 or 503, JSON) and ``/metrics`` (Prometheus text format) as one WSGI app."""
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            report = metrics.health()
            status = "200 OK" if report.ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [_health_body(report)]
        if path == "/metrics":
            return prometheus(environ, start_response)  # type: ignore[no-any-return]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


def metrics_router(session_factory: sessionmaker[Session], metrics: NodeMetrics | None = None) -> APIRouter:
    """``/healthz`` and ``/metrics`` for the FastAPI console (no login, like a load balancer's probe).

    Serves ``metrics``, else the node running in this process (its live histogram and checks), else —
    console without a node — the database counts alone.
    """
    from fastapi import APIRouter, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    fallback: list[NodeMetrics] = []

    def current() -> NodeMetrics:
        if metrics is not None:
            return metrics
        if _active is not None:
            return _active
        if not fallback:
            fallback.append(NodeMetrics(session_factory))
        return fallback[0]

    router = APIRouter()

    @router.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        report = current().health()
        return Response(_health_body(report), status_code=200 if report.ok else 503, media_type="application/json")

    @router.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(current().registry), media_type=CONTENT_TYPE_LATEST)

    return router


class _ThreadingWsgiServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver would print a traceback to stderr: a plain multi-line text in the JSON log."""
        exc = sys.exception()
        if isinstance(exc, ConnectionError):  # the scraper hung up
            LOGGER.debug("metrics http: connection from %s ended: %s", client_address[0], type(exc).__name__)
        elif exc is not None:
            LOGGER.error(
                "metrics http: request from %s failed: %s", client_address[0], describe_uncaught(exc)
            )


class _LoggingServerHandler(ServerHandler):
    """wsgiref's handler, logging an application's exception through the node's logging (type, place and
    reason as :func:`describe_uncaught` gives them) instead of printing its traceback to stderr."""

    def log_exception(
        self, exc_info: tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
    ) -> None:
        exc = exc_info[1]
        if exc is not None:
            path = getattr(self, "environ", {}).get("PATH_INFO", "?")  # set by run() before the app
            LOGGER.error("metrics http: %s failed: %s", path, describe_uncaught(exc))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        LOGGER.debug("metrics http: " + format, *args)

    def handle(self) -> None:
        """WSGIRequestHandler.handle() with :class:`_LoggingServerHandler` in place of wsgiref's."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(414)
            return
        if not self.parse_request():  # an error answer was sent
            return
        handler = _LoggingServerHandler(
            cast(IO[bytes], self.rfile), cast(IO[bytes], self.wfile), self.get_stderr(), self.get_environ(),
            multithread=False,
        )
        handler.request_handler = self  # type: ignore[attr-defined]  # wsgiref's back-pointer for close()
        app = self.server.get_app()  # type: ignore[attr-defined]
        handler.run(app)


class MetricsServer:
    """A tiny HTTP server for ``/healthz`` and ``/metrics`` on its own port (0 = any free port)."""

    def __init__(self, metrics: NodeMetrics, host: str, port: int) -> None:
        self._server = make_server(
            host, port, metrics_wsgi_app(metrics), server_class=_ThreadingWsgiServer, handler_class=_QuietHandler
        )
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="cxr-metrics", daemon=True)
        self._thread.start()
        LOGGER.info("health and metrics on http://%s:%d/", self._server.server_address[0], self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
