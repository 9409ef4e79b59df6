"""The Orthanc routing scripts of the test fixture (and of a real deployment) do what they claim:
images go to the node, the node's own results never go back to it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests import peers
from tests.node_process import wait_until
from tests.orthanc import NodeAddress, OrthancServer
from tests.pipeline.storepeer import StorePeer

pytestmark = pytest.mark.interop


@pytest.fixture
def node_stand_in() -> Iterator[StorePeer]:
    """A Storage SCP with the node's AE title: what Orthanc forwards arrives here."""
    peer = StorePeer(ae_title="CXRNODE").start()
    yield peer
    peer.stop()


def copy_of(name: str, folder: Path, **changes: str) -> tuple[Path, str]:
    ds = pydicom.dcmread(peers.pydicom_data_file(name))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    return path, str(ds.SOPInstanceUID)


def store(path: Path, orthanc: OrthancServer, calling: str) -> None:
    result = subprocess.run([peers.executable("storescu"), "-aet", calling, "-aec", orthanc.ae_title, "127.0.0.1",
                             str(orthanc.dicom_port), str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1000:]


def test_instance_routing_forwards_images_but_never_the_nodes_results(
    node_stand_in: StorePeer, tmp_path: Path
) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc", node=NodeAddress("CXRNODE", node_stand_in.port))
    orthanc.start()
    try:
        from_node, _ = copy_of("RG3_UNCI.dcm", tmp_path / "a")  # came from the node: not forwarded
        secondary, _ = copy_of("RG3_UNCI.dcm", tmp_path / "b", Modality="OT")  # not an image for the node
        image, image_uid = copy_of("RG1_UNCI.dcm", tmp_path / "c")
        store(from_node, orthanc, "CXRNODE")
        store(secondary, orthanc, "MODALITY")
        store(image, orthanc, "MODALITY")
        # Orthanc runs its Lua callbacks in storage order: when the image arrives, the others are decided.
        assert wait_until(lambda: node_stand_in.received, 20)
        assert node_stand_in.received == [image_uid]
    finally:
        orthanc.stop()


def test_stable_study_routing_forwards_the_study_once_it_is_quiet(node_stand_in: StorePeer, tmp_path: Path) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc", node=NodeAddress("CXRNODE", node_stand_in.port),
                            forward="stable-study", stable_age=1)
    orthanc.start()
    try:
        image, image_uid = copy_of("RG1_UNCI.dcm", tmp_path / "c")
        store(image, orthanc, "MODALITY")
        assert wait_until(lambda: node_stand_in.received, 20)
        assert node_stand_in.received == [image_uid]
    finally:
        orthanc.stop()
