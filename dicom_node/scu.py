"""Outbound DICOM: C-ECHO and C-STORE SCU (one association, proposing the contexts the objects need)."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)

from dicom_node import reactor
from dicom_node.errors import AssociationError, InvalidDatasetError, NoContextAcceptedError
from dicom_node.scp import configure_pynetdicom, limit_silence, tune_socket
from dicom_node.statuses import Status, is_failure, is_warning
from dicom_node.tls import handshake_failure

LOGGER = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_PDU = 131072

# A-ASSOCIATE-RJ in words (PS3.8 9.3.4, Table 9-21): the result, its source and, per source, the reason.
_REJECT_RESULTS = {0x01: "permanent", 0x02: "transient"}
_REJECT_SOURCES = {
    0x01: "service user", 0x02: "service provider (ACSE)", 0x03: "service provider (presentation)",
}
_REJECT_REASONS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x01): "no reason given",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded",
}


def rejection(primitive: A_ASSOCIATE | None) -> str:
    """The peer's A-ASSOCIATE-RJ in words: "permanent; service user: called AE title not recognised".

    pynetdicom says it only in its own log lines; the node puts it in the delivery's reason, the console
    and the commands' errors. A code outside the standard is given as a number."""
    if primitive is None:
        return "no reason received"
    result, source = primitive.result or 0, primitive.result_source or 0
    diagnostic = primitive.diagnostic or 0
    return (
        f"{_REJECT_RESULTS.get(result, f'result 0x{result:02X}')}; "
        f"{_REJECT_SOURCES.get(source, f'source 0x{source:02X}')}: "
        f"{_REJECT_REASONS.get((source, diagnostic), f'reason 0x{diagnostic:02X}')}"
    )


#: The longest Error Comment kept: its VR (LO) holds 64 characters; a peer that sends more is cut.
ERROR_COMMENT_LENGTH = 64


class StoreStatus(int):
    """A C-STORE status as the peer answered it, with its Error Comment (0000,0902) if it gave one, or why
    the node sent nothing (``reason``). It compares and formats as the status code itself."""

    reason: str

    def __new__(cls, status: int, reason: str = "") -> StoreStatus:
        self = super().__new__(cls, status)
        self.reason = reason
        return self


def error_comment(response: Dataset) -> str:
    """The peer's Error Comment, fit to show: one line of printable characters, double quotes made single
    (it is quoted), at most :data:`ERROR_COMMENT_LENGTH` characters. It is the PACS's free text, which may
    quote the patient ("Patient ID 4711 exists as DOE^JOHN"): the node keeps it in the delivery's reason
    (database, console, the commands' output), and never logs it (:func:`for_log`)."""
    text = " ".join(str(response.get("ErrorComment") or "").split())
    text = "".join(char if char.isprintable() else "?" for char in text).replace('"', "'")
    return text if len(text) <= ERROR_COMMENT_LENGTH else text[:ERROR_COMMENT_LENGTH].rstrip() + "…"


#: What a log line says in place of the peer's Error Comment.
COMMENT_WITHHELD = "Error Comment withheld from the log: see the delivery's reason"
_QUOTED_COMMENT = re.compile(r'Error Comment: "[^"]*"')  # error_comment() leaves no double quote in it


def for_log(reason: str) -> str:
    """A reason made by :func:`describe` fit for a log line: the peer's Error Comment is withheld. The rule
    is no patient data in logs, and the PACS's text is not the node's to vouch for."""
    return _QUOTED_COMMENT.sub(COMMENT_WITHHELD, reason)


def describe(status: int) -> str:
    """A C-STORE status in words for a delivery's reason and the commands: 'failure status 0xA700
    (Error Comment: "Out of disk space")', 'failure status 0x0122 (not sent: …)',
    'warning status 0xB000'."""
    kind = "failure " if is_failure(status) else "warning " if is_warning(status) else ""
    text = f"{kind}status 0x{status:04X}"
    reason = status.reason if isinstance(status, StoreStatus) else ""
    return f"{text} ({reason})" if reason else text


def _on_connection_open(event: Event, timeout: float) -> None:
    """Tune the new connection, and bound each read and write on it by ``timeout`` (with TCP keep-alive).
    pynetdicom takes its connect time-out off the socket once connected: a peer that stopped in the
    middle of a PDU (hung, or its link lost without a FIN) held the read for ever, the DIMSE time-out's
    abort waited for that read, and the outbox's batch for the destination never ended."""
    tune_socket(event.assoc.dul.socket)
    limit_silence(event.assoc.dul.socket, timeout)


