"""Result types shared with the node and the reporting package (the classifier's public contract)."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

INDETERMINATE = "indeterminate"
NOVELTY_LIMIT = 1.0  # novelty above this: the image is unlike every training image (classifier.novelty)

_TURN_WORDS = {1: "a quarter turn anticlockwise", 2: "upside down", 3: "a quarter turn clockwise"}


def label_key(label: str) -> str:
    """A class label as compared: case set aside, runs of spaces and underscores read as one "-"
    (``"Non COVID"``, ``"non_covid"`` and ``"non-covid"`` are one label)."""
    return re.sub(r"[\s_]+", "-", label.strip().casefold())


class Doubt(enum.Enum):
    """Which of the model's own checks doubts an image it has classified."""

    NEGATIVE = "negative"
    WRONG_WAY_UP = "wrong-way-up"
    UNFAMILIAR = "unfamiliar"


def doubt_of(novelty: float | None, better_turn: int, negative: bool) -> Doubt | None:
    """The one doubt reported for an image (``None``: no check doubts it), the first of: a negative (a
    header's polarity, the first thing to fix); the wrong way up (a chest radiograph on its side is also
    unfamiliar as given; the turn is what to fix); unlike the training images. Takes the stored values so
    that a finding read back from the database gets the same verdict as the prediction; the words
    (:func:`doubt_reason`) and the SR code (``reporting.codes.doubt_code``) both follow it."""
    if negative:  # familiar once inverted back
        return Doubt.NEGATIVE
    if better_turn:  # familiar once turned, whatever its novelty as given
        return Doubt.WRONG_WAY_UP
    if novelty is not None and novelty > NOVELTY_LIMIT:
        return Doubt.UNFAMILIAR
    return None


def doubt_reason(
    novelty: float | None, better_turn: int, negative: bool, *, picture: bool = False
) -> str | None:
    """The words of :func:`doubt_of`, used wherever such an image is refused or, when it is classified
    anyway, reported (``None``: no check doubts it).

    A negative or turned image is flagged when it is familiar undone. As it is it may be unfamiliar too: a
    chest radiograph on its side often is, and so is a non-chest image that happens to look familiar undone
    (the lower-leg CR upright looks like an upside-down chest). The words then say both, and leave it to the
    reader which it is, instead of calling every such image a chest radiograph. ``picture``: the image is
    a PNG/JPEG, which has no Photometric Interpretation or Patient Orientation to check, so the remedy is
    how to export it."""
    doubt = doubt_of(novelty, better_turn, negative)
    unlike = (  # the novelty check's words, on their own or beside a turn or a negative
        "does not look like the chest radiographs the model was trained on "
        # rounded up: 1.004 read "novelty 1.00, limit 1.00", as if it were within the limit (review)
        f"(novelty {math.ceil(round(novelty * 100.0, 6)) / 100.0:.2f}, limit {NOVELTY_LIMIT:.2f})"
        if novelty is not None and novelty > NOVELTY_LIMIT
        else ""
    )
    turn = _TURN_WORDS.get(better_turn % 4, "round")
    if doubt is Doubt.NEGATIVE:
        undone = f"inverted and turned {turn}" if better_turn else "inverted"
        return (
            "the image looks like a negative (bone dark, lungs light): "
            + (f"as it is, it {unlike}; {undone}, it does; if it is a chest radiograph, " if unlike
               else "the model knows it better inverted; ")
            + ("export it again with bone white (not inverted)" if picture else
               "check its Photometric Interpretation (MONOCHROME1 or MONOCHROME2) and Presentation LUT Shape")
        )
    if doubt is Doubt.WRONG_WAY_UP:
        return (
            "the image looks the wrong way up: "
            + (f"as it is, it {unlike}; turned {turn}, it does; if it is a chest radiograph, " if unlike
               else f"the model knows it better turned {turn}; ")
            + ("upload it head up" if picture else "send it head up, or with a correct Patient Orientation")
        )
    if doubt is Doubt.UNFAMILIAR:
        return f"the image {unlike}"
    return None


