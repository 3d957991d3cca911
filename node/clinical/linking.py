"""Link stored clinical data to one imaging study and build its ClinicalContext.

Rules (also in ``docs/multimodal.md``):

1. **Patient.** A record belongs to the study's patient when the patient
   identifier is equal and the issuer (DICOM IssuerOfPatientID; for FHIR the
   configured identifier system's DICOM issuer) is equal. An empty issuer
   matches only an empty issuer unless ``allow_missing_issuer`` is set (patient
   IDs from different issuers collide). A study without a patient identifier
   links nothing: every panel test is reported missing with that reason.
2. **Accession.** A result carrying the study's accession number is preferred
   over any other; a result carrying the accession number of *another* study
   of the same patient belongs to that study and is not used here.
3. **Time window.** Results from ``days_before`` days before the study up to
   ``hours_after`` hours after it are eligible. The latest result before the
   study wins; a result after the study is used only when nothing earlier is
   eligible (labs drawn after the scan the same day). When the study time is
   unknown (DICOM StudyTime empty) the study is taken to end of its day.
4. **Plausibility.** Implausible stored values are never used; a test whose
   only results are implausible is missing with that reason.
5. **History.** Notes (history, conditions, report conclusions) recorded up to
   ``hours_after`` after the study, newest first, joined as text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, or_, select, true
from sqlalchemy.orm import InstrumentedAttribute, Session

from models.findings import ClinicalValue
from models.labs import LAB_PANEL, ClinicalContext, demographics
from node.clinical.fhir import FhirClient
from node.clinical.store import ClinicalNote, ClinicalObservation, store_batch
from node.db import Study
from node.errors import ClinicalDataError
from node.settings import ClinicalSettings


@dataclass(frozen=True)
class StudyKey:
    """What links a study to clinical data (from the DICOM study attributes)."""

    patient_id: str
    issuer: str = ""
    accession_number: str = ""
    study_date: str = ""  # DICOM DA, YYYYMMDD
    study_time: str = ""  # DICOM TM, HHMMSS[.frac]; may be empty
    age: int | None = None
    sex: str | None = None
    # accession numbers of the patient's other studies (their results are theirs)
    other_accessions: tuple[str, ...] = ()

    def when(self) -> datetime:
        """Study date-time (UTC); end of day when the time is unknown."""
        d = self.study_date.strip()
        try:
            day = date(int(d[:4]), int(d[4:6]), int(d[6:8]))
        except (ValueError, IndexError):
            raise ClinicalDataError(f"study date {d!r} is not a DICOM date (YYYYMMDD)") from None
        t = self.study_time.strip()
        if len(t) >= 4 and t[:4].isdigit():
            sec = int(t[4:6]) if len(t) >= 6 and t[4:6].isdigit() else 0
            clock = time(int(t[:2]), int(t[2:4]), sec)
        else:
            clock = time(23, 59, 59)
        return datetime.combine(day, clock, tzinfo=UTC)


def _issuer_clause(
    column: InstrumentedAttribute[str], issuer: str, allow_missing_issuer: bool
) -> ColumnElement[bool]:
    if allow_missing_issuer:
        return or_(column == issuer, column == "") if issuer else true()
    return column == issuer


def clinical_context(
    session: Session,
    study: StudyKey,
    *,
    days_before: float = 30.0,
    hours_after: float = 24.0,
    allow_missing_issuer: bool = False,
) -> ClinicalContext:
    """The clinical context for ``study`` from the stored records (see module rules)."""
    if not study.patient_id.strip():
        return ClinicalContext(
            age=study.age,
            sex=study.sex,
            missing=tuple(f"{t.name}: study has no patient identifier" for t in LAB_PANEL),
        )
    at = study.when()
    start, end = at - timedelta(days=days_before), at + timedelta(hours=hours_after)
    q = select(ClinicalObservation).where(
        ClinicalObservation.patient_id == study.patient_id.strip(),
        _issuer_clause(ClinicalObservation.issuer, study.issuer.strip(), allow_missing_issuer),
        ClinicalObservation.observed_at >= start,
        ClinicalObservation.observed_at <= end,
    )
    rows = list(session.execute(q).scalars())
    values: list[ClinicalValue] = []
    missing: list[str] = []
    for test in LAB_PANEL:
        mine = [r for r in rows if r.name == test.name]
        mine = [
            r
            for r in mine
            if not (r.accession_number and r.accession_number in study.other_accessions)
        ]
        usable = [r for r in mine if r.plausible]
        if not usable:
            missing.append(
                f"{test.name}: only implausible result(s)"
                if mine
                else f"{test.name}: no result within {days_before:g} days before "
                f"to {hours_after:g} h after the study"
            )
            continue
        best = _choose(usable, study.accession_number.strip(), at)
        values.append(
            ClinicalValue(
                name=test.name,
                code=test.loinc,
                value=best.value,
                unit=test.unit,
                observed_at=best.observed_at,
                source=best.source,
            )
        )
    history = _history(session, study, end, allow_missing_issuer)
    return ClinicalContext(tuple(values), history, study.age, study.sex, tuple(missing))


def _choose(
    rows: Sequence[ClinicalObservation], accession: str, at: datetime
) -> ClinicalObservation:
    if accession:
        same = [r for r in rows if r.accession_number == accession]
        if same:
            rows = same
    before = [r for r in rows if r.observed_at <= at]
    if before:
        return max(before, key=lambda r: (r.observed_at, r.id))
    return min(rows, key=lambda r: (r.observed_at, r.id))


def _history(session: Session, study: StudyKey, end: datetime, allow_missing_issuer: bool) -> str:
    q = select(ClinicalNote).where(
        ClinicalNote.patient_id == study.patient_id.strip(),
        _issuer_clause(ClinicalNote.issuer, study.issuer.strip(), allow_missing_issuer),
        or_(ClinicalNote.recorded_at.is_(None), ClinicalNote.recorded_at <= end),
    )
    notes = [
        n
        for n in session.execute(q).scalars()
        if not (n.accession_number and n.accession_number in study.other_accessions)
    ]
    floor = datetime.min.replace(tzinfo=UTC)
    notes.sort(key=lambda n: (n.recorded_at or floor, n.id), reverse=True)
    parts: list[str] = []
    for n in notes:
        text = n.text.strip()
        if n.kind == "condition":
            text = f"Known condition: {text}"
        if not text.endswith((".", "!", "?")):
            text += "."
        if text not in parts:
            parts.append(text)
    return " ".join(parts)


def study_key(
    session: Session,
    study: Study,
    *,
    study_time: str = "",
    age: int | None = None,
    sex: str | None = None,
) -> StudyKey:
    """The StudyKey of a ``node.db.Study`` row; other studies of the patient give
    the accession numbers whose results are theirs."""
    others: tuple[str, ...] = ()
    if study.patient_id.strip():
        q = select(Study.accession_number).where(
            Study.patient_id == study.patient_id,
            Study.issuer_of_patient_id == study.issuer_of_patient_id,
            Study.id != study.id,
            Study.accession_number != "",
        )
        others = tuple(a for a in session.execute(q).scalars() if a != study.accession_number)
    return StudyKey(
        patient_id=study.patient_id,
        issuer=study.issuer_of_patient_id,
        accession_number=study.accession_number,
        study_date=study.study_date,
        study_time=study_time,
        age=age,
        sex=sex,
        other_accessions=others,
    )


def context_for_study(
    session: Session,
    study: Study,
    settings: ClinicalSettings,
    *,
    study_time: str = "",
    age: int | None = None,
    sex: str | None = None,
    fhir: FhirClient | None = None,
    headers: Mapping[str, Any] | None = None,
) -> tuple[ClinicalContext, list[str]]:
    """Fetch from FHIR (when configured), store, and link: the worker's one call.

    An unreachable or failing FHIR server does not fail the job: the stored data
    are used and the problem is returned (for the job record) as the second item.
    The caller commits the session.
    """
    if headers is not None:  # a Volume's DICOM headers: StudyTime, age, sex
        h_age, h_sex = demographics(headers)
        age = age if age is not None else h_age
        sex = sex if sex is not None else h_sex
        study_time = study_time or str(headers.get("StudyTime") or "")
    key = study_key(session, study, study_time=study_time, age=age, sex=sex)
    problems: list[str] = []
    if key.patient_id.strip() and (fhir is not None or settings.fhir_base_url):
        client = fhir or FhirClient(str(settings.fhir_base_url), timeout_s=settings.fhir_timeout_s)
        try:
            system = settings.fhir_identifier_systems.get(key.issuer, key.issuer)
            labs, notes = client.fetch(
                system=system,
                patient_id=key.patient_id,
                issuer=key.issuer,
                study_time=key.when(),
                days_before=settings.days_before,
                hours_after=settings.hours_after,
            )
            with session.begin_nested():
                store_batch(session, labs, notes, where="FHIR")
        except ClinicalDataError as exc:
            problems.append(f"clinical data from FHIR not used: {exc}")
        finally:
            if fhir is None:
                client.close()
    ctx = clinical_context(
        session,
        key,
        days_before=settings.days_before,
        hours_after=settings.hours_after,
        allow_missing_issuer=settings.allow_missing_issuer,
    )
    return ctx, problems