def _probe(host: str, port: int, timeout: float) -> socket.socket:
    """A new connection to the peer, to ask it what pynetdicom's association did not say (at most 5 s)."""
    return socket.create_connection((host, port), timeout=min(timeout, 5.0))


def _connect_error(host: str, port: int, timeout: float, tls: ssl.SSLContext | None) -> str:
    """Why a connection to the peer fails ("Connection refused", "No route to host", "Name or service
    not known", "timed out"; over TLS, why the handshake fails), for the delivery's reason and the
    console. pynetdicom says it only in its own log."""
    try:
        with _probe(host, port, timeout) as connection:
            if tls is None:
                return "it accepts connections again"
            refusal = _tls_refusal(connection, host, tls)
            return "it accepts connections again" if refusal is None else f"TLS: {refusal}"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def _came_to_nothing(events: Sequence[str], host: str, port: int, timeout: float,
                     tls: ssl.SSLContext | None) -> str:
    """Why an association request that got a connection had no answer, from the events of the upper
    layer state machine (PS3.8 Table 9-10) the request went through. A port typed wrong is the usual
    cause: the destination's web port answers HTTP, a TLS port closes a plain connection unanswered."""
    if "Evt19" in events:  # the answer is no PDU
        return _not_dicom(host, port, timeout)
    if "Evt16" in events:
        return "the destination aborted the association request (A-ABORT): does it know the node's AE title?"
    if "Evt15" in events:  # the node aborted it: no answer within the ACSE timeout
        return f"no answer to the association request within {timeout:g} s"
    if "Evt17" in events:
        return ("the destination closed the connection without answering"
                + ("; does the port expect TLS?" if tls is None else ""))
    return "aborted or timed out"


# An A-ASSOCIATE-RQ PDU's header and as many bytes as its length says: enough for a web or other
# server to answer what it makes of it.
_PROBE = bytes([0x01, 0x00, 0x00, 0x00, 0x00, 0x44]) + bytes(0x44)


def _not_dicom(host: str, port: int, timeout: float) -> str:
    """What answers at ``port`` instead of DICOM: an HTTP server is named (Orthanc's web port is 8042,
    its DICOM port 4242), anything else is "not DICOM"."""
    answer = b""
    with contextlib.suppress(OSError), _probe(host, port, timeout) as sock:
        sock.sendall(_PROBE)
        answer = sock.recv(5)
    if answer.startswith(b"HTTP/"):
        return f"the destination answers HTTP, not DICOM: is {port} its web port?"
    return f"the destination's answer is not DICOM: is {port} its DICOM port?"


_TLS_REFUSAL_WAIT = 2.0  # seconds for a TLS 1.3 peer's refusal of the node's certificate


def _tls_refusal(connection: socket.socket, host: str, tls: ssl.SSLContext) -> str | None:
    """The TLS handshake on ``connection``, and a short wait for the peer's first word: under TLS 1.3 a
    peer that refuses the node's certificate says so only after the handshake, which pynetdicom then sees
    as an association aborted. None when the peer took the node's hello and certificate."""
    try:
        with tls.wrap_socket(connection, server_hostname=host) as wrapped:
            wrapped.settimeout(_TLS_REFUSAL_WAIT)
            with contextlib.suppress(TimeoutError):
                wrapped.recv(1)  # a DICOM acceptor waits for the A-ASSOCIATE-RQ: nothing comes
    except ssl.SSLError as exc:
        return handshake_failure(exc, "the destination")
    return None


def _probe_tls(host: str, port: int, timeout: float, tls: ssl.SSLContext) -> str | None:
    """:func:`_tls_refusal` on a new connection, None when none can be made (the association's own
    reason then stands)."""
    try:
        with _probe(host, port, timeout) as connection:
            return _tls_refusal(connection, host, tls)
    except OSError:
        return None


# Presentation context results other than acceptance (PS3.8 Table 9-18).
_CONTEXT_RESULTS = {
    0x01: "refused by the user",
    0x02: "refused, no reason given",
    0x03: "SOP class not supported",
    0x04: "transfer syntaxes not supported",
}


def _syntax_name(uid: str) -> str:
    """A UID's name where pydicom knows it ("Encapsulated PDF Storage"), else the UID itself."""
    name = UID(uid).name
    return name if name and name != uid else uid


