"""The PDF summary: what a reader finds in its text, page by page, for each kind of study."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pydicom
import pypdf
import pytest

from reporting.pdf import (
    AGE_UNKNOWN_HEADLINE,
    INTENDED_USE_HEADLINE,
    build_not_analysed_pdf,
    build_pdf,
    patient_name,
    percent,
)
from reporting.study import FIRST
from reporting.typeface import fallback_font_file, typeface, visual
from reporting.types import AnalysedImage, NotAnalysedImage, Revision
from tests import peers
from tests.unit.test_reporting_cases import (
    ANALYSED_AT,
    BINARY,
    EARLIER,
    NODE,
    analysed,
    radiograph,
    sparse_source,
    three_image_study,
    unicode_source,
)

pytestmark = pytest.mark.unit


def pages(images: list[AnalysedImage], revision: Revision = FIRST) -> list[str]:
    reader = pypdf.PdfReader(io.BytesIO(build_pdf(images, NODE, analysed_at=ANALYSED_AT, revision=revision)))
    return [page.extract_text() for page in reader.pages]


def compact(text: str) -> str:
    return " ".join(text.split())


def test_single_image_page_shows_identity_result_confidences_model_and_intended_use() -> None:
    (text,) = pages([analysed()])
    text = compact(text)
    for expected in (
        "St. Elsewhere Hospital",
        "CompressedSamples, RG1",  # patient name
        "9RG1",  # patient ID
        "1940-03-05",  # birth date
        "exam Number",  # accession number
        "2004-08-26",  # study date
        "THORAX",  # study description
        "COVID-19",
        "Confidence 87.4 %",
        "Normal",
        "3.1 %",
        "Pneumonia",
        "9.5 %",
        "sugandi-cnn",
        "2026.11.21-ab12cd3",
        "2026-11-22 09:41:07 UTC",
        INTENDED_USE_HEADLINE,
        "has not been reviewed by a physician",
        "chest radiographs of adults",  # the scope of the model card's intended use
        "knows three answers only",  # and that any other finding is forced into one of them
        "1.3.6.1.4.1.5962.1.1.9.1.3.20040826185059.5457",  # the analysed instance
    ):
        assert expected in text, expected


def test_a_study_without_a_patient_age_asks_the_reader_to_confirm_an_adult_once() -> None:
    images = three_image_study()
    assert AGE_UNKNOWN_HEADLINE not in compact(" ".join(pages(images)))
    images[1] = dataclasses.replace(images[1], age_unknown=True)
    text = pages(images)
    assert [AGE_UNKNOWN_HEADLINE in compact(page) for page in text] == [True, False, False, False]
    assert "calls most radiographs of young children COVID-19" in compact(text[0])
    (single,) = pages([dataclasses.replace(analysed(sparse_source()), age_unknown=True)])
    assert AGE_UNKNOWN_HEADLINE in compact(single)
    assert "Confirm the patient's age before reading this result" in compact(single)


def test_unicode_patient_name_is_in_the_text() -> None:
    (text,) = pages([analysed(unicode_source("Müller^Zoë"))])
    assert "Müller, Zoë" in text


def test_japanese_patient_name_is_in_the_text() -> None:
    if fallback_font_file() is None:
        peers.missing("no CJK TrueType font (Debian fonts-droid-fallback)")
    (text,) = pages([analysed(unicode_source("Yamada^Tarou=山田^太郎=やまだ^たろう"))])
    assert "Yamada, Tarou / 山田 太郎 / やまだ たろう" in compact(text)


def test_korean_patient_name_is_in_the_text() -> None:
    """Droid Sans Fallback, the first fallback font, has no Hangul: the name was printed as boxes. Each
    character now takes the first installed fallback that has it (WenQuanYi Micro Hei)."""
    if not any(ord("홍") in points for _, points in typeface().fallbacks):
        peers.missing("no TrueType font with Hangul (Debian fonts-wqy-microhei)")
    (text,) = pages([analysed(unicode_source("홍^길동"))])
    assert "홍, 길동" in compact(text)


@pytest.mark.parametrize(
    ("name", "shown", "font"),
    [
        ("כהן^שרה", "הרש ,ןהכ", "NotoSansHebrew"),  # right to left: drawn in the order it is seen
        ("كوهين^سارة", "ﺓﺭﺎﺳ ,ﻦﻴﻫﻮﻛ", "NotoSansArabic"),  # and Arabic letters in their joined forms
        ("สมชาย^ใจดี", "สมชาย, ใจดี", "NotoSansThai"),
        ("शर्मा^प्रिया", "शर्मा, प्रिया", "NotoSansDevanagari"),
    ],
    ids=["hebrew", "arabic", "thai", "devanagari"],
)
def test_a_name_in_a_script_of_its_own_is_drawn_with_a_font_that_has_it(
    name: str, shown: str, font: str
) -> None:
    """Arabic, Hebrew, Thai and Devanagari names printed as empty boxes (no fallback font had them), and
    with a font Arabic and Hebrew came out reversed, the Arabic letters unjoined (review)."""
    if not any(ord(name[0]) in points for _, points in typeface().fallbacks):
        peers.missing(f"no TrueType font for {name[0]!r} (Debian fonts-noto-core)")
    assert visual(name.replace("^", ", ")) == shown
    faces = typeface()
    assert all(ord(char) in faces.covered or any(ord(char) in points for _, points in faces.fallbacks)
               for char in shown), "a character no font has: drawn as a box"
    data = build_pdf([analysed(unicode_source(name))], NODE, analysed_at=ANALYSED_AT)
    reader = pypdf.PdfReader(io.BytesIO(data))
    fonts = {str(f["/BaseFont"]) for f in reader.pages[0]["/Resources"]["/Font"].values()}
    assert any(font in embedded for embedded in fonts), fonts


def test_no_report_names_a_font_it_does_not_embed() -> None:
    """Every page named Helvetica, unembedded, which archives and PDF/A validators flag: reportlab's
    default for table cells and drawings, and SimpleDocTemplate's initial font (review)."""
    def embedded(font: Any) -> bool:
        font = font.get_object()
        if "/DescendantFonts" in font:
            font = font["/DescendantFonts"][0].get_object()
        descriptor = font.get("/FontDescriptor")
        return descriptor is not None and any(
            key in descriptor.get_object() for key in ("/FontFile", "/FontFile2", "/FontFile3")
        )

    reader = pypdf.PdfReader(io.BytesIO(build_pdf([analysed(), analysed()], NODE, analysed_at=ANALYSED_AT)))
    for page in reader.pages:
        fonts = list(page["/Resources"]["/Font"].values())
        assert all(embedded(font) for font in fonts), [str(font["/BaseFont"]) for font in fonts]


