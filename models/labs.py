"""The laboratory panel for hepatobiliary and pancreatic disease, in one place.

Each :class:`LabTest` names the analyte, its LOINC code(s), the canonical UCUM
unit every value is normalised to, an adult reference range and a plausibility
range (values outside it are treated as errors of entry or of units, not as
results). Unit conversion is UCUM-aware: unit strings are parsed with
``ucumvert`` (UCUM grammar -> ``pint``), and conversions between mass and
substance concentrations (bilirubin mg/dL <-> µmol/L) use the analyte's molar
mass from :data:`LAB_PANEL`.

Reference ranges are typical adult values from common laboratory practice; a
site configures its own where they differ. Qualitative tests (HBsAg, anti-HCV)
are coded 1.0 (reactive / positive) or 0.0 (non-reactive / negative).

Age and sex come from DICOM (PatientAge, PatientSex, PatientBirthDate) through
:func:`age_from_dicom` and :func:`sex_from_dicom`, which take the attribute
strings, so ``models`` needs no DICOM library here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from models.findings import ClinicalValue

__all__ = [
    "LAB_PANEL",
    "ClinicalContext",
    "LabTest",
    "LabUnitError",
    "NormalisedValue",
    "age_from_dicom",
    "by_code",
    "by_name",
    "demographics",
    "normalise",
    "sex_from_dicom",
]


class LabUnitError(ValueError):
    """A value's unit is unknown, or cannot express the analyte; the message says which."""


@dataclass(frozen=True)
class LabTest:
    name: str  # short panel name, used as ClinicalValue.name and feature name
    display: str
    loinc: str  # primary LOINC code (the one values are stored under)
    unit: str  # canonical UCUM unit
    reference: tuple[float, float]  # adult reference interval, canonical unit
    plausible: tuple[float, float]  # outside this: rejected as implausible
    aliases: tuple[str, ...] = ()  # other LOINC codes for the same analyte
    molar_mass_g_per_mol: float | None = None  # mass <-> substance conversions
    qualitative: bool = False  # 1.0 reactive / 0.0 non-reactive
    # Units of arbitrary-unit assays that are conventionally interchangeable
    # (e.g. CA 19-9 "U/mL" and "[arb'U]/mL" and "k[IU]/L").
    unit_factors: tuple[tuple[str, float], ...] = ()

    @property
    def codes(self) -> tuple[str, ...]:
        return (self.loinc, *self.aliases)

    def is_high(self, value: float) -> bool:
        return value > self.reference[1]

    def is_low(self, value: float) -> bool:
        return value < self.reference[0]


LAB_PANEL: tuple[LabTest, ...] = (
    LabTest(
        "AFP",
        "alpha-fetoprotein",
        "1834-1",
        "ng/mL",
        (0.0, 8.8),
        (0.0, 1.0e6),
        aliases=("19176-7",),
        # 1 IU AFP = 1.21 ng (WHO 72/225)
        unit_factors=(("[IU]/mL", 1.21), ("k[IU]/L", 1.21), ("ug/L", 1.0)),
    ),
    LabTest(
        "CA19-9",
        "CA 19-9",
        "24108-3",
        "[U]/mL",
        (0.0, 37.0),
        (0.0, 1.0e6),
        unit_factors=(("U/mL", 1.0), ("[arb'U]/mL", 1.0), ("k[U]/L", 1.0), ("kU/L", 1.0)),
    ),
    LabTest(
        "CEA",
        "carcinoembryonic antigen",
        "2039-6",
        "ng/mL",
        (0.0, 5.0),
        (0.0, 1.0e5),
        unit_factors=(("ug/L", 1.0),),
    ),
    LabTest(
        "BILI_T",
        "total bilirubin",
        "1975-2",
        "mg/dL",
        (0.1, 1.2),
        (0.0, 60.0),
        aliases=("14631-6", "42719-5"),
        molar_mass_g_per_mol=584.66,
    ),
    LabTest(
        "BILI_D",
        "direct bilirubin",
        "1968-7",
        "mg/dL",
        (0.0, 0.3),
        (0.0, 50.0),
        aliases=("14629-0", "15152-2"),
        molar_mass_g_per_mol=584.66,
    ),
    LabTest(
        "ALT",
        "alanine aminotransferase",
        "1742-6",
        "U/L",
        (7.0, 56.0),
        (0.0, 20000.0),
        aliases=("1743-4", "1744-2"),
    ),
    LabTest(
        "AST",
        "aspartate aminotransferase",
        "1920-8",
        "U/L",
        (8.0, 40.0),
        (0.0, 20000.0),
        aliases=("30239-8",),
    ),
    LabTest("ALP", "alkaline phosphatase", "6768-6", "U/L", (40.0, 130.0), (0.0, 10000.0)),
    LabTest("GGT", "gamma-glutamyltransferase", "2324-2", "U/L", (8.0, 61.0), (0.0, 10000.0)),
    LabTest(
        "ALB",
        "albumin",
        "1751-7",
        "g/dL",
        (3.5, 5.0),
        (0.5, 7.5),
        aliases=("61151-7", "2862-1"),
        molar_mass_g_per_mol=66500.0,
    ),
    LabTest(
        "INR",
        "INR",
        "6301-6",
        "{INR}",
        (0.8, 1.2),
        (0.5, 15.0),
        aliases=("34714-6",),
        unit_factors=(("1", 1.0), ("{ratio}", 1.0)),
    ),
    LabTest(
        "PLT",
        "platelet count",
        "777-3",
        "10*3/uL",
        (150.0, 400.0),
        (1.0, 2000.0),
        aliases=("26515-7",),
    ),
    LabTest("LIPASE", "lipase", "3040-3", "U/L", (0.0, 60.0), (0.0, 50000.0)),
    LabTest("AMYLASE", "amylase", "1798-8", "U/L", (30.0, 110.0), (0.0, 50000.0)),
    LabTest(
        "HBSAG",
        "hepatitis B surface antigen",
        "5196-1",
        "{presence}",
        (0.0, 0.0),
        (0.0, 1.0),
        aliases=("5195-3",),
        qualitative=True,
    ),
    LabTest(
        "ANTI_HCV",
        "hepatitis C virus antibody",
        "16128-1",
        "{presence}",
        (0.0, 0.0),
        (0.0, 1.0),
        aliases=("13955-0",),
        qualitative=True,
    ),
)

