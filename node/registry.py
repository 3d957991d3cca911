"""What the node knows about received instances: header parsing and database rows.

:func:`parse_instance` reads the few attributes the node needs from the bytes
of a DICOM file (no pixel decoding) and checks the structure a loader relies
on; :func:`record_instance` creates or updates the Study, Series and Instance
rows; :func:`reconcile_spool` re-records files a crash left without a row.

A late instance for a series that is COMPLETE (or PURGED) sets it back to
RECEIVING and increments ``Series.generation``; the stability sweep decides
what the new completion means (``settings.scheduler.late_instances``).
"""

from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, Literal, cast

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from sqlalchemy import Connection, Table, bindparam, case, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db import Instance, Rejection, Series, SeriesState, Study, utcnow
from node.errors import IngestError, SpoolError
from node.spool import Spool, is_valid_uid

log = logging.getLogger(__name__)

# -- DICOM status codes answered by ingest (C-STORE and STOW-RS FailureReason) ----
STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110  # the node could not store it (database, disk error)
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700  # spool below settings.spool.min_free_mb
STATUS_TOO_LARGE = 0xA701  # instance above settings.ingest.max_instance_mb
STATUS_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # missing pixel data, class differs from context
STATUS_CANNOT_UNDERSTAND = 0xC000  # not parseable DICOM
STATUS_INVALID_UID = 0xC001  # a required UID is missing or not of the UID grammar
STATUS_TRUNCATED = 0xC002  # pixel data shorter than the header says
STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC003
STATUS_DUPLICATE_CONFLICT = 0xC010  # same SOP Instance UID, other content: first kept

_SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of one instance the node records (no pixel data)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    size: int
    sha256: str  # of the data set after the file meta (what the sender encoded)
    modality: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""
    series_description: str = ""
    body_part_examined: str = ""
    image_type: str = ""
    slice_thickness: float | None = None
    rows: int | None = None
    columns: int | None = None
    has_pixel_data: bool = False
    has_position: bool = False


