"""End to end: modality → Orthanc → (Lua routing) → node → SR + PDF back in Orthanc.

N single-image studies (fresh UIDs, copies of pydicom-data's RG1_UNCI chest CR) are pushed into a real
Orthanc (Debian package) at a steady rate over one association; Orthanc forwards each to the node
(``python -m dicom_node serve``), which answers with an SR and an Encapsulated PDF. Measured:

- seconds from Orthanc acknowledging the image to the node's SR being stored in Orthanc (p50, p95, max),
  observed through Orthanc's /changes feed (polled every 50 ms);
- studies per minute (first receipt to last SR);
- the node's peak RSS (VmHWM of the node process and its listener processes, summed);
- lost studies (no SR within the deadline) and duplicated ones (more than one SR);
- with ``--storage-commitment`` (Orthanc set to it), seconds from each SR delivered to Orthanc's report that
  it keeps it, and how many SR and PDF deliveries were committed (any not committed fails the run, exit 1).

The peer, in the same run: the same Orthanc forwards as many fresh studies, at the same rate, to DCMTK
``storescp`` (which stores files and classifies nothing) in the node's place. Its seconds from Orthanc's
acknowledgement to the file written are the floor for the node's Orthanc → node leg; the ratio of the two
medians is printed. ``--no-peer`` skips it.

Usage: PYTHONPATH=. python benchmarks/e2e.py [--studies 100] [--rate 1.0] [--settle 2] [--model PATH]
       [--storage-commitment]
Prints a table, then the figures as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import table  # noqa: E402
from benchmarks.testdata import pydicom_data_file  # noqa: E402
from classifier.cli import at_least  # noqa: E402
from tests import peers  # noqa: E402
from tests.node_process import NODE_AET, NodeProcess, configured_node, wait_until  # noqa: E402
from tests.orthanc import NodeAddress, OrthancServer  # noqa: E402
from tests.pipeline.model import default_model, tiny_model  # noqa: E402


class SrWatcher(threading.Thread):
    """Follows Orthanc's change feed and notes when an SR of each study appears."""

    def __init__(self, orthanc: OrthancServer) -> None:
        super().__init__(daemon=True)
        self.orthanc = orthanc
        self.seen: dict[str, list[float]] = {}
        self.stop = threading.Event()
        self.client = httpx.Client(base_url=orthanc.url, timeout=30.0)
        self.since = int(self.client.get("/changes", params={"last": ""}).json()["Last"])

    def run(self) -> None:
        while not self.stop.is_set():
            body = self.client.get("/changes", params={"since": self.since, "limit": 1000}).json()
            for change in body["Changes"]:
                if change["ChangeType"] != "NewInstance":
                    continue
                tags = self.client.get(f"/instances/{change['ID']}/simplified-tags").json()
                if tags.get("Modality") == "SR":
                    self.seen.setdefault(str(tags["StudyInstanceUID"]), []).append(time.monotonic())
            self.since = int(body["Last"])
            if not body["Done"]:
                continue
            self.stop.wait(0.05)


