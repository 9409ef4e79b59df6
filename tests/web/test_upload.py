"""Upload & classify: the console's upload page, through the real classifier, PDF and ingest."""

from __future__ import annotations

import io
import struct
import subprocess
import zlib
from html import unescape as html_unescape
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless, generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.eligibility import MODEL_SCOPE, UNKNOWN_AGE
from dicom_node.errors import (
    ConflictError,
    DatabaseUnavailableError,
    NodeError,
    NotFoundError,
    StorageError,
)
from dicom_node.settings import Settings
from dicom_node.store.db import session_scope
from dicom_node.store.models import AuditEvent, Instance
from dicom_node.web import create_app
from dicom_node.web.services import Upload
from dicom_node.web.uploads import UploadStore
from reporting.heatmap import overlay
from tests import peers
from tests.web.conftest import RADIOLOGIST, login

pytestmark = [pytest.mark.unit]


def chest_like_png(size: tuple[int, int] = (640, 560)) -> bytes:
    """A synthetic frontal-chest-like picture: bright mediastinum between two dark lung fields."""
    w, h = size
    x = np.linspace(-1.0, 1.0, w)[None, :]
    y = np.linspace(-1.0, 1.0, h)[:, None]
    lungs = np.exp(-(((np.abs(x) - 0.45) / 0.22) ** 2) - ((y + 0.05) / 0.55) ** 2)
    image = 0.85 - 0.6 * lungs + 0.03 * np.sin(40 * y)
    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def radiograph_png(max_size: int = 640, transpose: Image.Transpose | None = None) -> bytes:
    """A real chest radiograph as a picture: the hospital CR RG1 of pydicom-data, as the console shows it
    (``transpose``: turned). The synthetic ``chest_like_png`` is too unlike a radiograph for the model: it
    refuses to classify it."""
    import pydicom

    from classifier.preprocess import display_image

    pixels = display_image(pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm")), max_size=max_size)
    buffer = io.BytesIO()
    picture = Image.fromarray(pixels)
    (picture if transpose is None else picture.transpose(transpose)).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload(client: TestClient, csrf: str, name: str, data: bytes, mime: str) -> str:
    response = client.post("/upload", data={"csrf_token": csrf}, files={"file": (name, data, mime)})
    assert response.status_code == 303, response.text
    location: str = response.headers["location"]
    return location.rsplit("/", 1)[1]


def test_png_upload_is_shown_before_classification(rad_client: tuple[TestClient, str]) -> None:
    client, csrf = rad_client
    png = chest_like_png()
    token = _upload(client, csrf, "chest.png", png, "image/png")
    page = client.get(f"/upload/{token}").text
    assert f'src="/upload/{token}/image.png"' in page
    assert 'id="classify"' in page and "Save report" not in page  # report only after classifying
    assert 'id="picture-hint"' in page and "of an adult" in page  # no header to check: the user is asked to
    assert "chest.png" in page
    preview = client.get(f"/upload/{token}/image.png")
    assert preview.headers["cache-control"] == "no-store"  # not kept in the browser after logout
    shown = Image.open(io.BytesIO(preview.content))
    assert shown.size == (640, 560) and shown.mode == "L"
    assert np.array_equal(np.asarray(shown), np.asarray(Image.open(io.BytesIO(png)).convert("L")))
    unclassified = client.get(f"/upload/{token}/report.pdf")  # held, not classified yet: not "gone" (404)
    assert unclassified.status_code == 409
    assert "classify the image before saving the report" in unclassified.text
    assert client.get(f"/api/uploads/{token}/report.pdf").status_code == 409


def test_large_pictures_are_shown_downscaled(rad_client: tuple[TestClient, str]) -> None:
    client, csrf = rad_client
    buffer = io.BytesIO()
    Image.new("L", (2500, 2000), 128).save(buffer, format="JPEG")
    token = _upload(client, csrf, "big.jpg", buffer.getvalue(), "image/jpeg")
    shown = Image.open(io.BytesIO(client.get(f"/upload/{token}/image.png").content))
    assert max(shown.size) == 1024


def test_a_picture_is_shown_as_the_model_reads_it(rad_client: tuple[TestClient, str]) -> None:
    """Turned by its EXIF orientation, as the model turns it (a phone photograph of a film), so the heat map
    lies where the model looked; and a 16-bit PNG of a 12-bit radiograph scaled by its bits, not white."""
    client, csrf = rad_client
    radiograph = Image.open(io.BytesIO(radiograph_png(max_size=320)))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored a quarter turn anticlockwise: a viewer turns it clockwise
    buffer = io.BytesIO()
    radiograph.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=95, exif=exif)
    token = _upload(client, csrf, "phone.jpg", buffer.getvalue(), "image/jpeg")
    shown = np.asarray(Image.open(io.BytesIO(client.get(f"/upload/{token}/image.png").content)), dtype=float)
    assert shown.shape == np.asarray(radiograph).shape  # upright again, not on its side
    assert np.abs(shown - np.asarray(radiograph)).mean() < 3.0
    twelve_bit = np.round(np.asarray(radiograph, dtype=np.float64) / 255.0 * 4095).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(twelve_bit).save(buffer, format="PNG")
    token = _upload(client, csrf, "twelve-bit.png", buffer.getvalue(), "image/png")
    shown = np.asarray(Image.open(io.BytesIO(client.get(f"/upload/{token}/image.png").content)), dtype=float)
    assert np.abs(shown - np.asarray(radiograph)).mean() < 1.0


