"""The PDF summary a radiologist or referring clinician reads: one document per study.

Seed 000's "save report" and seed 003's "generated report", made for a hospital: who the patient is, which
study, the result of each analysed image at a glance (finding in large coloured type, every class's confidence
as a bar), the image with its heat map, the model and its version, the time of analysis, and on every page
that this is decision support, not a diagnosis.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image as PILImage
from pydicom.multival import MultiValue
from reportlab.graphics.shapes import Drawing, Rect, String
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER, TA_LEFT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.lib.utils import TimeStamp
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    Flowable,
    Image,
    KeepTogether,
    PageBreak,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from classifier.types import ModelInfo, Prediction
from reporting import codes
from reporting.heatmap import overlay
from reporting.study import FIRST, check_one_study, distinct_models, header
from reporting.typeface import Typeface, typeface
from reporting.types import AnalysedImage, NodeIdentity, NotAnalysedImage, Revision

LOGGER = logging.getLogger(__name__)

TITLE = "Chest X-ray AI analysis"
INTENDED_USE_HEADLINE = "DECISION SUPPORT — NOT A DIAGNOSIS"
INTENDED_USE = (
    "This result was produced automatically by a machine-learning model and has not been reviewed by a "
    "physician: a qualified radiologist must interpret it with the images and the clinical context, and it "
    "must not be the sole basis for a clinical decision. The model is meant for frontal (PA/AP) chest "
    "radiographs of adults (for children, lateral views or other images its probabilities mean little) and "
    "knows {answers} answers only ({names}): any other finding, such as a mass or an effusion, is forced into "
    "one of them."
)
_COUNTS = {2: "two", 3: "three", 4: "four", 5: "five"}
DOUBT_HEADLINE = "THE MODEL'S OWN CHECKS DOUBT THIS IMAGE"
DOUBT_TEXT = (
    "The node is set to classify such images anyway; the probabilities above may say little about this "
    "image. Read it with particular care."
)
DOUBT_SUMMARY = "the model's checks doubt this image"
NOT_ANALYSED_SEE = "The model says nothing about these images: read them as usual."
AGE_UNKNOWN_HEADLINE = "PATIENT AGE UNKNOWN"
AGE_UNKNOWN_TEXT = (
    "The image header gives no Patient Age, and no Patient's Birth Date with a Study Date, so the node could "
    "not check that the patient is an adult. The model was trained on adults and calls most radiographs of "
    "young children COVID-19. Confirm the patient's age before reading this result."
)
NOT_RECORDED = "—"

PAGE_WIDTH, PAGE_HEIGHT = A4
MARGIN = 14 * mm
HEADER_HEIGHT = 16 * mm
FOOTER_HEIGHT = 13 * mm
CONTENT_WIDTH = PAGE_WIDTH - 2 * MARGIN
PICTURE_HEIGHT = 107 * mm  # the radiograph and its heat map, when nothing else asks for room
MIN_PICTURE_HEIGHT = 30 * mm

INK = colors.HexColor("#1a1a1a")
MUTED = colors.HexColor("#5f6368")
RULE = colors.HexColor("#c9ced6")
BAND = colors.HexColor("#1f3a5f")
WARNING_FILL = colors.HexColor("#fff3cd")
WARNING_EDGE = colors.HexColor("#b26a00")
BAR_TRACK = colors.HexColor("#e8eaed")
BAR_OTHER = colors.HexColor("#7a8794")
FINDING_COLOURS = {
    "COVID": colors.HexColor("#b3261e"),
    "PNEUMONIA": colors.HexColor("#c25400"),
    "NORMAL": colors.HexColor("#1e7d32"),
    "NONCOVID": colors.HexColor("#1e7d32"),
    "INDETERMINATE": colors.HexColor("#4a5561"),
}


def percent(probability: float) -> str:
    """How a probability is printed: one decimal, e.g. ``87.4 %``."""
    return f"{100.0 * probability:.1f} %"


def percent_below(probability: float) -> str:
    """A probability below a threshold, printed one decimal down (49.996 % as 49.9 %, not 50.0 %): rounded,
    it read as the threshold it fell short of (review)."""
    return f"{math.floor(1000.0 * probability) / 10.0:.1f} %"


def build_pdf(
    images: Sequence[AnalysedImage],
    node: NodeIdentity,
    *,
    analysed_at: datetime,
    revision: Revision = FIRST,
    threshold: float | None = None,
    not_analysed: Sequence[NotAnalysedImage] = (),
) -> bytes:
    """The study's summary as PDF bytes (A4; a summary page, then one page per analysed image when several).

    A later ``revision`` opens with a box saying which report it replaces, so that a printed copy cannot
    be taken for the earlier one. ``threshold``, the confidence below which a result is indeterminate, is
    printed beside an indeterminate one (the SR records it too). ``not_analysed`` are the study's other
    images, stored and not classified: a box names each with the reason."""
    check_one_study(images)
    # identifiers are read from readable copies: one value no reader takes must not cost the whole report
    images = [replace(image, source=header(image.source)) for image in images]
    fonts = typeface()
    styles = _Styles.make(fonts)
    models = distinct_models(images)
    count = f"{len(images)} of {len(images) + len(not_analysed)}" if not_analysed else str(len(images))
    identity = _identity_table(images[0].source, count, styles, fonts)
    notice: list[Flowable] = []
    if revision.number > 1:
        notice = [_revision_box(revision, len(images), styles), Spacer(1, 3 * mm)]
    story: list[Flowable] = [
        *notice,
        _intended_use_box(models, styles),
        Spacer(1, 4 * mm),
        identity,
        Spacer(1, 3 * mm),
    ]
    cautions: list[Flowable] = []
    if any(image.age_unknown for image in images):
        cautions = [_warning_box(f"⚠ {AGE_UNKNOWN_HEADLINE}", AGE_UNKNOWN_TEXT, styles), Spacer(1, 3 * mm)]
    if not_analysed:
        cautions += [_not_analysed_box(not_analysed, styles, fonts), Spacer(1, 3 * mm)]
    story += cautions
    if len(images) > 1:
        story += [_summary_table(images, styles, fonts), Spacer(1, 3 * mm)]
        story += [_analysis_line(models, node, analysed_at, styles, fonts), PageBreak()]
    # One image shares its page with the identity, the cautions and the model's line: the pictures take
    # the height those leave (a 64-character study description, or a revision box with an age caution and
    # a doubted image, pushed them onto a second page, under empty space).
    after: list[Flowable] = []
    if len(images) == 1:
        after = [Spacer(1, 3 * mm), _analysis_line(models, node, analysed_at, styles, fonts)]
    for index, image in enumerate(images):
        story += _image_section(image, index, len(images), styles, fonts, after=after, threshold=threshold)
        if index < len(images) - 1:
            story.append(PageBreak())
    story += after

    buffer = io.BytesIO()
    document = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=MARGIN,
        rightMargin=MARGIN,
        topMargin=MARGIN + HEADER_HEIGHT,
        bottomMargin=MARGIN + FOOTER_HEIGHT,
        title=TITLE,
        author=node.name,
        subject="Decision support, not a diagnosis",
        creator=f"{node.model_name} {node.software_version}",
        invariant=True,  # same inputs, same bytes: a rebuilt report equals the one already sent
    )
    model_text = "Model " + ", ".join(f"{model.name} {model.version}" for model in models)
    frame_decor = _PageDecor(node, analysed_at, model_text, _identity_line(images[0].source), fonts)
    document.build(story, canvasmaker=frame_decor.canvas_class())
    LOGGER.debug("built PDF with %d image sections", len(images))
    return buffer.getvalue()


@dataclass(frozen=True)
class _Styles:
    label: ParagraphStyle
    value: ParagraphStyle
    body: ParagraphStyle
    small: ParagraphStyle
    caption: ParagraphStyle
    heading: ParagraphStyle
    finding: ParagraphStyle
    confidence: ParagraphStyle
    warning_head: ParagraphStyle
    warning: ParagraphStyle

    def table(self, commands: list[tuple[Any, ...]]) -> TableStyle:
        """A table style whose cells' own font is the body's: reportlab's default is Helvetica, which it
        names on every page (unembedded) though each cell's text is a Paragraph in the embedded font."""
        return TableStyle([("FONTNAME", (0, 0), (-1, -1), self.body.fontName), *commands])

    @classmethod
    def make(cls, fonts: Typeface) -> _Styles:
        def style(
            name: str, size: float, *, bold: bool = False, colour: Any = INK, **extra: Any
        ) -> ParagraphStyle:
            return ParagraphStyle(
                name,
                fontName=fonts.bold if bold else fonts.regular,
                fontSize=size,
                leading=size * 1.25,
                textColor=colour,
                alignment=TA_LEFT,
                **extra,
            )

        return cls(
            label=style("label", 7.5, colour=MUTED),
            value=style("value", 10.5, bold=True),
            body=style("body", 9),
            small=style("small", 7.5, colour=MUTED),
            caption=ParagraphStyle(
                "caption",
                fontName=fonts.regular,
                fontSize=8,
                leading=10,
                textColor=MUTED,
                alignment=TA_CENTER,
            ),
            heading=style("heading", 11.5, bold=True, spaceAfter=1 * mm),
            finding=style("finding", 26, bold=True),
            confidence=style("confidence", 11),
            warning_head=style("warning_head", 11, bold=True, colour=WARNING_EDGE),
            warning=style("warning", 8.5),
        )


