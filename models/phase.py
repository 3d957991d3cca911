"""Contrast phase of a CT series: what its description says, or else an estimate
from the attenuation of the portal/splenic vein and the spleen.

The node's fusion classifier reads lesion and organ attenuation against the phase
(``models.fusion.image_features``), and the report only compares the liver with
the spleen outside the arterial and delayed phases; without a phase both fall back
to the portal-venous baseline.

1. **Description.** ``SeriesDescription`` and then ``ProtocolName`` are searched for
   the usual words ("arterial", "portal venous", "delayed", "non-contrast",
   "unenhanced", ...). A description that names more than one phase decides nothing.
2. **Attenuation** (CT only), from the segmented vessels and spleen, following the
   order in which contrast arrives: before it, blood and spleen are below 60 HU;
   in the arterial phase the portal vein is not yet brighter than the enhancing
   spleen; in the portal-venous phase it is clearly brighter (and at least 110 HU);
   in the delayed phase both have washed down, the vein at or a little above the
   spleen. Anything between is left unknown.

The thresholds come from that physiology with margins set on the demo network's
measurements of synthetic cases (bench/results/fusion_*network_cases.jsonl); on
real scanners and injection protocols they are unvalidated, which is why the
description is read first and the estimate is named as an estimate in the
findings' notes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.vocab import ContrastPhase, Organ

#: Phase words in series descriptions (lower case, whole words, separators as spaces)
_WORDS: tuple[tuple[ContrastPhase, str], ...] = (
    (
        ContrastPhase.NON_CONTRAST,
        r"non ?contrast|unenhanced|non ?enhanced|native|pre ?contrast|plain|without contrast|"
        r"w ?o contrast|nativ",
    ),
    (ContrastPhase.ARTERIAL, r"(?:early |late |hepatic )?arterial|art|angio|hap"),
    (ContrastPhase.PORTAL_VENOUS, r"portal(?: venous)?|porto ?venous|venous|pv|pvp|venos"),
    (ContrastPhase.DELAYED, r"delayed|equilibrium|late phase|excretory|transitional|eq"),
)

#: Attenuation thresholds (HU); see the module docstring
UNENHANCED_MAX_HU = 60.0
ARTERIAL_SPLEEN_MIN_HU = 90.0
ARTERIAL_VEIN_MINUS_SPLEEN_MAX_HU = 5.0
PORTAL_VEIN_MIN_HU = 110.0
PORTAL_VEIN_MINUS_SPLEEN_MIN_HU = 8.0
DELAYED_VEIN_MAX_HU = 110.0
DELAYED_SPLEEN_MAX_HU = 90.0
DELAYED_VEIN_MINUS_SPLEEN_MIN_HU = -5.0


#: How every note of :attr:`PhaseEstimate.reason` starts (found again by
#: ``models.findings.Provenance.phase_statement``)
NOTE_PREFIX = "contrast phase "


@dataclass(frozen=True)
class PhaseEstimate:
    phase: ContrastPhase
    #: "description", "attenuation" or "none"
    source: str
    #: what was read and what it gave
    why: str

    @property
    def reason(self) -> str:
        """One line for the findings' notes."""
        return f"{NOTE_PREFIX}{self.phase.value}: {self.why}"


def phase_from_description(text: str | None) -> ContrastPhase | None:
    """The one phase a series description names, or None (none, or several)."""
    if not text:
        return None
    words = " " + re.sub(r"[^a-z0-9]+", " ", text.lower()) + " "
    if re.search(r" (?:multi ?phase|multiphasic|tri ?phasic|dual ?phase) ", words):
        return None
    named = {phase for phase, pattern in _WORDS if re.search(rf" (?:{pattern}) ", words)}
    return named.pop() if len(named) == 1 else None


def phase_from_attenuation(vein_hu: float | None, spleen_hu: float | None) -> ContrastPhase | None:
    """The phase the portal/splenic vein and spleen attenuation point to, or None."""
    if vein_hu is None or spleen_hu is None:
        return None
    diff = vein_hu - spleen_hu
    if vein_hu < UNENHANCED_MAX_HU and spleen_hu < UNENHANCED_MAX_HU:
        return ContrastPhase.NON_CONTRAST
    if spleen_hu >= ARTERIAL_SPLEEN_MIN_HU and diff < ARTERIAL_VEIN_MINUS_SPLEEN_MAX_HU:
        return ContrastPhase.ARTERIAL
    if vein_hu >= PORTAL_VEIN_MIN_HU and diff >= PORTAL_VEIN_MINUS_SPLEEN_MIN_HU:
        return ContrastPhase.PORTAL_VENOUS
    if (
        vein_hu < DELAYED_VEIN_MAX_HU
        and spleen_hu < DELAYED_SPLEEN_MAX_HU
        and diff >= DELAYED_VEIN_MINUS_SPLEEN_MIN_HU
    ):
        return ContrastPhase.DELAYED
    return None


def estimate_phase(
    modality: str, headers: Mapping[str, Any], organ_hu: Mapping[Organ, float | None]
) -> PhaseEstimate:
    """The series' contrast phase: its description first, then (CT) attenuation."""
    for key in ("SeriesDescription", "ProtocolName"):
        text = headers.get(key)
        phase = phase_from_description(str(text) if text else None)
        if phase is not None:
            return PhaseEstimate(phase, "description", f"from {key} {text!r}")
    if modality.upper() != "CT":
        return PhaseEstimate(ContrastPhase.UNKNOWN, "none", "not named in the series")
    vein = organ_hu.get(Organ.PORTAL_SPLENIC_VEIN)
    spleen = organ_hu.get(Organ.SPLEEN)
    phase = phase_from_attenuation(vein, spleen)
    measured = (
        f"portal/splenic vein {vein:.0f} HU, spleen {spleen:.0f} HU"
        if vein is not None and spleen is not None
        else "portal/splenic vein or spleen not segmented"
    )
    # ContrastApplied: models.loader's reading of the contrast/bolus attributes
    if phase is ContrastPhase.NON_CONTRAST and headers.get("ContrastApplied"):
        return PhaseEstimate(
            ContrastPhase.UNKNOWN,
            "none",
            f"attenuation looks unenhanced ({measured}) but the header names a contrast agent",
        )
    if phase is None:
        return PhaseEstimate(ContrastPhase.UNKNOWN, "none", f"not named, {measured}")
    return PhaseEstimate(phase, "attenuation", f"estimated from {measured}")
