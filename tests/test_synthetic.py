"""The synthetic case generator: determinism, anatomy, appearance by phase, files."""

from __future__ import annotations

import argparse
import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from models.anatomy import couinaud_segment, pancreas_part
from models.case import CaseTruth
from models.loader import load_series
from models.nifti import load_nifti_krc
from models.synthetic import (
    ORGAN_LABELS,
    SyntheticCase,
    generate_case,
    read_manifest,
    sample_diseases,
    write_case,
    write_dataset,
)
from models.synthetic import labels as L
from models.vocab import ContrastPhase, Disease, LesionKind, Organ, SubSite
from node import cli_synth
from node.errors import ConfigError

ARTERIAL = ContrastPhase.ARTERIAL
PORTAL = ContrastPhase.PORTAL_VENOUS


def _volume_ml(case: SyntheticCase, label: int) -> float:
    return (
        float((case.organ_labels == label).sum()) * abs(np.linalg.det(case.affine[:3, :3])) / 1000
    )


def _core_mean(case: SyntheticCase, mask: np.ndarray) -> float:
    """Mean inside a mask eroded by one voxel in-plane (avoids partial volume)."""
    core = ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), bool))
    return float(case.image[core if core.sum() >= 4 else mask].mean())


def _liver_parenchyma_mean(case: SyntheticCase) -> float:
    liver = (case.organ_labels == L.LIVER) & (case.lesion_labels == 0)
    return _core_mean(case, liver)


def test_same_seed_same_case_and_different_seed_differs() -> None:
    a = generate_case(11)
    b = generate_case(11)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.organ_labels, b.organ_labels)
    assert np.array_equal(a.lesion_labels, b.lesion_labels)
    assert a.truth == b.truth
    c = generate_case(12)
    assert not np.array_equal(a.organ_labels, c.organ_labels)


def test_forcing_the_phase_keeps_the_patient() -> None:
    a = generate_case(4, phase=ARTERIAL)
    b = generate_case(4, phase=PORTAL)
    assert np.array_equal(a.organ_labels, b.organ_labels)
    assert np.array_equal(a.lesion_labels, b.lesion_labels)
    assert not np.array_equal(a.image, b.image)


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_organs_present_with_plausible_volumes(seed: int) -> None:
    case = generate_case(seed)
    assert case.image.shape == (64, 96, 96) and case.image.dtype == np.float32
    assert case.organ_labels.dtype == np.uint8 and case.lesion_labels.dtype == np.uint16
    assert set(np.unique(case.organ_labels)) <= {0, *ORGAN_LABELS}
    cirrhotic = Disease.CIRRHOSIS in case.truth.diseases
    ranges = {
        L.LIVER: (800, 2400),
        L.SPLEEN: (80, 700 if cirrhotic else 450),
        L.PANCREAS: (25, 160),
        L.KIDNEY_LEFT: (50, 300),
        L.KIDNEY_RIGHT: (50, 300),
        L.GALLBLADDER: (5, 90),
        L.PORTAL_SPLENIC_VEIN: (3, 60),
        L.BILE_DUCT: (0.3, 30),
    }
    for label, (lo, hi) in ranges.items():
        v = _volume_ml(case, label)
        assert lo <= v <= hi, f"{ORGAN_LABELS[label]} {v:.0f} ml outside [{lo}, {hi}]"

    # anatomy sits where it should in patient coordinates (LPS: +x = patient left)
    def centroid_x(label: int) -> float:
        k = np.argwhere(case.organ_labels == label).mean(axis=0)
        return float(case.affine[0, :3] @ k + case.affine[0, 3])

    assert centroid_x(L.LIVER) < centroid_x(L.SPLEEN)
    assert centroid_x(L.KIDNEY_RIGHT) < centroid_x(L.KIDNEY_LEFT)
    # CT intensities in HU, with noise like a real scanner
    assert case.image.min() >= -1025 and case.image.max() < 3072
    fat = case.image[(case.organ_labels == 0)]
    assert np.any((fat > -130) & (fat < -70))


