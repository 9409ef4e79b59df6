"""Images on the details page: the stored radiograph and its heat-map overlay."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import NotFoundError
from dicom_node.settings import Settings
from dicom_node.store.db import session_scope
from dicom_node.store.models import AuditEvent
from dicom_node.web.imaging import hot_region, overlay_png
from tests import peers
from tests.web.conftest import ADMIN
from tests.web.studies import StudySpec, add_study
from tests.web.test_upload import _mediastinum_brighter_than_lungs

pytestmark = [pytest.mark.unit]


def test_overlay_colours_only_where_the_model_looked() -> None:
    gray = np.full((200, 300), 100, dtype=np.uint8)
    heat = np.zeros((10, 15), dtype=np.float32)
    heat[:, :5] = 1.0  # the left third is hot
    rgb = np.asarray(Image.open(io.BytesIO(overlay_png(gray, heat))).convert("RGB")).astype(int)
    assert rgb.shape == (200, 300, 3)
    cold = rgb[:, 250:]
    assert np.all(cold == 100)  # unchanged anatomy where the heat map is zero
    hot = rgb[:, :60]
    assert np.ptp(hot[..., 0] - hot[..., 2]) < 5 and (hot[..., 0] != hot[..., 2]).all()  # tinted
    with pytest.raises(NotFoundError, match="heat map"):  # a 404 with a reason in the console, not a 500
        overlay_png(gray, np.zeros((3,), dtype=np.float32))


def test_details_image_and_heatmap_of_a_stored_instance(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session], settings: Settings
) -> None:
    client, _ = admin_client
    target = settings.storage_dir / "rg1" / "rg1.dcm"
    target.parent.mkdir(parents=True)
    shutil.copy(peers.pydicom_data_file("RG1_UNCI.dcm"), target)
    heat = np.zeros((150, 150), dtype=np.float32)
    heat[40:110, 20:70] = 1.0
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    np.save(settings.results_dir / "heat.npy", heat)
    ids = add_study(factory, StudySpec(file_path="rg1/rg1.dcm", heatmap_path="heat.npy"))
    html = client.get(f"/results/{ids.study}").text
    assert "Heat map</label>" in html
    # its text alternative says where it is strongest, which only its colours told (WCAG 1.1.1)
    assert "(red most, then yellow, blue least); strongest in the middle left of the image\"" in html
    image = client.get(f"/results/{ids.study}/instances/{ids.instance}/image.png")
    assert image.status_code == 200 and _mediastinum_brighter_than_lungs(image.content)
    overlay = client.get(f"/results/{ids.study}/findings/{ids.finding}/heatmap.png")
    assert overlay.status_code == 200
    # A radiograph must not outlive the session in the browser's cache (it was "private, max-age=300":
    # after logging out, the image still showed from the cache).
    assert image.headers["cache-control"] == overlay.headers["cache-control"] == "no-store"
    shown = Image.open(io.BytesIO(image.content))
    assert Image.open(io.BytesIO(overlay.content)).size == shown.size


def test_reading_a_studys_images_without_opening_it_is_in_the_audit_log_once(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session], settings: Settings
) -> None:
    """The images and heat maps were served with no audit record: a script could fetch every patient's
    radiographs and leave no ``study.view`` (review). A read of a study's images is recorded once an hour
    per user and study, and not at all after the study page, whose own read covers the images it loads."""
    client, _ = admin_client
    target = settings.storage_dir / "rg1" / "rg1.dcm"
    target.parent.mkdir(parents=True)
    shutil.copy(peers.pydicom_data_file("RG1_UNCI.dcm"), target)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    np.save(settings.results_dir / "heat.npy", np.ones((150, 150), dtype=np.float32))
    spec = StudySpec(file_path="rg1/rg1.dcm", heatmap_path="heat.npy")
    fetched, opened = add_study(factory, spec), add_study(factory, spec)
    for ids in (fetched, fetched):  # straight to the images, twice
        assert client.get(f"/results/{ids.study}/instances/{ids.instance}/image.png").status_code == 200
        assert client.get(f"/results/{ids.study}/findings/{ids.finding}/heatmap.png").status_code == 200
    assert client.get(f"/results/{opened.study}").status_code == 200  # the page, then its images
    assert client.get(f"/results/{opened.study}/instances/{opened.instance}/image.png").status_code == 200
    with session_scope(factory) as session:
        reads = session.execute(
            select(AuditEvent.actor, AuditEvent.action, AuditEvent.target)
            .where(AuditEvent.action.like("study.%")).order_by(AuditEvent.id)
        ).all()
    assert [tuple(row) for row in reads] == [
        (f"user:{ADMIN[0]}", "study.images", f"study:{fetched.study}"),
        (f"user:{ADMIN[0]}", "study.view", f"study:{opened.study}"),
    ]


@pytest.mark.parametrize("name", ["heat.npy", "heat.png"])
def test_a_damaged_heat_map_is_a_clear_error_not_an_internal_one(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session], settings: Settings, name: str
) -> None:
    client, _ = admin_client
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    np.save(good, np.zeros((150, 150), dtype=np.float32))
    (settings.results_dir / name).write_bytes(good.getvalue()[:100])  # cut short, as a full disk leaves it
    ids = add_study(factory, StudySpec(heatmap_path=name))
    response = client.get(f"/results/{ids.study}/findings/{ids.finding}/heatmap.png")
    assert response.status_code == 500
    assert "the stored heat map file is damaged" in response.text


@pytest.mark.parametrize(
    ("boxes", "said"),
    [
        ([(10, 50, 10, 45)], "the upper left of the image"),
        ([(110, 140, 100, 140)], "the lower right of the image"),
        ([(60, 90, 60, 90)], "the centre of the image"),
        ([(60, 100, 115, 145)], "the middle right of the image"),
        ([(40, 100, 10, 40), (40, 100, 110, 140)], "spread over the image"),  # both lungs
    ],
)
def test_the_heat_maps_strongest_part_is_named_by_where_it_is(
    boxes: list[tuple[int, int, int, int]], said: str
) -> None:
    """The words of the heat map's text alternative: the place of its strongest part, in the image's
    thirds (the image's sides, not the patient's), or "spread" when it is in more than one place."""
    heat = np.full((150, 150), 0.1, dtype=np.float32)
    for top, bottom, left, right in boxes:
        heat[top:bottom, left:right] = 1.0
    heat[0, 149] = 0.5  # weaker parts elsewhere do not move it
    assert hot_region(heat) == said
    assert hot_region(np.ones((20, 20), dtype=np.float32)) == ""  # flat: nothing stands out
    assert hot_region(np.zeros((0, 0), dtype=np.float32)) == ""

