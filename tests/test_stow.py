"""STOW-RS: multipart/related uploads through the same Store as C-STORE.

The router is served with the node's token check (``node.auth``), and clients
send an ``ingest`` token; the node's whole application (``node.app``) answers
401 without a token, 403 with a viewer token and stores nothing for either.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless
from sqlalchemy import select

from node import auth
from node.db import Instance, Rejection
from node.stow import split_multipart, stow_router
from tests.conftest import free_port
from tests.support.dcmtk import storescu
from tests.support.ingest_node import IngestNode, ct_series, running_node


def multipart(parts: Sequence[bytes], boundary: str, part_type: str = "application/dicom") -> bytes:
    chunks = []
    for part in parts:
        chunks.append(
            f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


def post(
    client: httpx.Client, parts: Sequence[bytes], study: str | None = None, **kw: str
) -> httpx.Response:
    boundary = uuid.uuid4().hex
    url = "/dicom-web/studies" + (f"/{study}" if study else "")
    ctype = kw.get(
        "content_type", f'multipart/related; type="application/dicom"; boundary={boundary}'
    )
    body = multipart(parts, boundary, kw.get("part_type", "application/dicom"))
    headers = {"Content-Type": ctype}
    if kw.get("token"):  # else the client's own Authorization header, if any
        headers["Authorization"] = f"Bearer {kw['token']}"
    return client.post(url, content=body, headers=headers)


def ingest_token(node: IngestNode, name: str = "pacs", role: str = "ingest") -> str:
    """A stored token of ``role`` in the node's database."""
    with node.sessions() as s:
        token = auth.create_token(s, name, role, "test")
        s.commit()
    return token


@contextmanager
def serve_app(node: IngestNode, max_body_bytes: int | None = None) -> Iterator[httpx.Client]:
    """The STOW router with the token check on a real uvicorn server; a client with a token."""
    principal = auth.bearer_principal(node.sessions)
    may_store = auth.require(principal, auth.STORE_ROLES, "storing instances")
    app = FastAPI()
    app.include_router(
        stow_router(node.store, dependencies=[Depends(may_store)], max_body_bytes=max_body_bytes)
    )
    headers = {"Authorization": f"Bearer {ingest_token(node)}"}
    with serve(app, headers) as client:
        yield client