def test_hcc_enhances_in_arterial_and_washes_out_in_portal_phase() -> None:
    diseases = (Disease.CIRRHOSIS, Disease.HCC)
    art = generate_case(21, phase=ARTERIAL, diseases=diseases)
    pv = generate_case(21, phase=PORTAL, diseases=diseases)
    hcc = [les for les in art.truth.lesions if les.disease is Disease.HCC]
    assert hcc, "the generator placed no HCC"
    mask = art.lesion_labels == hcc[0].number
    assert _core_mean(art, mask) > _liver_parenchyma_mean(art) + 20
    assert _core_mean(pv, mask) < _liver_parenchyma_mean(pv) - 10
    assert art.truth.organ_qualities["cirrhotic_contour"] == 1.0


def test_lesion_appearances_metastasis_cyst_gallstone_pdac_steatosis() -> None:
    case = generate_case(
        8,
        phase=PORTAL,
        diseases=(
            Disease.LIVER_METASTASIS,
            Disease.SIMPLE_CYST,
            Disease.CHOLELITHIASIS,
            Disease.PDAC,
        ),
    )
    by = {d: [les for les in case.truth.lesions if les.disease is d] for d in case.truth.diseases}
    liver = _liver_parenchyma_mean(case)
    for les in by[Disease.LIVER_METASTASIS]:
        assert les.organ is Organ.LIVER and les.sub_site is not None
        assert _core_mean(case, case.lesion_labels == les.number) < liver - 10
    for les in by[Disease.SIMPLE_CYST]:
        assert les.kind is LesionKind.CYST
        assert -15 < _core_mean(case, case.lesion_labels == les.number) < 35
    for les in by[Disease.CHOLELITHIASIS]:
        assert les.organ is Organ.GALLBLADDER and les.kind is LesionKind.CALCULUS
        assert float(case.image[case.lesion_labels == les.number].max()) > 150
    (pdac,) = by[Disease.PDAC]
    assert pdac.sub_site in (SubSite.PANCREAS_HEAD, SubSite.PANCREAS_BODY, SubSite.PANCREAS_TAIL)
    pancreas = (case.organ_labels == L.PANCREAS) & (case.lesion_labels == 0)
    assert _core_mean(case, case.lesion_labels == pdac.number) < float(
        np.median(case.image[pancreas])
    )
    assert case.truth.organ_qualities["gallstones"] == len(by[Disease.CHOLELITHIASIS])

    fatty = generate_case(8, phase=ContrastPhase.NON_CONTRAST, diseases=(Disease.STEATOSIS,))
    q = fatty.truth.organ_qualities
    assert q["liver_mean_hu"] < q["spleen_mean_hu"] - 10
    normal = generate_case(8, phase=ContrastPhase.NON_CONTRAST, diseases=())
    assert (
        normal.truth.organ_qualities["liver_mean_hu"]
        > fatty.truth.organ_qualities["liver_mean_hu"] + 10
    )


def test_head_pdac_dilates_the_pancreatic_and_common_bile_duct() -> None:
    case = generate_case(30, diseases=(Disease.PDAC,))  # seed 30 draws a head tumour
    assert [les.sub_site for les in case.truth.lesions] == [SubSite.PANCREAS_HEAD]
    assert case.truth.organ_qualities["pancreatic_duct_mm"] >= 5.0
    assert case.truth.organ_qualities["cbd_mm"] >= 10.0
    assert case.truth.organ_qualities["intrahepatic_duct_dilatation"] == 1.0
    normal = generate_case(30, diseases=())
    assert normal.truth.organ_qualities["pancreatic_duct_mm"] < 3.0
    assert _volume_ml(case, L.BILE_DUCT) > 2 * _volume_ml(normal, L.BILE_DUCT)


