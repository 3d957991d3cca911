"""``hpb-node evaluate --run-model``: the model run now on the reference studies
(a synthetic case written as a real DICOM CT series), then evaluated.

The bundle is the tiny randomly initialised test bundle (``tests.test_bundle``):
the figures are meaningless, the path (DICOM loading, inference, masks on the
source grid, evaluation) is what is tested."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.evaluation.adapters import reference_from_truth, write_masks
from models.series_writer import SeriesInfo, write_series
from models.synthetic import ORGAN_LABELS, generate_case
from node.cli import main
from tests.test_bundle import make_tiny_bundle


def test_run_model_on_dicom_studies(tmp_path: Path) -> None:
    ref = tmp_path / "reference"
    case = generate_case(11, shape=(24, 40, 40), spacing=(5.0, 4.0, 4.0))
    write_series(
        case.image, case.affine, ref / "images" / "s11", info=SeriesInfo(), seed="eval-run-model"
    )
    masks = reference_from_truth(
        "s11",
        case.affine,
        case.organ_labels,
        case.lesion_labels,
        {v: str(o) for v, o in ORGAN_LABELS.items()},
    )
    write_masks(masks, ref / "masks" / "s11")
    bundle = make_tiny_bundle(tmp_path / "bundle")
    out = tmp_path / "out"
    code = main(
        [
            "evaluate",
            "--reference",
            str(ref),
            "--run-model",
            "--bundle",
            str(bundle),
            "--out",
            str(out),
            "--bootstrap",
            "20",
        ]
    )
    assert code == 0
    data = json.loads((out / "evaluation.json").read_text())
    assert data["results"].startswith("model run now")
    rows = data["segmentation"]["per_case"]
    assert {r["structure"] for r in rows} == {str(o) for o in ORGAN_LABELS.values()}
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
    liver = next(r for r in rows if r["structure"] == "liver")
    # 5 x 4 x 4 mm voxels = 0.08 ml
    assert liver["volume_ref_ml"] == pytest.approx(np.count_nonzero(case.organ_labels == 1) * 0.08)
