"""Event-driven acceptor associations: pynetdicom's two reactor loops without their 1 ms polling.

pynetdicom runs two threads per association and both poll: the DUL thread sleeps 1 ms whenever it
found nothing to do and then asks ``select()`` whether the socket is readable; the association thread
sleeps 1 ms on every turn before looking for a decoded DIMSE message. That is about 2,000 wake-ups a
second per association, each one taking the interpreter lock. With four senders a listener process
spent a fifth of its samples there (py-spy) — time taken from receiving and writing instances.

Here both threads block until something happens instead:

* the DUL thread waits in ``select()`` on its socket *and* on an ``eventfd`` that the other threads
  signal when they queue a primitive for it (a C-STORE response, a release or abort) or stop it;
* the association thread waits on a :class:`threading.Event` set when a DIMSE message is complete,
  when a release/abort arrives for the service user, when the DUL thread ends, or when it is killed.

Both still wake every :data:`IDLE_WAIT` seconds, so pynetdicom's timers (ARTIM, network idle time-out)
fire as before, at worst that much later. The loops below are pynetdicom 3.0's
``DULServiceProvider.run_reactor`` and ``Association._run_reactor`` (MIT licence) with the sleeps
replaced; ``_read_pdu_data`` also decodes P-DATA in place (see there), a C-STORE data set is kept only up
to the node's limit (:class:`BoundedDataSet`), and the log lines follow the node's rule of naming an
exception's type and place, never its text. ``tests/network/test_reactor.py`` pins the
pynetdicom series they were copied from.

Requestor associations (the node's own C-ECHO and C-STORE, :func:`associate`) keep pynetdicom's polling
loop but not its pause race. ``send_c_store`` clears ``_reactor_checkpoint`` and goes on as soon as the
reactor says ``_is_paused``; pynetdicom's reactor clears that flag only *after* its ``wait()`` returned,
so a reactor thread descheduled in between still looks paused, then wakes and takes the C-STORE response
off the queue itself ("Received unexpected C-STORE service message"): the send waits the whole DIMSE
time-out and aborts. Here the reactor says it runs *before* it looks at the checkpoint
(:func:`reactor_may_run`), so it never looks paused while it can still read the queue. Nor do they lose
a rejection to pynetdicom's connection check (:func:`_take_unread_rejection`).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from copy import deepcopy
from datetime import datetime
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR, MODE_REQUESTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE, N_ACTION, N_EVENT_REPORT
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass, VerificationServiceClass
from pynetdicom.service_class_n import StorageCommitmentServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AddressInformation, AssociationSocket, RequestHandler

from dicom_node.errors import describe_exception
from dicom_node.statuses import Status

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

LOGGER = logging.getLogger(__name__)

IDLE_WAIT = 0.05
"""Longest a reactor sleeps without an event (seconds): bounds how late a time-out is noticed."""

PYNETDICOM_SERIES = "3.0."
"""The pynetdicom release series whose reactor loops this module mirrors."""

PDU_STARTED = "_cxr_pdu_started"
"""Attribute of an acceptor's ``AssociationSocket``: when the first byte of the PDU being read arrived
(monotonic time; None between PDUs). :func:`dicom_node.scp.limit_silence` bounds the whole PDU from it."""

PDU_SECONDS = "_cxr_pdu_seconds"
"""Attribute of an acceptor's ``AssociationSocket``: how long one whole PDU may take from its first byte
(seconds, or None: no such bound), set by :func:`dicom_node.scp.limit_silence`."""

_CUT_SHORT = "_cxr_cut_short"  # set on an Association whose connection _log_cut_short reported

MAX_CONTROL_PDU_BYTES = 1 << 20
"""Longest PDU other than P-DATA-TF the listener reads (bytes). An association request of 128 presentation
contexts, each with 30 transfer syntaxes, is about 300 KB; the others are a few bytes."""

MAX_COMMAND_SET_BYTES = 1 << 20
"""Longest DIMSE command set the listener keeps (bytes); real ones are well under a kilobyte."""


class _Wakeup:
    """A Linux ``eventfd`` that ``select()`` can wait on beside a socket; set from any thread.

    ``set``, ``clear`` and ``close`` share a lock: a late ``set`` or ``clear`` must never write to or
    read from a descriptor number that the process has meanwhile reused for something else (a file
    being stored, say).
    """

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._fd

    def set(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    def clear(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            try:
                os.eventfd_read(self._fd)
            except BlockingIOError:  # nothing was signalled
                pass

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class _SignallingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``notify`` after every ``put``."""

    def __init__(self, notify: Any) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _SignallingEvent(threading.Event):
    """``Association._reactor_checkpoint``: clearing it (a pause request) must wake the reactor."""

    def __init__(self, notify: Any) -> None:
        super().__init__()
        self._notify = notify

    def clear(self) -> None:
        super().clear()
        self._notify()