def intended_use_text(models: Sequence[ModelInfo]) -> str:
    """:data:`INTENDED_USE` with the answers the models know: it said "three" for a two-class model too."""
    classes = list(dict.fromkeys(name for model in models for name in model.classes))
    names = ", ".join(codes.finding_for(name).display for name in classes)
    return INTENDED_USE.format(answers=_COUNTS.get(len(classes), str(len(classes))), names=names)


def _intended_use_box(models: Sequence[ModelInfo], styles: _Styles) -> Table:
    return _warning_box(f"⚠ {INTENDED_USE_HEADLINE}", intended_use_text(models), styles)


def revision_headline(revision: Revision) -> str:
    """The headline of a later revision's box: the report it replaces, by that report's analysis time as
    its own pages print it."""
    replaced = f" OF {analysis_time(revision.replaces)}" if revision.replaces is not None else ""
    return f"REVISION {revision.number} — REPLACES THE REPORT{replaced}"


def _revision_box(revision: Revision, count: int, styles: _Styles) -> Table:
    images = "the image" if count == 1 else f"all {count} analysed images"
    return _warning_box(
        f"⚠ {revision_headline(revision)}",
        f"An image arrived after that report was made. This one covers {images} of the study; "
        "the earlier report is out of date.",
        styles,
    )


