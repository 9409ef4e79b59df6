"""Inputs of the report builders: who made the result, and what was analysed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt
import pydicom

from classifier.types import Prediction


@dataclass(frozen=True)
class NodeIdentity:
    """The node as the device that produced the result (SR observer, equipment modules, PDF header)."""

    name: str  # shown in the PDF header, e.g. "CXR AI node"
    institution_name: str  # may be "" when not configured
    manufacturer: str
    model_name: str
    software_version: str
    device_uid: str  # one per installation (dicom_node.pipeline.device_uid): the node as SR observer device
    station_name: str


@dataclass(frozen=True)
class NotAnalysedImage:
    """An image of the study that the node stored but did not classify, and the node's reason (its header
    or the model's checks; never a patient's data): the report names it, so that its silence about the
    image is not read as a finding (review)."""

    source: pydicom.Dataset  # the header is enough
    reason: str


@dataclass(frozen=True)
class AnalysedImage:
    """One classified image of a study.

    ``source`` supplies the identifiers (patient, study, SOP instance); its pixel data may be absent.
    ``preview`` is what the PDF shows: uint8 HxW, windowed, white bone (``classifier.preprocess.display_image``).
    ``age_unknown``: the node classified it although its header gives no patient age; the PDF and the SR
    then ask the reader to confirm an adult (the node's age policy decides, ``dicom_node.eligibility``).
    """

    source: pydicom.Dataset
    prediction: Prediction
    preview: npt.NDArray[np.uint8] | None = None
    age_unknown: bool = False


@dataclass(frozen=True)
class Revision:
    """Which version of a study's result an object is.

    The first (``number`` 1) is made when the study is analysed. An image of the study that arrives after
    its results were sent makes the next revision: a new object (new UIDs) reporting on every analysed
    image. The earlier one stays in the PACS, so a revision says which report it replaces: the one the
    node made at ``replaces``, the analysis time that report states.
    """

    number: int = 1
    replaces: datetime | None = None
