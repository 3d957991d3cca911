"""``hpb-node evaluate --run-model`` on a dataset written by ``hpb-node synth``: the
model run now on each case's DICOM series, then evaluated against the manifest's
masks, diagnoses and (synthetic) reference reports.

The bundle is the tiny randomly initialised test bundle (``tests.test_bundle``):
the figures are meaningless, the path (manifest, DICOM loading, inference, fusion,
report, masks on the source grid, evaluation) is what is tested."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.nifti import load_nifti_krc
from models.vocab import Disease
from node.cli import main
from tests.test_bundle import make_tiny_bundle


def test_run_model_on_synth_dataset(tmp_path: Path) -> None:
    dataset = tmp_path / "synth"
    assert main(["synth", "--out", str(dataset), "-n", "2", "--seed", "11", "--shape", "24", "40", "40",
                 "--spacing", "5", "4", "4"]) == 0  # fmt: skip
    rows = [
        json.loads(line)
        for line in (dataset / "manifest.jsonl").read_text().splitlines()
        if line.strip()
    ]
    assert len(rows) == 2 and all(r.get("dicom") for r in rows)
    bundle = make_tiny_bundle(tmp_path / "bundle")
    # random weights call lesions everywhere: keep only large ones, to keep the test quick
    meta = bundle / "configs" / "metadata.json"
    meta.write_text(meta.read_text().replace('"min_lesion_ml": 0.1', '"min_lesion_ml": 20.0'))
    out = tmp_path / "out"
    code = main(
        ["evaluate", "--reference", str(dataset), "--run-model", "--bundle", str(bundle), "--out", str(out),
         "--bootstrap", "20"]
    )  # fmt: skip
    assert code == 0
    data = json.loads((out / "evaluation.json").read_text())
    assert data["results"].startswith("model run now")
    seg = data["segmentation"]["per_case"]
    assert {r["case_id"] for r in seg} == {r["case_id"] for r in rows}
    assert all(0.0 <= r["dice"] <= 1.0 for r in seg)
    first = rows[0]
    labels, _ = load_nifti_krc(dataset / first["label"])
    liver = next(r for r in seg if r["structure"] == "liver" and r["case_id"] == first["case_id"])
    assert liver["volume_ref_ml"] == pytest.approx(np.count_nonzero(labels == 1) * 0.08)  # 5x4x4 mm
    # fusion diagnoses for every target disease, and a report per case compared to the reference
    assert set(data["diagnosis"]["per_disease"]) == {d.value for d in Disease}
    assert data["report"]["summary"]["n"] == 2
    assert "lesions" in data["segmentation"]
