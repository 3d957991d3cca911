"""Write a (slice, row, column) array with an LPS affine as a real DICOM series.

Used by the synthetic case generator and by tests that need DICOM versions of
NIfTI data: CT Image Storage or MR Image Storage, one slice per file, with
ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness and
(for CT) RescaleSlope/Intercept derived from the affine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

UID_ROOT = "1.2.826.0.1.3680043.10.1451."  # hpb-node test/synthetic data root


def derived_uid(*parts: str) -> str:
    """A deterministic UID under the project's root from any strings."""
    digest = int(hashlib.sha256("|".join(parts).encode()).hexdigest()[:30], 16)
    return (UID_ROOT + str(digest))[:64]


@dataclass
class SeriesInfo:
    patient_id: str = "HPB-TEST-0001"
    patient_name: str = "Test^Synthetic"
    patient_birth_date: str = "19600101"
    patient_sex: str = "O"
    study_uid: str = ""
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    study_date: str = "20260101"
    study_time: str = "120000"
    accession_number: str = "ACC0001"
    study_description: str = "CT ABDOMEN"
    series_description: str = "PORTAL VENOUS 3mm"
    series_number: int = 1
    body_part: str = "ABDOMEN"
    manufacturer: str = "hpb-node synthetic"
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL")
    extra: dict[str, Any] = field(default_factory=dict)

    def fill_uids(self, seed: str) -> None:
        self.study_uid = self.study_uid or derived_uid(seed, "study")
        self.series_uid = self.series_uid or derived_uid(seed, "series", str(self.series_number))
        self.frame_of_reference_uid = self.frame_of_reference_uid or derived_uid(seed, "for")


def _geometry(affine: npt.NDArray[np.float64]) -> tuple[list[float], list[float], float]:
    slice_step = affine[:3, 0]
    col_step = affine[:3, 1]  # moving down one row
    row_step = affine[:3, 2]  # moving right one column
    row_cos = row_step / np.linalg.norm(row_step)
    col_cos = col_step / np.linalg.norm(col_step)
    normal = np.cross(row_cos, col_cos)
    thickness = float(abs(np.dot(slice_step, normal)))
    iop = [float(v) for v in (*row_cos, *col_cos)]
    spacing = [float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))]
    return iop, spacing, thickness


def write_series(
    array: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    out_dir: Path | str,
    *,
    modality: str = "CT",
    info: SeriesInfo | None = None,
    slice_order: Sequence[int] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: str = "hpb-series",
) -> list[Path]:
    """Write ``array[k, r, c]`` (CT: Hounsfield units; MR: intensities) as one file per slice.

    ``slice_order`` permutes InstanceNumber (files still carry true positions), so
    readers that sort by InstanceNumber instead of position are caught by tests.
    Returns the written paths in slice order ``k``.
    """
    if array.ndim != 3:
        raise ValueError("array must be (slices, rows, columns)")
    info = info or SeriesInfo()
    info.fill_uids(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    iop, spacing, thickness = _geometry(np.asarray(affine, dtype=np.float64))
    n = array.shape[0]
    order = list(slice_order) if slice_order is not None else list(range(n))
    if sorted(order) != list(range(n)):
        raise ValueError("slice_order must be a permutation of range(n_slices)")
    instance_number = {k: i + 1 for i, k in enumerate(order)}

    if modality == "CT":
        sop_class = UID(CTImageStorage)
        slope, intercept = 1.0, -1024.0
        stored = np.clip(np.round((array - intercept) / slope), -32768, 32767).astype(np.int16)
    elif modality == "MR":
        sop_class = UID(MRImageStorage)
        slope, intercept = 1.0, 0.0
        stored = np.clip(np.round(array), 0, 65535).astype(np.uint16)
    else:
        raise ValueError(f"unsupported modality {modality!r}")

    now = datetime(2026, 1, 1, 12, 0, 0)
    paths: list[Path] = []
    for k in range(n):
        sop_uid = UID(derived_uid(info.series_uid, "slice", str(k)))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = list(info.image_type)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = info.study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = info.study_time
        ds.AccessionNumber = info.accession_number
        ds.Modality = modality
        ds.Manufacturer = info.manufacturer
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = info.study_description
        ds.SeriesDescription = info.series_description
        ds.PatientName = info.patient_name
        ds.PatientID = info.patient_id
        ds.PatientBirthDate = info.patient_birth_date
        ds.PatientSex = info.patient_sex
        ds.BodyPartExamined = info.body_part
        ds.PatientPosition = "HFS"  # required (type 2C) for CT and MR; extra may override
        ds.StudyInstanceUID = info.study_uid
        ds.SeriesInstanceUID = info.series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = info.series_number
        ds.InstanceNumber = instance_number[k]
        ds.FrameOfReferenceUID = info.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        pos = affine[:3, 3] + k * affine[:3, 0]
        ds.ImagePositionPatient = [round(float(v), 6) for v in pos]
        ds.ImageOrientationPatient = [round(v, 8) for v in iop]
        ds.PixelSpacing = [round(v, 6) for v in spacing]
        ds.SliceThickness = round(thickness, 6)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        if modality == "CT":
            ds.RescaleIntercept = intercept
            ds.RescaleSlope = slope
            ds.RescaleType = "HU"
            ds.KVP = 120
            ds.WindowCenter = 40
            ds.WindowWidth = 400
        else:
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.EchoTime = 2.0
            ds.RepetitionTime = 5.0
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = 1.5
        ds.AcquisitionNumber = 1
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
        for key, value in info.extra.items():
            setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        if UID(transfer_syntax) != ExplicitVRLittleEndian:
            ds.compress(UID(transfer_syntax))
        path = out / f"{instance_number[k]:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
