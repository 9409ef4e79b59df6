"""Remote AE registry: allowed callers and result destinations, edited by CLI and console (audited)."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from dataclasses import dataclass, replace

from sqlalchemy import func, select
from sqlalchemy import update as sql_update
from sqlalchemy.orm import Session

from dicom_node import audit, commitment
from dicom_node.errors import ConflictError, NodeError, NotFoundError
from dicom_node.settings import checked_ae_title
from dicom_node.store.models import AeRole, Delivery, DeliveryState, RemoteAe, utcnow

LOGGER = logging.getLogger(__name__)

# RFC 1123 labels, plus "_", which resolvers accept and container service names use
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


class InvalidAeError(NodeError):
    """AE title, host or port do not make a usable entry."""


@dataclass(frozen=True)
class AeSpec:
    """What an admin enters for a remote AE."""

    ae_title: str
    role: AeRole
    host: str | None = None
    port: int | None = None
    tls: bool = False
    description: str = ""
    reply_to: str | None = None  # callers: destination AE title for results
    enabled: bool = True
    storage_commitment: bool = False  # destinations: ask them to commit to keeping what they received

    def validated(self) -> AeSpec:
        try:
            title = checked_ae_title(self.ae_title)
        except ValueError as exc:
            raise InvalidAeError(str(exc), field="ae_title") from exc
        host = (self.host or "").strip() or None
        if host is not None and not valid_host(host):
            raise InvalidAeError(
                "host must be an IP address or a host name (letters, digits, '-', '_', dots)", field="host")
        if self.port is not None and not 1 <= self.port <= 65535:  # a caller's too: the AE API refused it
            raise InvalidAeError("port must be 1-65535", field="port")
        if not (self.description.isprintable() and len(self.description) <= 255):
            raise InvalidAeError("description must be printable text of at most 255 characters",
                                 field="description")
        if self.role is AeRole.DESTINATION:
            if host is None or self.port is None:
                raise InvalidAeError("a destination needs host and port",
                                     field="host" if host is None else "port")
            if self.reply_to:
                raise InvalidAeError("reply_to applies to callers only", field="reply_to")
        elif self.storage_commitment:
            raise InvalidAeError("storage commitment applies to destinations only",
                                 field="storage_commitment")
        elif self.tls:  # the node's listener is on TLS for every caller or for none: dicom.tls.enabled
            raise InvalidAeError("DICOM TLS applies to destinations only; callers use TLS when the node's "
                                 "listener does (dicom.tls.enabled)", field="tls")
        return AeSpec(title, self.role, host, self.port, self.tls, self.description, self.reply_to or None,
                      self.enabled, self.storage_commitment)


def valid_host(host: str) -> bool:
    """An IPv4/IPv6 address or a host name a resolver can look up (no spaces, no URL, no port)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    # an all-digit last label is an address or a typo of one (999.999.999.999), never a name (RFC 3696 2)
    return 0 < len(name) <= 253 and all(_HOST_LABEL.match(label) for label in labels) \
        and not labels[-1].isdigit()


def _describe(ae: RemoteAe) -> dict[str, object]:
    return {
        "id": ae.id,
        "ae_title": ae.ae_title,
        "role": ae.role.value,
        "host": ae.host,
        "port": ae.port,
        "tls": ae.tls,
        "storage_commitment": ae.storage_commitment,
        "enabled": ae.enabled,
        "reply_to": ae.reply_to.ae_title if ae.reply_to else None,
    }


def list_aes(session: Session, role: AeRole | None = None) -> list[RemoteAe]:
    query = select(RemoteAe).order_by(RemoteAe.role, RemoteAe.ae_title)
    if role is not None:
        query = query.where(RemoteAe.role == role)
    return list(session.scalars(query))


def find(session: Session, ae_title: str, role: AeRole) -> RemoteAe | None:
    return session.scalar(select(RemoteAe).where(RemoteAe.ae_title == ae_title.strip(), RemoteAe.role == role))


def get(session: Session, ae_title: str, role: AeRole) -> RemoteAe:
    ae = find(session, ae_title, role)
    if ae is None:
        raise NotFoundError(f"no {role.value} AE titled {ae_title!r}")
    return ae


