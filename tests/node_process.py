"""Run the node as a subprocess exactly as the README does: the ``cxr-node`` console script next to the
interpreter, configured through ``CXR_NODE__*`` environment overrides. Used by interop tests and benchmarks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

READY_MARKER = "listening: AE title"
NODE_AET = "CXRNODE"


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


def run_cli(args: list[str], env: Mapping[str, str], *, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``cxr-node <args>`` with the node's environment (e.g. ``ae add``)."""
    result = subprocess.run([cxr_node_executable(), *args], env=dict(env), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"cxr-node {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


@dataclass
class NodeProcess:
    """A running ``cxr-node serve``; its stdout and stderr go to ``log_path``."""

    data_dir: Path
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log_offset: int = field(default=0)

    @property
    def database_url(self) -> str:
        return self.env.get("CXR_NODE__DATABASE__URL") or f"sqlite:///{self.data_dir / 'cxr-node.sqlite3'}"

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "instances"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, *, timeout: float = 60.0) -> NodeProcess:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([cxr_node_executable(), "serve"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_MARKER in self.log_text()[self._log_offset:]:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"cxr-node exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"cxr-node not ready after {timeout}s:\n{self.log_text()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful stop), then wait."""
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
        """SIGKILL: what a crash or power loss looks like to the node."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


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
    env = node_env(data_dir, port, settle_seconds=settle_seconds, web=web, extra=extra_env)
    for aet in callers:
        run_cli(["ae", "add", "--role", "caller", "--aet", aet], env)
    node = NodeProcess(data_dir=data_dir, port=port, env=env, log_path=data_dir / "node.log")
    return node.start(timeout=timeout)