def _doubt_box(doubt: str, styles: _Styles, fonts: Typeface) -> Table:
    """The caution on an image the model's own checks doubted and the node classified anyway."""
    return _warning_box(
        f"⚠ {DOUBT_HEADLINE}",
        fonts.markup(f"{doubt[0].upper()}{doubt[1:]}. {DOUBT_TEXT}"),
        styles,
    )


def _warning_box(headline: str, text: str, styles: _Styles) -> Table:
    table = Table(
        [
            [Paragraph(headline, styles.warning_head)],
            [Paragraph(text, styles.warning)],
        ],
        colWidths=[CONTENT_WIDTH],
    )
    table.setStyle(
        styles.table(
            [
                ("BACKGROUND", (0, 0), (-1, -1), WARNING_FILL),
                ("BOX", (0, 0), (-1, -1), 1.2, WARNING_EDGE),
                ("LEFTPADDING", (0, 0), (-1, -1), 3 * mm),
                ("RIGHTPADDING", (0, 0), (-1, -1), 3 * mm),
                ("TOPPADDING", (0, 0), (-1, 0), 2 * mm),
                ("BOTTOMPADDING", (0, -1), (-1, -1), 2 * mm),
            ]
        )
    )
    return table


def patient_name(source: pydicom.Dataset) -> str:
    """The patient's name as :func:`person_name_text` reads it; ``NOT_RECORDED`` when empty."""
    return person_name_text(source.get("PatientName")) or NOT_RECORDED


def person_name_text(value: object) -> str:
    """A DICOM person name as read on paper: "Family, Given Middle" for the alphabetic form, "Family
    Given" for the ideographic and phonetic forms, the forms separated by " / "; "" when empty. A name
    that reads as several values (a backslash in it) gives each, separated by "; ": read as one, it was
    printed as a Python list, "[Doe, John, Roe Jane]"."""
    if isinstance(value, MultiValue | list | tuple):
        return "; ".join(text for text in (person_name_text(item) for item in value) if text)
    forms = []
    for position, group in enumerate(str(value or "").split("=")):
        parts = [part.strip() for part in group.split("^")] + [""] * 5
        family, given = parts[0], " ".join(part for part in parts[1:3] if part)
        name = (", " if position == 0 else " ").join(part for part in (family, given) if part)
        text = " ".join(part for part in (parts[3], name, parts[4]) if part)
        if text:
            forms.append(text)
    return " / ".join(forms)


def dicom_date_text(value: object) -> str:
    """``YYYYMMDD`` as ``YYYY-MM-DD``; anything else as given; ``NOT_RECORDED`` when empty."""
    text = _value_text(value)
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or NOT_RECORDED


def _text(value: object) -> str:
    return _value_text(value) or NOT_RECORDED


def _value_text(value: object) -> str:
    """A header value as its DICOM text: several values joined by a backslash, as a PACS shows them, not
    as a Python list ("['A', 'B']")."""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(item).strip() for item in value).strip("\\")
    return str(value or "").strip()


def _not_analysed_box(items: Sequence[NotAnalysedImage], styles: _Styles, fonts: Typeface) -> Table:
    headline = f"⚠ {len(items)} OTHER IMAGE{'S' if len(items) > 1 else ''} OF THIS STUDY NOT ANALYSED"
    lines = "<br/>".join(
        fonts.markup(f"{_series_instance(item.source)}: {item.reason}") for item in items
    )
    return _warning_box(headline, f"{lines}<br/>{NOT_ANALYSED_SEE}", styles)


