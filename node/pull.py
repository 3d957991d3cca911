"""Pull mode: the node follows an Orthanc's change log and fetches stable series itself.

For sites that cannot install the router plugin (``orthanc/hpb_router.py``).
:class:`Puller` reads ``/changes`` (pyorthanc) from the last sequence number
it saw, and for each ``StableSeries`` change that passes the same filters as
the plugin (modality, body part, description regexes, never the node's own
outputs) downloads every instance over REST into the node's ingest path
(:meth:`node.ingest.Store.accept`, channel ``"pull"``): the same validation,
spool and database rows as a C-STORE. The stability sweep then completes the
series as usual.

The last sequence number is stored in the node database (table
``pull_cursors``, one row per Orthanc URL) after each change is handled, so a
restarted puller resumes where it stopped; a change is never skipped because
its download failed (the cursor stays before it and the error is raised).
The table has its own metadata (created on first use) so the node's Alembic
migrations stay untouched.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pyorthanc import Orthanc
from sqlalchemy import Integer, String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from node.db import TZDateTime, utcnow
from node.errors import NodeError

log = logging.getLogger(__name__)

CHANNEL = "pull"

# SOP classes and modalities the node writes: never pulled back (no loops).
NODE_OUTPUT_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        "1.2.840.10008.5.1.4.1.1.88.11",
        "1.2.840.10008.5.1.4.1.1.88.22",
        "1.2.840.10008.5.1.4.1.1.88.33",
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.11.1",
    }
)
NODE_OUTPUT_MODALITIES = frozenset({"SEG", "SR", "DOC", "KO", "PR", "OT"})


class PullError(NodeError):
    """Orthanc could not be read or a series could not be fetched."""


class _CursorBase(DeclarativeBase):
    pass


class PullCursor(_CursorBase):
    """The last Orthanc change sequence number handled, per source URL."""

    __tablename__ = "pull_cursors"
    source: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime(), default=utcnow, onupdate=utcnow)


def ensure_cursor_table(engine: Engine) -> None:
    _CursorBase.metadata.create_all(engine, checkfirst=True)


def load_cursor(session: Session, source: str) -> int:
    row = session.get(PullCursor, source)
    return 0 if row is None else row.last_seq


def save_cursor(session: Session, source: str, seq: int) -> None:
    row = session.get(PullCursor, source)
    if row is None:
        session.add(PullCursor(source=source, last_seq=seq))
    else:
        row.last_seq = seq


class PullFilters(BaseModel):
    """Which stable series to fetch (the plugin's ``HpbRouter`` filters, same meaning)."""

    model_config = ConfigDict(extra="forbid")

    modalities: list[str] = Field(default_factory=lambda: ["CT", "MR"])
    body_parts: list[str] = Field(default_factory=list)  # empty: any
    series_description_regex: str = ""
    study_description_regex: str = ""
    exclude_series_description_regex: str = "scout|localizer|topogram|dose report"
    min_instances: int = Field(default=1, ge=1)
    node_manufacturers: list[str] = Field(default_factory=lambda: ["hpb-node"])
    node_series_description_regex: str = r"^AI |NOT FOR CLINICAL USE"
    node_ae_titles: list[str] = Field(default_factory=lambda: ["HPBNODE"])

    @field_validator(
        "series_description_regex",
        "study_description_regex",
        "exclude_series_description_regex",
        "node_series_description_regex",
    )
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from exc
        return v

    def _search(self, pattern: str, text: str) -> bool:
        return bool(pattern) and re.search(pattern, text, re.IGNORECASE) is not None

    def refuse(
        self,
        series: dict[str, str],
        study: dict[str, str],
        count: int,
        sop_class: str,
        remote_aet: str,
    ) -> str:
        """Why this series is not fetched ("" when it is)."""
        modality = series.get("Modality", "").strip().upper()
        if modality in NODE_OUTPUT_MODALITIES:
            return f"node output: modality {modality}"
        if sop_class in NODE_OUTPUT_SOP_CLASSES:
            return f"node output: SOP class {sop_class}"
        maker = series.get("Manufacturer", "").strip().upper()
        if maker and maker in {m.upper() for m in self.node_manufacturers}:
            return f"node output: manufacturer {maker}"
        description = series.get("SeriesDescription", "")
        if self._search(self.node_series_description_regex, description):
            return "node output: series description marks a node result"
        if remote_aet.strip().upper() in {a.upper() for a in self.node_ae_titles}:
            return f"node output: sent by the node's AE {remote_aet.strip()}"
        if self.modalities and modality not in {m.upper() for m in self.modalities}:
            return f"filter: modality {modality or '(none)'} not accepted"
        body_part = series.get("BodyPartExamined", "").strip().upper()
        if self.body_parts and body_part not in {b.upper() for b in self.body_parts}:
            return f"filter: body part {body_part or '(none)'} not accepted"
        if self.series_description_regex and not self._search(
            self.series_description_regex, description
        ):
            return "filter: series description does not match"
        if self._search(self.exclude_series_description_regex, description):
            return "filter: series description excluded"
        if self.study_description_regex and not self._search(
            self.study_description_regex, study.get("StudyDescription", "")
        ):
            return "filter: study description does not match"
        if count < self.min_instances:
            return f"filter: {count} instance(s), fewer than {self.min_instances}"
        return ""


@dataclass
class PullReport:
    """What one :meth:`Puller.poll` did."""

    last_seq: int = 0
    fetched_series: list[str] = field(default_factory=list)  # SeriesInstanceUIDs
    fetched_instances: int = 0
    refused_instances: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # SeriesInstanceUID -> why
    done: bool = True  # Orthanc had no further changes


class Puller:
    """Follows one Orthanc's ``/changes`` and fetches matching stable series."""

    def __init__(
        self,
        client: Orthanc,
        sessions: sessionmaker[Session],
        store: Any,  # node.ingest.Store: accept(data, calling_ae=, channel=) -> Outcome
        *,
        source: str,
        filters: PullFilters | None = None,
        calling_ae: str = "ORTHANC-PULL",
        batch: int = 100,
    ) -> None:
        self.client = client
        self.sessions = sessions
        self.store = store
        self.source = source[:255]
        self.filters = filters or PullFilters()
        self.calling_ae = calling_ae[:16]
        self.batch = batch

    def _get(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except httpx.HTTPStatusError as exc:
            raise PullError(
                f"Orthanc at {self.source} answered HTTP {exc.response.status_code} for {what}"
            ) from exc
        except httpx.HTTPError as exc:
            raise PullError(f"cannot reach Orthanc at {self.source} ({what}): {exc}") from exc

    def _json(self, uri: str) -> Any:
        response = self.client.get(f"{self.client.url}{uri}")
        response.raise_for_status()
        return response.json()

    def poll(self) -> PullReport:
        """Handle one page of changes after the stored cursor."""
        with self.sessions() as session:
            since = load_cursor(session, self.source)
        page = self._get(
            "/changes",
            lambda: self.client.get_changes(params={"since": since, "limit": self.batch}),
        )
        report = PullReport(last_seq=since, done=bool(page.get("Done", True)))
        for change in page.get("Changes", []):
            if change.get("ChangeType") == "StableSeries":
                self._series(str(change["ID"]), report)
            seq = int(change["Seq"])
            with self.sessions.begin() as session:
                save_cursor(session, self.source, seq)
            report.last_seq = seq
        last = int(page.get("Last", since))
        if report.done and last > report.last_seq:
            with self.sessions.begin() as session:
                save_cursor(session, self.source, last)
            report.last_seq = last
        return report

    def run_until_idle(self) -> PullReport:
        """Poll until Orthanc reports no further changes; the merged report."""
        total = PullReport()
        while True:
            page = self.poll()
            total.last_seq = page.last_seq
            total.fetched_series += page.fetched_series
            total.fetched_instances += page.fetched_instances
            total.refused_instances += page.refused_instances
            total.skipped.update(page.skipped)
            if page.done:
                return total

    def follow(self, interval_s: float, stop: Callable[[], bool]) -> None:
        """Poll every ``interval_s`` seconds until ``stop()``; errors are logged and retried."""
        while not stop():
            try:
                report = self.run_until_idle()
                if report.fetched_series:
                    log.info(
                        "pulled %d series (%d instances) from %s",
                        len(report.fetched_series),
                        report.fetched_instances,
                        self.source,
                    )
            except PullError as exc:
                log.error("pull: %s (retrying in %.0f s)", exc, interval_s)
            time.sleep(interval_s)

    def _series(self, orthanc_id: str, report: PullReport) -> None:
        series = self._get(f"series {orthanc_id}", lambda: self.client.get_series_id(orthanc_id))
        tags: dict[str, str] = series.get("MainDicomTags", {})
        uid = tags.get("SeriesInstanceUID", orthanc_id)
        instances: list[str] = series.get("Instances", [])
        if not instances:
            report.skipped[uid] = "series has no instances (deleted?)"
            return
        first = instances[0]
        meta = self._get(
            f"instance {first} metadata",
            lambda: self._json(f"/instances/{first}/metadata?expand"),
        )
        study = self._get(
            f"study of series {orthanc_id}",
            lambda: self.client.get_studies_id(series["ParentStudy"]),
        )
        why = self.filters.refuse(
            tags,
            study.get("MainDicomTags", {}),
            len(instances),
            str(meta.get("SopClassUid", "")),
            str(meta.get("RemoteAET", "")),
        )
        if why:
            log.info("pull: not fetching series %s: %s", orthanc_id, why)
            report.skipped[uid] = why
            return
        refused = self._fetch(instances)
        report.fetched_series.append(uid)
        report.fetched_instances += len(instances) - refused
        report.refused_instances += refused

    def _fetch(self, instances: Iterable[str]) -> int:
        refused = 0
        for iid in instances:
            data = self._get(f"instance {iid}", partial(self.client.get_instances_id_file, iid))
            if not isinstance(data, bytes):
                raise PullError(f"Orthanc returned no file for instance {iid}")
            outcome = self.store.accept(data, calling_ae=self.calling_ae, channel=CHANNEL)
            if not getattr(outcome, "ok", True):
                refused += 1  # recorded as a Rejection by the store, with its reason
        return refused


def connect(url: str, username: str | None, password: str | None) -> Orthanc:
    if not re.match(r"^https?://", url):
        raise PullError(f"pull: Orthanc URL {url!r} must start with http:// or https://")
    return Orthanc(url.rstrip("/"), username=username, password=password, timeout=60)
