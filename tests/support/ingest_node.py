"""A running ingest node (Storage SCP + Store on a migrated SQLite database) for tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from models.series_writer import SeriesInfo, write_series
from node.db import Instance, Rejection, create_engine_for, session_factory
from node.ingest import StorageSCP, Store
from node.migrate import upgrade
from node.settings import Settings


@dataclass
class IngestNode:
    settings: Settings
    store: Store
    scp: StorageSCP
    sessions: sessionmaker[Session]
    port: int

    @property
    def spool_root(self) -> Path:
        return self.store.spool.root

    def rejections(self) -> list[Rejection]:
        with self.sessions() as s:
            return list(s.scalars(select(Rejection).order_by(Rejection.id)))

    def instance_count(self) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)

    def spool_files(self) -> list[Path]:
        return sorted(self.spool_root.glob("*/*/*.dcm"))


def make_settings(tmp: Path, **ingest: Any) -> Settings:
    return Settings.model_validate(
        {
            "ingest": {"ae_title": "HPBNODE", "port": 0, **ingest},
            "spool": {"root": str(tmp / "spool"), "min_free_mb": 0},
            "database": {"url": f"sqlite:///{tmp / 'node.db'}"},
        }
    )


@contextmanager
def running_node(
    tmp: Path,
    *,
    free_bytes: Callable[[], int] | None = None,
    min_free_mb: int = 0,
    start: bool = True,
    **ingest: Any,
) -> Iterator[IngestNode]:
    """Migrate a fresh SQLite database, build the Store and start the SCP on a free port."""
    settings = make_settings(tmp, **ingest)
    settings.spool.min_free_mb = min_free_mb
    upgrade(settings.database.url)
    engine = create_engine_for(settings.database.url)
    sessions = session_factory(engine)
    store = Store.from_settings(settings, sessions, free_bytes=free_bytes)
    scp = StorageSCP(settings.ingest, store)
    port = scp.start(port=0) if start else 0
    try:
        yield IngestNode(settings, store, scp, sessions, port)
    finally:
        scp.stop(timeout=5)
        engine.dispose()


def ct_series(
    out: Path,
    *,
    n: int = 3,
    size: int = 16,
    seed: str = "ingest-test",
    transfer_syntax: str = ExplicitVRLittleEndian,
    modality: str = "CT",
    info: SeriesInfo | None = None,
) -> list[Path]:
    """A small real CT (or MR) series with random-ish integer values."""
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    low, high = (-1000, 1500) if modality == "CT" else (0, 3000)
    array = rng.integers(low, high, size=(n, size, size)).astype(np.float64)
    affine = np.diag([2.5, 0.8, 0.8, 1.0])
    affine[:3, 3] = [-100.0, -120.0, 30.0]
    return write_series(
        array,
        affine,
        out,
        modality=modality,
        info=info,
        seed=seed,
        transfer_syntax=transfer_syntax,
    )


def read_arrays(paths: Sequence[Path]) -> list[np.ndarray[Any, Any]]:
    from pydicom import dcmread

    return [dcmread(p).pixel_array for p in paths]
