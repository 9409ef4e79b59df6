"""/healthz and Prometheus /metrics as an operator's monitoring sees them, over real HTTP."""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.jobs import NodeScheduler, scheduler_alive
from dicom_node.logconfig import configure_logging
from dicom_node.metrics import MetricsServer, NodeMetrics
from dicom_node.settings import LoggingSettings
from dicom_node.store.db import make_engine, make_session_factory, session_scope, upgrade
from dicom_node.store.models import InstanceState, Job, JobKind, JobState, StudyState
from tests import peers
from tests.pipeline.conftest import add_study, write_transaction_open

pytestmark = pytest.mark.db


@pytest.fixture
def served(db: sessionmaker[Session]) -> Iterator[tuple[NodeMetrics, str]]:
    metrics = NodeMetrics(db)
    server = MetricsServer(metrics, "127.0.0.1", 0)
    server.start()
    yield metrics, f"http://127.0.0.1:{server.port}"
    server.stop()


def _samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def test_metrics_count_what_the_database_holds(
    served: tuple[NodeMetrics, str], db: sessionmaker[Session], tmp_path: Path
) -> None:
    metrics, url = served
    with session_scope(db) as session:
        add_study(session, tmp_path, images=2, state=StudyState.ANALYSED, instance_state=InstanceState.ANALYSED)
        add_study(session, tmp_path, body_part="HAND", state=StudyState.SKIPPED, instance_state=InstanceState.SKIPPED)
        waiting = add_study(session, tmp_path)
        session.add(Job(kind=JobKind.STUDY_READY, dedupe_key="x", study_pk=waiting.id, state=JobState.PENDING))
    metrics.observe_delivery("sr", 3.5)

    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    samples = _samples(response.text)
    assert samples[("cxr_node_instances_received_total", ())] == 4
    assert samples[("cxr_node_instances_analysed", ())] == 2
    assert samples[("cxr_node_instances_skipped", ())] == 1
    assert samples[("cxr_node_deliveries_delivered", ())] == 0
    assert samples[("cxr_node_queue_depth", (("queue", "studies"),))] == 1
    assert samples[("cxr_node_receipt_to_delivery_seconds_count", (("kind", "sr"),))] == 1
    assert samples[("cxr_node_receipt_to_delivery_seconds_bucket", (("kind", "sr"), ("le", "5.0")))] == 1
    assert samples[("cxr_node_receipt_to_delivery_seconds_bucket", (("kind", "sr"), ("le", "2.0")))] == 0


def test_a_scrape_does_not_wait_behind_a_writer(
    served: tuple[NodeMetrics, str], db: sessionmaker[Session]
) -> None:
    """A scrape took SQLite's write lock for its counts, so it queued behind every image being stored and,
    with a long write (another program holding the file), Prometheus's scrape timed out. It only reads."""
    _, url = served
    with write_transaction_open(db):
        started = time.monotonic()
        response = httpx.get(f"{url}/metrics", timeout=20)
        assert response.status_code == 200 and "cxr_node_database_up 1.0" in response.text
        assert time.monotonic() - started < 3


def test_healthz_reports_each_check_and_fails_when_one_fails(served: tuple[NodeMetrics, str]) -> None:
    metrics, url = served
    ok = httpx.get(f"{url}/healthz")
    assert ok.status_code == 200
    assert ok.json() == {"status": "ok", "checks": {"database": True}}

    metrics.add_check("model", lambda: False, critical=False)
    degraded = httpx.get(f"{url}/healthz")
    assert degraded.status_code == 200
    assert degraded.json() == {"status": "degraded", "checks": {"database": True, "model": False}}

    metrics.add_check("pipeline", lambda: False)
    down = httpx.get(f"{url}/healthz")
    assert down.status_code == 503
    assert down.json() == {"status": "unhealthy", "checks": {"database": True, "model": False, "pipeline": False}}
    assert httpx.get(f"{url}/nothing").status_code == 404


