"""The organ label table of synthetic cases (and of the training dataset manifest).

One place: the generator writes these values into ``organ_labels``; training and
evaluation read ``ORGAN_LABELS`` to map label values to ``models.vocab.Organ``.
Lesions are not organ labels: they are a separate instance map whose values are
``LesionTruth.number``; voxels of a lesion keep the label of the organ it lies in.
Structures drawn for realism but not labelled (aorta, IVC, hepatic veins, SMV,
bowel, stomach, spine, muscle, fat, lungs, heart) are background (0).
"""

from __future__ import annotations

from models.vocab import Organ

BACKGROUND = 0
LIVER = 1
GALLBLADDER = 2
PANCREAS = 3
SPLEEN = 4
PORTAL_SPLENIC_VEIN = 5
KIDNEY_LEFT = 6
KIDNEY_RIGHT = 7
BILE_DUCT = 8

ORGAN_LABELS: dict[int, Organ] = {
    LIVER: Organ.LIVER,
    GALLBLADDER: Organ.GALLBLADDER,
    PANCREAS: Organ.PANCREAS,
    SPLEEN: Organ.SPLEEN,
    PORTAL_SPLENIC_VEIN: Organ.PORTAL_SPLENIC_VEIN,
    KIDNEY_LEFT: Organ.KIDNEY_LEFT,
    KIDNEY_RIGHT: Organ.KIDNEY_RIGHT,
    BILE_DUCT: Organ.BILE_DUCT,
}
LABEL_OF_ORGAN: dict[Organ, int] = {organ: value for value, organ in ORGAN_LABELS.items()}
