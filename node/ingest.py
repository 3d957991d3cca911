"""DICOM ingest: the Storage SCP and the store both it and STOW-RS write through.

:class:`Store` is the one path into the node for an instance: size and
free-space guard, header parse and validation (:func:`node.registry.parse_instance`),
de-duplication, atomic write (:class:`node.spool.Spool`), database rows
(:func:`node.registry.record_instance`), answered with a named status constant.
Every refusal is recorded as a :class:`node.db.Rejection` row.

Order of durability: the file is written and fsynced, then the row commits,
then success is answered. A crash in between leaves a file without a row that
:func:`node.registry.reconcile_spool` records at the next start.

Duplicate policy: the same SOP Instance UID with the same data set bytes is
answered Success without a second copy; with different bytes the first copy is
kept, the new one refused with :data:`STATUS_DUPLICATE_CONFLICT` (0xC010) and
recorded as a rejection (a sender should never reuse a UID for other content).

Series checks that do not refuse an instance (rows/columns differing within a
series, a CT/MR image without ImagePositionPatient) are written to
``Series.ingest_issues``; the volume loader refuses a series with issues.

:class:`StorageSCP` runs pynetdicom with handlers bound to their dependencies:
CT, MR, US (single and multi-frame), Enhanced and Legacy Converted Enhanced
CT/MR, and Verification; uncompressed, deflated, JPEG baseline/extended/lossless,
JPEG-LS, JPEG 2000, HTJ2K and RLE transfer syntaxes stored as received. The
handler never decodes pixel data and never runs inference.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRColorImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.errors import IngestError, SpoolError
from node.registry import (
    STATUS_DOES_NOT_MATCH_SOP_CLASS,
    STATUS_DUPLICATE_CONFLICT,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    STATUS_TOO_LARGE,
    STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED,
    InstanceHeader,
    body_sha256,
    find_stored,
    parse_instance,
    reconcile_spool,
    record_instance,
    record_rejection,
)
from node.settings import IngestSettings, Settings
from node.spool import Spool

log = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES: tuple[str, ...] = tuple(
    str(uid)
    for uid in (
        CTImageStorage,
        EnhancedCTImageStorage,
        LegacyConvertedEnhancedCTImageStorage,
        MRImageStorage,
        EnhancedMRImageStorage,
        EnhancedMRColorImageStorage,
        LegacyConvertedEnhancedMRImageStorage,
        UltrasoundImageStorage,
        UltrasoundMultiFrameImageStorage,
    )
)
IMAGE_SOP_CLASSES = frozenset(ACCEPTED_SOP_CLASSES)

ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    str(uid)
    for uid in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
        HTJ2K,
        RLELossless,
    )
)


@dataclass(frozen=True)
class Outcome:
    """What :meth:`Store.accept` did with one instance and the status to answer."""

    status: int
    reason: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCESS


class Store:
    """Validate, write atomically and record one instance (shared by C-STORE and STOW-RS)."""

    def __init__(
        self,
        spool: Spool,
        sessions: sessionmaker[Session],
        *,
        max_instance_bytes: int = 2048 * 2**20,
        sop_classes: Iterable[str] = ACCEPTED_SOP_CLASSES,
        transfer_syntaxes: Iterable[str] = ACCEPTED_TRANSFER_SYNTAXES,
    ) -> None:
        self.spool = spool
        self.sessions = sessions
        self.max_instance_bytes = max_instance_bytes
        self.sop_classes = frozenset(sop_classes)
        self.transfer_syntaxes = frozenset(transfer_syntaxes)
        self._locks = [threading.Lock() for _ in range(64)]
        self._digests = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ingest-digest")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        free_bytes: Callable[[], int] | None = None,
    ) -> Store:
        spool = Spool(
            settings.spool.root,
            min_free_bytes=settings.spool.min_free_mb * 2**20,
            free_bytes=free_bytes,
            fsync=settings.spool.fsync,
        )
        return cls(spool, sessions, max_instance_bytes=settings.ingest.max_instance_mb * 2**20)

    def reconcile(self) -> int:
        """Record files a crash left without rows (run before listening)."""
        return reconcile_spool(self.sessions, self.spool, image_classes=IMAGE_SOP_CLASSES)

    def accept(
        self,
        data: bytes,
        *,
        calling_ae: str,
        channel: str,
        context_sop_class: str | None = None,
        claimed_sop_uid: str = "",
        expected_study_uid: str | None = None,
    ) -> Outcome:
        """Store one Part 10 stream ``data``; never raises, answers an :class:`Outcome`."""
        seen: dict[str, str] = {"sop_class_uid": "", "sop_instance_uid": claimed_sop_uid}
        try:
            return self._accept(
                data,
                seen,
                calling_ae=calling_ae,
                context_sop_class=context_sop_class,
                claimed_sop_uid=claimed_sop_uid,
                expected_study_uid=expected_study_uid,
            )
        except IngestError as exc:
            outcome = Outcome(
                exc.status, exc.reason, seen["sop_class_uid"], seen["sop_instance_uid"]
            )
        except SpoolError as exc:
            cause = exc.__cause__
            status = (
                STATUS_OUT_OF_RESOURCES
                if isinstance(cause, OSError) and cause.errno == errno.ENOSPC
                else STATUS_PROCESSING_FAILURE
            )
            log.error("spool write failed: %s", exc)
            outcome = Outcome(status, str(exc), seen["sop_class_uid"], seen["sop_instance_uid"])
        except SQLAlchemyError as exc:
            log.error("database error while recording an instance: %s", exc)
            outcome = Outcome(
                STATUS_PROCESSING_FAILURE,
                f"database error: {type(exc).__name__}",
                seen["sop_class_uid"],
                seen["sop_instance_uid"],
            )
        log.warning(
            "refused instance %s from %s via %s: 0x%04X %s",
            outcome.sop_instance_uid[:64] or "?",
            calling_ae,
            channel,
            outcome.status,
            outcome.reason,
        )
        record_rejection(
            self.sessions,
            channel=channel,
            calling_ae=calling_ae,
            sop_instance_uid=outcome.sop_instance_uid,
            status=outcome.status,
            reason=outcome.reason,
        )
        return outcome

    def _accept(
        self,
        data: bytes,
        seen: dict[str, str],
        *,
        calling_ae: str,
        context_sop_class: str | None,
        claimed_sop_uid: str,
        expected_study_uid: str | None,
    ) -> Outcome:
        size = len(data)
        if size > self.max_instance_bytes:
            raise IngestError(
                f"instance of {size} bytes exceeds the limit of {self.max_instance_bytes}"
                " (settings.ingest.max_instance_mb)",
                STATUS_TOO_LARGE,
            )
        if not self.spool.has_room_for(size):
            raise IngestError(
                f"spool has less than {self.spool.min_free_bytes // 2**20} MiB free"
                " (settings.spool.min_free_mb)",
                STATUS_OUT_OF_RESOURCES,
            )
        header = parse_instance(data, image_classes=IMAGE_SOP_CLASSES, digest=False)
        sop = header.sop_instance_uid
        seen.update(sop_class_uid=header.sop_class_uid, sop_instance_uid=sop)
        if header.sop_class_uid not in self.sop_classes:
            raise IngestError(
                f"instance {sop}: SOP Class {header.sop_class_uid} is not accepted",
                STATUS_SOP_CLASS_NOT_SUPPORTED,
            )
        if header.transfer_syntax_uid not in self.transfer_syntaxes:
            raise IngestError(
                f"instance {sop}: transfer syntax {header.transfer_syntax_uid} is not accepted",
                STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED,
            )
        if context_sop_class is not None and header.sop_class_uid != context_sop_class:
            raise IngestError(
                f"instance {sop}: SOP Class {header.sop_class_uid} in the data set differs"
                f" from {context_sop_class} of the presentation context",
                STATUS_DOES_NOT_MATCH_SOP_CLASS,
            )
        if claimed_sop_uid and claimed_sop_uid != sop:
            raise IngestError(
                f"SOP Instance UID {sop} in the data set differs from {claimed_sop_uid[:64]}"
                " in the request",
                STATUS_DOES_NOT_MATCH_SOP_CLASS,
            )
        if expected_study_uid is not None and header.study_uid != expected_study_uid:
            raise IngestError(
                f"instance {sop}: Study Instance UID {header.study_uid} differs from"
                f" {expected_study_uid[:64]} in the request URL",
                STATUS_DOES_NOT_MATCH_SOP_CLASS,
            )
        rel = self.spool.relpath(header.study_uid, header.series_uid, sop)
        # hashlib releases the GIL: the digest is computed while the file is written
        digest = self._digests.submit(body_sha256, data)
        with self._locks[hash(sop) % len(self._locks)]:
            for attempt in (1, 2):
                try:
                    return self._write_and_record(data, header, digest, rel, calling_ae)
                except IntegrityError:
                    if attempt == 2:
                        raise
                    log.debug("concurrent insert for %s; retrying once", sop)
        raise AssertionError("unreachable")

    def _write_and_record(
        self,
        data: bytes,
        header: InstanceHeader,
        digest: Future[str],
        rel: Path,
        calling_ae: str,
    ) -> Outcome:
        sop = header.sop_instance_uid
        with self.sessions.begin() as session:
            existing = find_stored(session, sop)
            if existing is not None and self.spool.exists(existing.path):
                if existing.sha256 == digest.result():
                    log.info("instance %s from %s already stored (identical)", sop, calling_ae)
                    return Outcome(STATUS_SUCCESS, "duplicate", header.sop_class_uid, sop, True)
                raise IngestError(
                    f"instance {sop} already stored with different content; first copy kept",
                    STATUS_DUPLICATE_CONFLICT,
                )
            self.spool.write_atomic(rel, [data])
            header = replace(header, sha256=digest.result())
            recorded = record_instance(session, header, rel, calling_ae, existing=existing)
        if recorded.reopened:
            log.info("late instance %s re-opened series %d", sop, recorded.series_id)
        return Outcome(STATUS_SUCCESS, "", header.sop_class_uid, sop)


# -- the Storage SCP ------------------------------------------------------------


@dataclass
class _AssocStats:
    calling_ae: str
    address: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes: int = 0


class AssociationLog:
    """Per-association counters, logged at release/abort (AE titles, addresses, counts only)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[int, _AssocStats] = {}

    def opened(self, assoc: Any) -> None:
        stats = _AssocStats(
            assoc.requestor.ae_title, f"{assoc.requestor.address}:{assoc.requestor.port}"
        )
        with self._lock:
            self._stats[id(assoc)] = stats

    def count(self, assoc: Any, outcome: Outcome, size: int) -> None:
        with self._lock:
            stats = self._stats.get(id(assoc))
            if stats is None:
                return
            if outcome.duplicate:
                stats.duplicates += 1
            elif outcome.ok:
                stats.stored += 1
                stats.bytes += size
            else:
                stats.refused += 1

    def closed(self, assoc: Any, how: str) -> None:
        with self._lock:
            stats = self._stats.pop(id(assoc), None)
        if stats is not None:
            log.info(
                "association from %s (%s) %s after %.1f s: %d stored (%d bytes), %d duplicate,"
                " %d refused",
                stats.calling_ae,
                stats.address,
                how,
                time.monotonic() - stats.started,
                stats.stored,
                stats.bytes,
                stats.duplicates,
                stats.refused,
            )