def test_the_console_router_serves_the_running_nodes_metrics(db: sessionmaker[Session]) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from dicom_node.metrics import metrics_router

    app = FastAPI()
    app.include_router(metrics_router(db))
    client = TestClient(app)
    assert client.get("/healthz").json() == {"status": "ok", "checks": {"database": True}}

    node = NodeMetrics(db)
    node.add_check("pipeline", lambda: False)
    node.observe_delivery("pdf", 1.5)
    node.activate()
    try:
        assert client.get("/healthz").status_code == 503
        assert 'cxr_node_receipt_to_delivery_seconds_count{kind="pdf"} 1.0' in client.get("/metrics").text
    finally:
        node.deactivate()
    assert client.get("/healthz").status_code == 200


def test_a_scheduler_whose_thread_died_is_not_alive() -> None:
    """APScheduler's ``running`` stayed true after an exception ended its thread (seen when two nodes
    shared a database): /healthz said "ok" while no timer, delivery or purge ran any more."""
    scheduler = BackgroundScheduler()
    scheduler.start()
    real = scheduler._thread
    try:
        assert scheduler_alive(scheduler)
        dead = threading.Thread(target=lambda: None)
        dead.start()
        dead.join()
        scheduler._thread = dead  # what an exception in its loop leaves behind
        assert scheduler.running and not scheduler_alive(scheduler)
    finally:
        scheduler._thread = real
        scheduler.shutdown(wait=True)
    assert not scheduler_alive(scheduler)


def test_a_disk_below_the_reserve_is_in_health_and_metrics(db: sessionmaker[Session], tmp_path: Path) -> None:
    """Every C-STORE was refused 0xA700 for the reserve while /healthz said "ok" and /metrics had no
    free-space series (review)."""
    (tmp_path / "instances").mkdir()
    (tmp_path / "results").mkdir()
    free = shutil.disk_usage(tmp_path).free
    for reserve, status in ((0, "ok"), (free * 2, "degraded")):
        metrics = NodeMetrics(db)
        metrics.watch_storage({"instances": tmp_path / "instances", "results": tmp_path / "results"}, reserve)
        report = metrics.health()
        assert report.ok and report.status == status and report.checks["storage"] is (reserve == 0)
        samples = {(sample.name, sample.labels.get("directory")): sample.value
                   for family in metrics.registry.collect() for sample in family.samples}
        assert samples[("cxr_node_storage_reserve_bytes", None)] == reserve
        assert samples[("cxr_node_storage_free_bytes", "instances")] > 0
        assert ("cxr_node_storage_free_bytes", "results") in samples