def _png_header_only(width: int, height: int) -> bytes:
    """The signature and IHDR of a greyscale PNG of this size, and its end: Pillow reads the size first."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _animated_png() -> bytes:
    first = Image.open(io.BytesIO(chest_like_png()))
    buffer = io.BytesIO()
    turned = first.transpose(Image.Transpose.ROTATE_180)
    first.save(buffer, format="PNG", save_all=True, append_images=[turned])
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, for large.png
def test_non_images_are_refused_with_a_message(rad_client: tuple[TestClient, str]) -> None:
    client, csrf = rad_client
    preamble = b"\0" * 128 + b"DICM"
    for name, data, message in (
        ("notes.txt", b"hello", "not a DICOM, PNG or JPEG file"),
        ("fake.dcm", preamble + b"\x02\x00garbage", "the DICOM file holds no image"),
        ("empty.dcm", preamble, "the DICOM file holds no image"),  # a preamble and nothing after it
        # A data set saved without its file preamble, and a PNG whose header claims 400 megapixels: both
        # were "not a DICOM, PNG or JPEG file", which neither is the reason for.
        ("bare.dcm", peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes()[132:],
         "without the DICOM file header (no 128-byte preamble and &#39;DICM&#39;)"),
        ("huge.png", _png_header_only(20_000, 20_000),
         "the picture is too large to decode (more than 64 megapixels)"),
        # Past the node's limit, not Pillow's: Pillow only warns up to 179 megapixels, and such a picture
        # of 0.7 MB took 645 MB (review).
        ("large.png", _png_header_only(13_000, 13_000),
         "the picture is too large to decode (13000 × 13000 pixels; at most 64 megapixels)"),
        # An animated PNG was classified by its first frame without a word; a multi-frame DICOM is refused.
        ("two.png", _animated_png(),
         "an animated or multi-page picture (2 frames); the model reads single radiographs"),
    ):
        response = client.post(
            "/upload", data={"csrf_token": csrf}, files={"file": (name, data, "application/octet-stream")}
        )
        assert response.status_code == 422
        assert 'class="msg bad"' in response.text and message in response.text, name
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    response = client.post(
        "/upload", data={"csrf_token": csrf}, files={"file": ("x.gif", gif.getvalue(), "image/gif")}
    )
    assert "not a DICOM, PNG or JPEG file: only these are accepted" in response.text


def test_a_dicom_upload_too_large_to_decode_is_refused_with_the_reason(
    rad_client: tuple[TestClient, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two uploads of a few kilobytes that made the node allocate gigabytes (review): a deflated data set
    of zeros (inflated whole by pydicom; the limit is 2 MB here, 256 MB in service), and RLE declaring
    30,000 × 30,000 pixels (the decoder allocated 1.7 GB for the upload page's preview)."""
    from dicom_node import part10
    from tests.node_datasets import make_cr, to_bytes

    client, csrf = rad_client
    monkeypatch.setattr(part10, "MAX_INFLATED_BYTES", 2 << 20)
    bomb = make_cr(rows=1100, columns=1024)
    bomb.PixelData = bytes(len(bomb.PixelData))
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = to_bytes(bomb)
    assert len(data) < 20_000
    response = client.post(
        "/upload", data={"csrf_token": csrf}, files={"file": ("bomb.dcm", data, "application/dicom")}
    )
    assert response.status_code == 422 and "the deflated data set inflates past 2 MB" in response.text
    declaring = make_cr()
    declaring.compress(RLELossless)
    declaring.Rows = declaring.Columns = 30000
    token = _upload(client, csrf, "declaring.dcm", to_bytes(declaring), "application/dicom")
    image = client.get(f"/upload/{token}/image.png")
    reason = "the image is too large to decode (30000 × 30000 pixels; at most 64 megapixels)"
    assert image.status_code == 422 and reason in image.text
    classify = client.post(f"/upload/{token}/classify", data={"csrf_token": csrf})
    assert classify.status_code == 422 and reason in classify.text


def test_an_upload_is_read_beside_another_sites_cookie(rad_client: tuple[TestClient, str]) -> None:
    """The body guard read the session cookie with http.cookies, which drops the whole Cookie header
    for one value with a space: a logged-in user was sent to the login page on every upload."""
    client, csrf = rad_client
    cookie = f"pref=dark mode; cxr_session={client.cookies['cxr_session']}"
    response = client.post("/upload", data={"csrf_token": csrf}, headers={"Cookie": cookie},
                           files={"file": ("chest.png", chest_like_png(), "image/png")})
    assert response.status_code == 303 and response.headers["location"].startswith("/upload/"), response.headers


def test_an_upload_is_private_to_its_user(
    rad_client: tuple[TestClient, str], app: object, accounts: dict[str, int]
) -> None:
    client, csrf = rad_client
    token = _upload(client, csrf, "chest.png", chest_like_png(), "image/png")
    from tests.web.conftest import ADMIN

    with TestClient(app, follow_redirects=False) as other:  # type: ignore[arg-type]
        login(other, *ADMIN)
        assert other.get(f"/upload/{token}").status_code == 404
        assert other.get(f"/upload/{token}/image.png").status_code == 404