def _raw(ds: Dataset, keyword: str) -> str:
    """An element's value as its bytes say, without pydicom's conversion and validation
    (whose warnings quote values, e.g. a patient ID, into logs)."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return ""
    elem = ds.get_item(tag)
    value = elem.value if elem is not None else None
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        try:
            return value.decode("utf-8").strip(" \x00")
        except UnicodeDecodeError:
            return value.decode("latin-1").strip(" \x00")
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip(" \x00")


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    return _raw(ds, keyword)[:limit]


def _number(ds: Dataset, keyword: str) -> float | None:
    text = _raw(ds, keyword).split("\\")[0].strip()
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    return _raw(ds, keyword)


def slice_thickness_of(ds: Dataset) -> float | None:
    """SliceThickness at the top level, or, for Enhanced (multi-frame) objects, from the
    shared or first per-frame Pixel Measures functional group, where they keep it."""
    top = _number(ds, "SliceThickness")
    if top is not None:
        return top
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(keyword)
        if not groups:
            continue
        measures = groups[0].get("PixelMeasuresSequence")
        if measures:
            value = _number(measures[0], "SliceThickness")
            if value is not None:
                return value
    return None


def body_offset(data: bytes) -> int | None:
    """Offset of the data set after a Part 10 preamble and file meta group (None if absent)."""
    if len(data) < 144 or data[128:132] != b"DICM":
        return None
    if data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        return None
    (group_length,) = struct.unpack("<I", data[140:144])
    offset = 144 + group_length
    return offset if offset <= len(data) else None


_VRS_LONG_LENGTH = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_DEFER_BYTES = 4096

_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN"
    b" UR US UT UV".split()
)


def _check_encoding(body: bytes, transfer_syntax: UID) -> None:
    """Refuse a data set whose first element is not encoded as the transfer syntax says.

    pydicom would silently switch to the encoding it finds (and the file on disk
    would then contradict its own meta), so the node checks before parsing.
    """
    if transfer_syntax.is_deflated or len(body) < 8:
        return
    little = transfer_syntax.is_little_endian
    group = int.from_bytes(body[0:2], "little" if little else "big")
    looks_explicit = body[4:6] in _VRS
    if not 0x0004 <= group <= 0x7FE0 or looks_explicit != (not transfer_syntax.is_implicit_VR):
        raise IngestError(
            f"data set is not encoded as its transfer syntax {transfer_syntax}"
            f" ({transfer_syntax.name}) says",
            STATUS_CANNOT_UNDERSTAND,
        )


def _check_pixel_data(ds: Dataset, data: bytes, transfer_syntax: UID, sop: str) -> None:
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if elem is None:
        return
    if transfer_syntax.is_encapsulated:
        last_tag = int(max(ds.keys()))
        if last_tag == _PIXEL_DATA and not data.endswith(_SEQ_DELIMITER):
            raise IngestError(
                f"instance {sop}: encapsulated pixel data ends without its delimiter"
                " (file truncated)",
                STATUS_TRUNCATED,
            )
        return
    value = elem.value
    if isinstance(elem, RawDataElement) and value is None and elem.length:
        # deferred (see _DEFER_BYTES): the bytes were skipped, not read
        length = min(elem.length, len(data) - elem.value_tell)
    else:
        length = len(value) if isinstance(value, bytes | bytearray) else 0
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = (rows * cols * spp * frames * bits + 7) // 8
    if length < expected:
        raise IngestError(
            f"instance {sop}: pixel data holds {length} bytes, the header describes"
            f" {expected} (file truncated)",
            STATUS_TRUNCATED,
        )


def _meta_transfer_syntax(data: bytes, end: int) -> str:
    """TransferSyntaxUID (0002,0010) from the file meta group (explicit VR little endian)."""
    pos = 144  # after the preamble, "DICM" and the group length element
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", data, pos)
        if data[pos + 4 : pos + 6] in _VRS_LONG_LENGTH:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        if (group, element) == (0x0002, 0x0010):
            return data[start : min(start + length, end)].decode("ascii", "replace").strip(" \x00")
        pos = start + length
    return ""


def body_sha256(data: bytes) -> str:
    """sha256 of the data set after the file meta, as sent (deflated or not)."""
    offset = body_offset(data)
    return hashlib.sha256(memoryview(data)[offset or 0 :]).hexdigest()


def parse_instance(
    data: bytes, *, image_classes: frozenset[str] = frozenset(), digest: bool = True
) -> InstanceHeader:
    """The header of a Part 10 file in ``data``; IngestError (with the status) if unusable.

    Pixel data is never decoded: its presence and its length (native) or
    closing delimiter (encapsulated) are checked for classes in ``image_classes``.
    ``digest=False`` leaves ``sha256`` empty for a caller that computes
    :func:`body_sha256` itself (meanwhile, on another thread).
    """
    offset = body_offset(data)
    if offset is None:
        raise IngestError(
            "not a DICOM Part 10 stream (no preamble, DICM prefix or file meta group length)",
            STATUS_CANNOT_UNDERSTAND,
        )
    try:
        transfer_syntax = UID(_meta_transfer_syntax(data, offset))
        if transfer_syntax.is_transfer_syntax:
            _check_encoding(data[offset : offset + 8], transfer_syntax)
        if transfer_syntax.is_transfer_syntax and not transfer_syntax.is_deflated:
            # the data set only (the file meta is read above), and large values such
            # as pixel data skipped, not copied: _check_pixel_data checks their length
            # against the bytes present
            stream = BytesIO(data)
            stream.seek(offset)
            ds = read_dataset(
                stream,
                transfer_syntax.is_implicit_VR,
                transfer_syntax.is_little_endian,
                defer_size=_DEFER_BYTES,
            )
        else:  # deflated (read from an inflated copy) or a transfer syntax pydicom guesses
            ds = dcmread(BytesIO(data), force=False)
        sop_class = _uid(ds, "SOPClassUID")
        sop = _uid(ds, "SOPInstanceUID")
        study = _uid(ds, "StudyInstanceUID")
        series = _uid(ds, "SeriesInstanceUID")
        rows = ds.get("Rows")
        cols = ds.get("Columns")
        fields: dict[str, Any] = {
            "modality": _text(ds, "Modality", 16),
            "patient_id": _text(ds, "PatientID", 64),
            "issuer_of_patient_id": _text(ds, "IssuerOfPatientID", 64),
            "accession_number": _text(ds, "AccessionNumber", 16),
            "study_date": _text(ds, "StudyDate", 8),
            "study_description": _text(ds, "StudyDescription", 64),
            "series_description": _text(ds, "SeriesDescription", 64),
            "body_part_examined": _text(ds, "BodyPartExamined", 64),
            "image_type": _text(ds, "ImageType", 128),
            "slice_thickness": slice_thickness_of(ds),
            "rows": int(rows) if rows not in (None, "") else None,
            "columns": int(cols) if cols not in (None, "") else None,
            "has_pixel_data": "PixelData" in ds or "FloatPixelData" in ds,
            "has_position": "ImagePositionPatient" in ds,
        }
    except IngestError:
        raise
    except Exception as exc:  # hostile input can fail pydicom in many ways
        if "before delimiter" in str(exc):  # pydicom's warning, raised where warnings are errors
            raise IngestError(
                "encapsulated pixel data ends without its delimiter (file truncated)",
                STATUS_TRUNCATED,
            ) from exc
        # pydicom quotes element values in some messages: those may identify the
        # patient and the reason is logged, so such a message is left out
        detail = str(exc)[:200]
        if "'" in detail or '"' in detail:
            detail = "details withheld (the message quotes element values)"
        raise IngestError(
            f"cannot parse the DICOM data set: {type(exc).__name__}: {detail}",
            STATUS_CANNOT_UNDERSTAND,
        ) from exc
    for name, value in (
        ("SOPClassUID", sop_class),
        ("SOPInstanceUID", sop),
        ("StudyInstanceUID", study),
        ("SeriesInstanceUID", series),
    ):
        if not value:
            raise IngestError(f"{name} is missing", STATUS_INVALID_UID)
        if not is_valid_uid(value):
            raise IngestError(f"{name} {value[:80]!r} is not a valid DICOM UID", STATUS_INVALID_UID)
    if sop_class in image_classes:
        if not fields["has_pixel_data"]:
            raise IngestError(
                f"instance {sop}: image without Pixel Data", STATUS_DOES_NOT_MATCH_SOP_CLASS
            )
        if not fields["rows"] or not fields["columns"]:
            raise IngestError(
                f"instance {sop}: image without Rows/Columns", STATUS_DOES_NOT_MATCH_SOP_CLASS
            )
        try:
            _check_pixel_data(ds, data, transfer_syntax, sop)
        except (TypeError, ValueError) as exc:
            raise IngestError(
                f"instance {sop}: unusable image pixel module: {exc}", STATUS_CANNOT_UNDERSTAND
            ) from exc
    return InstanceHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=sop,
        study_uid=study,
        series_uid=series,
        transfer_syntax_uid=str(transfer_syntax),
        size=len(data),
        sha256=body_sha256(data) if digest else "",
        **fields,
    )


# -- database rows ------------------------------------------------------------
#
# Written with SQLAlchemy Core on the session's connection: one instance costs
# a handful of indexed statements and no ORM unit of work (which cost several
# milliseconds per instance, inside every C-STORE round trip).

_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)
# built once: executing a prepared statement skips SQLAlchemy's per-call construction
_INSTANCE_BY_UID = select(_INSTANCES.c.id, _INSTANCES.c.path, _INSTANCES.c.sha256).where(
    _INSTANCES.c.sop_instance_uid == bindparam("b_sop")
)
_SERIES_BY_UID = (
    select(
        _SERIES.c.id,
        _SERIES.c.study_id,
        _SERIES.c.generation,
        _SERIES.c.rows,
        _SERIES.c.columns,
        _SERIES.c.ingest_issues,
        _STUDIES.c.study_instance_uid,
    )
    .join(_STUDIES, _SERIES.c.study_id == _STUDIES.c.id)
    .where(_SERIES.c.series_instance_uid == bindparam("b_series"))
)
_INSERT_INSTANCE = insert(_INSTANCES)
_CLOSED = _SERIES.c.state.in_([SeriesState.COMPLETE, SeriesState.PURGED])
# One statement per instance: count it, touch the series and, for a late instance,
# set a COMPLETE/PURGED series back to RECEIVING with generation + 1. SET
# expressions read the row as it was, and the UPDATE takes the row lock, so two
# late instances (or a stability sweep committing meanwhile) re-open it once.
_TOUCH_SERIES = (
    update(_SERIES)
    .where(_SERIES.c.id == bindparam("b_id"))
    .values(
        instance_count=_SERIES.c.instance_count + bindparam("b_added"),
        last_received_at=bindparam("b_now"),
        state=SeriesState.RECEIVING,
        generation=case((_CLOSED, _SERIES.c.generation + 1), else_=_SERIES.c.generation),
        completed_at=case((_CLOSED, None), else_=_SERIES.c.completed_at),
    )
    .returning(_SERIES.c.generation)
)


@dataclass(frozen=True)
class Recorded:
    series_id: int
    new_series: bool
    reopened: bool  # a late instance set a COMPLETE/PURGED series back to RECEIVING


@dataclass(frozen=True)
class StoredInstance:
    """The columns of an Instance row that de-duplication needs."""

    id: int
    path: str
    sha256: str


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def find_stored(session: Session, sop_instance_uid: str) -> StoredInstance | None:
    """The row of ``sop_instance_uid`` (id, path, sha256) without loading an ORM object."""
    row = session.connection().execute(_INSTANCE_BY_UID, {"b_sop": sop_instance_uid}).first()
    return StoredInstance(row.id, row.path, row.sha256) if row is not None else None


def _with_issue(issues: str, issue: str) -> str:
    lines = [line for line in issues.splitlines() if line]
    if issue not in lines and len(lines) < 20:
        lines.append(issue)
    return "\n".join(lines)


def _study_id(conn: Connection, header: InstanceHeader, now: datetime) -> int:
    found = conn.scalar(
        select(_STUDIES.c.id).where(_STUDIES.c.study_instance_uid == header.study_uid)
    )
    if found is not None:
        return int(found)
    return int(
        conn.execute(
            insert(_STUDIES)
            .values(
                study_instance_uid=header.study_uid,
                patient_id=header.patient_id,
                issuer_of_patient_id=header.issuer_of_patient_id,
                accession_number=header.accession_number,
                study_date=header.study_date,
                study_description=header.study_description,
                created_at=now,
            )
            .returning(_STUDIES.c.id)
        ).scalar_one()
    )


def record_instance(
    session: Session,
    header: InstanceHeader,
    path: Path | str,
    calling_ae: str,
    *,
    now: datetime | None = None,
    existing: Instance | StoredInstance | Literal[False] | None = False,
) -> Recorded:
    """Add (or, for a re-sent purged instance, refresh) the rows for one stored file.

    The caller commits; the file must already be written and fsynced.
    ``existing``: the row with this SOP Instance UID (or None) when the caller
    has already looked it up; False to look it up here.
    """
    now = now or utcnow()
    conn = session.connection()
    found = conn.execute(_SERIES_BY_UID, {"b_series": header.series_uid}).first()
    changes: dict[str, Any] = {}
    if found is None:
        study_id = _study_id(conn, header, now)
        series_id = conn.execute(
            insert(_SERIES)
            .returning(_SERIES.c.id)
            .values(
                series_instance_uid=header.series_uid,
                study_id=study_id,
                modality=header.modality,
                sop_class_uid=header.sop_class_uid,
                body_part_examined=header.body_part_examined,
                series_description=header.series_description,
                image_type=header.image_type,
                slice_thickness=header.slice_thickness,
                calling_ae=calling_ae[:16],
                instance_count=0,
                state=SeriesState.RECEIVING,
                generation=1,
                first_received_at=now,
                last_received_at=now,
                rows=header.rows,
                columns=header.columns,
                ingest_issues="",
            )
        ).scalar_one()
        rows, columns, issues, generation = header.rows, header.columns, "", 1
        new_series = True
    else:
        series_id, rows, columns = found.id, found.rows, found.columns
        issues, generation, new_series = found.ingest_issues, found.generation, False
        if found.study_instance_uid != header.study_uid:
            study_id = _study_id(conn, header, now)
            if found.study_id != study_id:
                issues = _with_issue(issues, "instances of this series name different studies")
        if rows is None and header.rows is not None:
            rows, columns = header.rows, header.columns
            changes.update(rows=rows, columns=columns)
    if (
        header.rows is not None
        and rows is not None
        and (header.rows, header.columns) != (rows, columns)
    ):
        issues = _with_issue(
            issues,
            f"instance {header.sop_instance_uid} is {header.rows}x{header.columns},"
            f" the series {rows}x{columns}",
        )
    if (
        header.sop_class_uid in _CLASSIC_CROSS_SECTIONAL
        and header.has_pixel_data
        and not header.has_position
    ):
        issues = _with_issue(
            issues, f"instance {header.sop_instance_uid} lacks ImagePositionPatient"
        )
    if issues != (found.ingest_issues if found is not None else ""):
        changes["ingest_issues"] = issues
    if existing is False:
        existing = find_stored(session, header.sop_instance_uid)
    refreshed = {
        "path": str(path),
        "size_bytes": header.size,
        "sha256": header.sha256,
        "received_at": now,
    }
    if existing is None:
        conn.execute(
            _INSERT_INSTANCE,
            {
                "sop_instance_uid": header.sop_instance_uid,
                "series_id": series_id,
                "sop_class_uid": header.sop_class_uid,
                "transfer_syntax_uid": header.transfer_syntax_uid,
                "calling_ae": calling_ae[:16],
                **refreshed,
            },
        )
    else:
        conn.execute(update(_INSTANCES).where(_INSTANCES.c.id == existing.id).values(**refreshed))
        if isinstance(existing, Instance) and existing in session:
            session.expire(existing)
    # counted in SQL: concurrent associations must not lose counts
    touched = conn.execute(
        _TOUCH_SERIES, {"b_id": series_id, "b_added": int(existing is None), "b_now": now}
    ).scalar_one()
    if changes:
        conn.execute(update(_SERIES).where(_SERIES.c.id == series_id).values(**changes))
    return Recorded(series_id=series_id, new_series=new_series, reopened=touched != generation)


_CLASSIC_CROSS_SECTIONAL = frozenset(
    {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"}  # CT, MR Image Storage
)


def record_rejection(
    sessions: sessionmaker[Session],
    *,
    channel: str,
    reason: str,
    calling_ae: str = "",
    sop_instance_uid: str = "",
    status: int = 0,
) -> None:
    """Store a Rejection row in its own transaction; a database failure is logged, not raised."""
    try:
        with sessions.begin() as session:
            session.add(
                Rejection(
                    channel=channel[:16],
                    calling_ae=calling_ae[:16],
                    sop_instance_uid=sop_instance_uid[:128],
                    status=status,
                    reason=reason[:2000],
                )
            )
    except Exception:  # the answer to the peer must not depend on the log row
        log.exception("could not record a rejection (%s: %s)", channel, reason[:200])


def reconcile_spool(
    sessions: sessionmaker[Session],
    spool: Spool,
    *,
    image_classes: frozenset[str] = frozenset(),
) -> int:
    """Record spooled files that have no Instance row (a crash after fsync, before commit).

    Run at start before the SCP listens. Returns how many files were recorded;
    an unreadable file is logged and left for an admin.
    """
    spool.remove_stale_temporaries()
    with sessions() as session:
        known = set(session.scalars(select(Instance.path)))
    count = 0
    for rel in spool.iter_files():
        if str(rel) in known:
            continue
        try:
            header = parse_instance(spool.read(rel), image_classes=image_classes)
            if spool.relpath(header.study_uid, header.series_uid, header.sop_instance_uid) != rel:
                raise IngestError(f"file {rel} does not match its UIDs")
            with sessions.begin() as session:
                record_instance(session, header, rel, "reconcile")
        except (IngestError, SpoolError) as exc:
            log.error("spool file %s left unrecorded: %s", rel, exc)
            continue
        count += 1
    if count:
        log.warning("re-recorded %d spooled instances that had no database row", count)
    return count
