"""Acceptance of the node foundation against the real tools a hospital uses (DCMTK, PostgreSQL).

The node runs as a subprocess exactly as the README starts it (``cxr-node serve`` with ``CXR_NODE__*``
overrides for port and data directory). Senders: DCMTK ``echoscu``/``storescu``; malformed objects are
sent with pynetdicom in raw-file mode (DCMTK refuses to send a file it cannot parse).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ComputedRadiographyImageStorage, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from dicom_node.store.db import NODE_LOCK_KEY, make_engine
from dicom_node.store.models import Instance, Job, JobKind, Series, Study, StudyState
from tests import peers
from tests.node_datasets import make_cr, to_bytes, write
from tests.node_process import NODE_AET, NodeProcess, node_env, run_cli, start_node
from tests.postgres_server import PostgresServer, postgres_server

pytestmark = pytest.mark.interop

SENDER = "STORESCU"
PYSENDER = "PYSCU"
SENTINEL = "ZZSENTINEL^QUIXOTE"
SETTLE = 2.0


def dcmtk(name: str) -> str:
    return peers.executable(name)


def dcmtk_env() -> dict[str, str]:
    import os

    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(port: int, *paths: Path, aet: str = SENDER, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("storescu"), "-aet", aet, "-aec", NODE_AET, *extra, "127.0.0.1", str(port),
                           *map(str, paths)], capture_output=True, text=True, env=dcmtk_env(), timeout=300)


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy (an event we cannot subscribe to)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def instance_row(engine: Engine, sop_uid: str) -> Instance | None:
    with Session(engine) as session:
        return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))


def files_named(node: NodeProcess, sop_uid: str) -> list[Path]:
    return [p for p in node.storage_dir.rglob("*") if p.is_file() and sop_uid in p.name]


def temporaries(node: NodeProcess) -> list[Path]:
    return [p for p in node.storage_dir.rglob("*.tmp")] if node.storage_dir.exists() else []


def raw_store(port: int, path: Path, *, aet: str = PYSENDER) -> int:
    """Send a file's bytes as they are (pynetdicom chunked mode: no parsing on the sender's side)."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    ae = AE(ae_title=aet)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
        assert assoc.is_established, "association refused"
        try:
            response = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return int(response.Status)


# Fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    dcmtk("storescu")
    proc = start_node(tmp_path_factory.mktemp("node"), peers.free_port(), settle_seconds=SETTLE,
                      callers=(SENDER, PYSENDER), extra_env={"CXR_NODE__LOGGING__LEVEL": "DEBUG"})
    yield proc
    assert proc.stop() == 0, "graceful stop failed"


