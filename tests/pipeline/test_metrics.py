"""/healthz and Prometheus /metrics as an operator's monitoring sees them, over real HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.jobs import scheduler_alive
from dicom_node.metrics import MetricsServer, NodeMetrics
from dicom_node.store.db import session_scope
from dicom_node.store.models import InstanceState, Job, JobKind, JobState, StudyState
from tests.pipeline.conftest import add_study

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
