"""The console served by WebServer on a free port, driven by Debian's headless Chromium."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_node import users
from dicom_node.settings import Settings
from dicom_node.store.db import make_engine, make_session_factory, session_scope, upgrade
from dicom_node.store.models import DeliveryState, StudyState, UserRole
from dicom_node.web import create_app
from dicom_node.web.results import local_midnight
from dicom_node.web.server import WebServer
from tests import peers
from tests.web.conftest import fast_password_hashing, storescp  # noqa: F401  (fixtures)
from tests.web.studies import ANALYSED_AFTER, StudySpec, add_study

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "out" / "screenshots"
VIEWPORT = {"width": 1366, "height": 768}
ADMIN = ("admin", "steel-orchid-e2e")
RADIOLOGIST = ("dr.jones", "radiologist-e2e-pw")


@dataclass(frozen=True)
class RunningConsole:
    url: str
    settings: Settings
    study_ids: dict[str, int]
    analysed_times: tuple[datetime, ...]  # when the seeded ANALYSED studies were analysed

    def analysed_today(self) -> int:
        """What the dashboard's "analysed today" must say, by the local midnight of the moment asked."""
        midnight = local_midnight()
        return sum(1 for when in self.analysed_times if when >= midnight)


def _seed(settings: Settings) -> tuple[dict[str, int], tuple[datetime, ...]]:
    engine = make_engine(settings.database_url)
    upgrade(engine)
    factory = make_session_factory(engine)
    with session_scope(factory) as s:
        users.create_user(s, ADMIN[0], ADMIN[1], UserRole.ADMIN, "test")
        users.create_user(s, RADIOLOGIST[0], RADIOLOGIST[1], UserRole.RADIOLOGIST, "test")
    stored = settings.storage_dir / "rg1" / "rg1.dcm"
    stored.parent.mkdir(parents=True)
    shutil.copy(peers.pydicom_data_file("RG1_UNCI.dcm"), stored)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    heat = np.zeros((150, 150), dtype=np.float32)
    heat[50:110, 25:65] = np.linspace(0.3, 1.0, 40, dtype=np.float32)[None, :]
    np.save(settings.results_dir / "heat.npy", heat)
    now = datetime.now(UTC)
    ids = {}
    names = [
        ("GARCIA^LUIS", "P-7001"),
        ("NGUYEN^THI", "P-7002"),
        ("MUELLER^KLAUS", "P-7003"),
        ("ROSSI^GIULIA", "P-7004"),
    ]
    for i, (name, pid) in enumerate(names):
        add_study(
            factory,
            StudySpec(
                name,
                pid,
                f"ACC70{i}",
                f"2026011{i}",
                label="normal",
                probabilities={"covid": 0.03, "normal": 0.93, "pneumonia": 0.04},
                deliveries={"ORTHANC": DeliveryState.DELIVERED},
                received_at=now - timedelta(minutes=50 + 7 * i),
            ),
        )
    ids["skipped"] = add_study(
        factory,
        StudySpec(
            "SMITH^JOHN",
            "P-200",
            "A200",
            "20260105",
            state=StudyState.SKIPPED,
            state_reason="not a chest image (BodyPartExamined: SKULL)",
            label=None,
            received_at=now - timedelta(hours=2),
        ),
    ).study
    ids["pneumonia"] = add_study(
        factory,
        StudySpec(
            "SMITH^JOHN",
            "P-200",
            "A201",
            "20260110",
            file_path="rg1/rg1.dcm",
            heatmap_path="heat.npy",
            deliveries={"ORTHANC": DeliveryState.DELIVERED, "ARCHIVE": DeliveryState.DEAD},
            received_at=now - timedelta(minutes=30),
        ),
    ).study
    engine.dispose()
    received = [now - timedelta(minutes=50 + 7 * i) for i in range(4)] + [now - timedelta(minutes=30)]
    return ids, tuple(when + ANALYSED_AFTER for when in received)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[RunningConsole]:
    data_dir = tmp_path_factory.mktemp("e2e") / "var"
    settings = Settings(
        node={"data_dir": data_dir, "name": "CXR AI node", "institution_name": "St. Example Hospital"},
        web={"host": "127.0.0.1", "port": 0},
        pipeline={"model_path": model_path},
    )
    ids, analysed_times = _seed(settings)
    engine = make_engine(settings.database_url)
    server = WebServer(create_app(settings, make_session_factory(engine)), "127.0.0.1", 0)
    server.start()
    try:
        yield RunningConsole(server.url, settings, ids, analysed_times)
    finally:
        server.stop()
        engine.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        peers.missing("Debian chromium not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        peers.missing("the Python package playwright is not installed")
        raise
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    try:
        yield context.new_page()
    finally:
        context.close()