@contextmanager
def serve(app: FastAPI, headers: dict[str, str] | None = None) -> Iterator[httpx.Client]:
    """``app`` on a real uvicorn server on a free port, and a client for it."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60
        ) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture()
def stow(tmp_path: Path) -> Iterator[tuple[IngestNode, httpx.Client]]:
    with running_node(tmp_path) as node, serve_app(node) as client:
        yield node, client


def test_stow_stores_instances_and_answers_dicom_json(
    tmp_path: Path, stow: tuple[IngestNode, httpx.Client]
) -> None:
    node, client = stow
    files = ct_series(tmp_path / "a", n=2, seed="stow-a")
    files += ct_series(
        tmp_path / "b", n=1, size=64, seed="stow-b", transfer_syntax=JPEG2000Lossless
    )
    response = post(client, [f.read_bytes() for f in files])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    referenced = response.json()["00081199"]["Value"]
    sent = {dcmread(f).SOPInstanceUID for f in files}
    assert {item["00081155"]["Value"][0] for item in referenced} == sent
    assert "00081198" not in response.json()
    with node.sessions() as s:
        rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
    assert set(rows) == sent
    for f in files:
        stored = node.spool_root / rows[dcmread(f).SOPInstanceUID].path
        assert stored.read_bytes() == f.read_bytes()  # the part exactly as uploaded


def test_stow_to_study_refuses_instances_of_other_studies(
    tmp_path: Path, stow: tuple[IngestNode, httpx.Client]
) -> None:
    node, client = stow
    mine = ct_series(tmp_path / "a", n=1, seed="stow-mine")
    other = ct_series(tmp_path / "b", n=1, seed="stow-other")
    study = dcmread(mine[0]).StudyInstanceUID
    response = post(client, [mine[0].read_bytes(), other[0].read_bytes()], study=study)
    assert response.status_code == 202
    failed = response.json()["00081198"]["Value"]
    assert len(failed) == 1 and failed[0]["00081197"]["Value"] == [0xA900]
    assert failed[0]["00081155"]["Value"] == [dcmread(other[0]).SOPInstanceUID]
    assert node.instance_count() == 1
    assert "differs from" in node.rejections()[-1].reason


def test_stow_then_dimse_duplicate_is_success_without_second_copy(
    tmp_path: Path, stow: tuple[IngestNode, httpx.Client]
) -> None:
    node, client = stow
    files = ct_series(tmp_path / "a", n=2, seed="stow-dup")
    assert post(client, [f.read_bytes() for f in files]).status_code == 200
    result = storescu(node.port, files)
    assert result.returncode == 0, result.stderr
    assert node.instance_count() == 2 and len(node.spool_files()) == 2
    assert node.rejections() == []


def test_split_multipart_rejects_malformed_bodies() -> None:
    assert split_multipart(b"--b\r\nContent-Type: x\r\n\r\nab\r\n--b--\r\n", "b") == [
        ({"content-type": "x"}, b"ab")
    ]
    for body in (
        b"no boundary here",
        b"--b\r\nContent-Type: x\r\n\r\nab",
        b"--b\r\nbad header\r\n\r\nx\r\n--b--",
    ):
        with pytest.raises(ValueError):
            split_multipart(body, "b")


def test_stow_request_refusals_are_recorded(stow: tuple[IngestNode, httpx.Client]) -> None:
    node, client = stow
    r = client.post(
        "/dicom-web/studies", content=b"x", headers={"Content-Type": "application/dicom"}
    )
    assert r.status_code == 415
    r = client.post(
        "/dicom-web/studies", content=b"x", headers={"Content-Type": "multipart/related"}
    )
    assert r.status_code == 400
    with node.sessions() as s:
        reasons = [r.reason for r in s.scalars(select(Rejection).order_by(Rejection.id))]
    assert "expected multipart/related" in reasons[0]
    assert "boundary" in reasons[1]


def test_stow_body_over_the_limit_is_refused(tmp_path: Path) -> None:
    with running_node(tmp_path) as node, serve_app(node, max_body_bytes=1000) as client:
        files = ct_series(tmp_path / "a", n=1, seed="stow-big")
        response = post(client, [files[0].read_bytes()])
        assert response.status_code == 413
        assert node.instance_count() == 0
        assert "exceeds 1000" in node.rejections()[-1].reason


def test_stow_on_the_node_app_needs_a_token_that_may_store(tmp_path: Path) -> None:
    """node.app: 401 without or with an unknown token, 403 for a viewer; ingest or admin store.

    The ingest tokens: a stored one and the settings' ``http.ingest_token``.
    """
    from node.app import create_app

    with running_node(tmp_path) as node:
        node.settings.http.ingest_token = "site-ingest-secret"  # HPB_INGEST_TOKEN
        app = create_app(node.settings, node.sessions, node.store)
        viewer = ingest_token(node, "victor", "viewer")
        admin = ingest_token(node, "alice", "admin")
        ingest = ingest_token(node, "orthanc", "ingest")
        files = ct_series(tmp_path / "a", n=3, seed="stow-auth")
        with serve(app) as client:
            refused = [
                post(client, [files[0].read_bytes()], token=token) for token in ("", "nope", viewer)
            ]
            assert [r.status_code for r in refused] == [401, 401, 403]
            assert refused[0].headers["www-authenticate"] == "Bearer"
            assert "ingest" in refused[2].json()["detail"]
            assert node.instance_count() == 0 and node.spool_files() == []
            assert post(client, [files[0].read_bytes()], token=ingest).status_code == 200
            assert post(client, [files[1].read_bytes()], token=admin).status_code == 200
            r = post(client, [files[2].read_bytes()], token="site-ingest-secret")
            assert r.status_code == 200
            # an ingest token stores and reads nothing of the admin API
            h = {"Authorization": f"Bearer {ingest}"}
            assert client.get("/api/jobs", headers=h).status_code == 403
            assert client.get("/api/whoami", headers=h).json() == {
                "name": "orthanc",
                "role": "ingest",
            }
        assert node.instance_count() == 3
        with node.sessions() as s:
            stored = {i.sop_instance_uid for i in s.scalars(select(Instance))}
        assert stored == {str(dcmread(f).SOPInstanceUID) for f in files}
