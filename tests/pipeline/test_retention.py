"""Retention removes old pixel files only once their results were delivered; rows stay, audited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.jobstores.memory import MemoryJobStore
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.retention import Retention
from dicom_node.settings import StorageSettings
from dicom_node.store.db import session_scope
from dicom_node.store.models import (
    AeRole,
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    RemoteAe,
    ResultKind,
    ResultObject,
    Series,
    Study,
    StudyState,
    utcnow,
)
from tests.pipeline.conftest import add_study

pytestmark = pytest.mark.db


def _with_delivery(session: Session, study: Study, destination: RemoteAe, state: DeliveryState,
                   delivered_at: datetime | None = None) -> None:
    obj = ResultObject(study_pk=study.id, kind=ResultKind.SR, model_name="m", model_version="1",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", sop_instance_uid=f"1.2.3.{study.id}",
                       series_instance_uid=f"1.2.4.{study.id}", file_path=f"{study.id}/sr.dcm")
    session.add(obj)
    session.flush()
    session.add(Delivery(result_object_pk=obj.id, destination_pk=destination.id, state=state,
                         delivered_at=delivered_at))


def _files(session: Session, study_pk: int, storage: Path) -> list[tuple[bool, bool]]:
    rows = session.scalars(select(Instance).join(Series).where(Series.study_pk == study_pk))
    return [((storage / i.file_path).exists(), i.purged_at is not None) for i in rows]


def test_purges_only_old_files_whose_results_were_delivered(db: sessionmaker[Session], tmp_path: Path) -> None:
    storage = tmp_path / "instances"
    old = utcnow() - timedelta(days=40)
    with session_scope(db) as session:
        pacs = RemoteAe(ae_title="PACS", role=AeRole.DESTINATION, host="127.0.0.1", port=104)
        session.add(pacs)
        session.flush()
        delivered = add_study(session, storage, received_at=old, images=2, state=StudyState.ANALYSED,
                              instance_state=InstanceState.ANALYSED)
        _with_delivery(session, delivered, pacs, DeliveryState.DELIVERED)
        pending = add_study(session, storage, received_at=old, state=StudyState.ANALYSED,
                            instance_state=InstanceState.ANALYSED)
        _with_delivery(session, pending, pacs, DeliveryState.RETRYING)
        dead = add_study(session, storage, received_at=old, state=StudyState.ANALYSED,
                         instance_state=InstanceState.ANALYSED)
        _with_delivery(session, dead, pacs, DeliveryState.DEAD)
        skipped = add_study(session, storage, received_at=old, body_part="HAND", state=StudyState.SKIPPED,
                            instance_state=InstanceState.SKIPPED)
        failed = add_study(session, storage, received_at=old, state=StudyState.FAILED,
                           instance_state=InstanceState.FAILED)
        recent = add_study(session, storage, received_at=utcnow() - timedelta(days=2), state=StudyState.ANALYSED,
                           instance_state=InstanceState.ANALYSED)
        _with_delivery(session, recent, pacs, DeliveryState.DELIVERED)
        ids = {name: s.id for name, s in [("delivered", delivered), ("pending", pending), ("dead", dead),
                                         ("skipped", skipped), ("failed", failed), ("recent", recent)]}

    report = Retention(db, storage, retention_days=30).purge()

    assert report.purged == 3
    with session_scope(db) as session:
        assert _files(session, ids["delivered"], storage) == [(False, True), (False, True)]
        assert _files(session, ids["skipped"], storage) == [(False, True)]
        for kept in ("pending", "dead", "failed", "recent"):
            assert _files(session, ids[kept], storage) == [(True, False)], kept
        assert session.scalar(select(Study).where(Study.id == ids["delivered"])) is not None  # rows kept
        events = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "retention.purge")))
        assert len(events) == 1
        assert len(events[0].details["instance_ids"]) == 3

    assert Retention(db, storage, retention_days=30).purge().purged == 0  # nothing twice


@pytest.mark.parametrize("days", [-5.0, float("inf"), float("nan")])
def test_a_retention_period_that_is_not_a_length_of_time_is_refused(days: float) -> None:
    """-5 was taken (and removed every finished study's images at the next run); inf overflowed."""
    with pytest.raises(ValidationError, match="retention_days"):
        StorageSettings(retention_days=days)


def test_no_retention_configured_keeps_everything(db: sessionmaker[Session], tmp_path: Path) -> None:
    storage = tmp_path / "instances"
    with session_scope(db) as session:
        study = add_study(session, storage, received_at=utcnow() - timedelta(days=4000), state=StudyState.SKIPPED,
                          instance_state=InstanceState.SKIPPED)
        study_pk = study.id
    assert Retention(db, storage, retention_days=None).purge().purged == 0
    with session_scope(db) as session:
        assert _files(session, study_pk, storage) == [(True, False)]


def test_the_period_counts_from_when_the_study_was_done_with_and_spares_images_never_analysed(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    """The old code counted from receipt alone: after a 10-day PACS outage a 30-day period ended the
    moment the results finally went out, and an image the pipeline never looked at (or could not read)
    went with the rest."""
    storage = tmp_path / "instances"
    old, lately = utcnow() - timedelta(days=40), utcnow() - timedelta(days=2)
    with session_scope(db) as session:
        pacs = RemoteAe(ae_title="PACS", role=AeRole.DESTINATION, host="127.0.0.1", port=104)
        session.add(pacs)
        session.flush()
        after_outage = add_study(session, storage, received_at=old, state=StudyState.ANALYSED,
                                 instance_state=InstanceState.ANALYSED)
        after_outage.analysed_at = old
        _with_delivery(session, after_outage, pacs, DeliveryState.DELIVERED, delivered_at=lately)
        analysed_lately = add_study(session, storage, received_at=old, state=StudyState.ANALYSED,
                                    instance_state=InstanceState.ANALYSED)
        analysed_lately.analysed_at = lately
        _with_delivery(session, analysed_lately, pacs, DeliveryState.DELIVERED, delivered_at=lately)
        mixed = add_study(session, storage, received_at=old, images=3, state=StudyState.ANALYSED,
                          instance_state=InstanceState.ANALYSED)
        mixed.analysed_at = old
        _with_delivery(session, mixed, pacs, DeliveryState.DELIVERED, delivered_at=old)
        session.flush()
        second, third = sorted(mixed.series[0].instances, key=lambda i: i.instance_number)[1:]
        second.state, third.state = InstanceState.RECEIVED, InstanceState.FAILED
        ids = {"after_outage": after_outage.id, "analysed_lately": analysed_lately.id, "mixed": mixed.id}

    assert Retention(db, storage, retention_days=30).purge().purged == 1

    with session_scope(db) as session:
        assert _files(session, ids["after_outage"], storage) == [(True, False)]
        assert _files(session, ids["analysed_lately"], storage) == [(True, False)]
        assert sorted(_files(session, ids["mixed"], storage)) == [(False, True), (True, False), (True, False)]


def test_a_run_cut_short_after_removing_files_is_recorded_by_the_first_run_after_start(
    db: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between removing the files and committing their rows left rows of removed files, unaudited,
    which `storage check` called missing until the next hourly run, an hour after start (review). That
    run records them as already gone; it now comes a minute after start."""
    from apscheduler.schedulers.background import BackgroundScheduler

    from dicom_node import audit
    from dicom_node.jobs import MEMORY_STORE
    from dicom_node.retention import FIRST_RUN_SECONDS, JOB_ID

    storage = tmp_path / "instances"
    with session_scope(db) as session:
        pacs = RemoteAe(ae_title="PACS", role=AeRole.DESTINATION, host="127.0.0.1", port=104)
        session.add(pacs)
        session.flush()
        study = add_study(session, storage, received_at=utcnow() - timedelta(days=40), images=2,
                          state=StudyState.ANALYSED, instance_state=InstanceState.ANALYSED)
        _with_delivery(session, study, pacs, DeliveryState.DELIVERED)
        study_pk = study.id

    def killed(*args: object, **kwargs: object) -> None:
        raise SystemExit("killed")

    with monkeypatch.context() as patch:
        patch.setattr(audit, "record", killed)
        with pytest.raises(SystemExit):
            Retention(db, storage, retention_days=30).purge()
    with session_scope(db) as session:
        assert _files(session, study_pk, storage) == [(False, False), (False, False)]  # removed, not recorded
    scheduler = BackgroundScheduler(jobstores={MEMORY_STORE: MemoryJobStore()})
    scheduler.start(paused=True)
    try:
        started = datetime.now(UTC)
        Retention(db, storage, retention_days=30, scheduler=scheduler).start()
        first = scheduler.get_job(JOB_ID, jobstore=MEMORY_STORE).next_run_time
        assert timedelta(0) < first - started <= timedelta(seconds=FIRST_RUN_SECONDS + 1)
    finally:
        scheduler.shutdown(wait=False)
    report = Retention(db, storage, retention_days=30).purge()  # what that first run does
    assert (report.purged, report.missing) == (0, 2)
    with session_scope(db) as session:
        assert _files(session, study_pk, storage) == [(False, True), (False, True)]
        assert session.scalar(select(AuditEvent).where(AuditEvent.action == "retention.purge")) is not None


@pytest.mark.parametrize("batch", [1, 500])
def test_a_file_that_cannot_be_removed_is_left_and_said_and_the_others_go(
    db: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, batch: int
) -> None:
    """One file the node may not remove (restored from a backup as another user, an immutable flag, a
    read-only or failing disk) ended every run in an exception: the files removed before it in its batch
    were never recorded nor audited, and no file after the first batch was ever removed again, while
    the storage filled up. The scheduler's log of the exception named the file, whose path holds the
    study's, series' and image's UIDs."""
    import errno

    from dicom_node import retention

    monkeypatch.setattr(retention, "BATCH", batch)
    storage = tmp_path / "instances"
    with session_scope(db) as session:
        pacs = RemoteAe(ae_title="PACS", role=AeRole.DESTINATION, host="127.0.0.1", port=104)
        session.add(pacs)
        session.flush()
        studies = []
        for _ in range(3):
            study = add_study(session, storage, received_at=utcnow() - timedelta(days=40),
                              state=StudyState.ANALYSED, instance_state=InstanceState.ANALYSED)
            _with_delivery(session, study, pacs, DeliveryState.DELIVERED)
            studies.append(study.id)
        session.flush()
        stuck = session.scalars(select(Instance).join(Series).where(Series.study_pk == studies[0])).one()
        stuck_path, stuck_id = storage / stuck.file_path, stuck.id
    unlink = Path.unlink

    def refusing(path: Path, missing_ok: bool = False) -> None:
        if path == stuck_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refusing)
    with caplog.at_level("INFO"):
        report = Retention(db, storage, retention_days=30).purge()

    assert (report.purged, report.missing) == (2, 0)
    with session_scope(db) as session:
        assert _files(session, studies[0], storage) == [(True, False)]  # tried again at the next run
        assert _files(session, studies[1], storage) == [(False, True)]
        assert _files(session, studies[2], storage) == [(False, True)]
        purged = [e.details["instance_ids"]
                  for e in session.scalars(select(AuditEvent).where(AuditEvent.action == "retention.purge"))]
        assert stuck_id not in [pk for ids in purged for pk in ids] and len(sum(purged, [])) == 2
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage() == (f"retention could not remove the file of instance {stuck_id} "
                                    "(PermissionError: Permission denied); it is tried again at the next run")
    assert stuck_path.parent.name not in caplog.text and stuck_path.name not in caplog.text


def _purgeable(db: sessionmaker[Session], storage: Path, studies: int = 2) -> list[Path]:
    """``studies`` studies due for retention, one image each; the directories of their files."""
    with session_scope(db) as session:
        pacs = RemoteAe(ae_title="PACS", role=AeRole.DESTINATION, host="127.0.0.1", port=104)
        session.add(pacs)
        session.flush()
        for _ in range(studies):
            study = add_study(session, storage, received_at=utcnow() - timedelta(days=40),
                              state=StudyState.ANALYSED, instance_state=InstanceState.ANALYSED)
            _with_delivery(session, study, pacs, DeliveryState.DELIVERED)
        session.flush()
        return sorted((storage / path).parent for path in session.scalars(select(Instance.file_path)))


def _marked(db: sessionmaker[Session]) -> int:
    with session_scope(db) as session:
        return len(list(session.scalars(select(Instance.id).where(Instance.purged_at.is_not(None)))))


def test_a_removal_is_made_durable_before_it_is_recorded(
    db: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files were unlinked and their rows marked purged without an fsync of their directories: after a
    power cut a purged image could be back on disk, patient data retention no longer looks at (review)."""
    from dicom_node import retention
    from dicom_node.store import files

    storage = tmp_path / "instances"
    directories = _purgeable(db, storage)
    steps: list[Path | str] = []  # each directory fsync'ed, and each row marked purged, in order
    real_fsync, real_now = files._fsync_dir, retention.utcnow

    def fsync(directory: Path) -> None:
        steps.append(directory)
        real_fsync(directory)

    def now() -> datetime:
        steps.append("marked")
        return real_now()

    monkeypatch.setattr(files, "_fsync_dir", fsync)
    monkeypatch.setattr(retention, "utcnow", now)
    report = Retention(db, storage, retention_days=30).purge(now=real_now())
    assert report.purged == 2
    assert steps[1::2] == ["marked", "marked"]  # each row after its file's directory (one file in each)
    assert sorted(str(step) for step in steps[::2]) == [str(directory) for directory in directories]
    assert _marked(db) == 2


def test_a_removal_that_cannot_be_made_durable_is_not_recorded(
    db: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """A directory whose fsync fails (a failing disk) may bring its removed file back: its row is not
    marked, and the next run finds the file gone (or removes it again)."""
    import errno

    from dicom_node.store import files

    storage = tmp_path / "instances"
    failing, _ = _purgeable(db, storage)

    def fsync(directory: Path) -> None:
        if directory == failing:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "_fsync_dir", fsync)
    with caplog.at_level("WARNING"):
        report = Retention(db, storage, retention_days=30).purge()
    assert (report.purged, _marked(db)) == (1, 1)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "OSError: Input/output error" in warning and failing.name not in warning
    monkeypatch.undo()
    assert (Retention(db, storage, retention_days=30).purge().missing, _marked(db)) == (1, 2)
