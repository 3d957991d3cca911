"""Run ``hpb-node serve`` / ``hpb-node worker`` as real subprocesses for end-to-end tests.

:func:`write_config` writes a settings YAML for a test node (free loopback
ports, temp spool and SQLite unless a database URL is given, short stability
and retry times). :class:`NodeProcess` starts one process (``python -m
node.cli_serve``), waits for its ready file, and can ``terminate()`` (SIGTERM,
graceful) or ``kill()`` (SIGKILL, a crash).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db import Job, OutboxItem, create_engine_for, session_factory
from tests.conftest import ROOT, free_port

PIPELINES = "tests.support.threshold_pipeline"


def write_config(
    tmp: Path,
    *,
    rules: dict[str, Any],
    database_url: str | None = None,
    workers: int = 1,
    lease_s: float = 5.0,
    export_attempts: int = 3,
    export_backoff_s: float = 0.3,
    stable_after_s: float = 1.0,
) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    rules_file = tmp / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules))
    config = {
        "rules_file": str(rules_file),
        "ingest": {"ae_title": "HPBNODE", "host": "127.0.0.1", "port": free_port()},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "spool": {"root": str(tmp / "spool"), "min_free_mb": 0},
        "database": {"url": database_url or f"sqlite:///{tmp / 'node.db'}"},
        "scheduler": {"stable_after_s": stable_after_s, "sweep_interval_s": 0.3},
        "workers": {
            "count": workers,
            "lease_s": lease_s,
            "heartbeat_s": max(lease_s / 5, 0.2),
            "backoff_s": 0.2,
            "max_attempts": 3,
        },
        "export": {"max_attempts": export_attempts, "backoff_s": export_backoff_s},
    }
    path = tmp / "settings.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def settings_dict(config: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(config.read_text()))


def sessions_for(config: Path) -> sessionmaker[Session]:
    return session_factory(create_engine_for(settings_dict(config)["database"]["url"]))


class NodeProcess:
    def __init__(
        self,
        config: Path,
        command: str = "serve",
        *,
        workers: int | None = None,
        env: dict[str, str] | None = None,
        name: str = "node",
    ) -> None:
        self.config = config
        self.command = command
        self.workers = workers
        self.env = dict(os.environ, **(env or {}))
        self.log_path = config.parent / f"{name}.log"
        self.ready_file = config.parent / f"{name}.ready.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout: float = 90.0) -> NodeProcess:
        self.ready_file.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "node.cli_serve",
            "--config",
            str(self.config),
            self.command,
            "--pipeline-module",
            PIPELINES,
            "--ready-file",
            str(self.ready_file),
            "--drain-s",
            "10",
        ]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        with self.log_path.open("ab") as fh:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self.ready_file.is_file():
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node not ready after {timeout} s: {self.log_tail()}")
            time.sleep(0.1)
        self.info = json.loads(self.ready_file.read_text())
        return self

    @property
    def dicom_port(self) -> int:
        return int(self.info["dicom_port"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the process dies with no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the graceful stop; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return int(self.proc.returncode)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns a truthy value; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def all_jobs(sessions: sessionmaker[Session]) -> list[Job]:
    with sessions() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def all_outbox(sessions: sessionmaker[Session]) -> list[OutboxItem]:
    with sessions() as s:
        return list(s.scalars(select(OutboxItem).order_by(OutboxItem.id)))
