"""Read models of the console: today's figures, the searchable results list and a study's details.

The same pydantic models serve the HTML pages and the JSON API, so both always show the same data.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, computed_field
from sqlalchemy import ColumnElement, Select, and_, func, select, tuple_, union
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased, joinedload, selectinload
from sqlalchemy.orm.util import AliasedClass

from classifier.types import doubt_reason
from dicom_node import commitment
from dicom_node.eligibility import DEFAULT_AGE_POLICY, AgePolicy, study_age
from dicom_node.errors import NodeError, NotFoundError
from dicom_node.store import folding
from dicom_node.store.models import (
    CommitmentState,
    Delivery,
    DeliveryState,
    Finding,
    Instance,
    Job,
    JobState,
    Patient,
    PatientNameWord,
    ResultObject,
    Series,
    Study,
    StudyState,
)
from dicom_node.web import paging
from dicom_node.web.auth import UtcDatetime
from dicom_node.web.deps import ROW_ID_MAX
from dicom_node.web.imaging import hot_region, load_heatmap

PAGE_SIZES = (25, 50, 100)

# ---------------------------------------------------------------------------------------------
# Dashboard
# ---------------------------------------------------------------------------------------------


class Dashboard(BaseModel):
    """Today's work (since local midnight) and what is waiting."""

    since: UtcDatetime
    instances_received: int
    studies_received: int
    studies_analysed: int
    studies_skipped: int
    studies_failed: int
    deliveries_failed: int = Field(description="deliveries given up (dead), all time")
    deliveries_unconfirmed: int = Field(
        default=0,
        description="delivered objects whose PACS did not confirm it keeps them (storage commitment)")
    deliveries_retrying: int
    deliveries_pending: int
    jobs_waiting: int = Field(description="pipeline jobs pending or running")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def queue_depth(self) -> int:
        return self.jobs_waiting + self.deliveries_pending + self.deliveries_retrying


def local_midnight(now: datetime | None = None) -> datetime:
    current = (now or datetime.now(UTC)).astimezone()
    return datetime.combine(current.date(), time.min, tzinfo=current.tzinfo).astimezone(UTC)


def dashboard(session: Session, now: datetime | None = None) -> Dashboard:
    since = local_midnight(now)

    def count(*criteria: ColumnElement[bool], entity: type[object] = Study) -> int:
        return int(session.scalar(select(func.count()).select_from(entity).where(*criteria)) or 0)

    return Dashboard(
        since=since,
        # images: a dose SR or a report stored with a study has no Rows, and is not one (review)
        instances_received=count(Instance.received_at >= since, Instance.rows.is_not(None), entity=Instance),
        studies_received=count(Study.first_received_at >= since),
        studies_analysed=count(Study.state == StudyState.ANALYSED, Study.analysed_at >= since),
        studies_skipped=count(Study.state == StudyState.SKIPPED, Study.last_received_at >= since),
        studies_failed=count(Study.state == StudyState.FAILED, Study.last_received_at >= since),
        deliveries_failed=count(Delivery.state == DeliveryState.DEAD, entity=Delivery),
        deliveries_unconfirmed=count(Delivery.commitment == CommitmentState.UNCONFIRMED, entity=Delivery),
        deliveries_retrying=count(Delivery.state == DeliveryState.RETRYING, entity=Delivery),
        deliveries_pending=count(Delivery.state == DeliveryState.PENDING, entity=Delivery),
        jobs_waiting=count(Job.state.in_([JobState.PENDING, JobState.RUNNING]), entity=Job),
    )


# ---------------------------------------------------------------------------------------------
# Results list and search
# ---------------------------------------------------------------------------------------------