@pytest.fixture(scope="module")
def node_db(node: NodeProcess) -> Iterator[Engine]:
    engine = make_engine(node.database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


# Association and verification -----------------------------------------------------------------


def test_echoscu_succeeds(node: NodeProcess) -> None:
    result = subprocess.run([dcmtk("echoscu"), "-aet", SENDER, "-aec", NODE_AET, "127.0.0.1", str(node.port)],
                            capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    # the start-up line says which database the node uses (a missing env file fell back to SQLite unseen)
    assert f"; database SQLite file {node.data_dir.resolve() / 'cxr-node.sqlite3'}" in node.log_text()


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected(node: NodeProcess, node_db: Engine,
                                                             tmp_path: Path) -> None:
    stranger = subprocess.run([dcmtk("echoscu"), "-aet", "STRANGER", "-aec", NODE_AET, "127.0.0.1",
                               str(node.port)], capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert stranger.returncode != 0
    assert "Calling AE Title Not Recognized" in stranger.stderr + stranger.stdout
    wrong_called = subprocess.run([dcmtk("echoscu"), "-aet", SENDER, "-aec", "NOTTHENODE", "127.0.0.1",
                                   str(node.port)], capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stderr + wrong_called.stdout
    ds = make_cr()
    refused = storescu(node.port, write(ds, tmp_path / "x.dcm"), aet="STRANGER")
    assert refused.returncode != 0
    assert instance_row(node_db, ds.SOPInstanceUID) is None


# Storage of the real radiographs ----------------------------------------------------------------


def test_real_radiographs_are_stored_unchanged_and_the_study_settles(node: NodeProcess, node_db: Engine) -> None:
    uncompressed = peers.pydicom_data_file("RG1_UNCI.dcm")
    jpeg2000 = peers.pydicom_data_file("RG1_J2KR.dcm")
    first = storescu(node.port, uncompressed)
    assert first.returncode == 0, first.stderr
    second = storescu(node.port, jpeg2000, extra=("-xv",))  # propose JPEG 2000 lossless
    assert second.returncode == 0, second.stderr
    for original_path in (uncompressed, jpeg2000):
        original = dcmread(original_path)
        row = instance_row(node_db, original.SOPInstanceUID)
        assert row is not None, "no row for a stored instance"
        assert row.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
        stored = dcmread(node.storage_dir / row.file_path)
        assert stored.SOPInstanceUID == original.SOPInstanceUID
        dump = subprocess.run([dcmtk("dcmdump"), str(node.storage_dir / row.file_path)],
                              capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr  # DCMTK reads it strictly
        assert np.array_equal(stored.pixel_array, original.pixel_array)
    with Session(node_db) as session:
        study_pk = session.scalar(select(Study.id).where(Study.study_instance_uid == original.StudyInstanceUID))
    assert study_pk is not None

    def ready_job() -> Job | None:
        with Session(node_db) as session:
            return session.scalar(select(Job).where(Job.study_pk == study_pk, Job.kind == JobKind.STUDY_READY))

    job = wait_for(ready_job, timeout=SETTLE + 30)
    assert job.dedupe_key == f"study:{study_pk}"
    with Session(node_db) as session:
        study = session.get(Study, study_pk)
        # READY, or already taken further by the pipeline
        assert study is not None and study.state is not StudyState.RECEIVED and study.ready_at is not None


def test_repeated_instance_is_success_without_second_row(node: NodeProcess, node_db: Engine,
                                                         tmp_path: Path) -> None:
    path = write(make_cr(), tmp_path / "twice.dcm")
    assert storescu(node.port, path).returncode == 0
    assert storescu(node.port, path).returncode == 0
    with Session(node_db) as session:
        count = session.scalar(select(func.count()).select_from(Instance).where(
            Instance.sop_instance_uid == dcmread(path).SOPInstanceUID))
    assert count == 1


@pytest.mark.slow
def test_200_instances_over_4_concurrent_associations(node: NodeProcess, node_db: Engine, tmp_path: Path) -> None:
    sop_uids = []
    folders = [tmp_path / f"sender{i}" for i in range(4)]
    for index in range(200):
        folder = folders[index % 4]
        folder.mkdir(exist_ok=True)
        ds = make_cr(rows=32, columns=32, seed=index, study_uid=f"1.2.826.0.1.3680043.8.498.77.{index % 5}")
        sop_uids.append(ds.SOPInstanceUID)
        write(ds, folder / f"{index:04d}.dcm")
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", SENDER, "-aec", NODE_AET, "+sd", "127.0.0.1",
                               str(node.port), str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dcmtk_env()) for folder in folders]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], [err for _, err in outputs]
    assert not any("Store Failed" in err for _, err in outputs)
    with Session(node_db) as session:
        rows = session.scalars(select(Instance.file_path).where(Instance.sop_instance_uid.in_(sop_uids))).all()
    assert len(rows) == 200
    assert sum(1 for rel in rows if (node.storage_dir / rel).is_file()) == 200


# Refusals ------------------------------------------------------------------------------------


def test_sop_class_not_accepted_is_refused_at_the_presentation_context(node: NodeProcess,
                                                                       node_db: Engine) -> None:
    ae = AE(ae_title=PYSENDER)
    ae.requested_contexts = [build_context(CTImageStorage, ExplicitVRLittleEndian),
                             build_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)]
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    try:
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert CTImageStorage in rejected and CTImageStorage not in accepted
    assert ComputedRadiographyImageStorage in accepted
    ct = Path(str(get_testdata_file("CT_small.dcm")))
    result = storescu(node.port, ct)
    assert result.returncode != 0
    assert "No presentation context for: (CT)" in result.stderr + result.stdout
    assert instance_row(node_db, dcmread(ct).SOPInstanceUID) is None


def _truncated(ds: Any) -> bytes:
    return to_bytes(ds)[:-700]


def _undecodable(ds: Any) -> bytes:
    data = to_bytes(ds)
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    return data[:meta_end] + bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8))