def _identity_table(source: pydicom.Dataset, count: str, styles: _Styles, fonts: Typeface) -> Table:
    fields = [
        ("Patient name", patient_name(source)),
        ("Patient ID", _text(source.get("PatientID"))),
        ("Birth date", dicom_date_text(source.get("PatientBirthDate"))),
        ("Sex", _text(source.get("PatientSex"))),
        ("Accession number", _text(source.get("AccessionNumber"))),
        ("Study date", dicom_date_text(source.get("StudyDate"))),
        ("Study description", _text(source.get("StudyDescription"))),
        ("Images analysed", count),
    ]
    cells = [
        [Paragraph(label, styles.label), Paragraph(fonts.markup(value), styles.value)]
        for label, value in fields
    ]
    data = [cells[:4], cells[4:]]  # each cell: a small label above its value
    widths = [0.31 * CONTENT_WIDTH, 0.27 * CONTENT_WIDTH, 0.27 * CONTENT_WIDTH, 0.15 * CONTENT_WIDTH]
    table = Table(data, colWidths=widths)
    table.setStyle(
        styles.table(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LINEBELOW", (0, 0), (-1, 0), 0.5, RULE),
                ("BOX", (0, 0), (-1, -1), 0.5, RULE),
                ("LEFTPADDING", (0, 0), (-1, -1), 2.5 * mm),
                ("TOPPADDING", (0, 0), (-1, -1), 1.5 * mm),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2 * mm),
            ]
        )
    )
    return table


def confidence_text(prediction: Prediction) -> str:
    """The top class's probability as printed: one decimal down when it fell short of the threshold."""
    return (percent_below if prediction.indeterminate else percent)(prediction.confidence)


def _finding_words(prediction: Prediction, threshold: float | None) -> tuple[codes.FindingConcept, str]:
    """The finding and the line under it (confidence, or why it is indeterminate)."""
    finding = codes.finding_for(prediction.label)
    top = codes.finding_for(prediction.top_class)
    if prediction.indeterminate:
        limit = "" if threshold is None else f" of {100.0 * threshold:g} %"
        return finding, (
            f"Most likely {top.display} at {confidence_text(prediction)}, "
            f"below the confidence threshold{limit}: no class is reported"
        )
    return finding, f"Confidence {confidence_text(prediction)}"


def _summary_table(images: Sequence[AnalysedImage], styles: _Styles, fonts: Typeface) -> Table:
    """One line per image: the study's results at a glance before the per-image pages."""
    header = [
        Paragraph(text, styles.label) for text in ("Image", "Series / instance", "Result", "Confidence")
    ]
    rows: list[list[Flowable]] = [header]
    for index, image in enumerate(images):
        finding = codes.finding_for(image.prediction.label)
        colour = FINDING_COLOURS[finding.key].hexval()
        rows.append(
            [
                Paragraph(f"{index + 1}", styles.body),
                Paragraph(fonts.markup(_series_instance(image.source)), styles.body),
                Paragraph(
                    f'<font color="{colour}"><b>{finding.display}</b></font>'
                    + (f'<br/><font size="7" color="{WARNING_EDGE.hexval()}">⚠ {DOUBT_SUMMARY}</font>'
                       if image.prediction.doubt else ""),
                    styles.value,
                ),
                Paragraph(_summary_confidence(image.prediction), styles.body),
            ]
        )
    table = Table(  # its headings again on each page a long study's summary runs onto
        rows,
        colWidths=[0.1 * CONTENT_WIDTH, 0.35 * CONTENT_WIDTH, 0.35 * CONTENT_WIDTH, 0.2 * CONTENT_WIDTH],
        repeatRows=1,
    )
    table.setStyle(
        styles.table(
            [
                ("LINEBELOW", (0, 0), (-1, -1), 0.5, RULE),
                ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                ("TOPPADDING", (0, 0), (-1, -1), 1.2 * mm),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5 * mm),
            ]
        )
    )
    return table


def _summary_confidence(prediction: Prediction) -> str:
    """The top class's probability; named when the result is indeterminate, so it is not read as certainty."""
    text = confidence_text(prediction)
    if prediction.indeterminate:
        return f"{text} ({codes.finding_for(prediction.top_class).display})"
    return text


def _series_instance(source: pydicom.Dataset) -> str:
    parts = [
        _text(source.get("Modality")),
        str(source.get("ViewPosition") or "").strip(),
        f"series {_text(source.get('SeriesNumber'))}",
        f"instance {_text(source.get('InstanceNumber'))}",
    ]
    return ", ".join(part for part in parts if part)


def _height(flowables: Sequence[Flowable]) -> float:
    """The height the flowables take on the page, one under the other."""
    return float(sum(flowable.wrap(CONTENT_WIDTH, PAGE_HEIGHT)[1] for flowable in flowables))


