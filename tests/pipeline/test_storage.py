"""`cxr-node storage check`: rows whose files are gone and files no row names, after a restore."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import storage
from dicom_node.cli import main as cli_main
from dicom_node.settings import load_settings
from dicom_node.store.db import NodeLock, make_engine, make_session_factory, session_scope, upgrade
from dicom_node.store.models import (
    AuditEvent,
    Finding,
    Instance,
    ResultKind,
    ResultObject,
    Series,
    StudyState,
    utcnow,
)
from tests.pipeline.conftest import add_study, write_transaction_open

pytestmark = pytest.mark.db


def _node_files(db: sessionmaker[Session], data_dir: Path) -> dict[str, object]:
    """A study as the node leaves it (four images, an SR, a PDF and its plain copy, a heat map), then a
    restore that brought the database back from a later time than some files and from an earlier time
    than others."""
    storage, results = data_dir / "instances", data_dir / "results"
    with session_scope(db) as session:
        study = add_study(session, storage, images=4, state=StudyState.ANALYSED)
        instances = list(session.scalars(select(Instance).join(Series).where(Series.study_pk == study.id)
                                         .order_by(Instance.id)))
        kept, lost, purged, purged_back = instances
        (storage / lost.file_path).unlink()  # received after the files' backup
        (storage / purged.file_path).unlink()
        purged.purged_at = purged_back.purged_at = utcnow()  # removed by retention; one came back
        objects = {}
        for kind in (ResultKind.SR, ResultKind.PDF):
            uid = f"1.2.826.0.1.3680043.8.498.{study.id}{len(objects)}"
            obj = ResultObject(study_pk=study.id, kind=kind, model_name="m", model_version="1",
                               sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", sop_instance_uid=uid,
                               series_instance_uid="1.2.3", file_path=f"{study.id}/{kind.value}-{uid}.dcm")
            session.add(obj)
            session.flush()
            objects[kind] = obj
        sr, pdf = objects[ResultKind.SR], objects[ResultKind.PDF]
        for relative in (sr.file_path, pdf.file_path[:-4] + ".pdf"):  # the PDF's DICOM object is lost
            (results / relative).parent.mkdir(parents=True, exist_ok=True)
            (results / relative).write_bytes(b"result")
        finding = Finding(instance_pk=kept.id, model_name="m", model_version="1", label="normal",
                          top_class="normal", confidence=0.9, probabilities={"normal": 0.9},
                          heatmap_path=f"heatmaps/{kept.id}-m-1.npy")  # its file is lost
        session.add(finding)
        session.flush()
        # files no row names: a database restored from before they were made
        orphans = [f"results/{study.id + 1}/sr-1.2.826.9.dcm", "results/heatmaps/9999-m-1.npy",
                   "instances/1.2.840.5555/1.2.840.5556/1.2.840.5557.dcm"]
        for relative in orphans:
            (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            np.save(data_dir / relative, np.zeros(3)) if relative.endswith(".npy") else (
                data_dir / relative).write_bytes(b"x" * 1000)
        (storage / "README.txt").write_text("an administrator's note")  # not the node's: left alone
        (storage / ".incoming").mkdir(exist_ok=True)
        (storage / ".incoming" / ".incoming-abc.tmp").write_bytes(b"being written")
        return {"lost": lost.id, "purged_back": storage / purged_back.file_path, "pdf": pdf.id,
                "pdf_file": results / pdf.file_path, "finding": finding.id,
                "heatmap": results / str(finding.heatmap_path), "orphans": [data_dir / o for o in orphans],
                "patient": study.patient.name, "study_uid": study.study_instance_uid}


@pytest.mark.usefixtures("restore_logging")
def test_storage_check_lists_missing_files_and_orphans_and_removes_the_orphans(
    db: sessionmaker[Session], tmp_path: Path, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a restore the operator had no way to see which rows had lost their files (the console
    offered them, the outbox retried them) nor which files no row named (patient data no retention
    would ever remove). The check names rows by id and the node's own result files by name, never
    the senders' UIDs that name received files, and exits 1 until rows and files agree."""
    cli_env.setenv("CXR_NODE__DATABASE__URL", db.kw["bind"].url.render_as_string(hide_password=False))
    made = _node_files(db, tmp_path / "var")
    check = ["storage", "check"]

    assert cli_main(check) == 1
    out = capsys.readouterr().out
    assert f"missing: instance {made['lost']}: its received file" in out
    assert f"missing: result object {made['pdf']} (pdf): results/" in out
    assert f"missing: finding {made['finding']}: its heat map results/heatmaps/" in out
    orphans: list[Path] = made["orphans"]  # type: ignore[assignment]
    for orphan in orphans[:2]:
        assert f"orphan: {orphan.relative_to(tmp_path / 'var')}\n" in out
    assert "orphan: 2 received file(s) in 2 study folder(s)" in out  # one without a row, one purged
    assert "left alone: 1 file(s)" in out
    assert "1.2.840.555" not in out and str(made["study_uid"]) not in out and str(made["patient"]) not in out
    assert all(path.exists() for path in orphans)

    assert cli_main([*check, "--remove-orphans"]) == 1  # the missing files are still missing
    out = capsys.readouterr().out
    assert "removed 4 orphan file(s) (audited as storage.remove_orphans)" in out
    assert not any(path.exists() for path in [*orphans, made["purged_back"]])
    assert (tmp_path / "var" / "instances" / "README.txt").exists()
    with session_scope(db) as session:
        [event] = session.scalars(select(AuditEvent).where(AuditEvent.action == "storage.remove_orphans"))
        assert event.details["instance_files"] == 2 and event.details["instance_bytes"] == 1000 + 6
        assert sorted(event.details["result_files"]) == sorted(
            str(o.relative_to(tmp_path / "var" / "results")) for o in orphans[:2])

    with session_scope(db) as session:  # the operator restores the lost files, or the rows go
        session.delete(session.get_one(Instance, made["lost"]))
    for path in (made["pdf_file"], made["heatmap"]):
        path.write_bytes(b"restored")  # type: ignore[union-attr]
    assert cli_main(check) == 0
    assert "storage: rows and files agree" in capsys.readouterr().out

    # --verify reads the files: the result files restored were not the node's (written before it kept
    # their SHA-256, they are read as DICOM), and one received file no longer has the bytes it stored
    kept = sorted((tmp_path / "var" / "instances").rglob("*.dcm"))[0]
    kept.write_bytes(kept.read_bytes()[:-1] + b"?")
    assert cli_main([*check, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "damaged: instance " in out and ": its received file is not what the node stored" in out
    assert f"damaged (not a readable DICOM file: InvalidDicomError): result object {made['pdf']} (pdf)" in out
    assert "what to do: restore those files from the backup, or have the PACS send those images again" in out
    assert "missing; 3 file(s) damaged; 0 orphan file(s)" in out


@pytest.mark.usefixtures("restore_logging")
def test_orphans_are_not_removed_while_the_node_runs(
    db: sessionmaker[Session], tmp_path: Path, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A running node names a received file before it commits the row that names it: removing orphans
    then could take an image it is storing. The refusal said "another cxr-node is running on this
    database; give each node its own database", advice for two nodes to an operator running one."""
    cli_env.setenv("CXR_NODE__DATABASE__URL", db.kw["bind"].url.render_as_string(hide_password=False))
    made = _node_files(db, tmp_path / "var")
    node = NodeLock(db.kw["bind"])
    node.acquire()
    try:
        assert cli_main(["storage", "check", "--remove-orphans"]) == 2
    finally:
        node.release()
    err = capsys.readouterr().err
    assert "the node is running on this database: stop it before --remove-orphans" in err
    assert "another cxr-node" not in err  # the operator runs one node: that advice was for two
    assert all(path.exists() for path in made["orphans"])  # type: ignore[attr-defined]


@pytest.mark.usefixtures("restore_logging")
def test_a_storage_check_takes_no_write_lock_from_the_running_node(
    tmp_path: Path, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check ran in a write transaction: on SQLite it held the write lock while it looked at every file
    (with --verify, read them all), and the running node, which the guide says it may run beside, refused
    every image meanwhile with 0xA700 after 30 s. It only reads, so it neither waits for the node's writes
    nor holds them up."""
    url = f"sqlite:///{tmp_path / 'node.sqlite3'}"  # PostgreSQL's readers never wait for its writers
    engine = make_engine(url)
    upgrade(engine)
    factory = make_session_factory(engine)
    cli_env.setenv("CXR_NODE__DATABASE__URL", url)
    made = _node_files(factory, tmp_path / "var")
    args = argparse.Namespace(verify=True, remove_orphans=False)
    try:
        with write_transaction_open(factory):  # the node storing an image
            started = time.monotonic()
            assert storage.command(args, load_settings(), factory) == 1
            assert time.monotonic() - started < 10
    finally:
        engine.dispose()
    assert f"missing: instance {made['lost']}: its received file" in capsys.readouterr().out
