"""Audit trail: who changed what, when. Details carry row ids and settings, never PHI."""

from __future__ import annotations

import getpass
import logging
from typing import Any

from sqlalchemy.orm import Session

from dicom_node.store.models import AuditEvent

LOGGER = logging.getLogger(__name__)

SYSTEM = "system"


def cli_actor() -> str:
    """The actor name for changes made from the command line."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def user_actor(username: str) -> str:
    return f"user:{username}"


def record(
    session: Session, actor: str, action: str, target: str = "", details: dict[str, Any] | None = None
) -> AuditEvent:
    """Add an audit event to ``session`` (committed with the change it describes)."""
    event = AuditEvent(actor=actor, action=action, target=target, details=details or {})
    session.add(event)
    LOGGER.info("audit %s by %s on %s", action, actor, target or "-")
    return event
