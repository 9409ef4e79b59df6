"""Ingest throughput: the node vs DCMTK storescp vs Orthanc, same corpus, same run.

A corpus of N copies of the real CR chest radiograph RG1 (pydicom-data) with fresh UIDs, uncompressed
(7.2 MB) and JPEG 2000 lossless (4.3 MB), is sent by DCMTK ``storescu`` with 1 and with 4 parallel senders
to each receiver, each starting empty:

- the node (``cxr-node serve`` as the README runs it; fsync and database commit on, SQLite default);
- DCMTK ``storescp --fork`` (writes files, no database, no fsync);
- Orthanc (Debian package, SQLite index, own temporary configuration on free ports).

DCMTK and Orthanc run with ``TCP_NODELAY=1`` (DCMTK 3.6.7 otherwise keeps Nagle's algorithm and loses
~90 ms per instance). Prints a table and, as the last line, a JSON object with the figures.

    python benchmarks/ingest.py [--count 40] [--rounds 3] [--senders 1 4] [--kinds uncompressed j2k]

Each figure is the median of ``--rounds`` runs with the receivers in rotating order. A receiver that did not
store every instance in every round gets no rate, and the benchmark exits 1 saying which.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from benchmarks import table  # noqa: E402
from benchmarks.testdata import pydicom_data_file  # noqa: E402
from classifier.cli import at_least  # noqa: E402
from tests import peers  # noqa: E402
from tests.node_process import NODE_AET, start_node  # noqa: E402

SOURCES = {"uncompressed": "RG1_UNCI.dcm", "j2k": "RG1_J2KR.dcm"}
CALLING_AET = "STORESCU"
PER_STUDY = 10  # instances per study in the corpus


def peer_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def make_corpus(kind: str, count: int, directory: Path) -> list[Path]:
    """``count`` copies of RG1 with fresh study/series/instance UIDs (``PER_STUDY`` per study)."""
    ds = dcmread(pydicom_data_file(SOURCES[kind]))
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        if index % PER_STUDY == 0:
            ds.StudyInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index % PER_STUDY + 1
        path = directory / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(paths: list[Path], port: int, called_aet: str, kind: str, senders: int) -> tuple[float, int]:
    """Run ``senders`` storescu processes over disjoint parts of the corpus; wall time and failures."""
    storescu = peers.on_path("storescu") or sys.exit("storescu not installed (Debian package dcmtk)")
    syntax = ["-xv"] if kind == "j2k" else []
    parts = [paths[i::senders] for i in range(senders)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [storescu, "-aet", CALLING_AET, "-aec", called_aet, *syntax, "127.0.0.1", str(port),
             *map(str, part)],
            env=peer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for part in parts if part
    ]
    failures = 0
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        failures += err.count("Store Failed") + (1 if proc.returncode else 0)
    return time.perf_counter() - start, failures


# Receivers --------------------------------------------------------------------------------------


@contextmanager
def node_receiver(workdir: Path) -> Iterator[tuple[int, str, Callable[[], int]]]:
    port = peers.free_port()
    node = start_node(
        workdir / "node", port, settle_seconds=30.0,
        extra_env={"CXR_NODE__DICOM__CALLERS": json.dumps([{"ae_title": CALLING_AET}]),
                   "CXR_NODE__LOGGING__LEVEL": "WARNING"},
    )
    node.wait_model_ready(300)  # a running node has its model warmed up; measure that, not start-up

    def count() -> int:
        with sqlite3.connect(workdir / "node" / "cxr-node.sqlite3") as db:
            return int(db.execute("select count(*) from instance").fetchone()[0])

    try:
        yield port, NODE_AET, count
    finally:
        node.stop()


@contextmanager
def storescp_receiver(workdir: Path) -> Iterator[tuple[int, str, Callable[[], int]]]:
    storescp = peers.on_path("storescp") or sys.exit("storescp not installed (Debian package dcmtk)")
    out = workdir / "storescp"
    out.mkdir()
    port = peers.free_port()
    proc = subprocess.Popen([storescp, "--fork", "+xa", "-aet", "STORESCP", "-od", str(out), str(port)],
                            env=peer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc)
    try:
        yield port, "STORESCP", lambda: sum(1 for p in out.iterdir() if p.is_file())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@contextmanager
def orthanc_receiver(workdir: Path) -> Iterator[tuple[int, str, Callable[[], int]]]:
    orthanc = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin") or sys.exit(
        "Orthanc not installed (Debian package orthanc)")
    root = workdir / "orthanc"
    root.mkdir()
    port, http_port = peers.free_port(), peers.free_port()
    config = {
        "Name": "bench", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "StorageCompression": False,
        "Plugins": [], "DicomServerEnabled": True, "HttpServerEnabled": True, "SyncStorageArea": True,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen([orthanc, str(root / "orthanc.json")], env=peer_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_port(port, proc)

    def count() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/statistics", timeout=30) as response:
            return int(json.load(response)["CountInstances"])

    try:
        yield port, "ORTHANC", count
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """The receiver listens, or the benchmark exits saying why."""
    try:
        peers.wait_for_port(port, proc, timeout)
    except (RuntimeError, TimeoutError) as exc:
        sys.exit(f"receiver: {exc}")


RECEIVERS = {"node": node_receiver, "storescp": storescp_receiver, "orthanc": orthanc_receiver}


@dataclass
class Measurement:
    kind: str
    senders: int
    receiver: str
    count: int
    seconds: float
    stored: int
    failures: int
    complete: bool = True  # every instance sent was stored, without a failure, in every round

    @property
    def per_second(self) -> float:
        return self.count / self.seconds

    @property
    def rate(self) -> float | None:
        """Instances a second, when the receiver stored them all: a receiver that refused them answered
        faster than one that stored them, and was given the better rate."""
        return self.per_second if self.complete else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=at_least(1), default=40, help="instances per corpus (default 40)")
    parser.add_argument("--senders", type=at_least(1), nargs="+", default=[1, 4])
    parser.add_argument("--kinds", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--receivers", nargs="+", default=list(RECEIVERS), choices=list(RECEIVERS))
    parser.add_argument("--rounds", type=at_least(1), default=3,
                        help="repeat each measurement, receivers in rotating order; the median is reported "
                             "(the machine is shared: interleaving keeps load drift from favouring one receiver)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="cxr-ingest-bench-", dir=args.workdir))
    results: list[Measurement] = []
    try:
        for kind in args.kinds:
            corpus = make_corpus(kind, args.count, scratch / f"corpus-{kind}")
            for senders in args.senders:
                rounds: dict[str, list[Measurement]] = {r: [] for r in args.receivers}
                for round_index in range(args.rounds):
                    shift = round_index % len(args.receivers)
                    for receiver in args.receivers[shift:] + args.receivers[:shift]:
                        workdir = scratch / f"{kind}-{senders}-{receiver}-{round_index}"
                        workdir.mkdir()
                        with RECEIVERS[receiver](workdir) as (port, aet, count):
                            seconds, failures = send(corpus, port, aet, kind, senders)
                            stored = count()
                        complete = failures == 0 and stored >= len(corpus)
                        m = Measurement(
                            kind, senders, receiver, len(corpus), seconds, stored, failures, complete
                        )
                        rounds[receiver].append(m)
                        print(f"  {kind:<13}{senders} sender(s) -> {receiver:<9}{m.per_second:7.1f}/s "
                              f"({stored} stored, {failures} failed)", file=sys.stderr, flush=True)
                        shutil.rmtree(workdir, ignore_errors=True)
                for measurements in rounds.values():
                    results.append(_median(measurements))
            shutil.rmtree(scratch / f"corpus-{kind}", ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(results_table(results))
    print(table.json_line(figures(results)))
    incomplete = [m for m in results if not m.complete]
    for m in incomplete:  # its rate is "—": say why, and fail the run as e2e.py does for a lost study
        print(f"{m.receiver} stored {m.stored} of {m.count * args.rounds} ({m.kind}, {m.senders} sender(s), "
              f"{args.rounds} round(s)), {m.failures} failed: no rate", file=sys.stderr)
    return 1 if incomplete else 0


def _median(measurements: list[Measurement]) -> Measurement:
    """The median rate (of an even number of rounds the mean of the middle two, not the faster of them), as
    the seconds the corpus would take at it; stored/failed summed over all rounds so no failure hides."""
    first = measurements[0]
    rate = statistics.median(m.per_second for m in measurements)
    return Measurement(first.kind, first.senders, first.receiver, first.count, first.count / rate,
                       sum(m.stored for m in measurements), sum(m.failures for m in measurements),
                       all(m.complete for m in measurements))


def _rate(results: list[Measurement], kind: str, senders: int, receiver: str) -> float | None:
    for m in results:
        if (m.kind, m.senders, m.receiver) == (kind, senders, receiver):
            return m.rate
    return None


def results_table(results: list[Measurement]) -> str:
    columns = [
        ("corpus", ""), ("senders", ""), ("node/s", ".1f"), ("storescp/s", ".1f"), ("orthanc/s", ".1f"),
        ("node/storescp", ""), ("node/orthanc", ""), ("stored", ""), ("failed", ""),
    ]
    rows: list[list[object]] = []
    combos = sorted({(m.kind, m.senders) for m in results}, key=lambda c: (list(SOURCES).index(c[0]), c[1]))
    for kind, senders in combos:
        node, scp, orthanc = (_rate(results, kind, senders, r) for r in RECEIVERS)
        stored = sum(m.stored for m in results if (m.kind, m.senders) == (kind, senders))
        failed = sum(m.failures for m in results if (m.kind, m.senders) == (kind, senders))
        ratios = [_ratio(node, scp), _ratio(node, orthanc)]
        rows.append([kind, senders, node, scp, orthanc, *ratios, stored, failed])
    return table.render(columns, rows)


def _ratio(a: float | None, b: float | None) -> str | None:
    return None if a is None or not b else f"{a / b:.2f}x"


def figures(results: list[Measurement]) -> dict[str, object]:
    out: dict[str, object] = {"count": results[0].count if results else 0, "statistic": "median", "runs": []}
    runs: list[dict[str, object]] = []
    for m in results:
        runs.append({"corpus": m.kind, "senders": m.senders, "receiver": m.receiver,
                     "instances_per_s": None if m.rate is None else round(m.rate, 2),
                     "seconds": round(m.seconds, 3),
                     "stored": m.stored, "failures": m.failures})
    out["runs"] = runs
    ratios: dict[str, float] = {}
    for kind, senders in {(m.kind, m.senders) for m in results}:
        node = _rate(results, kind, senders, "node")
        for peer in ("storescp", "orthanc"):
            other = _rate(results, kind, senders, peer)
            if node and other:
                ratios[f"{kind}_{senders}_node_vs_{peer}"] = round(node / other, 3)
    out["ratios"] = dict(sorted(ratios.items()))
    return out


if __name__ == "__main__":
    sys.exit(main())