def test_the_uploads_held_together_stay_within_their_memory_limit() -> None:
    """Each user's latest four were held whatever their size, so many users' uploads added up without a
    bound (review). The oldest of anyone's go first; the newest is always held."""
    store = UploadStore(per_user=4, max_bytes=3_000_000)

    def picture(side: int) -> Upload:
        return Upload(filename="chest.png", data=b"\0" * 1000, image=Image.new("L", (side, side)))

    first, second, third = (store.add(user, picture(1000)) for user in (1, 2, 3))  # 1,001,000 bytes each
    with pytest.raises(NotFoundError):
        store.get(1, first.token)
    assert store.get(2, second.token) is second and store.get(3, third.token) is third
    huge = store.add(4, picture(2000))  # more than the limit alone
    assert store.get(4, huge.token) is huge
    for user, held in ((2, second), (3, third)):
        with pytest.raises(NotFoundError):
            store.get(user, held.token)


def test_dicom_upload_shows_its_patient(rad_client: tuple[TestClient, str]) -> None:
    client, csrf = rad_client
    data = peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes()
    token = _upload(client, csrf, "RG1_UNCI.dcm", data, "application/dicom")
    page = client.get(f"/upload/{token}").text
    assert "CompressedSamples, RG1" in page and "9RG1" in page and "2004-08-26" in page
    assert 'id="store"' in page  # DICOM can be stored in the node and sent on
    assert 'id="classify"' in page and 'id="ineligible"' not in page  # CR CHEST PA: the model's input


def test_a_dicom_upload_shows_values_of_several_as_dicom_values_not_python_lists(
    rad_client: tuple[TestClient, str],
) -> None:
    """A backslash in a header value makes it several (pydicom reads a MultiValue): the upload page showed
    "['9RG1', 'OTHER-7']", a name as "[Doe, John, Roe Jane]", where the PDF prints them as DICOM does."""
    client, csrf = rad_client
    ds = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
    ds.PatientName = "Doe^John\\Roe^Jane"
    ds.PatientID = "9RG1\\OTHER-7"
    ds.AccessionNumber = "A1\\A2"
    ds.StudyDate = "20040826\\20040827"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    token = _upload(client, csrf, "several.dcm", buffer.getvalue(), "application/dicom")
    page = client.get(f"/upload/{token}").text
    assert "[" not in page.split('id="result"', 1)[1] and "&#39;" not in page
    assert "Doe, John; Roe, Jane" in page
    assert "9RG1\\OTHER-7" in page and "A1\\A2" in page and "20040826\\20040827" in page


def test_a_dicom_upload_that_is_not_a_chest_radiograph_is_not_classified(
    rad_client: tuple[TestClient, str],
) -> None:
    """RG3 is a CR of a lower leg: the node would store it and not analyse it, and so does the console."""
    client, csrf = rad_client
    leg = peers.pydicom_data_file("RG3_UNCI.dcm").read_bytes()
    token = _upload(client, csrf, "RG3_UNCI.dcm", leg, "application/dicom")
    page = client.get(f"/upload/{token}").text
    assert 'id="ineligible"' in page and "body part EXTREMITY is not CHEST" in page
    assert 'id="classify"' not in page and 'id="store"' in page  # it may still be stored, like a C-STORE
    refused = client.post(f"/upload/{token}/classify", data={"csrf_token": csrf})
    assert refused.status_code == 422 and "body part EXTREMITY is not CHEST" in refused.text
    assert MODEL_SCOPE in page and MODEL_SCOPE in refused.text  # one wording, whichever check refuses
    api = client.post(f"/api/uploads/{token}/classify", headers={"X-CSRF-Token": csrf})
    assert api.status_code == 422 and "body part EXTREMITY is not CHEST" in api.text
    assert client.get(f"/upload/{token}/report.pdf").status_code == 409  # nothing was classified


