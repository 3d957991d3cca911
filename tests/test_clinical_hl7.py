"""HL7 v2 ORU^R01 over a real MLLP exchange on loopback (``hl7.client.MLLPClient``)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import hl7
import pytest
from hl7.client import MLLPClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from node.clinical.hl7v2 import Hl7Handler, MllpServer, parse_oru, parse_ts
from node.clinical.store import ClinicalObservation, Hl7Message, ensure_tables

DATA = Path(__file__).parent / "data" / "hl7"


def message(name: str) -> str:
    return "\r".join((DATA / name).read_text(encoding="utf-8").splitlines()) + "\r"


@pytest.fixture()
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = create_engine(f"sqlite:///{tmp_path / 'hl7.db'}")
    ensure_tables(engine)
    yield sessionmaker(engine)
    engine.dispose()


@pytest.fixture()
def server(sessions: sessionmaker[Session]) -> Iterator[MllpServer]:
    srv = MllpServer(Hl7Handler(sessions, "Europe/Berlin"), "127.0.0.1", 0)
    srv.start()
    yield srv
    srv.stop()


def send(server: MllpServer, text: str) -> hl7.Message:
    with MLLPClient("127.0.0.1", server.port) as client:
        raw = client.send_message(text)
    return hl7.parse(raw.strip(b"\x0b\x1c\r").decode("utf-8"))


def count(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return int(s.execute(select(func.count(ClinicalObservation.id))).scalar_one())


def test_valid_result_is_acknowledged_and_stored(
    server: MllpServer, sessions: sessionmaker[Session]
) -> None:
    ack = send(server, message("oru_r01_valid.hl7"))
    assert str(ack.segment("MSA")[1]) == "AA"
    assert str(ack.segment("MSA")[2]) == "LAB-0001"
    assert str(ack.segment("MSH")[9]) == "ACK^R01^ACK"
    with sessions() as s:
        rows = {r.name: r for r in s.execute(select(ClinicalObservation)).scalars()}
    # glucose (not in the panel) and the preliminary AST are not stored
    assert sorted(rows) == ["ALB", "ALT", "BILI_T", "HBSAG"]
    assert rows["BILI_T"].value == pytest.approx(3.0, abs=0.01)  # 51.3 µmol/L
    assert rows["BILI_T"].original_unit == "umol/L" and rows["BILI_T"].unit == "mg/dL"
    assert rows["ALB"].value == pytest.approx(3.1)  # g/L -> g/dL
    assert rows["HBSAG"].value == 1.0
    assert rows["BILI_T"].observed_at == datetime(2026, 3, 10, 6, 45, tzinfo=UTC)
    # OBX-14 empty: OBR-7 is used, read with its +0100 offset
    assert rows["ALT"].observed_at == datetime(2026, 3, 10, 6, 45, tzinfo=UTC)
    assert rows["ALT"].patient_id == "P123" and rows["ALT"].issuer == "HOSP"
    assert rows["ALT"].accession_number == "F-77"

    # re-delivery of the same control ID: AA again, nothing duplicated
    ack2 = send(server, message("oru_r01_valid.hl7"))
    assert str(ack2.segment("MSA")[1]) == "AA"
    assert "duplicate" in str(ack2.segment("MSA")[3])
    assert count(sessions) == 4


@pytest.mark.parametrize(
    ("name", "code", "reason"),
    [
        ("oru_r01_bad_unit.hl7", "AE", "wrong dimension"),
        ("oru_r01_not_numeric.hl7", "AE", "not a number"),
        ("oru_r01_no_patient.hl7", "AE", "PID-3"),
        ("adt_a01.hl7", "AR", "unsupported message type ADT^A01"),
    ],
)
def test_unusable_messages_are_refused_with_a_reason_and_nothing_is_stored(
    server: MllpServer, sessions: sessionmaker[Session], name: str, code: str, reason: str
) -> None:
    ack = send(server, message(name))
    assert str(ack.segment("MSA")[1]) == code
    err = str(ack.segment("ERR")[8]).replace("\\S\\", "^")
    assert reason in err
    # the valid first OBX of a bad message was not half-stored
    assert count(sessions) == 0
    with sessions() as s:
        logged = s.execute(select(Hl7Message)).scalars().one()
    assert logged.ack_code == code and reason.split()[0] in logged.reason


def test_structured_numeric_and_coded_values(
    server: MllpServer, sessions: sessionmaker[Session]
) -> None:
    ack = send(server, message("oru_r01_sn_cwe.hl7"))
    assert str(ack.segment("MSA")[1]) == "AA"
    assert "1 skipped" in str(ack.segment("MSA")[3])  # CA 19-9 "<2": no exact value
    with sessions() as s:
        rows = {r.name: r.value for r in s.execute(select(ClinicalObservation)).scalars()}
    assert rows == {"AFP": 12.5, "ANTI_HCV": 0.0}


def test_garbage_is_rejected(server: MllpServer) -> None:
    ack = send(server, "this is not HL7 at all")
    assert str(ack.segment("MSA")[1]) == "AR"
    assert "MSH" in str(ack.segment("MSA")[3])


def test_several_messages_on_one_connection(
    server: MllpServer, sessions: sessionmaker[Session]
) -> None:
    with MLLPClient("127.0.0.1", server.port) as client:
        a1 = client.send_message(message("adt_a01.hl7"))
        a2 = client.send_message(message("oru_r01_valid.hl7"))
    assert b"MSA|AR|ADT-0001" in a1 and b"MSA|AA|LAB-0001" in a2
    assert count(sessions) == 4


def test_parse_ts_and_parse_oru_directly() -> None:
    from zoneinfo import ZoneInfo

    berlin = ZoneInfo("Europe/Berlin")
    assert parse_ts("20260310074500", berlin) == datetime(2026, 3, 10, 6, 45, tzinfo=UTC)
    assert parse_ts("202603100745-0500", berlin) == datetime(2026, 3, 10, 12, 45, tzinfo=UTC)
    assert parse_ts("2026-03-10", berlin) is None
    msg = parse_oru(message("oru_r01_valid.hl7"))
    assert msg.control_id == "LAB-0001" and msg.skipped == 1 and len(msg.labs) == 5


def test_cli_listener_end_to_end(tmp_path: Path) -> None:
    """``hpb-node clinical listen`` as a process: real MLLP exchange, stored in its database."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, free_port

    port = free_port()
    db = tmp_path / "node.db"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"database:\n  url: sqlite:///{db}\n")
    log = tmp_path / "listen.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node",
                "--config",
                str(cfg),
                "clinical",
                "listen",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:  # wait for readiness: the port accepts connections
                assert proc.poll() is None, log.read_text()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "listener did not come up"
                    time.sleep(0.1)
            with MLLPClient("127.0.0.1", port) as client:
                ack = client.send_message(message("oru_r01_valid.hl7"))
            assert b"MSA|AA|LAB-0001" in ack
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    assert proc.returncode == 0
    engine = create_engine(f"sqlite:///{db}")
    with sessionmaker(engine)() as s:
        assert s.execute(select(func.count(ClinicalObservation.id))).scalar_one() == 4
    engine.dispose()
