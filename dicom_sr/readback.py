"""Findings-like data from a read TID 1500 SR (ours or another tool's).

``readback(read_sr(path))`` gives organs, lesions (with their key-slice axes),
diagnosis probabilities and clinical inputs: what evaluation code and tests
compare with the ``Findings`` that produced the objects. Masks come from
``read_seg`` on the same source grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dicom_sr import codes
from dicom_sr.readers import Code, GroupRead, MeasurementRead, SrRead

_LESION_TYPES = {c.value for c in codes.LESION_TYPES.values()}
_VOLUME_TO_ML = {"ml": 1.0, "mL": 1.0, "cm3": 1.0, "mm3": 0.001, "l": 1000.0}


@dataclass(frozen=True)
class OrganReadback:
    label: str
    finding_type: Code | None
    volume_ml: float | None
    mean: float | None
    sd: float | None
    segment_number: int | None


@dataclass
class LesionReadback:
    tracking_id: str
    tracking_uid: str
    finding_type: Code | None
    finding_sites: list[Code]
    volume_ml: float | None
    long_axis_mm: float | None
    short_axis_mm: float | None
    mean: float | None
    centroid_lps: tuple[float, float, float] | None
    segment_number: int | None
    key_sop_uid: str = ""
    key_frames: tuple[int, ...] = ()
    long_axis_xy: npt.NDArray[np.float64] | None = None  # (2, 2) column,row
    short_axis_xy: npt.NDArray[np.float64] | None = None


@dataclass
class Readback:
    organs: dict[str, OrganReadback] = field(default_factory=dict)
    lesions: list[LesionReadback] = field(default_factory=list)
    diagnoses: dict[str, float] = field(default_factory=dict)  # SNOMED code -> probability
    clinical_used: dict[str, tuple[float, str]] = field(default_factory=dict)  # code -> value
    clinical_missing: list[str] = field(default_factory=list)
    findings_text: str = ""
    impression_text: str = ""


def _value(m: MeasurementRead | None) -> float | None:
    return None if m is None else m.value


def _volume_ml(g: GroupRead) -> float | None:
    for m in g.measurements:
        if m.name[2].lower() == "volume" and m.unit is not None:
            factor = _VOLUME_TO_ML.get(m.unit[0])
            if factor is not None:
                return m.value * factor
    return None


def _mean_sd(g: GroupRead) -> tuple[float | None, float | None]:
    mean = _value(g.measurement("Mean Attenuation Coefficient"))
    sd = _value(g.measurement("Standard Deviation of Attenuation Coefficient"))
    for m in g.measurements:
        if m.derivation is not None and m.derivation[2] == "Mean" and mean is None:
            mean = m.value
        if m.derivation is not None and m.derivation[2] == "Standard Deviation" and sd is None:
            sd = m.value
    return mean, sd


def _is_lesion(g: GroupRead) -> bool:
    if g.finding_type is not None and g.finding_type[0] in _LESION_TYPES:
        return True
    return g.measurement("Long Axis") is not None


def _report_level(sr: SrRead, out: Readback) -> None:
    """Diagnoses and clinical inputs where our SR keeps them (outside the groups)."""
    for ev in sr.evaluations:
        prob = ev.measurement("Probability")
        if ev.name[0] == codes.DIAGNOSIS.value and prob is not None:
            out.diagnoses[ev.value[0]] = prob.value
    if sr.clinical_inputs is not None:
        for m in sr.clinical_inputs.measurements:
            out.clinical_used[m.name[0]] = (m.value, m.unit[0] if m.unit else "")
        out.clinical_missing.extend(name[2] for name, _ in sr.clinical_inputs.evaluations)


def readback(sr: SrRead) -> Readback:
    """Findings-like data; also reads the layout of SRs written before 0.2 (diagnoses and
    clinical inputs as TID 1501 groups, lesion axes in the volumetric group)."""
    out = Readback(findings_text=sr.findings_text, impression_text=sr.impression_text)
    _report_level(sr, out)
    planar = [g for g in sr.groups if g.is_planar]
    for g in sr.groups:
        if g in planar:
            continue
        prob = g.measurement("Probability")
        if prob is not None and g.finding_type is not None:
            out.diagnoses[g.finding_type[0]] = prob.value
            continue
        if g.tracking_id == "clinical inputs":
            for m in g.measurements:
                out.clinical_used[m.name[0]] = (m.value, m.unit[0] if m.unit else "")
            out.clinical_missing.extend(name[2] for name, _ in g.evaluations)
            continue
        segment = g.referenced_segment[1] if g.referenced_segment else None
        mean, sd = _mean_sd(g)
        if _is_lesion(g):
            centroid = None
            for name, sc in g.scoord3d:
                if name[0] == codes.CENTER_OF_MASS.value:
                    p = sc.points[0]
                    centroid = (float(p[0]), float(p[1]), float(p[2]))
            out.lesions.append(
                LesionReadback(
                    tracking_id=g.tracking_id,
                    tracking_uid=g.tracking_uid,
                    finding_type=g.finding_type,
                    finding_sites=list(g.finding_sites),
                    volume_ml=_volume_ml(g),
                    long_axis_mm=_value(g.measurement("Long Axis")),
                    short_axis_mm=_value(g.measurement("Short Axis")),
                    mean=mean,
                    centroid_lps=centroid,
                    segment_number=segment,
                )
            )
        else:
            out.organs[g.tracking_id] = OrganReadback(
                label=g.tracking_id,
                finding_type=g.finding_type,
                volume_ml=_volume_ml(g),
                mean=mean,
                sd=sd,
                segment_number=segment,
            )
    by_uid = {les.tracking_uid: les for les in out.lesions if les.tracking_uid}
    for g in planar:
        les = by_uid.get(g.tracking_uid)
        if les is None:
            continue
        les.long_axis_mm = les.long_axis_mm or _value(g.measurement("Long Axis"))
        les.short_axis_mm = les.short_axis_mm or _value(g.measurement("Short Axis"))
        for axis_name, attr in (("Long Axis", "long_axis_xy"), ("Short Axis", "short_axis_xy")):
            axis = g.measurement(axis_name)
            if axis is not None and axis.scoords:
                setattr(les, attr, axis.scoords[0].points)
                les.key_sop_uid = axis.scoords[0].referenced_sop_uid
                les.key_frames = axis.scoords[0].referenced_frames
    return out
