"""Reading a model's results (SEG, SR) and their studies back from a PACS: DICOMweb
(QIDO-RS + WADO-RS) or DIMSE C-GET.

QIDO-RS finds the series of each study; WADO-RS retrieves every instance as
``application/dicom``. Files are laid out as an evaluation results folder
(:mod:`models.evaluation.dataset`): SEGs under ``masks/<case>/``, SRs under
``sr/<case>/``, image series under ``images/<case>/``.
"""

from __future__ import annotations

import logging
import re
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
