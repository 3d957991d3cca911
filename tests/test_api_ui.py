"""The job page (/ui of node/api.py) in Debian's headless Chromium.

The node's admin router runs on a real uvicorn server with jobs in a SQLite
database; tests/ohif/ui_check.cjs types a token into the page and reads the
table it draws. A wrong token shows the API's refusal instead of jobs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi import FastAPI

from node import auth, migrate
from node.api import admin_router
from node.db import JobState, create_engine_for, session_factory
from node.settings import Settings
from tests.test_api import add_job, serve

pytestmark = [pytest.mark.browser]

UI_CHECK = Path(__file__).resolve().parent / "ohif" / "ui_check.cjs"


def test_job_page_lists_jobs_for_a_viewer_token(tmp_path: Path, artifacts_dir: Path) -> None:
    if shutil.which("node") is None or not Path("/usr/bin/chromium").exists():
        pytest.skip("node or /usr/bin/chromium missing (scripts/bootstrap.sh --test)")
    if not (UI_CHECK.parent / "node_modules" / "playwright-core").is_dir():
        pytest.skip("tests/ohif/node_modules missing: run scripts/bootstrap.sh --test (npm ci)")
    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate.upgrade(url)
    engine = create_engine_for(url)
    sessions = session_factory(engine)
    (tmp_path / "spool").mkdir()
    settings = Settings.model_validate(
        {
            "demo": False,
            "http": {"admin_token": "ui-test-admin"},
            "spool": {"root": str(tmp_path / "spool")},
        }
    )
    with sessions() as s:
        add_job(s, JobState.FAILED, uid="1.2.3.4.1", error="model: <b>out of memory</b>")
        add_job(s, JobState.SUCCEEDED, uid="1.2.3.4.2")
        token = auth.create_token(s, "ward-viewer", "viewer", "test")
        s.commit()
    app = FastAPI()
    app.include_router(admin_router(sessions, settings))
    shot = artifacts_dir / "admin-ui-jobs.png"
    with serve(app) as client:
        plan = {
            "url": f"{client.base_url}/ui",
            "screenshot": str(shot),
            "attempts": [
                {"token": token, "expect": "table"},
                {"token": "wrong-token", "expect": "error"},
            ],
        }
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(plan))
        done = subprocess.run(
            ["node", str(UI_CHECK), str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    engine.dispose()
    assert done.returncode == 0, done.stderr[-3000:]
    ok, refused = json.loads(done.stdout)
    assert ok["status"] == "2 job(s)" and ok["tableVisible"]
    assert [r["state"] for r in ok["rows"]] == ["succeeded", "failed"]
    failed = ok["rows"][1]["cells"]
    assert failed[1:5] == ["CT", "hpb-ct", "failed", "0/3"]
    assert failed[5] == "model: <b>out of memory</b>"  # shown as text, never as HTML
    assert ok["consoleErrors"] == []
    assert shot.is_file()
    assert refused["status"].startswith("Error 401") and not refused["tableVisible"]
    assert refused["rows"] == []
