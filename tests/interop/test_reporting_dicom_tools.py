"""The result objects as the standard's own tools see them: dicom3tools ``dciodvfy`` validates the SR, the
Encapsulated PDF and the heat-map Secondary Capture; DCMTK ``dsrdump`` renders the SR; poppler's
``pdftotext``/``pdftoppm`` read and draw the PDF taken back out of the Encapsulated PDF instance."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from reporting import codes
from reporting.encapsulated import build_encapsulated_pdf
from reporting.pdf import FINDING_COLOURS, build_pdf, percent
from reporting.secondary_capture import build_heatmap_sc
from reporting.sr import build_sr
from reporting.typeface import fallback_font_file
from reporting.types import AnalysedImage
from tests import peers
from tests.unit.test_reporting_cases import (
    ANALYSED_AT,
    NODE,
    analysed,
    doubted_study,
    japanese_source,
    sparse_source,
    three_image_study,
    unicode_source,
)

pytestmark = [pytest.mark.interop, pytest.mark.filterwarnings("ignore:The string .* person name:UserWarning")]

# Every dciodvfy warning we accept, with the reason; any other warning or any error fails the test.
JUSTIFIED_WARNINGS = {
    "Retired Person Name form": (
        "RG1_UNCI.dcm's Referring Physician's Name is 'ward' (one component); the patient/study modules are "
        "copied verbatim from the source, as they must be"
    ),
    "Unrecognized defined term <99CXRNODE>": (
        "our private coding scheme (PS3.16 section 8, '99' prefix), declared in the Coding Scheme "
        "Identification Sequence; dciodvfy only knows registered coding scheme designators"
    ),
}

CASES: dict[str, Callable[[], list[AnalysedImage]]] = {
    "rg1": lambda: [analysed()],
    "unicode": lambda: [analysed(unicode_source("Müller^Zoë"))],
    "japanese": lambda: [analysed(japanese_source())],
    "sparse": lambda: [analysed(sparse_source())],
    "three-images": three_image_study,
    "doubted": doubted_study,
}


def run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, timeout=120, check=False)
    return (result.stdout + result.stderr).decode("utf-8", errors="replace")


def assert_valid(path: Path, iod: str) -> None:
    output = run(peers.executable("dciodvfy"), str(path))
    assert iod in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert not errors, output
    unexplained = [
        line
        for line in output.splitlines()
        if line.startswith("Warning") and not any(known in line for known in JUSTIFIED_WARNINGS)
    ]
    assert not unexplained, output


@pytest.fixture(scope="module", params=list(CASES))
def written(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[AnalysedImage], Path, Path]:
    """Each case built and written once, then checked by every tool."""
    if request.param == "japanese" and fallback_font_file() is None:
        peers.missing("no CJK TrueType font (Debian fonts-droid-fallback)")
    images = CASES[request.param]()
    tmp_path = tmp_path_factory.mktemp(request.param)
    sr_path, pdf_path = tmp_path / "sr.dcm", tmp_path / "report.dcm"
    build_sr(
        images,
        NODE,
        series_instance_uid="1.2.826.0.1.3680043.8.498.1001",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1002",
        analysed_at=ANALYSED_AT,
    ).save_as(sr_path, enforce_file_format=True)
    pdf = build_pdf(images, NODE, analysed_at=ANALYSED_AT)
    build_encapsulated_pdf(
        pdf,
        images[0].source,
        NODE,
        series_instance_uid="1.2.826.0.1.3680043.8.498.2001",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.2002",
        created_at=ANALYSED_AT,
        referenced=[image.source for image in images],
    ).save_as(pdf_path, enforce_file_format=True)
    return images, sr_path, pdf_path


def test_dciodvfy_finds_no_errors(written: tuple[list[AnalysedImage], Path, Path]) -> None:
    _, sr_path, pdf_path = written
    assert_valid(sr_path, "Comprehensive3DSR")
    assert_valid(pdf_path, "EncapsulatedPDF")


def test_dsrdump_renders_finding_probabilities_model_and_patient(
    written: tuple[list[AnalysedImage], Path, Path],
) -> None:
    images, sr_path, _ = written
    text = run(peers.executable("dsrdump"), str(sr_path))
    assert "Completion Flag     : COMPLETE" in text and "Verification Flag   : UNVERIFIED" in text
    assert str(images[0].source.PatientName) in text  # all forms, e.g. Yamada^Tarou=山田^太郎=やまだ^たろう
    for image in images:
        prediction = image.prediction
        meaning = codes.finding_for(prediction.label).code.meaning
        assert f'CODE:(,,"Imaging finding")=({codes.finding_for(prediction.label).code.value},' in text
        assert meaning in text
        for label, probability in prediction.probabilities.items():
            name = codes.finding_for(label).probability_code.meaning
            assert re.search(rf'NUM:\(,,"{re.escape(name)}"\)="{probability:g}"', text), (name, text)
    assert f'"Algorithm Version")="{images[0].prediction.model.version}"' in text
    assert text.count('"Measurement Group")') == len(images)
    doubts = [codes.doubt_code(image.prediction) for image in images]
    assert text.count('CODE:(,,"Quality Finding")') == sum(code is not None for code in doubts)
    for code in {code for code in doubts if code is not None}:
        assert f'CODE:(,,"Quality Finding")=({code.value},{code.scheme_designator},"{code.meaning}")' in text


def test_pdf_inside_the_dicom_object_reads_and_renders(
    written: tuple[list[AnalysedImage], Path, Path], tmp_path: Path
) -> None:
    images, _, pdf_path = written
    ds = pydicom.dcmread(pdf_path)
    pdf_file = tmp_path / "report.pdf"
    pdf_file.write_bytes(ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength])
    text = " ".join(run(peers.executable("pdftotext"), "-enc", "UTF-8", str(pdf_file), "-").split())
    source = images[0].source
    for expected in (
        str(source.PatientID),
        "DECISION SUPPORT — NOT A DIAGNOSIS",
        images[0].prediction.model.version,
    ):
        assert expected in text
    if "AccessionNumber" in source:
        assert str(source.AccessionNumber) in text
    for image in images:
        assert codes.finding_for(image.prediction.label).display in text
        for probability in image.prediction.probabilities.values():
            assert percent(probability) in text
    doubted = [image.prediction.doubt for image in images if image.prediction.doubt]
    assert text.count("THE MODEL'S OWN CHECKS DOUBT THIS IMAGE") == len(doubted)
    assert text.count("the model's checks doubt this image") == (len(doubted) if len(images) > 1 else 0)
    for doubt in doubted:
        assert f"{doubt[0].upper()}{doubt[1:]}." in text

    # drawn, the first image's result colour is large enough to be seen at a glance
    page = "2" if len(images) > 1 else "1"  # several images: a summary page comes first
    run(
        peers.executable("pdftoppm"),
        "-png",
        "-r",
        "40",
        "-f",
        page,
        "-l",
        page,
        str(pdf_file),
        str(tmp_path / "page"),
    )
    (png,) = tmp_path.glob("page*.png")
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    colour = FINDING_COLOURS[codes.finding_for(images[0].prediction.label).key]
    target = np.array([round(255 * colour.red), round(255 * colour.green), round(255 * colour.blue)])
    near = (np.abs(pixels - target).sum(axis=-1) < 60).sum()
    assert near > 300, near


def test_heatmap_secondary_capture_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "sc.dcm"
    build_heatmap_sc(
        analysed(unicode_source()),
        NODE,
        series_instance_uid="1.2.826.0.1.3680043.8.498.3001",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.3002",
    ).save_as(path, enforce_file_format=True)
    assert_valid(path, "SCImage")


def test_a_long_patient_name_is_cut_before_the_page_number_of_the_footer(tmp_path: Path) -> None:
    source = unicode_source("VERYLONGFAMILYNAME" * 3 + "^" + "GIVENNAME" * 6 + "^MIDDLE^DR^PHD")
    pdf_file = tmp_path / "report.pdf"
    pdf_file.write_bytes(build_pdf([analysed(source)], NODE, analysed_at=ANALYSED_AT))
    html = run(peers.executable("pdftotext"), "-bbox", "-enc", "UTF-8", str(pdf_file), "-")
    words = [
        (float(x0), float(y0), float(x1), text)
        for x0, y0, x1, text in re.findall(
            r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="[\d.]+">([^<]*)</word>', html
        )
    ]
    page_x, page_y = next((x0, y0) for x0, y0, _, text in words if text == "Page")
    footer = [(x0, x1, text) for x0, y0, x1, text in words if abs(y0 - page_y) < 2 and x0 < page_x]
    # the name was shortened, not the identifiers after it ...
    assert footer and any(text.endswith("…") for _, _, text in footer) and footer[-1][2] == "Number"
    assert max(x1 for _, x1, _ in footer) < page_x - 5  # ... and ends clear of "Page 1 of 1"