def test_truth_sub_sites_match_the_shared_anatomy_definitions() -> None:
    case = generate_case(
        2,
        diseases=(Disease.HAEMANGIOMA, Disease.LIVER_METASTASIS, Disease.PANCREATIC_CYSTIC_LESION),
    )
    assert case.truth.lesions
    liver = case.organ_labels == L.LIVER
    pancreas = case.organ_labels == L.PANCREAS
    for les in case.truth.lesions:
        mask = case.lesion_labels == les.number
        assert mask.any()
        assert np.allclose(np.argwhere(mask).mean(axis=0), les.centroid_krc, atol=0.01)
        if les.organ is Organ.LIVER:
            assert les.sub_site is couinaud_segment(mask, liver, case.affine)
        elif les.organ is Organ.PANCREAS:
            assert les.sub_site is pancreas_part(mask, pancreas, case.affine)
        assert les.diameter_mm > 0


def test_mr_case_and_hcc_dynamics_on_mr() -> None:
    case = generate_case(3, modality="MR")
    assert case.truth.modality == "MR"
    assert case.image.min() >= 0
    assert all(les.mean_hu is None for les in case.truth.lesions)
    assert "liver_mean_si" in case.truth.organ_qualities
    diseases = (Disease.CIRRHOSIS, Disease.HCC)
    art = generate_case(21, modality="MR", phase=ARTERIAL, diseases=diseases)
    pv = generate_case(21, modality="MR", phase=PORTAL, diseases=diseases)
    (hcc,) = [les for les in art.truth.lesions if les.disease is Disease.HCC]
    mask = art.lesion_labels == hcc.number
    assert _core_mean(art, mask) > _liver_parenchyma_mean(art) * 1.3
    assert _core_mean(pv, mask) < _liver_parenchyma_mean(pv) * 0.9


def test_same_anatomy_on_another_grid() -> None:
    small = generate_case(6)
    fine = generate_case(6, shape=(54, 120, 120), spacing=(6.0, 3.2, 3.2))
    assert fine.image.shape == (54, 120, 120)
    for label in (L.LIVER, L.SPLEEN, L.KIDNEY_LEFT):
        a, b = _volume_ml(small, label), _volume_ml(fine, label)
        assert abs(a - b) / a < 0.15, (ORGAN_LABELS[label], a, b)


def test_disease_sampler_mix() -> None:
    rng = np.random.default_rng(0)
    draws = [sample_diseases(rng) for _ in range(3000)]
    normal = sum(1 for d in draws if not d) / len(draws)
    assert 0.2 < normal < 0.3
    hcc = [d for d in draws if Disease.HCC in d]
    assert sum(Disease.CIRRHOSIS in d for d in hcc) / len(hcc) > 0.75
    counts = Counter(x for d in draws for x in d)
    assert set(counts) == set(Disease)  # every target disease occurs


def test_written_case_loads_back_identically(tmp_path: Path) -> None:
    case = generate_case(9)
    paths = write_case(case, tmp_path / "case")
    vol = load_series(paths["dicom"])
    verify = subprocess.run(
        ["dciodvfy", str(next(paths["dicom"].iterdir()))], capture_output=True, text=True
    )
    assert "Error" not in verify.stdout + verify.stderr, verify.stderr
    np.testing.assert_allclose(vol.affine, case.affine, atol=1e-4)
    assert np.array_equal(vol.array, np.round(case.image))
    assert vol.headers["PatientSex"] == case.truth.sex
    assert vol.headers["PatientAge"] == f"{case.truth.age:03d}Y"
    assert "SYNTHETIC" in vol.headers["SeriesDescription"]
    assert vol.headers["ContrastApplied"] is (case.truth.phase is not ContrastPhase.NON_CONTRAST)
    labels, aff = load_nifti_krc(paths["label"])
    assert np.array_equal(labels, case.organ_labels)
    np.testing.assert_allclose(aff, case.affine, atol=1e-5)
    lesions, _ = load_nifti_krc(paths["lesions"])
    assert np.array_equal(lesions, case.lesion_labels)
    truth = CaseTruth.from_json(json.loads(paths["truth"].read_text()))
    assert truth == case.truth