class ResultQuery(BaseModel):
    """The search form. Dates are the study date (DICOM), inclusive."""

    # A field of blanks is an empty one: "   " in the patient field counted as a search ("2 studies match
    # the search", a Clear button, an audited filter) that matched every study.
    model_config = ConfigDict(str_strip_whitespace=True)

    patient: str = Field(
        default="", max_length=128,
        description="patient name words (each from the start of a word of the name, case and accents "
        "optional) or patient ID (from its start); * and ? are wildcards",
    )
    accession: str = Field(default="", max_length=16, description="from its start; * and ? are wildcards")
    date_from: date | None = None
    date_to: date | None = None
    finding: str = Field(default="", max_length=32)
    state: StudyState | None = None
    page: int = Field(default=1, ge=1)
    per_page: int = Field(default=25, ge=1, le=100)
    # The pager's links seek the page from a study shown, as the audit log's do: ``before`` the previous
    # page's last study, ``after`` the next page's first. Sent with the page number, which they then
    # only label; without them, or when that study is gone, the page is counted from the start.
    before: int | None = Field(default=None, ge=1, le=ROW_ID_MAX,
                               description="the id of the study the page follows (the previous page's last)")
    after: int | None = Field(default=None, ge=1, le=ROW_ID_MAX,
                              description="the id of the study the page precedes (the next page's first)")

    def is_filtered(self) -> bool:
        return bool(
            self.patient or self.accession or self.date_from or self.date_to or self.finding or self.state
        )


class FindingSummary(BaseModel):
    label: str
    confidence: float


class DestinationState(BaseModel):
    """The state of everything a study sends to one destination (the worst of its deliveries)."""

    destination: str
    state: DeliveryState
    delivered: int
    total: int


class ResultRow(BaseModel):
    study_id: int
    received_at: UtcDatetime
    patient_name: str
    patient_id: str
    accession_number: str
    study_date: str
    study_description: str
    state: StudyState
    state_reason: str
    findings: list[FindingSummary]
    destinations: list[DestinationState]


class ResultPage(BaseModel):
    query: ResultQuery
    total: int = Field(description="the studies that match; with total_capped, the cap: there are more")
    total_capped: bool = False
    pages: int = Field(description="with total_capped, the pages the counted studies fill: there are more")
    more: bool = Field(default=False, description="a page of older studies follows this one; ?page=<page + 1>"
                       "&before=<the last study's id> (``older``) seeks it")
    rows: list[ResultRow]
    older: dict[str, int] = Field(
        default_factory=dict,
        description="the query parameters, with page + 1 and the search's, that seek the next (older) page "
        "from this one's last study: {\"before\": id}; empty on the last page",
    )
    newer: dict[str, int] = Field(
        default_factory=dict,
        description="the query parameters, with page - 1 and the search's, that seek the previous (newer) "
        "page from this one's first study: {\"after\": id}; empty on page 1",
    )
    finding_labels: list[str]


_WORST_FIRST = (DeliveryState.DEAD, DeliveryState.RETRYING, DeliveryState.PENDING, DeliveryState.DELIVERED)


def _like_pattern(term: str) -> str:
    """A search term as a LIKE pattern: the PACS wildcards ``*`` (any run) and ``?`` (one character) become
    ``%`` and ``_``; LIKE's own ``%`` and ``_`` (and the escape character) stay literal."""
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def has_wildcard(term: str) -> bool:
    return "*" in term or "?" in term


def _patients_named(words: list[str]) -> Select[tuple[int]]:
    """The patients with, for each of ``words``, a word of their name that starts with it (wildcards
    inside it), case and accents folded on both sides: "muller" finds MÜLLER, "brien" O'BRIEN. Each word
    is a prefix search of the name-word index (migration 0014); a word that starts with a wildcard reads
    that whole index (still no patient or study row). A name's words and their tails after a mark inside
    a word are its starts (folding.name_words): "ller" no longer finds MÜLLER, "*ller" does."""
    def starting(
        word: str, index: type[PatientNameWord] | AliasedClass[PatientNameWord] = PatientNameWord
    ) -> ColumnElement[bool]:
        return index.word.like(f"{_like_pattern(folding.fold(word))}%", escape="\\")

    # The first word's index entries, narrowed by an IN for each further word, all at one level: the INs
    # nested one inside the other (one level a word), and SQLite's parser overflowed at nine words (a 500
    # on a full Spanish name, review). Each IN is a list of its word's patients from the word index. Not
    # an INTERSECT: SQLite cannot put a compound SELECT inside the UNION the caller makes.
    further = []
    for word in words[1:]:
        other = aliased(PatientNameWord)
        further.append(PatientNameWord.patient_pk.in_(select(other.patient_pk).where(starting(word, other))))
    return select(PatientNameWord.patient_pk).where(starting(words[0]), *further)


