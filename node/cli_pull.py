"""``hpb-node pull``: fetch stable series from an Orthanc that has no router plugin.

    hpb-node --config node.yaml pull --orthanc http://pacs:8042 --user hpbnode \\
        --password-env ORTHANC_PASSWORD [--once] [--interval 10] [--modality CT MR]

Follows Orthanc's ``/changes`` from the position stored in the node database
(so a restart resumes), downloads matching stable series into the node's
ingest path and lets the usual stability sweep and rules take over.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from node import migrate
from node.db import create_engine_for, session_factory
from node.errors import ConfigError
from node.ingest import Store
from node.pull import Puller, PullFilters, connect, ensure_cursor_table
from node.settings import load_settings


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(Path(args.config) if args.config else None)
    try:
        filters = PullFilters(
            modalities=args.modality,
            body_parts=args.body_part,
            series_description_regex=args.series_regex,
            min_instances=args.min_instances,
            node_ae_titles=[settings.ingest.ae_title],
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"pull: {'.'.join(map(str, first['loc']))}: {first['msg']}") from exc
    password = os.environ.get(args.password_env) if args.password_env else None
    if args.password_env and password is None:
        raise ConfigError(f"pull: environment variable {args.password_env} is not set")
    migrate.upgrade(settings.database.url)
    engine = create_engine_for(settings.database.url)
    ensure_cursor_table(engine)
    sessions = session_factory(engine)
    store = Store.from_settings(settings, sessions)
    with connect(args.orthanc, args.user, password) as client:
        puller = Puller(client, sessions, store, source=args.orthanc, filters=filters)
        if args.once:
            report = puller.run_until_idle()
            print(
                f"pulled {len(report.fetched_series)} series, {report.fetched_instances} "
                f"instances ({report.refused_instances} refused), {len(report.skipped)} "
                f"series skipped; at change {report.last_seq}"
            )
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the loop cleanly
            puller.follow(args.interval, stop.is_set)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("pull", help="fetch stable series from Orthanc (no plugin needed)")
    p.add_argument("--orthanc", required=True, help="Orthanc base URL, e.g. http://pacs:8042")
    p.add_argument("--user", default=None, help="Orthanc user name")
    p.add_argument("--password-env", default=None, help="variable holding the Orthanc password")
    p.add_argument("--once", action="store_true", help="catch up with the change log and exit")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls")
    p.add_argument("--modality", nargs="*", default=["CT", "MR"], help="modalities to fetch")
    p.add_argument("--body-part", nargs="*", default=[], help="BodyPartExamined values")
    p.add_argument("--series-regex", default="", help="SeriesDescription must match")
    p.add_argument("--min-instances", type=int, default=1)
    p.set_defaults(func=_run)
