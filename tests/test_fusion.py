"""Fusion classifier: features, shipped weights, clinical behaviour, training round trip, ablation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.case import CaseTruth, LesionTruth
from models.fusion import (
    DEFAULT_WEIGHTS,
    FEATURES,
    IMAGE_FEATURES,
    LAB_FEATURES,
    FusionError,
    FusionModel,
    feature_vector,
    history_concepts,
    image_features,
    lab_features,
)
from models.labs import LAB_PANEL, context_from_labs
from models.synthetic_clinical import measured_findings, sample_truth, synthesize_clinical
from models.vocab import ContrastPhase, Disease, LesionKind, Organ, SubSite

ROOT = Path(__file__).resolve().parents[1]


def truth(
    diseases: tuple[Disease, ...], lesions: tuple[LesionTruth, ...] = (), **q: float
) -> CaseTruth:
    qualities = {"liver_volume_ml": 1600.0, "liver_mean_hu": 105.0, "spleen_volume_ml": 200.0}
    qualities.update(q)
    return CaseTruth(
        "t", 1, "CT", ContrastPhase.PORTAL_VENOUS, 64, "M", diseases, lesions, qualities
    )


LIVER_MASS = LesionTruth(
    1, Organ.LIVER, LesionKind.MASS, None, 40.0, (10, 10, 10), SubSite.COUINAUD_VII, 80.0
)
PANC_MASS = LesionTruth(
    1, Organ.PANCREAS, LesionKind.MASS, None, 25.0, (10, 10, 10), SubSite.PANCREAS_HEAD, 65.0
)


@pytest.fixture(scope="module")
def model() -> FusionModel:
    return FusionModel.load()


def test_image_features_follow_the_findings() -> None:
    rng = np.random.default_rng(0)
    empty = image_features(measured_findings(truth(()), rng))
    with_mass = image_features(
        measured_findings(truth((), (LIVER_MASS,)), np.random.default_rng(0))
    )
    assert empty.shape == with_mass.shape == (len(IMAGE_FEATURES),)
    i = IMAGE_FEATURES.index("img.liver_solid_max_mm")
    assert empty[i] == 0.0 and with_mass[i] == pytest.approx(np.log1p(40.0), abs=0.2)
    assert with_mass[IMAGE_FEATURES.index("img.liver_solid_count")] > 0
    assert with_mass[IMAGE_FEATURES.index("img.liver_solid_rel_hu")] < 0  # hypoattenuating


def test_lab_features_mark_missing_values() -> None:
    v = lab_features({"AFP": 400.0, "ALB": 3.0})
    assert v.shape == (len(LAB_FEATURES),)
    n = len(LAB_PANEL)
    afp = [t.name for t in LAB_PANEL].index("AFP")
    alb = [t.name for t in LAB_PANEL].index("ALB")
    assert v[n + afp] == 0.0 and v[n + alb] == 0.0
    assert v[n:].sum() == n - 2  # every other test flagged missing
    assert v[afp] > 3.0  # log(400 / 8.8)
    assert v[alb] < -1.0  # below the reference interval


def test_history_concepts_with_negation() -> None:
    found = history_concepts(
        "Known chronic hepatitis B. No history of malignancy. Denies alcohol use."
    )
    assert "hepatitis_b" in found
    assert "malignancy_any" not in found and "alcohol" not in found
    assert "colorectal_cancer" in history_concepts("History of colorectal carcinoma, resected.")


def test_shipped_weights_load_and_predict(model: FusionModel) -> None:
    assert DEFAULT_WEIGHTS.stat().st_size < 300_000  # small enough to live in the repository
    assert set(model.diseases) == set(Disease)
    # the training data is named: simulated measurements, and the network whose
    # findings the heads were also fitted on (bench/fusion_ablation.py --network-train)
    assert "ground-truth" in model.meta["data"]
    assert model.meta["network_features_from"]
    for name in model.meta["network_features_from"]:
        assert name.startswith("hpb_demo ") and name in model.meta["data"]
        assert "segmentation network's findings" in model.meta["data"]
    # ... and that network is the shipped bundle: a new bundle version (its findings
    # differ) ships with heads refitted on its findings
    from models.bundle import load_bundle

    shipped = load_bundle()
    assert model.meta["network_features_from"] == [
        f"{shipped.name} {shipped.version} {shipped.weights_sha256[:12]}"
    ]
    f = measured_findings(truth(()), np.random.default_rng(1))
    probs = model.predict(f, context_from_labs({}))
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert max(probs.values()) < 0.5  # a normal case with no labs: nothing likely


def test_labs_move_the_probabilities_the_clinical_way(model: FusionModel) -> None:
    liver = measured_findings(truth((), (LIVER_MASS,)), np.random.default_rng(2))
    quiet = context_from_labs({"AFP": 3.0, "CEA": 2.0, "HBSAG": 0.0})
    hcc_labs = context_from_labs(
        {"AFP": 800.0, "CEA": 2.0, "HBSAG": 1.0}, history="Known chronic hepatitis B."
    )
    met_labs = context_from_labs(
        {"AFP": 3.0, "CEA": 60.0, "HBSAG": 0.0}, history="History of colorectal carcinoma."
    )
    p0, p_hcc, p_met = (model.predict(liver, c) for c in (quiet, hcc_labs, met_labs))
    assert p_hcc[Disease.HCC] > p0[Disease.HCC] and p_hcc[Disease.HCC] > p_met[Disease.HCC]
    assert p_met[Disease.LIVER_METASTASIS] > p_hcc[Disease.LIVER_METASTASIS]

    panc = measured_findings(
        truth((), (PANC_MASS,), pancreatic_duct_mm=6.0), np.random.default_rng(3)
    )
    normal = context_from_labs({"CA19-9": 10.0, "LIPASE": 30.0})
    pdac = context_from_labs(
        {"CA19-9": 900.0, "BILI_T": 6.0, "LIPASE": 30.0}, history="Painless jaundice."
    )
    itis = context_from_labs(
        {"CA19-9": 20.0, "LIPASE": 2000.0}, history="Acute epigastric pain radiating to the back."
    )
    assert model.predict(panc, pdac)[Disease.PDAC] > model.predict(panc, normal)[Disease.PDAC]
    assert (
        model.predict(panc, itis)[Disease.PANCREATITIS]
        > model.predict(panc, pdac)[Disease.PANCREATITIS]
    )


def test_training_round_trip(tmp_path: Path) -> None:
    def data(seeds: range) -> tuple[np.ndarray, dict[Disease, np.ndarray]]:
        xs, ys = [], []
        for s in seeds:
            t = sample_truth(s)
            c = synthesize_clinical(t)
            f = measured_findings(t, np.random.default_rng(s))
            xs.append(
                feature_vector(
                    f, context_from_labs(c.labs, history=c.history, age=t.age, sex=t.sex)
                )
            )
            ys.append([int(d in t.diseases) for d in Disease])
        y = np.asarray(ys)
        return np.asarray(xs), {d: y[:, i] for i, d in enumerate(Disease)}

    x, y = data(range(50_000, 50_300))
    xc, yc = data(range(60_000, 60_150))
    m = FusionModel.train(x, y, xc, yc, {"data": "synthetic test"})
    path = tmp_path / "w.json"
    m.save(path)
    again = FusionModel.load(path)
    for variant in ("fused", "image", "labs"):
        a, b = m.predict_matrix(xc, variant), again.predict_matrix(xc, variant)
        for d in Disease:
            assert np.allclose(a[d], b[d], atol=1e-5)
    data_json = json.loads(path.read_text())
    data_json["heads"]["fused"]["cirrhosis"]["features"] = ["img.wrong"]
    path.write_text(json.dumps(data_json))
    with pytest.raises(FusionError, match="other features"):
        FusionModel.load(path)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(FusionError, match="not hpb-fusion/1"):
        FusionModel.load(tmp_path / "bad.json")
    assert len(FEATURES) == x.shape[1]


def test_ablation_results_are_complete_and_honest() -> None:
    res = json.loads((ROOT / "bench" / "results" / "fusion_ablation.json").read_text())
    assert res["cases"] >= 200
    assert "synthetic" in res["data"]
    sim = res["simulated_measurement"]
    assert "not from the segmentation network" in sim["data"]
    assert sim["cases"] >= 2000
    sections = [res, sim]
    if "network" in res:  # headline: image features from the segmentation network
        assert "segmentation network's findings" in res["data"]
        assert res["network"]["cases"] == res["cases"]
        sections += [res["network"][k] for k in ("shipped_model", "cross_validated")]
    for section in sections:
        assert set(section["diseases"]) == {d.value for d in Disease}
        for name, row in section["diseases"].items():
            for key in ("fused_auroc", "image_auroc", "labs_auroc", "fused_ece"):
                assert 0.0 <= row[key] <= 1.0, (name, key)
        # every disease where fusion does not beat imaging is listed, none hidden
        listed = {n for n, r in section["diseases"].items() if r["fused_auroc"] <= r["image_auroc"]}
        assert listed == set(section["fused_not_better_than_image"])
    for name, row in sim["diseases"].items():
        assert row["fused_ece"] < 0.1, name


def test_ablation_refuses_network_training_records_that_share_test_seeds(tmp_path: Path) -> None:
    """bench/fusion_ablation.py stops, before any work, when --network-train holds a seed
    of --network-cases; the shipped results file is not touched."""
    rows = _network_rows(3)
    test_file, train_file = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_file.write_text(json.dumps(rows[1]) + "\n")
    out = tmp_path / "ablation.json"
    args = ["--network-cases", str(test_file), "--network-train", str(train_file)]
    proc = _bench("fusion_ablation.py", *args, "--out", str(out))
    assert proc.returncode != 0
    assert "share 1 seeds" in proc.stderr
    assert not out.exists()


def _network_rows(n: int) -> list[dict[str, object]]:
    lines = (ROOT / "bench" / "results" / "fusion_network_cases.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def _bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ablation_refuses_training_records_of_another_segmentation_model(tmp_path: Path) -> None:
    """Heads fitted on one bundle's findings and tested on another's would be judged on
    features they never saw: bench/fusion_ablation.py stops before any work."""
    rows = _network_rows(2)
    other = {**rows[1], "seed": 999_999, "model": "other_bundle 9.9 000000000000"}
    test_file, train_file = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    test_file.write_text(json.dumps(rows[0]) + "\n")
    train_file.write_text(json.dumps(other) + "\n")
    out = tmp_path / "ablation.json"
    proc = _bench(
        "fusion_ablation.py",
        *("--network-cases", str(test_file), "--network-train", str(train_file)),
        *("--out", str(out), "--no-save-weights"),
    )
    assert proc.returncode != 0
    assert "holds records of other_bundle 9.9" in proc.stderr
    assert not out.exists()


def test_network_records_of_two_models_are_never_mixed(tmp_path: Path) -> None:
    """bench/fusion_network_cases.py refuses to append the shipped bundle's records to a
    file of another bundle's (before running the network), and load_cases refuses a
    file that mixes models."""
    sys.path.insert(0, str(ROOT / "bench"))
    from fusion_network_cases import MixedModels, load_cases

    rows = _network_rows(2)
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({**rows[0], "model": "other_bundle 9.9 000000000000"}) + "\n")
    before = old.read_text()
    proc = _bench(
        "fusion_network_cases.py", "--cases", "1", "--first-seed", "123", "--out", str(old)
    )
    assert proc.returncode == 2, proc.stderr
    assert "holds records of other_bundle 9.9" in proc.stderr
    assert "not of hpb_demo" in proc.stderr
    assert old.read_text() == before

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(old.read_text() + json.dumps(rows[1]) + "\n")
    with pytest.raises(MixedModels, match="several models"):
        load_cases(mixed)
    assert len(load_cases(ROOT / "bench" / "results" / "fusion_network_cases.jsonl")) == 320


def test_refit_script_measures_refits_and_reports_without_touching_the_shipped_files(
    tmp_path: Path,
) -> None:
    """bench/refit_fusion.sh end to end on a few cases, its outputs redirected: network
    records of the shipped bundle for the test and training seeds, fusion weights
    fitted on them, the ablation and the report bench; the shipped files are
    unchanged."""
    import hashlib
    import os

    shipped = [
        ROOT / "models" / "fusion_weights" / "fusion.json",
        *(ROOT / "bench" / "results" / n for n in ("fusion_ablation.json", "report_quality.json")),
    ]

    def digest() -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in shipped]

    before = digest()
    results, weights = tmp_path / "results", tmp_path / "fusion.json"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "WORK": str(tmp_path / "work"),
        "RESULTS": str(results),
        "WEIGHTS": str(weights),
        "CASES_TEST": "6",
        "CASES_TRAIN": "4",
        "CASES_REPORT": "2",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "refit_fusion.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert digest() == before
    sys.path.insert(0, str(ROOT / "bench"))
    from fusion_network_cases import load_cases

    test = load_cases(results / "fusion_network_cases.jsonl")
    train = load_cases(results / "fusion_train_network_cases.jsonl")
    assert [r["seed"] for r in test] == list(range(700_000, 700_006))
    assert [r["seed"] for r in train] == list(range(710_000, 710_004))
    assert load_cases(results / "report_network_cases.jsonl") == test[:2]
    model = FusionModel.load(weights)
    assert model.meta["network_features_from"] == sorted({test[0]["model"]})
    assert json.loads((results / "fusion_ablation.json").read_text())["cases"] == 6
    report = json.loads((results / "report_quality.json").read_text())
    assert report["headline_findings_source"] == "network" and report["cases"] == 2
