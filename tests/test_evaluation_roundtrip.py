"""The node's own outputs read back by the harness: a SEG and a TID 1500 SR built by
``dicom_sr`` from findings on a real DICOM series are evaluated against the masks
they were built from (Dice 1, every lesion matched, long axes and volumes restated)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicom_sr.options import OutputOptions
from dicom_sr.seg import build_seg
from dicom_sr.sr import build_sr
from dicom_sr.testing import findings_from_masks
from models.evaluation.adapters import reference_from_truth, write_masks
from models.loader import load_series
from models.series_writer import SeriesInfo, write_series
from models.synthetic import ORGAN_LABELS, generate_case
from models.vocab import Disease, LesionKind, Organ
from node.cli import main


def test_own_seg_and_sr_read_back(tmp_path: Path) -> None:
    case = generate_case(
        3, shape=(20, 48, 48), spacing=(5.0, 3.5, 3.5), diseases=(Disease.HAEMANGIOMA,)
    )
    assert case.lesion_labels.max() >= 1
    paths = write_series(
        case.image, case.affine, tmp_path / "ct", info=SeriesInfo(), seed="eval-roundtrip"
    )
    volume = load_series(tmp_path / "ct")
    assert np.allclose(volume.affine, case.affine, atol=1e-3)
    organs = {
        o: case.organ_labels == v for v, o in ORGAN_LABELS.items() if (case.organ_labels == v).any()
    }
    lesions = [
        (Organ.LIVER, LesionKind.MASS, case.lesion_labels == n, None)
        for n in range(1, int(case.lesion_labels.max()) + 1)
        if (case.lesion_labels == n).any()
    ]
    findings = findings_from_masks(
        organs, lesions, volume.affine, volume.sop_instance_uids, volume.series_instance_uid,
        image=volume.array, diagnoses=[(Disease.HAEMANGIOMA, 0.8)],
    )  # fmt: skip
    import pydicom

    sources = [pydicom.dcmread(p) for p in paths]
    opts = OutputOptions(pipeline_version="eval-test")
    seg = build_seg(findings, sources, options=opts)
    sr = build_sr(findings, sources, seg, options=opts)
    res = tmp_path / "results"
    (res / "masks" / "c3").mkdir(parents=True)
    (res / "sr" / "c3").mkdir(parents=True)
    seg.save_as(res / "masks" / "c3" / "seg.dcm", enforce_file_format=True)
    sr.save_as(res / "sr" / "c3" / "sr.dcm", enforce_file_format=True)
    ref = tmp_path / "reference"
    masks = reference_from_truth("c3", volume.affine, case.organ_labels, case.lesion_labels, {
        v: str(o) for v, o in ORGAN_LABELS.items() if o in organs
    })  # fmt: skip
    write_masks(masks, ref / "masks" / "c3")
    out = tmp_path / "out"
    assert main(["evaluate", "--reference", str(ref), "--results", str(res), "--out", str(out),
                 "--bootstrap", "20", "--threshold", "dice.liver>=0.999"]) == 0  # fmt: skip
    data = json.loads((out / "evaluation.json").read_text())
    rows = data["segmentation"]["per_case"]
    assert {r["structure"] for r in rows} == {str(o) for o in organs}
    assert all(r["predicted"] and r["dice"] == 1.0 and r["hd95_mm"] == 0.0 for r in rows)
    det = data["segmentation"]["lesions"]["detection"]
    assert det["true_positives"] == len(lesions) and det["false_positives"] == 0
    st = data["structured_results"]["c3"]
    assert sorted(st["lesion_diameters_mm"]) == pytest.approx(
        sorted(les.long_axis.length_mm for les in findings.lesions), abs=0.01
    )
    vols = {v["structure"]: v for v in st["volumes"]}
    assert vols["liver"]["sr_ml"] == pytest.approx(vols["liver"]["mask_ml"], rel=1e-3)
    # the harness's own SR reader (used without dicom_sr) reads the same figures
    from models.evaluation.dataset import read_sr_content
    from node.evaluate_command import sr_reader

    own, theirs = (
        read_sr_content(res / "sr" / "c3" / "sr.dcm"),
        sr_reader(res / "sr" / "c3" / "sr.dcm"),
    )
    assert sorted(own.lesion_diameters_mm) == pytest.approx(sorted(theirs.lesion_diameters_mm))
    assert dict(own.volumes_ml) == pytest.approx(dict(theirs.volumes_ml))