def _without(keyword: str) -> Callable[[Any], bytes]:
    def build(ds: Any) -> bytes:
        delattr(ds, keyword)
        return to_bytes(ds)

    return build


BAD_INPUT = {
    "truncated": (_truncated, 0xC210),
    "undecodable": (_undecodable, 0xC210),
    "no-pixel-data": (_without("PixelData"), 0xA900),
    "no-sop-class": (_without("SOPClassUID"), 0xA900),
    "no-sop-instance": (_without("SOPInstanceUID"), 0xA900),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_its_status_and_leaves_nothing(case: str, node: NodeProcess, node_db: Engine,
                                                      tmp_path: Path) -> None:
    build, expected = BAD_INPUT[case]
    ds = make_cr(patient_name=SENTINEL)
    sop_uid = ds.SOPInstanceUID
    path = tmp_path / f"{case}.dcm"
    path.write_bytes(build(ds))
    assert raw_store(node.port, path) == expected
    assert instance_row(node_db, sop_uid) is None
    assert files_named(node, sop_uid) == [] and temporaries(node) == []
    # the listener keeps serving
    assert storescu(node.port, write(make_cr(), tmp_path / "ok.dcm")).returncode == 0


def test_an_image_that_names_another_studys_series_is_refused_with_a_reason_storescu_shows(
    node: NodeProcess, node_db: Engine, tmp_path: Path
) -> None:
    """A Series Instance UID that another study already has: the old node filed the image under that
    study (another patient's) and answered success. DCMTK's storescu now reports the failure status and
    the node's reason from the Error Comment; nothing of the image is kept."""
    first = make_cr()
    assert storescu(node.port, write(first, tmp_path / "first.dcm")).returncode == 0
    other = make_cr(series_uid=first.SeriesInstanceUID, patient_id="PID-OTHER")
    result = storescu(node.port, write(other, tmp_path / "other.dcm"), extra=("-d",))
    output = result.stdout + result.stderr
    assert "0xc211" in output.lower(), output
    assert "Series Instance UID already stored in another study" in output, output
    assert instance_row(node_db, other.SOPInstanceUID) is None
    assert files_named(node, other.SOPInstanceUID) == [] and temporaries(node) == []


def test_disk_below_reserve_is_out_of_resources(tmp_path: Path) -> None:
    node = start_node(tmp_path / "full", peers.free_port(), callers=(PYSENDER,),
                      extra_env={"CXR_NODE__STORAGE__MIN_FREE_BYTES": str(10**18)})
    try:
        ds = make_cr()
        assert raw_store(node.port, write(ds, tmp_path / "a.dcm")) == 0xA700
        engine = make_engine(node.database_url)
        assert instance_row(engine, ds.SOPInstanceUID) is None
        engine.dispose()
        assert files_named(node, ds.SOPInstanceUID) == [] and temporaries(node) == []
    finally:
        node.stop()


def test_database_unavailable_is_out_of_resources(tmp_path: Path) -> None:
    with postgres_server() as pg:
        node = start_node(tmp_path / "pgnode", peers.free_port(), callers=(PYSENDER,),
                          extra_env={"CXR_NODE__DATABASE__URL": pg.create_database()})
        try:
            ok, lost = make_cr(), make_cr()
            ae = AE(ae_title=PYSENDER)
            ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
            assert assoc.is_established
            try:
                assert int(assoc.send_c_store(ok).Status) == 0x0000
                pg.stop()  # the database goes away mid-association
                assert int(assoc.send_c_store(lost).Status) == 0xA700
            finally:
                assoc.release()
            assert files_named(node, ok.SOPInstanceUID) != []
            assert files_named(node, lost.SOPInstanceUID) == [] and temporaries(node) == []
            assert node.proc is not None and node.proc.poll() is None, "the node died with its database"
        finally:
            node.stop()


def test_a_second_node_on_the_same_database_refuses_to_start(tmp_path: Path) -> None:
    """Two nodes on one database fired each other's settle timers on files they did not have, and one's
    scheduler thread died; the second now stops at start with one line saying why."""
    with postgres_server() as pg:
        url = pg.create_database()
        for database in ("sqlite", url):
            shared = {} if database == "sqlite" else {"CXR_NODE__DATABASE__URL": database}
            first = start_node(tmp_path / f"first-{len(shared)}", peers.free_port(), extra_env=shared)
            try:
                # SQLite: the same data directory; PostgreSQL: the same database from another directory
                second_dir = tmp_path / ("first-0" if database == "sqlite" else "second")
                extra = {**shared, "CXR_NODE__METRICS__PORT": "0"}
                env = node_env(second_dir, peers.free_port(), extra=extra)
                second = run_cli(["serve"], env, check=False, timeout=120)
            finally:
                first.stop()
            assert second.returncode == 2, second.stderr
            assert "error: another cxr-node is running on this database" in second.stderr


def test_a_node_takes_its_lock_again_after_a_database_restart_and_stops_if_another_took_it(
    tmp_path: Path,
) -> None:
    """The PostgreSQL lock ends with its session (a restart, a failover), and only /healthz took it
    again: where nothing polled it, a second node started beside the first after a database restart,
    and every study sent to it FAILED in the first node's hands (review)."""
    with postgres_server() as pg:
        url = pg.create_database()
        shared = {"CXR_NODE__DATABASE__URL": url, "CXR_NODE__DATABASE__LOCK_CHECK_SECONDS": "1"}
        first = start_node(tmp_path / "first", peers.free_port(), extra_env=shared)
        engine = make_engine(url)
        cut = text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                   "WHERE pid <> pg_backend_pid() AND datname = current_database()")
        try:
            with engine.connect() as admin:
                assert admin.execute(cut).scalar()  # as a restart would: the lock's session is gone
            # nothing polls /healthz: the node's own check takes the lock again, on a new session
            held = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                        "AND ((classid::bigint << 32) | objid::bigint) = :key AND objsubid = 1")
            with engine.connect() as watcher:
                wait_for(lambda: watcher.execute(held, {"key": NODE_LOCK_KEY}).scalar(), timeout=30)
            extra = {**shared, "CXR_NODE__METRICS__PORT": "0"}
            env = node_env(tmp_path / "second", peers.free_port(), extra=extra)
            second = run_cli(["serve"], env, check=False, timeout=120)
            assert second.returncode == 2, second.stderr
            assert "another cxr-node is running on this database" in second.stderr
            with engine.connect() as other:  # now another node takes it first while the session is gone
                other.execute(cut)
                taken = False
                deadline = time.monotonic() + 5
                while not taken and time.monotonic() < deadline:
                    take = f"SELECT pg_try_advisory_lock({NODE_LOCK_KEY})"
                    taken = bool(other.exec_driver_sql(take).scalar())
                assert taken
                assert first.proc is not None
                assert first.proc.wait(30) == 2  # it stops by itself, saying why
        finally:
            first.stop()
            engine.dispose()
    assert "another cxr-node took this database's node lock" in first.log_text()


