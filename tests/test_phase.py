"""Contrast phase: from the series description, else estimated from attenuation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.phase import estimate_phase, phase_from_attenuation, phase_from_description
from models.synthetic.generator import generate_case
from models.synthetic.labels import LABEL_OF_ORGAN
from models.vocab import ContrastPhase, Organ

P = ContrastPhase


@pytest.mark.parametrize(
    ("text", "phase"),
    [
        ("PORTAL VENOUS 4mm SYNTHETIC", P.PORTAL_VENOUS),
        ("Venous phase 3.0 B30f", P.PORTAL_VENOUS),
        ("PV 3mm", P.PORTAL_VENOUS),
        ("Late arterial 1.25", P.ARTERIAL),
        ("ARTERIAL 4mm SYNTHETIC", P.ARTERIAL),
        ("Delayed 5 min", P.DELAYED),
        ("Equilibrium", P.DELAYED),
        ("NON CONTRAST 4mm SYNTHETIC", P.NON_CONTRAST),
        ("Abd/Pelvis w/o contrast", P.NON_CONTRAST),
        ("Unenhanced", P.NON_CONTRAST),
        ("Nativ 5mm", P.NON_CONTRAST),
        ("Abdomen C+ 5mm", None),  # contrast, but which phase is not said
        ("Art + PV", None),  # two phases named: nothing decided
        ("Multiphase liver", None),
        ("AXIAL SOFT TISSUE", None),
        ("Apart 5mm", None),  # "art" only as a whole word
        ("", None),
        (None, None),
    ],
)
def test_phase_from_description(text: str | None, phase: ContrastPhase | None) -> None:
    assert phase_from_description(text) is phase


@pytest.mark.parametrize(
    ("vein", "spleen", "phase"),
    [
        (35.0, 45.0, P.NON_CONTRAST),
        (95.0, 110.0, P.ARTERIAL),  # the vein not yet brighter than the spleen
        (150.0, 115.0, P.PORTAL_VENOUS),
        (85.0, 76.0, P.DELAYED),
        (100.0, 95.0, None),  # between arterial and delayed: not guessed
        (None, 100.0, None),
    ],
)
def test_phase_from_attenuation(
    vein: float | None, spleen: float | None, phase: ContrastPhase | None
) -> None:
    assert phase_from_attenuation(vein, spleen) is phase


@pytest.mark.parametrize(
    "phase", [P.NON_CONTRAST, P.ARTERIAL, P.PORTAL_VENOUS, P.DELAYED], ids=lambda p: p.value
)
def test_attenuation_estimate_on_generated_cases(phase: ContrastPhase) -> None:
    """Synthetic CT (reference masks): the estimate names the phase the case was drawn in."""
    for seed in (11, 12):
        case = generate_case(seed, modality="CT", phase=phase)
        means = {
            organ: float(case.image[case.organ_labels == LABEL_OF_ORGAN[organ]].mean())
            for organ in (Organ.PORTAL_SPLENIC_VEIN, Organ.SPLEEN)
        }
        est = estimate_phase("CT", {}, means)
        assert est.phase is phase, (seed, means)
        assert est.source == "attenuation" and "estimated from portal/splenic vein" in est.reason


def test_description_comes_first_and_contradictions_are_not_guessed() -> None:
    arterial_hu = {Organ.PORTAL_SPLENIC_VEIN: 95.0, Organ.SPLEEN: 110.0}
    est = estimate_phase("CT", {"SeriesDescription": "Portal venous 3mm"}, arterial_hu)
    assert est.phase is P.PORTAL_VENOUS and est.source == "description"
    assert "SeriesDescription" in est.reason
    est = estimate_phase("CT", {"SeriesDescription": "Abdomen", "ProtocolName": "Delayed"}, {})
    assert est.phase is P.DELAYED and "ProtocolName" in est.reason
    unenhanced = {Organ.PORTAL_SPLENIC_VEIN: 40.0, Organ.SPLEEN: 45.0}
    given = {"ContrastBolusAgent": "IOHEXOL 350", "ContrastApplied": True}  # as the loader reads it
    est = estimate_phase("CT", given, unenhanced)
    assert est.phase is P.UNKNOWN and "contrast agent" in est.reason
    est = estimate_phase("MR", {}, unenhanced)  # no attenuation rule for MR signal
    assert est.phase is P.UNKNOWN and est.source == "none"
    est = estimate_phase("CT", {}, {Organ.SPLEEN: 45.0})
    assert est.phase is P.UNKNOWN and "not segmented" in est.reason


def test_real_ct_example_reads_as_unenhanced(shared_data: Path) -> None:
    """The real TotalSegmentator example CT: with its reference vein and spleen masks
    the estimate is non-contrast, as its aorta (about 41 HU, unenhanced blood) and
    kidneys (about 15 HU) confirm."""
    from models.nifti import load_nifti_krc

    root = shared_data / "ct_abdomen_3mm"
    ct, _ = load_nifti_krc(root / "ct.nii.gz")

    def mean_in(name: str) -> float:
        mask, _ = load_nifti_krc(root / "labels" / f"{name}.nii.gz")
        return float(np.asarray(ct)[mask > 0].mean())

    assert mean_in("aorta") < 60.0
    means = {
        Organ.PORTAL_SPLENIC_VEIN: mean_in("portal_vein_and_splenic_vein"),
        Organ.SPLEEN: mean_in("spleen"),
    }
    assert estimate_phase("CT", {}, means).phase is P.NON_CONTRAST
