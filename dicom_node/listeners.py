"""Extra listener processes: receiving on more than one core.

pynetdicom runs every association on threads of one process, so one interpreter lock serialises the
Python work of all of them (PDU decoding, parsing, SQL), and each association's file writes wait for the
others' Python: with four senders an instance took ~3× its one-sender time while a quarter of the machine
sat idle. With ``dicom.listener_processes`` above 1, ``N - 1`` spawned worker processes accept on the
node's own listening socket (inherited, as in a pre-fork server): whichever process is free first takes
the next association. The port stays bound exclusively by the node, so a second node started on the same
port still fails instead of silently sharing it.

A worker is a complete storage SCP — same association policy, same :class:`~dicom_node.ingest.Ingestor`,
its own database connections and file store — without TensorFlow, scheduler or console. It sends the key
of each newly stored study to the node over a queue and the node arms the settle timer exactly as for its
own associations; and, after a PACS reported by storage commitment that it does not keep some results,
the destination whose outbox should send them again. Nothing depends on those messages arriving: the
instance is committed before success, and a study whose message is lost (a worker killed between commit
and send) is RECEIVED in the database, which the settler's sweep and every start-up re-arm; the outbox's
sweep finds results due again within half a minute. Workers leave when the node process is gone (even
after ``kill -9``) and are restarted by the node if they die alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from types import FrameType
from typing import Any

from dicom_node.settings import Settings

#: A worker's message: ("study", pk) a study stored; ("resend", pk) a destination with results due again
Message = tuple[str, int]

LOGGER = logging.getLogger(__name__)

_RESTART_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)
_PARENT_CHECK_SECONDS = 0.5
_STOP_GRACE_SECONDS = 15.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ListenerWorkers:
    """Supervises the extra listener processes of one node. Built by :func:`build_listener_workers`."""

    def __init__(self, settings: Settings, count: int, on_study_stored: Callable[[int], None],
                 on_resend: Callable[[int], object] | None = None) -> None:
        self.settings = settings
        self.count = count
        self.on_study_stored = on_study_stored
        self.on_resend = on_resend
        self._context = multiprocessing.get_context("spawn")  # never fork a process that holds TensorFlow
        self._events: Queue[Message]  # made by start(): stop() closes it
        self._workers: list[SpawnProcess | None] = [None] * count
        self._failures = [0] * count
        self._socket: socket.socket | None = None
        self._stop = threading.Event()  # ends the relay and supervisor threads
        self._stopping = threading.Event()  # no more restarts
        self._spawn_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, listen_socket: socket.socket) -> None:
        """Spawn the workers on the node's listening socket."""
        self._socket = listen_socket
        self._events = self._context.Queue()
        self._stop.clear()
        self._stopping.clear()
        for index in range(self.count):
            self._spawn(index)
        self._threads = [
            threading.Thread(target=self._relay, name="listener-relay", daemon=True),
            threading.Thread(target=self._supervise, name="listener-supervisor", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        LOGGER.info("%d extra listener processes on port %d", self.count, listen_socket.getsockname()[1])

    def stop(self) -> None:
        """Ask every worker to stop (they finish open associations), then reap them.

        The supervisor thread is joined last: a worker it restarted dies with it (PR_SET_PDEATHSIG
        follows the thread that started the process), and it must not die before its graceful stop.
        """
        self._stopping.set()
        with self._spawn_lock:
            workers = [worker for worker in self._workers if worker is not None]
        for worker in workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: the worker stops its listener gracefully
        deadline = time.monotonic() + _STOP_GRACE_SECONDS
        for worker in workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                LOGGER.warning("listener process %d did not stop in time: killed", worker.pid or 0)
                worker.kill()
                worker.join(timeout=5.0)
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._drain()
        self._events.close()
        self._workers = [None] * self.count

    # ----------------------------------------------------------------------------------- internals

    def _spawn(self, index: int) -> None:
        worker = self._context.Process(
            target=run_worker,
            # The settings as data: a Settings read from a file is a class made at run time.
            args=(self.settings.model_dump(), self._socket, self._events, index),
            name=f"cxr-node-listener-{index + 1}",
            daemon=True,
        )
        worker.start()
        self._workers[index] = worker

    def _relay(self) -> None:
        """Workers' messages: "study stored" → the node's settler; "resend" → the node's outbox."""
        while not self._stop.is_set():
            try:
                message = self._events.get(timeout=0.5)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return
            self._deliver(message)

    def _drain(self) -> None:
        while True:
            try:
                self._deliver(self._events.get_nowait())
            except (queue.Empty, EOFError, OSError):
                return

    def _deliver(self, message: Message) -> None:
        kind, pk = message
        if kind == "resend":
            if self.on_resend is not None:
                self.on_resend(pk)  # outbox.wake: it only queues the work
            return
        try:
            self.on_study_stored(pk)
        except Exception as exc:  # the sweep re-arms RECEIVED studies; say why this one waits for it
            LOGGER.error("settle timer for study %d not armed from a listener process: %s", pk,
                         type(exc).__name__)

    def _supervise(self) -> None:
        """Restart a worker that died on its own, with growing pauses if it keeps dying."""
        restart_at: dict[int, float] = {}
        while not self._stop.wait(1.0):
            for index, worker in enumerate(self._workers):
                if worker is None or worker.is_alive():
                    continue
                now = time.monotonic()
                if index not in restart_at:
                    failures = self._failures[index]
                    delay = _RESTART_BACKOFF_SECONDS[min(failures, len(_RESTART_BACKOFF_SECONDS) - 1)]
                    LOGGER.error("listener process %d exited with code %s; restarting in %.0f s",
                                 worker.pid or 0, worker.exitcode, delay)
                    self._failures[index] = failures + 1
                    restart_at[index] = now + delay
                elif now >= restart_at[index]:
                    del restart_at[index]
                    with self._spawn_lock:
                        if not self._stopping.is_set():
                            self._spawn(index)


def build_listener_workers(settings: Settings, on_study_stored: Callable[[int], None],
                           on_resend: Callable[[int], object] | None = None) -> ListenerWorkers | None:
    """The extra listener processes the settings ask for (None: the node's own listener only)."""
    extra = settings.dicom.listener_count() - 1
    return ListenerWorkers(settings, extra, on_study_stored, on_resend) if extra > 0 else None


def run_worker(
    settings_data: dict[str, Any], listen_socket: socket.socket, events: Queue[Message], index: int
) -> None:
    """Entry point of a listener process (spawned: imports only what a storage SCP needs)."""
    from dicom_node.logconfig import configure_logging

    parent = multiprocessing.parent_process()
    _die_with_parent()
    if parent is not None and not parent.is_alive():
        return
    settings = Settings.model_validate(settings_data)
    configure_logging(settings.logging)
    try:
        _serve(settings, listen_socket, events, index, parent)
    except Exception as exc:  # multiprocessing would print a plain traceback, with the exception's text
        from dicom_node.logconfig import describe_uncaught

        LOGGER.critical("listener process %d ended by an uncaught %s", index + 1, describe_uncaught(exc))
        sys.exit(1)


def _serve(
    settings: Settings, listen_socket: socket.socket, events: Queue[Message], index: int,
    parent: multiprocessing.process.BaseProcess | None,
) -> None:
    from dicom_node.ingest import Ingestor, IngestResult
    from dicom_node.scp import build_scp
    from dicom_node.store.parts import open_store

    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the node stops us

    def study_stored(result: IngestResult) -> None:
        events.put(("study", result.study_pk))

    def resend(destination_pk: int) -> None:
        events.put(("resend", destination_pk))

    store = open_store(settings)
    ingestor = Ingestor(store.session_factory, store.file_store, on_stored=study_stored,
                        results_dir=settings.results_dir)
    scp = build_scp(settings.dicom, ingestor, store.session_factory, listen_socket=listen_socket,
                    outbox_settings=settings.outbox, on_resend=resend)
    scp.start()
    LOGGER.info("listener process %d serving port %d", index + 1, scp.port)
    try:
        while not stop.wait(_PARENT_CHECK_SECONDS):
            if parent is not None and not parent.is_alive():
                LOGGER.warning("listener process %d: the node process is gone; stopping", index + 1)
                break
    finally:
        scp.stop()
        store.close()
        events.close()
        if parent is not None and not parent.is_alive():
            events.cancel_join_thread()  # nobody reads any more; the sweep re-arms those studies


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when the node dies (even by ``kill -9``), so the
    inherited listening socket is released at once and a restarted node can bind its port. Elsewhere
    the worker's parent watch stops it within a second."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            LOGGER.warning("PR_SET_PDEATHSIG not set (errno %d)", ctypes.get_errno())
    except OSError as exc:
        LOGGER.warning("PR_SET_PDEATHSIG not available: %s", exc.strerror)
