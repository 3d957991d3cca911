"""Results read back from a real Orthanc over DICOMweb (QIDO-RS + WADO-RS), over
C-GET and over C-MOVE: a SEG drawn by another tool and its TID 1500 SR, evaluated against a
reference mask."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from models.evaluation.dataset import read_seg
from models.evaluation.segmentation import dice, surface_metrics
from models.nifti import save_nifti_krc
from node.cli import main
from tests.conftest import free_port
from tests.support.orthanc_eval import run_orthanc

pytestmark = pytest.mark.orthanc


@pytest.mark.parametrize("transport", ["dicomweb", "cget", "cmove"])
def test_seg_and_sr_fetched_from_orthanc(shared_data: Path, tmp_path: Path, transport: str) -> None:
    src = shared_data / "ct_liver_3slice"
    sr_file = shared_data / "interop" / "tid1500" / "dcmqi_liver_result.dcm"
    study_uid = str(
        pydicom.dcmread(src / "liver_seg.dcm", stop_before_pixels=True).StudyInstanceUID
    )

    # reference: the drawn liver eroded in-plane by 2 pixels (a second "reader"), as NIfTI
    local = read_seg(src / "liver_seg.dcm")
    liver = local.structures["liver"]
    reference = np.stack([ndimage.binary_erosion(s, iterations=2) for s in liver])
    ref_dir = tmp_path / "reference"
    (ref_dir / "masks" / "liver3").mkdir(parents=True)
    save_nifti_krc(
        reference.astype(np.uint8), local.affine, ref_dir / "masks" / "liver3" / "liver.nii.gz"
    )
    expected_dice = dice(liver, reference)
    expected_hd95 = surface_metrics(liver, reference, (1.0, 0.810547, 0.810547)).hd95

    out = tmp_path / "out"
    with run_orthanc(tmp_path / "orthanc") as pacs:
        for f in (src / "01.dcm", src / "02.dcm", src / "03.dcm", src / "liver_seg.dcm", sr_file):
            assert pacs.upload(f)["Status"] in ("Success", "AlreadyStored")
        source = (
            ["--pacs-url", pacs.dicomweb]
            if transport == "dicomweb"
            else ["--pacs-dimse", f"127.0.0.1:{pacs.dicom_port}:{pacs.aet}"]
        )
        if transport == "cmove":  # the PACS knows our storage SCP as a modality
            move_port = free_port()
            httpx.put(f"{pacs.url}/modalities/evaluator", timeout=30,
                      json={"AET": "HPBEVAL", "Host": "127.0.0.1", "Port": move_port}
                      ).raise_for_status()  # fmt: skip
            source += ["--retrieve", "move", "--move-port", str(move_port)]
        code = main(
            [
                "evaluate",
                "--reference", str(ref_dir),
                *source,
                "--study", f"liver3={study_uid}",
                "--out", str(out),
                "--threshold", "dice.liver>=0.8",
                "--bootstrap", "100",
            ]
        )  # fmt: skip
    assert code == 0
    fetched = out / "fetched"
    assert len(list((fetched / "masks" / "liver3").glob("*.dcm"))) == 1
    assert len(list((fetched / "sr" / "liver3").glob("*.dcm"))) == 1
    assert len(list((fetched / "images" / "liver3").glob("*.dcm"))) == 3
    data = json.loads((out / "evaluation.json").read_text())
    row = next(r for r in data["segmentation"]["per_case"] if r["structure"] == "liver")
    assert row["predicted"] is True
    assert row["dice"] == pytest.approx(expected_dice, abs=1e-9)
    assert row["hd95_mm"] == pytest.approx(expected_hd95, abs=1e-6)
    assert 0.8 < row["dice"] < 1.0
    # the SR (read back with dicom_sr.readers) states the liver volume: the SEG's volume
    vol = data["structured_results"]["liver3"]["volumes"][0]
    assert vol["structure"] == "liver"
    assert vol["sr_ml"] == pytest.approx(70.3619, abs=1e-3)
    assert vol["mask_ml"] == pytest.approx(vol["sr_ml"], rel=2e-3)
    assert row["volume_pred_ml"] == pytest.approx(
        vol["mask_ml"], rel=1e-6
    )  # NIfTI affine is float32


def test_run_model_on_studies_fetched_from_orthanc(tmp_path: Path) -> None:
    """``--run-model`` with ``--pacs-url``: the studies come from the PACS (WADO-RS), the
    reference from a ``hpb-node synth`` dataset (tiny random-weight bundle)."""
    from tests.test_bundle import make_tiny_bundle

    dataset = tmp_path / "synth"
    assert main(["synth", "--out", str(dataset), "-n", "1", "--seed", "21", "--shape", "20", "32", "32",
                 "--spacing", "5", "4", "4"]) == 0  # fmt: skip
    row = json.loads((dataset / "manifest.jsonl").read_text().splitlines()[0])
    files = sorted((dataset / row["dicom"]).iterdir())
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    bundle = make_tiny_bundle(tmp_path / "bundle")
    meta = bundle / "configs" / "metadata.json"
    meta.write_text(meta.read_text().replace('"min_lesion_ml": 0.1', '"min_lesion_ml": 20.0'))
    out = tmp_path / "out"
    with run_orthanc(tmp_path / "orthanc") as pacs:
        for f in files:
            pacs.upload(f)
        code = main(["evaluate", "--reference", str(dataset), "--run-model", "--bundle", str(bundle),
                     "--pacs-url", pacs.dicomweb, "--study", f"{row['case_id']}={study_uid}",
                     "--out", str(out), "--bootstrap", "20"])  # fmt: skip
    assert code == 0
    assert len(list((out / "fetched" / "images" / row["case_id"]).glob("*.dcm"))) == len(files)
    data = json.loads((out / "evaluation.json").read_text())
    assert data["results"].startswith("model run now")
    assert {r["case_id"] for r in data["segmentation"]["per_case"]} == {row["case_id"]}