@pytest.mark.parametrize(("keyword", "vr", "value"), [("Rows", "DS", "1841"), ("StudyDate", "US", 2024)])
def test_a_dicom_upload_with_an_attribute_in_another_vr_is_refused_as_a_c_store_is(
    rad_client: tuple[TestClient, str], keyword: str, vr: str, value: object
) -> None:
    """The VR check of a C-STORE did not cover uploads: Rows as DS made the preview and the
    classification answer 500, a US Study Date went into a PDF report (review)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import DataElement

    client, csrf = rad_client
    ds = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
    tag = tag_for_keyword(keyword)
    assert tag is not None
    ds[tag] = DataElement(tag, vr, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    response = client.post("/upload", data={"csrf_token": csrf},
                           files={"file": ("odd.dcm", buffer.getvalue(), "application/dicom")})
    assert response.status_code == 422 and f"{keyword} is encoded as {vr}" in response.text


def test_a_dicom_upload_with_an_element_of_unknown_vr_is_refused_with_a_message(
    rad_client: tuple[TestClient, str],
) -> None:
    """A VR that is no VR (two damaged bytes, or a writer's own) in an attribute the node reads: pydicom
    raises NotImplementedError when the attribute is read, which escaped the upload as a 500 (review)."""
    client, csrf = rad_client
    ds = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
    ds.AccessionNumber = ""  # pydicom reads a non-empty value of an unknown VR as it is
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    accession = data.index(b"\x08\x00\x50\x00SH")  # Accession Number, explicit VR little endian
    damaged = data[:accession + 4] + b"S\xb7" + data[accession + 6:]
    response = client.post(
        "/upload", data={"csrf_token": csrf}, files={"file": ("damaged.dcm", damaged, "application/dicom")}
    )
    assert response.status_code == 422
    assert "AccessionNumber cannot be read" in response.text


def test_a_multi_frame_dicom_upload_is_not_classified(rad_client: tuple[TestClient, str]) -> None:
    """Only the first frame was classified, and neither the page nor the result said so: a reader
    would take the finding for every frame."""
    client, csrf = rad_client
    ds = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    token = _upload(client, csrf, "two-frames.dcm", buffer.getvalue(), "application/dicom")
    page = client.get(f"/upload/{token}").text
    assert 'id="ineligible"' in page and "a multi-frame image (2 frames)" in page
    refused = client.post(f"/upload/{token}/classify", data={"csrf_token": csrf})
    assert refused.status_code == 422 and "a multi-frame image (2 frames)" in refused.text


def test_a_dicom_upload_of_a_child_is_not_classified(rad_client: tuple[TestClient, str]) -> None:
    """The console judges an upload by the node's age limit too (the header's Patient Age here)."""
    client, csrf = rad_client
    ds = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
    ds.PatientAge = "006Y"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    token = _upload(client, csrf, "child.dcm", buffer.getvalue(), "application/dicom")
    page = client.get(f"/upload/{token}").text
    reason = "the patient is younger than 18 years by Patient Age or Birth Date"
    assert 'id="ineligible"' in page and reason in page and 'id="classify"' not in page
    api = client.post(f"/api/uploads/{token}/classify", headers={"X-CSRF-Token": csrf})
    assert api.status_code == 422 and reason in api.text


def test_api_upload_returns_a_token(rad_client: tuple[TestClient, str]) -> None:
    client, csrf = rad_client
    response = client.post(
        "/api/uploads",
        files={"file": ("c.png", chest_like_png(), "image/png")},
        headers={"X-CSRF-Token": csrf},
    )
    assert response.status_code == 201
    body = response.json()
    assert body["is_dicom"] is False and client.get(body["image_url"]).status_code == 200


# ---- after the merge: classifier, reporting and ingest --------------------------------------


def _mediastinum_brighter_than_lungs(png: bytes) -> bool:
    a = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    h, w = a.shape
    rows = slice(int(0.3 * h), int(0.7 * h))
    mid = a[rows, int(0.45 * w) : int(0.55 * w)].mean()
    lungs = np.concatenate(
        [a[rows, int(0.2 * w) : int(0.35 * w)].ravel(), a[rows, int(0.65 * w) : int(0.8 * w)].ravel()]
    ).mean()
    return bool(mid > lungs + 20)


def test_dicom_upload_is_windowed_white_bone(rad_client: tuple[TestClient, str]) -> None:
    """RG1 is MONOCHROME1: shown uninverted, the lungs would be white."""
    client, csrf = rad_client
    token = _upload(
        client,
        csrf,
        "RG1_UNCI.dcm",
        peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes(),
        "application/dicom",
    )
    png = client.get(f"/upload/{token}/image.png")
    assert png.status_code == 200
    assert _mediastinum_brighter_than_lungs(png.content)


def _radiologist(app: FastAPI) -> tuple[TestClient, str]:
    """A client of ``app`` logged in as the radiologist, and its CSRF token."""
    client = TestClient(app, follow_redirects=False)
    return client, login(client, *RADIOLOGIST)


@pytest.mark.slow
def test_classify_png_and_save_the_report(classifying_app: FastAPI, accounts: dict[str, int]) -> None:
    client, csrf = _radiologist(classifying_app)
    token = _upload(client, csrf, "chest.png", radiograph_png(), "image/png")
    assert 'id="adult-chest"' in client.get(f"/upload/{token}").text
    # A picture has no Patient Age: its user confirms an adult's frontal chest radiograph, or it is refused.
    refused = client.post(f"/upload/{token}/classify", data={"csrf_token": csrf})
    assert refused.status_code == 422
    assert "confirm that it is a frontal chest radiograph of an adult" in refused.text
    assert MODEL_SCOPE in refused.text and 'id="finding-label"' not in refused.text
    unconfirmed = client.post(f"/api/uploads/{token}/classify", headers={"X-CSRF-Token": csrf})
    assert unconfirmed.status_code == 422 and "of an adult" in unconfirmed.text
    confirmed = client.post(f"/upload/{token}/classify", data={"csrf_token": csrf, "adult_chest": "yes"})
    assert confirmed.status_code == 303
    page = client.get(f"/upload/{token}").text
    label = page.split('id="finding-label">', 1)[1].split("<", 1)[0]
    assert label and 'class="probs"' in page and 'id="save-report"' in page
    api = client.post(f"/api/uploads/{token}/classify?adult_chest=true", headers={"X-CSRF-Token": csrf})
    assert api.status_code == 200 and 0.0 < api.json()["novelty"] <= 1.0  # a real radiograph: familiar
    pdf = client.get(f"/upload/{token}/report.pdf")
    assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF")
    text = subprocess.run(
        [peers.executable("pdftotext"), "-", "-"], input=pdf.content, capture_output=True, check=True
    ).stdout.decode()
    assert label.lower() in text.lower()


def _console_with(app: FastAPI, factory: sessionmaker[Session], **pipeline: object) -> tuple[TestClient, str]:
    """A radiologist's client of a second console, ``app``'s with these ``pipeline`` settings changed."""
    settings: Settings = app.state.console.settings
    changed = settings.pipeline.model_copy(update=pipeline)
    return _radiologist(create_app(settings.model_copy(update={"pipeline": changed}), factory))


def _anonymised_rg1() -> bytes:
    """The real CR without Patient Age or birth date, as many anonymised archives send it."""
    ds = pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))
    ds.PatientBirthDate = ""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.slow
def test_a_dicom_upload_without_an_age_is_classified_with_a_caution_or_refused_when_configured(
    classifying_app: FastAPI, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    client, csrf = _radiologist(classifying_app)
    token = _upload(client, csrf, "anonymous.dcm", _anonymised_rg1(), "application/dicom")
    assert 'id="adult-chest"' not in client.get(f"/upload/{token}").text  # a header: nothing to confirm
    assert client.post(f"/upload/{token}/classify", data={"csrf_token": csrf}).status_code == 303
    page = client.get(f"/upload/{token}").text
    assert 'id="finding-label"' in page and 'id="age-unknown"' in page and "Patient age unknown." in page
    api = client.post(f"/api/uploads/{token}/classify", headers={"X-CSRF-Token": csrf})
    assert api.status_code == 200 and api.json()["age_unknown"] is True
    text = subprocess.run(
        [peers.executable("pdftotext"), "-", "-"],
        input=client.get(f"/upload/{token}/report.pdf").content, capture_output=True, check=True,
    ).stdout.decode()
    assert "PATIENT AGE UNKNOWN" in text and "Page 1 of 1" in text

    aged = _upload(client, csrf, "RG1_UNCI.dcm", peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes(),
                   "application/dicom")  # born 1940, examined 2004
    api = client.post(f"/api/uploads/{aged}/classify", headers={"X-CSRF-Token": csrf})
    assert api.status_code == 200 and api.json()["age_unknown"] is False
    assert 'id="age-unknown"' not in client.get(f"/upload/{aged}").text

    # With pipeline.skip_unknown_age on, the console refuses it as the node would.
    strict, csrf = _console_with(classifying_app, factory, skip_unknown_age=True)
    token = _upload(strict, csrf, "anonymous.dcm", _anonymised_rg1(), "application/dicom")
    page = strict.get(f"/upload/{token}").text
    assert 'id="ineligible"' in page and 'id="classify"' not in page
    assert UNKNOWN_AGE.replace("'", "&#39;") in page
    refused = strict.post(f"/api/uploads/{token}/classify", headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 422 and UNKNOWN_AGE in refused.json()["detail"]


@pytest.mark.slow
def test_a_picture_that_is_not_a_radiograph_is_not_classified(
    classifying_app: FastAPI, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    """A picture has no header to check; the model's novelty check reads the pixels instead."""
    client, csrf = _radiologist(classifying_app)
    photo = (Path(__file__).parents[1] / "unit" / "fixtures" / "imagenet_coffee.jpg").read_bytes()
    token = _upload(client, csrf, "cup.jpg", photo, "image/jpeg")
    refused = client.post(f"/upload/{token}/classify", data={"csrf_token": csrf, "adult_chest": "yes"})
    assert refused.status_code == 422
    assert "does not look like the chest radiographs the model was trained on" in refused.text
    assert MODEL_SCOPE in refused.text  # the same scope sentence as a header refusal
    assert 'id="finding-label"' not in refused.text
    api = client.post(f"/api/uploads/{token}/classify?adult_chest=true", headers={"X-CSRF-Token": csrf})
    assert api.status_code == 422 and "does not look like the chest radiographs" in api.text
    assert client.get(f"/upload/{token}/report.pdf").status_code == 409  # nothing was classified

    # A chest radiograph uploaded upside down passes the novelty check but looks the wrong way up.
    token = _upload(client, csrf, "chest.png", radiograph_png(transpose=Image.Transpose.ROTATE_180), "image/png")
    refused = client.post(f"/upload/{token}/classify", data={"csrf_token": csrf, "adult_chest": "yes"})
    assert refused.status_code == 422 and "looks the wrong way up" in refused.text and MODEL_SCOPE in refused.text
    # A picture has no header: the advice is how to export it, not which DICOM attribute to check.
    assert "upload it head up" in refused.text and "Patient Orientation" not in refused.text
    assert "upload it head up" in client.get(f"/upload/{token}").text  # a reload keeps the reason
    negative = io.BytesIO()
    Image.eval(Image.open(io.BytesIO(radiograph_png())), lambda v: 255 - v).save(negative, format="PNG")
    token = _upload(client, csrf, "negative.png", negative.getvalue(), "image/png")
    refused = client.post(f"/upload/{token}/classify", data={"csrf_token": csrf, "adult_chest": "yes"})
    assert refused.status_code == 422 and "looks like a negative" in refused.text
    assert "export it again with bone white" in refused.text and "Photometric" not in refused.text

    # With pipeline.skip_unfamiliar off the finding is shown, under a warning.
    client, csrf = _console_with(classifying_app, factory, skip_unfamiliar=False)
    token = _upload(client, csrf, "cup.jpg", photo, "image/jpeg")
    confirmed = {"csrf_token": csrf, "adult_chest": "yes"}
    assert client.post(f"/upload/{token}/classify", data=confirmed).status_code == 303
    page = client.get(f"/upload/{token}").text
    assert 'id="finding-label"' in page and 'id="unfamiliar"' in page and "Read this finding" in page
    upside_down = _upload(client, csrf, "chest.png", radiograph_png(transpose=Image.Transpose.ROTATE_180), "image/png")
    api = client.post(f"/api/uploads/{upside_down}/classify?adult_chest=true", headers={"X-CSRF-Token": csrf})
    assert api.status_code == 200 and "looks the wrong way up" in (api.json()["warning"] or "")


