"""Pull mode (node/pull.py, ``hpb-node pull``) against a real Orthanc without the router.

DCMTK storescu fills Orthanc; the puller follows /changes, fetches the stable
CT series into the node's real ingest path (spool + database rows), skips the
node's own SEG and a scout, and after a restart resumes from the stored
change number: nothing is fetched twice, a new series is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import func, select

from node import migrate
from node.cli import main as cli_main
from node.db import Instance, Series, create_engine_for, session_factory
from node.ingest import Store
from node.pull import PullCursor, Puller, PullFilters, connect, ensure_cursor_table
from node.settings import Settings
from tests.conftest import free_port
from tests.test_orthanc_plugin import (
    AUTH,
    copy_series,
    start_orthanc,
    stop_orthanc,
    storescu,
    wait_for,
)

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


def stable_series(client: Any) -> int:
    changes = client.get("/changes", params={"limit": 1000}).json()["Changes"]
    return sum(c["ChangeType"] == "StableSeries" for c in changes)


def test_pull_fetches_stable_series_and_resumes_after_restart(
    shared_data: Path, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = shared_data / "ct_liver_3slice"
    ct = sorted(src.glob("0*.dcm"))
    ct_uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID)
    seg_uid = str(pydicom.dcmread(src / "liver_seg.dcm", stop_before_pixels=True).SeriesInstanceUID)
    scout_uid, scout = copy_series(ct, tmp_path / "scout", SeriesDescription="SCOUT")
    late_uid, late = copy_series(ct, tmp_path / "late", SeriesDescription="Portal venous")

    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    settings = Settings.model_validate(
        {"database": {"url": db_url}, "spool": {"root": str(tmp_path / "spool"), "min_free_mb": 0}}
    )
    migrate.upgrade(db_url)
    engine = create_engine_for(db_url)
    ensure_cursor_table(engine)
    sessions = session_factory(engine)

    orth = start_orthanc(tmp_path / "orthanc", 9, {"Enabled": False})
    try:
        storescu(orth, ct)
        storescu(orth, [src / "liver_seg.dcm"], calling_ae="HPBNODE")
        storescu(orth, scout)
        wait_for(lambda: stable_series(orth.client) == 3, 60, "three stable series in Orthanc")

        with connect(orth.url, *AUTH) as client:
            puller = Puller(
                client,
                sessions,
                Store.from_settings(settings, sessions),
                source=orth.url,
                filters=PullFilters(),
                batch=2,  # several pages of changes
            )
            report = puller.run_until_idle()
        assert report.fetched_series == [ct_uid]
        assert report.fetched_instances == 3 and report.refused_instances == 0
        assert report.skipped == {
            seg_uid: "node output: modality SEG",
            scout_uid: "filter: series description excluded",
        }
        last = orth.get("/changes?last")["Last"]
        assert report.last_seq == last
        with sessions() as s:
            assert s.get(PullCursor, orth.url).last_seq == last  # type: ignore[union-attr]
            rows = s.scalars(select(Instance)).all()
            assert len(rows) == 3 and {r.calling_ae for r in rows} == {"ORTHANC-PULL"}
            assert all((tmp_path / "spool" / r.path).is_file() for r in rows)
            series = s.scalars(select(Series)).one()
            assert series.series_instance_uid == ct_uid and series.instance_count == 3

        # Restart (new engine, new puller through the CLI): resumes after `last`.
        engine.dispose()
        storescu(orth, late)
        wait_for(lambda: stable_series(orth.client) == 4, 60, "the late series to be stable")
        cfg = tmp_path / "node.yaml"
        cfg.write_text(json.dumps(settings.model_dump(mode="json")))
        monkeypatch.setenv("TEST_ORTHANC_PASSWORD", AUTH[1])
        code = cli_main(
            [
                "--config",
                str(cfg),
                "pull",
                "--orthanc",
                orth.url,
                "--user",
                AUTH[0],
                "--password-env",
                "TEST_ORTHANC_PASSWORD",
                "--once",
            ]
        )
        assert code == 0
        assert (
            "pulled 1 series, 3 instances (0 refused), 0 series skipped" in capsys.readouterr().out
        )
        engine = create_engine_for(db_url)
        with session_factory(engine)() as s:
            uids = set(s.scalars(select(Series.series_instance_uid)))
            assert uids == {ct_uid, late_uid}
            assert s.scalar(select(func.count(Instance.id))) == 6
        engine.dispose()
    finally:
        stop_orthanc(orth)


def test_pull_reports_an_unreachable_orthanc(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        json.dumps(
            {
                "database": {"url": f"sqlite:///{tmp_path / 'n.db'}"},
                "spool": {"root": str(tmp_path / "spool")},
            }
        )
    )
    url = f"http://127.0.0.1:{free_port()}"
    assert cli_main(["--config", str(cfg), "pull", "--orthanc", url, "--once"]) == 2


def test_end_to_end_pull_mode_results_in_orthanc(
    shared_data: Path, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """storescu -> Orthanc (no routing) <- hpb-node pull -> node -> model -> SEG, SR, PDF in Orthanc."""
    from tests.test_orthanc_plugin import (
        E2E_PIPELINE,
        E2E_TOKEN,
        check_model_results,
        e2e_ct,
        node_config,
        node_results_delivered,
        start_node,
        stop_node,
        study_modalities,
    )

    pipeline, modules, expected = E2E_PIPELINE
    study_uid, series_uid, files = e2e_ct(shared_data, tmp_path / "ct", "e2e-pull")
    node_port = free_port()
    orth = start_orthanc(tmp_path / "orthanc", node_port, {"Enabled": False})
    node = None
    try:
        (tmp_path / "node").mkdir()
        cfg = node_config(tmp_path / "node", orth, node_port, pipeline, E2E_TOKEN)
        node = start_node(tmp_path / "node", cfg, E2E_TOKEN, *modules)
        storescu(orth, files)
        wait_for(lambda: stable_series(orth.client) == 1, 60, "the CT to be stable in Orthanc")
        pull = ["--config", str(cfg), "pull", "--orthanc", orth.url, "--user", AUTH[0]]
        pull += ["--password-env", "TEST_ORTHANC_PASSWORD", "--once"]
        monkeypatch.setenv("TEST_ORTHANC_PASSWORD", AUTH[1])
        assert cli_main(pull) == 0
        assert "pulled 1 series, 112 instances (0 refused)" in capsys.readouterr().out
        wait_for(
            lambda: node_results_delivered(node, orth, series_uid),
            300,
            f"the node's results ({sorted(expected)} at least) in Orthanc",
        )
        assert expected <= set(study_modalities(orth, study_uid))
        check_model_results(orth, study_uid, series_uid, files)
        # the node's own results are never pulled back
        n_results = sum(len(v) for k, v in study_modalities(orth, study_uid).items() if k != "CT")
        wait_for(
            lambda: stable_series(orth.client) == 1 + n_results, 60, "the results to be stable"
        )
        assert cli_main(pull) == 0
        assert f"pulled 0 series, 0 instances (0 refused), {n_results} series skipped" in (
            capsys.readouterr().out
        )
        assert len(node.api.get("/api/jobs").json()) == 1
    finally:
        if node is not None:
            stop_node(node)
        stop_orthanc(orth)
