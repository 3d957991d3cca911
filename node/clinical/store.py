"""Clinical data tables and the one way records get into them.

Three tables on the node's ``node.db.Base`` (so they share its metadata and
its Alembic migrations):

* ``clinical_observations``: one lab result, normalised to the panel's
  canonical UCUM unit (``models.labs``), with the value and unit as received,
  where it came from (``fhir``, ``hl7``, ``csv``, ``json``) and whether it is
  plausible. Implausible values are kept (for the record) but never used.
* ``clinical_notes``: free text that informs the model: history, conditions,
  previous report conclusions.
* ``hl7_messages``: one row per HL7 v2 message received (control id, type,
  acknowledgement code and reason; no patient data).

:func:`store_batch` validates and normalises a whole batch before adding
anything and writes it in the caller's transaction: a batch is stored
completely or not at all. Re-delivered records (same source, reference and
code) are skipped, not duplicated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import (
    Boolean,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from models.labs import LabUnitError, by_code, normalise
from node.db import Base, utcnow
from node.errors import ClinicalDataError

log = logging.getLogger(__name__)

SOURCES = ("fhir", "hl7", "csv", "json")
NOTE_KINDS = ("history", "condition", "report")


class ClinicalObservation(Base):
    __tablename__ = "clinical_observations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    loinc: Mapped[str] = mapped_column(String(16))  # primary panel code
    name: Mapped[str] = mapped_column(String(16))  # panel name, e.g. "BILI_T"
    value: Mapped[float] = mapped_column(Float)  # canonical unit
    unit: Mapped[str] = mapped_column(String(32))  # canonical UCUM unit
    original_value: Mapped[str] = mapped_column(String(64), default="")
    original_unit: Mapped[str] = mapped_column(String(32), default="")
    original_code: Mapped[str] = mapped_column(String(16), default="")
    observed_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(8))
    source_ref: Mapped[str] = mapped_column(String(128), default="")
    status: Mapped[str] = mapped_column(String(16), default="final")
    plausible: Mapped[bool] = mapped_column(Boolean, default=True)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (
        UniqueConstraint("source", "source_ref", "original_code", name="uq_clinical_obs_ref"),
        Index("ix_clinical_obs_patient", "patient_id", "issuer", "name", "observed_at"),
    )


class ClinicalNote(Base):
    __tablename__ = "clinical_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    kind: Mapped[str] = mapped_column(String(16))  # history, condition, report
    code: Mapped[str] = mapped_column(String(64), default="")
    text: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[datetime | None] = mapped_column(nullable=True)
    source: Mapped[str] = mapped_column(String(8))
    source_ref: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (
        UniqueConstraint("source", "source_ref", "kind", name="uq_clinical_note_ref"),
        Index("ix_clinical_note_patient", "patient_id", "issuer"),
    )


class Hl7Message(Base):
    __tablename__ = "hl7_messages"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    control_id: Mapped[str] = mapped_column(String(64), default="")
    message_type: Mapped[str] = mapped_column(String(32), default="")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    ack_code: Mapped[str] = mapped_column(String(2))  # AA, AE, AR
    reason: Mapped[str] = mapped_column(Text, default="")
    observations: Mapped[int] = mapped_column(Integer, default=0)
    __table_args__ = (Index("ix_hl7_messages_control", "control_id"),)


CLINICAL_TABLES = (
    ClinicalObservation.__table__,
    ClinicalNote.__table__,
    Hl7Message.__table__,
)


def ensure_tables(engine: Engine) -> None:
    """Create the clinical tables where missing (for tools run before migrations)."""
    Base.metadata.create_all(engine, tables=list(CLINICAL_TABLES))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# records as received


@dataclass(frozen=True)
class LabRecord:
    """One lab result as received, before normalisation."""

    patient_id: str
    issuer: str
    code: str  # LOINC
    value: float | str
    unit: str
    observed_at: datetime
    source: str
    source_ref: str = ""
    accession_number: str = ""
    status: str = "final"


@dataclass(frozen=True)
class NoteRecord:
    patient_id: str
    issuer: str
    kind: str
    text: str
    recorded_at: datetime | None
    source: str
    source_ref: str = ""
    code: str = ""
    accession_number: str = ""


@dataclass
class StoreResult:
    stored: int = 0
    notes: int = 0
    duplicates: int = 0
    not_in_panel: int = 0
    implausible: list[str] = field(default_factory=list)


def _check_common(what: str, patient_id: str, source: str, when: datetime | None) -> None:
    if not patient_id.strip():
        raise ClinicalDataError(f"{what}: no patient identifier")
    if source not in SOURCES:
        raise ClinicalDataError(f"{what}: unknown source {source!r}")
    if when is not None and when.tzinfo is None:
        raise ClinicalDataError(f"{what}: time {when.isoformat()} has no time zone")


def _prepare(rec: LabRecord, where: str) -> ClinicalObservation | None:
    _check_common(where, rec.patient_id, rec.source, rec.observed_at)
    test = by_code(rec.code)
    if test is None:
        return None
    try:
        nv = normalise(test, rec.value, rec.unit)
    except LabUnitError as exc:
        raise ClinicalDataError(f"{where}: {exc}") from exc
    return ClinicalObservation(
        patient_id=rec.patient_id.strip(),
        issuer=rec.issuer.strip(),
        accession_number=rec.accession_number.strip(),
        loinc=test.loinc,
        name=test.name,
        value=nv.value,
        unit=test.unit,
        original_value=str(rec.value)[:64],
        original_unit=rec.unit[:32],
        original_code=rec.code.strip(),
        observed_at=rec.observed_at,
        source=rec.source,
        source_ref=rec.source_ref[:128],
        status=rec.status,
        plausible=nv.plausible,
        note=nv.reason,
    )


def store_batch(
    session: Session,
    labs: Sequence[LabRecord],
    notes: Sequence[NoteRecord] = (),
    where: str = "record",
) -> StoreResult:
    """Validate every record, then add all of them to ``session`` (caller commits).

    Raises :class:`ClinicalDataError` (naming the record) before adding anything
    if any record is unusable: no patient identifier, a naive time, a unit that
    cannot express the analyte, a non-numeric quantitative value.
    """
    result = StoreResult()
    rows: list[ClinicalObservation] = []
    for i, rec in enumerate(labs, 1):
        row = _prepare(rec, f"{where} {i} ({rec.code})")
        if row is None:
            result.not_in_panel += 1
            continue
        if not row.plausible:
            result.implausible.append(row.note)
        rows.append(row)
    note_rows: list[ClinicalNote] = []
    for i, n in enumerate(notes, 1):
        _check_common(f"{where} note {i}", n.patient_id, n.source, n.recorded_at)
        if n.kind not in NOTE_KINDS:
            raise ClinicalDataError(f"{where} note {i}: kind must be one of {NOTE_KINDS}")
        if not n.text.strip():
            continue
        note_rows.append(
            ClinicalNote(
                patient_id=n.patient_id.strip(),
                issuer=n.issuer.strip(),
                accession_number=n.accession_number.strip(),
                kind=n.kind,
                code=n.code[:64],
                text=n.text.strip(),
                recorded_at=n.recorded_at,
                source=n.source,
                source_ref=n.source_ref[:128],
            )
        )
    seen: set[tuple[str, str, str]] = set()
    for row in rows:
        key = (row.source, row.source_ref, row.original_code)
        if row.source_ref and (key in seen or _exists_obs(session, *key)):
            result.duplicates += 1
            continue
        seen.add(key)
        session.add(row)
        result.stored += 1
    seen_n: set[tuple[str, str, str]] = set()
    for note in note_rows:
        nkey = (note.source, note.source_ref, note.kind)
        if note.source_ref and (nkey in seen_n or _exists_note(session, *nkey)):
            result.duplicates += 1
            continue
        seen_n.add(nkey)
        session.add(note)
        result.notes += 1
    session.flush()
    return result


def _exists_obs(session: Session, source: str, ref: str, code: str) -> bool:
    q = select(ClinicalObservation.id).where(
        ClinicalObservation.source == source,
        ClinicalObservation.source_ref == ref,
        ClinicalObservation.original_code == code,
    )
    return session.execute(q.limit(1)).first() is not None


def _exists_note(session: Session, source: str, ref: str, kind: str) -> bool:
    q = select(ClinicalNote.id).where(
        ClinicalNote.source == source, ClinicalNote.source_ref == ref, ClinicalNote.kind == kind
    )
    return session.execute(q.limit(1)).first() is not None
