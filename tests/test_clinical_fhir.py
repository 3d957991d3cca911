"""FHIR R4 client against recorded bundles.

No FHIR server that runs offline could be installed here (HAPI needs Java and a
download; the npm/PyPI candidates are frameworks without storage), so the FHIR
R4 search responses are recorded bundles authored under ``tests/data/fhir/``,
served on loopback by a tiny HTTP server that checks the search parameters the
client sends. The client parses them with ``fhir.resources`` (R4B models).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from node.clinical.fhir import FhirClient
from node.clinical.linking import StudyKey, clinical_context
from node.clinical.store import ensure_tables, store_batch
from node.errors import ClinicalDataError

DATA = Path(__file__).parent / "data" / "fhir"


class RecordedFhir(ThreadingHTTPServer):
    """Serves the recorded bundles; remembers every query it was asked."""

    queries: list[tuple[str, dict[str, list[str]]]]
    base: str


def _handler() -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server: RecordedFhir

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/fhir+json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, name: str) -> None:
            text = (DATA / name).read_text(encoding="utf-8").replace("BASE", self.server.base)
            self._send(200, text.encode())

        def do_GET(self) -> None:
            url = urlparse(self.path)
            q = parse_qs(url.query)
            self.server.queries.append((url.path, q))
            path = url.path.removeprefix("/fhir")
            if path == "/Patient":
                ident = q.get("identifier", [""])[0]
                self._file(
                    "patient-search.json"
                    if ident == "urn:oid:1.2.3.4|P123"
                    else "empty-search.json"
                )
            elif path == "/Observation":
                if q.get("page") == ["2"]:
                    self._file("observation-search-2.json")
                elif q.get("patient") == ["pat-1"] and len(q.get("date", [])) == 2:
                    self._file("observation-search-1.json")
                else:
                    self._send(400, b'{"resourceType": "OperationOutcome"}')
            elif path == "/Condition":
                self._file("condition-search.json")
            elif path == "/DiagnosticReport":
                self._file("diagnosticreport-search.json")
            elif path == "/broken/Patient":
                self._send(500, b"internal error", "text/plain")
            elif path == "/invalid/Patient":
                self._file("not-a-bundle.json")
            else:
                self._send(404, b"{}")

    return Handler


@pytest.fixture()
def fhir_server() -> Iterator[RecordedFhir]:
    server = RecordedFhir(("127.0.0.1", 0), _handler())
    server.queries = []
    server.base = f"http://127.0.0.1:{server.server_address[1]}/fhir"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()
    t.join()


@pytest.fixture()
def session(tmp_path: Path) -> Iterator[Session]:
    engine = create_engine(f"sqlite:///{tmp_path / 'clinical.db'}")
    ensure_tables(engine)
    with sessionmaker(engine)() as s:
        yield s
    engine.dispose()


STUDY = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)


def test_fetch_parses_pages_units_and_notes(fhir_server: RecordedFhir, session: Session) -> None:
    with FhirClient(fhir_server.base) as client:
        labs, notes = client.fetch(
            system="urn:oid:1.2.3.4", patient_id="P123", issuer="HOSP", study_time=STUDY
        )
    # preliminary ALT skipped; page 2 followed; glucose (not in the panel) still parsed
    assert sorted(r.code for r in labs) == ["14631-6", "1834-1", "2345-7", "5196-1", "777-3"]
    hbs = next(r for r in labs if r.code == "5196-1")
    assert hbs.value == "positive"
    bili = next(r for r in labs if r.code == "14631-6")
    assert bili.unit == "umol/L" and bili.observed_at == datetime(2026, 3, 9, 7, 30, tzinfo=UTC)
    assert {n.kind for n in notes} == {"condition", "report"}
    # the Observation search carried the panel's LOINC codes and a two-sided date window
    obs_q = next(q for p, q in fhir_server.queries if p.endswith("/Observation") and "code" in q)
    assert "http://loinc.org|1975-2" in obs_q["code"][0]
    assert sorted(d[:2] for d in obs_q["date"]) == ["ge", "le"]

    with session.begin():
        result = store_batch(session, labs, notes, where="FHIR")
    assert (result.stored, result.notes, result.not_in_panel) == (4, 2, 1)
    ctx = clinical_context(
        session, StudyKey("P123", "HOSP", study_date="20260310", study_time="090000")
    )
    labs_now = ctx.lab_values()
    assert labs_now["BILI_T"] == pytest.approx(2.0, abs=0.01)  # 34.2 µmol/L -> mg/dL
    assert labs_now["PLT"] == pytest.approx(92.0)  # 10*9/L == 10*3/uL
    assert labs_now["HBSAG"] == 1.0 and labs_now["AFP"] == 412.0
    assert "ALT: no result" in " ".join(ctx.missing)
    assert "Chronic hepatitis B" in ctx.history and "surveillance ultrasound" in ctx.history

    # fetching again stores nothing twice
    again = store_batch(session, labs, notes, where="FHIR")
    session.commit()
    assert again.stored == 0 and again.duplicates == 6


def test_unknown_patient_gives_no_data(fhir_server: RecordedFhir) -> None:
    with FhirClient(fhir_server.base) as client:
        labs, notes = client.fetch(
            system="urn:oid:1.2.3.4", patient_id="NOPE", issuer="", study_time=STUDY
        )
    assert labs == [] and notes == []
    assert not any(p.endswith("/Observation") for p, _ in fhir_server.queries)


def test_server_errors_become_clinical_data_errors(fhir_server: RecordedFhir) -> None:
    with (
        FhirClient(fhir_server.base + "/broken") as client,
        pytest.raises(ClinicalDataError, match="HTTP 500"),
    ):
        client.patient_id("urn:oid:1.2.3.4", "P123")
    with (
        FhirClient(fhir_server.base + "/invalid") as client,
        pytest.raises(ClinicalDataError, match="not a valid R4 Bundle"),
    ):
        client.patient_id("urn:oid:1.2.3.4", "P123")
    from tests.conftest import free_port

    with (
        FhirClient(f"http://127.0.0.1:{free_port()}/fhir", timeout_s=2) as client,
        pytest.raises(ClinicalDataError, match="unreachable"),
    ):
        client.patient_id("urn:oid:1.2.3.4", "P123")


def test_recorded_bundles_are_valid_r4_json() -> None:
    from fhir.resources.R4B.bundle import Bundle

    for path in sorted(DATA.glob("*-search*.json")):
        bundle = Bundle.model_validate(json.loads(path.read_text(encoding="utf-8")))
        assert bundle.type == "searchset", path.name


def test_context_for_a_study_row_fetches_stores_and_links(
    fhir_server: RecordedFhir, tmp_path: Path
) -> None:
    """The worker's call: node.db Study rows, FHIR fetch, store, link."""
    from node.clinical.linking import context_for_study
    from node.db import Base, Study
    from node.settings import ClinicalSettings

    engine = create_engine(f"sqlite:///{tmp_path / 'node.db'}")
    Base.metadata.create_all(engine)  # node tables and the clinical tables share the metadata
    settings = ClinicalSettings(
        fhir_base_url=fhir_server.base, fhir_identifier_systems={"HOSP": "urn:oid:1.2.3.4"}
    )
    with sessionmaker(engine)() as s:
        ct = Study(
            study_instance_uid="1.2.3.1",
            patient_id="P123",
            issuer_of_patient_id="HOSP",
            accession_number="A-CT",
            study_date="20260310",
        )
        mr = Study(
            study_instance_uid="1.2.3.2",
            patient_id="P123",
            issuer_of_patient_id="HOSP",
            accession_number="A-MR",
            study_date="20260310",
        )
        s.add_all([ct, mr])
        s.commit()
        ctx, problems = context_for_study(s, ct, settings, study_time="090000", age=64, sex="M")
        s.commit()
        assert problems == []
        assert ctx.lab_values()["AFP"] == 412.0 and ctx.age == 64
        assert "Chronic hepatitis B" in ctx.history

        broken = ClinicalSettings(fhir_base_url=fhir_server.base + "/broken")
        headers = {"StudyTime": "150000", "PatientAge": "064Y", "PatientSex": "M"}
        ctx2, problems2 = context_for_study(s, mr, broken, headers=headers)
        assert ctx2.age == 64 and ctx2.sex == "M"
        assert problems2 and "HTTP 500" in problems2[0]
        assert ctx2.lab_values()["AFP"] == 412.0  # stored data still used
    engine.dispose()


def test_cli_fetch(
    fhir_server: RecordedFhir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import main as cli_main

    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        f"database:\n  url: sqlite:///{tmp_path / 'n.db'}\n"
        f"clinical:\n  fhir_base_url: {fhir_server.base}\n"
        "  fhir_identifier_systems:\n    HOSP: urn:oid:1.2.3.4\n"
    )
    args = ["--config", str(cfg), "clinical", "fetch", "--patient-id", "P123", "--issuer", "HOSP"]
    assert cli_main([*args, "--study-date", "20260310"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"stored": 4, "notes": 2, "duplicates": 0}
    assert cli_main([*args, "--study-date", "2026-03-10"]) == 2
    assert "not a DICOM date" in capsys.readouterr().err