def _identifier(column: InstrumentedAttribute[str], term: str) -> ColumnElement[bool]:
    """A patient ID or accession: from the start of the value; with a wildcard, the whole value is the
    pattern (``*123`` ends in 123), as in a PACS query. ``column`` is the value folded
    (``patient_id_folded``, ``accession_number_folded``): a prefix then searches its index."""
    pattern = _like_pattern(folding.identifier(term))
    return column.like(pattern if has_wildcard(term) else f"{pattern}%", escape="\\")


def _later_finding() -> tuple[type[Finding], ColumnElement[bool]]:
    """A finding of the same image made after ``Finding`` (a later model's, after a model change), to
    outer-join: where there is none, ``Finding`` is its image's latest. The list shows and filters that
    one, as the study page shows it, not the earlier model's. A join, not a correlated NOT EXISTS: one
    seek of the instance index per finding either way, and the plan tests forbid correlated subqueries."""
    later = aliased(Finding)
    return later, and_(
        later.instance_pk == Finding.instance_pk,
        tuple_(later.created_at, later.id) > tuple_(Finding.created_at, Finding.id),
    )


def _criteria(query: ResultQuery) -> list[ColumnElement[bool]]:
    criteria: list[ColumnElement[bool]] = []
    patient = query.patient.strip()
    if patient:
        words = [w for w in folding.WORD_SEPARATORS.split(patient) if w]
        # The patients found first (by the index of their IDs and of their names' words), then their
        # studies: joined, SQLite walked every study and looked up its patient, 200 ms a search.
        by_id = select(Patient.id).where(_identifier(Patient.patient_id_folded, patient))
        criteria.append(Study.patient_pk.in_(union(by_id, _patients_named(words)) if words else by_id))
    if query.accession.strip():
        criteria.append(_identifier(Study.accession_number_folded, query.accession.strip()))
    if query.date_from:
        criteria.append(Study.study_date >= _dicom_date(query.date_from))
    if query.date_to:
        criteria.append(and_(Study.study_date != "", Study.study_date <= _dicom_date(query.date_to)))
    if query.finding.strip():
        # The studies with the label, found once from the finding's index: as a correlated EXISTS, SQLite
        # looked up each study's findings, 0.6 s a search at 100,000 studies (benchmarks/console_scale.py).
        later, is_later = _later_finding()
        criteria.append(
            Study.id.in_(
                select(Series.study_pk)
                .join(Instance, Instance.series_pk == Series.id)
                .join(Finding, Finding.instance_pk == Instance.id)
                .outerjoin(later, is_later)
                .where(Finding.label == query.finding.strip(), later.id.is_(None))
            )
        )
    if query.state is not None:
        criteria.append(Study.state == query.state)
    return criteria


def _dicom_date(day: date) -> str:
    """A DICOM DA value (YYYYMMDD), compared as text with the studies' dates: the year has its four digits
    ("%Y" leaves a year before 1000 unpadded, "0999" was "999")."""
    return day.isoformat().replace("-", "")