def test_a_long_studys_summary_repeats_its_headings_on_the_next_page() -> None:
    """Rows 11 to 16 of a 16-image study's summary stood on page 2 without the headings (review)."""
    texts = [compact(text) for text in pages([analysed() for _ in range(30)])]
    summary = [text for text in texts if "Series / instance" in text]
    assert len(summary) == 2 and summary == texts[:2], "the summary's second page has no headings"


def test_japanese_institution_name_in_the_page_header_is_in_the_text() -> None:
    """The header is drawn on the canvas, not in a Paragraph: it needs the fallback font as well."""
    if fallback_font_file() is None:
        peers.missing("no CJK TrueType font (Debian fonts-droid-fallback)")
    node = dataclasses.replace(NODE, institution_name="東京中央病院")
    reader = pypdf.PdfReader(io.BytesIO(build_pdf([analysed()], node, analysed_at=ANALYSED_AT)))
    assert "東京中央病院" in reader.pages[0].extract_text()


@pytest.mark.parametrize("institution", ["Πανεπιστημιακό Νοσοκομείο", "東京都立病院"])
def test_the_not_analysed_notice_prints_the_institutions_name_in_its_own_script(institution: str) -> None:
    """The notice drew in Helvetica, which has neither CJK nor all of Greek: black boxes on the page, and
    fonts that were not embedded."""
    if "東" in institution and fallback_font_file() is None:
        peers.missing("no CJK TrueType font (Debian fonts-droid-fallback)")
    node = dataclasses.replace(NODE, institution_name=institution)
    data = build_not_analysed_pdf(node, reason="body part HAND is not CHEST", analysed_at=ANALYSED_AT)
    reader = pypdf.PdfReader(io.BytesIO(data))
    text = compact(reader.pages[0].extract_text())
    assert institution in text and "body part HAND is not CHEST" in text
    fonts = {str(font["/BaseFont"]) for font in reader.pages[0]["/Resources"]["/Font"].values()}
    assert not any("Helvetica" in font for font in fonts), fonts


