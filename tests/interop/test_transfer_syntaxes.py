"""Every transfer syntax the node accepts, written by a real encoder, reaches the model as the same image.

The hospital CR of pydicom-data (``RG1_UNCR``: 1955×1841 px, 15 bits stored, MONOCHROME1) is re-encoded by
the tools a modality, PACS or router uses: DCMTK (``dcmconv``, ``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``),
OpenJPEG through pydicom (JPEG 2000) and OpenJPH (``ojph_compress``, High-Throughput JPEG 2000). A lossless
copy must give the very model input and preview of the original; every copy the same finding from the
shipped model, in process and through the running node (sent over the network, stored as sent, classified
by the node's own pipeline).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from sqlalchemy import select

from classifier.inference import Classifier, default_model_path
from classifier.preprocess import dataset_to_model_input, display_image
from classifier.types import Prediction
from dicom_node import scu
from dicom_node.part10 import decodable_transfer_syntaxes
from dicom_node.store.models import Finding, Instance
from tests import peers
from tests.node_process import NODE_AET, NodeProcess, start_node

pytestmark = pytest.mark.interop

SOURCE = "RG1_UNCR.dcm"
SENDER = "TSSCU"

Encoder = Callable[[Path, Path], None]


def _tool(*arguments: str) -> Encoder:
    """A command line tool that reads the source file and writes the copy."""

    def encode(source: Path, target: Path) -> None:
        subprocess.run(
            [peers.executable(arguments[0]), *arguments[1:], str(source), str(target)],
            check=True,
            capture_output=True,
            timeout=120,
        )

    return encode


def _with_frame(source: Path, target: Path, frame: bytes, syntax: UID) -> None:
    ds = pydicom.dcmread(source)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(target, enforce_file_format=True)


def _openjpeg(syntax: UID, ratio: float | None = None) -> Encoder:
    """JPEG 2000 by OpenJPEG, pydicom's encoder (pylibjpeg-openjpeg); lossy at ``ratio``."""

    def encode(source: Path, target: Path) -> None:
        ds = pydicom.dcmread(source)
        ds.compress(syntax, j2k_cr=None if ratio is None else [ratio])
        ds.save_as(target, enforce_file_format=True)

    return encode


def _openjph(syntax: UID, *options: str) -> Encoder:
    """High-Throughput JPEG 2000 by OpenJPH's ``ojph_compress``, from a 16-bit PGM of the stored values."""

    def encode(source: Path, target: Path) -> None:
        ds = pydicom.dcmread(source)
        pixels = ds.pixel_array
        picture, codestream = target.with_suffix(".pgm"), target.with_suffix(".j2c")
        header = f"P5\n{ds.Columns} {ds.Rows}\n{(1 << int(ds.BitsStored)) - 1}\n".encode()
        picture.write_bytes(header + pixels.astype(">u2").tobytes())  # netpbm: most significant byte first
        subprocess.run(
            [peers.executable("ojph_compress"), "-i", str(picture), "-o", str(codestream), *options],
            check=True,
            capture_output=True,
            timeout=120,
        )
        _with_frame(source, target, codestream.read_bytes(), syntax)

    return encode


def _as_is(source: Path, target: Path) -> None:
    target.write_bytes(source.read_bytes())


# (encoder, lossless)
ENCODERS: dict[UID, tuple[Encoder, bool]] = {
    ExplicitVRLittleEndian: (_as_is, True),
    ImplicitVRLittleEndian: (_tool("dcmconv", "+ti"), True),
    DeflatedExplicitVRLittleEndian: (_tool("dcmconv", "+td"), True),
    ExplicitVRBigEndian: (_tool("dcmconv", "+tb"), True),
    JPEGBaseline8Bit: (_tool("dcmcjpeg", "+eb"), False),  # DCMTK scales 15 bits to 8 and moves the window
    JPEGExtended12Bit: (_tool("dcmcjpeg", "+ee"), False),
    JPEGLossless: (_tool("dcmcjpeg", "+el"), True),
    JPEGLosslessSV1: (_tool("dcmcjpeg", "+e1"), True),
    JPEGLSLossless: (_tool("dcmcjpls", "+el"), True),
    JPEGLSNearLossless: (_tool("dcmcjpls", "+en"), False),
    JPEG2000Lossless: (_openjpeg(JPEG2000Lossless), True),
    JPEG2000: (_openjpeg(JPEG2000, ratio=20), False),
    HTJ2KLossless: (_openjph(HTJ2KLossless, "-reversible", "true"), True),
    HTJ2KLosslessRPCL: (_openjph(HTJ2KLosslessRPCL, "-reversible", "true", "-prog_order", "RPCL"), True),
    HTJ2K: (_openjph(HTJ2K, "-qstep", "0.001"), False),
    RLELossless: (_tool("dcmcrle"), True),
}


