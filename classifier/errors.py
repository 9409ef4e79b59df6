"""Errors raised by the classifier package (kept free of PHI: they reach logs)."""

from __future__ import annotations

from pathlib import Path


class ClassifierError(Exception):
    """Base class of classifier errors."""


class UnsupportedImageError(ClassifierError):
    """The pixel data cannot be turned into a model input (photometry, frames, missing pixels, ...)."""


class ModelArtifactError(ClassifierError):
    """A model artifact folder is missing, incomplete or does not match its recorded hash."""


class WeightsUnavailableError(ClassifierError):
    """Pre-trained backbone weights were asked for but are not on this machine."""


class OptionError(ClassifierError):
    """An option the command cannot use: an unknown augmentation, too small an input, one seed twice, ..."""


class EnsembleError(ClassifierError):
    """Artifacts that cannot be merged into one model: other classes, preprocessing or split, or a head
    that is not pooling → dense."""


class OutputError(ClassifierError):
    """The folder a command is to write (an artifact, evaluation figures) cannot be created or written."""


def reason_for(exc: BaseException, path: Path) -> str:
    """What a reader found wrong with ``path``, for the one line a command prints about that file, without
    the file's folders (they may name a patient): a classifier error's own message, another exception's
    type and message. The caller names the file; an operating-system error about it (not found, a folder)
    is said without the name, which for a folder is the folder's own."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{type(exc).__name__}: {exc.strerror}"
    message = str(exc).replace(str(path), path.name)
    if isinstance(exc, ClassifierError) and message:
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