def test_the_not_analysed_notice_prints_every_reason_of_the_study_whole() -> None:
    """The pipeline joins the distinct reasons of a study's images; the notice cut the line at the page's
    width, so that a third reason (the patient's age, here) ended in "…" and was lost to the reader."""
    reasons = [
        "a DX image for processing (raw detector data), not for presentation",
        "the patient is younger than 18 years by Patient Age or Birth Date",
        "view position LL is not frontal (PA/AP)",
    ]
    data = build_not_analysed_pdf(NODE, reason="; ".join(reasons), analysed_at=ANALYSED_AT)
    text = compact(pypdf.PdfReader(io.BytesIO(data)).pages[0].extract_text())
    assert "…" not in text
    assert "; ".join(reasons) in text


def longest_identity() -> pydicom.Dataset:
    source = unicode_source("Wolfeschlegelsteinhausenbergerdorff^Hubert Blaine Maximilian^von^Dr.^PhD")
    source.PatientID = "1.2.840.113619.2.55.3.604688119.969.1268071029.320.1234567890123"
    source.StudyDescription = "CHEST PA AND LATERAL TWO VIEWS WITH COMPARISON TO PRIOR EXAMINATION"[:64]
    source.AccessionNumber = "ACC1234567890123"
    return source


def test_one_image_with_the_longest_identity_values_stays_on_one_page() -> None:
    """Values at their VRs' maximum lengths (LO 64) wrap in the identity table; the pictures went to a
    second page, leaving half of the first empty."""
    source = longest_identity()
    (text,) = pages([analysed(source)])
    # the footer, for a page separated from the rest, keeps the ID and accession whole (it cut both)
    footer = compact(text).split("Dr. Wolfeschlegel")[-1]
    assert f"ID {source.PatientID} · born 1940-03-05 · accession ACC1234567890123" in footer, footer


def test_one_image_with_every_caution_stays_on_one_page() -> None:
    """A revision 2 of a doubted image without a patient age split over two pages: the pictures, the SOP
    Instance UID and the model's line on the second, under seven empty centimetres on the first (review).
    The pictures take the height the page has left, down to 30 mm."""
    image = analysed(negative=True)
    assert image.prediction.doubt is not None
    (text,) = pages([dataclasses.replace(image, age_unknown=True)], Revision(2, EARLIER))
    assert "Radiograph" in text and "SOP Instance UID" in text and "Analysed" in text


def test_missing_accession_and_birth_date_print_as_not_recorded() -> None:
    (text,) = pages([analysed(sparse_source(), with_heatmap=False)])
    assert "None" not in text
    assert "No heat map was computed" in text
    assert "accession —" in compact(text)


def test_three_image_study_has_a_summary_and_a_page_per_image() -> None:
    images = three_image_study()
    texts = [compact(text) for text in pages(images)]
    assert len(texts) == 4
    summary = texts[0]
    for expected in ("COVID-19", "87.4 %", "Pneumonia", "83.0 %", "Indeterminate", "41.0 % (COVID-19)"):
        assert expected in summary
    for number, (text, image) in enumerate(zip(texts[1:], images, strict=True), start=1):
        assert f"Image {number} of 3" in text
        assert image.source.SOPInstanceUID in text
        assert f"Page {number + 1} of 4" in text
        assert INTENDED_USE_HEADLINE in text and "9RG1" in text  # every page: intended use, patient
    assert "Most likely COVID-19 at 41.0 %, below the confidence threshold" in texts[3]


def test_binary_model_result() -> None:
    (text,) = pages([analysed(probabilities={"covid": 0.12, "non-covid": 0.88}, model=BINARY)])
    text = compact(text)
    assert "No COVID-19 pattern" in text and "Confidence 88.0 %" in text and "12.0 %" in text
    assert "resnet152-transfer" in text


