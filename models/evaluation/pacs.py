"""Reading a model's results (SEG, SR) and their studies back from a PACS over DICOMweb.

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
