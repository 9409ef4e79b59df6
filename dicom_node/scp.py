"""Storage SCP + Verification SCP (pynetdicom), and the storage commitment reports of result destinations.

Association policy: the called AE title must be ours and the calling AE title must be an enabled caller in
the database (bound to the peer's address when a host is configured) — otherwise the association is
rejected before any data flows. A result destination set to storage commitment may also associate, to
report which results it keeps (N-EVENT-REPORT, :mod:`dicom_node.commitment`); unless it is an allowed
caller too, it may not store. Each C-STORE handler has one ``try`` mapping :class:`NodeError` to its
named status; anything unexpected is logged by type and location only (exception texts from pydicom may
quote dataset values) and answered with a failure, so the listener keeps serving.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import ssl
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import Any, cast

from pydicom import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import aes, outbox
from dicom_node.allocator import tune_for_large_buffers
from dicom_node.errors import (
    ConfigurationError,
    DatasetTooLargeError,
    InvalidDatasetError,
    NodeError,
    describe_exception,
)
from dicom_node.ingest import Ingestor
from dicom_node.part10 import decodable_transfer_syntaxes
from dicom_node.reactor import PDU_SECONDS, PDU_STARTED, BoundedDataSet, EventDrivenRequestHandler
from dicom_node.settings import DicomSettings, OutboxSettings
from dicom_node.sop_classes import IMAGE_SOP_CLASSES, NON_IMAGE_SOP_CLASSES, NON_IMAGE_TRANSFER_SYNTAXES
from dicom_node.statuses import Status
from dicom_node.store.db import make_read_only_session_factory
from dicom_node.tls import handshake_failure, server_context

LOGGER = logging.getLogger(__name__)

_HANDSHAKE_TIMEOUT = 30.0  # seconds, when no ACSE timeout is configured

# A-ASSOCIATE-RJ (result, source, reason) — PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECT_TRANSIENT = (0x02, 0x01, 0x01)  # transient, service user, no reason given
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded


def set_nodelay(sock: socket.socket | ssl.SSLSocket | None) -> None:
    """Disable Nagle's algorithm: DIMSE is request/response and Nagle adds ~40-90 ms per message."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        LOGGER.debug("TCP_NODELAY not set: %s", exc.strerror)


def peer_address(address: str) -> str:
    """A peer's IP address as a caller entry names it. A listener bound to "::" (IPv4 and IPv6 on one
    socket) sees an IPv4 peer as an IPv4-mapped IPv6 address (::ffff:10.0.0.5), which no configured IPv4
    host ever equalled: every caller bound to one was rejected."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped if mapped is not None else ip)


# First buffer of a PDU read; it grows (doubling) only as the peer's bytes actually arrive.
_FIRST_READ = 1 << 20


def _recv_exact(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` into one buffer.

    Replaces pynetdicom's ``AssociationSocket.recv``, which reads in 4 KiB slices and extends a
    bytearray each time: ~1800 Python-level calls per 7 MB radiograph instead of ~60 here.
    Same contract: returns fewer bytes only when the peer closed the connection. The buffer is not
    sized by the announced PDU length up front: the header comes from a peer not yet authenticated,
    and a claimed 4 GiB PDU must not cost 4 GiB of memory before a byte of it has arrived.
    Raises ``TimeoutError`` past the connection's limits (:func:`limit_silence`).
    """
    sock = self.socket
    assert sock is not None
    buffer = bytearray(min(nr_bytes, _FIRST_READ))
    received = 0
    deadline, late = _read_deadline(self)
    silence: float | None = getattr(self, _SILENCE, None)
    try:
        while received < nr_bytes:
            bounded = False  # the deadline, not the silence, limits this wait: say so if it is reached
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(late)
                bounded = silence is None or remaining < silence
                sock.settimeout(remaining if silence is None else min(remaining, silence))
            if received == len(buffer):
                buffer.extend(bytes(min(len(buffer), nr_bytes - len(buffer))))
            try:
                with memoryview(buffer) as view:
                    count = sock.recv_into(view[received:], len(buffer) - received)
            except TimeoutError:
                if bounded:
                    raise TimeoutError(late) from None
                raise
            if not count:
                del buffer[received:]
                return buffer
            received += count
    finally:
        if deadline is not None:  # the next send (a C-STORE response) waits as long as ever
            with contextlib.suppress(OSError):  # closed meanwhile
                sock.settimeout(silence)
    return buffer


