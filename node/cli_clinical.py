"""``hpb-node clinical``: import lab results and history, run the HL7 listener, fetch from FHIR."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from node.errors import ClinicalDataError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("clinical", help="clinical data: import, HL7 listener, FHIR fetch")
    sub = p.add_subparsers(dest="clinical_command", required=True)

    imp = sub.add_parser("import", help="import lab results / history from a CSV or JSON file")
    imp.add_argument("file", type=Path)
    imp.set_defaults(func=run_import)

    lis = sub.add_parser("listen", help="receive HL7 v2 ORU^R01 results over MLLP")
    lis.add_argument("--host", default=None, help="default: settings clinical.mllp_host")
    lis.add_argument("--port", type=int, default=None, help="default: settings clinical.mllp_port")
    lis.set_defaults(func=run_listen)

    fetch = sub.add_parser("fetch", help="fetch one patient's labs and history from FHIR")
    fetch.add_argument("--patient-id", required=True)
    fetch.add_argument("--issuer", default="")
    fetch.add_argument("--study-date", required=True, help="YYYYMMDD")
    fetch.set_defaults(func=run_fetch)


def _sessions(args: argparse.Namespace) -> tuple[Any, Any]:
    from node.db import create_engine_for, session_factory
    from node.migrate import upgrade
    from node.settings import load_settings

    settings = load_settings(Path(args.config) if args.config else None)
    upgrade(settings.database.url)  # the clinical tables are in the node's migrations
    engine = create_engine_for(settings.database.url)
    return settings, session_factory(engine)


def run_import(args: argparse.Namespace) -> int:
    from node.clinical.importer import import_file

    settings, sessions = _sessions(args)
    with sessions() as session, session.begin():
        result = import_file(session, args.file, settings.clinical.timezone)
    print(
        json.dumps(
            {
                "stored": result.stored,
                "notes": result.notes,
                "duplicates": result.duplicates,
                "not_in_panel": result.not_in_panel,
                "implausible": result.implausible,
            }
        )
    )
    return 0


def run_listen(args: argparse.Namespace) -> int:
    from node.clinical.hl7v2 import Hl7Handler, MllpServer

    settings, sessions = _sessions(args)
    c = settings.clinical
    server = MllpServer(
        Hl7Handler(sessions, c.timezone), args.host or c.mllp_host, args.port or c.mllp_port
    )
    print(f"MLLP listener on {server.host}:{server.port} (Ctrl-C to stop)", flush=True)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise ClinicalDataError(f"cannot listen on {server.host}:{server.port}: {exc}") from exc
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from node.clinical.fhir import FhirClient
    from node.clinical.linking import StudyKey
    from node.clinical.store import store_batch

    settings, sessions = _sessions(args)
    c = settings.clinical
    if not c.fhir_base_url:
        raise ClinicalDataError("settings clinical.fhir_base_url is not set")
    key = StudyKey(args.patient_id, args.issuer, study_date=args.study_date)
    with FhirClient(c.fhir_base_url, timeout_s=c.fhir_timeout_s) as client:
        labs, notes = client.fetch(
            system=c.fhir_identifier_systems.get(args.issuer, args.issuer),
            patient_id=args.patient_id,
            issuer=args.issuer,
            study_time=key.when(),
            days_before=c.days_before,
            hours_after=c.hours_after,
        )
    with sessions() as session, session.begin():
        result = store_batch(session, labs, notes, where="FHIR")
    print(
        json.dumps(
            {"stored": result.stored, "notes": result.notes, "duplicates": result.duplicates}
        )
    )
    return 0
