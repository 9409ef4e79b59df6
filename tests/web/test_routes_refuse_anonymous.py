"""Every page and API route refuses a request without a session (the console holds patient data)."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI, routing
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

pytestmark = [pytest.mark.unit]

# The only routes that answer without a login, and why.
PUBLIC = {
    ("GET", "/login"),  # the login form
    ("POST", "/login"),  # submitting it (protected by its own double-submit CSRF cookie)
    ("POST", "/api/session"),  # the API's login
    ("GET", "/healthz"),  # liveness for systemd/k8s: up/down and nothing else
    ("GET", "/metrics"),  # Prometheus counts (no patient data), for the node's scraper
}


def _routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every endpoint, including those of included routers."""
    iter_contexts = getattr(routing, "iter_route_contexts", None)  # FastAPI >= 0.13x nests routers
    routes = list(iter_contexts(app.routes)) if iter_contexts else app.routes
    found = []
    for route in routes:
        original = getattr(route, "original_route", route)
        if isinstance(original, APIRoute):
            for method in sorted(route.methods or ()):
                found.append((method, str(route.path)))
    return found


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def _refused_everywhere(app: FastAPI, cookies: dict[str, str]) -> None:
    """Every route but the public ones, asked with ``cookies``, answers as to a request without a login:
    401 "not logged in" from the API, a redirect to the login form from a page."""
    routes = _routes(app)
    assert len(routes) > 40  # pages + API; guards against enumerating nothing
    assert {r for r in routes if r in PUBLIC} == PUBLIC
    checked = 0
    with TestClient(app, follow_redirects=False) as client:
        for name, value in cookies.items():
            client.cookies.set(name, value)
        for method, path in routes:
            if (method, path) in PUBLIC:
                continue
            response = client.request(method, _fill(path))
            if path.startswith("/api/"):
                assert response.status_code == 401, (method, path, response.status_code)
                assert response.json() == {"detail": "not logged in"}
            else:
                assert response.status_code == 303, (method, path, response.status_code)
                assert response.headers["location"].startswith("/login"), (method, path)
            checked += 1
    assert checked == len(routes) - len(PUBLIC)


def test_every_route_but_the_login_refuses_anonymous_requests(app: FastAPI) -> None:
    _refused_everywhere(app, {})


def test_a_forged_session_cookie_is_refused_everywhere(app: FastAPI) -> None:
    """A forged cookie is no login: the API says "not logged in" and a page sends to the login form. (Any
    303 passed before, a redirect to a page that serves data included, and no route at all passed too.)"""
    _refused_everywhere(app, {"cxr_session": "forged-token-value"})


def test_static_files_hold_no_data(app: FastAPI) -> None:
    with TestClient(app) as client:
        assert client.get("/static/console.css").status_code == 200
        assert client.get("/static/../templates/base.html").status_code == 404


def test_unexpected_errors_are_logged_without_their_text(
    admin_client: tuple[TestClient, str], caplog: pytest.LogCaptureFixture
) -> None:
    """An exception text may embed patient data (pydicom, SQL); the log gets its type and location."""
    client, _ = admin_client
    app = client.app

    @app.get("/boom-test")  # type: ignore[attr-defined,misc]
    def boom() -> None:
        raise RuntimeError("DOE^JANE 19600101")

    with caplog.at_level("ERROR"):
        response = TestClient(app, raise_server_exceptions=False, cookies=client.cookies).get("/boom-test")
    assert response.status_code == 500 and "DOE" not in response.text
    assert "RuntimeError" in caplog.text and "DOE" not in caplog.text


def test_a_row_id_past_64_bits_in_any_url_is_invalid_input_not_an_internal_error(
    admin_client: tuple[TestClient, str], app: FastAPI
) -> None:
    """Found by Schemathesis against /api/openapi.json: such an id overflowed the database driver (500)."""
    client, csrf = admin_client
    with_ids = [(method, path) for method, path in _routes(app) if re.search(r"\{\w+_id\}", path)]
    assert len(with_ids) >= 15  # study, instance, finding, object, delivery, AE and user routes
    for method, path in with_ids:
        url = re.sub(r"\{\w+_id\}", str(2**64), path)
        response = client.request(method, url, headers={"X-CSRF-Token": csrf}, data={"csrf_token": csrf})
        assert response.status_code == 422, (method, path, response.status_code)