def refused_contexts(requested: Sequence[PresentationContext], refused: Sequence[PresentationContext]) -> str:
    """What the peer refused, per SOP class: "Encapsulated PDF Storage in Explicit VR Little Endian or
    Implicit VR Little Endian: SOP class not supported" (several joined by "; ")."""
    syntaxes: dict[str, dict[str, None]] = {}
    for context in requested:
        syntaxes.setdefault(str(context.abstract_syntax), {}).update(
            dict.fromkeys(str(uid) for uid in context.transfer_syntax))
    results: dict[str, dict[str, None]] = {}
    for context in refused:
        results.setdefault(str(context.abstract_syntax), {})[
            _CONTEXT_RESULTS.get(context.result or 0, f"result 0x{context.result or 0:02X}")] = None
    return "; ".join(
        f"{_syntax_name(sop_class)} in {' or '.join(_syntax_name(uid) for uid in proposed)}"
        + (f": {', '.join(results[sop_class])}" if results.get(sop_class) else "")
        for sop_class, proposed in syntaxes.items()
    )


def _associate(
    contexts: list[PresentationContext],
    host: str,
    port: int,
    called_aet: str,
    *,
    calling_aet: str,
    tls: ssl.SSLContext | None,
    timeout: float,
    max_pdu: int = DEFAULT_MAX_PDU,
    dimse_timeout: float | None = None,
) -> Association:
    """An association with the peer; ``timeout`` bounds connecting, the association request and the
    network's silence, ``dimse_timeout`` (default: ``timeout``) the wait for each DIMSE response
    (``dicom.dimse_timeout`` for the outbox). A longer DIMSE wait lengthens the silence allowed with it:
    the peer says nothing while it works on a request."""
    configure_pynetdicom()
    response_wait = timeout if dimse_timeout is None else dimse_timeout
    silence = max(timeout, response_wait)
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout
    ae.dimse_timeout = response_wait
    ae.network_timeout = silence
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = max_pdu
    tls_args = (tls, host) if tls is not None else None
    opened: list[bool] = []
    events: list[str] = []  # the state machine's, for the reason of a request that comes to nothing

    def on_open(event: Event) -> None:
        opened.append(True)
        _on_connection_open(event, silence)

    def on_transition(event: Event) -> None:
        events.append(event.fsm_event)

    assoc = reactor.associate(
        ae, host, port, called_aet, contexts, tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_FSM_TRANSITION, on_transition)],
    )
    if assoc.is_established:
        assoc.unbind(evt.EVT_FSM_TRANSITION, on_transition)
        return assoc
    if assoc.is_rejected:
        raise AssociationError(f"association rejected by {called_aet} at {host}:{port} "
                               f"({rejection(assoc.acceptor.primitive)})")
    answer = assoc.acceptor.primitive
    if answer is not None and answer.result == 0x00:  # accepted, but no context: pynetdicom aborted it
        raise NoContextAcceptedError(
            f"{called_aet} at {host}:{port} accepted none of the proposed presentation contexts "
            f"({refused_contexts(contexts, assoc.rejected_contexts)})")
    if not opened:  # pynetdicom logs why only at its own level: ask the network once more
        reason = _connect_error(host, port, timeout, tls)
        raise AssociationError(f"cannot connect to {called_aet} at {host}:{port} ({reason})")
    refusal = None if tls is None else _probe_tls(host, port, timeout, tls)
    if refusal is not None:
        raise AssociationError(f"no association with {called_aet} at {host}:{port} (TLS: {refusal})")
    assoc.dul.join(timeout=1.0)  # it records the transition after the action that ended the request
    reason = _came_to_nothing(events, host, port, timeout, tls)
    raise AssociationError(f"no association with {called_aet} at {host}:{port} ({reason})")