# Crash safety --------------------------------------------------------------------------------


def test_kill_9_before_settle_then_restart_readies_the_study_once(tmp_path: Path) -> None:
    port = peers.free_port()
    # 20 s: the kill lands well before the timer on a loaded CI machine (3 small files take < 1 s), and
    # the timer, persisted in the job store, fires after the restart within the wait below.
    node = start_node(tmp_path / "crash", port, settle_seconds=20.0, callers=(SENDER,))
    study_uid = generate_uid()
    paths = [write(make_cr(study_uid=study_uid, seed=i), tmp_path / f"{i}.dcm") for i in range(3)]
    result = storescu(port, *paths)
    node.kill()  # SIGKILL right after storage, before the settle time
    assert result.returncode == 0, result.stderr
    engine = make_engine(node.database_url)
    try:
        with Session(engine) as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            assert study is not None and study.state is StudyState.RECEIVED
            assert session.scalar(select(func.count()).select_from(Job)) == 0
            study_pk = study.id
        node.start()

        def ready() -> bool:
            with Session(engine) as session:
                row = session.get(Study, study_pk)
                return row is not None and row.state is not StudyState.RECEIVED  # ready (or further)

        wait_for(ready, timeout=60)
        node.stop()
        node.start()  # a second restart must not ready it again
        with Session(engine) as session:
            jobs = session.scalars(select(Job).where(Job.study_pk == study_pk)).all()
            instances = session.scalar(select(func.count()).select_from(Instance).join(Series).where(
                Series.study_pk == study_pk))
        assert len(jobs) == 1 and instances == 3
        assert node.log_text().count(f"study {study_pk} ready") == 1
    finally:
        node.stop()
        engine.dispose()