def test_rebuilding_gives_the_same_bytes() -> None:
    images = [analysed()]
    assert build_pdf(images, NODE, analysed_at=ANALYSED_AT) == build_pdf(
        images, NODE, analysed_at=ANALYSED_AT
    )


def test_name_and_percent_formats() -> None:
    source = unicode_source("Doe^John^Q^Dr.^Jr.")
    assert patient_name(source) == "Dr. Doe, John Q Jr."
    assert percent(0.8744) == "87.4 %"
    assert percent(1.0) == "100.0 %"


def test_markup_characters_in_names_are_printed_not_interpreted() -> None:
    node = dataclasses.replace(NODE, name="Radiology <North> & South", institution_name="")
    source = unicode_source("O'Brien & Sons^<Anna>")
    reader = pypdf.PdfReader(io.BytesIO(build_pdf([analysed(source)], node, analysed_at=ANALYSED_AT)))
    text = compact(reader.pages[0].extract_text())
    assert "O'Brien & Sons, <Anna>" in text
    assert "Radiology <North> & South" in text


def test_a_name_and_an_id_of_several_values_are_printed_as_dicom_values_not_python_lists() -> None:
    """A backslash in a header value makes it several (pydicom reads a MultiValue): the page printed the
    list's repr, "[Doe, John, Roe Jane]" and "ID ['A', 'B']", in the identity table and every footer."""
    source = radiograph()
    source.PatientName = "Doe^John\\Roe^Jane"
    source.PatientID = "9RG1\\OTHER-7"
    text = compact(pages([analysed(source)])[0])
    assert "[" not in text and "'" not in text
    assert "Doe, John; Roe, Jane · ID 9RG1\\OTHER-7 · born 1940-03-05" in text


def test_the_footer_identity_never_runs_past_its_width() -> None:
    """A 64-character Patient ID of wide letters and a full accession number are wider than the footer
    even at 6 pt: the line ran under "Page 1 of 1" and off the page."""
    from reporting.pdf import _fit_identity, _width
    from reporting.typeface import typeface

    fonts = typeface()
    width = 400.0
    wide = " · ID " + "W" * 64 + " · born 1940-03-05 · accession ACC1234567890123"
    for identity in (("Doe, Jane", wide), ("Doe, Jane", " · ID 123 · born 1940-03-05 · accession A1")):
        text, size = _fit_identity(identity, fonts, width)
        assert _width(text, fonts, fonts.regular, size) <= width, text
    assert _fit_identity(("Doe, Jane", " · ID 123"), fonts, width) == ("Doe, Jane · ID 123", 8.0)
    text, _ = _fit_identity(("Doe, Jane", wide), fonts, width)
    assert text.startswith("… · ID WWW")  # the name goes before any of the ID (review)


def test_a_revised_report_says_at_its_top_which_report_it_replaces() -> None:
    """A printed revision 2 must not be taken for the report it replaces; the old code printed the two
    alike but for the analysis time (PACS administrator's review). Revision 1 says nothing of the kind."""
    replaced = "REVISION 2 — REPLACES THE REPORT OF 2026-11-22 08:12:45 UTC"
    (first,) = pages([analysed()])
    assert "REVISION" not in first and "REPLACES" not in first
    (text,) = pages([analysed()], Revision(2, EARLIER))  # one image: still one page
    text = compact(text)
    assert text.index(replaced) < text.index("DECISION SUPPORT — NOT A DIAGNOSIS")  # above everything else
    assert "This one covers the image of the study; the earlier report is out of date." in text
    summary = compact(pages(three_image_study(), Revision(3, EARLIER))[0])
    assert "REVISION 3 — REPLACES THE REPORT OF 2026-11-22 08:12:45 UTC" in summary
    assert "This one covers all 3 analysed images of the study" in summary
    notice = build_not_analysed_pdf(NODE, reason="body part HAND is not CHEST", analysed_at=ANALYSED_AT,
                                    revision=Revision(2, EARLIER))
    assert replaced in compact(pypdf.PdfReader(io.BytesIO(notice)).pages[0].extract_text())


