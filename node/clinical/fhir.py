"""Fetch a study's clinical data from a FHIR R4 server (httpx; parsed with fhir.resources).

Queries (standard FHIR search):

* ``Patient?identifier={system}|{value}``: exactly one patient must match
  (none: no data; several: refused as ambiguous).
* ``Observation?patient={id}&code=http://loinc.org|c1,c2,...&date=ge..&date=le..``:
  the panel's LOINC codes within the window around the study; paged through
  ``Bundle.link[next]``. Only status final / amended / corrected is used.
* ``Condition?patient={id}``: condition text (``code.text`` or the first
  coding's display) becomes a history note.
* ``DiagnosticReport?patient={id}&date=le..``: ``conclusion`` (or a text/plain
  ``presentedForm``) becomes a previous-report note.

Resources are parsed with ``fhir.resources.R4B`` (R4B is wire-compatible with
R4 for these resources). Network and HTTP errors and invalid resources become
:class:`node.errors.ClinicalDataError` with the URL path (never the patient
identifier) in the message.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydantic import ValidationError

from models.labs import LAB_PANEL
from node.clinical.store import LabRecord, NoteRecord
from node.errors import ClinicalDataError

log = logging.getLogger(__name__)

LOINC_SYSTEM = "http://loinc.org"
_USABLE_STATUS = {"final", "amended", "corrected"}
_POSITIVE_SCT = {"10828004": "positive", "260385009": "negative", "131194007": "negative"}


def _aware(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if value is None:
        return None
    try:  # a date without time
        return datetime(value.year, value.month, value.day, 12, tzinfo=UTC)
    except AttributeError:
        return None


class FhirClient:
    """A small FHIR R4 search client for one base URL."""

    def __init__(
        self, base_url: str, *, timeout_s: float = 10.0, client: httpx.Client | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.Client(
            timeout=timeout_s, headers={"Accept": "application/fhir+json"}
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _get(self, url: str, params: list[tuple[str, str]] | None) -> Bundle:
        what = url.split("?", 1)[0].replace(self.base_url, "") or url
        try:
            resp = self._client.get(url, params=tuple(params) if params else None)
        except httpx.HTTPError as exc:
            raise ClinicalDataError(
                f"FHIR server {self.base_url} unreachable ({what}): {exc}"
            ) from exc
        if resp.status_code != 200:
            raise ClinicalDataError(
                f"FHIR server answered HTTP {resp.status_code} to {what} search"
            )
        try:
            return Bundle.model_validate(resp.json())
        except (ValueError, ValidationError) as exc:
            raise ClinicalDataError(
                f"FHIR {what}: response is not a valid R4 Bundle: {exc}"
            ) from exc

    def search(self, resource: str, params: list[tuple[str, str]]) -> Iterator[Any]:
        """Every resource of the search, following ``next`` links (at most 50 pages)."""
        bundle = self._get(f"{self.base_url}/{resource}", params)
        for _ in range(50):
            for entry in bundle.entry or []:
                if entry.resource is not None:
                    yield entry.resource
            nxt = next((link.url for link in bundle.link or [] if link.relation == "next"), None)
            if not nxt:
                return
            bundle = self._get(str(nxt), None)
        raise ClinicalDataError(f"FHIR {resource} search returned more than 50 pages")

    def patient_id(self, system: str, value: str) -> str | None:
        ident = f"{system}|{value}" if system else value
        found = [r for r in self.search("Patient", [("identifier", ident)]) if r.id]
        if len(found) > 1:
            raise ClinicalDataError(
                f"FHIR Patient search by identifier matched {len(found)} patients; refusing to guess"
            )
        return str(found[0].id) if found else None

    def fetch(
        self,
        *,
        system: str,
        patient_id: str,
        issuer: str,
        study_time: datetime,
        days_before: float = 30.0,
        hours_after: float = 24.0,
    ) -> tuple[list[LabRecord], list[NoteRecord]]:
        """Lab records and notes for one patient around ``study_time`` (not yet stored)."""
        pid = self.patient_id(system, patient_id)
        if pid is None:
            return [], []
        start = study_time - timedelta(days=days_before)
        end = study_time + timedelta(hours=hours_after)
        codes = ",".join(f"{LOINC_SYSTEM}|{c}" for t in LAB_PANEL for c in t.codes)
        params = [
            ("patient", pid),
            ("code", codes),
            ("date", f"ge{start.strftime('%Y-%m-%dT%H:%M:%SZ')}"),
            ("date", f"le{end.strftime('%Y-%m-%dT%H:%M:%SZ')}"),
            ("_count", "200"),
        ]
        labs: list[LabRecord] = []
        for obs in self.search("Observation", params):
            rec = observation_record(obs, patient_id, issuer)
            if rec is not None:
                labs.append(rec)
        notes: list[NoteRecord] = []
        for cond in self.search("Condition", [("patient", pid)]):
            note = condition_note(cond, patient_id, issuer)
            if note is not None:
                notes.append(note)
        rparams = [("patient", pid), ("date", f"le{end.strftime('%Y-%m-%dT%H:%M:%SZ')}")]
        for rep in self.search("DiagnosticReport", rparams):
            note = report_note(rep, patient_id, issuer)
            if note is not None:
                notes.append(note)
        return labs, notes


def observation_record(obs: Any, patient_id: str, issuer: str) -> LabRecord | None:
    if not isinstance(obs, Observation) or obs.status not in _USABLE_STATUS:
        return None
    code = next(
        (c.code for c in obs.code.coding or [] if c.system == LOINC_SYSTEM and c.code), None
    )
    when = _aware(obs.effectiveDateTime) or _aware(
        obs.effectivePeriod.start if obs.effectivePeriod else None
    )
    if code is None or when is None:
        return None
    value: float | str
    unit = ""
    if obs.valueQuantity is not None and obs.valueQuantity.value is not None:
        value = float(obs.valueQuantity.value)
        unit = str(obs.valueQuantity.code or obs.valueQuantity.unit or "")
    elif obs.valueCodeableConcept is not None:
        cc = obs.valueCodeableConcept
        codes = [c.code for c in cc.coding or [] if c.code]
        value = next((_POSITIVE_SCT[c] for c in codes if c in _POSITIVE_SCT), None) or str(
            cc.text or next((c.display for c in cc.coding or [] if c.display), "")
        )
    elif obs.valueString is not None:
        value = str(obs.valueString)
    else:
        return None
    return LabRecord(
        patient_id=patient_id,
        issuer=issuer,
        code=str(code),
        value=value,
        unit=unit,
        observed_at=when,
        source="fhir",
        source_ref=f"Observation/{obs.id}" if obs.id else "",
        status=str(obs.status),
    )


def condition_note(cond: Any, patient_id: str, issuer: str) -> NoteRecord | None:
    if not isinstance(cond, Condition) or cond.code is None:
        return None
    text = cond.code.text or next((c.display for c in cond.code.coding or [] if c.display), "")
    if not text:
        return None
    when = _aware(cond.recordedDate) or _aware(cond.onsetDateTime)
    code = next((c.code for c in cond.code.coding or [] if c.code), "")
    return NoteRecord(
        patient_id,
        issuer,
        "condition",
        str(text),
        when,
        "fhir",
        f"Condition/{cond.id}" if cond.id else "",
        str(code or ""),
    )


def report_note(rep: Any, patient_id: str, issuer: str) -> NoteRecord | None:
    if not isinstance(rep, DiagnosticReport) or rep.status not in _USABLE_STATUS:
        return None
    text = rep.conclusion or ""
    if not text:
        for att in rep.presentedForm or []:
            if att.contentType and att.contentType.startswith("text/plain") and att.data:
                raw = att.data if isinstance(att.data, bytes) else str(att.data).encode()
                try:
                    text = base64.b64decode(raw).decode("utf-8")
                except ValueError:
                    text = raw.decode("utf-8", errors="replace")
                break
    if not text.strip():
        return None
    when = _aware(rep.effectiveDateTime) or _aware(rep.issued)
    return NoteRecord(
        patient_id,
        issuer,
        "report",
        text.strip(),
        when,
        "fhir",
        f"DiagnosticReport/{rep.id}" if rep.id else "",
    )