# The model reads JPEG 2000 at a reduced resolution level (classifier.preprocess._decode_j2k_reduced): the
# same image through the wavelet's low-pass instead of the box average of the uncompressed pixels.
REDUCED = {JPEG2000Lossless, JPEG2000}


def test_every_accepted_transfer_syntax_has_a_real_encoder_here() -> None:
    """A transfer syntax the listener starts accepting (a new decoder plugin) is not accepted untested."""
    assert set(decodable_transfer_syntaxes()) <= set(ENCODERS)


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    return Classifier.load(default_model_path())


@pytest.fixture(scope="module")
def original(shipped: Classifier) -> tuple[np.ndarray, np.ndarray, Prediction]:
    ds = pydicom.dcmread(peers.pydicom_data_file(SOURCE))
    prediction = shipped.predict_datasets([ds], heatmap=False)[0]
    return dataset_to_model_input(ds, shipped.spec), display_image(ds), prediction


@pytest.mark.parametrize("syntax", list(ENCODERS), ids=lambda uid: UID(uid).name)
def test_a_copy_in_each_transfer_syntax_reaches_the_model_as_the_original(
    syntax: UID, shipped: Classifier, original: tuple[np.ndarray, np.ndarray, Prediction], tmp_path: Path
) -> None:
    encode, lossless = ENCODERS[syntax]
    target = tmp_path / "copy.dcm"
    encode(peers.pydicom_data_file(SOURCE), target)
    ds = pydicom.dcmread(target)
    assert ds.file_meta.TransferSyntaxUID == syntax
    expected_input, expected_preview, expected = original
    preview = display_image(ds)
    assert preview.shape == expected_preview.shape  # the report's image and the heat-map SC alike
    if lossless:
        np.testing.assert_array_equal(preview, expected_preview)
    else:
        assert np.abs(preview.astype(np.float64) - expected_preview).mean() < 1.0
    if lossless and syntax not in REDUCED:
        np.testing.assert_array_equal(dataset_to_model_input(ds, shipped.spec), expected_input)
    # What the radiologist is told: the same finding, probabilities within a point, the same familiarity.
    prediction = shipped.predict_datasets([ds], heatmap=False)[0]
    assert prediction.label == expected.label
    for name, probability in expected.probabilities.items():
        assert prediction.probabilities[name] == pytest.approx(probability, abs=0.01), name
    assert prediction.novelty == pytest.approx(expected.novelty, abs=0.03)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    folder, port = tmp_path_factory.mktemp("node"), peers.free_port()
    process = start_node(folder, port, settle_seconds=1.0, callers=(SENDER,))
    yield process
    assert process.stop() == 0, "graceful stop failed"


def _copies(folder: Path) -> dict[UID, pydicom.Dataset]:
    """One copy of the source per syntax, each a new instance of one new study (a lossy encoder may give
    its copy yet another instance UID, as DCMTK does)."""
    study, series = generate_uid(), generate_uid()
    copies: dict[UID, pydicom.Dataset] = {}
    for number, (syntax, (encode, _)) in enumerate(ENCODERS.items(), start=1):
        ds = pydicom.dcmread(peers.pydicom_data_file(SOURCE))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, number
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        source, target = folder / f"{number}-source.dcm", folder / f"{number}.dcm"
        ds.save_as(source, enforce_file_format=True)
        encode(source, target)
        copies[syntax] = pydicom.dcmread(target)
    return copies


def test_the_running_node_stores_every_copy_as_sent_and_finds_the_same(
    node: NodeProcess, original: tuple[np.ndarray, np.ndarray, Prediction], tmp_path: Path
) -> None:
    """Over the network into ``cxr-node serve``: each copy is stored in its own transfer syntax, pixel for
    pixel, and the node's own pipeline gives each the finding of the original."""
    copies = _copies(tmp_path)
    statuses = scu.send(list(copies.values()), "127.0.0.1", node.port, NODE_AET, calling_aet=SENDER)
    assert statuses == [0] * len(copies)
    uids = {str(ds.SOPInstanceUID): syntax for syntax, ds in copies.items()}
    deadline = time.monotonic() + 180
    while True:
        with node.session() as session:
            rows = session.execute(
                select(Instance, Finding).join(Finding).where(Instance.sop_instance_uid.in_(list(uids)))
            ).all()
            found = {instance.sop_instance_uid: (instance, finding) for instance, finding in rows}
        if len(found) == len(uids) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(found) == set(uids), "not every copy was classified within 180 s"
    expected = original[2]
    for uid, (instance, finding) in found.items():
        syntax = uids[uid]
        assert instance.transfer_syntax_uid == syntax
        stored = pydicom.dcmread(node.storage_dir / instance.file_path)
        assert stored.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(stored.pixel_array, copies[syntax].pixel_array)
        assert finding.label == expected.label, syntax.name
        for name, probability in expected.probabilities.items():
            assert finding.probabilities[name] == pytest.approx(probability, abs=0.01), (syntax.name, name)
