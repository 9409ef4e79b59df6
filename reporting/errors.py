"""Errors raised while building results (PHI-free messages: they reach logs)."""

from __future__ import annotations


class ReportingError(Exception):
    """Base class of reporting errors; the pipeline maps them onto its own taxonomy."""


class UnknownLabelError(ReportingError, ValueError):
    """A class label without a coded concept (a model trained on classes this package does not know)."""


class InconsistentStudyError(ReportingError, ValueError):
    """The analysed images do not belong to one study, or there are none."""