def listener_process_pids(node_pid: int) -> list[int]:
    """The node's spawned listener processes (not multiprocessing's resource tracker)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == node_pid and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def test_listener_processes_share_associations_settle_their_studies_and_die_with_the_node(
    tmp_path: Path,
) -> None:
    port = peers.free_port()
    node = start_node(tmp_path / "multi", port, settle_seconds=SETTLE, callers=(SENDER,),
                      extra_env={"CXR_NODE__DICOM__LISTENER_PROCESSES": "3"})
    engine = make_engine(node.database_url)
    try:
        wait_for(lambda: node.log_text().count("serving port") == 2, timeout=60)
        assert node.proc is not None
        workers = listener_process_pids(node.proc.pid)
        assert len(workers) == 2
        study_uids = [generate_uid() for _ in range(12)]
        folders = []
        for number, study_uid in enumerate(study_uids):
            folder = tmp_path / f"study{number}"
            folder.mkdir()
            for index in range(3):
                write(make_cr(study_uid=study_uid, seed=number * 10 + index), folder / f"{index}.dcm")
            folders.append(folder)
        procs = [subprocess.Popen([dcmtk("storescu"), "-aet", SENDER, "-aec", NODE_AET, "+sd", "127.0.0.1",
                                   str(port), str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=dcmtk_env()) for folder in folders]
        outputs = [proc.communicate(timeout=300) for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
        stored = [line for line in node.log_text().splitlines() if "stored instance" in line]
        assert len(stored) == 36
        processes = {line.split("[cxr-node-listener-")[1].split("/")[0] if "[cxr-node-listener-" in line
                     else "node" for line in stored}
        assert len(processes) >= 2, "the associations were not spread over the processes"

        def all_ready() -> bool:
            with Session(engine) as session:
                states = session.scalars(select(Study.state).where(Study.study_instance_uid.in_(study_uids)))
                return sorted(state is not StudyState.RECEIVED for state in states) == [True] * 12

        wait_for(all_ready, timeout=SETTLE + 60)
        # Armed when stored, through the listener processes' events: the periodic sweep (which logs when
        # it arms a study) would also ready them, and must not be what did it.
        assert "re-armed settle timers" not in node.log_text()

        node.kill()
        wait_for(lambda: not listener_process_pids(node.proc.pid if node.proc else 0)
                 and not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=5)
        node.start()  # the port is free again at once
        assert node.log_text().count("serving port") >= 2
    finally:
        node.stop()
        engine.dispose()


# Runs last in this module: everything above went through the same node and its log.


def test_sentinel_patient_name_never_reaches_the_log(node: NodeProcess, node_db: Engine, tmp_path: Path) -> None:
    ds = make_cr(patient_name=SENTINEL, patient_id=SENTINEL[:10])
    assert storescu(node.port, write(ds, tmp_path / "sentinel.dcm")).returncode == 0
    row = instance_row(node_db, ds.SOPInstanceUID)
    assert row is not None
    with Session(node_db) as session:
        study_pk = session.scalar(select(Series.study_pk).where(Series.id == row.series_pk))
    wait_for(lambda: f"study {study_pk} ready" in node.log_text(), timeout=SETTLE + 30)
    log = node.log_text()
    assert "stored instance" in log  # the log is captured at DEBUG level
    assert SENTINEL not in log and "QUIXOTE" not in log
