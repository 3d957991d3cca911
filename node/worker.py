"""Workers: claim a job, run its pipeline, store the results, queue them for export.

One :class:`Worker` is a thread with a loop: claim (``node.queue``), run the
pipeline with a heartbeat thread renewing the lease, write every result object
atomically into the results store (``<spool>-results/<series>/<sop>.dcm``;
deterministic UIDs make a re-run overwrite the same file), then in one
transaction mark the job SUCCEEDED and upsert one outbox row per object and
destination. A re-run of the same job therefore replaces its outbox rows
rather than adding new ones, and the PACS receives the same SOP Instance UIDs.

Stopping (:meth:`Worker.stop`): the loop stops claiming; a job in progress is
abandoned at its next heartbeat check and released (QUEUED again, attempt not
counted) unless ``drain`` lets it finish.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node import pipelines, queue
from node.db import Instance, Job, OutboxItem, OutboxState, Series, Study, audit, utcnow
from node.errors import NodeError, PipelineError, QueueError
from node.settings import Settings
from node.spool import Spool

log = logging.getLogger(__name__)


def results_root(settings: Settings) -> Path:
    """Where result objects are written (beside the spool, never inside it)."""
    root = Path(settings.spool.root).resolve()
    return root.with_name(root.name + "-results")


def worker_id(index: int = 0) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{index}:{uuid.uuid4().hex[:6]}"


class _Abandon(Exception):
    """The job must stop now (lease lost or the worker is stopping)."""


def dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file; a data set without a transfer syntax gets Explicit VR LE."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        meta = meta if meta is not None else FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _header_values(path: Path | None) -> dict[str, Any]:
    """The first instance's StudyDate/Time, age, birth date and sex (never logged)."""
    if path is None:
        return {}
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    keys = ("StudyDate", "StudyTime", "PatientAge", "PatientBirthDate", "PatientSex")
    return {k: str(ds.get(k, "") or "") for k in keys}


def _clinical_loader(
    sessions: sessionmaker[Session], settings: Settings, study: dict[str, Any]
) -> Any:
    def load(headers: Mapping[str, Any] | None = None) -> Any:
        """``headers``: the loaded volume's DICOM headers (StudyTime, age, sex);
        without them the first instance's header is read."""
        try:
            from node.clinical.linking import context_for_study

            if headers is None:
                headers = _header_values(study.get("first_file"))
            with sessions() as session:
                row = session.get(Study, study["study_id"])
                if row is None:
                    raise QueueError(f"study {study['study_id']} not found")
                ctx, problems = context_for_study(session, row, settings.clinical, headers=headers)
                session.commit()  # FHIR results are stored
            for problem in problems:
                log.warning("clinical context: %s", problem)
            return ctx
        except Exception as exc:  # clinical data is optional: the model runs without it
            log.warning("clinical context unavailable: %s", exc)
            return None

    return load


def run_one(
    sessions: sessionmaker[Session],
    settings: Settings,
    claim: queue.Claim,
    *,
    stop: threading.Event | None = None,
) -> str:
    """Run one claimed job to its next state; returns the state reached."""
    stop = stop or threading.Event()
    lost = threading.Event()
    spool = Spool(settings.spool.root, fsync=True)
    results = Spool(results_root(settings), fsync=True)
    with sessions() as session:
        series = session.get(Series, claim.series_id)
        if series is None:
            raise QueueError(f"job {claim.job_id}: series {claim.series_id} not found")
        paths = [
            spool.abspath(p)
            for p in session.scalars(
                select(Instance.path).where(Instance.series_id == series.id).order_by(Instance.id)
            )
        ]
        study: dict[str, Any] = {
            "study_id": series.study.id,
            "patient_id": series.study.patient_id,
            "issuer": series.study.issuer_of_patient_id,
            "accession_number": series.study.accession_number,
            "study_date": series.study.study_date,
        }
        series_uid, study_uid = series.series_instance_uid, series.study.study_instance_uid
        study["first_file"] = paths[0] if paths else None
        modality = series.modality

    def beat() -> None:
        if lost.is_set() or stop.is_set():
            raise _Abandon()

    def heartbeat_loop() -> None:
        while not done.wait(settings.workers.heartbeat_s):
            try:
                queue.heartbeat(sessions, claim, settings.workers.lease_s)
            except QueueError as exc:
                log.error("%s", exc)
                lost.set()
                return
            except Exception as exc:  # database hiccup: try again next beat
                log.warning("job %d: heartbeat failed: %s", claim.job_id, exc)

    done = threading.Event()
    hb = threading.Thread(target=heartbeat_loop, name=f"hb-{claim.job_id}", daemon=True)
    hb.start()
    try:
        try:
            spec = pipelines.get(claim.pipeline)
            version = claim.pipeline_version or spec.version
            missing = [p for p in paths if not p.is_file()]
            if not paths:
                raise PipelineError("the series has no stored instances")
            if missing:
                raise PipelineError(
                    f"{len(missing)} instance file(s) of the series are missing from the spool"
                    " (purged by retention?)"
                )
            ctx = pipelines.JobContext(
                job_id=claim.job_id,
                attempt=claim.attempt,
                series_uid=series_uid,
                study_uid=study_uid,
                modality=modality,
                generation=claim.series_generation,
                pipeline_version=version,
                instance_paths=paths,
                settings=settings,
                study=study,
                clinical_loader=_clinical_loader(sessions, settings, study),
                heartbeat=beat,
                progress=lambda msg: _progress(sessions, claim, msg),
            )
            log.info(
                "job %d: %s on %d instance(s), attempt %d",
                claim.job_id,
                claim.pipeline,
                len(paths),
                claim.attempt,
            )
            result = spec.run(ctx)
            beat()
            written = []
            for kind, ds in result.outputs:
                rel = Path(series_uid) / f"{ds.SOPInstanceUID}.dcm"
                results.write_atomic(rel, [dataset_bytes(ds)])
                written.append((kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(rel)))
            beat()
        except _Abandon:
            if lost.is_set():
                log.warning("job %d abandoned: lease lost", claim.job_id)
                return "lost"
            queue.release(sessions, claim)
            return "released"
        except PipelineError as exc:
            return queue.fail(
                sessions, claim, str(exc), retryable=False, backoff_s=settings.workers.backoff_s
            ).value
        except NodeError as exc:
            return queue.fail(
                sessions, claim, str(exc), retryable=True, backoff_s=settings.workers.backoff_s
            ).value
        except Exception as exc:  # transient by default: retried with backoff
            log.exception("job %d: unexpected error", claim.job_id)
            return queue.fail(
                sessions,
                claim,
                f"{type(exc).__name__}: {exc}",
                retryable=True,
                backoff_s=settings.workers.backoff_s,
            ).value
        with sessions.begin() as session:
            destinations = list(claim.destinations)
            outcome = result.outcome
            current = session.get(Series, claim.series_id)
            if (
                current is not None
                and current.generation != claim.series_generation
                and settings.scheduler.late_instances == "reopen"
            ):
                # late instances re-opened the series while this ran: the next
                # generation's job replaces these results, so none is sent
                destinations = []
                outcome += (
                    f"; superseded by generation {current.generation} of the series, not sent"
                )
            if written and destinations:
                outcome += f"; delivery to {', '.join(destinations)} pending"
            elif written and "superseded" not in outcome:
                outcome += "; no destination configured"
            summary = dict(result.summary)
            summary["objects"] = [{"kind": k, "sop_instance_uid": u} for k, _, u, _ in written]
            job = queue.succeed(session, claim, outcome, summary)
            _upsert_outbox(session, job, written, destinations, settings)
        log.info("job %d succeeded: %s", claim.job_id, outcome)
        return "succeeded"
    finally:
        done.set()