def get_by_id(session: Session, ae_id: int) -> RemoteAe:
    ae = session.get(RemoteAe, ae_id)
    if ae is None:
        raise NotFoundError(f"no remote AE with id {ae_id}")
    return ae


def _apply(session: Session, ae: RemoteAe, spec: AeSpec) -> None:
    if ae.storage_commitment and not spec.storage_commitment and ae.id is not None:
        commitment.stop_asking(session, ae.id)  # nor would the listener take the PACS's report now
    ae.ae_title = spec.ae_title
    ae.role = spec.role
    ae.host = spec.host
    ae.port = spec.port
    ae.tls = spec.tls
    ae.description = spec.description
    ae.enabled = spec.enabled
    ae.storage_commitment = spec.storage_commitment
    ae.reply_to = _reply_to(session, spec.reply_to) if spec.reply_to else None


def _reply_to(session: Session, ae_title: str) -> RemoteAe:
    """The destination a caller's ``reply_to`` names: one that does not exist is a field to mend (422),
    not an AE that was not found (the API answered 404, as for an unknown AE id)."""
    destination = find(session, ae_title, AeRole.DESTINATION)
    if destination is None:
        raise InvalidAeError(f"no destination AE titled {ae_title!r} (reply_to)", field="reply_to")
    return destination


def add(session: Session, spec: AeSpec, actor: str) -> RemoteAe:
    spec = spec.validated()
    if find(session, spec.ae_title, spec.role) is not None:
        raise ConflictError(f"a {spec.role.value} AE titled {spec.ae_title!r} exists already",
                            field="ae_title")
    ae = RemoteAe(ae_title=spec.ae_title, role=spec.role)
    _apply(session, ae, spec)
    session.add(ae)
    session.flush()
    audit.record(session, actor, "ae.add", f"remote_ae:{ae.id}", _describe(ae))
    return ae


def update(session: Session, ae_id: int, spec: AeSpec, actor: str) -> RemoteAe:
    spec = spec.validated()
    ae = get_by_id(session, ae_id)
    clash = find(session, spec.ae_title, spec.role)
    if clash is not None and clash.id != ae.id:
        raise ConflictError(f"a {spec.role.value} AE titled {spec.ae_title!r} exists already",
                            field="ae_title")
    if ae.role is AeRole.DESTINATION and spec.role is not AeRole.DESTINATION:
        # a caller has no host or port: the deliveries' record of where each report went would lose its
        # address (a study page showed "PACS1 ?:?"), and a resend went to port 0 (review)
        _refuse_if_delivered_to(session, ae, "making it a caller")
        callers = session.scalar(
            select(func.count()).select_from(RemoteAe).where(RemoteAe.reply_to_id == ae.id)
        )
        if callers:  # they would reply to a caller
            raise ConflictError(f"{callers} caller(s) send their results to {ae.ae_title}; change them first")
    before = _describe(ae)
    reached_before = _reached_as(ae)
    _apply(session, ae, spec)
    session.flush()
    audit.record(session, actor, "ae.update", f"remote_ae:{ae.id}", {"before": before, "after": _describe(ae)})
    if ae.role is AeRole.DESTINATION and ae.enabled and _reached_as(ae) != reached_before:
        _retry_now(session, ae)
    return ae


def _reached_as(ae: RemoteAe) -> tuple[object, ...]:
    """What decides whether the node's associations reach a destination."""
    return ae.ae_title, ae.host, ae.port, ae.tls, ae.enabled


def _retry_now(session: Session, ae: RemoteAe) -> None:
    """Make the destination's retrying deliveries due now: the admin has just mended its address (or
    enabled it), and they waited out their back-off (up to ``outbox.backoff_max_seconds``) while a resend
    was refused as "already being tried". So are the pending ones the outbox held back behind a batch that
    failed (dicom_node.outbox). DEAD ones stay so: they are resent by the operator."""
    now = utcnow()
    result = session.execute(
        sql_update(Delivery)
        .where(Delivery.destination_pk == ae.id,
               Delivery.state.in_((DeliveryState.PENDING, DeliveryState.RETRYING)),
               Delivery.next_attempt_at > now)
        .values(next_attempt_at=now)
        .execution_options(synchronize_session=False)
    )
    count = int(getattr(result, "rowcount", 0) or 0)
    if count:
        LOGGER.info("destination %d changed: %d waiting deliveries are due now", ae.id, count)