def _read_deadline(assoc_socket: AssociationSocket) -> tuple[float | None, str]:
    """When the read in progress must be done (monotonic time, or None), and what was late then."""
    request: float | None = getattr(assoc_socket, _DEADLINE, None)
    if request is not None:  # an association request must be complete by then
        return request, "association request not complete within the ACSE time-out"
    allowed: float | None = getattr(assoc_socket, PDU_SECONDS, None)
    started: float | None = getattr(assoc_socket, PDU_STARTED, None)
    if allowed and started is not None:
        return started + allowed, f"PDU not complete {allowed:g} s after its first byte (network time-out)"
    return None, ""


def tune_socket(assoc_socket: AssociationSocket | None) -> None:
    """Per-connection tuning: TCP_NODELAY and whole-PDU reads."""
    if assoc_socket is None:
        return
    set_nodelay(assoc_socket.socket)
    assoc_socket.recv = types.MethodType(_recv_exact, assoc_socket)  # type: ignore[method-assign]


#: TCP keep-alive of accepted connections: a peer gone without a FIN (power or network lost) is found
#: after about 90 s even where no read is waiting on it.
_KEEPALIVE = ((socket.TCP_KEEPIDLE, 60), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 3))


#: Attributes of an accepted connection's AssociationSocket: when its association request must be complete;
#: how long a read waits for the next bytes (how long one whole PDU may take: reactor.PDU_SECONDS).
_DEADLINE = "_cxr_request_deadline"
_SILENCE = "_cxr_silence"


def limit_silence(
    assoc_socket: AssociationSocket | None,
    seconds: float | None,
    *,
    request_deadline: float | None = None,
    pdu_seconds: float | None = None,
) -> None:
    """A read on this connection waits at most ``seconds`` for the peer's next bytes, then the
    connection is closed. The listener reads a PDU whole and blocking: a peer that stopped in the middle
    of one (lost power or network, no FIN) held its thread and its association slot until it closed the
    connection itself, past every pynetdicom timer, which run only between reads (review). Until the
    association is accepted, ``request_deadline`` (monotonic time) also bounds the whole request: a peer
    trickling a byte a second is cut off then, not only one that stops. After it, ``pdu_seconds`` bounds
    each whole PDU from its first byte (the reactor marks it, :data:`~dicom_node.reactor.PDU_STARTED`):
    a peer trickling a P-DATA-TF kept its slot for ever, each byte well within ``seconds``."""
    sock = None if assoc_socket is None else assoc_socket.socket
    if sock is None or assoc_socket is None:
        return
    setattr(assoc_socket, _DEADLINE, request_deadline)
    setattr(assoc_socket, _SILENCE, seconds or None)
    setattr(assoc_socket, PDU_SECONDS, pdu_seconds or None)
    try:
        sock.settimeout(seconds or None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in _KEEPALIVE:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError as exc:  # the peer is already gone
        LOGGER.debug("connection limits not set: %s", exc.strerror)


def configure_pynetdicom() -> None:
    """pynetdicom-wide switches: never log identifier datasets (pynetdicom's own recommendation)."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"


class _ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, run by the node itself instead of ``AE.start_server``.

    The listening socket is non-blocking because the node's listener processes (:mod:`dicom_node.listeners`)
    all accept on it: one that loses the race for a connection goes back to its loop instead of blocking
    in ``accept()``. ``adopted`` is the node's socket, inherited by a listener process.
    """

    adopted: socket.socket | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept, and leave the TLS handshake to the connection's own thread (:meth:`finish_request`).
        pynetdicom shakes hands here, on the one accepting thread and without a timeout, so a peer that
        connects and says nothing (a TCP health check, a half-open connection, a port scanner) held up
        every other association until it went away."""
        client_socket, address = cast(socket.socket, self.socket).accept()
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake, within the ACSE timeout, then the association."""
        if isinstance(request, ssl.SSLSocket):
            previous = request.gettimeout()
            try:
                request.settimeout(self.ae.acse_timeout or _HANDSHAKE_TIMEOUT)
                request.do_handshake()
                request.settimeout(previous)
            except OSError as exc:  # ssl.SSLError is one
                silent = isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)
                if isinstance(exc, ssl.SSLError) and not silent:  # speaks, but not our TLS (certificates)
                    LOGGER.warning("TLS handshake with %s failed: %s", client_address[0],
                                   handshake_failure(exc, "the caller"))
                else:  # closed or silent before a handshake: a load balancer's TCP check, a scanner
                    LOGGER.info("connection from %s ended before a TLS handshake (%s)", client_address[0],
                                type(exc).__name__)
                return  # the server closes the socket
        super().finish_request(request, client_address)

    def server_bind(self) -> None:
        if self.adopted is None:
            super().server_bind()
            return
        cast(socket.socket, self.socket).close()  # the one TCPServer made; never bound
        self.socket = self.adopted
        self.server_address = self.adopted.getsockname()

    def server_activate(self) -> None:
        if self.adopted is None:
            super().server_activate()
        cast(socket.socket, self.socket).setblocking(False)

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)  # pynetdicom's also unregisters from AE.start_server
        self.server_close()

    def server_close(self) -> None:
        if self.adopted is None:
            super().server_close()
        else:  # close this process's handle only: shutdown() would stop the node's listening too
            self.adopted.close()


