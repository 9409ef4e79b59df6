"""A node that fails part-way through starting leaves nothing of itself running."""

from __future__ import annotations

import multiprocessing
import socket
import threading
from pathlib import Path

import pytest

from dicom_node.app import build_node
from dicom_node.errors import ConfigurationError
from dicom_node.settings import load_settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_node_whose_console_cannot_start_stops_its_listeners_and_timers(tmp_path: Path) -> None:
    """The console starts last. When its port was taken, the DICOM listener, the listener processes, the
    pipeline and the timers kept running in a node that was exiting: a PACS's association was accepted and
    then cut off. Now the failed start stops them, and a node can start on the same database at once."""
    dicom_port = _free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        settings = load_settings(
            node={"data_dir": str(tmp_path)},
            dicom={"port": dicom_port, "bind_address": "127.0.0.1", "listener_processes": 2},
            web={"port": busy.getsockname()[1]},
        )
        before = set(threading.enumerate())
        node = build_node(settings)
        with pytest.raises(ConfigurationError, match="web console cannot bind"):
            node.start()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", dicom_port), timeout=5).close()
        assert not node.scheduler.running
        assert [child.name for child in multiprocessing.active_children()] == []
        assert [thread.name for thread in set(threading.enumerate()) - before if thread.is_alive()] == []
    again = build_node(settings)
    again.start()  # the console's port is free now; the database lock was given back
    try:
        assert again.dicom_port == dicom_port
    finally:
        again.stop()


def test_health_says_the_dicom_listener_is_down_once_it_stops_accepting(tmp_path: Path) -> None:
    """/healthz checked only that the listener had a port, which it keeps after its accepting thread has
    ended: the node answered "ok" to its supervisor while every PACS's association went unanswered."""
    settings = load_settings(node={"data_dir": str(tmp_path)},
                             dicom={"port": 0, "bind_address": "127.0.0.1"}, web={"enabled": False})
    node = build_node(settings)
    before = set(threading.enumerate())
    node.start()
    try:
        started = set(threading.enumerate()) - before
        (acceptor,) = [thread for thread in started if thread.name == "dicom-acceptor"]
        assert node.pipeline.metrics.health().checks["dicom_listener"]
        server = node.scp._server
        assert server is not None

        def broken() -> None:
            raise RuntimeError("the accepting loop broke")

        # service_actions runs once per accepting loop, outside the loop's own error handling
        server.service_actions = broken  # type: ignore[method-assign]
        acceptor.join(timeout=10)
        assert not acceptor.is_alive(), "the accepting thread did not end"
        report = node.pipeline.metrics.health()
        assert not report.checks["dicom_listener"]
        assert not report.ok
    finally:
        node.stop()
