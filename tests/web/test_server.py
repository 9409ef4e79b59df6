"""WebServer: the console served from a background thread on a real socket."""

from __future__ import annotations

import socket

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.errors import ConfigurationError
from dicom_node.store.db import session_scope
from dicom_node.store.models import AuditEvent
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


@pytest.mark.parametrize(
    ("trusted", "recorded"), [([], "127.0.0.1"), (["127.0.0.1"], "10.20.30.40")], ids=["direct", "proxy"]
)
def test_the_audit_trail_believes_x_forwarded_for_only_from_a_trusted_proxy(
    app: FastAPI, accounts: dict[str, int], factory: sessionmaker[Session], trusted: list[str], recorded: str
) -> None:
    """Without a trusted proxy, uvicorn's default believed X-Forwarded-For from 127.0.0.1, which any local
    process can send. Behind the reverse proxy the guide asks for, every login was audited as the proxy's
    address: its X-Forwarded-For is believed when web.trusted_proxies names it."""
    server = WebServer(app, "127.0.0.1", 0, trusted_proxies=trusted)
    server.start()
    try:
        response = httpx.post(
            f"{server.url}/api/session", json={"username": "alice", "password": "wrong-password"},
            headers={"X-Forwarded-For": "10.20.30.40"},
        )
        assert response.status_code == 401
    finally:
        server.stop()
    with session_scope(factory) as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "user.login_failed")).one()
        assert event.details["client"] == recorded


def test_a_busy_port_is_a_configuration_error(app: FastAPI) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        busy = sock.getsockname()[1]
        # its settings named, and the operating system's words without "[Errno 98]" (review)
        said = (rf"^web console cannot bind 127\.0\.0\.1:{busy} \(web\.port, web\.host\): "
                r"Address already in use$")
        with pytest.raises(ConfigurationError, match=said):
            WebServer(app, "127.0.0.1", busy).start()


def _exchange(url: str, head: str, body_parts: tuple[bytes, ...] = (), timeout: float = 5.0) -> str:
    """Send a request head (and any body parts) on a raw socket; the status line and headers of the
    answer, which the server must give without waiting for the rest of the body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        for part in body_parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed: the rest is not wanted
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode("latin-1")


def test_an_anonymous_upload_is_refused_before_its_body_is_read(app: FastAPI) -> None:
    """FastAPI parses a whole form (spooling files to disk) before the login check: anyone could fill
    the node's disk. The head alone gets the answer; the 50 MB it announces are never sent."""
    server = WebServer(app, "127.0.0.1", 0)
    server.start()
    try:
        head = ("POST {path} HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; boundary=b\n"
                "Content-Length: 52428800\nCookie: cxr_session=not-a-session\n")
        page = _exchange(server.url, head.format(path="/upload"))
        api = _exchange(server.url, head.format(path="/api/uploads"))
    finally:
        server.stop()
    assert page.startswith("HTTP/1.1 303") and "location: /login?next=/" in page.lower()
    assert api.startswith("HTTP/1.1 401")


def test_bodies_over_their_ceiling_are_refused_with_413(
    app: FastAPI, accounts: dict[str, int]
) -> None:
    server = WebServer(app, "127.0.0.1", 0)
    server.start()
    try:
        declared = _exchange(server.url, "POST /upload HTTP/1.1\nHost: x\nContent-Length: 2147483648\n")
        login_form = _exchange(
            server.url,
            "POST /login HTTP/1.1\nHost: x\nContent-Type: application/x-www-form-urlencoded\n"
            "Transfer-Encoding: chunked\n",
            tuple(b"8000\r\n" + b"a" * 0x8000 + b"\r\n" for _ in range(64)),  # 2 MB, no length given
        )
        still_serving = httpx.get(f"{server.url}/healthz").status_code
    finally:
        server.stop()
    assert declared.startswith("HTTP/1.1 413")
    assert login_form.startswith("HTTP/1.1 413")
    assert "no-store" in login_form  # the console's headers are on the refusal too
    assert still_serving == 200