def search(session: Session, query: ResultQuery) -> ResultPage:
    """Studies matching ``query``, newest first, one page of them.

    The count and the page are taken on study ids alone (a patient searched for is looked up by the
    studies' ``patient_pk``), and only the page's studies are loaded. ``query.before``/``query.after``:
    the study the page follows (the previous page's last) or precedes (the next page's first), as the
    pager's links give them: the page is sought from that study's (first_received_at, id) in the index on
    ``first_received_at``, where an OFFSET walked past every study of the pages before it (and a study
    received meanwhile moved every later page by one). Without them (a typed page number, an old
    bookmark, a study gone) the page is counted from the start. The count stops at paging.COUNT_CAP
    studies: counting every study with a finding took 165 ms a page on PostgreSQL at 100,000 studies;
    past the cap the page says "more than 1,000" and one study more than the page is read to tell
    whether another follows."""
    criteria = _criteria(query)
    ids_query = select(Study.id).where(*criteria)
    count = paging.capped_count(session, ids_query)
    key = tuple_(Study.first_received_at, Study.id)
    newest_first = ids_query.order_by(Study.first_received_at.desc(), Study.id.desc())
    anchor_id = query.before if query.before is not None else query.after
    # the anchor need not match the search: its (first_received_at, id) is only where the page starts
    anchored = session.scalar(select(Study.first_received_at).where(Study.id == anchor_id)) \
        if anchor_id is not None else None
    if anchored is not None and query.before is not None:
        # one study more than the page tells whether an older page follows
        ids = list(session.scalars(newest_first.where(key < (anchored, anchor_id)).limit(query.per_page + 1)))
        more = len(ids) > query.per_page
    elif anchored is not None:  # the page before the one the anchor starts: that one follows
        oldest_first = (ids_query.where(key > (anchored, anchor_id))
                        .order_by(Study.first_received_at, Study.id).limit(query.per_page))
        ids = list(reversed(list(session.scalars(oldest_first))))
        # The page the anchor starts follows only if a study of the search is there: the anchor may have
        # left the search since its page was shown (a failed study sent again), or been its only study.
        more = session.scalar(ids_query.where(key <= (anchored, anchor_id)).limit(1)) is not None
    else:
        ids = list(session.scalars(
            newest_first.offset((query.page - 1) * query.per_page).limit(query.per_page + 1)
        ))
        more = len(ids) > query.per_page
    ids = ids[:query.per_page]
    by_id = {
        s.id: s
        for s in session.scalars(select(Study).where(Study.id.in_(ids)).options(joinedload(Study.patient)))
    } if ids else {}
    studies = [by_id[pk] for pk in ids]
    findings = _findings_by_study(session, ids)
    destinations = _destinations_by_study(session, ids)
    rows = [
        ResultRow(
            study_id=s.id,
            received_at=s.first_received_at,
            patient_name=s.patient.name,
            patient_id=s.patient.patient_id,
            accession_number=s.accession_number,
            study_date=s.study_date,
            study_description=s.study_description,
            state=s.state,
            state_reason=s.state_reason,
            findings=findings.get(s.id, []),
            destinations=destinations.get(s.id, []),
        )
        for s in studies
    ]
    return ResultPage(
        query=query, total=count.total, total_capped=count.capped, pages=count.pages(query.per_page),
        more=more, rows=rows, finding_labels=finding_labels(session),
        older={"before": ids[-1]} if ids and more else {},
        newer={"after": ids[0]} if ids and query.page > 1 else {},
    )


def finding_labels(session: Session) -> list[str]:
    """The labels findings have (the results form's choices), each found by one seek in the label index
    from the one before: a handful of labels among every finding ever made. SELECT DISTINCT read the whole
    index on every results page: at 110,000 findings 3 ms on SQLite and 12.6 ms on PostgreSQL, where these
    seeks take 0.02 and 0.17 ms."""
    labels: list[str] = []
    label = session.scalar(select(func.min(Finding.label)))
    while label is not None:
        labels.append(label)
        label = session.scalar(select(func.min(Finding.label)).where(Finding.label > label))
    return sorted(labels)


def _findings_by_study(session: Session, study_ids: Sequence[int]) -> dict[int, list[FindingSummary]]:
    if not study_ids:
        return {}
    later, is_later = _later_finding()
    rows = session.execute(
        select(Series.study_pk, Finding.label, func.max(Finding.confidence))
        .join(Instance, Finding.instance_pk == Instance.id)
        .join(Series, Instance.series_pk == Series.id)
        .outerjoin(later, is_later)
        .where(Series.study_pk.in_(study_ids), later.id.is_(None))
        .group_by(Series.study_pk, Finding.label)
    )
    result: dict[int, list[FindingSummary]] = defaultdict(list)
    for study_pk, label, confidence in rows:
        result[study_pk].append(FindingSummary(label=label, confidence=float(confidence)))
    for summaries in result.values():
        summaries.sort(key=lambda f: -f.confidence)
    return result