def _image_section(
    image: AnalysedImage, index: int, count: int, styles: _Styles, fonts: Typeface,
    *, after: Sequence[Flowable] = (), threshold: float | None = None,
) -> list[Flowable]:
    """The image's result, cautions and pictures. The pictures take the height left on the page by what
    is above them and by their SOP Instance UID line and ``after`` below them, so that one image with its
    cautions still fits on a single page."""
    prediction = image.prediction
    finding, subline = _finding_words(prediction, threshold)
    colour = FINDING_COLOURS[finding.key]
    heading = f"Image {index + 1} of {count}: {_series_instance(image.source)}"
    result = Table(
        [
            [Paragraph("AI RESULT", styles.label), Paragraph("CONFIDENCE PER CLASS", styles.label)],
            [
                [
                    Paragraph(fonts.markup(finding.display), _coloured(styles.finding, colour)),
                    Spacer(1, 1.5 * mm),
                    Paragraph(fonts.markup(subline), styles.confidence),
                ],
                ConfidenceBars(prediction, fonts, width=0.52 * CONTENT_WIDTH),
            ],
        ],
        colWidths=[0.45 * CONTENT_WIDTH, 0.55 * CONTENT_WIDTH],
    )
    result.setStyle(
        styles.table(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LINEBEFORE", (0, 0), (0, -1), 4, colour),
                ("BOX", (0, 0), (-1, -1), 0.5, RULE),
                ("LEFTPADDING", (0, 0), (-1, -1), 3 * mm),
                ("TOPPADDING", (0, 0), (-1, 0), 2 * mm),
                ("BOTTOMPADDING", (0, -1), (-1, -1), 3 * mm),
            ]
        )
    )
    head: list[Flowable] = [Paragraph(fonts.markup(heading), styles.heading), result]
    if prediction.doubt:
        doubt = [Spacer(1, 2 * mm), _doubt_box(prediction.doubt, styles, fonts)]
        head += doubt
    below: list[Flowable] = [
        Spacer(1, 1 * mm),
        Paragraph(
            fonts.markup(f"SOP Instance UID {_text(image.source.get('SOPInstanceUID'))}"), styles.small
        ),
    ]
    return [
        KeepTogether(head),
        Spacer(1, 3 * mm),
        _FittingPictures(image, styles, reserve=_height([*below, *after])),
        *below,
    ]


def _coloured(style: ParagraphStyle, colour: colors.Color) -> ParagraphStyle:
    return ParagraphStyle(f"{style.name}-{colour.hexval()}", parent=style, textColor=colour)


class ConfidenceBars(Flowable):  # type: ignore[misc]  # reportlab ships no type hints
    """A horizontal bar per class, the predicted one in the finding's colour, the value printed at its end."""

    ROW = 7.5 * mm

    def __init__(self, prediction: Prediction, fonts: Typeface, *, width: float) -> None:
        super().__init__()
        self.prediction = prediction
        self.fonts = fonts
        self.bar_width = width
        self.bar_height = self.ROW * len(prediction.probabilities)

    def wrap(self, available_width: float, available_height: float) -> tuple[float, float]:
        return self.bar_width, self.bar_height

    def draw(self) -> None:
        # the renderer's first state names a font, Helvetica (unembedded) unless told
        drawing = Drawing(self.bar_width, self.bar_height, initialFontName=self.fonts.regular)
        names = [codes.finding_for(label).display for label in self.prediction.probabilities]
        longest = max(stringWidth(name, self.fonts.bold, 9) for name in names)
        label_width = min(max(longest + 3 * mm, 22 * mm), 0.45 * self.bar_width)
        value_width = 17 * mm
        track = self.bar_width - label_width - value_width
        for row, (label, probability) in enumerate(self.prediction.probabilities.items()):
            concept = codes.finding_for(label)
            chosen = label == self.prediction.top_class
            # an indeterminate result must not look like a positive one: its top bar stays neutral
            shown = codes.finding_for(self.prediction.label)
            colour = FINDING_COLOURS[shown.key] if chosen else BAR_OTHER
            y = self.bar_height - (row + 1) * self.ROW + 1.5 * mm
            font = self.fonts.bold if chosen else self.fonts.regular
            name = concept.display
            while stringWidth(name, font, 9) > label_width - 2 * mm and len(name) > 4:
                name = name[:-2] + "…"
            drawing.add(String(0, y + 1.2 * mm, name, fontName=font, fontSize=9, fillColor=INK))
            drawing.add(Rect(label_width, y, track, 4.5 * mm, fillColor=BAR_TRACK, strokeColor=None))
            drawing.add(
                Rect(
                    label_width,
                    y,
                    max(track * float(probability), 0.4),
                    4.5 * mm,
                    fillColor=colour,
                    strokeColor=None,
                )
            )
            drawing.add(
                String(
                    label_width + track + 2 * mm,
                    y + 1.2 * mm,
                    percent(float(probability)),
                    fontName=font,
                    fontSize=9,
                    fillColor=INK,
                )
            )
        drawing.drawOn(self.canv, 0, 0)


