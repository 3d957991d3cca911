"""Tissue appearance by modality and contrast phase.

CT values are Hounsfield units typical of a 120 kVp multiphase liver protocol
(late arterial ~35 s, portal venous ~70 s, delayed ~3-5 min). MR values are
arbitrary signal units of a fat-suppressed T1-weighted 3D gradient echo before
and after a gadolinium agent (same phase names). They are textbook-typical
figures chosen for plausibility, not measured on any scanner.
"""

from __future__ import annotations

from models.vocab import ContrastPhase

_PHASE_INDEX = {
    ContrastPhase.NON_CONTRAST: 0,
    ContrastPhase.ARTERIAL: 1,
    ContrastPhase.PORTAL_VENOUS: 2,
    ContrastPhase.DELAYED: 3,
    ContrastPhase.UNKNOWN: 2,
}

# tissue: (non-contrast, arterial, portal venous, delayed)
CT_HU: dict[str, tuple[float, float, float, float]] = {
    "air": (-1000, -1000, -1000, -1000),
    "lung": (-850, -840, -840, -845),
    "fat": (-100, -98, -95, -96),
    "stranding": (-15, 5, 20, 15),
    "fluid": (8, 8, 9, 10),
    "bile": (8, 8, 8, 8),
    "muscle": (50, 60, 65, 62),
    "bone": (450, 450, 450, 450),
    "marrow": (220, 225, 230, 228),
    "disc": (80, 80, 85, 85),
    "csf": (10, 10, 10, 10),
    "liver": (58, 75, 110, 85),
    "spleen": (48, 120, 115, 85),
    "pancreas": (45, 120, 100, 75),
    "kidney_cortex": (32, 180, 170, 120),
    "kidney_medulla": (32, 80, 160, 130),
    "renal_sinus": (-60, -55, -50, -50),
    "artery": (42, 300, 160, 110),
    "portal": (42, 120, 170, 110),
    "vein_systemic": (42, 80, 140, 110),
    "myocardium": (45, 130, 110, 90),
    "bowel_wall": (40, 90, 95, 80),
    "bowel_content": (20, 20, 22, 22),
    "stool": (-60, -60, -60, -60),
    "gallbladder_wall": (40, 70, 80, 70),
    # lesions
    "hcc": (45, 125, 85, 65),
    "hcc_capsule": (50, 70, 120, 100),
    "metastasis": (40, 55, 70, 68),
    "metastasis_rim": (45, 95, 110, 90),
    "haemangioma_core": (40, 42, 95, 105),
    "haemangioma_nodule": (42, 280, 165, 112),
    "cyst": (7, 7, 8, 8),
    "pdac": (40, 65, 72, 70),
    "pancreatic_cyst": (12, 12, 13, 13),
    "gallstone": (400, 400, 400, 400),
}

MR_SI: dict[str, tuple[float, float, float, float]] = {
    "air": (3, 3, 3, 3),
    "lung": (15, 18, 18, 18),
    "fat": (60, 62, 65, 65),
    "stranding": (120, 200, 240, 230),
    "fluid": (70, 70, 72, 75),
    "bile": (80, 80, 80, 80),
    "muscle": (200, 260, 300, 280),
    "bone": (40, 40, 40, 40),
    "marrow": (300, 320, 340, 330),
    "disc": (150, 150, 170, 180),
    "csf": (60, 60, 60, 60),
    "liver": (300, 380, 520, 480),
    "spleen": (250, 450, 500, 450),
    "pancreas": (400, 600, 520, 450),
    "kidney_cortex": (220, 700, 650, 550),
    "kidney_medulla": (180, 300, 600, 560),
    "renal_sinus": (60, 60, 65, 65),
    "artery": (100, 1000, 650, 500),
    "portal": (100, 450, 750, 550),
    "vein_systemic": (100, 300, 650, 520),
    "myocardium": (250, 600, 500, 450),
    "bowel_wall": (200, 350, 400, 380),
    "bowel_content": (100, 100, 100, 100),
    "stool": (150, 150, 150, 150),
    "gallbladder_wall": (200, 300, 380, 350),
    "hcc": (250, 700, 380, 330),
    "hcc_capsule": (260, 350, 560, 560),
    "metastasis": (200, 280, 330, 350),
    "metastasis_rim": (210, 450, 500, 450),
    "haemangioma_core": (120, 130, 420, 520),
    "haemangioma_nodule": (120, 950, 720, 520),
    "cyst": (60, 60, 60, 60),
    "pdac": (250, 330, 400, 410),
    "pancreatic_cyst": (65, 65, 66, 66),
    "gallstone": (25, 25, 25, 25),
}

#: Steatosis (fat fraction f): CT liver HU drops by about 1.6 HU per % fat;
#: MR (fat-suppressed T1) signal drops proportionally.
STEATOSIS_HU_PER_PERCENT = 1.6


def tissue_value(modality: str, phase: ContrastPhase, tissue: str) -> float:
    table = CT_HU if modality == "CT" else MR_SI
    return float(table[tissue][_PHASE_INDEX[phase]])


def background_value(modality: str) -> float:
    return -1000.0 if modality == "CT" else 0.0
