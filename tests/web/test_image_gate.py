"""The console works on at most ``web.image_workers`` uploaded images at once, a study page's radiographs and
heat maps with them; others wait their turn, up to ``web.image_wait_seconds``, then are answered 503 "busy,
try again" (dicom_node.web.imagegate)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import UndecodableDatasetError
from dicom_node.settings import Settings
from dicom_node.web import create_app, pages
from dicom_node.web.imagegate import ConsoleBusyError, ImageGate
from dicom_node.web.services import Upload
from tests import peers
from tests.web.conftest import RADIOLOGIST, login
from tests.web.studies import StudyIds, StudySpec, add_study
from tests.web.test_upload import chest_like_png

pytestmark = [pytest.mark.unit]

PNG = chest_like_png((64, 48))


def _client(settings: Settings, factory: sessionmaker[Session], workers: int, wait: float) -> TestClient:
    web = settings.web.model_copy(update={"image_workers": workers, "image_wait_seconds": wait})
    return TestClient(create_app(settings.model_copy(update={"web": web}), factory), follow_redirects=False)


@pytest.fixture
def one_at_a_time(
    settings: Settings, factory: sessionmaker[Session], accounts: dict[str, int]
) -> Iterator[tuple[TestClient, str]]:
    """The console of a node set to one image at a time, waiting at most 0.3 s for its turn."""
    with _client(settings, factory, 1, 0.3) as client:
        yield client, login(client, *RADIOLOGIST)


def _post(client: TestClient, csrf: str, path: str = "/upload") -> httpx.Response:
    return client.post(path, data={"csrf_token": csrf}, files={"file": ("chest.png", PNG, "image/png")})


def test_concurrent_uploads_are_decoded_one_after_the_other(
    settings: Settings, factory: sessionmaker[Session], accounts: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each upload decoded at once took its picture's memory several times over: a few 8000² pictures
    uploaded together could take the memory of the process that runs the DICOM listener (review)."""
    inside, most = 0, 0
    count = threading.Lock()
    read_upload = pages.read_upload

    def slow_read(*args: Any, **kwargs: Any) -> Upload:
        nonlocal inside, most
        with count:
            inside += 1
            most = max(most, inside)
        try:
            time.sleep(0.2)  # long enough for the others to arrive
            return read_upload(*args, **kwargs)
        finally:
            with count:
                inside -= 1

    monkeypatch.setattr(pages, "read_upload", slow_read)
    with _client(settings, factory, 1, 10.0) as client:
        csrf = login(client, *RADIOLOGIST)
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: _post(client, csrf), range(3)))
    assert [answer.status_code for answer in answers] == [303, 303, 303]  # they waited, none was refused
    assert most == 1


