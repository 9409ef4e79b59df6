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
    PROCESSING_FAILURE = 0x0110

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


def is_stored(code: int) -> bool:
    """Whether a C-STORE response means the peer kept the instance (success or warning)."""
    return code == Status.SUCCESS or is_warning(code)
