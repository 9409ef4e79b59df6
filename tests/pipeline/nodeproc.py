"""The node as a real subprocess (``python -m dicom_node serve``), for interop tests and the e2e benchmark.

It has its own data directory and YAML config, listens on free loopback ports, is ready when its
``/healthz`` answers 200, and can be killed with SIGKILL and started again on the same state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy.orm import Session

from dicom_node.store.db import make_engine, make_session_factory
from tests import peers

NODE_AET = "CXRNODE"


class NodeProcess:
    def __init__(
        self,
        workdir: Path,
        *,
        model_path: Path,
        callers: list[dict[str, Any]],
        destinations: list[dict[str, Any]],
        settle_seconds: float = 1.0,
        extra: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = peers.free_port()
        self.metrics_port = peers.free_port()
        self.config_path = workdir / "node.yaml"
        self.log_path = workdir / "node.log"
        config: dict[str, dict[str, Any]] = {
            "node": {"name": "CXR AI node (test)", "data_dir": str(workdir / "data")},
            "dicom": {
                "ae_title": NODE_AET,
                "port": self.dicom_port,
                "bind_address": "127.0.0.1",
                "callers": callers,
                "destinations": destinations,
            },
            "storage": {"fsync": True},
            "pipeline": {"settle_seconds": settle_seconds, "model_path": str(model_path), "heatmap": False},
            "outbox": {"max_attempts": 8, "backoff_initial_seconds": 1.0, "backoff_max_seconds": 2.0},
            "web": {"enabled": False},
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": self.metrics_port},
            "logging": {"level": "INFO"},
        }
        for group, values in (extra or {}).items():
            config.setdefault(group, {}).update(values)
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None
        self._engine: Any = None

    @property
    def database_url(self) -> str:
        return f"sqlite:///{(self.workdir / 'data' / 'cxr-node.sqlite3').resolve()}"

    def start(self, timeout: float = 120.0) -> None:
        log = self.log_path.open("ab")
        env = dict(os.environ, TCP_NODELAY="1", CXR_NODE_CONFIG=str(self.config_path))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve"], stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"node not healthy within {timeout} s; see {self.log_path}")

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=5.0).json())

    def wait_model_ready(self, timeout: float = 180.0) -> None:
        """Until the model is loaded and warmed up (measure steady state, not start-up)."""
        if not wait_until(lambda: self.health()["checks"].get("model"), timeout, interval=0.2):
            raise RuntimeError(f"the node's model is not ready after {timeout} s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as after a power cut or the OOM killer."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
        self.process = None

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.process = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``cxr-node ARGS`` against this node's configuration, as an operator would."""
        env = dict(os.environ, CXR_NODE_CONFIG=str(self.config_path))
        return subprocess.run(
            [sys.executable, "-m", "dicom_node", *args], env=env, capture_output=True, text=True, timeout=120
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Read the node's database (the test's own connection; the node may be running)."""
        if self._engine is None:
            self._engine = make_engine(self.database_url)
        factory = make_session_factory(self._engine)
        with factory() as session, session.begin():
            yield session

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10.0).text


def wait_until(predicate: Any, timeout: float, interval: float = 0.2) -> Any:
    """Poll ``predicate()`` until it is truthy or the deadline passes; returns its last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value
