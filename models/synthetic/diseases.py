"""Disease mix, demographics and acquisition sampling for synthetic cases.

Co-occurrence follows the clinical picture rather than any registry:
cirrhosis raises the chance of hepatocellular carcinoma (HCC without cirrhosis
is rare); pancreatic adenocarcinoma sometimes comes with liver metastases;
gallstones raise the chance of pancreatitis; cirrhosis and metastases rarely
coexist with HCC being absent. About a quarter of cases are normal.
"""

from __future__ import annotations

import numpy as np

from models.vocab import ContrastPhase, Disease

NORMAL_SHARE = 0.25

_CT_PHASES = (
    (ContrastPhase.NON_CONTRAST, 0.15),
    (ContrastPhase.ARTERIAL, 0.25),
    (ContrastPhase.PORTAL_VENOUS, 0.48),
    (ContrastPhase.DELAYED, 0.12),
)


def sample_diseases(rng: np.random.Generator) -> tuple[Disease, ...]:
    """A realistic set of target diseases for one case (empty for a normal case)."""
    if rng.random() < NORMAL_SHARE:
        return ()
    out: set[Disease] = set()
    cirrhosis = rng.random() < 0.22
    if cirrhosis:
        out.add(Disease.CIRRHOSIS)
        if rng.random() < 0.5:
            out.add(Disease.HCC)
    elif rng.random() < 0.03:
        out.add(Disease.HCC)
    if rng.random() < (0.08 if cirrhosis else 0.22):
        out.add(Disease.STEATOSIS)
    pdac = rng.random() < 0.12
    if pdac:
        out.add(Disease.PDAC)
    if rng.random() < (0.35 if pdac else (0.04 if cirrhosis else 0.14)):
        out.add(Disease.LIVER_METASTASIS)
    if rng.random() < 0.15:
        out.add(Disease.HAEMANGIOMA)
    if rng.random() < 0.2:
        out.add(Disease.SIMPLE_CYST)
    gallstones = rng.random() < 0.2
    if gallstones:
        out.add(Disease.CHOLELITHIASIS)
    if not pdac and rng.random() < 0.1:
        out.add(Disease.PANCREATIC_CYSTIC_LESION)
    if not pdac and rng.random() < (0.12 if gallstones else 0.04):
        out.add(Disease.PANCREATITIS)
    if not out:  # an abnormal case must have something
        out.add(
            [Disease.SIMPLE_CYST, Disease.HAEMANGIOMA, Disease.STEATOSIS, Disease.CHOLELITHIASIS][
                int(rng.integers(0, 4))
            ]
        )
    return tuple(d for d in Disease if d in out)


def sample_demographics(rng: np.random.Generator, diseases: tuple[Disease, ...]) -> tuple[int, str]:
    """(age in years, sex "M"/"F"), shifted older and male for HCC and PDAC."""
    older = Disease.HCC in diseases or Disease.PDAC in diseases or Disease.CIRRHOSIS in diseases
    age = int(np.clip(rng.normal(66 if older else 55, 11), 20, 92))
    p_male = 0.7 if Disease.HCC in diseases else 0.5
    if Disease.HAEMANGIOMA in diseases or Disease.CHOLELITHIASIS in diseases:
        p_male -= 0.15
    return age, "M" if rng.random() < p_male else "F"


def sample_phase(rng: np.random.Generator) -> ContrastPhase:
    phases = [p for p, _ in _CT_PHASES]
    weights = np.array([w for _, w in _CT_PHASES])
    return phases[int(rng.choice(len(phases), p=weights / weights.sum()))]