class EventDrivenDUL(DULServiceProvider):
    """The DICOM upper layer of one acceptor association, sleeping in ``select()`` when idle."""

    def __init__(self, assoc: Association, activity: threading.Event) -> None:
        self._wakeup = _Wakeup()
        self._stopping = False
        self._input_refused = False  # a PDU header was refused: nothing more is read (_refuse_input)
        self._user_woken = False  # _wake_a_user_waiting_for_nothing has woken the association thread
        super().__init__(assoc)
        self._activity = activity
        self.to_provider_queue = _SignallingQueue(self._wakeup.set)
        self.to_user_queue = _SignallingQueue(activity.set)

    # pynetdicom sets this flag from other threads (stop_dul, kill_dul) to end the loop: wake it.
    @property
    def _kill_thread(self) -> bool:
        return self._stopping

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self._stopping = value
        if value:
            self._wakeup.set()

    def _wait_for_activity(self) -> None:
        assoc_socket = self.socket
        watched: list[Any] = [self._wakeup]
        if assoc_socket is not None and assoc_socket.socket is not None and assoc_socket._is_connected:
            sock = assoc_socket.socket
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes already buffered: select() would not report them
            watched.append(sock)
        try:
            select.select(watched, [], [], IDLE_WAIT)
        except (OSError, ValueError):  # the socket was closed under us: the next turn finds out
            pass
        self._wakeup.clear()

    def _refuse_input(self) -> None:
        """Abort the association (Evt19) over a PDU whose header is refused, and read nothing more: what
        follows is that PDU's body, which read as PDU headers gave thousands of errors and as many
        A-ABORTs (an 8 MiB body: 15,257 lines)."""
        self._input_refused = True
        self.event_queue.put("Evt19")

    def _read_pdu_data(self) -> None:
        # Called once select() found the socket readable: the PDU's first byte is here. Its time starts
        # now, and the socket's reads bound the whole PDU by it (PDU_STARTED).
        if self._input_refused:
            if self.state_machine.current_state == "Sta13":  # the A-ABORT is sent: close (Evt17)
                cast(AssociationSocket, self.socket).close()
            return
        sock = cast(AssociationSocket, self.socket)
        setattr(sock, PDU_STARTED, time.monotonic())
        try:
            self._read_pdu()
        finally:
            setattr(sock, PDU_STARTED, None)

    def _read_pdu(self) -> None:
        # pynetdicom 3.0 DULServiceProvider._read_pdu_data, except that a P-DATA-TF PDU is decoded in
        # place: its PDV items are views into the one buffer the PDU was received into. pynetdicom
        # copies a received radiograph three more times on this path (header + body, bytes() for
        # EVT_DATA_RECV, a slice per PDV item) before the DIMSE layer copies it into the data set.
        sock = cast(AssociationSocket, self.socket)
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError) as exc:
            _log_cut_short(exc, self.assoc)
            self.event_queue.put("Evt17")
            return
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            LOGGER.error("unknown PDU type 0x%02X received", pdu_type)
            self._refuse_input()
            return
        longest = self._longest_pdu(pdu_type)
        if pdu_length > longest:
            # read before the association is even accepted: an A-ASSOCIATE-RQ announcing 4 GB had the
            # node hold what arrived of it, up to the ACSE time-out (review)
            LOGGER.error("PDU of type 0x%02X announcing %d bytes, over the %d this listener reads: aborted",
                         pdu_type, pdu_length, longest)
            self._refuse_input()
            return
        try:
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            _log_cut_short(exc, self.assoc)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:  # the peer closed the connection: killed, powered off, unplugged
            _log_cut_short(EOFError(f"connection closed after {6 + len(body)} of {6 + pdu_length} bytes"),
                           self.assoc)
            self.event_queue.put("Evt17")
            return
        try:
            if pdu_type == 0x04 and not self.assoc.get_handlers(evt.EVT_DATA_RECV):
                pdu: Any = decode_p_data_tf(body)
                evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
                event = "Evt10"
            else:
                pdu, event = self._decode_pdu(bytearray(header) + body)
            self.event_queue.put(event)
        except Exception as exc:  # Evt19: the state machine aborts the association
            LOGGER.error("undecodable PDU received: %s", describe_exception(exc))
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def _longest_pdu(self, pdu_type: int) -> int:
        """The longest PDU of ``pdu_type`` this listener reads: a P-DATA-TF within the Maximum Length it
        offered (PS3.8 D.1; its variable field is the PDU length), or when it offered none (0) within
        the largest C-STORE data set it keeps and a command; any other PDU within
        :data:`MAX_CONTROL_PDU_BYTES`."""
        if pdu_type != 0x04:
            return MAX_CONTROL_PDU_BYTES
        offered = int(self.assoc.acceptor.maximum_length or 0)
        if offered:
            return offered
        data_set: int | None = getattr(self.assoc, "max_data_set_bytes", None)
        return 0xFFFFFFFF if data_set is None else data_set + MAX_COMMAND_SET_BYTES

    def run_reactor(self) -> None:
        try:
            self._run()
        finally:
            self._activity.set()  # the association thread checks dul.is_alive()
            self._wakeup.close()

    def _run(self) -> None:
        # pynetdicom 3.0 DULServiceProvider.run_reactor; time.sleep(_run_loop_delay) -> _wait_for_activity()
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                self._wait_for_activity()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # pynetdicom's own policy: log, abort, end both threads
                LOGGER.error(
                    "upper layer failed, aborting the association: %s", describe_exception(exc, stack=True)
                )
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            sleep = False
            self._wake_a_user_waiting_for_nothing()

    def _wake_a_user_waiting_for_nothing(self) -> None:
        """Once the connection has ended (Sta1) before an association request was handed up, wake the
        association thread with None, pynetdicom's 'no request in time'. It waited out the ACSE time-out
        (30 s), counted among the listener's associations: a connection opened and closed, or aborted
        for a refused PDU, every 2 s kept all 16 slots taken, and every modality was rejected (review)."""
        if (
            not self._user_woken
            and self.state_machine.current_state == "Sta1"
            and self.assoc.requestor.primitive is None
        ):
            self._user_woken = True
            cast("queue.Queue[Any]", self.to_user_queue).put(None)  # receive_pdu answers None on time-out


