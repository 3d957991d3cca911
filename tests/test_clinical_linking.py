"""Linking stored results to a study, unit normalisation and CSV/JSON import (edge cases)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from models.labs import (
    LabUnitError,
    age_from_dicom,
    by_code,
    by_name,
    normalise,
    sex_from_dicom,
)
from node.cli import main as cli_main
from node.clinical.importer import read_records
from node.clinical.linking import StudyKey, clinical_context
from node.clinical.store import ClinicalObservation, LabRecord, ensure_tables, store_batch
from node.errors import ClinicalDataError


@pytest.fixture()
def session(tmp_path: Path) -> Iterator[Session]:
    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    ensure_tables(engine)
    with sessionmaker(engine)() as s:
        yield s
    engine.dispose()


def lab(code: str, value: float | str, unit: str, when: datetime, **kw: str) -> LabRecord:
    return LabRecord(
        patient_id=kw.get("patient_id", "P1"),
        issuer=kw.get("issuer", "HOSP"),
        code=code,
        value=value,
        unit=unit,
        observed_at=when,
        source="csv",
        source_ref=kw.get("ref", f"{code}@{when.isoformat()}"),
        accession_number=kw.get("accession", ""),
    )


def t(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, minute, tzinfo=UTC)


# ---------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("name", "value", "unit", "expected"),
    [
        ("BILI_T", 17.1, "umol/L", 1.0),
        ("BILI_T", 17.1, "µmol/l", 1.0),
        ("BILI_T", 0.0171, "mmol/L", 1.0),
        ("BILI_T", 10.0, "mg/L", 1.0),
        ("BILI_D", 5.13, "umol/L", 0.3),
        ("ALB", 35.0, "g/L", 3.5),
        ("PLT", 150.0, "10*9/L", 150.0),
        ("PLT", 150.0, "x10^9/L", 150.0),
        ("ALT", 1.0, "ukat/L", 60.0),
        ("AFP", 10.0, "[IU]/mL", 12.1),
        ("CA19-9", 40.0, "U/mL", 40.0),
        ("CEA", 4.0, "ug/L", 4.0),
    ],
)
def test_unit_conversion(name: str, value: float, unit: str, expected: float) -> None:
    assert normalise(by_name(name), value, unit).value == pytest.approx(expected, rel=2e-3)


def test_units_that_cannot_express_the_analyte_are_refused() -> None:
    with pytest.raises(LabUnitError, match="wrong dimension"):
        normalise(by_name("BILI_T"), 1.0, "U/L")
    with pytest.raises(LabUnitError, match="cannot be converted"):
        normalise(by_name("INR"), 1.0, "mg/dL")
    with pytest.raises(LabUnitError, match="not a UCUM unit"):
        normalise(by_name("ALT"), 1.0, "furlongs per fortnight")
    with pytest.raises(LabUnitError, match="reactive"):
        normalise(by_name("HBSAG"), "maybe", "")


def test_plausibility_and_flags() -> None:
    bad = normalise(by_name("ALB"), 35.0, "g/dL")  # g/L value labelled g/dL
    assert not bad.plausible and "plausible range" in bad.reason
    assert normalise(by_name("ALT"), 90, "U/L").flag == "H"
    assert normalise(by_name("PLT"), 90, "10*3/uL").flag == "L"
    assert normalise(by_name("ANTI_HCV"), "Non-reactive", "").value == 0.0
    assert by_code("14631-6") is by_name("BILI_T")  # alias code -> panel test
    assert by_code("2345-7") is None


def test_age_and_sex_from_dicom_strings() -> None:
    assert age_from_dicom("064Y") == 64
    assert age_from_dicom("018M") == 1
    assert age_from_dicom("", "19610402", "20260310") == 64
    assert age_from_dicom("", "19610402", "20260401") == 64
    assert age_from_dicom("", "19610402", "20260402") == 65
    assert age_from_dicom("", "bad", "20260402") is None
    assert sex_from_dicom("F") == "F" and sex_from_dicom("O") is None


# ---------------------------------------------------------------- linking


def test_two_studies_on_one_day_take_the_right_results(session: Session) -> None:
    """CT at 08:00 (ACC-CT), MR at 15:00 (ACC-MR); labs at 07:00, 12:00 and one ordered with the MR."""
    with session.begin():
        store_batch(
            session,
            [
                lab("1742-6", 40, "U/L", t(10, 7)),
                lab("1742-6", 80, "U/L", t(10, 12)),
                lab("1834-1", 5, "ng/mL", t(10, 7)),
                lab("1834-1", 900, "ng/mL", t(10, 16), accession="ACC-MR"),
            ],
        )
    ct = StudyKey("P1", "HOSP", "ACC-CT", "20260310", "080000", other_accessions=("ACC-MR",))
    mr = StudyKey("P1", "HOSP", "ACC-MR", "20260310", "150000", other_accessions=("ACC-CT",))
    c1, c2 = clinical_context(session, ct), clinical_context(session, mr)
    assert c1.lab_values()["ALT"] == 40  # latest before 08:00; 12:00 is after the study
    assert c2.lab_values()["ALT"] == 80  # latest before 15:00
    assert c1.lab_values()["AFP"] == 5  # the MR's own result is not used for the CT
    assert c2.lab_values()["AFP"] == 900  # own accession preferred, even after the study
    used = c2.value("AFP")
    assert used is not None and used.observed_at == t(10, 16) and used.source == "csv"


def test_results_after_the_study(session: Session) -> None:
    with session.begin():
        store_batch(
            session,
            [
                lab("3040-3", 700, "U/L", t(10, 20)),  # 12 h after: used (nothing earlier)
                lab("1798-8", 300, "U/L", t(12, 9)),  # 2 days after: outside the window
                lab("1742-6", 30, "U/L", t(1, 9)),  # 9 days before
                lab("1742-6", 99, "U/L", t(10, 10)),  # 2 h after: earlier one wins
            ],
        )
    ctx = clinical_context(session, StudyKey("P1", "HOSP", "", "20260310", "080000"))
    vals = ctx.lab_values()
    assert vals["LIPASE"] == 700 and vals["ALT"] == 30
    assert "AMYLASE" not in vals and "AMYLASE" in ctx.missing_names()
    narrow = clinical_context(
        session, StudyKey("P1", "HOSP", "", "20260310", "080000"), hours_after=0
    )
    assert "LIPASE" not in narrow.lab_values()


def test_study_time_unknown_means_end_of_day(session: Session) -> None:
    with session.begin():
        store_batch(session, [lab("1742-6", 55, "U/L", t(10, 18))])
    ctx = clinical_context(session, StudyKey("P1", "HOSP", "", "20260310", ""))
    assert ctx.lab_values()["ALT"] == 55


def test_missing_identifiers(session: Session) -> None:
    with session.begin():
        store_batch(
            session,
            [
                lab("1742-6", 40, "U/L", t(10, 7), issuer=""),
                lab("1920-8", 41, "U/L", t(10, 7), issuer="OTHER"),
            ],
        )
    nobody = clinical_context(session, StudyKey("", "HOSP", "", "20260310", "080000"))
    assert nobody.values == () and len(nobody.missing) == 16
    assert all("no patient identifier" in m for m in nobody.missing)
    strict = clinical_context(session, StudyKey("P1", "HOSP", "", "20260310", "080000"))
    assert strict.lab_values() == {}  # empty issuer and another issuer never match
    loose = clinical_context(
        session, StudyKey("P1", "HOSP", "", "20260310", "080000"), allow_missing_issuer=True
    )
    assert loose.lab_values() == {"ALT": 40}  # still not the OTHER issuer's AST
    with pytest.raises(ClinicalDataError, match="no patient identifier"):
        store_batch(session, [lab("1742-6", 1, "U/L", t(10, 7), patient_id=" ")])
    with pytest.raises(ClinicalDataError, match="not a DICOM date"):
        clinical_context(session, StudyKey("P1", "HOSP", "", "2026-03-10"))


def test_conflicting_units_normalise_and_implausible_values_are_not_used(session: Session) -> None:
    with session.begin():
        res = store_batch(
            session,
            [
                lab("14631-6", 34.2, "umol/L", t(9, 8)),  # 2.0 mg/dL
                lab("1975-2", 2.1, "mg/dL", t(9, 9)),  # same analyte, other unit, later
                lab("1751-7", 38, "g/dL", t(9, 9)),  # g/L labelled g/dL: implausible
            ],
        )
    assert res.stored == 3 and len(res.implausible) == 1
    ctx = clinical_context(session, StudyKey("P1", "HOSP", "", "20260310", "080000"))
    assert ctx.lab_values()["BILI_T"] == pytest.approx(2.1)
    assert ctx.value("BILI_T") is not None and ctx.value("BILI_T").unit == "mg/dL"  # type: ignore[union-attr]
    assert "ALB: only implausible result(s)" in ctx.missing
    # a batch with one unit that cannot express the analyte stores nothing at all
    with pytest.raises(ClinicalDataError, match="record 2"):
        store_batch(session, [lab("1742-6", 1, "U/L", t(9, 1)), lab("1975-2", 1, "U/L", t(9, 2))])
    session.rollback()
    assert session.execute(select(func.count(ClinicalObservation.id))).scalar_one() == 3


def test_naive_times_are_refused(session: Session) -> None:
    with pytest.raises(ClinicalDataError, match="no time zone"):
        store_batch(session, [lab("1742-6", 1, "U/L", datetime(2026, 3, 10, 8))])


# ---------------------------------------------------------------- import


CSV = """patient_id,issuer,accession_number,observed_at,kind,code,test,value,unit,text
P1,HOSP,,2026-03-09T08:00:00+01:00,lab,14631-6,,34.2,µmol/L,
P1,HOSP,,2026-03-09T08:00:00,lab,,CA19-9,220,U/mL,
P1,HOSP,,2026-03-09T08:00:00,lab,,HBsAg,negative,,
P1,HOSP,,2026-03-01T00:00:00,history,,,,,Painless jaundice and weight loss
"""


def test_csv_import_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "labs.csv"
    path.write_text(CSV, encoding="utf-8")
    cfg = tmp_path / "node.yaml"
    db = tmp_path / "node.db"
    cfg.write_text(f"database:\n  url: sqlite:///{db}\nclinical:\n  timezone: Europe/Berlin\n")
    assert cli_main(["--config", str(cfg), "clinical", "import", str(path)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["stored"] == 3 and out["notes"] == 1
    assert cli_main(["--config", str(cfg), "clinical", "import", str(path)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["stored"] == 0 and again["duplicates"] == 4

    engine = create_engine(f"sqlite:///{db}")
    with sessionmaker(engine)() as s:
        ctx = clinical_context(s, StudyKey("P1", "HOSP", "", "20260310", "080000"))
        rows = {r.name: r for r in s.execute(select(ClinicalObservation)).scalars()}
    engine.dispose()
    assert ctx.lab_values() == {
        "BILI_T": pytest.approx(2.0, abs=0.01),
        "CA19-9": 220.0,
        "HBSAG": 0.0,
    }
    assert "Painless jaundice" in ctx.history
    # the naive CA 19-9 time was read in Europe/Berlin (UTC+1 in March)
    assert rows["CA19-9"].observed_at == datetime(2026, 3, 9, 7, 0, tzinfo=UTC)


def test_bad_import_files_store_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {
                    "patient_id": "P1",
                    "issuer": "HOSP",
                    "observed_at": "2026-03-09T08:00:00Z",
                    "code": "1742-6",
                    "value": 40,
                    "unit": "U/L",
                },
                {
                    "patient_id": "",
                    "observed_at": "2026-03-09T08:00:00Z",
                    "code": "1742-6",
                    "value": 40,
                    "unit": "U/L",
                },
                {
                    "patient_id": "P1",
                    "observed_at": "yesterday",
                    "code": "1742-6",
                    "value": 40,
                    "unit": "U/L",
                },
            ]
        )
    )
    with pytest.raises(ClinicalDataError, match=r"row 2: patient_id is empty; row 3: .*ISO 8601"):
        read_records(bad)
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"database:\n  url: sqlite:///{tmp_path / 'n.db'}\n")
    assert cli_main(["--config", str(cfg), "clinical", "import", str(bad)]) == 2
    assert "nothing imported" in capsys.readouterr().err
    unit_bad = tmp_path / "unit.csv"
    unit_bad.write_text(
        "patient_id,issuer,observed_at,code,value,unit\nP1,H,2026-03-09T08:00:00Z,1975-2,1.0,U/L\n"
    )
    assert cli_main(["--config", str(cfg), "clinical", "import", str(unit_bad)]) == 2
    assert "wrong dimension" in capsys.readouterr().err
    engine = create_engine(f"sqlite:///{tmp_path / 'n.db'}")
    with sessionmaker(engine)() as s:
        assert s.execute(select(func.count(ClinicalObservation.id))).scalar_one() == 0
    engine.dispose()


@pytest.mark.postgres
def test_store_and_link_on_postgresql(pg_url: str) -> None:
    """The same rules on PostgreSQL, schema from the node's Alembic migrations."""
    from node.migrate import upgrade

    upgrade(pg_url)
    engine = create_engine(pg_url)
    try:
        with sessionmaker(engine)() as s:
            with s.begin():
                store_batch(
                    s,
                    [
                        lab("1742-6", 40, "U/L", t(10, 7)),
                        lab("1742-6", 80, "U/L", t(10, 12)),
                        lab("14631-6", 34.2, "umol/L", t(9, 8)),
                    ],
                )
            with pytest.raises(ClinicalDataError), s.begin():
                store_batch(s, [lab("1920-8", 1, "U/L", t(9, 1)), lab("1975-2", 1, "U/L", t(9, 2))])
            ct = clinical_context(s, StudyKey("P1", "HOSP", "ACC-CT", "20260310", "080000"))
            mr = clinical_context(s, StudyKey("P1", "HOSP", "ACC-MR", "20260310", "150000"))
            assert ct.lab_values()["ALT"] == 40 and mr.lab_values()["ALT"] == 80
            assert ct.lab_values()["BILI_T"] == pytest.approx(2.0, abs=0.01)
            assert "AST" not in ct.lab_values()  # the failed batch left nothing behind
            used = ct.value("ALT")
            assert used is not None and used.observed_at == t(10, 7)  # UTC-aware round trip
    finally:
        engine.dispose()
