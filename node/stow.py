"""DICOMweb STOW-RS (PS3.18 10.5): ``POST /dicom-web/studies[/{study}]``.

Accepts ``multipart/related; type="application/dicom"`` bodies; every part goes
through the same :meth:`node.ingest.Store.accept` as a C-STORE (validation,
atomic spool write, rows, rejections). The answer is the DICOM JSON Store
Instances Response: ReferencedSOPSequence (0008,1199) for stored instances,
FailedSOPSequence (0008,1198) with FailureReason (0008,1197) for the others.

HTTP status: 200 all stored; 202 some stored, some failed; 409 none stored;
400 malformed multipart; 413 body over the limit; 415 wrong media type.
The app (``node/app.py``) mounts ``stow_router(store)`` and adds authentication
through ``dependencies``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from email.message import Message
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from node.ingest import Outcome, Store
from node.registry import STATUS_CANNOT_UNDERSTAND, record_rejection

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
STOW_AE = "STOW-RS"


class MultipartError(ValueError):
    """The request body is not a well-formed multipart/related body."""


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Media type (lower case) and parameters of a Content-Type header."""
    msg = Message()
    msg["content-type"] = value
    params = {k.lower(): str(v) for k, v in msg.get_params(failobj=[])[1:]}
    return msg.get_content_type(), params


def split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """Parts of a multipart body as (lower-cased headers, content); MultipartError if malformed."""
    delimiter = b"--" + boundary.encode("latin-1")
    pos = body.find(delimiter)
    if pos < 0:
        raise MultipartError("the boundary does not occur in the body")
    parts: list[tuple[dict[str, str], bytes]] = []
    while True:
        pos += len(delimiter)
        if body[pos : pos + 2] == b"--":
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise MultipartError("a boundary line does not end with CRLF")
        start = eol + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise MultipartError("the body ends without the closing boundary")
        part = body[start:end]
        if part.startswith(b"\r\n"):
            head, content = b"", part[2:]
        else:
            split = part.find(b"\r\n\r\n")
            if split < 0:
                raise MultipartError("a part has no blank line after its headers")
            head, content = part[:split], part[split + 4 :]
        headers: dict[str, str] = {}
        for line in head.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                raise MultipartError("a part header line has no colon")
            headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
        parts.append((headers, content))
        pos = end + 2


def _uid_attr(tag: str, value: str) -> dict[str, Any]:
    return {tag: {"vr": "UI", "Value": [value]}} if value else {tag: {"vr": "UI"}}


def store_response(outcomes: Sequence[Outcome]) -> tuple[int, dict[str, Any]]:
    """HTTP status and DICOM JSON body for the outcomes of one request."""
    referenced = [
        {**_uid_attr("00081150", o.sop_class_uid), **_uid_attr("00081155", o.sop_instance_uid)}
        for o in outcomes
        if o.ok
    ]
    failed = [
        {
            **_uid_attr("00081150", o.sop_class_uid),
            **_uid_attr("00081155", o.sop_instance_uid),
            "00081197": {"vr": "US", "Value": [o.status]},
        }
        for o in outcomes
        if not o.ok
    ]
    body: dict[str, Any] = {}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else (202 if referenced else 409)
    return status, body


def _refuse(store: Store, http_status: int, reason: str) -> HTTPException:
    log.warning("STOW-RS request refused (%d): %s", http_status, reason)
    record_rejection(store.sessions, channel="stow", calling_ae=STOW_AE, reason=reason)
    return HTTPException(status_code=http_status, detail=reason)


async def _stow(request: Request, store: Store, study: str | None, max_body: int) -> JSONResponse:
    media_type, params = parse_content_type(request.headers.get("content-type", ""))
    if media_type != "multipart/related":
        raise _refuse(store, 415, f"content type {media_type!r}: expected multipart/related")
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise _refuse(store, 415, f"multipart type {part_type!r}: only application/dicom")
    boundary = params.get("boundary", "")
    if not boundary:
        raise _refuse(store, 400, "multipart/related without a boundary parameter")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise _refuse(store, 413, f"request body of {declared} bytes exceeds {max_body}")
    body = await request.body()
    if len(body) > max_body:
        raise _refuse(store, 413, f"request body of {len(body)} bytes exceeds {max_body}")
    try:
        parts = split_multipart(body, boundary)
    except MultipartError as exc:
        raise _refuse(store, 400, f"malformed multipart body: {exc}") from exc
    if not parts:
        raise _refuse(store, 400, "multipart body without parts")
    outcomes: list[Outcome] = []
    for headers, content in parts:
        ctype, _ = parse_content_type(headers.get("content-type", "application/dicom"))
        if ctype != "application/dicom":
            reason = f"part of type {ctype!r} is not application/dicom"
            record_rejection(
                store.sessions,
                channel="stow",
                calling_ae=STOW_AE,
                status=STATUS_CANNOT_UNDERSTAND,
                reason=reason,
            )
            outcomes.append(Outcome(STATUS_CANNOT_UNDERSTAND, reason))
            continue
        outcomes.append(
            await run_in_threadpool(
                store.accept,
                content,
                calling_ae=STOW_AE,
                channel="stow",
                expected_study_uid=study,
            )
        )
    status, payload = store_response(outcomes)
    log.info(
        "STOW-RS from %s: %d parts, %d stored, %d failed",
        request.client.host if request.client else "?",
        len(outcomes),
        sum(o.ok for o in outcomes),
        sum(not o.ok for o in outcomes),
    )
    return JSONResponse(payload, status_code=status, media_type=DICOM_JSON)


def stow_router(
    store: Store,
    *,
    dependencies: Sequence[Depends] = (),
    max_body_bytes: int | None = None,
) -> APIRouter:
    """The STOW-RS routes writing through ``store`` (mount on the node's FastAPI app)."""
    # the body is held in memory: by default no larger than one instance may be
    max_body = max_body_bytes if max_body_bytes is not None else store.max_instance_bytes
    router = APIRouter(prefix="/dicom-web", tags=["dicomweb"], dependencies=list(dependencies))

    @router.post("/studies")
    async def stow_studies(request: Request) -> JSONResponse:
        return await _stow(request, store, None, max_body)

    @router.post("/studies/{study}")
    async def stow_study(study: str, request: Request) -> JSONResponse:
        return await _stow(request, store, study, max_body)

    return router