def corpus(folder: Path, count: int) -> list[tuple[Path, str]]:
    source = pydicom.dcmread(pydicom_data_file("RG1_UNCI.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for index in range(count):
        source.StudyInstanceUID = generate_uid()
        source.SeriesInstanceUID = generate_uid()
        source.SOPInstanceUID = generate_uid()
        source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
        source.AccessionNumber = f"BENCH{index:05d}"
        path = folder / f"{index:04d}.dcm"
        source.save_as(path)
        items.append((path, str(source.StudyInstanceUID)))
    return items


def push(
    orthanc: OrthancServer, items: list[tuple[Path, str]], rate: float
) -> tuple[dict[str, float], dict[str, float]]:
    """C-STORE each file into Orthanc over one association; study UID -> acknowledged (monotonic, wall)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.maximum_pdu_size = 131072
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.ae_title)
    if not assoc.is_established:
        raise RuntimeError("Orthanc refused the association")
    received: dict[str, float] = {}
    wall: dict[str, float] = {}
    started = time.monotonic()
    try:
        for index, (path, study_uid) in enumerate(items):
            if rate > 0:
                delay = started + index / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            status = assoc.send_c_store(pydicom.dcmread(path))
            if status is None or int(status.Status) != 0:
                raise RuntimeError(f"Orthanc answered {status!r} for study {index}")
            received[study_uid] = time.monotonic()
            wall[study_uid] = time.time()
    finally:
        assoc.release()
    return received, wall


def storescp_leg(work: Path, orthanc: OrthancServer, count: int, rate: float) -> list[float]:
    """The peer: Orthanc (stopped) forwards ``count`` fresh studies to DCMTK ``storescp`` in the node's place.
    Seconds from Orthanc's acknowledgement to the file's last write at storescp, one per study received."""
    storescp = peers.on_path("storescp") or sys.exit("storescp not installed (Debian package dcmtk)")
    out = work / "storescp"
    out.mkdir()
    port = peers.free_port()
    proc = subprocess.Popen([storescp, "-aet", NODE_AET, "-uf", "-od", str(out), str(port)],
                            env=dict(os.environ, TCP_NODELAY="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peers.wait_for_port(port, proc)
    orthanc.set_node(NodeAddress(NODE_AET, port))
    orthanc.start()
    try:
        _, wall = push(orthanc, corpus(work / "corpus-peer", count), rate)
        wait_until(lambda: sum(1 for _ in out.iterdir()) >= count, 60 + count * 0.5, interval=0.2)
        time.sleep(1.0)  # the last file's write
    finally:
        orthanc.stop()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    seconds = []
    for path in out.iterdir():
        study = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        if study in wall:
            seconds.append(path.stat().st_mtime - wall[study])
    return seconds


def stages(node: NodeProcess, wall: dict[str, float]) -> dict[str, list[float]]:
    """Where the time went, from the node's own rows: Orthanc → node, settle, ready → SR delivered."""
    from sqlalchemy import select

    from dicom_node.store.models import CommitmentState, Delivery, ResultKind, ResultObject, Study

    out: dict[str, list[float]] = {"forward": [], "settle": [], "process": [], "commit": []}
    with node.session() as session:
        rows = session.execute(
            select(Study.study_instance_uid, Study.first_received_at, Study.last_received_at, Study.ready_at,
                   Delivery.delivered_at, Delivery.commitment, Delivery.commitment_at)
            .join(ResultObject, ResultObject.study_pk == Study.id)
            .join(Delivery, Delivery.result_object_pk == ResultObject.id)
            .where(ResultObject.kind == ResultKind.SR, Delivery.delivered_at.is_not(None))
        ).all()
    for uid, first, last, ready, delivered, commitment, committed in rows:
        if uid in wall:
            out["forward"].append(_utc(first).timestamp() - wall[uid])
        if ready is not None:
            out["settle"].append((_utc(ready) - _utc(last)).total_seconds())
            out["process"].append((_utc(delivered) - _utc(ready)).total_seconds())
        if commitment is CommitmentState.COMMITTED and committed is not None:
            out["commit"].append((_utc(committed) - _utc(delivered)).total_seconds())
    return out


def commitments(node: NodeProcess) -> dict[str, int]:
    """The node's deliveries by storage commitment state ("none": not asked)."""
    from sqlalchemy import func, select

    from dicom_node.store.models import Delivery

    with node.session() as session:
        return {(state.value if state is not None else "none"): int(count) for state, count in
                session.execute(select(Delivery.commitment, func.count()).group_by(Delivery.commitment))}


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of the node: of its process and of every process under it (the listener
    processes, one per CPU by default, receive too), each process's VmHWM summed (an upper bound when
    they peak at different times, which is what memory must be sized for)."""
    total, found, pending = 0.0, False, [pid]
    while pending:
        process = pending.pop()
        try:
            status = Path(f"/proc/{process}/status").read_text()
            tasks = list(Path(f"/proc/{process}/task").iterdir())
            pending += [int(child) for task in tasks for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024.0
                found = True
    return total if found else float("nan")


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (numpy's "inverted_cdf"): the smallest value with at least q %
    of the values at or below it. The rank was rounded half to even, one too high whenever q·n/100 was an
    odd whole number: the p95 of the default 100 studies was the 96th (review)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered) / 100.0) - 1))
    return ordered[rank]


def _p(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile, the 50th as the median (as p50_s and the ratio take it: of an even count
    the mean of the middle two, where the nearest rank is the lower of them)."""
    if not values:
        return None
    return round(statistics.median(values) if q == 50 else percentile(values, q), 2)


def _ratio(values: list[float], peer: list[float]) -> float | None:
    """Median over the peer's median, or None when either leg is empty or the peer's is not positive."""
    if not values or not peer or statistics.median(peer) <= 0:
        return None
    return round(statistics.median(values) / statistics.median(peer), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=at_least(1), default=100)
    parser.add_argument("--rate", type=float, default=1.0, help="studies per second pushed (0: as fast as possible)")
    parser.add_argument("--settle", type=float, default=2.0, help="the node's settle time, seconds")
    parser.add_argument("--model", type=Path, help="model artifact (default: the shipped default model)")
    parser.add_argument("--no-heatmap", dest="heatmap", action="store_false",
                        help="skip Grad-CAM heat maps (the product default computes them for the PDF)")
    parser.add_argument("--no-peer", dest="peer", action="store_false",
                        help="skip the storescp peer leg (Orthanc → DCMTK storescp, same rate and count)")
    parser.add_argument("--storage-commitment", action="store_true",
                        help="set Orthanc to storage commitment: the node asks it to commit to the results")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cxr-e2e-"))
    try:
        return _run(args, work)
    finally:
        if not args.keep:  # also when a peer fails to start or the run is interrupted
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    model = args.model or default_model()
    if model is None:
        print("no default model shipped: training a tiny stand-in model (latency only, meaningless findings)")
        model = tiny_model(work / "model")
    orthanc = OrthancServer(work / "orthanc")
    node = configured_node(
        work / "node",
        model_path=model,
        callers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "reply_to": "ORTHANC"}],
        destinations=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
                       "storage_commitment": args.storage_commitment}],
        settle_seconds=args.settle,
        extra={"pipeline": {"heatmap": args.heatmap}},
    )
    orthanc.set_node(NodeAddress(NODE_AET, node.dicom_port))
    items = corpus(work / "corpus", args.studies)
    orthanc.start()
    node.start()
    try:
        node.wait_model_ready(300)  # measure the steady state, not start-up
        watcher = SrWatcher(orthanc)
        watcher.start()
        assert node.proc is not None
        pid = node.proc.pid
        received, wall = push(orthanc, items, args.rate)
        pushed_at = time.monotonic()
        wait_until(lambda: len(watcher.seen) >= len(items), args.settle + 120 + args.studies * 0.5, interval=0.5)
        time.sleep(1.0)  # a late duplicate would show here
        if args.storage_commitment:  # every SR and PDF reported on
            wait_until(lambda: commitments(node).get("committed", 0) >= 2 * len(items), 60, interval=0.5)
        watcher.stop.set()
        watcher.join(10)
        rss = peak_rss_mb(pid)
        breakdown = stages(node, wall)
        committed = commitments(node)
    finally:
        node.stop()
        orthanc.stop()
    peer = storescp_leg(work, orthanc, args.studies, args.rate) if args.peer else []

    latencies = [watcher.seen[uid][0] - at for uid, at in received.items() if uid in watcher.seen]
    lost = sum(1 for uid in received if uid not in watcher.seen)
    duplicated = sum(1 for uid in received if len(watcher.seen.get(uid, [])) > 1)
    first = min(received.values())
    last_sr = max((times[0] for uid, times in watcher.seen.items() if uid in received), default=pushed_at)
    per_minute = 60.0 * len(latencies) / (last_sr - first) if last_sr > first else float("nan")
    figures: dict[str, Any] = {
        "studies": len(items),
        "rate_per_s": args.rate,
        "settle_s": args.settle,
        "p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "p95_s": round(percentile(latencies, 95), 2) if latencies else None,
        "max_s": round(max(latencies), 2) if latencies else None,
        "studies_per_min": round(per_minute, 1),
        "node_peak_rss_mb": round(rss, 0),
        "lost": lost,
        "duplicated": duplicated,
        "target_p95_s": args.settle + 2.0,
        "orthanc_to_node_p50_s": _p(breakdown["forward"], 50),
        "settle_p50_s": _p(breakdown["settle"], 50),
        "orthanc_to_storescp_p50_s": _p(peer, 50),
        "orthanc_to_storescp_p95_s": _p(peer, 95),
        "orthanc_to_node_vs_storescp_p50": _ratio(breakdown["forward"], peer),
        "storescp_received": len(peer) if args.peer else None,
        "ready_to_sr_delivered_p50_s": _p(breakdown["process"], 50),
        "ready_to_sr_delivered_p95_s": _p(breakdown["process"], 95),
        "storage_commitment": args.storage_commitment,
        "sr_delivered_to_committed_p50_s": _p(breakdown["commit"], 50),
        "sr_delivered_to_committed_p95_s": _p(breakdown["commit"], 95),
        "deliveries_committed": committed.get("committed", 0),
        "deliveries_not_committed": sum(v for k, v in committed.items() if k != "committed")
        if args.storage_commitment else None,
        "heatmap": args.heatmap,
        "model": str(model),
    }
    print(table.render([("figure", ""), ("value", "")], [[k, v] for k, v in figures.items() if k != "model"]))
    print(f"model: {model}  (work dir {work}{'' if args.keep else ', removed'})")
    print(table.json_line(figures))
    return exit_status(figures)


def exit_status(figures: dict[str, Any]) -> int:
    """1 when a study was lost or duplicated, or a delivery asked about was not committed (said why)."""
    uncommitted = figures["deliveries_not_committed"] or 0  # None without --storage-commitment
    if uncommitted:
        print(f"{uncommitted} SR/PDF deliveries were not committed by Orthanc", file=sys.stderr)
    return 0 if figures["lost"] == 0 and figures["duplicated"] == 0 and uncommitted == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