def _log_cut_short(exc: BaseException, assoc: Association) -> None:
    """A PDU not received whole. A peer silent past the time-out (gone without closing), too slow with one
    (trickling an association request or a P-DATA-TF) or gone in its middle (the connection closed or reset:
    ``EOFError`` stands for a close) is routine trouble of the network: a WARNING, not an ERROR to alert
    on. It names the peer, whose calling AE title and address are configuration, never patient data, so
    that the operator finds the modality or link at fault."""
    setattr(assoc, _CUT_SHORT, True)
    title = assoc.requestor.ae_title.strip()
    peer = f"calling AE {title!r} at {assoc.requestor.address}" if title else str(assoc.requestor.address)
    if isinstance(exc, TimeoutError):
        LOGGER.warning("%s too slow in the middle of a PDU (%s); connection closed", peer, exc)
    elif isinstance(exc, EOFError | ConnectionError | ssl.SSLEOFError):
        # closed or reset by the peer mid-PDU (a sender killed or powered off, a link lost): as routine as
        # the above; it was an ERROR, and one closed did not even say which peer it was (review)
        LOGGER.warning("%s cut off in the middle of a PDU (%s); association ended", peer,
                       exc if isinstance(exc, EOFError) else type(exc).__name__)
    else:
        LOGGER.error("connection from %s closed before the entire PDU was received: %s", peer,
                     describe_exception(exc))


