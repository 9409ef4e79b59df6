"""One exception taxonomy for the node. Each error knows its DIMSE status and whether a retry may help.

Messages must never contain PHI (names, IDs, dates, dataset reprs): they reach logs and the console.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence

from dicom_node.statuses import Status


class NodeError(Exception):
    """Base of every error the node raises on purpose. ``field``: the form field or setting that an
    error about what someone entered concerns (the console marks that field), else None."""

    status: Status = Status.PROCESSING_FAILURE
    retriable: bool = False

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        self.field = field


class ConfigurationError(NodeError):
    """Settings are missing or inconsistent; the node refuses to start."""


class UndecodableDatasetError(NodeError):
    """The received bytes are not a dataset we can parse (truncated, corrupt, unknown encoding)."""

    status = Status.CANNOT_UNDERSTAND


class InvalidDatasetError(NodeError):
    """The dataset lacks what its SOP class requires (pixel data, SOP Class/Instance UID, ...)."""

    status = Status.DATASET_DOES_NOT_MATCH_SOP_CLASS


class UnsupportedSopClassError(InvalidDatasetError):
    """The node does not store this SOP class (the SCP refuses its presentation context already)."""

    status = Status.SOP_CLASS_NOT_SUPPORTED


class InvalidReportError(NodeError):
    """An N-EVENT-REPORT the node cannot take as a storage commitment result (dicom_node.commitment)."""

    status = Status.INVALID_ARGUMENT_VALUE


class UnknownEventTypeError(InvalidReportError):
    """An N-EVENT-REPORT whose Event Type ID is not a storage commitment result (1 or 2)."""

    status = Status.NO_SUCH_EVENT_TYPE


class OutOfResourcesError(NodeError):
    """Disk full, database down or similar: the sender may try again later."""

    status = Status.REFUSED_OUT_OF_RESOURCES
    retriable = True


class DatasetTooLargeError(NodeError):
    """A data set larger than the node reads: a deflated one that inflates past its limit (a few hundred
    kilobytes of zeros inflate to gigabytes). Out of resources, for good: a retry does not help."""

    status = Status.REFUSED_OUT_OF_RESOURCES


class StorageError(OutOfResourcesError):
    """The file store could not write durably."""


class DatabaseUnavailableError(OutOfResourcesError):
    """The database refused or lost the connection."""


class NotFoundError(NodeError):
    """A named object (AE, study, delivery, user) does not exist."""


class DamagedFileError(NodeError):
    """A file the node stored (a result object, a heat map) is there but cannot be read: the disk, a
    restore or a hand changed it. Not the user's doing and not mended by retrying."""


class ConflictError(NodeError):
    """The request conflicts with existing state (duplicate AE title, username, ...)."""


class IdentityConflictError(ConflictError):
    """The image's identifiers contradict what is stored: its Series Instance UID is another study's, its
    study another patient's, or its SOP Instance UID another study's instance. Filing it would put one
    patient's image into another's results; the sender is told, and nothing is stored."""

    status = Status.IDENTITY_CONFLICT


class AssociationError(NodeError):
    """An outbound association was rejected, aborted or timed out.

    ``statuses`` holds the C-STORE statuses the peer did answer before it failed (one per object, in
    order), so the objects it already stored are not sent again."""

    retriable = True

    def __init__(self, message: str, statuses: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.statuses = list(statuses)


class NoContextAcceptedError(AssociationError):
    """The peer accepted the association but none of the proposed presentation contexts: it does not
    take objects of these SOP classes in these transfer syntaxes (the message says which it refused).
    Another attempt gets the same answer until the peer's configuration changes."""

    status = Status.SOP_CLASS_NOT_SUPPORTED
    retriable = False


class ClassificationError(NodeError):
    """The classifier could not produce a finding for an image."""


class IneligibleImageError(ClassificationError):
    """The image is not a frontal chest radiograph, which is all the model reads: its header says so, or its
    pixels are unlike every image the model was trained on."""


class ReportingError(NodeError):
    """An SR, PDF or Encapsulated PDF could not be built."""


class AuthenticationError(NodeError):
    """Bad credentials or an expired session (web console)."""


class PermissionDeniedError(NodeError):
    """The user's role does not allow the action (web console)."""


def driver_reason(exc: BaseException | None) -> str:
    """The first line of a database driver's own error: host, port, user — never the password, which
    drivers do not repeat, nor bound values, which the node's engines hide. Empty when it says nothing."""
    text = str(exc or "").strip().splitlines()
    return text[0] if text else ""


def describe_exception(exc: BaseException, *, stack: bool = False) -> str:
    """Type and innermost code location of an exception, never its message (pydicom/SQL texts may quote PHI).

    With ``stack`` the whole traceback's frames follow, one per line (still without the message).
    """
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    text = f"{type(exc).__name__}{where}"
    if stack and frames:
        text += "\n" + "".join(traceback.format_list(frames)).rstrip()
    return text