_BY_NAME = {t.name: t for t in LAB_PANEL}
_BY_CODE = {code: t for t in LAB_PANEL for code in t.codes}


def by_name(name: str) -> LabTest:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not in the lab panel ({', '.join(_BY_NAME)})") from None


def by_code(loinc: str) -> LabTest | None:
    """The panel test for a LOINC code (primary or alias), or None if not in the panel."""
    return _BY_CODE.get(loinc.strip())


# ---------------------------------------------------------------------------
# units

_POSITIVE = {"pos", "positive", "reactive", "detected", "present", "+", "1", "yes", "true"}
_NEGATIVE = {
    "neg",
    "negative",
    "non-reactive",
    "nonreactive",
    "not detected",
    "absent",
    "-",
    "0",
    "no",
    "false",
}


@functools.lru_cache(maxsize=1)
def _registry() -> Any:
    from ucumvert import PintUcumRegistry  # parsing the UCUM grammar takes ~0.5 s: lazily

    return PintUcumRegistry()


@functools.lru_cache(maxsize=256)
def _parse_ucum(unit: str) -> Any:
    reg = _registry()
    try:
        return reg.Quantity(1.0, reg.from_ucum(unit))
    except Exception as exc:  # lark/pint raise many kinds; all mean "not a UCUM unit"
        raise LabUnitError(f"{unit!r} is not a UCUM unit this node understands: {exc}") from exc


_UNIT_SPELLINGS = {
    "µmol/L": "umol/L",
    "μmol/L": "umol/L",
    "mmol/l": "mmol/L",
    "umol/l": "umol/L",
    "mg/dl": "mg/dL",
    "g/dl": "g/dL",
    "g/l": "g/L",
    "iu/l": "[IU]/L",
    "IU/L": "[IU]/L",
    "IU/mL": "[IU]/mL",
    "u/l": "U/L",
    "u/ml": "U/mL",
    "x10^9/L": "10*9/L",
    "10^9/L": "10*9/L",
    "x10E9/L": "10*9/L",
    "10^3/uL": "10*3/uL",
    "K/uL": "10*3/uL",
    "10*3/µL": "10*3/uL",
}


def canonical_unit_string(unit: str) -> str:
    """Common non-UCUM spellings (µmol/l, x10^9/L, IU/L) mapped to UCUM."""
    u = unit.strip().replace("µ", "u").replace("μ", "u")
    return _UNIT_SPELLINGS.get(u, _UNIT_SPELLINGS.get(u.lower(), u))


@dataclass(frozen=True)
class NormalisedValue:
    test: LabTest
    value: float  # in test.unit
    original_value: float | str
    original_unit: str
    plausible: bool
    flag: str  # "L", "N", "H" (against the reference range) or "" if implausible

    @property
    def reason(self) -> str:
        if self.plausible:
            return ""
        lo, hi = self.test.plausible
        return (
            f"{self.test.name} {self.value:g} {self.test.unit} is outside the plausible "
            f"range {lo:g}-{hi:g}"
        )


def _qualitative(test: LabTest, value: float | str) -> float:
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _POSITIVE:
            return 1.0
        if v in _NEGATIVE:
            return 0.0
        raise LabUnitError(f"{test.name}: cannot read {value!r} as reactive / non-reactive")
    if value in (0, 1):
        return float(value)
    raise LabUnitError(f"{test.name}: qualitative result must be 0 or 1, got {value!r}")