def _jpeg(pixels: npt.NDArray[np.uint8], max_side: int = 900) -> tuple[io.BytesIO, int, int]:
    picture = PILImage.fromarray(pixels)
    picture.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=88)
    buffer.seek(0)
    return buffer, picture.width, picture.height


def _fitted(pixels: npt.NDArray[np.uint8], box_width: float, box_height: float) -> Image:
    buffer, width, height = _jpeg(pixels)
    scale = min(box_width / width, box_height / height)
    return Image(buffer, width=width * scale, height=height * scale)


class _FittingPictures(Flowable):  # type: ignore[misc]  # reportlab ships no type hints
    """:func:`_pictures` as high as the page has room for, less ``reserve`` (what must follow them on the
    page): :data:`PICTURE_HEIGHT` at most, :data:`MIN_PICTURE_HEIGHT` at least (less room than that, and
    they go to the next page whole)."""

    def __init__(self, image: AnalysedImage, styles: _Styles, *, reserve: float) -> None:
        super().__init__()
        self.image = image
        self.styles = styles
        self.reserve = reserve
        self._table: Flowable | None = None

    def _laid_out(self, available_width: float, box_height: float) -> tuple[float, float]:
        self._table = _pictures(self.image, self.styles, box_height)
        width, height = self._table.wrap(available_width, PAGE_HEIGHT)
        return float(width), float(height)

    def wrap(self, available_width: float, available_height: float) -> tuple[float, float]:
        # The pictures shrink by what overflows until it fits (a picture narrower than its box shrinks by
        # less than the box, so once more); their captions keep their height.
        box = PICTURE_HEIGHT
        width, height = self._laid_out(available_width, box)
        for _ in range(6):
            overflow = height + self.reserve - available_height
            if overflow <= 0.5 or box <= MIN_PICTURE_HEIGHT:
                break
            box = max(MIN_PICTURE_HEIGHT, box - overflow)
            width, height = self._laid_out(available_width, box)
        return width, height

    def draw(self) -> None:
        table = self._table
        if table is None:  # platypus wraps a flowable before it draws it; drawn alone, at full size
            table = _pictures(self.image, self.styles, PICTURE_HEIGHT)
            table.wrapOn(self.canv, CONTENT_WIDTH, PAGE_HEIGHT)
        table.drawOn(self.canv, 0, 0)


def _pictures(image: AnalysedImage, styles: _Styles, box_height: float) -> Flowable:
    """The radiograph and, when the model produced one, its heat map side by side, each captioned."""
    box_width = (CONTENT_WIDTH - 6 * mm) / 2
    if image.preview is None:
        return Paragraph("Image preview not available for this instance.", styles.body)
    left = [_fitted(image.preview, box_width, box_height), Paragraph("Radiograph", styles.caption)]
    heat = image.prediction.heatmap
    if heat is not None:
        right: list[Flowable] = [
            _fitted(overlay(image.preview, heat), box_width, box_height),
            Paragraph(
                "Heat map: regions that most influenced the model towards "
                f"{codes.finding_for(image.prediction.top_class).display} (red = most). It is not a lesion "
                "outline.",
                styles.caption,
            ),
        ]
    else:
        right = [Paragraph("No heat map was computed for this image.", styles.caption)]
    table = Table([[left, right]], colWidths=[box_width + 3 * mm, box_width + 3 * mm])
    table.setStyle(
        styles.table(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("ALIGN", (0, 0), (-1, -1), "CENTER"),
                ("LEFTPADDING", (0, 0), (-1, -1), 0),
                ("RIGHTPADDING", (0, 0), (-1, -1), 0),
            ]
        )
    )
    return table


def _analysis_line(
    models: Sequence[ModelInfo], node: NodeIdentity, analysed_at: datetime, styles: _Styles, fonts: Typeface
) -> Paragraph:
    described = "; ".join(
        f"{model.name}, version {model.version} "
        f"(classes: {', '.join(codes.finding_for(label).display for label in model.classes)}; "
        f"input {model.input_size[0]}×{model.input_size[1]})"
        for model in models
    )
    node_text = f"{node.name} ({node.model_name} {node.software_version})"
    return Paragraph(
        f"<b>Model</b> {fonts.markup(described)}. <b>Analysed</b> {analysis_time(analysed_at)} by "
        f"{fonts.markup(node_text)}.",
        styles.body,
    )


def analysis_time(moment: datetime) -> str:
    """``YYYY-MM-DD HH:MM:SS`` plus the UTC offset when known."""
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    offset = moment.strftime("%z")
    if not offset:
        return text
    return f"{text} UTC" if offset == "+0000" else f"{text} (UTC{offset[:3]}:{offset[3:]})"