def decode_p_data_tf(body: bytes | bytearray) -> P_DATA_TF:
    """A P-DATA-TF PDU from its body (after the 6-byte header), its PDV values as views into ``body``.

    Raises ``ValueError`` for an item that is too short or overruns the PDU (pynetdicom asserts).
    """
    pdu = P_DATA_TF()
    view = memoryview(body)
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 6:
            raise ValueError("truncated presentation data value item")
        item_length = int.from_bytes(view[offset : offset + 4], "big")
        if item_length < 2 or offset + 4 + item_length > end:
            raise ValueError("presentation data value item length does not fit the PDU")
        item = PresentationDataValueItem()
        item.presentation_context_id = view[offset + 4]
        item.presentation_data_value = view[offset + 5 : offset + 4 + item_length]  # type: ignore[assignment]
        pdu.presentation_data_value_items.append(item)
        offset += 4 + item_length
    return pdu


class BoundedDataSet(BytesIO):
    """The data set of a DIMSE message as its P-DATA fragments arrive; a C-STORE request's is kept up to
    ``limit`` bytes only.

    pynetdicom writes every fragment of a message's data set into one ``BytesIO`` until the last has come,
    however many there are: a 1.8 GB C-STORE held 1.8 GB before the node saw a byte of it, twice that while
    it was stored, and ended in a MemoryError. Past ``limit`` this one lets go of what it holds and only
    counts the rest (``received``), so that the C-STORE handler refuses the request with a status once it
    is complete (:attr:`over_limit`); the association goes on. The data set of any other message (a storage
    commitment report) is not cut short, which could make it read as a shorter valid one: past the limit
    its association is aborted (:class:`BoundedDIMSE`, :attr:`aborted`).
    """

    def __init__(self, message: DIMSEMessage, limit: int) -> None:
        super().__init__()
        self._message = weakref.ref(message)  # its class is known (C_STORE_RQ) once its command set is in
        self.limit = limit
        self.received = 0
        self.over_limit = False  # a C-STORE request's: refused with a status once complete
        self.aborted = False  # any other message's: its association is aborted (BoundedDIMSE)

    def write(self, buffer: ReadableBuffer, /) -> int:
        size = memoryview(buffer).nbytes
        self.received += size
        if self.over_limit:
            return size
        if self.received > self.limit and isinstance(self._message(), C_STORE_RQ):
            self.over_limit = True
            self.seek(0)
            self.truncate()  # gives the memory back (BytesIO shrinks its buffer)
            return size
        return super().write(buffer)


class BoundedDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, each incoming message's data set a :class:`BoundedDataSet`."""

    def __init__(self, assoc: Association, max_data_set_bytes: int) -> None:
        super().__init__(assoc)
        self.max_data_set_bytes = max_data_set_bytes

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:  # pynetdicom's own would make the same, with an unbounded BytesIO
            self.message = DIMSEMessage()
            self.message.data_set = BoundedDataSet(self.message, self.max_data_set_bytes)
        message = self.message
        data_set = message.data_set
        if not isinstance(data_set, BoundedDataSet):
            super().receive_primitive(primitive)
            return
        if data_set.aborted:
            return  # the association is being aborted: nothing more of this message is kept
        refused = self._refusal(message, data_set, primitive)
        if refused is not None:
            self._abort(data_set, *refused)
            return
        super().receive_primitive(primitive)
        unfinished = self.message is message
        if unfinished and not isinstance(message, C_STORE_RQ) and data_set.received > data_set.limit:
            # its command set ended in this primitive, beside data past the limit (review: a C-STORE
            # packed so was aborted as if its class were unknown); a complete message went on, whole
            self._abort(data_set, f"{type(message).__name__} data set", data_set.received, data_set.limit)

    def _refusal(
        self, message: DIMSEMessage, data_set: BoundedDataSet, primitive: P_DATA
    ) -> tuple[str, int, int] | None:
        """Why ``primitive`` is not taken in: it takes the command set past :data:`MAX_COMMAND_SET_BYTES`,
        or the data set of a message that is not a C-STORE request past the limit; None when it is taken.
        Such a data set (a storage commitment report, or one sent before its command) cannot be refused
        with a status as a C-STORE's is, nor cut short: the shorter one could read as a valid report. A
        primitive that ends the command set decides the message's class: its data are checked after it."""
        commands = data = 0
        ends_command = False
        for _, fragment in primitive.presentation_data_value_list:
            if fragment[0] & 1:
                commands += len(fragment) - 1
                ends_command = ends_command or bool(fragment[0] & 2)
            else:
                data += len(fragment) - 1
        with message.encoded_command_set.getbuffer() as kept:  # a view, released at once
            command_set = kept.nbytes + commands
        if command_set > MAX_COMMAND_SET_BYTES:
            return "command set", command_set, MAX_COMMAND_SET_BYTES
        if isinstance(message, C_STORE_RQ) or ends_command or data_set.received + data <= data_set.limit:
            return None
        return f"{type(message).__name__} data set", data_set.received + data, data_set.limit

    def _abort(self, data_set: BoundedDataSet, what: str, size: int, limit: int) -> None:
        """Let go of the message's data set and abort the association (Evt19), with one ERROR."""
        data_set.aborted = True
        data_set.seek(0)
        data_set.truncate()
        LOGGER.error("a %s of %d bytes or more, over the %d this listener keeps: association aborted", what,
                     size, limit)
        self.dul.event_queue.put("Evt19")


