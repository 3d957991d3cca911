"""Export: send result objects from the outbox to their destinations.

One outbox row per (result object, destination), written by the worker in the
same transaction that marks the job SUCCEEDED. :func:`send_due` (run by the
scheduler of ``hpb-node serve``) claims due rows with a lease (PENDING whose
``next_attempt_at`` passed, or SENDING whose lease expired after a crash), sends
them grouped by destination and records the outcome:

* DIMSE destinations (AE title, host, port): one pynetdicom association per
  batch, proposing exactly the SOP class and transfer syntax of each file
  (SEG, Comprehensive 3D / Enhanced / Basic SR, Encapsulated PDF, KOS,
  Secondary Capture), C-STORE per file, the DICOM status checked.
* DICOMweb destinations (URL): STOW-RS, one ``multipart/related;
  type="application/dicom"`` request per batch (httpx).

A failure re-schedules the row with exponential backoff
(``export.backoff_s * 2**(attempts-1)``) until ``export.max_attempts``; then the
row is FAILED with its reason, and so is its job ("delivery of N object(s) to
PACS failed ..."). When every row of a job is SENT, the job's outcome says so.
A re-run sends the same SOP Instance UIDs again: the PACS replaces them.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db import (
    Destination,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    audit,
    utcnow,
)
from node.errors import ExportError
from node.settings import Settings
from node.spool import Spool
from node.worker import results_root

log = logging.getLogger(__name__)

LEASE_S = 300.0
_WARNING_STATUSES = {0xB000, 0xB007, 0xB006}


@dataclass
class SendReport:
    sent: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Item:
    id: int
    job_id: int
    destination: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    attempts: int
    max_attempts: int


def _claim(sessions: sessionmaker[Session], owner: str, now: datetime, limit: int) -> list[_Item]:
    due = or_(
        and_(OutboxItem.state == OutboxState.PENDING, OutboxItem.next_attempt_at <= now),
        and_(OutboxItem.state == OutboxState.SENDING, OutboxItem.lease_expires_at < now),
    )
    items: list[_Item] = []
    with sessions.begin() as session:
        stmt = select(OutboxItem).where(due).order_by(OutboxItem.id).limit(limit)
        if session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        rows = session.scalars(stmt).all()
        for row in rows:
            result = session.execute(
                update(OutboxItem)
                .where(
                    OutboxItem.id == row.id,
                    OutboxItem.state == row.state,
                    OutboxItem.attempts == row.attempts,
                )
                .values(
                    state=OutboxState.SENDING,
                    attempts=row.attempts + 1,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=LEASE_S),
                )
                .execution_options(synchronize_session=False)
            )
            if int(getattr(result, "rowcount", 0)) == 1:
                items.append(
                    _Item(
                        row.id,
                        row.job_id,
                        row.destination,
                        row.sop_class_uid,
                        row.sop_instance_uid,
                        row.path,
                        row.attempts + 1,
                        row.max_attempts,
                    )
                )
    return items


def _read(results: Spool, item: _Item) -> Dataset:
    return dcmread(BytesIO(results.read(item.path)))


def send_dimse(
    dest: Destination, datasets: list[Dataset], *, calling_ae: str, timeout: float = 30.0
) -> list[str | None]:
    """C-STORE ``datasets`` over one association; per dataset None (stored) or the error."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    contexts: dict[tuple[str, str], Any] = {}
    for ds in datasets:
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if key not in contexts:
            contexts[key] = build_context(key[0], [key[1]])
    if len(contexts) > 128:
        raise ExportError("more than 128 distinct presentation contexts in one batch")
    ae.requested_contexts = list(contexts.values())
    where = f"{dest.ae_title} at {dest.host}:{dest.port}"
    try:  # a plain TCP probe first: a clear reason, and no socket left behind by pynetdicom
        socket.create_connection((dest.host, dest.port), timeout=timeout).close()
    except OSError as exc:
        raise ExportError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise ExportError(
                f"{where} rejected the association (check its AE title and allowed peers)"
            )
        raise ExportError(f"cannot connect to {where} (connection refused, timed out or aborted)")
    out: list[str | None] = []
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:
                out.append(f"C-STORE of {ds.SOPInstanceUID} not possible: {exc}")
                continue
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                out.append(f"no answer from {where} (association lost or timed out)")
            elif code == 0x0000 or code in _WARNING_STATUSES:
                out.append(None)
            else:
                out.append(f"{where} answered C-STORE status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def send_stow(dest: Destination, blobs: list[bytes], *, timeout: float = 60.0) -> list[str | None]:
    """STOW-RS ``blobs`` (Part 10 files) in one multipart/related request."""
    boundary = uuid.uuid4().hex
    body = BytesIO()
    for blob in blobs:
        body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        body.write(blob)
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    url = dest.url.rstrip("/") + "/studies"
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    try:
        resp = httpx.post(url, content=body.getvalue(), headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ExportError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc
    if resp.status_code == 200:
        return [None] * len(blobs)
    reason = f"{url} answered HTTP {resp.status_code}: {resp.text[:300]}"
    return [reason] * len(blobs)


def _finish(
    session: Session,
    item: _Item,
    error: str | None,
    settings: Settings,
    now: datetime,
    report: SendReport,
) -> None:
    row = session.get(OutboxItem, item.id)
    if row is None or row.state != OutboxState.SENDING or row.attempts != item.attempts:
        return  # re-queued by a re-run meanwhile
    row.lease_owner = None
    row.lease_expires_at = None
    if error is None:
        row.state = OutboxState.SENT
        row.sent_at = now
        row.last_error = ""
        report.sent.append(item.id)
        audit(session, "system", "export.sent", f"outbox:{item.id}", destination=item.destination)
    elif item.attempts < item.max_attempts:
        row.state = OutboxState.PENDING
        row.last_error = error[:2000]
        row.next_attempt_at = now + timedelta(
            seconds=settings.export.backoff_s * 2 ** (item.attempts - 1)
        )
        report.retried.append(item.id)
        log.warning(
            "outbox %d to %s: attempt %d failed, retrying: %s",
            item.id,
            item.destination,
            item.attempts,
            error,
        )
    else:
        row.state = OutboxState.FAILED
        row.last_error = f"gave up after {item.attempts} attempt(s): {error}"[:2000]
        report.failed.append(item.id)
        audit(
            session,
            "system",
            "export.failed",
            f"outbox:{item.id}",
            destination=item.destination,
            error=error[:300],
        )
        log.error("outbox %d to %s failed: %s", item.id, item.destination, row.last_error)
    session.flush()
    _update_job(session, item.job_id)


def _update_job(session: Session, job_id: int) -> None:
    job = session.get(Job, job_id)
    if job is None or job.state not in (JobState.SUCCEEDED, JobState.FAILED):
        return
    rows = session.scalars(select(OutboxItem).where(OutboxItem.job_id == job_id)).all()
    if any(r.state in (OutboxState.PENDING, OutboxState.SENDING) for r in rows):
        return
    failed = [r for r in rows if r.state == OutboxState.FAILED]
    base = job.outcome.split(";")[0]
    if failed:
        dests = ", ".join(sorted({r.destination for r in failed}))
        job.state = JobState.FAILED
        job.last_error = (
            f"delivery of {len(failed)} object(s) to {dests} failed: {failed[0].last_error}"[:4000]
        )
        job.outcome = f"{base}; delivery failed"
        audit(session, "system", "job.failed", f"job:{job_id}", reason="delivery failed")
    elif rows:
        dests = ", ".join(sorted({r.destination for r in rows}))
        job.outcome = f"{base}; sent to {dests}"


def send_due(
    sessions: sessionmaker[Session],
    settings: Settings,
    *,
    owner: str = "sender",
    now: datetime | None = None,
    limit: int = 50,
) -> SendReport:
    """Send every due outbox row (one batch per destination); returns what happened."""
    now = now or utcnow()
    report = SendReport()
    items = _claim(sessions, owner, now, limit)
    if not items:
        return report
    results = Spool(results_root(settings), fsync=False)
    by_dest: dict[str, list[_Item]] = defaultdict(list)
    for item in items:
        by_dest[item.destination].append(item)
    for dest_name, batch in by_dest.items():
        with sessions() as session:
            dest = session.scalars(select(Destination).where(Destination.name == dest_name)).first()
            if dest is not None:
                session.expunge(dest)
        errors: list[str | None]
        if dest is None or not dest.enabled:
            why = "is not configured" if dest is None else "is disabled"
            errors = [f"destination {dest_name!r} {why}"] * len(batch)
            batch = [
                _Item(
                    i.id,
                    i.job_id,
                    i.destination,
                    i.sop_class_uid,
                    i.sop_instance_uid,
                    i.path,
                    i.max_attempts,
                    i.max_attempts,
                )
                for i in batch
            ]  # not retryable: fail now
        else:
            errors = _send_batch(dest, batch, results, settings)
        done = utcnow()
        with sessions.begin() as session:
            for item, error in zip(batch, errors, strict=True):
                _finish(session, item, error, settings, done, report)
    return report


def _send_batch(
    dest: Destination, batch: list[_Item], results: Spool, settings: Settings
) -> list[str | None]:
    datasets: list[Dataset | None] = []
    errors: list[str | None] = [None] * len(batch)
    for i, item in enumerate(batch):
        try:
            datasets.append(_read(results, item))
        except Exception as exc:
            datasets.append(None)
            errors[i] = f"result file {item.path} unreadable: {exc}"
    present = [(i, ds) for i, ds in enumerate(datasets) if ds is not None]
    if not present:
        return errors
    try:
        if dest.kind == "dimse":
            answers = send_dimse(
                dest, [ds for _, ds in present], calling_ae=settings.ingest.ae_title
            )
        else:
            blobs = [results.read(batch[i].path) for i, _ in present]
            answers = send_stow(dest, blobs)
    except ExportError as exc:
        answers = [str(exc)] * len(present)
    for (i, _), answer in zip(present, answers, strict=True):
        errors[i] = answer
    return errors


def result_path(settings: Settings, rel: str) -> Path:
    return results_root(settings) / rel