class _StoreThatFailsOnce(MemoryJobStore):
    """A job store whose database goes away once, as a round updates a job."""

    failures = 1

    def update_job(self, job: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise OperationalError("UPDATE apscheduler_jobs", {}, Exception("terminating connection"))
        super().update_job(job)


def test_the_scheduler_outlives_a_job_store_that_fails_in_a_round() -> None:
    """A PostgreSQL restart while a round updated a job ended APScheduler's thread: no timer, delivery or
    purge ran until the node was restarted, and /healthz stayed 503 (review)."""
    scheduler = NodeScheduler(jobstores={"default": _StoreThatFailsOnce()}, jobstore_retry_interval=0.2)
    runs: list[float] = []
    scheduler.add_job(lambda: runs.append(time.monotonic()), "interval", seconds=0.1)
    scheduler.start()
    try:
        deadline = time.monotonic() + 10
        while len(runs) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler_alive(scheduler) and len(runs) >= 4
    finally:
        scheduler.shutdown(wait=True)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The node's JSON logging into a buffer; the root logger's handlers come back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging(LoggingSettings(level="INFO", json_format=True), stream=stream)
    yield stream
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


def _records(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]  # every line one JSON object


def test_metrics_answer_without_the_database_and_say_so_once(
    json_log: io.StringIO, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With PostgreSQL down, /metrics answered 500 "A server error occurred", printed the SQLAlchemy/psycopg
    traceback to stderr on every scrape, and the in-process histogram vanished with the counts."""
    nobody_listens = peers.free_port()
    down = make_engine(f"postgresql+psycopg://cxrnode@127.0.0.1:{nobody_listens}/cxrnode")
    metrics = NodeMetrics(make_session_factory(down))
    metrics.observe_delivery("sr", 3.5)
    server = MetricsServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        scrapes = [httpx.get(f"http://127.0.0.1:{server.port}/metrics") for _ in range(3)]
        assert [response.status_code for response in scrapes] == [200, 200, 200]
        samples = _samples(scrapes[-1].text)
        assert samples[("cxr_node_database_up", ())] == 0
        assert samples[("cxr_node_receipt_to_delivery_seconds_count", (("kind", "sr"),))] == 1
        assert not any(name.startswith(("cxr_node_instances", "cxr_node_queue")) for name, _ in samples)

        # The database back: its counts return, and the log says so.
        good = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
        upgrade(good)
        metrics._database.session_factory = make_session_factory(good)
        samples = _samples(httpx.get(f"http://127.0.0.1:{server.port}/metrics").text)
        assert samples[("cxr_node_database_up", ())] == 1
        assert samples[("cxr_node_instances_received_total", ())] == 0
        good.dispose()
    finally:
        server.stop()
        down.dispose()
    warnings = [r for r in _records(json_log) if r["level"] == "WARNING"]
    assert len(warnings) == 1, warnings  # once, not per scrape
    assert warnings[0]["message"].startswith("metrics: the database cannot be read (OperationalError: ")
    assert "exc_info" not in warnings[0]
    assert any(r["message"] == "metrics: the database can be read again" for r in _records(json_log))
    assert "Traceback" not in capfd.readouterr().err


def test_a_failing_request_is_logged_not_printed(
    json_log: io.StringIO, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """wsgiref printed an application's exception as a plain multi-line traceback to stderr."""
    secret = "ZZ" + "SECRET"  # the source lines of the stack are logged: keep the value out of them

    class Broken:
        def describe(self) -> list[object]:
            return []

        def collect(self) -> Iterator[object]:
            raise ValueError(f"{secret}^NAME")

    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    upgrade(engine)
    metrics = NodeMetrics(make_session_factory(engine))
    metrics.registry.register(Broken())  # type: ignore[arg-type]
    server = MetricsServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        response = httpx.get(f"http://127.0.0.1:{server.port}/metrics")
        try:  # what socketserver is handed when a request handler itself fails
            raise OSError(5, "Input/output error")
        except OSError:
            server._server.handle_error(None, ("192.0.2.7", 40000))
    finally:
        server.stop()
        engine.dispose()
    assert response.status_code == 500
    errors = [r for r in _records(json_log) if r["level"] == "ERROR"]
    assert len(errors) == 2
    assert errors[0]["message"].startswith("metrics http: /metrics failed: ValueError at ")
    assert errors[1]["message"].startswith("metrics http: request from 192.0.2.7 failed: OSError at ")
    assert "ZZSECRET" not in json_log.getvalue()
    assert capfd.readouterr().err == ""


def test_healthz_does_not_wait_behind_a_writer(served: tuple[NodeMetrics, str], db: sessionmaker[Session]) -> None:
    """/healthz's database check took SQLite's write lock to read: behind a long write (another program
    holding the file, the node's own busy moments) it answered only after 30 s, and a probe with a
    shorter time-out took the node for dead and restarted it mid-association."""
    _, url = served
    with write_transaction_open(db):
        started = time.monotonic()
        response = httpx.get(f"{url}/healthz", timeout=40)
        assert response.status_code == 200 and response.json()["checks"] == {"database": True}
        assert time.monotonic() - started < 3
