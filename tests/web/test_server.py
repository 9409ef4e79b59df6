"""WebServer: the console served from a background thread on a real socket."""

from __future__ import annotations

import socket

import httpx
import pytest
from fastapi import FastAPI

from dicom_node.errors import ConfigurationError
from dicom_node.web.server import WebServer

pytestmark = [pytest.mark.network]


def test_serves_on_a_free_port_and_releases_it(app: FastAPI) -> None:
    server = WebServer(app, "127.0.0.1", 0)
    server.start()
    port = server.port
    try:
        assert port > 0
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        login = httpx.get(f"{server.url}/login")
        assert login.status_code == 200 and "Log in" in login.text
        assert httpx.get(f"{server.url}/api/dashboard").status_code == 401
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # the port is free again


def test_a_busy_port_is_a_configuration_error(app: FastAPI) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        busy = sock.getsockname()[1]
        with pytest.raises(ConfigurationError, match="cannot bind"):
            WebServer(app, "127.0.0.1", busy).start()
