"""What the console answers for addresses and methods it does not serve: its own page, JSON in the API."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dicom_node.web.server import WebServer

pytestmark = [pytest.mark.unit]


def test_an_unknown_page_is_the_consoles_error_page_and_the_api_stays_json(
    admin_client: tuple[TestClient, str],
) -> None:
    client, _ = admin_client
    page = client.get("/nonexistent")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "Not found" in page.text and 'href="/"' in page.text and "nonexistent" not in page.text
    assert page.headers["content-security-policy"] and page.headers["cache-control"] == "no-store"
    api = client.get("/api/nonexistent")
    assert api.status_code == 404 and api.json() == {"detail": "Not Found"}


def test_an_unknown_page_is_an_error_page_for_anonymous_visitors_too(client: TestClient) -> None:
    page = client.get("/results/1/nowhere")
    assert page.status_code == 404 and "Not found" in page.text
    assert "Log out" not in page.text


def test_a_wrong_method_is_a_page_with_its_allow_header(admin_client: tuple[TestClient, str]) -> None:
    client, _ = admin_client
    page = client.put("/login")
    assert page.status_code == 405 and page.headers["content-type"].startswith("text/html")
    assert "GET" in page.headers["allow"]
    api = client.put("/api/dashboard")
    assert api.status_code == 405 and api.json() == {"detail": "Method Not Allowed"}


def test_head_is_answered_wherever_get_is(client: TestClient, accounts: dict[str, int]) -> None:
    login = client.head("/login")
    assert login.status_code == 200 and login.content == b""
    assert login.headers["content-type"].startswith("text/html") and int(login.headers["content-length"]) > 0
    assert login.headers["content-security-policy"]
    assert client.head("/healthz").status_code == 200
    assert client.head("/").status_code == 303  # the login still comes first
    assert client.head("/api/dashboard").status_code == 401
    assert client.head("/nonexistent").status_code == 404
    assert client.head("/logout").status_code == 405  # POST only: HEAD is no way round a method


def test_head_over_a_real_socket_has_no_body(app: FastAPI) -> None:
    server = WebServer(app, "127.0.0.1", 0)
    server.start()
    try:
        with httpx.Client(base_url=server.url) as http:
            head, get = http.head("/login"), http.get("/login")
    finally:
        server.stop()
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and head.headers["content-length"] == get.headers["content-length"]