_PREAMBLE = b"\x00" * 128 + b"DICM"


def received_part10(event: evt.Event) -> bytes:
    """The C-STORE data set as received, behind a preamble and pynetdicom's file meta.

    Same bytes as ``event.encoded_dataset()``, with one copy of the data set
    instead of two (a 512x512 CT slice is half a megabyte).
    """
    dataset = cast(C_STORE, event.request).DataSet
    if not isinstance(dataset, BytesIO):
        return event.encoded_dataset(include_meta=True)
    with dataset.getbuffer() as view:
        return b"".join((_PREAMBLE, encode_file_meta(event.file_meta), view))


def handle_store(event: evt.Event, store: Store, assoc_log: AssociationLog) -> int:
    """C-STORE: write the data set as received (no decoding) and answer a status constant."""
    data = received_part10(event)
    outcome = store.accept(
        data,
        calling_ae=event.assoc.requestor.ae_title,
        channel="dimse",
        context_sop_class=str(event.context.abstract_syntax),
        claimed_sop_uid=str(getattr(event.request, "AffectedSOPInstanceUID", "") or ""),
    )
    assoc_log.count(event.assoc, outcome, len(data))
    return outcome.status


def handle_accepted(event: evt.Event, store: Store, assoc_log: AssociationLog) -> None:
    assoc = event.assoc
    assoc_log.opened(assoc)
    log.info(
        "association from %s (%s:%s) to %s accepted: %d contexts accepted, %d rejected",
        assoc.requestor.ae_title,
        assoc.requestor.address,
        assoc.requestor.port,
        assoc.acceptor.ae_title,
        len(assoc.accepted_contexts),
        len(assoc.rejected_contexts),
    )
    rejected = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
    if rejected:
        names = ", ".join(f"{uid} ({UID(uid).name})" for uid in rejected[:10])
        record_rejection(
            store.sessions,
            channel="association",
            calling_ae=assoc.requestor.ae_title,
            status=STATUS_SOP_CLASS_NOT_SUPPORTED,
            reason=f"presentation contexts rejected (SOP class or transfer syntax not accepted): {names}",
        )