class EventDrivenAssociation(Association):
    """An acceptor association whose reactor waits for events instead of polling every millisecond.
    ``max_data_set_bytes``: the largest C-STORE data set it keeps (:class:`BoundedDataSet`); None: any."""

    def __init__(self, ae: Any, mode: str, max_data_set_bytes: int | None = None) -> None:
        super().__init__(ae, mode)
        self.max_data_set_bytes = max_data_set_bytes
        if max_data_set_bytes is not None:
            self.dimse = BoundedDIMSE(self, max_data_set_bytes)
        self._activity = threading.Event()
        self.dul = EventDrivenDUL(self, self._activity)
        # Association.__init__ put the AE's time-outs on the DUL it made: give them to this one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout
        self.dimse.msg_queue = _SignallingQueue(self._activity.set)
        self._reactor_checkpoint = _SignallingEvent(self._activity.set)
        self._reactor_checkpoint.set()

    def kill(self) -> None:
        self._activity.set()
        super().kill()

    def _run_reactor(self) -> None:
        # pynetdicom 3.0 Association._run_reactor; time.sleep(0.001) -> wait for an event
        self._is_paused = False
        served = False
        while not self._kill:
            if not served:
                self._activity.wait(IDLE_WAIT)
            self._activity.clear()
            if not reactor_may_run(self):
                served = True  # after a pause: look again at once
                continue

            context_id, msg = self.dimse.get_msg(block=False)
            served = msg is not None
            if msg and not _refused_on_its_context(self, msg, cast(int, context_id)):
                self._serve_request(msg, cast(int, context_id))

            if _after_message(self):
                return


#: The requests served on each kind of presentation context the listener accepts, and how a log line names
#: it; any other request there is refused (:func:`_refused_on_its_context`).
_SERVED: tuple[tuple[type[ServiceClass], tuple[type[Any], ...], str], ...] = (
    (StorageServiceClass, (C_STORE,), "storage"),
    (VerificationServiceClass, (C_ECHO,), "Verification"),
    (StorageCommitmentServiceClass, (N_EVENT_REPORT, N_ACTION), "Storage Commitment"),
)


def _refused_on_its_context(assoc: Association, msg: Any, context_id: int) -> bool:
    """A request its presentation context is not for: refused with a WARNING, and True. pynetdicom hands a
    request to the service class its own SOP class names, whatever the context: a C-STORE naming
    Verification was answered with a C-ECHO success, which its sender read as "stored" (nothing was); one
    naming Storage Commitment, a query or an unknown class, or a C-FIND on a storage context, was an ERROR
    with a traceback in the node's log and an abort without a word (review). A C-STORE is answered with a
    failure status and the association goes on (:func:`_refuse_c_store`); any other request is aborted."""
    context = assoc._accepted_cx.get(context_id)
    if context is None or not msg.is_valid_request:
        return False  # pynetdicom's own answers: an unknown context or a response it did not expect
    if isinstance(msg, C_STORE):
        if issubclass(uid_to_service_class(str(msg.AffectedSOPClassUID)), StorageServiceClass):
            return False  # the C-STORE handler checks the class against the context's (0xA900)
        _refuse_c_store(assoc, msg, context_id, str(context.abstract_syntax))
        return True
    service = uid_to_service_class(str(context.abstract_syntax))
    for service_class, requests, kind in _SERVED:
        if issubclass(service, service_class):
            if isinstance(msg, requests):
                return False
            LOGGER.warning("%s request from %s on a %s presentation context refused: association aborted",
                           type(msg).__name__.replace("_", "-"), str(assoc.requestor.ae_title).strip(), kind)
            assoc.abort()
            return True
    return False


