"""Options shared by every object builder (one frozen object, validated at construction)."""

from __future__ import annotations

from dataclasses import dataclass

from dicom_sr.errors import BuildError


@dataclass(frozen=True)
class OutputOptions:
    """How the node writes its DICOM outputs.

    ``not_for_clinical_use`` adds ``marking`` to SeriesDescription, the SEG's
    ContentDescription, the SR's findings text and the PDF header.
    """

    pipeline_version: str
    labelmap: bool = False
    not_for_clinical_use: bool = True
    marking: str = "NOT FOR CLINICAL USE"
    secondary_capture: bool = True
    pdf: bool = True
    key_objects: bool = True
    manufacturer: str = "hpb-node"
    model_name: str = "hpb-node"
    device_serial_number: str = "hpb-node-1"
    institution_name: str | None = None
    series_number_base: int = 9100
    # Planar groups carry "Cornerstone3DTools@^0.1.0:Bidirectional" in front of
    # their tracking identifier so OHIF hydrates them as bidirectional tools.
    ohif_tracking_prefix: bool = True

    def __post_init__(self) -> None:
        if not self.pipeline_version.strip():
            raise BuildError("pipeline_version must not be empty")
        if self.not_for_clinical_use and not self.marking.strip():
            raise BuildError("marking must not be empty when not_for_clinical_use is set")
        if not 1 <= self.series_number_base <= 2**31 - 100:
            raise BuildError("series_number_base out of range")

    def describe(self, what: str) -> str:
        """A SeriesDescription (≤ 64 characters) carrying the marking when configured."""
        text = f"{what} [{self.marking}]" if self.not_for_clinical_use else what
        return text[:64]


SERIES_OFFSETS = {"seg": 1, "sr": 2, "pdf": 3, "ko": 4, "sc": 5}
