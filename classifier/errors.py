"""Errors raised by the classifier package (kept free of PHI: they reach logs)."""

from __future__ import annotations


class ClassifierError(Exception):
    """Base class of classifier errors."""


class UnsupportedImageError(ClassifierError):
    """The pixel data cannot be turned into a model input (photometry, frames, missing pixels, ...)."""


class ModelArtifactError(ClassifierError):
    """A model artifact folder is missing, incomplete or does not match its recorded hash."""


class WeightsUnavailableError(ClassifierError):
    """Pre-trained backbone weights were asked for but are not on this machine."""