def handle_rejected(event: evt.Event, store: Store, settings: IngestSettings) -> None:
    """Association refused by pynetdicom: record why (allow-list or association limit)."""
    requestor = event.assoc.requestor
    calling = requestor.ae_title
    allowed = [a.strip() for a in settings.allowed_calling_aes]
    if allowed and calling not in allowed:
        reason = f"calling AE title {calling!r} is not in settings.ingest.allowed_calling_aes"
    else:
        reason = (
            f"association limit reached (settings.ingest.max_associations ="
            f" {settings.max_associations})"
        )
    log.warning(
        "association from %s (%s:%s) rejected: %s",
        calling,
        requestor.address,
        requestor.port,
        reason,
    )
    record_rejection(store.sessions, channel="association", calling_ae=calling, reason=reason)


def handle_released(event: evt.Event, assoc_log: AssociationLog) -> None:
    assoc_log.closed(event.assoc, "released")


def handle_aborted(event: evt.Event, assoc_log: AssociationLog) -> None:
    assoc_log.closed(event.assoc, "aborted")


class StorageSCP:
    """The node's DICOM listener. ``start()`` returns the bound port; ``stop()`` drains."""

    def __init__(self, settings: IngestSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.assoc_log = AssociationLog()
        self._server: ThreadedAssociationServer | None = None
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_associations = settings.max_associations
        ae.maximum_pdu_size = settings.max_pdu
        ae.require_calling_aet = list(settings.allowed_calling_aes)
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        for sop_class in store.sop_classes:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        self.ae = ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    def start(self, port: int | None = None) -> int:
        """Listen (non-blocking) on settings.host:port (``port`` overrides); return the port."""
        handlers: list[Any] = [
            (evt.EVT_C_STORE, handle_store, [self.store, self.assoc_log]),
            (evt.EVT_ACCEPTED, handle_accepted, [self.store, self.assoc_log]),
            (evt.EVT_REJECTED, handle_rejected, [self.store, self.settings]),
            (evt.EVT_RELEASED, handle_released, [self.assoc_log]),
            (evt.EVT_ABORTED, handle_aborted, [self.assoc_log]),
        ]
        address = (self.settings.host, self.settings.port if port is None else port)
        server = self.ae.start_server(address, block=False, evt_handlers=handlers)
        if server is None:  # pragma: no cover - block=False always returns the server
            raise RuntimeError("pynetdicom did not return a server")
        self._server = server
        log.info("storage SCP %s listening on %s:%d", self.settings.ae_title, address[0], self.port)
        return self.port

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let associations in flight finish (up to ``timeout``), then abort."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.shutdown()  # stops the accept loop and closes the listening socket
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = [a for a in server.active_associations if a.is_alive()]
            if not active:
                break
            time.sleep(0.05)
        for assoc in server.active_associations:
            log.warning("aborting association from %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        log.info("storage SCP %s stopped", self.settings.ae_title)