def _refuse_if_delivered_to(session: Session, ae: RemoteAe, doing: str) -> None:
    """A destination that results were sent (or queued) to stays one: its deliveries are the record of
    where each report went."""
    deliveries = session.scalar(
        select(func.count()).select_from(Delivery).where(Delivery.destination_pk == ae.id)
    )
    if deliveries:
        raise ConflictError(
            f"{ae.ae_title} has {deliveries} result deliveries on record; disable it instead of {doing}"
        )


def remove(session: Session, ae_id: int, actor: str) -> None:
    """Delete an entry. A destination that results were sent (or queued) to is kept: its deliveries are
    the record of where each report went, so it can only be disabled."""
    ae = get_by_id(session, ae_id)
    _refuse_if_delivered_to(session, ae, "removing it")
    details = _describe(ae)
    session.delete(ae)
    session.flush()
    audit.record(session, actor, "ae.remove", f"remote_ae:{ae_id}", details)


def upsert(session: Session, spec: AeSpec, actor: str) -> RemoteAe:
    """Create or update by (title, role) — used to seed entries from the settings file.

    The file sets the address fields; it carries no description and no enabled flag, so an admin's
    description stays, and an entry an admin disabled (a compromised PACS, say) stays disabled when the
    node restarts."""
    spec = spec.validated()
    existing = find(session, spec.ae_title, spec.role)
    if existing is None:
        return add(session, spec, actor)
    spec = replace(spec, description=existing.description, enabled=existing.enabled)
    if _spec_of(existing) == spec:
        return existing
    return update(session, existing.id, spec, actor)


def _spec_of(ae: RemoteAe) -> AeSpec:
    reply_to = ae.reply_to.ae_title if ae.reply_to else None
    return AeSpec(ae.ae_title, ae.role, ae.host, ae.port, ae.tls, ae.description, reply_to, ae.enabled,
                  ae.storage_commitment)


def caller_allowed(session: Session, calling_ae: str, peer_host: str) -> bool:
    """Default deny: the calling AE must be an enabled caller, bound to ``peer_host`` if a host is set.

    A configured host may be a name: it matches when one of its addresses is the peer's address.
    """
    ae = find(session, calling_ae, AeRole.CALLER)
    if ae is None or not ae.enabled:
        return False
    return ae.host is None or host_matches(ae.host, peer_host)


def caller_refusal(session: Session, calling_ae: str, peer_host: str) -> str:
    """Why :func:`caller_allowed` refuses ``calling_ae`` from ``peer_host``, for the log: an AE title that
    is allowed from another address was said to be "not an allowed caller" like an unknown one (review)."""
    ae = find(session, calling_ae, AeRole.CALLER)
    if ae is not None and not ae.enabled:
        return "is a disabled caller"
    if ae is not None and ae.host is not None and not host_matches(ae.host, peer_host):
        return f"is an allowed caller from {ae.host} only"
    return "is not an allowed caller"


def commitment_reporter(session: Session, calling_ae: str) -> RemoteAe | None:
    """The enabled destination set to storage commitment whose AE title is ``calling_ae``, if any.

    Such a PACS calls the node to report which objects it keeps (N-EVENT-REPORT), whether or not it
    is also an allowed caller. Its address is not checked: a PACS may report from another host of its
    cluster than the one the node sends to. Such an association may report commitments and echo; it may
    not store (:class:`dicom_node.scp.StorageScp`)."""
    ae = find(session, calling_ae, AeRole.DESTINATION)
    return ae if ae is not None and ae.enabled and ae.storage_commitment else None


def host_matches(configured: str, peer_address: str) -> bool:
    """Whether ``peer_address`` (an IP) is ``configured`` (an IP or a resolvable host name)."""
    if configured == peer_address:
        return True
    try:
        infos = socket.getaddrinfo(configured, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        LOGGER.warning("caller host %r does not resolve; association refused", configured)
        return False
    return any(info[4][0] == peer_address for info in infos)