def echo(
    host: str,
    port: int,
    called_aet: str,
    *,
    calling_aet: str,
    tls: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> int:
    """C-ECHO; returns the peer's status (0x0000 on success). Raises AssociationError if no association."""
    assoc = _associate([build_context(Verification)], host, port, called_aet, calling_aet=calling_aet,
                       tls=tls, timeout=timeout)
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in response:
        raise AssociationError(f"no C-ECHO response from {called_aet} at {host}:{port}")
    return int(response.Status)


#: The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.2)
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: N-ACTION Action Type ID: Request Storage Commitment (PS3.4 J.3.2.1)
REQUEST_COMMITMENT = 1
#: While an association waits for a storage commitment report, how often it looks whether one came
#: elsewhere (on the node's listener)
REPORT_POLL_SECONDS = 0.1
#: How long the release waits for the node's answers to reports being taken on the association: longer
#: than a database write may wait for its lock (30 s)
ANSWER_SECONDS = 45.0


def _end_after_reports(assoc: Association, taking: list[threading.Thread], guard: threading.Lock) -> None:
    """Release ``assoc`` once every report being taken on it has its answer queued: the answer queued after
    the A-RELEASE-RQ met a released association, pynetdicom's state machine failed on it (Evt9 in Sta7)
    and the PACS got no status. A report still being taken after :data:`ANSWER_SECONDS` (a database
    lock that long) gets an abort instead; the PACS reports again."""
    end = time.monotonic() + ANSWER_SECONDS
    threads: list[threading.Thread] = []
    while True:  # until no report came while the last were joined
        with guard:
            came = taking[len(threads):]
        if not came:
            break
        threads += came
        if time.monotonic() >= end:
            break
        for thread in came:
            thread.join(max(end - time.monotonic(), 0.0))
    if not assoc.is_established:
        return
    if any(thread.is_alive() for thread in threads):
        LOGGER.warning("storage commitment report still being taken after %.0f s: association aborted",
                       ANSWER_SECONDS)
        assoc.abort()
    else:
        assoc.release()


def request_commitment(
    transaction_uid: str,
    objects: Sequence[tuple[str, str]],
    host: str,
    port: int,
    called_aet: str,
    *,
    calling_aet: str,
    tls: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_pdu: int = DEFAULT_MAX_PDU,
    dimse_timeout: float | None = None,
    on_report: Callable[[Event], int] | None = None,
    report_wait: float = 0.0,
    answered: Callable[[], bool] | None = None,
) -> StoreStatus:
    """Ask the peer to commit to keeping ``objects`` ((SOP Class UID, SOP Instance UID) each): one N-ACTION
    Request Storage Commitment (PS3.4 J.3.2) under ``transaction_uid``, on an association of its own.

    Returns the peer's N-ACTION status with its Error Comment. The peer's answer as to which objects it
    keeps comes later, by N-EVENT-REPORT, on an association it opens to the node's listener (Orthanc) or on
    this one while it is open (PS3.4 J.3.3 allows both). After a successful request the association stays
    open up to ``report_wait`` seconds, ended early once a report came on it or ``answered()`` says one
    came elsewhere; a report on it goes to ``on_report``, whose status is the answer. A peer that does not
    offer the service gives 0x0122 without a request.
    """
    request = Dataset()
    request.TransactionUID = transaction_uid
    references = []
    for sop_class, sop_instance in objects:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        references.append(item)
    request.ReferencedSOPSequence = references
    try:
        assoc = _associate([build_context(StorageCommitmentPushModel)], host, port, called_aet,
                           calling_aet=calling_aet, tls=tls, timeout=timeout, max_pdu=max_pdu,
                           dimse_timeout=dimse_timeout)
    except NoContextAcceptedError as exc:
        return StoreStatus(exc.status, f"not sent: {exc}")
    # pynetdicom takes each report in a thread of its own, which queues the answer before it ends
    taking: list[threading.Thread] = []
    taking_guard = threading.Lock()

    def on_event_report(event: Event) -> tuple[int, None]:
        with taking_guard:
            taking.append(threading.current_thread())
        return (int(Status.PROCESSING_FAILURE) if on_report is None else on_report(event)), None

    # bound before the request: pynetdicom serves a report at once, even one ahead of the N-ACTION response
    assoc.bind(evt.EVT_N_EVENT_REPORT, on_event_report)
    status: Dataset | None = None
    try:
        status, _reply = assoc.send_n_action(request, REQUEST_COMMITMENT, StorageCommitmentPushModel,
                                             COMMITMENT_INSTANCE)
        if status is not None and status.get("Status") == 0 and on_report is not None:
            deadline = time.monotonic() + report_wait
            while assoc.is_established and time.monotonic() < deadline:
                if answered() if answered is not None else bool(taking):
                    break
                time.sleep(min(REPORT_POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))
    finally:
        _end_after_reports(assoc, taking, taking_guard)
    if status is None or "Status" not in status:
        raise AssociationError(f"no N-ACTION response from {called_aet} at {host}:{port}")
    comment = error_comment(status)
    return StoreStatus(int(status.Status), f'Error Comment: "{comment}"' if comment else "")


def load_datasets(items: Iterable[Path | Dataset]) -> list[Dataset]:
    """Datasets to send: paths are read (directories recursively, non-DICOM files skipped with a log)."""
    datasets: list[Dataset] = []
    for item in items:
        if isinstance(item, Dataset):
            datasets.append(item)
            continue
        paths = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
        for path in paths:
            try:
                datasets.append(dcmread(path))
            except (InvalidDicomError, OSError) as exc:
                if item.is_dir():
                    LOGGER.warning("skipping %s: not a DICOM file (%s)", path.name, type(exc).__name__)
                    continue
                raise InvalidDatasetError(f"{path.name} is not a readable DICOM file") from exc
    return datasets


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else ExplicitVRLittleEndian


def contexts_for(datasets: Sequence[Dataset]) -> list[PresentationContext]:
    """Contexts the objects need: each (SOP class, own transfer syntax) exactly, so nothing is re-encoded,
    plus one uncompressed fallback per SOP class with uncompressed objects (a peer may refuse e.g.
    deflated). Compressed objects get no fallback: converting them would mean decoding.
    """
    exact: dict[tuple[str, str], None] = {}
    fallback: dict[str, None] = {}
    for ds in datasets:
        sop_class = str(ds.get("SOPClassUID", ""))
        if not sop_class:
            raise InvalidDatasetError("an object to send has no SOP Class UID")
        own = _transfer_syntax(ds)
        exact[(sop_class, own)] = None
        if not own.is_compressed:
            fallback[sop_class] = None
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in exact]
    contexts += [build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
                 for sop_class in fallback]
    if len(contexts) > MAX_CONTEXTS:
        raise InvalidDatasetError(f"objects need {len(contexts)} presentation contexts; at most 128 fit")
    return contexts


