"""``hpb-node evaluate`` end to end on hand-made reference and results folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from models.evaluation import Options, Threshold, ThresholdError, evaluate, load_set
from models.nifti import save_nifti_krc
from node.cli import main

AFFINE = np.array(
    [[0.0, 0.0, -0.8, 100.0], [0.0, 0.9, 0.0, -50.0], [3.0, 0.0, 0.0, -200.0], [0, 0, 0, 1.0]]
)  # anisotropic, axes permuted and flipped
SHAPE = (8, 32, 32)
CASES = ("c1", "c2", "c3", "c4")


def _box(k0: int, k1: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[k0:k1, r0:r1, c0:c1] = True
    return m


def _write_case(root: Path, case: str, shift: int, *, flip: bool = False) -> None:
    folder = root / "masks" / case
    folder.mkdir(parents=True)
    liver = _box(1, 7, 4 + shift, 20 + shift, 4, 24)
    spleen = _box(2, 6, 22, 30, 20, 30)
    lesions = np.zeros(SHAPE, np.int16)
    lesions[3:5, 8 + shift : 13 + shift, 8:13] = 1
    if case != "c1":
        lesions[3:5, 14:18, 16:22] = 2
    affine = AFFINE
    if flip:  # the same masks stored on a flipped grid: resampling must undo it
        liver, spleen, lesions = liver[::-1], spleen[::-1], lesions[::-1]
        affine = AFFINE.copy()
        affine[:3, 3] = AFFINE[:3, 3] + AFFINE[:3, 0] * (SHAPE[0] - 1)
        affine[:3, 0] = -AFFINE[:3, 0]
    save_nifti_krc(liver.astype(np.uint8), affine, folder / "liver.nii.gz")
    save_nifti_krc(spleen.astype(np.uint8), affine, folder / "spleen.nii.gz")
    save_nifti_krc(np.ascontiguousarray(lesions), affine, folder / "lesions.nii.gz")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evalsets")
    ref, res = root / "reference", root / "results"
    truth = {"c1": 1, "c2": 0, "c3": 1, "c4": 0}
    readers = {"A": [1, 0, 1, 0], "B": [1, 1, 1, 0], "C": [0, 0, 1, 0]}
    prob = {"c1": 0.8, "c2": 0.3, "c3": 0.45, "c4": 0.1}
    ref.mkdir()
    res.mkdir()
    lines = ["case_id,disease,truth,A,B,C"]
    for i, c in enumerate(CASES):
        lines.append(
            f"{c},hepatocellular_carcinoma,{truth[c]},{readers['A'][i]},{readers['B'][i]},{readers['C'][i]}"
        )
        lines.append(f"{c},cirrhosis,{int(c in ('c1', 'c2'))},,,")
    (ref / "diagnoses.csv").write_text("\n".join(lines) + "\n")
    out = ["case_id,disease,probability"]
    for c in CASES:
        out.append(f"{c},hepatocellular_carcinoma,{prob[c]}")
        out.append(f"{c},cirrhosis,{0.9 if c == 'c1' else 0.2}")
    (res / "diagnoses.csv").write_text("\n".join(out) + "\n")
    for c in CASES:
        _write_case(ref, c, 0)
        _write_case(res, c, 1 if c == "c2" else 0, flip=(c == "c3"))
    (res / "lesions.csv").write_text("case_id,lesion,confidence\nc1,1,0.9\nc2,1,0.4\nc2,2,0.8\n")
    for d in (ref / "reports", res / "reports"):
        d.mkdir()
    for c in CASES:
        (ref / "reports" / f"{c}.txt").write_text(
            "Cirrhotic liver. A 6 mm lesion, suspicious for HCC. No gallstones."
        )
        (res / "reports" / f"{c}.txt").write_text(
            "Cirrhotic liver with a 5 mm lesion in keeping with HCC."
        )
    return ref, res


def test_evaluate_figures(folders: tuple[Path, Path]) -> None:
    ref, res = folders
    result = evaluate(
        load_set(ref, reference=True), load_set(res, reference=False), Options(n_bootstrap=200)
    )
    hcc = result["diagnosis"]["per_disease"]["hepatocellular_carcinoma"]
    y, p = [1, 0, 1, 0], [0.8, 0.3, 0.45, 0.1]
    assert hcc["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert hcc["confusion"] == {"tn": 2, "fp": 0, "fn": 1, "tp": 1}
    calls = [1, 0, 0, 0]
    assert hcc["readers"]["B"]["model_vs_reader"]["kappa"] == pytest.approx(
        cohen_kappa_score(calls, [1, 1, 1, 0])
    )
    assert hcc["readers"]["B"]["reader_vs_truth"]["specificity"] == pytest.approx(0.5)
    assert hcc["inter_reader"]["cohen_kappa_pairs"]["A|C"] == pytest.approx(
        cohen_kappa_score([1, 0, 1, 0], [0, 0, 1, 0])
    )
    assert not math.isnan(hcc["inter_reader"]["fleiss_kappa"])
    seg = result["segmentation"]
    rows = {(r["case_id"], r["structure"]): r for r in seg["per_case"]}
    assert rows[("c1", "liver")]["dice"] == 1.0
    assert rows[("c3", "liver")]["dice"] == 1.0  # flipped grid resampled exactly
    assert rows[("c3", "liver")]["hd95_mm"] == 0.0
    # c2 liver shifted one row (0.9 mm): 15 of 16 rows overlap
    assert rows[("c2", "liver")]["dice"] == pytest.approx(15 / 16)
    assert rows[("c2", "liver")]["centroid_error_mm"] == pytest.approx(0.9)
    det = seg["lesions"]["detection"]
    assert (
        det["n_reference_lesions"] == 7
        and det["true_positives"] == 7
        and det["false_positives"] == 0
    )
    rep = result["report"]["summary"]
    assert rep["n"] == 4 and rep["completeness"] == pytest.approx(1.0)
    s = result["summary"]
    assert s["dice.liver"] == pytest.approx((3 + 15 / 16) / 4)
    assert s["lesion.sensitivity"] == 1.0


def test_thresholds_parse() -> None:
    t = Threshold.parse("auroc.hcc >= 0.8")
    assert t.metric == "auroc.hepatocellular_carcinoma" and t.op == ">=" and t.value == 0.8
    with pytest.raises(ThresholdError):
        Threshold.parse("dice.liver is good")
    missing = Threshold.parse("dice.kidney>=0.5").check({"dice.liver": 1.0})
    assert missing["met"] is False and "no figure" in missing["reason"]
    assert Threshold.parse("hd95.liver<=5").check({"hd95.liver": float("nan")})["met"] is False


def test_cli_exit_codes_and_outputs(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref, res = folders
    common = ["evaluate", "--reference", str(ref), "--results", str(res), "--bootstrap", "200"]
    ok = main(
        [
            *common,
            "--out",
            str(tmp_path / "a"),
            "--threshold",
            "dice.liver>=0.9",
            "--threshold",
            "lesion.fp_per_case<=0.5",
        ]
    )
    assert ok == 0
    data = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    assert data["thresholds"][0]["met"] is True
    assert data["summary"]["dice.spleen"] == 1.0
    html = (tmp_path / "a" / "evaluation.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "Worst cases" in html
    bad = main([*common, "--out", str(tmp_path / "b"), "--threshold", "dice.liver>=0.99"])
    assert bad == 1
    assert "NOT MET: dice.liver>=0.99" in capsys.readouterr().out
    # unusable input: an error for the admin, exit 2
    assert (
        main(
            [
                "evaluate",
                "--reference",
                str(tmp_path / "none"),
                "--results",
                str(res),
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert main([*common, "--out", str(tmp_path / "d"), "--threshold", "dice.liver=>0.9"]) == 2
