"""The node hands the report generator what it needs: the series' modality and the
clinical context linked with the volume's DICOM headers (StudyTime, age, sex)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from models.labs import ClinicalContext
from node import pipelines
from node.clinical.store import LabRecord, store_batch
from node.db import Study, create_engine_for, session_factory
from node.migrate import upgrade
from node.settings import Settings
from node.worker import _clinical_loader


def _settings(tmp_path: Path) -> Settings:
    return Settings.model_validate(
        {
            "spool": {"root": str(tmp_path / "spool")},
            "database": {"url": f"sqlite:///{tmp_path / 'n.db'}"},
        }
    )


def _afp(value: float, hour: int) -> LabRecord:
    return LabRecord(
        patient_id="P1",
        issuer="HOSP",
        code="1834-1",
        value=value,
        unit="ng/mL",
        observed_at=datetime(2026, 3, 10, hour, tzinfo=UTC),
        source="csv",
        source_ref=f"afp-{hour}",
    )


def test_worker_links_clinical_data_with_the_volume_headers(tmp_path: Path) -> None:
    """StudyTime from the headers decides which same-day result is 'before the study'."""
    settings = _settings(tmp_path)
    upgrade(settings.database.url)
    sessions: sessionmaker[Session] = session_factory(create_engine_for(settings.database.url))
    with sessions.begin() as s:
        study = Study(
            study_instance_uid="1.2.3",
            patient_id="P1",
            issuer_of_patient_id="HOSP",
            accession_number="A1",
            study_date="20260310",
        )
        s.add(study)
        store_batch(s, [_afp(11.0, 8), _afp(99.0, 12)])
        s.flush()
        study_id = study.id
    load = _clinical_loader(sessions, settings, {"study_id": study_id})
    at_nine = load(headers={"StudyTime": "090000", "PatientAge": "064Y", "PatientSex": "F"})
    assert isinstance(at_nine, ClinicalContext)
    assert at_nine.lab_values()["AFP"] == 11.0  # the 08:00 result, not the later one
    assert (at_nine.age, at_nine.sex) == (64, "F")
    # no StudyTime: the study is taken to end of its day, so the 12:00 result is the latest
    late = load(headers={"PatientAge": "064Y"})
    assert late.lab_values()["AFP"] == 99.0


def test_product_pipeline_passes_modality_and_headers(tmp_path: Path) -> None:
    """An MR series: the report speaks of signal, not HU, and the loader got the headers."""
    from models.synthetic.generator import generate_case
    from models.synthetic.writer import write_case

    case = generate_case(3, modality="MR")
    paths = write_case(case, tmp_path / "case")
    files = sorted(Path(paths["dicom"]).glob("*.dcm"))
    seen: list[Any] = []

    def loader(headers: Any = None) -> ClinicalContext:
        seen.append(headers)
        return ClinicalContext(age=50, sex="M")

    ctx = pipelines.JobContext(
        job_id=1,
        attempt=1,
        series_uid="1",
        study_uid="1",
        modality="MR",
        generation=1,
        pipeline_version="1.0",
        instance_paths=files,
        settings=_settings(tmp_path),
        clinical_loader=loader,
    )
    result = pipelines.hpb_ct_mr(ctx)
    assert seen and seen[0] is not None and seen[0]["Modality"] == "MR"
    assert "StudyTime" in seen[0]
    report = " ".join(result.summary["report"])
    assert "mean signal" in report
    assert " HU" not in report
    # the phase the synthetic series description names reaches the job summary
    assert result.summary["contrast_phase"] == case.truth.phase.value
    # and so do the provenance notes: how the phase was found, what is left unreported
    notes = result.summary["notes"]
    assert "model output; not for clinical use" in notes
    assert any(n.startswith(f"contrast phase {case.truth.phase.value}: from") for n in notes)