def send(
    paths_or_datasets: Iterable[Path | Dataset],
    host: str,
    port: int,
    called_aet: str,
    *,
    calling_aet: str,
    tls: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_pdu: int = DEFAULT_MAX_PDU,
    dimse_timeout: float | None = None,
) -> list[StoreStatus]:
    """C-STORE every object over one association; returns one status per object, in order, each with the
    peer's Error Comment (:func:`describe` puts both in words).

    An object whose context the peer refused gets ``SOP_CLASS_NOT_SUPPORTED`` without a request, also
    when the peer accepted no context at all (it then says which it refused, and why).
    """
    datasets = load_datasets(paths_or_datasets)
    if not datasets:
        return []
    try:
        assoc = _associate(contexts_for(datasets), host, port, called_aet, calling_aet=calling_aet, tls=tls,
                           timeout=timeout, max_pdu=max_pdu, dimse_timeout=dimse_timeout)
    except NoContextAcceptedError as exc:
        return [StoreStatus(exc.status, f"not sent: {exc}") for _ in datasets]
    statuses: list[StoreStatus] = []
    try:
        for message_id, ds in enumerate(datasets, start=1):
            statuses.append(_store_one(assoc, ds, message_id))
    except AssociationError as exc:
        raise AssociationError(str(exc), statuses) from exc  # what the peer answered before it failed
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def _store_one(assoc: Association, ds: Dataset, message_id: int) -> StoreStatus:
    """One C-STORE; each request of an association has its own Message ID (PS3.7 9.3.1.1: it tells the
    requests apart; pynetdicom would send 1 every time)."""
    try:
        response: Any = assoc.send_c_store(ds, msg_id=message_id % 65536)
    except ValueError:  # the delivery's reason and its WARNING say it; no line of its own
        return _not_sendable(assoc, ds)
    if response is None or "Status" not in response:
        raise AssociationError("no C-STORE response (association aborted or timed out)")
    comment = error_comment(response)
    return StoreStatus(int(response.Status), f'Error Comment: "{comment}"' if comment else "")


def _not_sendable(assoc: Association, ds: Dataset) -> StoreStatus:
    """Why pynetdicom would not send ``ds`` (its ValueError): the peer accepted no presentation context for
    its SOP class, or accepted it only in transfer syntaxes the object cannot be encoded in (pydicom failed
    to convert it, or it is compressed and the node does not decode). Both said "the peer accepted no
    presentation context", and for the second the operator looked for a refusal in the PACS's settings.
    Either way another attempt gets the same: 0x0122 for each (a refusal of the object)."""
    sop_class = str(ds.get("SOPClassUID", "?"))
    name = _syntax_name(sop_class)
    accepted = dict.fromkeys(_syntax_name(str(context.transfer_syntax[0]))
                             for context in assoc.accepted_contexts
                             if str(context.abstract_syntax) == sop_class and context.transfer_syntax)
    if not accepted:
        LOGGER.info("peer accepted no presentation context for an object of SOP class %s", name)
        return StoreStatus(Status.SOP_CLASS_NOT_SUPPORTED,
                           f"not sent: the peer accepted no presentation context for {name}")
    syntaxes, own = " or ".join(accepted), _syntax_name(_transfer_syntax(ds))
    LOGGER.info("an object of SOP class %s in %s cannot be encoded in %s, which the peer accepted", name, own,
                syntaxes)
    return StoreStatus(Status.SOP_CLASS_NOT_SUPPORTED,
                       f"not sent: the peer accepted {name} only in {syntaxes}, and the object, in {own}, "
                       "cannot be encoded in it")
