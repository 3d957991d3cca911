"""The shared contracts: NIfTI convention, the series writer, Volume and Findings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.findings import (
    Axis,
    Findings,
    FindingsError,
    LesionFinding,
    OrganFinding,
    Provenance,
    ReportSentence,
)
from models.nifti import load_nifti_krc, save_nifti_krc
from models.series_writer import write_series
from models.vocab import LesionKind, Organ
from models.volume import Volume, VolumeError
from node.errors import ConfigError
from node.settings import load_settings


def test_nifti_krc_round_trip(tmp_path: Path, shared_data: Path) -> None:
    arr, aff = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "ct.nii.gz")
    assert arr.shape == (112, 101, 122)
    # RAS file: moving along columns (i) goes to patient Left in LPS is -x of RAS...
    save_nifti_krc(arr, aff, tmp_path / "x.nii.gz")
    arr2, aff2 = load_nifti_krc(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(arr, arr2)
    np.testing.assert_allclose(aff, aff2)


def test_series_writer_geometry(tmp_path: Path, shared_data: Path) -> None:
    arr, aff = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "ct.nii.gz")
    paths = write_series(arr[:5], aff, tmp_path, slice_order=[4, 3, 2, 1, 0])
    ds = pydicom.dcmread(paths[2])
    np.testing.assert_allclose(ds.ImagePositionPatient, aff[:3, 3] + 2 * aff[:3, 0], atol=1e-4)
    assert ds.InstanceNumber == 3
    np.testing.assert_array_equal(
        ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept), np.round(arr[2])
    )


def test_volume_validates() -> None:
    with pytest.raises(VolumeError, match="SOP Instance UIDs"):
        Volume(np.zeros((2, 3, 3)), np.eye(4), ("1",), "CT", "1", "2", "3")


def _prov() -> Provenance:
    return Provenance("m", "1", "0" * 64, "p1", "1.2.3", ("1.2.3.4",))


def test_findings_rejects_unsupported_sentence() -> None:
    mask = np.zeros((2, 3, 3), bool)
    organ = OrganFinding(Organ.LIVER, mask, 1.0)
    with pytest.raises(FindingsError, match="unknown findings"):
        Findings(
            (organ,), (), (), (ReportSentence("findings", "A lesion.", ("lesion:1",)),), _prov()
        )
    les = LesionFinding(
        1,
        Organ.LIVER,
        LesionKind.MASS,
        mask,
        0.5,
        Axis((0, 0, 0), (0, 0, 2), 20.0),
        Axis((0, 0, 0), (0, 2, 0), 10.0),
        0,
        (0.0, 0.0, 0.0),
    )
    f = Findings(
        (organ,), (les,), (), (ReportSentence("findings", "A lesion.", ("lesion:1",)),), _prov()
    )
    assert f.report_text("findings") == "A lesion."


def test_settings_refuse_demo_secret_outside_demo(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("demo: false\n")
    with pytest.raises(ConfigError, match="admin_token"):
        load_settings(cfg, env={})
    cfg.write_text("ingest: {port: 99999}\n")
    with pytest.raises(ConfigError, match=r"ingest\.port"):
        load_settings(cfg, env={})