class _PageDecor:
    """Header band and footer drawn on every page, with "page N of M" (counted after layout)."""

    def __init__(
        self,
        node: NodeIdentity,
        analysed_at: datetime,
        model_text: str,
        identity: tuple[str, str],
        fonts: Typeface,
    ) -> None:
        self.node = node
        self.identity = identity
        self.analysed_at = analysed_at
        self.model_text = model_text
        self.fonts = fonts

    def canvas_class(self) -> type[Canvas]:
        decor = self

        class NumberedCanvas(Canvas):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                # no unembedded Helvetica: SimpleDocTemplate passes None, so a default would never apply
                kwargs["initialFontName"] = decor.fonts.regular
                super().__init__(*args, **kwargs)
                self._pages: list[dict[str, Any]] = []
                # invariant output stamps 2000-01-01; the analysis time is the truthful, equally stable date
                self._doc._timeStamp = _timestamp(decor.analysed_at)

            def showPage(self) -> None:  # noqa: N802 (reportlab API)
                self._pages.append(dict(self.__dict__))
                self._startPage()

            def save(self) -> None:
                for number, state in enumerate(self._pages, start=1):
                    self.__dict__.update(state)
                    decor.draw(self, number, len(self._pages))
                    super().showPage()
                super().save()

        return NumberedCanvas

    def draw(self, canvas: Canvas, number: int, total: int) -> None:
        fonts = self.fonts
        top = PAGE_HEIGHT - MARGIN
        canvas.saveState()
        canvas.setFillColor(BAND)
        canvas.rect(
            MARGIN, top - HEADER_HEIGHT + 3 * mm, CONTENT_WIDTH, HEADER_HEIGHT - 3 * mm, stroke=0, fill=1
        )
        canvas.setFillColor(colors.white)
        institution = self.node.institution_name.strip()
        heading = institution or self.node.name
        # Institution and station names are free text (a Japanese hospital's name, say): drawn in runs,
        # with the fallback font where the main one has no glyph, like the patient's name.
        # a name at LO's 64 characters is set smaller before it is cut: the hospital's name is read whole
        room = CONTENT_WIDTH - _width(TITLE, fonts, fonts.bold, 12) - 12 * mm  # left of the title
        heading, heading_size = _fit_sized(heading, fonts, fonts.bold, (12, 10, 8.5), room)
        _draw_runs(canvas, fonts, heading, MARGIN + 3 * mm, top - 7.5 * mm, heading_size, fonts.bold)
        subheading = self.node.name if institution else f"{self.node.station_name}"
        _draw_runs(
            canvas, fonts, _fit(subheading, fonts, fonts.regular, 8, CONTENT_WIDTH * 0.55),
            MARGIN + 3 * mm, top - 11.2 * mm, 8,
        )
        canvas.setFont(fonts.bold, 12)
        canvas.drawRightString(MARGIN + CONTENT_WIDTH - 3 * mm, top - 7.5 * mm, TITLE)
        canvas.setFont(fonts.regular, 8)
        canvas.drawRightString(
            MARGIN + CONTENT_WIDTH - 3 * mm, top - 11.2 * mm, f"Analysed {analysis_time(self.analysed_at)}"
        )
        # footer: intended use on every page, model identity, page number
        bottom = MARGIN
        canvas.setStrokeColor(RULE)
        canvas.line(
            MARGIN, bottom + FOOTER_HEIGHT - 3 * mm, MARGIN + CONTENT_WIDTH, bottom + FOOTER_HEIGHT - 3 * mm
        )
        canvas.setFillColor(WARNING_EDGE)
        canvas.setFont(fonts.bold, 8)
        canvas.drawString(MARGIN, bottom + 6.2 * mm, INTENDED_USE_HEADLINE)
        canvas.setFillColor(INK)
        page = f"Page {number} of {total}"
        identity_width = CONTENT_WIDTH - stringWidth(page, fonts.regular, 7.5) - 4 * mm  # never under the number
        identity, size = _fit_identity(self.identity, fonts, identity_width)
        _draw_runs(canvas, fonts, identity, MARGIN, bottom + 2.6 * mm, size)
        canvas.setFillColor(MUTED)
        canvas.setFont(fonts.regular, 7.5)
        canvas.drawRightString(
            MARGIN + CONTENT_WIDTH,
            bottom + 6.2 * mm,
            _fit(self.model_text, fonts, fonts.regular, 7.5, CONTENT_WIDTH * 0.45),
        )
        canvas.drawRightString(MARGIN + CONTENT_WIDTH, bottom + 2.6 * mm, page)
        canvas.restoreState()


NOT_ANALYSED_TITLE = "Chest X-ray AI analysis: study not analysed"


