"""Reading a model's results (SEG, SR) and their studies back from a PACS: DICOMweb
(QIDO-RS + WADO-RS), DIMSE C-GET or DIMSE C-MOVE.

QIDO-RS finds the series of each study; WADO-RS retrieves every instance as
``application/dicom``. C-GET receives the instances on its own association;
C-MOVE asks the PACS to send them to a temporary Storage SCP of ours
(:func:`cmove_results`). Files are laid out as an evaluation results folder
(:mod:`models.evaluation.dataset`): SEGs under ``masks/<case>/``, SRs under
``sr/<case>/``, image series under ``images/<case>/``.

Every failure (an unreachable PACS, a refused association, a failed retrieve,
an instance that did not arrive) is a :class:`PacsFetchError` naming the study.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom

log = logging.getLogger(__name__)

SEG_MODALITY = "SEG"
SR_MODALITY = "SR"


class PacsFetchError(RuntimeError):
    """The PACS could not be queried or an object could not be retrieved."""


@dataclass(frozen=True)
class FetchedStudy:
    case_id: str
    study_uid: str
    n_seg: int
    n_sr: int
    n_image: int
    n_other: int = 0  # e.g. encapsulated PDF (C-MOVE: every instance of the study arrives)


def _multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if m is None:
        raise PacsFetchError(f"WADO-RS answer is not multipart: {content_type!r}")
    delim = b"--" + m.group(1).encode()
    parts: list[bytes] = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        _head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


class DicomWebClient:
    """A small QIDO-RS / WADO-RS client (``base`` is the DICOMweb root, e.g.
    ``http://127.0.0.1:8042/dicom-web``)."""

    def __init__(
        self, base: str, *, timeout: float = 60.0, auth: tuple[str, str] | None = None
    ) -> None:
        self._base = base.rstrip("/")
        self._http = httpx.Client(timeout=timeout, auth=auth)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, accept: str) -> httpx.Response:
        url = f"{self._base}/{path}"
        try:
            resp = self._http.get(url, headers={"Accept": accept})
        except httpx.HTTPError as exc:
            raise PacsFetchError(f"cannot reach the PACS at {self._base}: {exc}") from exc
        if resp.status_code != 200:
            raise PacsFetchError(f"GET {path} answered HTTP {resp.status_code}")
        return resp

    def series(self, study_uid: str) -> list[tuple[str, str]]:
        """(SeriesInstanceUID, Modality) of every series in the study (QIDO-RS)."""
        resp = self._get(f"studies/{study_uid}/series", "application/dicom+json")
        out = []
        for item in resp.json():
            uid = item.get("0020000E", {}).get("Value", [""])[0]
            modality = item.get("00080060", {}).get("Value", [""])[0]
            out.append((str(uid), str(modality)))
        return out

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[pydicom.Dataset]:
        resp = self._get(
            f"studies/{study_uid}/series/{series_uid}",
            'multipart/related; type="application/dicom"; transfer-syntax=*',
        )
        from io import BytesIO

        return [
            pydicom.dcmread(BytesIO(p))
            for p in _multipart_parts(resp.headers.get("content-type", ""), resp.content)
        ]


def fetch_results(
    client: DicomWebClient, studies: dict[str, str], dest: Path, *, images: bool = True
) -> list[FetchedStudy]:
    """Fetch the SEG and SR series (and, with ``images``, the image series) of each study
    (``case_id -> StudyInstanceUID``) into an evaluation results folder ``dest``."""
    fetched: list[FetchedStudy] = []
    for case_id, study_uid in studies.items():
        counts = {SEG_MODALITY: 0, SR_MODALITY: 0, "image": 0}
        for series_uid, modality in client.series(study_uid):
            if modality == SEG_MODALITY:
                folder, kind = dest / "masks" / case_id, SEG_MODALITY
            elif modality == SR_MODALITY:
                folder, kind = dest / "sr" / case_id, SR_MODALITY
            elif images and modality in ("CT", "MR"):
                folder, kind = dest / "images" / case_id, "image"
            else:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            for ds in client.retrieve_series(study_uid, series_uid):
                ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
                counts[kind] += 1
        log.info(
            "fetched %d SEG, %d SR, %d image instances for case %s",
            counts[SEG_MODALITY],
            counts[SR_MODALITY],
            counts["image"],
            case_id,
        )
        fetched.append(
            FetchedStudy(
                case_id, study_uid, counts[SEG_MODALITY], counts[SR_MODALITY], counts["image"]
            )
        )
    return fetched


