"""NIfTI files to and from the node's (slice, row, column) LPS convention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# (k, r, c) index -> nibabel (i, j, k) index: i = c, j = r, k = k
_KRC_TO_IJK = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def load_nifti_krc(path: Path | str) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """Read a NIfTI image as ``array[k, r, c]`` and an affine from (k, r, c, 1) to LPS mm."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)  # type: ignore[attr-defined]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {data.shape}")
    affine_ras = np.asarray(img.affine, dtype=np.float64)  # type: ignore[attr-defined]
    return np.ascontiguousarray(data.transpose(2, 1, 0)), _RAS_TO_LPS @ affine_ras @ _KRC_TO_IJK


def save_nifti_krc(
    array: npt.NDArray[Any], affine_lps: npt.NDArray[np.float64], path: Path | str
) -> None:
    """Write ``array[k, r, c]`` with its LPS affine as a NIfTI file (RAS affine inside)."""
    affine_ras = _RAS_TO_LPS @ affine_lps @ np.linalg.inv(_KRC_TO_IJK)
    nib.save(nib.Nifti1Image(np.asarray(array).transpose(2, 1, 0), affine_ras), str(path))
