"""What the console answers for addresses and methods it does not serve: its own page, JSON in the API."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

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
