"""DIMSE status codes the node answers with, named once (PS3.7 Annex C, PS3.4 B.2.3)."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """C-STORE / C-ECHO response statuses used by the node."""

    SUCCESS = 0x0000
    # Warnings (PS3.4 Table B.2-1): the instance was stored
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    # Failures
    REFUSED_OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC210
    # The image contradicts what is stored (its series in another study, its study under another patient):
    # a failure in the "cannot understand" range, with the reason in the Error Comment.
    IDENTITY_CONFLICT = 0xC211
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORISED = 0x0124
    PROCESSING_FAILURE = 0x0110
    # N-EVENT-REPORT (PS3.7 10.1.1.1.8): a storage commitment report the node cannot read
    NO_SUCH_EVENT_TYPE = 0x0113
    INVALID_ARGUMENT_VALUE = 0x0115

    @property
    def is_success(self) -> bool:
        return self == Status.SUCCESS

    @property
    def is_warning(self) -> bool:
        return is_warning(int(self))

    @property
    def is_failure(self) -> bool:
        return is_failure(int(self))


def is_warning(code: int) -> bool:
    """Warning statuses: 0x0001, 0x0107, 0x0116 and 0xB000-0xBFFF (PS3.7 C.4)."""
    return code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF


def is_failure(code: int) -> bool:
    return code != Status.SUCCESS and not is_warning(code) and code not in (0xFE00, 0xFF00, 0xFF01)


def refuses_the_object(code: int) -> bool:
    """Failure statuses that refuse the object itself, which another attempt gets again: 0x0122 SOP Class
    not supported (also what the node records when the peer accepted no presentation context for it),
    0x0124 not authorised, 0xA900-0xA9FF Data Set does not match SOP Class, 0xC000-0xCFFF cannot understand
    (PS3.4 Table B.2-1, PS3.7 C.5). Out of resources (0xA7xx) and a processing failure (0x0110) are
    retried as passing trouble."""
    return code in (0x0122, 0x0124) or 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF


def is_stored(code: int) -> bool:
    """Whether a C-STORE response means the peer kept the instance (success or warning)."""
    return code == Status.SUCCESS or is_warning(code)
