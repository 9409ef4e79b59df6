"""Serving the console from the node's own process: uvicorn in a background thread."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI

from dicom_node.errors import ConfigurationError

LOGGER = logging.getLogger(__name__)


class WebServer:
    """Runs ``app`` on ``host:port`` (port 0 picks a free port; :attr:`port` tells which)."""

    def __init__(
        self, app: FastAPI, host: str, port: int, *, start_timeout: float = 15.0,
        trusted_proxies: Sequence[str] = (),
    ) -> None:
        self.app = app
        self.trusted_proxies = list(trusted_proxies)
        self.host = host
        self.requested_port = port
        self.start_timeout = start_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the web server is not started")
        return self._port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind, start serving and return once requests are accepted."""
        if self._thread is not None:
            raise RuntimeError("the web server is already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise ConfigurationError(  # its settings named, as the DICOM listener's are
                f"web console cannot bind {self.host}:{self.requested_port} (web.port, web.host): "
                f"{exc.strerror or type(exc).__name__}"
            ) from exc
        sock.listen(128)
        sock.set_inheritable(True)
        self._socket = sock
        self._port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the node configured logging already
            access_log=False,  # URLs can carry search terms (patient names); no access log
            # Only the proxies named in web.trusted_proxies are believed: by default uvicorn replaced the
            # peer with an X-Forwarded-For that anyone on the host could send from 127.0.0.1.
            proxy_headers=bool(self.trusted_proxies),
            forwarded_allow_ips=self.trusted_proxies or None,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="web-console", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                self._cleanup()
                raise ConfigurationError("web console failed to start (see the log)")
            if time.monotonic() > deadline:
                self.stop()
                raise ConfigurationError("web console did not start in time")
            time.sleep(0.02)
        LOGGER.info("web console listening on %s:%d", self.host, self._port)

    def stop(self) -> None:
        """Stop accepting requests, let running ones finish (bounded) and release the port."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            if self._thread.is_alive():
                LOGGER.warning("web console thread did not stop within 10 s")
        self._cleanup()

    def _cleanup(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket = None
        self._server = None
        self._thread = None