# ---------------------------------------------------------------------------
# DIMSE C-GET


@dataclass(frozen=True)
class DimsePeer:
    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> DimsePeer:
        """``HOST:PORT:AET`` (e.g. ``127.0.0.1:4242:ORTHANC``)."""
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
            raise PacsFetchError(f"PACS {text!r} is not HOST:PORT:AET")
        return cls(parts[0], int(parts[1]), parts[2])


def _storage_classes() -> list[str]:
    from pydicom.uid import (
        ComprehensiveSRStorage,
        CTImageStorage,
        EnhancedCTImageStorage,
        EnhancedMRImageStorage,
        EnhancedSRStorage,
        MRImageStorage,
        SegmentationStorage,
    )

    return [
        CTImageStorage,
        MRImageStorage,
        EnhancedCTImageStorage,
        EnhancedMRImageStorage,
        SegmentationStorage,
        EnhancedSRStorage,
        ComprehensiveSRStorage,
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        "1.2.840.10008.5.1.4.1.1.30",  # Parametric map (fractional results)
    ]


def cget_results(
    peer: DimsePeer,
    studies: dict[str, str],
    dest: Path,
    *,
    calling_aet: str = "HPBEVAL",
    images: bool = True,
    timeout: float = 60.0,
) -> list[FetchedStudy]:
    """Fetch each study with C-GET (study root) into an evaluation results folder; the
    instances arrive as C-STOREs on the same association and are laid out by modality."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

    fetched: list[FetchedStudy] = []
    for case_id, study_uid in studies.items():
        counts = {SEG_MODALITY: 0, SR_MODALITY: 0, "image": 0}

        def on_store(event: evt.Event, case: str = case_id, n: dict[str, int] = counts) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            modality = str(getattr(ds, "Modality", ""))
            if modality == SEG_MODALITY:
                folder, kind = dest / "masks" / case, SEG_MODALITY
            elif modality == SR_MODALITY:
                folder, kind = dest / "sr" / case, SR_MODALITY
            elif images:
                folder, kind = dest / "images" / case, "image"
            else:
                return 0x0000
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            n[kind] += 1
            return 0x0000

        ae = AE(ae_title=calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        roles: list[Any] = []
        for uid in _storage_classes():
            ae.add_requested_context(uid)
            roles.append(build_role(uid, scp_role=True))
        assoc = ae.associate(
            peer.host, peer.port, ae_title=peer.ae_title, ext_neg=roles,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )  # fmt: skip
        if not assoc.is_established:
            raise PacsFetchError(
                f"association with {peer.ae_title} at {peer.host}:{peer.port} was not accepted"
            )
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        final = None
        try:
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                if status is not None and "Status" in status:
                    final = int(status.Status)
        finally:
            assoc.release()
        if final is None or final not in (0x0000, 0xB000):
            code = "no answer" if final is None else f"status 0x{final:04X}"
            raise PacsFetchError(f"C-GET of study for case {case_id} failed ({code})")
        fetched.append(
            FetchedStudy(
                case_id, study_uid, counts[SEG_MODALITY], counts[SR_MODALITY], counts["image"]
            )
        )
    return fetched


# ---------------------------------------------------------------------------
# DIMSE C-MOVE

# C-MOVE (PS3.4 C.4.2.1.5) and C-STORE (PS3.4 B.2.3) statuses used here
MOVE_SUCCESS = 0x0000
MOVE_PENDING = 0xFF00
MOVE_SUBOPERATIONS_FAILED = 0xB000  # warning: one or more sub-operations failed
MOVE_DESTINATION_UNKNOWN = 0xA801
STORE_SUCCESS = 0x0000
STORE_OUT_OF_RESOURCES = 0xA700
STORE_CANNOT_UNDERSTAND = 0xC000
STORE_NOT_REQUESTED = 0xC001  # an instance of no study being moved

#: What the temporary Storage SCP accepts.
MOVE_STORAGE_CLASSES: tuple[str, ...] = (
    pydicom.uid.CTImageStorage,
    pydicom.uid.EnhancedCTImageStorage,
    pydicom.uid.MRImageStorage,
    pydicom.uid.EnhancedMRImageStorage,
    pydicom.uid.UltrasoundImageStorage,
    pydicom.uid.UltrasoundMultiFrameImageStorage,
    pydicom.uid.EnhancedUSVolumeStorage,
    pydicom.uid.SegmentationStorage,
    pydicom.uid.ParametricMapStorage,
    pydicom.uid.BasicTextSRStorage,
    pydicom.uid.EnhancedSRStorage,
    pydicom.uid.ComprehensiveSRStorage,
    pydicom.uid.Comprehensive3DSRStorage,
    pydicom.uid.EncapsulatedPDFStorage,
)
MOVE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
    pydicom.uid.JPEGBaseline8Bit,
    pydicom.uid.JPEGExtended12Bit,
    pydicom.uid.JPEGLossless,
    pydicom.uid.JPEGLosslessSV1,
    pydicom.uid.JPEGLSLossless,
    pydicom.uid.JPEGLSNearLossless,
    pydicom.uid.JPEG2000Lossless,
    pydicom.uid.JPEG2000,
    pydicom.uid.RLELossless,
)
IMAGE_MODALITIES = frozenset({"CT", "MR", "US"})

_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # default character repertoire, no "\"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class MoveDestination:
    """Our temporary Storage SCP for C-MOVE: its AE title (also the move destination,
    so the PACS must know it as a DICOM modality at ``host:port``) and where it listens.
    Port 0 takes a free port when the SCP starts (the PACS must then learn it at run
    time, e.g. Orthanc's ``PUT /modalities/{id}``)."""

    ae_title: str = "HPBEVAL"
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        if not _AE_TITLE.fullmatch(self.ae_title) or not self.ae_title.strip():
            raise PacsFetchError(
                f"move destination AE title {self.ae_title!r}: 1 to 16 printable characters, "
                "not only spaces, no backslash"
            )
        if not 0 <= self.port <= 65535:
            raise PacsFetchError(f"move destination port {self.port}: must be 0 to 65535")


class _MoveSink:
    """Where the instances of the study being moved go; bound to the C-STORE handler,
    which runs on the SCP's thread."""

    def __init__(self, dest: Path, images: bool) -> None:
        self.dest = dest
        self.images = images
        self.lock = threading.Lock()
        self.case_id = ""
        self.study_uid = ""
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []

    def expect(self, case_id: str, study_uid: str) -> None:
        with self.lock:
            self.case_id, self.study_uid = case_id, study_uid
            self.counts = {SEG_MODALITY: 0, SR_MODALITY: 0, "image": 0, "other": 0, "skipped": 0}
            self.errors = []

    def done(self) -> tuple[dict[str, int], list[str]]:
        with self.lock:
            counts, errors = dict(self.counts), list(self.errors)
            self.case_id = self.study_uid = ""
        return counts, errors


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` through a hidden temporary file in the same folder and a rename:
    a reader sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _handle_store(event: Any, sink: _MoveSink) -> int:
    """C-STORE sent by the PACS for a C-MOVE: check the instance belongs to the study
    being moved, write it as received (the PACS's encoding, not re-encoded) under the
    case's folder, count it, answer a status."""
    try:
        ds = event.dataset
        study_uid = str(ds.StudyInstanceUID)
        sop_uid = str(ds.SOPInstanceUID)
        modality = str(ds.get("Modality", ""))
    except Exception as exc:  # pydicom raises several types for an undecodable dataset
        log.warning("C-STORE refused: the dataset cannot be read: %s", exc)
        return STORE_CANNOT_UNDERSTAND
    with sink.lock:
        case = sink.case_id
        if not case or study_uid != sink.study_uid or not _UID.fullmatch(sop_uid):
            log.warning("C-STORE refused: instance %s is not of the study being moved", sop_uid)
            return STORE_NOT_REQUESTED
    folder: Path | None
    if modality == SEG_MODALITY:
        kind, folder = SEG_MODALITY, sink.dest / "masks" / case
    elif modality == SR_MODALITY:
        kind, folder = SR_MODALITY, sink.dest / "sr" / case
    elif modality in IMAGE_MODALITIES:
        kind, folder = ("image", sink.dest / "images" / case) if sink.images else ("skipped", None)
    else:
        kind, folder = "other", sink.dest / "other" / case
    if folder is not None:
        try:
            _write_atomically(folder / f"{sop_uid}.dcm", event.encoded_dataset())
        except OSError as exc:
            log.error("C-STORE of instance %s: cannot write it: %s", sop_uid, exc)
            with sink.lock:
                sink.errors.append(f"instance {sop_uid}: {exc}")
            return STORE_OUT_OF_RESOURCES
    with sink.lock:
        sink.counts[kind] += 1
    return STORE_SUCCESS


def _status_text(code: int) -> str:
    from pynetdicom.status import QR_MOVE_SERVICE_CLASS_STATUS, code_to_category

    category, text = QR_MOVE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))
    return f"status 0x{code:04X} ({category}{': ' + text if text else ''})"


class MoveReceiver:
    """A Storage SCP that runs while the ``with`` block does, and the C-MOVE SCU that
    asks the PACS to send studies to it (Study Root, STUDY level)::

        with MoveReceiver(MoveDestination("HPBEVAL", "127.0.0.1", 11113), dest) as rx:
            rx.move(peer, "case1", study_uid)      # -> FetchedStudy

    Every failure is a :class:`PacsFetchError` naming the study."""

    def __init__(
        self,
        destination: MoveDestination,
        dest: Path,
        *,
        images: bool = True,
        timeout: float = 60.0,
    ) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

        self.destination = destination
        self._model = StudyRootQueryRetrieveInformationModelMove
        self._sink = _MoveSink(Path(dest), images)
        self._ae = AE(ae_title=destination.ae_title)
        self._ae.acse_timeout = self._ae.dimse_timeout = self._ae.network_timeout = timeout
        for uid in MOVE_STORAGE_CLASSES:
            self._ae.add_supported_context(uid, list(MOVE_TRANSFER_SYNTAXES))
        self._ae.add_requested_context(self._model)
        self._server: Any = None
        self._timeout = timeout
        self.port = destination.port

    def __enter__(self) -> MoveReceiver:
        from pynetdicom import evt

        where = f"{self.destination.host}:{self.destination.port}"
        try:
            self._server = self._ae.start_server(
                (self.destination.host, self.destination.port),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, _handle_store, [self._sink])],
            )
        except OSError as exc:
            raise PacsFetchError(
                f"cannot listen at {where} as {self.destination.ae_title} for C-MOVE: {exc}"
            ) from exc
        self.port = int(self._server.server_address[1])
        log.info(
            "storage SCP %s listening on %s:%d for C-MOVE",
            self.destination.ae_title,
            self.destination.host,
            self.port,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._ae.shutdown()

    def move(self, peer: DimsePeer, case_id: str, study_uid: str) -> FetchedStudy:
        """C-MOVE one study to this SCP; return what arrived, laid out by modality."""
        if self._server is None:
            raise PacsFetchError("MoveReceiver.move() outside its with block (SCP not running)")
        where = f"study {study_uid} (case {case_id})"
        self._sink.expect(case_id, study_uid)
        final: pydicom.Dataset | None = None
        pacs = f"{peer.ae_title} at {peer.host}:{peer.port}"
        try:
            try:  # a plain TCP probe first: a clear reason, and no socket left by pynetdicom
                socket.create_connection((peer.host, peer.port), timeout=self._timeout).close()
            except OSError as exc:
                raise PacsFetchError(
                    f"C-MOVE of {where}: cannot connect to {pacs}: {exc.strerror or exc}"
                ) from exc
            assoc = self._ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
            if not assoc.is_established:
                how = "rejected" if assoc.is_rejected else "did not accept"
                raise PacsFetchError(
                    f"C-MOVE of {where}: {pacs} {how} the association "
                    f"(does it allow C-MOVE from AE title {self.destination.ae_title}?)"
                )
            query = pydicom.Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = study_uid
            try:
                for status, _ in assoc.send_c_move(query, self.destination.ae_title, self._model):
                    if status is not None and "Status" in status:
                        final = status
            except (ValueError, RuntimeError) as exc:  # pynetdicom: request not sendable
                raise PacsFetchError(f"C-MOVE of {where} could not be sent: {exc}") from exc
            finally:
                if assoc.is_established:
                    assoc.release()
        finally:
            counts, errors = self._sink.done()
        return self._checked(peer, case_id, study_uid, final, counts, errors)

    def _checked(
        self,
        peer: DimsePeer,
        case_id: str,
        study_uid: str,
        final: pydicom.Dataset | None,
        counts: dict[str, int],
        errors: list[str],
    ) -> FetchedStudy:
        where = f"study {study_uid} (case {case_id})"
        if final is None or int(final.Status) == MOVE_PENDING:
            d = self.destination
            raise PacsFetchError(
                f"C-MOVE of {where}: no final answer from {peer.ae_title} (association "
                f"aborted or timed out); does the PACS know AE title {d.ae_title} as a DICOM "
                f"modality allowed to C-MOVE, at host {d.host}, port {self.port}?"
            )
        code = int(final.Status)
        completed, failed, warned = (
            int(final.get(k) or 0)
            for k in (
                "NumberOfCompletedSuboperations",
                "NumberOfFailedSuboperations",
                "NumberOfWarningSuboperations",
            )
        )
        subops = f"{completed} sub-operations completed, {failed} failed, {warned} with a warning"
        # instances that arrived but could not be written here (disk full, permissions)
        local = f"; not written here: {'; '.join(errors[:3])}" if errors else ""
        if code == MOVE_DESTINATION_UNKNOWN:
            d = self.destination
            raise PacsFetchError(
                f"C-MOVE of {where}: {peer.ae_title} does not know the move destination "
                f"{d.ae_title!r}; declare it on the PACS as a DICOM modality "
                f"(AE title {d.ae_title}, host {d.host}, port {self.port})"
            )
        if code not in (MOVE_SUCCESS, MOVE_SUBOPERATIONS_FAILED):
            d = self.destination
            hint = (
                "; the PACS's log says why: often a study it does not hold, or a move "
                f"destination it does not know (declare AE title {d.ae_title}, host {d.host}, "
                f"port {self.port} as a DICOM modality)"
                if completed == 0 and not errors
                else ""
            )
            raise PacsFetchError(
                f"C-MOVE of {where} failed: {_status_text(code)}; {subops}{local}{hint}"
            )
        if failed or warned or code == MOVE_SUBOPERATIONS_FAILED or errors:
            raise PacsFetchError(
                f"C-MOVE of {where} incomplete: {_status_text(code)}; {subops}{local}"
            )
        received = sum(counts.values())
        if received == 0:
            raise PacsFetchError(
                f"C-MOVE of {where}: {peer.ae_title} sent no instance "
                f"({_status_text(code)}; {subops}); does the PACS hold this study?"
            )
        if received < completed:
            raise PacsFetchError(
                f"C-MOVE of {where}: {peer.ae_title} reports {completed} instances sent, "
                f"{received} arrived"
            )
        log.info(
            "C-MOVE case %s: %d SEG, %d SR, %d image, %d other instances",
            case_id,
            counts[SEG_MODALITY],
            counts[SR_MODALITY],
            counts["image"],
            counts["other"],
        )
        return FetchedStudy(
            case_id,
            study_uid,
            counts[SEG_MODALITY],
            counts[SR_MODALITY],
            counts["image"],
            counts["other"],
        )


def cmove_results(
    peer: DimsePeer,
    studies: dict[str, str],
    dest: Path,
    *,
    destination: MoveDestination,
    images: bool = True,
    timeout: float = 60.0,
) -> list[FetchedStudy]:
    """Fetch each study (``case_id -> StudyInstanceUID``) with C-MOVE into an evaluation
    results folder ``dest``: a Storage SCP (:class:`MoveReceiver`) runs for the call,
    the PACS sends each study to it, instances are written atomically by modality
    (SEG ``masks/<case>/``, SR ``sr/<case>/``, CT/MR/US ``images/<case>/``, anything
    else ``other/<case>/``)."""
    with MoveReceiver(destination, dest, images=images, timeout=timeout) as rx:
        return [rx.move(peer, case_id, uid) for case_id, uid in studies.items()]
