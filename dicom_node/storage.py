"""The node's files against its rows.

The database and ``node.data_dir`` are backed up and restored separately. Restored from different times,
or after a disk lost part of ``results/``, they disagree: rows whose files are gone, and files no row
names. A result object whose file is gone or damaged (not what the node wrote) is made again from the
database, as a new revision (its earlier revision may have reached a PACS, so its UIDs are not used for
other content): the outbox asks for that when it finds the file so (:mod:`dicom_node.outbox`), and so does
an image of the study sent again (:mod:`dicom_node.ingest`). ``cxr-node storage check`` lists both kinds
of disagreement (with ``--verify``, files whose content is not what the node wrote too) and removes the
files no row names when asked.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from sqlalchemy import Connection, exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.errors import ConfigurationError
from dicom_node.store.db import NodeLock, make_read_only_session_factory, session_scope
from dicom_node.store.files import INCOMING_DIR, file_sha256
from dicom_node.store.models import (
    Delivery,
    Finding,
    Instance,
    ResultKind,
    ResultObject,
    Study,
    StudyState,
)
from dicom_node.terminal import say

if TYPE_CHECKING:
    from dicom_node.settings import Settings

LOGGER = logging.getLogger(__name__)

REMAKE_REASON = "result files missing or damaged: its results are being made again as a new revision"

NODE_RUNNING = (
    "the node is running on this database: stop it before --remove-orphans (it names a received file before "
    "it commits the row that names it, so its images in flight would be taken for orphans); "
    "`cxr-node storage check` without it may run beside the node"
)


def pdf_path(relative_path: str) -> str:
    """Where the plain PDF of an Encapsulated PDF result object is kept (beside it, ``.pdf``)."""
    return str(Path(relative_path).with_suffix(".pdf"))


def result_files(kind: ResultKind, relative_path: str) -> tuple[str, ...]:
    """The files of a result object, relative to the results directory: the DICOM object, and for a
    PDF the plain PDF beside it (a copy the console hands out; without it, it takes the document from
    the DICOM object, which alone is the record of what was sent)."""
    return (relative_path, pdf_path(relative_path)) if kind is ResultKind.PDF else (relative_path,)


# ---------------------------------------------------------------------------------------------
# Results whose files are gone
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LostResult:
    """The latest revision of one of a study's result objects, whose DICOM file is gone or damaged."""

    id: int
    kind: ResultKind
    model_name: str
    model_version: str
    revision: int
    sent: bool  # handed to the outbox (it has deliveries): it may be on a PACS under its UIDs


