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


def test_the_node_s_peak_rss_counts_its_listener_processes(tmp_path: Path) -> None:
    """The node receives in spawned listener processes too (one per CPU by default): the figure was the
    first process's alone, short by the memory of every one of them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    ready = tmp_path / "ready"
    child = (f"import os, time; b = bytearray(100 * 1024 * 1024)\n"
             f"open({str(ready)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    spawn = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    parent = subprocess.Popen([sys.executable, "-c", spawn])
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert e2e.peak_rss_mb(parent.pid) >= 100
    finally:
        if ready.exists() and ready.read_text():
            os.kill(int(ready.read_text()), signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_every_p50_is_the_median_the_ratio_divides() -> None:
    """orthanc_to_node_p50_s was the nearest-rank 50th percentile (the lower middle of the default 100
    studies), the ratio beside it and p50_s the median (the mean of the middle two): the ratio was not
    the quotient of the two p50s the table showed."""
    node, peer = [0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.1]
    assert e2e._p(node, 50) == 0.25
    assert e2e._ratio(node, peer) == round(e2e._p(node, 50) / e2e._p(peer, 50), 2)  # type: ignore[operator]


def test_a_run_with_deliveries_orthanc_did_not_commit_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """With --storage-commitment, SRs and PDFs that Orthanc never confirmed were a figure in the table and
    the run still exited 0, as if the node had done what it was measured for."""
    clean = {"lost": 0, "duplicated": 0, "deliveries_not_committed": None}
    assert e2e.exit_status(clean) == 0
    assert e2e.exit_status({**clean, "deliveries_not_committed": 0}) == 0
    assert e2e.exit_status({**clean, "deliveries_not_committed": 3}) == 1
    assert "3 SR/PDF deliveries were not committed" in capsys.readouterr().err
    assert e2e.exit_status({**clean, "lost": 1}) == 1
