"""Run the node as a subprocess exactly as the README does: the ``cxr-node`` console script next to the
interpreter, configured by a YAML file (``$CXR_NODE_CONFIG``) and/or ``CXR_NODE__*`` environment overrides.

The one helper for interop tests, e2e tests and benchmarks: the node has its own data directory and free
loopback ports, is ready when it logs that it listens (and, with metrics on, when ``/healthz`` answers 200),
stops with SIGTERM or dies with SIGKILL, and starts again on the same state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from dicom_node.store.db import make_engine, make_session_factory
from tests import peers

READY_MARKER = "listening: AE title"
NODE_AET = "CXRNODE"

T = TypeVar("T")


def cxr_node_executable() -> str:
    """The console script installed beside the running interpreter (what `make run` calls)."""
    candidate = Path(sys.executable).parent / "cxr-node"
    if not candidate.is_file():
        raise FileNotFoundError(f"cxr-node console script not found next to {sys.executable}")
    return str(candidate)


def node_env(
    data_dir: Path,
    port: int,
    *,
    settle_seconds: float = 2.0,
    web: bool = False,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for one node: its own data directory and port; console off unless asked for."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_NODE")}
    env.update(
        {
            "CXR_NODE__DICOM__PORT": str(port),
            "CXR_NODE__NODE__DATA_DIR": str(data_dir),
            "CXR_NODE__PIPELINE__SETTLE_SECONDS": str(settle_seconds),
            "CXR_NODE__WEB__ENABLED": "true" if web else "false",
            "CXR_NODE__DICOM__BIND_ADDRESS": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def run_cli(args: list[str], env: Mapping[str, str], *, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cxr-node <args>`` with the node's environment (e.g. ``ae add``), as an operator would."""
    result = subprocess.run([cxr_node_executable(), *args], env=dict(env), capture_output=True, text=True,
                            timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"cxr-node {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.2) -> T:
    """Poll ``predicate()`` until it is truthy or the deadline passes; returns its last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


@dataclass
class NodeProcess:
    """A ``cxr-node serve`` subprocess; its stdout and stderr go to ``log_path``."""

    data_dir: Path
    port: int
    env: dict[str, str]
    log_path: Path
    metrics_port: int | None = None
    web_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log_offset: int = field(default=0)
    _engine: Engine | None = None

    @property
    def dicom_port(self) -> int:
        return self.port

    @property
    def web_url(self) -> str:
        if self.web_port is None:
            raise RuntimeError("this node runs without its console")
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def database_url(self) -> str:
        return self.env.get("CXR_NODE__DATABASE__URL") or f"sqlite:///{self.data_dir / 'cxr-node.sqlite3'}"

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "instances"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, *, timeout: float = 120.0) -> NodeProcess:
        """Start and wait until the listener is up (and ``/healthz`` answers 200 when metrics are on)."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([cxr_node_executable(), "serve"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_MARKER in self.log_text()[self._log_offset:] and self._healthy():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"cxr-node exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"cxr-node not ready after {timeout}s:\n{self.log_text()[-3000:]}")

    def _healthy(self) -> bool:
        if self.metrics_port is None:
            return True
        try:
            return httpx.get(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=5.0).json())

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10.0).text

    def wait_model_ready(self, timeout: float = 180.0) -> None:
        """Until the model is loaded and warmed up (measure steady state, not start-up). A /healthz that
        does not answer in time counts as not ready yet: loading TensorFlow can hold the node's
        interpreter for seconds (one benchmark run here timed out a 5 s read and stopped)."""

        def ready() -> bool:
            try:
                return bool(self.health()["checks"].get("model"))
            except httpx.HTTPError:
                return False

        if not wait_until(ready, timeout, interval=0.2):
            raise RuntimeError(f"the node's model is not ready after {timeout} s; see {self.log_path}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful stop), then wait."""
        self._dispose()
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as after a power cut or the OOM killer."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def cli(self, *args: str, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``cxr-node ARGS`` against this node's configuration; the caller checks the outcome."""
        return run_cli(list(args), self.env, check=False, timeout=timeout, input=input)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Read the node's database (the test's own connection; the node may be running)."""
        if self._engine is None:
            self._engine = make_engine(self.database_url)
        factory = make_session_factory(self._engine)
        with factory() as session, session.begin():
            yield session

    def _dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def start_node(
    data_dir: Path,
    port: int,
    *,
    settle_seconds: float = 2.0,
    callers: tuple[str, ...] = (),
    web: bool = False,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> NodeProcess:
    """Add ``callers`` with the CLI, then start ``cxr-node serve`` and wait for its start-up line."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # Health and metrics on a port of its own, so several nodes can run side by side.
    metrics_port = peers.free_port()
    metrics_env = {"CXR_NODE__METRICS__ENABLED": "true", "CXR_NODE__METRICS__HOST": "127.0.0.1",
                   "CXR_NODE__METRICS__PORT": str(metrics_port)}
    env = node_env(data_dir, port, settle_seconds=settle_seconds, web=web, extra={**metrics_env, **(extra_env or {})})
    if callers:
        run_cli(["db", "upgrade"], env)  # administration commands add to an existing database only
    for aet in callers:
        run_cli(["ae", "add", "--role", "caller", "--aet", aet], env)
    node = NodeProcess(data_dir=data_dir, port=port, env=env, log_path=data_dir / "node.log",
                       metrics_port=metrics_port)
    return node.start(timeout=timeout)


def configured_node(
    workdir: Path,
    *,
    model_path: Path,
    callers: list[dict[str, Any]],
    destinations: list[dict[str, Any]],
    settle_seconds: float = 1.0,
    extra: dict[str, dict[str, Any]] | None = None,
) -> NodeProcess:
    """A node (not started) configured by ``workdir/node.yaml``, as in a hospital: AEs, model, outbox,
    metrics on a free port (readiness is ``/healthz``); console on a free port when ``extra`` enables it."""
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    port = peers.free_port()
    metrics_port = peers.free_port()
    config: dict[str, dict[str, Any]] = {
        "node": {"name": "CXR AI node (test)", "data_dir": str(data_dir)},
        "dicom": {
            "ae_title": NODE_AET,
            "port": port,
            "bind_address": "127.0.0.1",
            "callers": callers,
            "destinations": destinations,
        },
        "storage": {"fsync": True},
        "pipeline": {"settle_seconds": settle_seconds, "model_path": str(model_path), "heatmap": False},
        "outbox": {"max_attempts": 8, "backoff_initial_seconds": 1.0, "backoff_max_seconds": 2.0},
        "web": {"enabled": False},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
        "logging": {"level": "INFO"},
    }
    for group, values in (extra or {}).items():
        config.setdefault(group, {}).update(values)
    config_path = workdir / "node.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_NODE")}
    env.update({"CXR_NODE_CONFIG": str(config_path), "PYTHONUNBUFFERED": "1"})
    web = config["web"]
    return NodeProcess(
        data_dir=data_dir,
        port=port,
        env=env,
        log_path=workdir / "node.log",
        metrics_port=metrics_port,
        web_port=int(web["port"]) if web.get("enabled") else None,
    )