def build_not_analysed_pdf(
    node: NodeIdentity, *, reason: str, analysed_at: datetime, revision: Revision = FIRST
) -> bytes:
    """A one-page notice that the node looked at a study and analysed none of its images, and why.

    Patient identification travels in the Encapsulated PDF's DICOM header, so the page holds none. The
    institution's name and the reason are free text: drawn in runs, with the fallback font where the main
    one has no glyph (Helvetica printed a Tokyo hospital's name as black boxes)."""
    fonts = typeface()
    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=A4, invariant=True, initialFontName=fonts.regular)
    canvas.setTitle(NOT_ANALYSED_TITLE)
    canvas.setAuthor(node.name)
    y = PAGE_HEIGHT - 30 * mm
    lines = [
        (fonts.bold, 16, NOT_ANALYSED_TITLE),
        (fonts.regular, 11, f"{node.name} {node.institution_name}".strip()),
        (fonts.regular, 11, f"Checked at {analysed_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"),
        *([(fonts.bold, 10, revision_headline(revision))] if revision.number > 1 else []),
        (fonts.bold, 12, "No image of this study was analysed:"),
        # the reasons of all the study's images, joined: wrapped, not cut (a third reason was lost to "…")
        *((fonts.regular, 11, line) for line in _wrapped(reason, fonts, fonts.regular, 11, CONTENT_WIDTH)),
        (fonts.regular, 9, "The AI analyses frontal (PA/AP) chest radiographs (CR/DX) only."),
        (fonts.regular, 9, "Decision support, not a diagnosis."),
    ]
    for font, size, text in lines:
        _draw_runs(canvas, fonts, _fit(text, fonts, font, size, CONTENT_WIDTH), MARGIN, y, size, font)
        y -= size * 1.8
    canvas.showPage()
    canvas.save()
    return buffer.getvalue()


def _timestamp(moment: datetime) -> TimeStamp:
    stamp = TimeStamp(invariant=True)
    stamp.t = moment.timestamp()
    stamp.lt = time.gmtime(stamp.t)
    stamp.YMDhms = tuple(stamp.lt)[:6]
    return stamp


def _identity_line(source: pydicom.Dataset) -> tuple[str, str]:
    """Who and which study, repeated on every page in case pages are separated: the name, and the rest."""
    return patient_name(source), (
        f" · ID {_text(source.get('PatientID'))} · born {dicom_date_text(source.get('PatientBirthDate'))}"
        f" · accession {_text(source.get('AccessionNumber'))}"
    )


_FOOTER_SIZES = (8.0, 7.0, 6.0)


def _fit_identity(identity: tuple[str, str], fonts: Typeface, width: float) -> tuple[str, float]:
    """The footer's identity line and its size: smaller type for long values, then the name shortened.
    The patient ID, birth date and accession number are never cut: they tell one patient from another
    when the name cannot."""
    name, rest = identity
    for size in _FOOTER_SIZES:
        if _width(name + rest, fonts, fonts.regular, size) <= width:
            return name + rest, size
    size = _FOOTER_SIZES[-1]
    room = width - _width(rest, fonts, fonts.regular, size)
    if room < _width("…", fonts, fonts.regular, size):  # the identifiers alone are too wide: no name, and
        return _fit("…" + rest, fonts, fonts.regular, size, width), size  # they are cut at their end
    return _fit(name, fonts, fonts.regular, size, room) + rest, size


def _draw_runs(
    canvas: Canvas, fonts: Typeface, text: str, x: float, y: float, size: float, font: str | None = None
) -> None:
    """Draw ``text`` in ``font`` (default: regular), switching to the fallback font where it has no glyph."""
    for run_font, run in fonts.runs(text, font or fonts.regular):
        canvas.setFont(run_font, size)
        canvas.drawString(x, y, run)
        x += stringWidth(run, run_font, size)


def _width(text: str, fonts: Typeface, font: str, size: float) -> float:
    """Width of ``text`` as :func:`_draw_runs` draws it (fallback glyphs are wider than the main font's)."""
    return float(sum(stringWidth(run, run_font, size) for run_font, run in fonts.runs(text, font)))


def _fit_sized(
    text: str, fonts: Typeface, font: str, sizes: tuple[float, ...], width: float
) -> tuple[str, float]:
    """``text`` at the first of ``sizes`` it fits ``width`` points in, else shortened at the smallest."""
    for size in sizes:
        if _width(text, fonts, font, size) <= width:
            return text, size
    return _fit(text, fonts, font, sizes[-1], width), sizes[-1]


def _wrapped(text: str, fonts: Typeface, font: str, size: float, width: float) -> list[str]:
    """``text`` broken at spaces into lines that fit ``width`` points; a word wider than a line alone is
    shortened (:func:`_fit`)."""
    lines: list[str] = []
    for word in text.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and _width(joined, fonts, font, size) <= width:
            lines[-1] = joined
        else:
            lines.append(_fit(word, fonts, font, size, width))
    return lines or [""]


def _fit(text: str, fonts: Typeface, font: str, size: float, width: float) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` points."""
    if _width(text, fonts, font, size) <= width:
        return text
    while text and _width(text + "…", fonts, font, size) > width:
        text = text[:-1]
    return text + "…"