def test_an_upload_that_waits_too_long_for_its_turn_is_answered_busy(
    one_at_a_time: tuple[TestClient, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, csrf = one_at_a_time
    shown = _post(client, csrf).headers["location"]  # an upload held before the console is busy
    started, finish = threading.Event(), threading.Event()
    read_upload = pages.read_upload

    def held_read(*args: Any, **kwargs: Any) -> Upload:
        if not started.is_set():  # the first upload keeps the one turn until the test lets it go
            started.set()
            finish.wait(10.0)
        return read_upload(*args, **kwargs)

    monkeypatch.setattr(pages, "read_upload", held_read)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_post, client, csrf)
        try:
            assert started.wait(10.0)
            page = _post(client, csrf)
            api = _post(client, csrf, "/api/uploads")
            preview = client.get(f"{shown}/image.png")
        finally:
            finish.set()
        assert first.result().status_code == 303  # the one that had its turn
    busy = "the console is busy with other images (it works on 1 at a time); try again in a moment"
    assert page.status_code == 503 and busy in page.text and page.headers["retry-after"] == "10"
    assert 'name="file"' in page.text  # the upload form, to try again from
    assert api.status_code == 503 and api.json() == {"detail": busy}
    assert api.headers["retry-after"] == "10"
    assert preview.status_code == 503 and preview.headers["retry-after"] == "10"
    # the turns were given back: the console works again
    assert client.get(f"{shown}/image.png").status_code == 200
    assert _post(client, csrf).status_code == 303


def test_a_thread_working_on_an_image_goes_on_within_its_turn() -> None:
    """A report drawing its preview is one turn: with one worker it would otherwise wait for itself."""
    gate = ImageGate(1, 0.1)
    with gate.turn(), gate.turn():
        pass
    with gate.turn():  # given back once, not twice or never
        refused = ThreadPoolExecutor(1).submit(lambda: _try_turn(gate)).result()
    assert refused
    assert not _try_turn(gate)


def _try_turn(gate: ImageGate) -> bool:
    """True when ``gate`` refused a turn."""
    try:
        with gate.turn():
            return False
    except ConsoleBusyError:
        return True


def _stored_study(settings: Settings, factory: sessionmaker[Session]) -> StudyIds:
    """A study with a stored radiograph and a finding's heat map, as the node keeps them."""
    target = settings.storage_dir / "rg1" / "rg1.dcm"
    target.parent.mkdir(parents=True)
    shutil.copy(peers.pydicom_data_file("RG1_UNCI.dcm"), target)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    np.save(settings.results_dir / "heat.npy", np.ones((150, 150), dtype=np.float32))
    return add_study(factory, StudySpec(file_path="rg1/rg1.dcm", heatmap_path="heat.npy"))


def _study_images(ids: StudyIds) -> list[str]:
    """The addresses of a study page's images: its radiograph and its finding's heat-map overlay."""
    return [f"/results/{ids.study}/instances/{ids.instance}/image.png",
            f"/results/{ids.study}/findings/{ids.finding}/heatmap.png"]


@contextmanager
def _held(gate: ImageGate) -> Iterator[None]:
    """Every turn of ``gate`` (one worker) taken by another request until the block ends."""
    taken, finish = threading.Event(), threading.Event()

    def hold() -> None:
        with gate.turn():
            taken.set()
            finish.wait(10.0)

    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(hold)
        try:
            assert taken.wait(10.0)
            yield
        finally:
            finish.set()
        holder.result()


def test_a_study_pages_images_wait_for_their_turn_and_give_it_back(
    one_at_a_time: tuple[TestClient, str], settings: Settings, factory: sessionmaker[Session]
) -> None:
    """A study page's radiograph and heat-map overlay are decoded from the stored DICOM file as fully as
    an upload's preview, and a study page asks for all of them at once: they took the memory the gate
    keeps for uploads without a turn (review)."""
    client, _ = one_at_a_time
    ids = _stored_study(settings, factory)
    gate: ImageGate = client.app.state.console.images  # type: ignore[attr-defined]
    with _held(gate):
        refused = [client.get(path) for path in _study_images(ids)]
        page = client.get(f"/results/{ids.study}")  # the page itself decodes no image: it is shown
    busy = "the console is busy with other images (it works on 1 at a time); try again in a moment"
    for answer in refused:
        assert answer.status_code == 503 and answer.headers["retry-after"] == "10"
        assert busy in answer.text
    assert page.status_code == 200
    # the turns were given back: the images are shown, one after the other
    for path in _study_images(ids):
        shown = client.get(path)
        assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"


@pytest.mark.parametrize("failure", [UndecodableDatasetError("the image cannot be displayed"),
                                     RuntimeError("a decoder's own error")])
def test_a_study_image_that_fails_gives_its_turn_back(
    one_at_a_time: tuple[TestClient, str], settings: Settings, factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch, failure: Exception,
) -> None:
    """The stored file is decoded within the request's turn, and a decoding that fails (a file the
    console cannot show, or an error of the decoder itself) ends the turn as well as one that succeeds."""
    client, _ = one_at_a_time
    ids = _stored_study(settings, factory)
    con = client.app.state.console  # type: ignore[attr-defined]
    refused_meanwhile: list[bool] = []

    def failing_preview(relative_path: str) -> Any:
        with ThreadPoolExecutor(1) as pool:  # another request, asking for a turn meanwhile
            refused_meanwhile.append(pool.submit(_try_turn, con.images).result())
        raise failure

    stored_preview = con.services.stored_preview
    monkeypatch.setattr(con.services, "stored_preview", failing_preview)
    failed = [client.get(path).status_code for path in _study_images(ids)]
    assert failed == ([422, 422] if isinstance(failure, UndecodableDatasetError) else [500, 500])
    assert refused_meanwhile == [True, True]  # the decoding had the one turn
    monkeypatch.setattr(con.services, "stored_preview", stored_preview)
    assert [client.get(path).status_code for path in _study_images(ids)] == [200, 200]  # and gave it back