def _destinations_by_study(session: Session, study_ids: Sequence[int]) -> dict[int, list[DestinationState]]:
    if not study_ids:
        return {}
    deliveries = session.scalars(
        select(Delivery)
        .join(ResultObject, Delivery.result_object_pk == ResultObject.id)
        .where(ResultObject.study_pk.in_(study_ids))
        .options(joinedload(Delivery.destination), joinedload(Delivery.result_object))
    )
    grouped: dict[int, dict[str, list[DeliveryState]]] = defaultdict(lambda: defaultdict(list))
    for delivery in deliveries:
        if delivery.state is DeliveryState.SUPERSEDED:
            continue  # replaced by a later revision before it was sent: owed to no one
        grouped[delivery.result_object.study_pk][delivery.destination.ae_title].append(delivery.state)
    result: dict[int, list[DestinationState]] = {}
    for study_pk, by_destination in grouped.items():
        result[study_pk] = [
            DestinationState(
                destination=title,
                state=next(s for s in _WORST_FIRST if s in states),
                delivered=sum(1 for s in states if s is DeliveryState.DELIVERED),
                total=len(states),
            )
            for title, states in sorted(by_destination.items())
        ]
    return result


# ---------------------------------------------------------------------------------------------
# Study details
# ---------------------------------------------------------------------------------------------


class FindingDetail(BaseModel):
    id: int
    label: str
    top_class: str
    confidence: float
    probabilities: list[tuple[str, float]]
    model_name: str
    model_version: str
    created_at: UtcDatetime
    has_heatmap: bool  # its heat-map file is on the node
    # where the heat map is strongest, in words (web.imaging.hot_region), for its alt text; "" unknown
    heatmap_region: str = ""
    novelty: float | None = None  # how unlike the training images; 1.0 = the model's limit
    doubt: str | None = None  # why the model's own checks doubted the image it classified anyway


class InstanceDetail(BaseModel):
    id: int
    sop_instance_uid: str
    modality: str
    series_description: str
    body_part_examined: str
    view_position: str
    image_laterality: str
    rows: int | None
    columns: int | None
    source: str
    received_at: UtcDatetime
    state: str
    state_reason: str
    pixels_available: bool  # its file is on the node: image.png can show it
    is_image: bool = True
    # gone though the retention policy did not remove it (a restore from an older backup, a lost disk)
    file_missing: bool = False
    findings: list[FindingDetail]


class AttemptDetail(BaseModel):
    at: UtcDatetime
    status: int | None
    outcome: str
    error: str


class DeliveryDetail(BaseModel):
    id: int
    destination: str
    destination_address: str
    state: DeliveryState
    attempts: int
    next_attempt_at: UtcDatetime | None
    last_status: int | None
    last_error: str
    delivered_at: UtcDatetime | None
    history: list[AttemptDetail]
    # storage commitment of the delivered object: None when its destination is not asked (commitment)
    commitment: CommitmentState | None = None
    commitment_text: str = Field(default="", description="the storage commitment in words, with why")


class ResultObjectDetail(BaseModel):
    id: int
    kind: str
    model_name: str
    model_version: str
    # 2, 3, …: made again because images of the study arrived after the earlier revision, or the files
    # of the earlier revision were lost
    revision: int
    sop_instance_uid: str
    created_at: UtcDatetime
    # its file is on the node: object.dcm (and a PDF's report.pdf) can be downloaded
    file_available: bool = True
    deliveries: list[DeliveryDetail]


class StudyDetail(BaseModel):
    id: int
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_instance_uid: str
    accession_number: str
    study_date: str
    study_time: str
    study_description: str
    referring_physician_name: str
    calling_ae: str
    state: StudyState
    state_reason: str
    received_at: UtcDatetime
    analysed_at: UtcDatetime | None
    # Findings were made although the header gives no patient age: the reader confirms an adult
    age_unknown: bool
    instances: list[InstanceDetail]
    results: list[ResultObjectDetail]


