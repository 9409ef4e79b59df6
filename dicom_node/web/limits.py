"""Request bodies the console will read, decided before a byte of them is read.

FastAPI parses a whole form (Starlette spools file parts over 1 MB to temporary files) before any
dependency runs, so the login check and the upload size check of a route come after the upload is on
the node's disk. :class:`RequestBodyGuard` sits in front of routing instead:

- an upload route reads a body only for a logged-in user (a cookie that resolves to a session);
- every body has a ceiling: uploads ``MAX_UPLOAD_BYTES`` plus room for the form around the file,
  everything else (login, admin forms, JSON) :data:`FORM_BODY_BYTES`. A declared Content-Length over it
  is refused at once; a chunked body is cut off where it passes it. Either way the answer is 413.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import cookie_parser

from dicom_node.web.auth import SESSION_COOKIE
from dicom_node.web.uploads import MAX_UPLOAD_BYTES

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Routes that take a file; the only ones that may send more than a form.
UPLOAD_PATHS = frozenset({"/upload", "/api/uploads"})
#: Room for the multipart framing and the CSRF field around an uploaded file.
UPLOAD_FORM_OVERHEAD = 1024 * 1024
#: Login, admin forms and JSON bodies are a few hundred bytes.
FORM_BODY_BYTES = 64 * 1024


class _BodyTooLarge(BaseException):  # noqa: N818 - a signal, not an error of the taxonomy
    """Raised from ``receive`` when a body passes its ceiling; answered with 413. A BaseException so
    that FastAPI's body parsing, which turns any Exception into "400 error parsing the body", lets it
    through to the guard before a route sees a cut-off form."""


class RequestBodyGuard:
    """ASGI middleware: the body ceiling for every request, and a login before an upload is read.

    ``logged_in(cookie token)`` tells whether a session cookie belongs to a live session (it runs in the
    thread pool: it reads the database)."""

    def __init__(self, app: ASGIApp, logged_in: Callable[[str | None], bool]) -> None:
        self.app = app
        self.logged_in = logged_in

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        upload = path in UPLOAD_PATHS
        ceiling = MAX_UPLOAD_BYTES + UPLOAD_FORM_OVERHEAD if upload else FORM_BODY_BYTES
        declared = _content_length(scope)
        if declared is not None and declared > ceiling:
            await _too_large(scope, send, ceiling)
            return
        if upload and not await run_in_threadpool(self.logged_in, _session_cookie(scope)):
            await _not_logged_in(scope, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > ceiling:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(scope, send, ceiling)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # h11 refuses such a request before it gets here


def _session_cookie(scope: Scope) -> str | None:
    """The session cookie as the routes read it (Starlette's parser: ``http.cookies.SimpleCookie`` drops the
    whole header for one cookie with a space or a non-ASCII character, set by another site on the host)."""
    header = _header(scope, b"cookie")
    return cookie_parser(header).get(SESSION_COOKIE) if header else None


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _too_large(scope: Scope, send: Send, ceiling: int) -> None:
    if scope["path"] in UPLOAD_PATHS:
        reason = f"the file is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB"
    else:
        reason = f"the request is larger than {ceiling // 1024} KB"
    await _reason(scope, send, 413, reason)


async def _not_logged_in(scope: Scope, send: Send) -> None:
    if scope["path"].startswith("/api/"):
        await _reason(scope, send, 401, "not logged in")
    else:  # as the login dependency answers a page request
        await _answer(send, 303, [(b"location", b"/login?next=/")], b"")


async def _reason(scope: Scope, send: Send, status: int, reason: str) -> None:
    if scope["path"].startswith("/api/"):
        body = json.dumps({"detail": reason}).encode()
        await _answer(send, status, [(b"content-type", b"application/json")], body)
    else:
        body = f"Refused: {reason}.".encode()
        await _answer(send, status, [(b"content-type", b"text/plain; charset=utf-8")], body)
