"""A node that fails part-way through starting leaves nothing of itself running."""

from __future__ import annotations

import contextlib
import multiprocessing
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.app import build_node
from dicom_node.errors import ConfigurationError
from dicom_node.settings import Settings, load_settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _console_port_taken(tmp_path: Path, dicom_port: int, *, listener_processes: int) -> Iterator[Settings]:
    """A node's settings whose console port another program holds (while the block runs)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        yield load_settings(
            node={"data_dir": str(tmp_path)},
            dicom={"port": dicom_port, "bind_address": "127.0.0.1", "listener_processes": listener_processes},
            web={"port": busy.getsockname()[1]},
            metrics={"port": 0},
        )


def test_a_node_whose_console_cannot_start_stops_its_listeners_and_timers(tmp_path: Path) -> None:
    """The console starts last. When its port was taken, the DICOM listener, the listener processes, the
    pipeline and the timers kept running in a node that was exiting: a PACS's association was accepted and
    then cut off. Now the failed start stops them, and a node can start on the same database at once."""
    dicom_port = _free_port()
    with _console_port_taken(tmp_path, dicom_port, listener_processes=2) as settings:
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


def test_a_failed_start_stops_the_dicom_listener_before_waiting_for_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parts of a failed start were stopped in reverse order, the pipeline before the listener: its
    stop waits (up to 30 s) for the model still loading, and meanwhile the DICOM listener of a node that was
    exiting accepted associations (10-20 s with the bundled model on a busy host, `make run` with the
    console's port taken). The listener stops first now."""
    loading, release = threading.Event(), threading.Event()

    def slow_model(_settings: object) -> object:
        loading.set()
        release.wait(60)
        raise RuntimeError("no model in this test")

    monkeypatch.setattr("dicom_node.pipeline.load_classifier", slow_model)
    dicom_port = _free_port()
    with _console_port_taken(tmp_path, dicom_port, listener_processes=1) as settings:
        node = build_node(settings)
        failures: list[Exception] = []

        def start() -> None:
            try:
                node.start()
            except ConfigurationError as exc:
                failures.append(exc)

        starter = threading.Thread(target=start, name="test-start")
        starter.start()
        try:
            assert loading.wait(30)
            refused = False
            deadline = time.monotonic() + 10
            while not refused and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", dicom_port), timeout=1).close()
                except ConnectionRefusedError:
                    refused = True
                except ConnectionResetError:  # queued as the socket closed: closing, not yet closed
                    time.sleep(0.1)
                else:
                    time.sleep(0.1)
            assert refused, "the DICOM listener still accepted while the node waited for its model"
        finally:
            release.set()
            starter.join(60)
    assert len(failures) == 1 and "web console cannot bind" in str(failures[0])


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
