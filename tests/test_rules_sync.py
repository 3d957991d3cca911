"""Rules file -> database: reload removes what the file no longer defines, keeps admin rules;
the ``rules.source`` migration on SQLite; ``hpb-node rules test`` reading the database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.orm import Session, sessionmaker

from models.series_writer import SeriesInfo, write_series
from node import api
from node.cli import main
from node.db import AuditEvent, RuleRow, RuleSource, create_engine_for, session_factory
from node.migrate import alembic_config, schema_differences, upgrade
from node.rules import load_rules_file, sync_to_database
from node.serve import load_rules_into
from node.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def write_rules(path: Path, *rules: str) -> Path:
    path.write_text("rules:\n" + "".join(f"  - {r}\n" for r in rules), encoding="utf-8")
    return path


def rows(sessions: sessionmaker[Session]) -> dict[str, RuleRow]:
    with sessions() as s:
        return {r.name: r for r in s.scalars(select(RuleRow))}


def audits(sessions: sessionmaker[Session], action: str) -> list[AuditEvent]:
    with sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action)))


@pytest.fixture()
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    return url


@pytest.fixture()
def sessions(db_url: str) -> sessionmaker[Session]:
    return session_factory(create_engine_for(db_url))


def test_reload_removes_rules_dropped_from_the_file_and_keeps_admin_rules(
    tmp_path: Path, db_url: str, sessions: sessionmaker[Session]
) -> None:
    rules_file = write_rules(
        tmp_path / "rules.yaml",
        "{name: liver-ct, priority: 10, pipeline: hpb-ct-mr, match: {modality: CT}}",
        "{name: liver-mr, priority: 20, pipeline: hpb-ct-mr, match: {modality: MR}}",
    )
    settings = Settings.model_validate({"database": {"url": db_url}, "rules_file": str(rules_file)})
    assert load_rules_into(sessions, settings) == 2  # what hpb-node serve does at start
    with sessions.begin() as s:  # an admin adds one through the API
        api.put_rule(
            s,
            api.RuleIn(name="us-admin", definition={"pipeline": "p", "match": {"modality": "US"}}),
            "admin",
            create=True,
        )
    assert {n: r.source for n, r in rows(sessions).items()} == {
        "liver-ct": RuleSource.FILE,
        "liver-mr": RuleSource.FILE,
        "us-admin": RuleSource.API,
    }

    # liver-mr removed from the file, liver-ct changed: restart (serve reloads the file)
    write_rules(
        rules_file, "{name: liver-ct, priority: 5, pipeline: hpb-ct-mr, match: {modality: CT}}"
    )
    load_rules_into(sessions, settings)
    now = rows(sessions)
    assert sorted(now) == ["liver-ct", "us-admin"]  # the admin's rule is not silently deleted
    assert now["liver-ct"].priority == 5
    (removed,) = audits(sessions, "rule.remove")
    assert removed.target == "rule:liver-mr" and removed.actor == "system:rules-file"
    assert removed.detail["reason"] == "no longer in the rules file"
    assert removed.detail["definition"]["match"] == {"modality": ["MR"]}  # restorable

    # an unchanged reload changes and audits nothing
    before = len(audits(sessions, "rule.load"))
    with sessions.begin() as s:
        report = sync_to_database(s, load_rules_file(rules_file))
    assert (report.unchanged, report.removed, report.created) == (["liver-ct"], [], [])
    assert len(audits(sessions, "rule.load")) == before


def test_file_takes_over_an_admin_rule_of_the_same_name_then_manages_it(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as s:
        api.put_rule(s, api.RuleIn(name="ct", definition={"pipeline": "p"}), "admin", create=True)
    rules_file = write_rules(tmp_path / "r.yaml", "{name: ct, pipeline: hpb-ct-mr}")
    with sessions.begin() as s:
        report = sync_to_database(s, load_rules_file(rules_file))
    assert report.updated == ["ct"]
    assert rows(sessions)["ct"].source == RuleSource.FILE
    taken = [a for a in audits(sessions, "rule.load") if a.target == "rule:ct"]
    assert taken[-1].detail["taken_over_from"] == "api"
    write_rules(rules_file)  # the file now manages no rule at all
    with sessions.begin() as s:
        assert sync_to_database(s, load_rules_file(rules_file)).removed == ["ct"]
    assert rows(sessions) == {}


def test_migration_0002_adds_rule_source_and_keeps_existing_rules(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0001")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:  # a rule stored by a node before this revision
            conn.execute(
                text(
                    "INSERT INTO rules (name, priority, enabled, definition, updated_at)"
                    " VALUES ('old-ct', 10, 1, '{\"pipeline\": \"hpb-ct-mr\"}', '2026-01-01')"
                )
            )
        upgrade(url)
        assert schema_differences(url) == []
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name, source FROM rules")).all() == [
                ("old-ct", "api")  # origin unknown: kept, never deleted by a file load
            ]
        command.downgrade(alembic_config(url), "0001")
        columns = {c["name"] for c in inspect(engine).get_columns("rules")}
        assert "source" not in columns and "definition" in columns
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM rules")).scalars().all() == ["old-ct"]
    finally:
        engine.dispose()
    upgrade(url)
    sessions = session_factory(create_engine_for(url))
    rules_file = write_rules(tmp_path / "r.yaml", "{name: new-mr, pipeline: p}")
    with sessions.begin() as s:
        report = sync_to_database(s, load_rules_file(rules_file))
    assert (report.created, report.removed) == (["new-mr"], [])  # old-ct is not the file's
    assert sorted(rows(sessions)) == ["new-mr", "old-ct"]


# --------------------------------------------------------------------------- rules test


def ct_series(folder: Path) -> Path:
    write_series(
        np.zeros((3, 8, 8), dtype=np.int16),
        np.diag([0.8, 0.8, 1.0, 1.0])[[2, 1, 0, 3]],
        folder,
        info=SeriesInfo(series_description="PORTAL VENOUS 1mm", body_part="ABDOMEN"),
    )
    return folder


def test_cli_rules_test_falls_back_to_the_database(
    tmp_path: Path,
    db_url: str,
    sessions: sessionmaker[Session],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HPB_DATABASE_URL", raising=False)
    folder = ct_series(tmp_path / "series")
    config = tmp_path / "node.yaml"
    config.write_text(f"database: {{url: '{db_url}'}}\n", encoding="utf-8")  # no rules_file
    with sessions.begin() as s:
        for name, priority, enabled, definition in (
            ("thin-pv", 10, True, {"pipeline": "hpb-ct-mr", "match": {"modality": "CT"}}),
            ("mr-only", 20, True, {"pipeline": "hpb-ct-mr", "match": {"modality": "MR"}}),
            ("ct-off", 30, False, {"pipeline": "hpb-ct-mr", "match": {"modality": "CT"}}),
        ):
            api.put_rule(
                s,
                api.RuleIn(name=name, priority=priority, enabled=enabled, definition=definition),
                "admin",
                create=True,
            )
    assert main(["--config", str(config), "rules", "test", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"rules: 3 from database {db_url}" in out
    assert "matched: thin-pv\n" in out
    assert "rule 'mr-only' (priority 20): not matched" in out
    assert "FAIL modality: 'CT' not in ['MR']" in out
    assert "rule 'ct-off' (priority 30): not matched" in out
    assert "FAIL rule is disabled" in out

    # no rule in the database matches: exit 1, still explained
    with sessions.begin() as s:
        api.delete_rule(s, "thin-pv", "admin")
    assert main(["--config", str(config), "rules", "test", str(folder)]) == 1
    assert "matched: no rule" in capsys.readouterr().out


def test_cli_rules_test_database_errors_are_named(tmp_path: Path, db_url: str) -> None:
    folder = ct_series(tmp_path / "series")
    missing = tmp_path / "absent.db"
    env = {**os.environ, "HPB_DATABASE_URL": f"sqlite:///{missing}"}
    run = subprocess.run(
        [sys.executable, "-m", "node", "rules", "test", str(folder)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert f"database sqlite:///{missing} does not exist" in run.stderr
    assert not missing.exists()  # testing rules never creates a database

    empty = tmp_path / "empty.yaml"
    empty.write_text(f"database: {{url: '{db_url}'}}\n", encoding="utf-8")
    env["HPB_DATABASE_URL"] = db_url
    run = subprocess.run(
        [sys.executable, "-m", "node", "--config", str(empty), "rules", "test", str(folder)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert f"no rules to test in database {db_url}" in run.stderr