def test_storing_an_upload_that_contradicts_a_stored_study_is_a_conflict_with_its_reason(
    rad_client: tuple[TestClient, str]
) -> None:
    """The same study under another Patient ID: the API answered 500, an unexpected failure."""
    client, csrf = rad_client
    original = peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes()
    first = _upload(client, csrf, "RG1_UNCI.dcm", original, "application/dicom")
    assert client.post(f"/upload/{first}/store", data={"csrf_token": csrf}).status_code == 303
    other = pydicom.dcmread(io.BytesIO(original))
    other.PatientID = "SOMEONE-ELSE"
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    buffer = io.BytesIO()
    other.save_as(buffer, enforce_file_format=True)
    token = _upload(client, csrf, "other.dcm", buffer.getvalue(), "application/dicom")
    refused = client.post(f"/api/uploads/{token}/store", headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 409, refused.text
    assert "already stored under another Patient ID" in refused.json()["detail"]


def test_storing_a_dicom_upload_makes_it_a_study(
    rad_client: tuple[TestClient, str], factory: sessionmaker[Session]
) -> None:
    client, csrf = rad_client
    token = _upload(
        client,
        csrf,
        "RG1_UNCI.dcm",
        peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes(),
        "application/dicom",
    )
    stored = client.post(f"/upload/{token}/store", data={"csrf_token": csrf})
    assert stored.status_code == 303 and stored.headers["location"].startswith("/results/")
    assert "9RG1" in client.get(stored.headers["location"]).text
    with session_scope(factory) as s:
        instance = s.scalars(select(Instance)).one()
        assert instance.source == "upload" and instance.calling_ae == f"WEB:{RADIOLOGIST[0]}"
        # who stored it, by full name (the sender column is an AE title: 16 characters)
        stores = s.execute(select(AuditEvent.actor, AuditEvent.target, AuditEvent.details)
                           .where(AuditEvent.action == "upload.store")).all()
        assert [tuple(row) for row in stores] == [
            (f"user:{RADIOLOGIST[0]}", f"study:{instance.series.study_pk}",
             {"instance_id": instance.id, "duplicate": False})
        ]


def test_a_dicom_upload_whose_pixels_cannot_be_decoded_is_refused_with_the_reason(
    rad_client: tuple[TestClient, str],
) -> None:
    """Corrupt RLE that makes the Rust decoder panic: the console says why instead of failing the request."""
    from tests.node_datasets import to_bytes, with_corrupt_rle_pixels

    client, csrf = rad_client
    data = to_bytes(with_corrupt_rle_pixels(pydicom.dcmread(peers.pydicom_data_file("RG1_UNCI.dcm"))))
    token = _upload(client, csrf, "corrupt.dcm", data, "application/dicom")  # the header is readable
    assert client.get(f"/upload/{token}").status_code == 200
    reason = "pixel data cannot be decoded (the decoder failed"
    image = client.get(f"/upload/{token}/image.png")
    assert image.status_code == 422 and reason in image.text
    classify = client.post(f"/upload/{token}/classify", data={"csrf_token": csrf})
    assert classify.status_code == 422 and reason in classify.text


def test_storing_the_nodes_own_result_as_an_upload_says_so(
    rad_client: tuple[TestClient, str], factory: sessionmaker[Session]
) -> None:
    """The node's own heat-map capture, uploaded and stored, was answered with instance_id 0, a row that
    does not exist (review)."""
    from dicom_node.store.models import ResultKind, ResultObject, Series, Study

    client, csrf = rad_client
    original = peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes()
    stored = client.post(f"/upload/{_upload(client, csrf, 'RG1.dcm', original, 'application/dicom')}/store",
                         data={"csrf_token": csrf})
    assert stored.status_code == 303
    capture = pydicom.dcmread(io.BytesIO(original))
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    capture.SOPInstanceUID = capture.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    capture.SeriesInstanceUID = generate_uid()
    with session_scope(factory) as s:
        study = s.scalars(select(Study)).one()
        s.add(ResultObject(study_pk=study.id, kind=ResultKind.HEATMAP_SC, model_name="m", model_version="1",
                           sop_class_uid=capture.SOPClassUID, sop_instance_uid=capture.SOPInstanceUID,
                           series_instance_uid=capture.SeriesInstanceUID, file_path="x.dcm"))
    buffer = io.BytesIO()
    capture.save_as(buffer, enforce_file_format=True)
    token = _upload(client, csrf, "capture.dcm", buffer.getvalue(), "application/dicom")
    refused = client.post(f"/api/uploads/{token}/store", headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 409 and "one of the node's own results" in refused.text
    with session_scope(factory) as s:
        assert s.scalar(select(func.count()).select_from(Series)) == 1


def test_only_png_and_jpeg_bytes_reach_a_picture_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow opened and decoded any format it knew before the format was checked: an EPS upload started
    Ghostscript on the user's PostScript where the host had it (review). Now the first bytes decide."""
    from dicom_node.errors import UndecodableDatasetError
    from dicom_node.web.uploads import read_upload

    opened: list[object] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    webp, gif = io.BytesIO(), io.BytesIO()
    Image.new("L", (64, 64)).save(webp, format="WEBP")
    Image.new("L", (64, 64)).save(gif, format="GIF")
    for data in (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", webp.getvalue(),
                 gif.getvalue(), b"hello"):
        with pytest.raises(UndecodableDatasetError, match="not a DICOM, PNG or JPEG file"):
            read_upload("chest.png", data)
    assert opened == []
    read_upload("chest.png", chest_like_png())
    assert len(opened) == 1


def _jpeg_frame_of(name: str) -> bytes:
    from pydicom.data import get_testdata_file
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(get_testdata_file(name))
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def test_pictures_that_cannot_be_read_say_why() -> None:
    """All of these were "not a DICOM, PNG or JPEG file", though each is one, or is nothing at all."""
    from dicom_node.errors import UndecodableDatasetError
    from dicom_node.web.uploads import read_upload

    png = chest_like_png()
    # a 12-bit radiograph in 16-bit RGB samples: Pillow keeps the high byte, and it came out nearly black
    rgb16 = _png16_rgb(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.uint16) * 16)
    for data, message in (
        (b"", "the file is empty"),
        (png[: len(png) // 2], "the PNG file cannot be decoded ("),
        (_jpeg_frame_of("JPEG-lossy.dcm"), "12-bit or lossless JPEG, which is not supported"),
        (_jpeg_frame_of("JPEG-LL.dcm"), "12-bit or lossless JPEG, which is not supported"),
        (rgb16, "a 16-bit colour or grey-with-alpha picture, which is read as 8 bits"),
    ):
        with pytest.raises(UndecodableDatasetError, match=message.replace("(", r"\(")):
            read_upload("chest.png", data)


def test_a_picture_taller_or_wider_than_any_radiograph_is_refused_before_it_is_decoded() -> None:
    """A PNG of 1 × 64,000,000 pixels is 124 KB and within the pixel limit, but Pillow keeps a pointer of
    8 bytes for each of its rows: read, it held 549 MB where the upload budget counted 61 MB, its preview
    took 1.1 GB and 8 s of a console image worker, and it could never be classified (review). No
    radiograph has a side of more than 65,535 pixels (DICOM's Rows and Columns), nor can a JPEG."""
    from dicom_node.errors import UndecodableDatasetError
    from dicom_node.web.uploads import read_upload

    def png(size: tuple[int, int]) -> bytes:
        buffer = io.BytesIO()
        Image.new("L", size, 100).save(buffer, format="PNG")
        return buffer.getvalue()

    for size in ((1, 70_000), (70_000, 1)):
        reason = rf"the picture is {size[0]} × {size[1]} pixels: a side of more than 65535 pixels"
        with pytest.raises(UndecodableDatasetError, match=reason):
            read_upload("strip.png", png(size))
    upload = read_upload("wide.png", png((65_535, 1)))  # at the limit: read (and refused as too small later)
    assert upload.image is not None and upload.image.size == (65_535, 1)


def test_a_png_of_a_flood_of_chunks_is_refused_before_pillow_walks_them() -> None:
    """Pillow reads a PNG's chunks one by one in Python, about 5 µs each: 12 MB of empty chunks took 5 s
    of an image worker, and an upload of 128 MB of them near a minute, for a picture of 100 × 100 pixels
    (review). A PNG writer's chunks are kilobytes each; more than 2^18 of them is no radiograph's file."""
    from dicom_node.errors import UndecodableDatasetError
    from dicom_node.web.uploads import MAX_PNG_CHUNKS, read_upload

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = chest_like_png((100, 100))
    first_idat = png.index(b"IDAT") - 4
    flood = png[:first_idat] + chunk(b"abCd", b"") * MAX_PNG_CHUNKS + png[first_idat:]
    with pytest.raises(UndecodableDatasetError, match=f"a PNG of more than {MAX_PNG_CHUNKS} chunks"):
        read_upload("flood.png", flood)
    within = png[:first_idat] + chunk(b"abCd", b"") * 1000 + png[first_idat:]  # ancillary chunks are skipped
    upload = read_upload("chunks.png", within)
    assert upload.image is not None and upload.image.size == (100, 100)


def test_a_jpeg_of_a_flood_of_marker_segments_is_refused_before_pillow_walks_them() -> None:
    """Pillow reads a JPEG's marker segments up to its first scan in Python, and the node's own scan count
    walked them all again: a million empty comments (4 MB) held an image worker 1.6 s, an upload of
    128 MB of them near a minute (review). A camera's or a PACS export's JPEG has some tens of segments;
    a JPEG of thousands is refused before anything reads it, in an upload and in a DICOM frame alike."""
    from classifier.errors import UnsupportedImageError
    from classifier.preprocess import MAX_JPEG_SEGMENTS, check_jpeg_stream
    from dicom_node.errors import UndecodableDatasetError
    from dicom_node.web.uploads import read_upload

    opened: list[object] = []
    buffer = io.BytesIO()
    Image.open(io.BytesIO(chest_like_png((100, 100)))).save(buffer, format="JPEG", progressive=True)
    jpeg = buffer.getvalue()
    comment = b"\xff\xfe\x00\x02"  # COM of no text
    reason = f"a JPEG of more than {MAX_JPEG_SEGMENTS} marker segments"
    for flood in (jpeg[:2] + comment * MAX_JPEG_SEGMENTS + jpeg[2:],  # before the frame: Pillow's walk
                  jpeg[:-2] + comment * MAX_JPEG_SEGMENTS + jpeg[-2:]):  # between the scans and EOI
        with pytest.raises(UndecodableDatasetError, match=reason):
            opened.append(read_upload("flood.jpg", flood))
        with pytest.raises(UnsupportedImageError, match=reason):
            check_jpeg_stream(flood)
    assert opened == []
    upload = read_upload("comments.jpg", jpeg[:2] + comment * 100 + jpeg[2:])
    assert upload.image is not None and upload.image.size == (100, 100)


def _png16_rgb(gray: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (colour type 2), written by hand: Pillow writes no 16-bit colour PNG."""
    height, width = gray.shape
    rows = np.dstack([gray] * 3).astype(">u2").reshape(height, width * 6 // 2)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_a_camera_jpeg_with_a_second_picture_is_read_as_its_first() -> None:
    """A JPEG carrying an MPF large thumbnail is "MPO" to Pillow: refused as not JPEG (review)."""
    from dicom_node.web.uploads import read_upload

    first = Image.open(io.BytesIO(chest_like_png())).convert("L")
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[first.resize((64, 56))])
    upload = read_upload("phone.jpg", buffer.getvalue())
    assert upload.image is not None and upload.image.size == first.size


def test_a_backslash_in_an_uploaded_name_stays_one_study_description() -> None:
    from datetime import UTC, datetime

    from dicom_node.web.services import picture_dataset

    ds = picture_dataset("C:\\exports\\chest.png", datetime(2026, 12, 6, tzinfo=UTC))
    assert ds.StudyDescription == "Uploaded picture chest.png"


def test_a_16_bit_picture_counts_two_bytes_a_pixel_against_the_upload_budget() -> None:
    """The budget counted a band as one byte: a 16-bit greyscale picture held twice what it counted."""
    image = Image.fromarray(np.zeros((100, 200), dtype=np.uint16))
    assert image.mode == "I;16"
    assert Upload(filename="x.png", data=b"", image=image).held_bytes == 100 * 200 * 2
    # Pillow keeps every pixel of more than one band in four bytes: an 8000² grey-with-alpha picture held
    # 244 MB, which counted as 122 MB, and colour 244 MB as 183 MB (review)
    for mode in ("RGB", "LA", "RGBA", "CMYK", "PA"):
        assert Upload(filename="x.png", data=b"", image=Image.new(mode, (200, 100))).held_bytes == 100 * 200 * 4
    for mode in ("L", "P", "1"):
        assert Upload(filename="x.png", data=b"", image=Image.new(mode, (200, 100))).held_bytes == 100 * 200


@pytest.mark.slow
def test_an_uploads_heat_map_is_drawn_on_the_preview_it_already_shows(
    classifying_app: FastAPI, accounts: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heat-map overlay of an upload lies on the very preview the page shows, and the DICOM is not
    decoded a second time for it (a JPEG 2000 one took about half a second)."""
    from dicom_node.web import services

    client, csrf = _radiologist(classifying_app)
    token = _upload(client, csrf, "rg1.dcm", peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes(),
                    "application/dicom")
    assert client.post(f"/upload/{token}/classify", data={"csrf_token": csrf}).status_code == 303
    preview = np.asarray(Image.open(io.BytesIO(client.get(f"/upload/{token}/image.png").content)))
    decoded: list[object] = []
    original = services.NodeConsoleServices.dicom_preview

    def counted(self: services.NodeConsoleServices, dataset: pydicom.Dataset) -> npt.NDArray[np.uint8]:
        decoded.append(dataset)
        return original(self, dataset)

    monkeypatch.setattr(services.NodeConsoleServices, "dicom_preview", counted)
    response = client.get(f"/upload/{token}/heatmap.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert decoded == []
    held = classifying_app.state.console.uploads.get(accounts["radiologist"], token)
    assert held.prediction is not None and held.prediction.heatmap is not None
    drawn = np.asarray(Image.open(io.BytesIO(response.content)))
    assert drawn.shape == (*preview.shape, 3)
    assert np.array_equal(drawn, overlay(preview, held.prediction.heatmap))


def test_storing_a_picture_upload_is_refused_as_unstorable_not_as_gone(
    rad_client: tuple[TestClient, str]
) -> None:
    """A PNG has no DICOM header to file it under. Asked to store one, the API answered 404 "only DICOM
    uploads can be stored", as for an upload no longer held, though it still was (its image was there)."""
    client, csrf = rad_client
    token = _upload(client, csrf, "c.png", chest_like_png(), "image/png")
    refused = client.post(f"/api/uploads/{token}/store", headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 422, refused.text
    assert "only DICOM uploads can be stored" in refused.json()["detail"]
    page = client.post(f"/upload/{token}/store", data={"csrf_token": csrf})
    assert page.status_code == 422 and "only DICOM uploads can be stored" in page.text
    assert client.get(f"/upload/{token}/image.png").status_code == 200  # still held


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (StorageError("the node's storage is full"), 503),
        (DatabaseUnavailableError("the database is unavailable"), 503),
        (ConflictError("this file is one of the node's own results (result object 7); it is not stored again"),
         409),
    ],
)
def test_storing_an_upload_the_node_cannot_take_answers_the_status_the_api_and_classify_do(
    rad_client: tuple[TestClient, str], monkeypatch: pytest.MonkeyPatch, failure: NodeError, status: int
) -> None:
    """The upload page's "Store in node" answered 422 (the request's fault) for every refusal: a full disk
    or a database that is down (the node's, retried later: 503) and the node's own result (409) too."""
    client, csrf = rad_client
    token = _upload(client, csrf, "RG1.dcm", peers.pydicom_data_file("RG1_UNCI.dcm").read_bytes(),
                    "application/dicom")

    def refuse(upload: Upload, *, calling_ae: str) -> None:
        raise failure

    monkeypatch.setattr(client.app.state.console.services, "ingest", refuse)  # type: ignore[attr-defined]
    page = client.post(f"/upload/{token}/store", data={"csrf_token": csrf})
    api = client.post(f"/api/uploads/{token}/store", headers={"X-CSRF-Token": csrf})
    assert (page.status_code, api.status_code) == (status, status)
    assert str(failure) in html_unescape(page.text)  # the page says why
