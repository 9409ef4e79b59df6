"""Inputs of the report builders: who made the result, and what was analysed."""

from __future__ import annotations

from dataclasses import dataclass

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
    device_uid: str  # stable per installation: identifies the node as an SR observer device
    station_name: str


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