def test_an_institution_name_of_64_characters_is_printed_whole_in_the_header() -> None:
    """The header cut a name past about 40 characters at 12 pt; LO allows 64, and a university hospital's
    full name uses them. Smaller type first, the ellipsis only past what 8.5 pt holds."""
    name = "Universitätsklinikum Hamburg-Eppendorf, Klinik für Radiologie AB"
    assert len(name) == 64
    node = dataclasses.replace(NODE, institution_name=name)
    reader = pypdf.PdfReader(io.BytesIO(build_pdf([analysed()], node, analysed_at=ANALYSED_AT)))
    assert name in compact(reader.pages[0].extract_text())


def test_the_longest_identity_values_take_at_most_four_lines_a_row() -> None:
    """The Patient ID and Study description columns were as narrow as Sex's: a 64-character ID took five
    lines and the description six, pushing an image with every caution onto a second page (review)."""
    from reporting.pdf import CONTENT_WIDTH, _identity_table, _Styles
    from reporting.typeface import typeface

    fonts = typeface()
    styles = _Styles.make(fonts)
    table = _identity_table(longest_identity(), "1", styles, fonts)
    table.wrap(CONTENT_WIDTH, 1000)
    line = styles.value.leading
    label = styles.label.leading
    padding = 3.5 * 72 / 25.4  # top and bottom padding, 1.5 + 2 mm
    for height in table._rowHeights:
        assert height <= label + 4 * line + padding + 0.5, (height, line)


def test_an_indeterminate_result_is_printed_below_its_threshold_and_names_it() -> None:
    """0.49996 was printed "50.0 %, below the confidence threshold", and a positive result of 0.50004
    "Confidence 50.0 %": the same figure on either side of a threshold no page named (review)."""
    below = analysed(probabilities={"covid": 0.49996, "normal": 0.3, "pneumonia": 0.20004})
    reader = pypdf.PdfReader(io.BytesIO(build_pdf([below], NODE, analysed_at=ANALYSED_AT, threshold=0.5)))
    text = compact(reader.pages[0].extract_text())
    assert "Most likely COVID-19 at 49.9 %, below the confidence threshold of 50 %" in text
    assert "50.0 %" not in text.split("AI RESULT")[1].split("CONFIDENCE PER CLASS")[0]
    (unnamed,) = pages([below])  # a caller that does not give the threshold: the sentence without it
    assert "below the confidence threshold: no class is reported" in compact(unnamed)


def test_the_heat_map_caption_names_the_class_it_shows() -> None:
    """The map is the top class's, also under an indeterminate finding; the caption said only "regions
    that most influenced the model", where the heat-map Secondary Capture names the class (review)."""
    below = analysed(probabilities={"covid": 0.2, "normal": 0.35, "pneumonia": 0.45})
    (text,) = pages([below])
    assert "regions that most influenced the model towards Pneumonia (red = most)" in compact(text)

def test_the_intended_use_names_the_answers_of_the_model_that_gave_them() -> None:
    """It said "knows three answers only" under a COVID-19 / non-COVID model's result (review)."""
    (text,) = pages([analysed(probabilities={"covid": 0.2, "non-covid": 0.8}, model=BINARY)])
    assert "knows two answers only (COVID-19, No COVID-19 pattern)" in compact(text)
    (text,) = pages([analysed()])
    assert "knows three answers only (COVID-19, Normal, Pneumonia)" in compact(text)


def test_the_study_s_images_not_analysed_are_named_with_their_reasons() -> None:
    """A lateral view skipped beside a classified PA one was in no report: "Images analysed 1", and the
    reader could take the report's silence about it for a finding (review)."""
    lateral = radiograph()
    lateral.ViewPosition, lateral.SeriesNumber, lateral.InstanceNumber = "LL", 3, 1
    skipped = NotAnalysedImage(lateral, "view position LL is not frontal (PA/AP)")
    reader = pypdf.PdfReader(io.BytesIO(build_pdf([analysed()], NODE, analysed_at=ANALYSED_AT,
                                                  not_analysed=[skipped])))
    text = compact(" ".join(page.extract_text() for page in reader.pages))
    assert "Images analysed 1 of 2" in text
    assert "1 OTHER IMAGE OF THIS STUDY NOT ANALYSED" in text
    assert "CR, LL, series 3, instance 1: view position LL is not frontal (PA/AP)" in text
    assert "The model says nothing about these images" in text
    assert len(reader.pages) == 1