def convert(test: LabTest, value: float, unit: str) -> float:
    """``value`` in ``unit`` expressed in the test's canonical unit (raises LabUnitError)."""
    u = canonical_unit_string(unit)
    if u == test.unit or (not u and test.unit.startswith("{")):
        return float(value)
    for alt, factor in test.unit_factors:
        if u == alt:
            return float(value) * factor
    if test.unit.startswith("{") or test.unit == "[U]/mL":
        raise LabUnitError(f"{test.name}: unit {unit!r} cannot be converted to {test.unit}")
    reg = _registry()
    src = _parse_ucum(u) * float(value)
    dst = _parse_ucum(test.unit)
    try:
        return float(src.to(dst.units).magnitude)
    except Exception:  # pint DimensionalityError: maybe mass <-> substance
        pass
    if test.molar_mass_g_per_mol is not None:
        molar = reg.Quantity(test.molar_mass_g_per_mol, "g/mol")
        for candidate in (src * molar, src / molar):
            try:
                return float(candidate.to(dst.units).magnitude)
            except Exception:  # wrong direction: try the other
                continue
    raise LabUnitError(
        f"{test.name}: unit {unit!r} has the wrong dimension for {test.display} ({test.unit})"
    )


def normalise(test: LabTest, value: float | str, unit: str) -> NormalisedValue:
    """Convert to the canonical unit and check plausibility and the reference range.

    Raises :class:`LabUnitError` for a unit that cannot express the analyte or a
    non-numeric quantitative value; an implausible number is returned with
    ``plausible=False`` (the caller decides to store it flagged, and never uses it).
    """
    if test.qualitative:
        v = _qualitative(test, value)
        return NormalisedValue(test, v, value, unit, True, "H" if v else "N")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LabUnitError(f"{test.name}: value {value!r} is not a number") from None
    if not math.isfinite(number):
        raise LabUnitError(f"{test.name}: value {value!r} is not a finite number")
    v = convert(test, number, unit)
    lo, hi = test.plausible
    if not lo <= v <= hi:
        return NormalisedValue(test, v, value, unit, False, "")
    flag = "H" if test.is_high(v) else "L" if test.is_low(v) else "N"
    return NormalisedValue(test, v, value, unit, True, flag)


# ---------------------------------------------------------------------------
# demographics from DICOM attribute strings


def _dicom_date(text: str) -> date | None:
    t = text.strip()
    if len(t) != 8 or not t.isdigit():
        return None
    try:
        return date(int(t[:4]), int(t[4:6]), int(t[6:]))
    except ValueError:
        return None


def age_from_dicom(patient_age: str = "", birth_date: str = "", study_date: str = "") -> int | None:
    """Age in whole years from PatientAge ("061Y", "030M") or birth and study dates."""
    a = patient_age.strip().upper()
    if len(a) == 4 and a[:3].isdigit() and a[3] in "DWMY":
        n = int(a[:3])
        return {"Y": n, "M": n // 12, "W": n // 52, "D": n // 365}[a[3]]
    born, seen = _dicom_date(birth_date), _dicom_date(study_date)
    if born is None or seen is None or seen < born:
        return None
    return seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))


def sex_from_dicom(patient_sex: str) -> str | None:
    """ "M" or "F" from PatientSex; None for "O", empty or anything else."""
    s = patient_sex.strip().upper()
    return s if s in ("M", "F") else None


def demographics(headers: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """Age and sex from a volume's DICOM headers (``Volume.headers``)."""
    text = {k: str(headers.get(k) or "") for k in ("PatientAge", "PatientBirthDate", "StudyDate")}
    age = age_from_dicom(text["PatientAge"], text["PatientBirthDate"], text["StudyDate"])
    return age, sex_from_dicom(str(headers.get("PatientSex") or ""))


# ---------------------------------------------------------------------------
# the clinical context handed to fusion and report generation


@dataclass(frozen=True)
class ClinicalContext:
    """Clinical inputs for one study: normalised lab values, history, demographics.

    ``values`` hold panel tests (``name`` = panel name, ``code`` = primary LOINC,
    value in the canonical unit) plus non-lab items; ``missing`` names every
    panel test with no usable value, with the reason after a colon where one is
    known (``"AFP: no result within 30 days"``, ``"ALT: implausible value"``).
    """

    values: tuple[ClinicalValue, ...] = ()
    history: str = ""
    age: int | None = None
    sex: str | None = None
    missing: tuple[str, ...] = ()

    def lab_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for v in self.values:
            if v.name in _BY_NAME and isinstance(v.value, (int, float)):
                out[v.name] = float(v.value)
        return out

    def value(self, name: str) -> ClinicalValue | None:
        return next((v for v in self.values if v.name == name), None)

    def missing_names(self) -> tuple[str, ...]:
        return tuple(m.split(":", 1)[0] for m in self.missing)


def context_from_labs(
    labs: dict[str, float],
    *,
    history: str = "",
    age: int | None = None,
    sex: str | None = None,
    source: str = "synthetic",
) -> ClinicalContext:
    """A context from panel-name -> canonical value (e.g. synthetic labs)."""
    values = tuple(
        ClinicalValue(t.name, t.loinc, float(labs[t.name]), t.unit, None, source)
        for t in LAB_PANEL
        if t.name in labs
    )
    missing = tuple(f"{t.name}: not available" for t in LAB_PANEL if t.name not in labs)
    return ClinicalContext(values, history, age, sex, missing)
