"""The end-to-end benchmark writes its Orthanc, node and corpus into a scratch folder. It removed the
folder only after a run that got to its table: a peer that failed to start, a lost study's timeout or
Ctrl-C left ``/tmp/cxr-e2e-*`` behind, with a node database and Orthanc storage in it, on every try."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from benchmarks import e2e

pytestmark = pytest.mark.unit


class _PeerDidNotStart(RuntimeError):
    pass


def _no_orthanc(_folder: Path) -> None:
    raise _PeerDidNotStart("Orthanc did not start")


@pytest.mark.parametrize(("keep", "left"), [([], 0), (["--keep"], 1)])
def test_a_run_that_fails_removes_its_scratch_folder_unless_asked_to_keep_it(
    keep: list[str], left: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(e2e, "default_model", lambda: tmp_path / "model")
    monkeypatch.setattr(e2e, "OrthancServer", _no_orthanc)
    with pytest.raises(_PeerDidNotStart):
        e2e.main(["--studies", "1", *keep])
    assert len(list(tmp_path.glob("cxr-e2e-*"))) == left