def _refuse_c_store(assoc: Association, msg: C_STORE, context_id: int, abstract_syntax: str) -> None:
    """Answer a C-STORE naming a class that is not a storage SOP class: 0xA900 when it is not its context's
    either (as the C-STORE handler answers such a request), else 0x0122; nothing is stored."""
    named = str(msg.AffectedSOPClassUID)
    status = Status.SOP_CLASS_NOT_SUPPORTED
    if named != abstract_syntax:
        status = Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    comment = "Affected SOP Class UID is not a storage SOP class"
    LOGGER.warning("C-STORE from %s refused with %s (0x%04X): %s (%s)", str(assoc.requestor.ae_title).strip(),
                   status.name, int(status), comment, named[:64])
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg.MessageID
    rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
    rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
    rsp.Status = int(status)
    rsp.ErrorComment = comment  # type: ignore[assignment]  # typed None in pynetdicom
    assoc.dimse.send_msg(rsp, context_id)


def reactor_may_run(assoc: Association) -> bool:
    """The reactor's pause point: True when it may read the DIMSE queue now; False after a pause (look
    again). It says it runs *before* it looks at the checkpoint, so a sender that cleared the checkpoint
    and then sees ``_is_paused`` knows the reactor will not touch the queue until the checkpoint is set."""
    assoc._is_paused = False
    if assoc._reactor_checkpoint.is_set():
        return True
    assoc._is_paused = True
    assoc._reactor_checkpoint.wait()
    return False


def _after_message(assoc: Association) -> bool:
    """The rest of pynetdicom 3.0's reactor turn: release, abort, DUL gone, network time-out; True when
    the association has ended."""
    if assoc.is_established and assoc.acse.is_release_requested():
        assoc.acse.send_release(is_response=True)
        LOGGER.info("Association Released")
        assoc.is_released = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_RELEASED, {})
        assoc.kill()
        return True

    if assoc.acse.is_aborted():
        log_msg = "Association Aborted"
        if assoc.acse.is_aborted("a-p-abort"):
            log_msg += " (A-P-ABORT)"
        LOGGER.info(log_msg)
        assoc.dul.receive_pdu(wait=False)
        assoc.is_aborted = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_ABORTED, {})
        assoc.kill()
        return True

    if not assoc.dul.is_alive():
        assoc.kill()
        return True

    if assoc.dul.idle_timer_expired():
        sock = assoc.dul.socket
        reading = sock is not None and getattr(sock, PDU_STARTED, None) is not None
        if reading and getattr(sock, PDU_SECONDS, None):
            # A PDU is arriving, whose read is bounded from its first byte (which came after the last whole
            # PDU, where the idle timer started): that bound ends it soon, and says so once. Ending it here
            # too raced that read, and a trickling peer got two WARNING lines.
            return False
        # A peer idle past the time-out: routine trouble of the network, as in _log_cut_short, not an
        # ERROR to alert on. One cut off in the middle of a PDU was reported there already.
        level = logging.INFO if getattr(assoc, _CUT_SHORT, False) else logging.WARNING
        LOGGER.log(level, "network time-out reached (%s s without a whole PDU); association ended",
                   assoc.network_timeout)
        if assoc.network_timeout_response == "A-RELEASE":
            assoc._is_paused = True
            assoc._reactor_checkpoint.wait()
            assoc.release()
            assoc._is_paused = False
        else:
            assoc.abort()

        assoc.kill()
        return True
    return False