def read_result_file(path: Path, sha256: str | None) -> tuple[bytes | None, str]:
    """The bytes of a result object's DICOM file, or None and why it cannot be sent as it is: "missing",
    or "damaged (…)" when it is no longer what the node wrote (``sha256``, recorded when it was written).
    A file written before the node recorded digests (``sha256`` None) is taken as damaged when it does
    not read as DICOM, or has no SOP Class UID; a cut in its last element goes unseen (pydicom reads it
    as a shorter value)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:  # a directory in its place, an I/O error of a damaged disk
        return None, f"damaged ({exc.strerror or type(exc).__name__})"
    if sha256 is not None:
        if hashlib.sha256(data).hexdigest() != sha256:
            return None, "damaged (its content is not what the node wrote)"
        return data, ""
    try:
        dataset = dcmread(io.BytesIO(data))
    except Exception as exc:  # a truncated or damaged file: pydicom raises many types
        return None, f"damaged (not a readable DICOM file: {type(exc).__name__})"
    if not dataset.get("SOPClassUID"):
        return None, "damaged (no SOP Class UID)"
    return data, ""


def lost_results(conn: Connection | Session, results_dir: Path, study_pk: int) -> list[LostResult]:
    """The study's latest result objects (one per kind and model) whose files are gone or damaged
    (:func:`read_result_file`). Earlier revisions are left out: a later one replaced them, and is what a
    new revision would replace."""
    rows = conn.execute(
        select(
            ResultObject.id, ResultObject.kind, ResultObject.model_name, ResultObject.model_version,
            ResultObject.revision, ResultObject.file_path, ResultObject.sha256,
            exists().where(Delivery.result_object_pk == ResultObject.id).label("sent"),
        )
        .where(ResultObject.study_pk == study_pk)
        .order_by(ResultObject.revision.desc(), ResultObject.id.desc())
    ).all()
    latest: dict[tuple[ResultKind, str, str], Any] = {}
    for row in rows:
        latest.setdefault((row.kind, row.model_name, row.model_version), row)
    return [
        LostResult(row.id, row.kind, row.model_name, row.model_version, row.revision, bool(row.sent))
        for row in latest.values()
        if read_result_file(results_dir / row.file_path, row.sha256)[0] is None
    ]


def later_revision(session: Session, obj: ResultObject) -> bool:
    """Whether a later revision of the same kind and model replaced this result object."""
    return session.scalar(
        select(
            exists().where(
                ResultObject.study_pk == obj.study_pk,
                ResultObject.kind == obj.kind,
                ResultObject.model_name == obj.model_name,
                ResultObject.model_version == obj.model_version,
                ResultObject.revision > obj.revision,
            )
        )
    ) is True


def reopen_to_remake(conn: Connection | Session, study_pk: int, *, failed: bool = False) -> bool:
    """Make a finished study RECEIVED again so that its settle timer readies it and the pipeline makes
    its lost results again (the node's settle sweep arms the timer, from any process). A FAILED study
    is reopened only when ``failed`` (an operator's image sent again, not the outbox's retries).
    Returns whether it was reopened (False: it is already on its way round, or failed)."""
    states = [StudyState.ANALYSED, StudyState.SKIPPED, *([StudyState.FAILED] if failed else [])]
    reopened = conn.execute(
        update(Study)
        .where(Study.id == study_pk, Study.state.in_(states))
        .values(state=StudyState.RECEIVED, state_reason=REMAKE_REASON)
    )
    if reopened.rowcount:  # type: ignore[attr-defined]
        LOGGER.info("study %d reopened: files of its results are missing or damaged; they are made again",
                    study_pk)
        return True
    return False


# ---------------------------------------------------------------------------------------------
# cxr-node storage check
# ---------------------------------------------------------------------------------------------

# The names the node gives its files (dicom_node.store.files.instance_path, dicom_node.pipeline): only
# files named so are taken for the node's own; anything else in its directories is left alone.
_INSTANCE_NAME = re.compile(r"[0-9.]+/[0-9.]+/[0-9.]+\.dcm")
_RESULT_NAME = re.compile(
    r"[0-9]+/(?:sr|pdf|heatmap_sc)-[0-9.]+\.(?:dcm|pdf)"  # <study row id>/<kind>-<its SOP Instance UID>
    r"|heatmaps/[0-9]+-[A-Za-z0-9._-]+\.npy"  # heatmaps/<instance row id>-<model>-<version>.npy
)


@dataclass
class StorageReport:
    """Rows without their files and files without their rows. Row ids and the node's own names under
    ``results/`` only: the names under ``instances/`` are the senders' UIDs, and are kept out."""

    instances: int = 0  # instance rows whose file should be there (the retention policy did not remove it)
    results: int = 0  # result object rows
    missing_instances: list[int] = field(default_factory=list)
    missing_results: list[tuple[int, str, str]] = field(default_factory=list)  # (id, kind, file)
    missing_heatmaps: list[tuple[int, str]] = field(default_factory=list)  # (finding id, file)
    # with ``verify``: files whose content is not what the node wrote
    damaged_instances: list[int] = field(default_factory=list)
    damaged_results: list[tuple[int, str, str, str]] = field(default_factory=list)  # (id, kind, file, why)
    orphan_results: list[str] = field(default_factory=list)  # relative to results/
    orphan_instances: list[str] = field(default_factory=list)  # relative to the storage directory
    orphan_instance_bytes: int = 0
    foreign: int = 0  # files not named as the node names its files: left alone

    @property
    def missing(self) -> int:
        return len(self.missing_instances) + len(self.missing_results) + len(self.missing_heatmaps)

    @property
    def damaged(self) -> int:
        return len(self.damaged_instances) + len(self.damaged_results)

    @property
    def orphans(self) -> int:
        return len(self.orphan_results) + len(self.orphan_instances)


def check(session: Session, storage_dir: Path, results_dir: Path, *, verify: bool = False) -> StorageReport:
    """Compare the rows with the files under ``storage_dir`` (received instances) and ``results_dir``.

    A file counts as an orphan when it is named as the node names its files and no row names it, or its
    row says the retention policy removed it (a file back from a backup that retention no longer looks
    at). One stat per row and one directory walk per tree; no file is read, unless ``verify``: then every
    received and result file is read and compared with the SHA-256 recorded when the node wrote it."""
    report = StorageReport()
    kept: set[str] = set()
    rows = session.execute(
        select(Instance.id, Instance.file_path, Instance.sha256).where(Instance.purged_at.is_(None))
    )
    for instance_pk, relative, sha256 in rows:
        report.instances += 1
        kept.add(relative)
        path = storage_dir / relative
        if not path.is_file():
            report.missing_instances.append(instance_pk)
        elif verify and file_sha256(path) != sha256:
            report.damaged_instances.append(instance_pk)
    made: set[str] = set()
    rows = session.execute(
        select(ResultObject.id, ResultObject.kind, ResultObject.file_path, ResultObject.sha256)
    )
    for object_pk, kind, relative, sha256 in rows:
        report.results += 1
        made.update(result_files(kind, relative))
        if not (results_dir / relative).is_file():
            report.missing_results.append((object_pk, kind.value, relative))
        elif verify:
            data, problem = read_result_file(results_dir / relative, sha256)
            if data is None:
                report.damaged_results.append((object_pk, kind.value, relative, problem))
    rows = session.execute(
        select(Finding.id, Finding.heatmap_path).where(Finding.heatmap_path.is_not(None))
    )
    for finding_pk, relative in rows:
        made.add(relative)
        if not (results_dir / relative).is_file():
            report.missing_heatmaps.append((finding_pk, relative))
    for relative in _files(storage_dir):
        if relative in kept:
            continue
        if _INSTANCE_NAME.fullmatch(relative):
            report.orphan_instances.append(relative)
            report.orphan_instance_bytes += _size(storage_dir / relative)
        else:
            report.foreign += 1
    for relative in _files(results_dir):
        if relative in made:
            continue
        if _RESULT_NAME.fullmatch(relative):
            report.orphan_results.append(relative)
        else:
            report.foreign += 1
    report.missing_instances.sort()
    report.missing_results.sort()
    report.damaged_instances.sort()
    report.damaged_results.sort()
    report.missing_heatmaps.sort()
    report.orphan_results.sort()
    report.orphan_instances.sort()
    return report


def remove_orphans(session: Session, report: StorageReport, storage_dir: Path, results_dir: Path,
                   actor: str) -> int:
    """Delete the orphans ``report`` found, audited as "storage.remove_orphans" (the number of received
    files and their bytes, the results' own names); returns how many went. The node must not run: it
    names a received file before it commits the row that names it."""
    removed = 0
    for root, names in ((storage_dir, report.orphan_instances), (results_dir, report.orphan_results)):
        for relative in names:
            try:
                (root / relative).unlink()
            except FileNotFoundError:
                pass  # gone meanwhile: as good as removed
            except OSError as exc:  # the reason only: the name may be a sender's UID
                LOGGER.warning("an orphan file could not be removed (%s)", exc.strerror or type(exc).__name__)
                continue
            removed += 1
    audit.record(session, actor, "storage.remove_orphans", "storage", {
        "instance_files": len(report.orphan_instances),
        "instance_bytes": report.orphan_instance_bytes,
        "result_files": report.orphan_results,
    })
    return removed


def _files(root: Path) -> Iterator[str]:
    """The regular files under ``root``, relative to it, without the file store's temporaries."""
    for directory, subdirectories, names in os.walk(root):
        if Path(directory) == root:
            subdirectories[:] = [name for name in subdirectories if name != INCOMING_DIR]
        for name in names:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                yield path.relative_to(root).as_posix()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def command(args: argparse.Namespace, settings: Settings, factory: sessionmaker[Session]) -> int:
    """``cxr-node storage check [--remove-orphans]``: 0 when rows and files agree (after the orphans were
    removed, when asked), 1 when they do not."""
    storage_dir, results_dir = settings.storage_dir, settings.results_dir
    engine = factory.kw["bind"]
    lock = NodeLock(engine)
    if args.remove_orphans:
        try:
            lock.acquire()  # the node names a received file before it commits the row that names it
        except ConfigurationError as exc:  # said as "another cxr-node ... give each its own database"
            raise ConfigurationError(NODE_RUNNING) from exc
    try:
        # The check only reads: in a write transaction it held SQLite's write lock for its whole walk (with
        # --verify, the read of every file), and each image the running node received meanwhile was
        # refused with 0xA700 after waiting 30 s for it.
        with session_scope(make_read_only_session_factory(factory)) as session:
            report = check(session, storage_dir, results_dir, verify=args.verify)
        _print(report)
        removed = 0
        if args.remove_orphans and report.orphans:
            with session_scope(factory) as session:
                removed = remove_orphans(session, report, storage_dir, results_dir, audit.cli_actor())
        if removed:
            say(f"removed {removed} orphan file(s) (audited as storage.remove_orphans)")
    finally:
        lock.release()
    left = report.missing + report.damaged + report.orphans - removed
    if left == 0:
        say("storage: rows and files agree" if not removed else "storage: rows and files agree now")
        return 0
    if report.missing_instances:
        say("what to do: restore instances/ from the backup, or have the PACS send those images again")
    if report.damaged_instances:
        say("what to do: restore those files from the backup, or have the PACS send those images again "
            "(an unchanged copy replaces the damaged file)")
    if report.missing_results or report.damaged_results:
        say("what to do: results still waiting for delivery are made again by the node; for delivered ones, "
            "resend one of their deliveries (cxr-node resend ID) or send an image of the study again")
    if report.missing_heatmaps:
        say("what to do: restore results/heatmaps/ from the backup (the console shows no heat map without)")
    if report.orphans > removed:
        say("what to do: files made after the database's backup, or that the retention policy had removed: "
            "--remove-orphans deletes them (stop the node first)")
    return 1


def _print(report: StorageReport) -> None:
    for instance_pk in report.missing_instances:
        say(f"missing: instance {instance_pk}: its received file (the retention policy did not remove it)")
    for object_pk, kind, relative in report.missing_results:
        say(f"missing: result object {object_pk} ({kind}): results/{relative}")
    for instance_pk in report.damaged_instances:
        say(f"damaged: instance {instance_pk}: its received file is not what the node stored")
    for object_pk, kind, relative, why in report.damaged_results:
        say(f"{why}: result object {object_pk} ({kind}): results/{relative}")
    for finding_pk, relative in report.missing_heatmaps:
        say(f"missing: finding {finding_pk}: its heat map results/{relative}")
    for relative in report.orphan_results:
        say(f"orphan: results/{relative}")
    if report.orphan_instances:
        folders = len({name.split("/", 1)[0] for name in report.orphan_instances})
        say(f"orphan: {len(report.orphan_instances)} received file(s) in {folders} study folder(s) under "
            f"the storage directory, {report.orphan_instance_bytes / 1e6:.1f} MB (their names are the "
            "senders' UIDs: not shown)")
    if report.foreign:
        say(f"left alone: {report.foreign} file(s) not named as the node names its files")
    damaged = f"; {report.damaged} file(s) damaged" if report.damaged else ""
    say(f"checked {report.instances} instance file(s) and {report.results} result object(s): "
        f"{len(report.missing_instances)} instance file(s), {len(report.missing_results)} result file(s) "
        f"and {len(report.missing_heatmaps)} heat map(s) missing{damaged}; {report.orphans} orphan file(s)")