def cli_main(argv: list[str]) -> int:
    """``hpb-node synth`` through its own parser (the full CLI imports torch for training)."""
    parser = argparse.ArgumentParser()
    cli_synth.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_registers_synth() -> None:
    from node.cli import COMMAND_MODULES

    assert "node.cli_synth" in COMMAND_MODULES


def test_dataset_manifest_and_cli(tmp_path: Path) -> None:
    manifest = write_dataset(tmp_path / "ds", [0, 9], dicom=False)
    rows = read_manifest(manifest)
    assert [r["case_id"] for r in rows] == ["synth-000000", "synth-000009"]
    assert [r["split"] for r in rows] == ["train", "val"]
    for r in rows:
        for role in ("image", "label", "lesions", "truth"):
            assert Path(r[role]).is_file()
        assert r["synthetic"] is True and r["label_table"]["1"] == "liver"
    rc = cli_main(
        [
            "synth",
            "--out",
            str(tmp_path / "ds"),
            "-n",
            "1",
            "--seed",
            "3",
            "--mr-share",
            "1",
            "--no-dicom",
            "--shape",
            "32",
            "64",
            "64",
            "--spacing",
            "8",
            "6",
            "6",
        ]
    )
    assert rc == 0
    rows = read_manifest(manifest)
    assert len(rows) == 3
    assert rows[-1]["modality"] == "MR" and rows[-1]["shape"] == [32, 64, 64]
    assert "dicom" not in rows[-1]
    with pytest.raises(ConfigError, match="--count"):
        cli_main(["synth", "--out", str(tmp_path / "x"), "-n", "0"])


# ---------------------------------------------------------------- models.anatomy on a real liver


def test_couinaud_and_pancreas_parts_on_real_masks(shared_data: Path) -> None:
    from models.anatomy import COUINAUD_ORDER, couinaud_map, pancreas_part_map

    liver, aff = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "labels" / "liver.nii.gz")
    seg = couinaud_map(liver > 0, aff)
    assert set(np.unique(seg)) == set(range(10))  # background + all nine segments

    def centre(mask: np.ndarray) -> np.ndarray:
        return np.argwhere(mask).mean(axis=0) @ aff[:3, :3].T + aff[:3, 3]

    c = {s: centre(seg == i + 1) for i, s in enumerate(COUINAUD_ORDER)}
    S = SubSite
    # LPS: +x patient left, +y posterior, +z superior
    assert c[S.COUINAUD_II][0] > c[S.COUINAUD_IVA][0] > c[S.COUINAUD_VIII][0]
    assert c[S.COUINAUD_VII][1] > c[S.COUINAUD_VIII][1]  # posterior sector is posterior
    assert c[S.COUINAUD_VII][2] > c[S.COUINAUD_VI][2]  # above the portal plane
    assert c[S.COUINAUD_I][1] > c[S.COUINAUD_IVA][1]  # caudate lies posterior
    # the same physical voxel gets the same segment on a flipped grid
    flipped = aff.copy()
    flipped[:3, 3] = (
        aff[:3, 3] + (liver.shape[1] - 1) * aff[:3, 1] + (liver.shape[2] - 1) * aff[:3, 2]
    )
    flipped[:3, 1:3] = -aff[:3, 1:3]
    seg_f = couinaud_map(liver[:, ::-1, ::-1] > 0, flipped)
    assert np.array_equal(seg_f[:, ::-1, ::-1], seg)
    point = np.argwhere(seg == 8)[0]  # a segment VII voxel
    assert couinaud_segment(point, liver > 0, aff) is S.COUINAUD_VII

    pancreas, paff = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "labels" / "pancreas.nii.gz")
    parts = pancreas_part_map(pancreas > 0, paff)
    head = np.argwhere(parts == 1).mean(axis=0) @ paff[:3, :3].T + paff[:3, 3]
    tail = np.argwhere(parts == 3).mean(axis=0) @ paff[:3, :3].T + paff[:3, 3]
    assert head[0] < tail[0]  # head on the patient's right
    assert pancreas_part(pancreas > 0, pancreas > 0, paff) in set(SubSite)