class StorageScp:
    """The node's DICOM listener. Built by :func:`build_scp`; ``start()`` returns once it is bound."""

    def __init__(
        self,
        settings: DicomSettings,
        ingestor: Ingestor,
        session_factory: sessionmaker[Session],
        *,
        ssl_context: ssl.SSLContext | None = None,
        caller_policy: Callable[[Session, str, str], bool] = aes.caller_allowed,
        listen_socket: socket.socket | None = None,
        outbox_settings: OutboxSettings | None = None,
        on_resend: Callable[[int], object] | None = None,
    ) -> None:
        self.settings = settings
        # a destination with objects to send again after its report: this process's outbox, if it has one
        self.on_resend = on_resend or (lambda destination_pk: outbox.wake([destination_pk]))
        self.outbox_settings = outbox_settings or OutboxSettings()  # how a report of objects not kept acts
        self.listen_socket = listen_socket  # the node's, when this is one of its listener processes
        self.ingestor = ingestor
        self.session_factory = session_factory
        self._reads = make_read_only_session_factory(session_factory)  # the caller check waits on no writer
        self.ssl_context = ssl_context
        self.caller_policy = caller_policy
        self._server: ThreadedAssociationServer | None = None
        self._acceptor: threading.Thread | None = None
        self._lock = threading.Lock()
        # associations of a result destination that may report storage commitment, and not store
        self._reporters: weakref.WeakSet[Association] = weakref.WeakSet()
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.maximum_associations = self.settings.max_associations
        ae.acse_timeout = self.settings.acse_timeout
        ae.dimse_timeout = self.settings.dimse_timeout
        ae.network_timeout = self.settings.network_timeout
        ae.require_called_aet = True
        syntaxes = decodable_transfer_syntaxes()
        for sop_class in IMAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        for sop_class in NON_IMAGE_SOP_CLASSES:  # stored, not analysed: no pixel data to compress
            ae.add_supported_context(sop_class, list(NON_IMAGE_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        # A PACS reporting storage commitment on an association it opens is the SCP of the SOP class: it
        # may propose that role (PS3.7 D.3.3.4), which the node accepts, never taking the SCP role itself.
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        return ae

    # Life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            tune_for_large_buffers()  # process-wide: every received instance is a multi-megabyte buffer
            handlers: list[Any] = [
                (evt.EVT_CONN_OPEN, self._on_connection_open),
                (evt.EVT_ACCEPTED, self._on_association_accepted),
                (evt.EVT_REQUESTED, self._on_association_requested),
                (evt.EVT_C_ECHO, self._on_echo),
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_N_EVENT_REPORT, self._on_event_report),
                (evt.EVT_N_ACTION, self._on_action),
            ]
            try:
                server = self.ae.make_server(
                    (self.settings.bind_address, self.settings.port),
                    ssl_context=self.ssl_context,
                    evt_handlers=handlers,
                    server_class=type("_Listener", (_ListenerServer,), {"adopted": self.listen_socket}),
                    request_handler=type("_Handler", (EventDrivenRequestHandler,),
                                         {"max_data_set_bytes": self.settings.max_object_bytes}),
                )
            except OSError as exc:  # a port in use was a 30-line traceback naming neither port nor setting
                raise ConfigurationError(
                    f"DICOM listener cannot bind {self.settings.bind_address}:{self.settings.port} "
                    f"(dicom.port, dicom.bind_address): {exc.strerror or type(exc).__name__}"
                ) from exc
            acceptor = threading.Thread(target=self._accept, args=(server,), name="dicom-acceptor", daemon=True)
            acceptor.start()
            self._server, self._acceptor = server, acceptor
        LOGGER.info(
            "DICOM listener %s on %s:%d%s", self.settings.ae_title, self.settings.bind_address, self.port,
            " (TLS)" if self.ssl_context else "",
        )

    @staticmethod
    def _accept(server: ThreadedAssociationServer) -> None:
        try:
            server.serve_forever()
        except BaseException:  # no new association from here on: say so, and /healthz says so (listening)
            LOGGER.critical("DICOM listener stopped accepting associations", exc_info=True)

    @property
    def listening(self) -> bool:
        """Started, its acceptor thread runs and its socket is open: the node's DICOM health check."""
        server, acceptor = self._server, self._acceptor
        if server is None or acceptor is None or not acceptor.is_alive():
            return False
        return cast(socket.socket, server.socket).fileno() >= 0

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting; give running associations ``grace_seconds`` to finish, then abort them.

        An instance whose success was not yet sent is simply not acknowledged: the sender retries.
        """
        with self._lock:
            server, self._server, self._acceptor = self._server, None, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            LOGGER.warning("aborting an association still open at shutdown (calling AE %s)",
                           assoc.requestor.ae_title)
            assoc.abort()
        LOGGER.info("DICOM listener stopped")

    @property
    def socket(self) -> socket.socket:
        """The listening socket (handed to the node's listener processes)."""
        if self._server is None:
            raise RuntimeError("listener not started")
        return cast(socket.socket, self._server.socket)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    # Event handlers ---------------------------------------------------------------------------

    def _on_connection_open(self, event: Event) -> None:
        tune_socket(event.assoc.dul.socket)
        # until the association is accepted, the ARTIM/ACSE time-out bounds the whole request
        acse = self.settings.acse_timeout or _HANDSHAKE_TIMEOUT
        limit_silence(event.assoc.dul.socket, acse, request_deadline=time.monotonic() + acse)

    def _on_association_accepted(self, event: Event) -> None:
        # One PDU may take the network time-out from its first byte to its last. Never shorter than a real
        # sender needs: pynetdicom's idle timer restarts only when a whole PDU has been read, so a PDU
        # slower than that was already aborted once it was in (only a trickle never ending was not). With
        # the offered PDU of dicom.max_pdu (128 KiB by default) and 60 s, a link keeping ~2 KB/s is enough.
        timeout = self.settings.network_timeout
        limit_silence(event.assoc.dul.socket, timeout, pdu_seconds=timeout)

    def _on_association_requested(self, event: Event) -> None:
        """Default deny: reject unless the called AE title is ours and the calling AE is an enabled caller
        from an allowed host. Each rejection is one WARNING naming the titles and the peer's address (AE
        titles and addresses are configuration, not patient data)."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive is not None else ""
        called = str(primitive.called_ae_title).strip() if primitive is not None else ""
        peer = peer_address(str(assoc.requestor.address))
        if called != self.settings.ae_title.strip():  # pynetdicom would reject it too, without a word
            LOGGER.warning("association rejected: called AE %r asked for by calling AE %r from %s is not "
                           "this node's AE title %r", called, calling, peer, self.settings.ae_title)
            self._reject(event, REJECT_CALLED_AE)
            return
        try:
            with self._reads() as session:
                allowed = self.caller_policy(session, calling, peer)
                reporter = not allowed and aes.commitment_reporter(session, calling) is not None
                refusal = "" if allowed or reporter else aes.caller_refusal(session, calling, peer)
        except Exception as exc:
            LOGGER.error("association from %s at %s rejected (transient): policy check failed: %s",
                         calling, peer, describe_exception(exc))
            self._reject(event, REJECT_TRANSIENT)
            return
        if not (allowed or reporter):
            LOGGER.warning("association rejected: calling AE %r from %s %s", calling, peer, refusal)
            self._reject(event, REJECT_CALLING_AE)
            return
        # pynetdicom refuses past the limit itself, after this handler, with one INFO line the node's
        # logging leaves out: the PACS saw "local limit exceeded" and the node's log nothing (review).
        open_here = sum(1 for other in self.ae.active_associations if other.is_acceptor)
        if open_here > self.settings.max_associations:  # this one counts, as in pynetdicom
            LOGGER.warning("association from %r at %s rejected (transient, local limit exceeded): %d "
                           "associations already open in this listener process (dicom.max_associations)",
                           calling, peer, open_here - 1)
            self._reject(event, REJECT_LOCAL_LIMIT)
            return
        if reporter:  # a result destination, to report storage commitment
            self._reporters.add(assoc)

    @staticmethod
    def _reject(event: Event, reason: tuple[int, int, int]) -> None:
        event.assoc.acse.send_reject(*reason)
        event.assoc.kill()

    def _on_echo(self, event: Event) -> int:
        return int(Status.SUCCESS)

    def _on_event_report(self, event: Event) -> tuple[int, None]:
        """A storage commitment result from a result destination (PS3.4 J.3.3); anything else is refused
        as an event type the node does not know."""
        status, resend = outbox.take_commitment_report(event, self.session_factory, self.outbox_settings)
        if resend is not None:
            self.on_resend(resend)
        return status, None

    def _on_action(self, event: Event) -> tuple[Dataset, None]:
        """A sender asking the node to commit to keeping what it sent (N-ACTION): refused with 0x0124 and
        why. The node keeps images for its analysis (and removes them after ``storage.retention_days`` when
        set); it is not the archive. (pynetdicom answered 0x0110, a processing failure, which a modality
        retries and alarms on.)"""
        calling = str(event.assoc.requestor.ae_title).strip()
        LOGGER.warning("N-ACTION from %s refused with 0x0124: the node does not commit to keeping images "
                       "(storage commitment is for the archive)", calling)
        return failure_response(Status.NOT_AUTHORISED, "this node is not an archive: ask the PACS for "
                                                       "storage commitment"), None

    def _on_store(self, event: Event) -> int | Dataset:
        calling = str(event.assoc.requestor.ae_title).strip()
        if not isinstance(event.request, C_STORE):
            # an N-EVENT-REPORT on a storage context (pynetdicom serves those outside the association's
            # reactor, which refuses every other request there: dicom_node.reactor) would get a C-STORE
            # response; the peer is told by an abort instead
            LOGGER.warning("%s request from %s on a storage presentation context refused: association "
                           "aborted", type(event.request).__name__.replace("_", "-"), calling)
            event.assoc.abort()
            return int(Status.PROCESSING_FAILURE)
        if event.assoc in self._reporters:
            LOGGER.warning("C-STORE from %s refused: it may report storage commitment, it is not an allowed "
                           "caller", calling)
            return failure_response(Status.NOT_AUTHORISED, f"{calling} is not an allowed caller of this node")
        try:
            request = event.request
            if str(request.AffectedSOPClassUID) != str(event.context.abstract_syntax):
                # PS3.7 9.1.1: the request's SOP class is its presentation context's abstract syntax
                raise InvalidDatasetError("Affected SOP Class UID differs from the presentation context")
            stream = request.DataSet
            if isinstance(stream, BoundedDataSet) and stream.over_limit:
                raise DatasetTooLargeError(f"data set of {_megabytes(stream.received)} is over "
                                           f"dicom.max_object_bytes ({_megabytes(stream.limit)})")
            data = stream.getvalue() if stream is not None else b""
            self.ingestor.ingest_network(
                data,
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                transfer_syntax=str(event.context.transfer_syntax),
                calling_ae=calling,
            )
        except NodeError as exc:
            LOGGER.warning("C-STORE from %s refused with %s (0x%04X): %s", calling, exc.status.name,
                           int(exc.status), exc)
            return failure_response(exc.status, str(exc))
        except Exception as exc:
            LOGGER.error("C-STORE from %s failed unexpectedly: %s", calling, describe_exception(exc))
            return failure_response(Status.PROCESSING_FAILURE, f"unexpected error ({type(exc).__name__})")
        return int(Status.SUCCESS)  # also for a duplicate: the instance is safely stored


def _megabytes(size: int) -> str:
    """A size in megabytes (MiB, as the settings' defaults): whole when it is, else to a tenth."""
    return f"{size >> 20} MB" if size % (1 << 20) == 0 else f"{size / (1 << 20):.1f} MB"


def failure_response(status: Status, reason: str) -> Dataset:
    """The C-STORE response to a refused instance: its status, and the reason in the Error Comment
    (0000,0902; LO, 64 characters of the default repertoire), which DCMTK's storescu and PACS logs show.
    The node's error messages carry no patient data (dicom_node.errors)."""
    response = Dataset()
    response.Status = int(status)
    reason = reason.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    response.ErrorComment = reason if len(reason) <= 64 else reason[:61].rstrip() + "..."
    return response


def build_scp(
    settings: DicomSettings,
    ingestor: Ingestor,
    session_factory: sessionmaker[Session],
    *,
    ssl_context: ssl.SSLContext | None = None,
    listen_socket: socket.socket | None = None,
    outbox_settings: OutboxSettings | None = None,
    on_resend: Callable[[int], object] | None = None,
) -> StorageScp:
    """Factory: configure pynetdicom, then the listener (not yet started). Without ``ssl_context`` the
    listener speaks TLS when ``settings.tls`` is enabled."""
    configure_pynetdicom()
    if ssl_context is None and settings.tls.enabled:
        ssl_context = server_context(settings.tls)
    return StorageScp(settings, ingestor, session_factory, ssl_context=ssl_context,
                      listen_socket=listen_socket, outbox_settings=outbox_settings, on_resend=on_resend)