def study_detail(
    session: Session, study_id: int, *, storage_dir: Path, results_dir: Path,
    ages: AgePolicy = DEFAULT_AGE_POLICY,
) -> StudyDetail:
    """The study as the console shows it. Whether an image, a heat map or a result can be shown is
    checked on disk (a stat per file), not taken from the rows: after a restore, or a lost disk, a row
    may name a file that is gone."""
    study = session.scalar(
        select(Study)
        .where(Study.id == study_id)
        .options(
            joinedload(Study.patient),
            selectinload(Study.series).selectinload(Series.instances).selectinload(Instance.findings),
        )
    )
    if study is None:
        raise NotFoundError(f"no study with id {study_id}")
    results = list(
        session.scalars(
            select(ResultObject)
            .where(ResultObject.study_pk == study.id)
            .order_by(ResultObject.created_at, ResultObject.id)
            .options(
                selectinload(ResultObject.deliveries).joinedload(Delivery.destination),
                selectinload(ResultObject.deliveries).selectinload(Delivery.attempt_history),
            )
        )
    )
    stored = {
        inst.id: inst.purged_at is None and (storage_dir / inst.file_path).is_file()
        for series in study.series for inst in series.instances
    }
    instances = [
        InstanceDetail(
            id=inst.id,
            sop_instance_uid=inst.sop_instance_uid,
            modality=series.modality,
            series_description=series.series_description,
            body_part_examined=series.body_part_examined,
            view_position=inst.view_position,
            image_laterality=inst.image_laterality,
            rows=inst.rows,
            columns=inst.columns,
            source=inst.source,
            received_at=inst.received_at,
            state=inst.state.value,
            state_reason=inst.state_reason,
            pixels_available=inst.rows is not None and stored[inst.id],
            is_image=inst.rows is not None,  # not a dose SR, report or PDF a PACS sent with the study
            file_missing=inst.purged_at is None and not stored[inst.id],
            findings=[
                FindingDetail(
                    id=f.id,
                    label=f.label,
                    top_class=f.top_class,
                    confidence=f.confidence,
                    probabilities=sorted(
                        ((str(k), float(v)) for k, v in f.probabilities.items()), key=lambda kv: -kv[1]
                    ),
                    model_name=f.model_name,
                    model_version=f.model_version,
                    created_at=f.created_at,
                    has_heatmap=bool(f.heatmap_path) and (results_dir / str(f.heatmap_path)).is_file(),
                    heatmap_region=_heatmap_region(results_dir, f.heatmap_path),
                    novelty=f.novelty,
                    doubt=doubt_reason(f.novelty, f.better_turn or 0, bool(f.negative)),
                )
                for f in sorted(inst.findings, key=lambda f: (f.created_at, f.id), reverse=True)
            ],
        )
        for series in sorted(study.series, key=lambda s: (s.series_number or 0, s.id))
        for inst in sorted(series.instances, key=lambda i: (i.instance_number or 0, i.id))
    ]
    return StudyDetail(
        id=study.id,
        patient_name=study.patient.name,
        patient_id=study.patient.patient_id,
        birth_date=study.patient.birth_date,
        sex=study.patient.sex,
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        study_date=study.study_date,
        study_time=study.study_time,
        study_description=study.study_description,
        referring_physician_name=study.referring_physician_name,
        calling_ae=study.calling_ae,
        state=study.state,
        state_reason=study.state_reason,
        received_at=study.first_received_at,
        analysed_at=study.analysed_at,
        age_unknown=ages.cautions(study_age(study)) and any(inst.findings for inst in instances),
        instances=instances,
        results=[
            ResultObjectDetail(
                id=r.id,
                kind=r.kind.value,
                model_name=r.model_name,
                model_version=r.model_version,
                revision=r.revision,
                sop_instance_uid=r.sop_instance_uid,
                created_at=r.created_at,
                file_available=(results_dir / r.file_path).is_file(),
                deliveries=[
                    DeliveryDetail(
                        id=d.id,
                        destination=d.destination.ae_title,
                        destination_address=f"{d.destination.host or '?'}:{d.destination.port or '?'}",
                        state=d.state,
                        attempts=d.attempts,
                        next_attempt_at=d.next_attempt_at,
                        last_status=d.last_status,
                        last_error=d.last_error,
                        delivered_at=d.delivered_at,
                        commitment=d.commitment,
                        commitment_text=commitment.describe(d),
                        history=[
                            AttemptDetail(at=a.at, status=a.status, outcome=a.outcome, error=a.error)
                            for a in d.attempt_history
                        ],
                    )
                    for d in sorted(r.deliveries, key=lambda d: d.id)
                ],
            )
            for r in results
        ],
    )


def _heatmap_region(results_dir: Path, relative: str | None) -> str:
    """Where a finding's stored heat map is strongest (imaging.hot_region); "" without a readable map."""
    if not relative:
        return ""
    try:
        return hot_region(load_heatmap(results_dir / relative))
    except NodeError:  # missing or damaged: the page says so where the map would be
        return ""