def _progress(sessions: sessionmaker[Session], claim: queue.Claim, message: str) -> None:
    """Log a pipeline stage and show it in the running job's outcome (admins, demo)."""
    log.info("job %d: %s", claim.job_id, message)
    try:
        with sessions.begin() as session:
            job = session.scalars(
                select(Job).where(Job.id == claim.job_id, Job.lease_owner == claim.owner)
            ).first()
            if job is not None:
                job.outcome = f"running: {message}"[:200]
    except Exception as exc:  # progress is informative only
        log.debug("job %d: progress not recorded: %s", claim.job_id, exc)


def _upsert_outbox(
    session: Session,
    job: Job,
    written: list[tuple[str, str, str, str]],
    destinations: list[str],
    settings: Settings,
) -> None:
    now = utcnow()
    for dest in destinations:
        for kind, sop_class, sop_uid, rel in written:
            item = session.scalars(
                select(OutboxItem).where(
                    OutboxItem.destination == dest, OutboxItem.sop_instance_uid == sop_uid
                )
            ).first()
            if item is None:
                item = OutboxItem(destination=dest, sop_instance_uid=sop_uid)
                session.add(item)
            item.job_id = job.id
            item.kind, item.sop_class_uid, item.path = kind, sop_class, rel
            item.state = OutboxState.PENDING
            item.attempts = 0
            item.max_attempts = settings.export.max_attempts
            item.next_attempt_at = now
            item.lease_owner = None
            item.lease_expires_at = None
            item.last_error = ""
    if written:
        audit(session, "system", "result.created", f"job:{job.id}", objects=len(written))


class Worker:
    """One worker thread: claims and runs jobs until stopped."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        *,
        index: int = 0,
        poll_s: float = 0.5,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.owner = worker_id(index)
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.jobs_run = 0
        self.current: queue.Claim | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"worker-{self.owner}", daemon=True)
        self._thread.start()

    def run(self) -> None:
        log.info("worker %s started", self.owner)
        while not self._stop.is_set():
            try:
                claim = queue.claim(self.sessions, self.owner, self.settings.workers.lease_s)
            except Exception as exc:
                log.error("worker %s: cannot claim: %s", self.owner, exc)
                self._stop.wait(max(self.poll_s, 2.0))
                continue
            if claim is None:
                self._stop.wait(self.poll_s)
                continue
            self.current = claim
            try:
                run_one(self.sessions, self.settings, claim, stop=self._stop)
            except Exception:
                log.exception("worker %s: job %d", self.owner, claim.job_id)
            finally:
                self.current = None
            self.jobs_run += 1
        log.info("worker %s stopped", self.owner)

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming; give back a job still running after ``timeout`` (no attempt burnt)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        claim = self.current
        if claim is not None:
            try:
                queue.release(self.sessions, claim)
            except Exception as exc:
                log.error("worker %s: could not release job %d: %s", self.owner, claim.job_id, exc)
