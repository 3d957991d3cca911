"""Admin REST API (node/api.py), tokens (node/auth.py), metrics and ``hpb-node admin``.

The API runs in a FastAPI app on a real SQLite database; the OpenAPI document
the server publishes is walked so that no mutating route escapes the 401/403
checks.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node import auth, migrate
from node.api import admin_router
from node.cli import main as cli_main
from node.db import (
    ApiToken,
    AuditEvent,
    Instance,
    Job,
    JobState,
    Series,
    Study,
    create_engine_for,
    session_factory,
    utcnow,
)
from node.errors import ConfigError
from node.settings import Settings, load_settings
from tests.conftest import free_port

BOOTSTRAP = "bootstrap-admin-token-for-tests"
MUTATING = {"post", "put", "patch", "delete"}


@pytest.fixture()
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate.upgrade(url)  # the schema as deployed (Alembic), not create_all
    engine = create_engine_for(url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    (tmp_path / "spool").mkdir()
    return Settings.model_validate(
        {
            "demo": False,
            "http": {"admin_token": BOOTSTRAP},
            "spool": {"root": str(tmp_path / "spool")},
            "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
        }
    )


@contextmanager
def serve(app: FastAPI) -> Iterator[httpx.Client]:
    """``app`` on a real uvicorn server on a free loopback port."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            yield c
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture()
def client(sessions: sessionmaker[Session], settings: Settings) -> Iterator[httpx.Client]:
    app = FastAPI(title="hpb-node")
    app.include_router(admin_router(sessions, settings))
    with serve(app) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def tokens(client: httpx.Client) -> dict[str, str]:
    out = {}
    for name, role in (("alice", "admin"), ("victor", "viewer")):
        r = client.post("/api/tokens", json={"name": name, "role": role}, headers=bearer(BOOTSTRAP))
        assert r.status_code == 201, r.text
        out[role] = r.json()["token"]
    return out


def add_job(session: Session, state: JobState, *, uid: str = "1.2.3.4", error: str = "") -> int:
    study = session.scalars(select(Study)).first() or Study(study_instance_uid="1.2.3")
    series = Series(series_instance_uid=uid, study=study, modality="CT")
    now = utcnow()
    job = Job(
        series=series,
        rule_name="liver-ct",
        pipeline="hpb-ct",
        state=state,
        last_error=error,
        started_at=now - timedelta(seconds=42),
        finished_at=now if state in (JobState.SUCCEEDED, JobState.FAILED) else None,
    )
    session.add_all([study, series, job])
    session.commit()
    return job.id


def fill_path(path: str) -> str:
    return path.replace("{job_id}", "1").replace("{name}", "x")


