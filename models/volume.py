"""The ``Volume`` contract: voxels plus exact geometry plus where they came from.

Index convention (the same as highdicom's ``Volume``): ``array[k, r, c]`` is the
pixel at row ``r`` and column ``c`` of slice ``k``; ``affine`` maps the
homogeneous index ``(k, r, c, 1)`` to patient coordinates in millimetres, LPS
(DICOM patient coordinate system). Slice ``k`` came from the instance
``sop_instance_uids[k]`` (frame ``frame_numbers[k]`` of it for multi-frame
sources, 1-based; ``None`` for single-frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


class VolumeError(ValueError):
    """A series cannot be turned into a geometry-exact volume; the message says why."""


@dataclass(frozen=True)
class Volume:
    array: npt.NDArray[Any]
    affine: npt.NDArray[np.float64]
    sop_instance_uids: tuple[str, ...]
    modality: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str = ""
    frame_numbers: tuple[int | None, ...] = ()
    headers: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise VolumeError(
                f"array must be 3-D (slices, rows, columns), got shape {self.array.shape}"
            )
        if self.affine.shape != (4, 4):
            raise VolumeError(f"affine must be 4x4, got {self.affine.shape}")
        if len(self.sop_instance_uids) != self.array.shape[0]:
            raise VolumeError(
                f"{len(self.sop_instance_uids)} SOP Instance UIDs for {self.array.shape[0]} slices"
            )
        if self.frame_numbers and len(self.frame_numbers) != self.array.shape[0]:
            raise VolumeError("frame_numbers must have one entry per slice")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-9:
            raise VolumeError("affine is singular")

    @property
    def shape(self) -> tuple[int, int, int]:
        k, r, c = self.array.shape
        return (int(k), int(r), int(c))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, column) index axes."""
        cols = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(cols[0]), float(cols[1]), float(cols[2]))

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def index_to_lps(self, index: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map (k, r, c) indices (shape (..., 3)) to LPS mm."""
        idx = np.asarray(index, dtype=np.float64)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, points: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map LPS mm points (shape (..., 3)) to fractional (k, r, c) indices."""
        pts = np.asarray(points, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]
