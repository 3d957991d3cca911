"""Coded concepts for every DICOM object the node writes, in one place.

Anatomy codes and display colours of organs follow the TotalSegmentator SNOMED CT
mapping (Apache-2.0) used for DICOM SEG; lesion, sub-site and disease codes are
SNOMED CT concepts (checked against pydicom's bundled DICOM code dictionary
where it lists them); laboratory tests are LOINC with UCUM units. A concept the
standard vocabularies do not provide uses the local scheme ``99HPB`` (declared
in the objects' CodingSchemeIdentificationSequence where needed).
"""

from __future__ import annotations

from dataclasses import dataclass

from highdicom.sr import CodedConcept

from models import labs
from models.vocab import Disease, LesionKind, Organ, SubSite

LOCAL_SCHEME = "99HPB"


def sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "SCT", meaning)


def dcm(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "DCM", meaning)


def ucum(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "UCUM", meaning)


def local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, LOCAL_SCHEME, meaning)


# --- segment categories ------------------------------------------------------
ANATOMICAL_STRUCTURE = sct("123037004", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED_STRUCTURE = sct("49755003", "Morphologically Altered Structure")


@dataclass(frozen=True)
class OrganCoding:
    """SEG segment coding of one organ (category, type, optional modifier, colour)."""

    label: str
    type: CodedConcept
    modifier: CodedConcept | None
    rgb: tuple[int, int, int]
    category: CodedConcept = ANATOMICAL_STRUCTURE


LEFT = sct("7771000", "Left")
RIGHT = sct("24028007", "Right")

# Colours follow the TotalSegmentator mapping except liver, pancreas and spleen:
# there they are three near-identical greens (40,140,40 / 60,150,80 / 50,170,60),
# which a viewer shows as one colour, so this project gives them distinct hues.
ORGANS: dict[Organ, OrganCoding] = {
    Organ.LIVER: OrganCoding("Liver", sct("10200004", "Liver"), None, (170, 120, 70)),
    Organ.GALLBLADDER: OrganCoding(
        "Gallbladder", sct("28231008", "Gallbladder"), None, (54, 216, 119)
    ),
    Organ.PANCREAS: OrganCoding("Pancreas", sct("15776009", "Pancreas"), None, (249, 180, 111)),
    Organ.SPLEEN: OrganCoding("Spleen", sct("78961009", "Spleen"), None, (157, 108, 162)),
    Organ.PORTAL_SPLENIC_VEIN: OrganCoding(
        "Portal and splenic vein",
        sct("110765007", "Portal vein and splenic vein"),
        None,
        (0, 90, 220),
    ),
    # Not in the TotalSegmentator mapping; colour chosen by this project.
    Organ.BILE_DUCT: OrganCoding(
        "Bile duct", sct("28273000", "Bile duct structure"), None, (200, 200, 40)
    ),
    Organ.KIDNEY_LEFT: OrganCoding("Kidney left", sct("64033007", "Kidney"), LEFT, (46, 138, 184)),
    Organ.KIDNEY_RIGHT: OrganCoding(
        "Kidney right", sct("64033007", "Kidney"), RIGHT, (34, 102, 136)
    ),
}

# --- lesions -----------------------------------------------------------------
LESION_TYPES: dict[LesionKind, CodedConcept] = {
    LesionKind.MASS: sct("4147007", "Mass"),
    LesionKind.CYST: sct("367643001", "Cyst"),
    LesionKind.NODULE: sct("27925004", "Nodule"),
    LesionKind.CALCULUS: sct("56381008", "Calculus"),
}

LESION_RGB: dict[LesionKind, tuple[int, int, int]] = {
    LesionKind.MASS: (255, 0, 200),
    LesionKind.NODULE: (255, 80, 0),
    LesionKind.CYST: (83, 175, 221),
    LesionKind.CALCULUS: (250, 250, 210),
}

# Couinaud IVa / IVb have no separate SNOMED CT concept in the DICOM code
# tables: both map to segment IV; the exact sub-segment is kept in the label.
SUB_SITES: dict[SubSite, CodedConcept] = {
    SubSite.COUINAUD_I: sct("71133005", "Couinaud hepatic segment I"),
    SubSite.COUINAUD_II: sct("277956007", "Couinaud hepatic segment II"),
    SubSite.COUINAUD_III: sct("277957003", "Couinaud hepatic segment III"),
    SubSite.COUINAUD_IVA: sct("277958008", "Couinaud hepatic segment IV"),
    SubSite.COUINAUD_IVB: sct("277958008", "Couinaud hepatic segment IV"),
    SubSite.COUINAUD_V: sct("277959000", "Couinaud hepatic segment V"),
    SubSite.COUINAUD_VI: sct("277960005", "Couinaud hepatic segment VI"),
    SubSite.COUINAUD_VII: sct("277961009", "Couinaud hepatic segment VII"),
    SubSite.COUINAUD_VIII: sct("277962002", "Couinaud hepatic segment VIII"),
    SubSite.PANCREAS_HEAD: sct("64163001", "Head of pancreas"),
    SubSite.PANCREAS_BODY: sct("40133006", "Body of pancreas"),
    SubSite.PANCREAS_TAIL: sct("73239005", "Tail of pancreas"),
}

SUB_SITE_LABELS: dict[SubSite, str] = {
    SubSite.COUINAUD_I: "segment I",
    SubSite.COUINAUD_II: "segment II",
    SubSite.COUINAUD_III: "segment III",
    SubSite.COUINAUD_IVA: "segment IVa",
    SubSite.COUINAUD_IVB: "segment IVb",
    SubSite.COUINAUD_V: "segment V",
    SubSite.COUINAUD_VI: "segment VI",
    SubSite.COUINAUD_VII: "segment VII",
    SubSite.COUINAUD_VIII: "segment VIII",
    SubSite.PANCREAS_HEAD: "head",
    SubSite.PANCREAS_BODY: "body",
    SubSite.PANCREAS_TAIL: "tail",
}

# --- diseases (qualitative evaluations in the SR) ----------------------------
DISEASES: dict[Disease, CodedConcept] = {
    Disease.HCC: sct("25370001", "Hepatocellular carcinoma"),
    Disease.LIVER_METASTASIS: sct("94381002", "Secondary malignant neoplasm of liver"),
    Disease.HAEMANGIOMA: sct("400210000", "Hemangioma"),
    Disease.SIMPLE_CYST: sct("85057007", "Cyst of liver"),
    Disease.CIRRHOSIS: sct("19943007", "Cirrhosis of liver"),
    Disease.STEATOSIS: sct("197321007", "Steatosis of liver"),
    Disease.CHOLELITHIASIS: sct("235919008", "Cholelithiasis"),
    Disease.PDAC: sct("700423003", "Adenocarcinoma of pancreas"),
    Disease.PANCREATIC_CYSTIC_LESION: sct("31258000", "Cyst of pancreas"),
    Disease.PANCREATITIS: sct("75694006", "Pancreatitis"),
}


# --- laboratory inputs (LOINC, UCUM; the panel lives in models.labs) ----------
def loinc(code: str, meaning: str) -> CodedConcept:
    return CodedConcept(code, "LN", meaning[:64])


def lab_concept(name: str, code: str = "") -> CodedConcept:
    """The LOINC concept of a clinical input by code or panel name; local code otherwise."""
    test = labs.by_code(code) if code else None
    if test is None:
        try:
            test = labs.by_name(name)
        except KeyError:
            test = None
    if test is not None:
        return loinc(code or test.loinc, test.display)
    if code:
        return loinc(code, name or code)
    key = "".join(ch for ch in name.upper() if ch.isalnum()) or "UNNAMED"
    return local(f"IN-{key}"[:16], name or key)


def lab_unit(name: str, code: str = "") -> str:
    """The canonical UCUM unit of a panel test ("" when unknown)."""
    test = labs.by_code(code) if code else None
    if test is None:
        try:
            test = labs.by_name(name)
        except KeyError:
            return ""
    return test.unit


def unit_concept(unit: str) -> CodedConcept:
    """A UCUM unit as a coded concept (the unit string is the UCUM code)."""
    return ucum(unit or "1", unit or "no units")


# --- measurement names, units, qualifiers ------------------------------------
VOLUME = sct("118565006", "Volume")
# Code meanings exactly as OHIF's Bidirectional adapter matches them.
LONG_AXIS = sct("103339001", "Long Axis")
SHORT_AXIS = sct("103340004", "Short Axis")
MEAN_ATTENUATION = dcm("112181", "Mean Attenuation Coefficient")
SD_ATTENUATION = dcm("112183", "Standard Deviation of Attenuation Coefficient")
MEAN = sct("373098007", "Mean")
STANDARD_DEVIATION = sct("386136009", "Standard Deviation")
MEAN_SIGNAL = local("MEAN-SIGNAL", "Mean signal intensity")
CENTER_OF_MASS = dcm("128138", "Center of Mass")
PROBABILITY = dcm("122157", "Probability")
FINDING = dcm("121071", "Finding")
IMPRESSION = dcm("121073", "Impression")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
CLINICAL_INPUTS = local("CLIN-INPUT", "Clinical inputs used by the algorithm")
CONTRAST_PHASE = local("CONTRAST-PHASE", "Contrast phase of the analysed series")
MISSING_INPUT = local("CLIN-MISSING", "Clinical input not available")
PRESENT = sct("52101004", "Present")
UNKNOWN = sct("261665006", "Unknown")
DIAGNOSTIC_PROBABILITY = local("DX-PROB", "Diagnosis probability estimate")
SUM_OF_VOXELS = dcm("126030", "Sum of segmented voxel method for volume")

CUBIC_MILLIMETER = ucum("mm3", "cubic millimeter")
MILLILITER = ucum("ml", "milliliter")
MILLIMETER = ucum("mm", "millimeter")
HOUNSFIELD = ucum("[hnsf'U]", "Hounsfield unit")
NO_UNITS = ucum("1", "no units")
PERCENT = ucum("%", "percent")

# Procedure reported in the SR.
CT_ABDOMEN = sct("169070004", "CT of abdomen")
MR_ABDOMEN = sct("241615005", "MRI of abdomen")
IMAGING_PROCEDURE = sct("363679005", "Imaging procedure")

# Key Object Selection title.
FOR_REFERRING_PROVIDER = dcm("113004", "For Referring Provider")
OF_INTEREST = dcm("113000", "Of Interest")

# SR document title and report section headings.
IMAGING_MEASUREMENT_REPORT = dcm("126000", "Imaging Measurement Report")
ARTIFICIAL_INTELLIGENCE = dcm("123110", "Artificial Intelligence")
DEVICE = dcm("121007", "Device")
DIAGNOSIS = sct("439401001", "Diagnosis")