class RequestorAssociation(Association):
    """A requestor association whose reactor pauses without pynetdicom's race (see the module docstring)."""

    def _run_reactor(self) -> None:
        # pynetdicom 3.0 Association._run_reactor with the pause point of reactor_may_run
        self._is_paused = False
        while not self._kill:
            time.sleep(0.001)
            if not reactor_may_run(self):
                continue
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if _after_message(self):
                return


def associate(
    ae: AE,
    host: str,
    port: int,
    called_aet: str,
    contexts: list[PresentationContext],
    *,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
    evt_handlers: list[Any] | None = None,
) -> Association:
    """``ae.associate(host, port, contexts, called_aet, ...)`` with a :class:`RequestorAssociation`.

    pynetdicom 3.0 ``AE.associate`` without the argument checks (the node's own calls) and without a
    bind address or extended negotiation, which the node does not use. Like it, returns the association
    whether or not it was established; its thread runs only if it was."""
    remote = AddressInformation.from_addr_port(host, port)
    local = AddressInformation.from_tuple(("::0", 0) if remote.address_family == socket.AF_INET6 else ("", 0))
    assoc = RequestorAssociation(ae, MODE_REQUESTOR)
    assoc.name = f"RequestorThread@{datetime.strftime(datetime.now(), '%Y%m%d%H%M%S')}"
    assoc.set_socket(ae._create_socket(assoc, local, tls_args))
    assoc.acceptor.ae_title = called_aet
    assoc.acceptor.address_info = remote
    assoc.requestor.address_info = local
    assoc.requestor.ae_title = ae.ae_title
    assoc.requestor.maximum_length = ae.maximum_pdu_size
    assoc.requestor.implementation_class_uid = ae.implementation_class_uid
    assoc.requestor.implementation_version_name = ae.implementation_version_name
    ae._validate_requested_contexts(contexts)
    requested = deepcopy(contexts)
    for index, context in enumerate(requested):
        context.context_id = 2 * index + 1
    assoc.requestor.requested_contexts = requested
    for handler in evt_handlers or []:
        assoc.bind(*handler)
    assoc.request()
    if assoc.is_established:
        assoc.start()
    elif not assoc.is_rejected:
        _take_unread_rejection(assoc)
    return assoc


def _take_unread_rejection(assoc: Association) -> None:
    """Make ``assoc`` rejected if its peer's A-ASSOCIATE-RJ is still unread on the DUL's queue.

    pynetdicom 3.0's requestor sends its request, then checks that the socket is still connected before
    it reads the answer. A peer that rejects at once closes the connection after its A-ASSOCIATE-RJ,
    and the DUL thread closes the socket as soon as it has queued the rejection (PS3.8 action AE-4). A
    requestor thread descheduled that long finds the socket closed, aborts, and never reads the answer:
    a wrong called AE title read "aborted or timed out" (one echo in seven to DCMTK's dcmqrscp on a
    loaded machine), in the console's echo test and in a delivery's reason, where the peer had said why."""
    answer = assoc.dul.receive_pdu(wait=False)
    if isinstance(answer, A_ASSOCIATE) and answer.result in (0x01, 0x02):
        assoc.acceptor.primitive = answer
        assoc.is_aborted = False
        assoc.is_rejected = True


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's connection handler, creating :class:`EventDrivenAssociation` acceptors, which keep at
    most ``max_data_set_bytes`` of a C-STORE data set (a subclass sets it; None: no bound)."""

    max_data_set_bytes: int | None = None

    def _create_association(self) -> Association:
        # pynetdicom 3.0 RequestHandler._create_association with the association class swapped
        assoc = EventDrivenAssociation(self.ae, MODE_ACCEPTOR, self.max_data_set_bytes)
        assoc._server = self.server

        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"

        sock = AssociationSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)

        assoc.requestor.address_info = self.remote

        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    handler = cast(evt._HandlerBase, handler)
                    assoc.bind(event, handler[0], handler[1])

        return assoc


__all__ = [
    "IDLE_WAIT",
    "PDU_SECONDS",
    "PDU_STARTED",
    "PYNETDICOM_SERIES",
    "BoundedDIMSE",
    "BoundedDataSet",
    "EventDrivenAssociation",
    "EventDrivenDUL",
    "EventDrivenRequestHandler",
    "RequestorAssociation",
    "associate",
    "reactor_may_run",
    "decode_p_data_tf",
]