def decided_label(top_class: str, confidence: float, threshold: float) -> str:
    """The label a prediction is reported under: its top class, or :data:`INDETERMINATE` when the top
    probability is below ``threshold``."""
    return top_class if confidence >= threshold else INDETERMINATE


# A model's name and version go into every report as DICOM Long Strings (Manufacturer's Model Name and
# Software Versions of the algorithm's Contributing Equipment, PS3.5 6.2), and into the node's database
IDENTITY_MAX_CHARS = 64


def identity_problem(text: str) -> str | None:
    """Why ``text`` cannot name or version a model, None when it can: 1 to 64 characters, no backslash
    (it separates a Long String's values) and no control character. A 67-character ensemble name loaded
    without complaint, and then every study failed to build its report (review)."""
    if not text.strip():
        return "is empty"
    if len(text) > IDENTITY_MAX_CHARS:
        return f"is {len(text)} characters long, more than the {IDENTITY_MAX_CHARS} a DICOM report can carry"
    if "\\" in text or any(ord(char) < 32 or 127 <= ord(char) < 160 for char in text):
        return "holds a backslash or a control character, which a DICOM report cannot carry"
    return None


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a trained model artifact, as recorded in its model.json."""

    name: str  # architecture name, e.g. "sugandi-cnn"
    version: str  # artifact version, goes into every SR and PDF
    classes: tuple[str, ...]  # class labels in output order, e.g. ("covid", "normal", "pneumonia")
    input_size: tuple[int, int]  # (height, width)
    sha256: str = ""


@dataclass(frozen=True)
class Prediction:
    """One image's classification.

    ``label`` is the top class, or :data:`INDETERMINATE` when the top probability is below the
    configured threshold; ``top_class`` is always the arg-max class. ``novelty`` is how unlike the
    training images the image is, as a multiple of the artifact's limit (``None`` when the artifact has
    no novelty check; see :mod:`classifier.novelty`): above 1.0 the image is *unfamiliar* and its
    probabilities say little. It is scored on the image the model read; when the presentation probe reads
    that as turned or inverted and undoing it does not make it familiar, it is the larger of the two
    scores (:func:`classifier.novelty.confirmed`). ``better_turn`` is set when the image the model read (a
    DICOM image turned by its Patient Orientation, a picture as it is) looks turned and is familiar turned
    back by that many counter-clockwise quarter turns: it looks the wrong way up (0: it does not, or it was
    not checked).
    ``negative`` is set when it looks inverted (bone dark) and is familiar inverted back: its display
    polarity (Photometric Interpretation, Presentation LUT Shape) is wrong or was lost. ``picture``: read
    from a PNG/JPEG, not from DICOM (what :attr:`doubt` advises differs).
    """

    label: str
    top_class: str
    probabilities: Mapping[str, float]  # class -> probability, in model class order, sums to 1
    model: ModelInfo
    heatmap: npt.NDArray[np.float32] | None = None  # HxW in [0, 1] over the model input, or None
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    novelty: float | None = None
    better_turn: int = 0
    negative: bool = False
    picture: bool = False

    @property
    def confidence(self) -> float:
        return float(self.probabilities[self.top_class])

    @property
    def indeterminate(self) -> bool:
        return self.label == INDETERMINATE

    @property
    def unfamiliar(self) -> bool:
        """The image is unlike every image the model was trained on (a non-chest image, a photograph)."""
        return self.novelty is not None and self.novelty > NOVELTY_LIMIT

    @property
    def looks_turned(self) -> bool:
        """The image looks on its side or upside down (see :attr:`better_turn`)."""
        return self.better_turn != 0

    @property
    def doubt(self) -> str | None:
        """Why the model's own checks doubt this image (a negative, the wrong way up, or unfamiliar);
        ``None``: they do not."""
        return doubt_reason(self.novelty, self.better_turn, self.negative, picture=self.picture)
