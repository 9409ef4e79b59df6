"""The console works on at most ``web.image_workers`` uploaded images at once; others wait their turn, up to
``web.image_wait_seconds``, then are answered 503 "busy, try again" (dicom_node.web.imagegate)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Settings
from dicom_node.web import create_app, pages
from dicom_node.web.imagegate import ConsoleBusyError, ImageGate
from dicom_node.web.services import Upload
from tests.web.conftest import RADIOLOGIST, login
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
