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


@pytest.mark.parametrize("n", [20, 60, 100, 7, 1])
def test_the_latency_percentile_is_numpy_s_nearest_rank(n: int) -> None:
    """p95 of 1..100 was 96, of 1..20 the maximum: the rank was rounded half to even."""
    import numpy as np

    values = [float(v) for v in range(1, n + 1)]
    for q in (50.0, 95.0, 99.0):
        assert e2e.percentile(values, q) == float(np.percentile(values, q, method="inverted_cdf"))
