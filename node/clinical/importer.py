"""Import lab results and history from CSV or JSON files (``hpb-node clinical import``).

One record per row (CSV, header required) or per object (JSON: a list, or an
object with a ``records`` list). Fields:

==================  ==========================================================
``patient_id``      required
``issuer``          issuer of the patient ID (DICOM IssuerOfPatientID); may be empty
``accession_number`` optional: the imaging (or order) accession the result belongs to
``observed_at``     ISO 8601 date-time; without a UTC offset it is read in the
                    configured time zone
``kind``            ``lab`` (default), ``history``, ``condition`` or ``report``
``code``            LOINC code (labs); or ``test``: a panel name such as ``AFP``
``value``, ``unit`` the result as reported (UCUM or a common spelling)
``text``            the note text (history, condition, report)
==================  ==========================================================

The whole file is validated first; any unusable row rejects the file with the
line numbers, and nothing is stored (one transaction). Re-importing the same
file stores nothing twice (rows are keyed by file name and line).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.orm import Session

from models.labs import by_name
from node.clinical.store import LabRecord, NoteRecord, StoreResult, store_batch
from node.errors import ClinicalDataError

NOTE_KINDS = ("history", "condition", "report")


def _time(text: str, tz: ZoneInfo) -> datetime:
    t = text.strip().replace("Z", "+00:00")
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"observed_at {text!r} is not an ISO 8601 date-time") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=tz)


def _rows(path: Path) -> tuple[str, Iterable[tuple[int, Mapping[str, Any]]]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
            return "csv", [(i + 2, r) for i, r in enumerate(rows)]  # line 1 is the header
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            items = data.get("records") if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise ClinicalDataError(
                    f"{path.name}: JSON must be a list or have a 'records' list"
                )
            return "json", [(i + 1, r) for i, r in enumerate(items)]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ClinicalDataError(f"cannot read {path}: {exc}") from exc
    raise ClinicalDataError(f"{path.name}: only .csv and .json files can be imported")


def read_records(path: Path, timezone: str = "UTC") -> tuple[list[LabRecord], list[NoteRecord]]:
    """Parse and check every row; raise ClinicalDataError listing the bad rows."""
    tz = ZoneInfo(timezone)
    source, rows = _rows(path)
    labs: list[LabRecord] = []
    notes: list[NoteRecord] = []
    errors: list[str] = []
    unit = "row" if source == "json" else "line"
    for line, row in rows:
        if not isinstance(row, Mapping):
            errors.append(f"{unit} {line}: not an object")
            continue

        def get(key: str, row: Mapping[str, Any] = row) -> str:
            return str(row.get(key) or "").strip()

        ref = f"{path.name}:{line}"
        try:
            if not get("patient_id"):
                raise ValueError("patient_id is empty")
            kind = get("kind") or "lab"
            when = _time(get("observed_at"), tz) if get("observed_at") else None
            if kind == "lab":
                code = get("code")
                if not code and get("test"):
                    code = by_name(get("test").upper()).loinc
                if not code:
                    raise ValueError("neither code (LOINC) nor test is given")
                if when is None:
                    raise ValueError("observed_at is empty")
                if get("value") == "":
                    raise ValueError("value is empty")
                raw = row.get("value")
                value: float | str = raw if isinstance(raw, (int, float)) else get("value")
                labs.append(
                    LabRecord(
                        get("patient_id"),
                        get("issuer"),
                        code,
                        value,
                        get("unit"),
                        when,
                        source,
                        ref,
                        get("accession_number"),
                    )
                )
            elif kind in NOTE_KINDS:
                if not get("text"):
                    raise ValueError(f"{kind} row has no text")
                notes.append(
                    NoteRecord(
                        get("patient_id"),
                        get("issuer"),
                        kind,
                        get("text"),
                        when,
                        source,
                        ref,
                        get("code"),
                        get("accession_number"),
                    )
                )
            else:
                raise ValueError(f"kind {kind!r} is not lab, history, condition or report")
        except (ValueError, KeyError) as exc:
            errors.append(f"{unit} {line}: {exc}")
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ClinicalDataError(f"{path.name}: {'; '.join(errors[:5])}{more}; nothing imported")
    return labs, notes


def import_file(session: Session, path: Path, timezone: str = "UTC") -> StoreResult:
    """Read, check, normalise and store one file in the session's transaction."""
    labs, notes = read_records(path, timezone)
    return store_batch(session, labs, notes, where=path.name)
