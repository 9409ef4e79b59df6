"""How the node's errors appear over HTTP (one mapping for pages and API)."""

from __future__ import annotations

from dicom_node.aes import InvalidAeError
from dicom_node.errors import (
    AssociationError,
    AuthenticationError,
    ClassificationError,
    ConflictError,
    DamagedFileError,
    InvalidDatasetError,
    NodeError,
    NotFoundError,
    OutOfResourcesError,
    PermissionDeniedError,
    UndecodableDatasetError,
)
from dicom_node.users import InvalidUserError
from dicom_node.web.services import FeatureUnavailableError
from dicom_node.web.uploads import NotStorableUploadError, UploadTooLargeError

_STATUS: tuple[tuple[type[NodeError], int], ...] = (
    (NotFoundError, 404),
    (UploadTooLargeError, 413),
    (NotStorableUploadError, 422),
    (ConflictError, 409),
    (InvalidAeError, 422),
    (InvalidUserError, 422),
    (UndecodableDatasetError, 422),
    (InvalidDatasetError, 422),
    (ClassificationError, 422),
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (FeatureUnavailableError, 503),
    (OutOfResourcesError, 503),
    (AssociationError, 502),
    (DamagedFileError, 500),  # the node's own file: a server fault, named on the error page
)


def http_status(exc: NodeError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500