def test_openapi_every_mutating_route_needs_an_admin_token(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    doc = client.get("/openapi.json").json()
    checked = []
    for path, ops in doc["paths"].items():
        for method in ops:
            url = fill_path(path)
            if method in MUTATING:
                for headers, code in (
                    ({}, 401),
                    (bearer("not-a-token"), 401),
                    (bearer(tokens["viewer"]), 403),
                ):
                    r = client.request(method, url, json={}, headers=headers)
                    assert r.status_code == code, f"{method.upper()} {path}: {r.status_code}"
                checked.append(f"{method.upper()} {path}")
            elif path.startswith("/api/") and path != "/api/health":
                r = client.request(method, url)
                assert r.status_code == 401, f"{method.upper()} {path} open without a token"
    # the walk really covered the mutating surface
    assert len(checked) >= 11
    assert "POST /api/jobs/{job_id}/retry" in checked
    assert "DELETE /api/rules/{name}" in checked


# STOW-RS stores instances: an ``ingest`` or ``admin`` token may, a viewer may not.
STOW_ROUTES = {("post", "/dicom-web/studies"), ("post", "/dicom-web/studies/{study}")}


def test_node_app_openapi_every_mutating_route_needs_a_token_and_a_role(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    """The same walk over the node's whole application (node.app.create_app), STOW-RS included.

    Every mutating route: 401 without a token or with an unknown one, 403 with a
    viewer token. An ingest token gets 403 on the admin API (reads included) and
    passes the token check of STOW-RS only.
    """
    from node.app import create_app
    from node.ingest import Store

    app = create_app(settings, sessions, Store.from_settings(settings, sessions))
    with serve(app) as c:
        with sessions() as s:
            viewer = auth.create_token(s, "victor", "viewer", "test")
            ingest = auth.create_token(s, "orthanc", "ingest", "test")
            s.commit()
        doc = c.get("/openapi.json").json()
        mutating = [(m, p) for p, ops in doc["paths"].items() for m in ops if m in MUTATING]
        assert ("post", "/api/rules") in mutating
        assert {(m, p) for m, p in mutating if p.startswith("/dicom-web/")} == STOW_ROUTES
        for method, path in mutating:
            url = fill_path(path).replace("{study}", "1.2.3")
            assert c.request(method, url, json={}).status_code == 401, f"{method} {path}"
            r = c.request(method, url, json={}, headers=bearer("not-a-token"))
            assert r.status_code == 401, f"{method} {path}"
            r = c.request(method, url, json={}, headers=bearer(viewer))
            assert r.status_code == 403, f"{method} {path}"
            r = c.request(method, url, json={}, headers=bearer(ingest))
            if (method, path) in STOW_ROUTES:
                # past the token check: a JSON body is not multipart/related
                assert r.status_code == 415, f"{method} {path}: {r.text}"
            else:
                assert r.status_code == 403, f"{method} {path}"
        reads = [p for p, ops in doc["paths"].items() if "get" in ops and p.startswith("/api/")]
        for path in reads:
            if path in ("/api/health", "/api/whoami"):
                continue
            r = c.get(fill_path(path), headers=bearer(ingest))
            assert r.status_code == 403, f"GET {path} with an ingest token"
        assert "/api/jobs" in reads and "/api/audit" in reads


def test_settings_ingest_token_is_an_ingest_principal_and_another_secret(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with sessions() as s:
        assert auth.resolve_token(s, "site-ingest", BOOTSTRAP, "site-ingest") == auth.Principal(
            "settings-ingest", auth.Role.INGEST
        )
        assert auth.resolve_token(s, BOOTSTRAP, BOOTSTRAP, "site-ingest") == auth.Principal(
            "settings", auth.Role.ADMIN
        )
        assert auth.resolve_token(s, "", BOOTSTRAP, "") is None
        with pytest.raises(ConfigError, match="settings-ingest"):
            auth.create_token(s, "settings-ingest", "ingest", "test")
    env = {"HPB_ADMIN_TOKEN": "site-admin", "HPB_INGEST_TOKEN": "site-ingest"}
    cfg = tmp_path / "node.yaml"
    cfg.write_text("demo: false\n")
    assert load_settings(cfg, env=env).http.ingest_token == "site-ingest"
    with pytest.raises(ConfigError, match=r"http\.ingest_token: must differ"):
        load_settings(cfg, env={**env, "HPB_INGEST_TOKEN": "site-admin"})


def test_tokens_are_stored_hashed_and_roles_enforced(
    client: httpx.Client, tokens: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    with sessions() as s:
        rows = {r.name: r for r in s.scalars(select(ApiToken))}
        assert rows["alice"].token_sha256 == hashlib.sha256(tokens["admin"].encode()).hexdigest()
        assert rows["victor"].role == "viewer"
        stored = json.dumps([(r.name, r.token_sha256) for r in rows.values()])
        assert tokens["admin"] not in stored and tokens["viewer"] not in stored
    assert client.get("/api/whoami", headers=bearer(tokens["viewer"])).json() == {
        "name": "victor",
        "role": "viewer",
    }
    # a viewer reads; it cannot list or create tokens
    assert client.get("/api/rules", headers=bearer(tokens["viewer"])).status_code == 200
    assert client.get("/api/tokens", headers=bearer(tokens["viewer"])).status_code == 403
    # revoked tokens stop working
    assert client.delete("/api/tokens/victor", headers=bearer(tokens["admin"])).status_code == 204
    assert client.get("/api/rules", headers=bearer(tokens["viewer"])).status_code == 401


def test_rules_and_destinations_crud_is_validated_and_audited(
    client: httpx.Client, tokens: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    h = bearer(tokens["admin"])
    rule = {
        "name": "liver-ct",
        "priority": 10,
        "definition": {
            "match": {"modality": ["CT"], "series_description": "(?i)venous"},
            "pipeline": "hpb-ct",
            "destinations": ["pacs"],
        },
    }
    r = client.post("/api/rules", json=rule, headers=h)
    assert r.status_code == 201, r.text
    assert client.post("/api/rules", json=rule, headers=h).status_code == 409
    rule["priority"] = 5
    assert client.put("/api/rules/liver-ct", json=rule, headers=h).json()["priority"] == 5
    assert client.put("/api/rules/other", json=rule, headers=h).status_code == 422
    bad = {"name": "bad name!", "definition": {"pipeline": "x"}}
    assert client.post("/api/rules", json=bad, headers=h).status_code == 422
    bad_regex = {
        "name": "r2",
        "definition": {"pipeline": "x", "match": {"series_description": "("}},
    }
    r = client.post("/api/rules", json=bad_regex, headers=h)
    assert r.status_code == 422 and "series_description" in r.text
    unknown = {"name": "r3", "definition": {"pipeline": "x", "match": {"colour": ["red"]}}}
    assert client.post("/api/rules", json=unknown, headers=h).status_code == 422
    dry = {"attributes": {"Modality": "CT", "SeriesDescription": "Portal venous 3mm"}}
    r = client.post("/api/rules/dry-run", json=dry, headers=h)
    assert r.status_code == 200 and r.json()["matched"] == ["liver-ct"]
    dry["attributes"]["Modality"] = "MR"
    assert client.post("/api/rules/dry-run", json=dry, headers=h).json()["matched"] == []
    r = client.post("/api/rules/dry-run", json={"attributes": {"Colour": "x"}}, headers=h)
    assert r.status_code == 422
    listed = client.get("/api/rules", headers=bearer(tokens["viewer"])).json()
    assert [x["name"] for x in listed] == ["liver-ct"]
    assert listed[0]["source"] == "api"  # created here, so a rules-file load keeps it
    assert client.delete("/api/rules/liver-ct", headers=h).status_code == 204
    assert client.delete("/api/rules/liver-ct", headers=h).status_code == 404

    dest = {"name": "pacs", "kind": "dimse", "ae_title": "HPBPACS", "host": "pacs", "port": 4242}
    assert client.post("/api/destinations", json=dest, headers=h).status_code == 201
    missing_port = {**dest, "name": "pacs2", "port": 0}
    r = client.post("/api/destinations", json=missing_port, headers=h)
    assert r.status_code == 422 and "port" in r.text
    web = {"name": "web", "kind": "dicomweb", "url": "ftp://x"}
    assert client.post("/api/destinations", json=web, headers=h).status_code == 422
    dest["port"] = 104
    assert client.put("/api/destinations/pacs", json=dest, headers=h).json()["port"] == 104

    audit = client.get("/api/audit", headers=h).json()
    actions = [(e["actor"], e["action"], e["target"]) for e in reversed(audit)]
    assert actions == [
        ("settings", "token.create", "token:alice"),
        ("settings", "token.create", "token:victor"),
        ("alice", "rule.create", "rule:liver-ct"),
        ("alice", "rule.update", "rule:liver-ct"),
        ("alice", "rule.delete", "rule:liver-ct"),
        ("alice", "destination.create", "destination:pacs"),
        ("alice", "destination.update", "destination:pacs"),
    ]
    with sessions() as s:
        n = len(s.scalars(select(AuditEvent)).all())
    assert n == len(actions)  # refused requests left nothing behind


def test_jobs_filter_retry_cancel(
    client: httpx.Client, tokens: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    with sessions() as s:
        failed = add_job(s, JobState.FAILED, uid="1.2.3.4.1", error="model: out of memory")
        queued = add_job(s, JobState.QUEUED, uid="1.2.3.4.2")
        done = add_job(s, JobState.SUCCEEDED, uid="1.2.3.4.3")
    v, a = bearer(tokens["viewer"]), bearer(tokens["admin"])
    assert [j["id"] for j in client.get("/api/jobs", headers=v).json()] == [done, queued, failed]
    only = client.get("/api/jobs", params={"state": "failed"}, headers=v).json()
    assert [(j["id"], j["last_error"]) for j in only] == [(failed, "model: out of memory")]
    by_series = client.get("/api/jobs", params={"series_uid": "1.2.3.4.2"}, headers=v).json()
    assert [j["id"] for j in by_series] == [queued]
    assert client.get("/api/jobs", params={"state": "bogus"}, headers=v).status_code == 422
    assert client.get("/api/jobs/999", headers=v).status_code == 404

    r = client.post(f"/api/jobs/{failed}/retry", headers=a)
    assert r.status_code == 200 and r.json()["state"] == "queued" and r.json()["attempts"] == 0
    assert client.post(f"/api/jobs/{done}/retry", headers=a).status_code == 409
    assert client.post(f"/api/jobs/{queued}/cancel", headers=a).json()["state"] == "cancelled"
    assert client.post(f"/api/jobs/{queued}/cancel", headers=a).status_code == 409
    with sessions() as s:
        events = [(e.action, e.target) for e in s.scalars(select(AuditEvent).order_by("id"))]
    assert events[-2:] == [("job.retry", f"job:{failed}"), ("job.cancel", f"job:{queued}")]


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_health_and_prometheus_metrics_from_the_database(
    client: httpx.Client, sessions: sessionmaker[Session]
) -> None:
    with sessions() as s:
        add_job(s, JobState.FAILED, uid="1.2.3.4.1", error="export: association rejected\nmore")
        add_job(s, JobState.QUEUED, uid="1.2.3.4.2")
        add_job(s, JobState.SUCCEEDED, uid="1.2.3.4.3")
        series = s.scalars(select(Series)).first()
        assert series is not None
        for i in range(4):
            s.add(
                Instance(
                    sop_instance_uid=f"1.2.3.4.1.{i}",
                    series=series,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"x/{i}.dcm",
                    size_bytes=10,
                )
            )
        s.commit()
    body = client.get("/api/health").json()
    assert body == {"status": "ok", "checks": {"database": "ok", "spool": "ok"}, "queued_jobs": 1}
    m = metric_values(client.get("/metrics").text)
    assert m[("hpb_instances_received_total", ())] == 4
    assert m[("hpb_queue_depth", ())] == 1
    assert m[("hpb_jobs", (("state", "failed"),))] == 1
    assert m[("hpb_job_failures_total", (("reason", "export"),))] == 1
    assert m[("hpb_job_duration_seconds_count", (("pipeline", "hpb-ct"),))] == 2
    assert m[("hpb_job_duration_seconds_bucket", (("le", "60.0"), ("pipeline", "hpb-ct")))] == 2
    assert m[("hpb_job_duration_seconds_bucket", (("le", "15.0"), ("pipeline", "hpb-ct")))] == 0


def test_health_reports_a_missing_spool(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    broken = settings.model_copy(
        update={"spool": settings.spool.model_copy(update={"root": tmp_path / "gone"})}
    )
    app = FastAPI()
    app.include_router(admin_router(sessions, broken))
    with serve(app) as c:
        r = c.get("/api/health")
    assert r.status_code == 503 and r.json()["checks"]["spool"].startswith("missing")


def test_cli_admin_tokens_rules_destinations_jobs(
    tmp_path: Path, settings: Settings, sessions: sessionmaker[Session], capsys: Any
) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(json.dumps(settings.model_dump(mode="json")))
    base = ["--config", str(cfg), "admin"]
    assert cli_main([*base, "token", "create", "ops", "--role", "admin"]) == 0
    token = capsys.readouterr().out.strip()
    with sessions() as s:
        assert auth.resolve_token(s, token) == auth.Principal("ops", auth.Role.ADMIN)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: liver-ct\n    pipeline: hpb-ct\n    match: {modality: [CT]}\n"
    )
    assert cli_main([*base, "rule", "apply", str(rules)]) == 0
    assert cli_main([*base, "rule", "apply", str(rules)]) == 0
    assert "created rule liver-ct" in capsys.readouterr().out
    assert cli_main([*base, "destination", "add", "pacs", "--dimse", "PACS@10.0.0.5:104"]) == 0
    assert json.loads(capsys.readouterr().out)["port"] == 104
    assert cli_main([*base, "destination", "add", "bad", "--dimse", "nonsense"]) == 2
    with sessions() as s:
        job = add_job(s, JobState.FAILED, error="model: x")
    assert cli_main([*base, "job", "retry", str(job)]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "queued"
    assert cli_main([*base, "job", "retry", "4711"]) == 2
    assert "job 4711 not found" in capsys.readouterr().err
    with sessions() as s:
        actions = [e.action for e in s.scalars(select(AuditEvent).order_by("id"))]
    assert actions == [
        "token.create",
        "rule.create",
        "rule.update",
        "destination.create",
        "job.retry",
    ]
