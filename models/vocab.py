"""The node's vocabulary: organs, sub-sites, lesion kinds and target diseases.

Plain string enums, so that ``models`` needs no DICOM library. ``dicom_sr.codes``
maps each member to its SNOMED CT (or other) coded concept.
"""

from __future__ import annotations

from enum import StrEnum


class Organ(StrEnum):
    """Structures the segmentation model delineates."""

    LIVER = "liver"
    GALLBLADDER = "gallbladder"
    PANCREAS = "pancreas"
    SPLEEN = "spleen"
    PORTAL_SPLENIC_VEIN = "portal_vein_and_splenic_vein"
    BILE_DUCT = "bile_duct"
    KIDNEY_LEFT = "kidney_left"
    KIDNEY_RIGHT = "kidney_right"


class SubSite(StrEnum):
    """Couinaud liver segments and pancreatic parts (finding-site modifiers)."""

    COUINAUD_I = "couinaud_I"
    COUINAUD_II = "couinaud_II"
    COUINAUD_III = "couinaud_III"
    COUINAUD_IVA = "couinaud_IVa"
    COUINAUD_IVB = "couinaud_IVb"
    COUINAUD_V = "couinaud_V"
    COUINAUD_VI = "couinaud_VI"
    COUINAUD_VII = "couinaud_VII"
    COUINAUD_VIII = "couinaud_VIII"
    PANCREAS_HEAD = "pancreas_head"
    PANCREAS_BODY = "pancreas_body"
    PANCREAS_TAIL = "pancreas_tail"


class LesionKind(StrEnum):
    """Morphological finding type of a lesion (TID 1500 Finding)."""

    MASS = "mass"
    CYST = "cyst"
    CALCULUS = "calculus"
    NODULE = "nodule"


class Disease(StrEnum):
    """Target diseases the fusion classifier reports a probability for."""

    HCC = "hepatocellular_carcinoma"
    LIVER_METASTASIS = "liver_metastasis"
    HAEMANGIOMA = "haemangioma"
    SIMPLE_CYST = "simple_cyst"
    CIRRHOSIS = "cirrhosis"
    STEATOSIS = "steatosis"
    CHOLELITHIASIS = "cholelithiasis"
    PDAC = "pancreatic_ductal_adenocarcinoma"
    PANCREATIC_CYSTIC_LESION = "pancreatic_cystic_lesion"
    PANCREATITIS = "pancreatitis"


class ContrastPhase(StrEnum):
    NON_CONTRAST = "non_contrast"
    ARTERIAL = "arterial"
    PORTAL_VENOUS = "portal_venous"
    DELAYED = "delayed"
    UNKNOWN = "unknown"
