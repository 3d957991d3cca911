"""DICOM series (CT, MR; single-frame or Enhanced/Legacy-Converted multi-frame; any
transfer syntax pydicom can decode) → a geometry-exact :class:`models.volume.Volume`.

What it guarantees
------------------
* Slices (or frames) are sorted by their position along the slice normal
  (``ImagePositionPatient · (row × column direction)``), never by
  InstanceNumber. ``array[k]`` increases along the normal, so the volume is
  right-handed in (k, r, c) order whenever the series is.
* ``affine`` maps ``(k, r, c, 1)`` to LPS mm: column ``r`` is the column
  direction cosine times the row spacing (``PixelSpacing[0]``), column ``c``
  the row direction cosine times ``PixelSpacing[1]``, column ``k`` the mean
  step between consecutive slice positions.
* Stored values go through the modality transform (RescaleSlope/Intercept or
  a Modality LUT; for multi-frame the Pixel Value Transformation functional
  group): CT comes out in HU. Output is float32.
* The SOP Instance UID of every slice (and the 1-based frame number for
  multi-frame sources) is kept in slice order.

What it refuses (:class:`SeriesRefused`, with a :class:`RefusalReason`)
----------------------------------------------------------------------
Empty input, non-image objects, localizers, mixed series / frame of
reference / SOP class / orientation / matrix size / pixel spacing, missing
geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing),
duplicate slice positions (several phases or echoes in one series), colour
images, undecodable pixel data, uneven slice spacing (a missing slice) and
gantry tilt. The last two can be handled instead: ``uneven="resample"``
interpolates onto the median spacing; ``tilt="shear"`` keeps the exact sheared
geometry in the affine (its slice column is not perpendicular to the plane).

Implementation note: highdicom's ``get_volume_from_series`` does the same
sorting for single-frame series, but drops the slice-to-instance mapping and
raises generic ``ValueError`` messages; this module reimplements the few lines
of geometry so every refusal has a reason code an admin can act on and so that
single- and multi-frame sources share one path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from models.volume import Volume, VolumeError

log = logging.getLogger(__name__)

#: Slice-step differences up to this fraction of the median step count as even.
SPACING_RTOL = 0.02
#: ... or up to this many mm (IPP is written as text with limited precision).
SPACING_ATOL = 0.1
#: Stacking direction this many degrees off the normal counts as gantry tilt.
TILT_TOL_DEG = 0.5
#: Direction cosines this far apart count as a different orientation.
ORIENTATION_TOL = 1e-4

HEADER_KEYWORDS: tuple[str, ...] = (
    "PatientAge",
    "PatientSex",
    "PatientBirthDate",
    "PatientWeight",
    "PatientSize",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "AcquisitionDate",
    "AcquisitionTime",
    "Modality",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "SeriesNumber",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "ImageType",
    "SliceThickness",
    "KVP",
    "ConvolutionKernel",
    "MagneticFieldStrength",
    "EchoTime",
    "RepetitionTime",
    "ScanningSequence",
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "ContrastBolusVolume",
    "ContrastBolusStartTime",
    "ContrastBolusIngredient",
)


class RefusalReason(StrEnum):
    EMPTY = "empty"
    NOT_IMAGE = "not_image"
    LOCALIZER = "localizer"
    MIXED_SERIES = "mixed_series"
    MIXED_FRAME_OF_REFERENCE = "mixed_frame_of_reference"
    MIXED_SOP_CLASS = "mixed_sop_class"
    MIXED_ORIENTATION = "mixed_orientation"
    MIXED_SIZE = "mixed_size"
    MIXED_SPACING = "mixed_pixel_spacing"
    MISSING_GEOMETRY = "missing_geometry"
    DUPLICATE_POSITION = "duplicate_position"
    UNEVEN_SPACING = "uneven_spacing"
    GANTRY_TILT = "gantry_tilt"
    UNSUPPORTED_PIXELS = "unsupported_pixels"
    UNREADABLE = "unreadable"


class SeriesRefused(VolumeError):
    """The series cannot become a geometry-exact volume; ``reason`` says which rule failed."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(f"{message} [{reason.value}]")
        self.reason = reason


@dataclass
class _Slice:
    """One 2-D image: a single-frame instance or one frame of a multi-frame instance."""

    sop_uid: str
    frame: int | None  # 1-based for multi-frame
    position: npt.NDArray[np.float64]
    orientation: npt.NDArray[np.float64]  # row cosine (3), column cosine (3)
    spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    columns: int
    slope: float
    intercept: float
    pixels: Callable[[], npt.NDArray[Any]]  # stored values of this slice
    thickness: float | None
    modality_lut: Dataset | None = None


# ---------------------------------------------------------------------------
# reading


def _read(source: Path | str | Sequence[Path | str] | Sequence[Dataset]) -> list[Dataset]:
    if isinstance(source, (str, Path)):
        root = Path(source)
        if root.is_dir():
            files: list[Path] = sorted(p for p in root.rglob("*") if p.is_file())
        elif root.is_file():
            files = [root]
        else:
            raise SeriesRefused(RefusalReason.EMPTY, f"{root} does not exist")
        items: Iterable[Path | str | Dataset] = files
    else:
        items = source
    out: list[Dataset] = []
    for item in items:
        if isinstance(item, Dataset):
            out.append(item)
            continue
        path = Path(item)
        if path.name.upper() == "DICOMDIR":
            continue
        try:
            out.append(pydicom.dcmread(path))
        except InvalidDicomError:
            log.debug("skipping non-DICOM file %s", path.name)
        except (OSError, ValueError) as exc:
            raise SeriesRefused(
                RefusalReason.UNREADABLE, f"cannot read {path.name}: {exc}"
            ) from exc
    if not out:
        raise SeriesRefused(RefusalReason.EMPTY, "no DICOM instances found")
    return out


def _dedupe(datasets: list[Dataset]) -> list[Dataset]:
    """Drop repeated copies of one instance (same SOP Instance UID), keeping the first."""
    seen: set[str] = set()
    out = []
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid and uid in seen:
            log.info("ignoring a second copy of instance %s", uid)
            continue
        seen.add(uid)
        out.append(ds)
    return out


def _floats(value: Any, n: int, what: str, sop: str) -> npt.NDArray[np.float64]:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesRefused(
            RefusalReason.MISSING_GEOMETRY, f"instance {sop}: {what} is not numeric"
        ) from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise SeriesRefused(
            RefusalReason.MISSING_GEOMETRY, f"instance {sop}: {what} must have {n} numbers"
        )
    return arr


def _is_localizer(image_type: Any) -> bool:
    values = [str(v).upper() for v in (image_type or [])]
    return "LOCALIZER" in values or "SCOUT" in values


def _stored_frames(ds: Dataset) -> npt.NDArray[Any]:
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for decoder problems
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise SeriesRefused(
            RefusalReason.UNREADABLE,
            f"instance {ds.get('SOPInstanceUID', '?')}: pixel data cannot be decoded "
            f"(transfer syntax {name}): {exc}",
        ) from exc
    return np.asarray(arr)


def _single_frame_slices(ds: Dataset) -> list[_Slice]:
    sop = str(ds.get("SOPInstanceUID", "?"))
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if kw not in ds or ds[kw].value in (None, "", []):
            raise SeriesRefused(RefusalReason.MISSING_GEOMETRY, f"instance {sop} has no {kw}")
    ps = _floats(ds.PixelSpacing, 2, "PixelSpacing", sop)
    cache: dict[str, npt.NDArray[Any]] = {}

    def pixels() -> npt.NDArray[Any]:
        if "a" not in cache:
            cache["a"] = _stored_frames(ds)
        return cache["a"]

    lut = None
    if "ModalityLUTSequence" in ds and ds.ModalityLUTSequence:
        lut = ds
    thickness = ds.get("SliceThickness")
    return [
        _Slice(
            sop_uid=sop,
            frame=None,
            position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", sop),
            orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", sop),
            spacing=(float(ps[0]), float(ps[1])),
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
            intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
            pixels=pixels,
            thickness=float(thickness) if thickness not in (None, "") else None,
            modality_lut=lut,
        )
    ]


def _group(ds: Dataset, i: int, seq: str) -> Dataset | None:
    """Functional group ``seq`` of frame ``i`` (per-frame first, then shared)."""
    for holder_kw, index in (
        ("PerFrameFunctionalGroupsSequence", i),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        holder = ds.get(holder_kw)
        if holder and len(holder) > index and seq in holder[index]:
            items = holder[index][seq].value
            if items:
                return items[0]
    return None


def _frame_getter(
    frames: Callable[[], npt.NDArray[Any]], index: int
) -> Callable[[], npt.NDArray[Any]]:
    def get() -> npt.NDArray[Any]:
        return frames()[index]

    return get


def _multi_frame_slices(ds: Dataset) -> list[_Slice]:
    sop = str(ds.get("SOPInstanceUID", "?"))
    n = int(ds.NumberOfFrames)
    cache: dict[str, npt.NDArray[Any]] = {}

    def frames() -> npt.NDArray[Any]:
        if "a" not in cache:
            arr = _stored_frames(ds)
            cache["a"] = arr[None] if arr.ndim == 2 else arr
        return cache["a"]

    out = []
    for i in range(n):
        pos_item = _group(ds, i, "PlanePositionSequence")
        ori_item = _group(ds, i, "PlaneOrientationSequence")
        pix_item = _group(ds, i, "PixelMeasuresSequence")
        if pos_item is None or "ImagePositionPatient" not in pos_item:
            raise SeriesRefused(
                RefusalReason.MISSING_GEOMETRY, f"instance {sop} frame {i + 1} has no position"
            )
        if ori_item is None or pix_item is None or "PixelSpacing" not in pix_item:
            raise SeriesRefused(
                RefusalReason.MISSING_GEOMETRY,
                f"instance {sop} frame {i + 1} lacks orientation or pixel spacing",
            )
        frame_type = _group(ds, i, "CTImageFrameTypeSequence") or _group(
            ds, i, "MRImageFrameTypeSequence"
        )
        if frame_type is not None and _is_localizer(frame_type.get("FrameType")):
            raise SeriesRefused(
                RefusalReason.LOCALIZER, f"instance {sop} frame {i + 1} is a localizer"
            )
        pvt = _group(ds, i, "PixelValueTransformationSequence")
        slope = (
            float(pvt.get("RescaleSlope", 1.0))
            if pvt is not None
            else float(ds.get("RescaleSlope", 1.0) or 1.0)
        )
        intercept = (
            float(pvt.get("RescaleIntercept", 0.0))
            if pvt is not None
            else float(ds.get("RescaleIntercept", 0.0) or 0.0)
        )
        ps = _floats(pix_item.PixelSpacing, 2, "PixelSpacing", sop)
        thickness = pix_item.get("SliceThickness")
        out.append(
            _Slice(
                sop_uid=sop,
                frame=i + 1,
                position=_floats(pos_item.ImagePositionPatient, 3, "ImagePositionPatient", sop),
                orientation=_floats(
                    ori_item.ImageOrientationPatient, 6, "ImageOrientationPatient", sop
                ),
                spacing=(float(ps[0]), float(ps[1])),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                slope=slope,
                intercept=intercept,
                pixels=_frame_getter(frames, i),
                thickness=float(thickness) if thickness not in (None, "") else None,
            )
        )
    return out


# ---------------------------------------------------------------------------
# checks


def _check_uniform(datasets: list[Dataset]) -> None:
    first = datasets[0]
    for ds in datasets:
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            raise SeriesRefused(
                RefusalReason.NOT_IMAGE,
                f"instance {ds.get('SOPInstanceUID', '?')} (SOP class "
                f"{getattr(ds.get('SOPClassUID'), 'name', ds.get('SOPClassUID'))}) has no pixel data",
            )
        if _is_localizer(ds.get("ImageType")):
            raise SeriesRefused(
                RefusalReason.LOCALIZER,
                f"instance {ds.get('SOPInstanceUID', '?')} is a localizer (ImageType "
                f"{list(ds.get('ImageType', []))}); send the axial series instead",
            )
        for kw, reason in (
            ("SeriesInstanceUID", RefusalReason.MIXED_SERIES),
            ("FrameOfReferenceUID", RefusalReason.MIXED_FRAME_OF_REFERENCE),
            ("SOPClassUID", RefusalReason.MIXED_SOP_CLASS),
        ):
            if ds.get(kw) != first.get(kw):
                raise SeriesRefused(
                    reason, f"instances differ in {kw} ({first.get(kw)} vs {ds.get(kw)})"
                )
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise SeriesRefused(
                RefusalReason.UNSUPPORTED_PIXELS,
                f"instance {ds.get('SOPInstanceUID', '?')} is a colour image "
                f"(SamplesPerPixel {ds.SamplesPerPixel}); only greyscale CT/MR is supported",
            )
    if not first.get("FrameOfReferenceUID"):
        raise SeriesRefused(RefusalReason.MISSING_GEOMETRY, "the series has no FrameOfReferenceUID")


def _check_slices(slices: list[_Slice]) -> None:
    first = slices[0]
    for s in slices[1:]:
        if np.max(np.abs(s.orientation - first.orientation)) > ORIENTATION_TOL:
            raise SeriesRefused(
                RefusalReason.MIXED_ORIENTATION,
                f"slice {s.sop_uid} has orientation {np.round(s.orientation, 4).tolist()}, "
                f"others {np.round(first.orientation, 4).tolist()}",
            )
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise SeriesRefused(
                RefusalReason.MIXED_SIZE,
                f"slice {s.sop_uid} is {s.rows}x{s.columns}, others {first.rows}x{first.columns}",
            )
        if not np.allclose(s.spacing, first.spacing, rtol=1e-4, atol=1e-4):
            raise SeriesRefused(
                RefusalReason.MIXED_SPACING,
                f"slice {s.sop_uid} has pixel spacing {s.spacing}, others {first.spacing}",
            )
    row = first.orientation[:3]
    col = first.orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(row @ col) > 1e-3
    ):
        raise SeriesRefused(
            RefusalReason.MISSING_GEOMETRY,
            f"ImageOrientationPatient {first.orientation.tolist()} is not two orthonormal vectors",
        )


# ---------------------------------------------------------------------------
# assembly


#: Header keywords an Enhanced multi-frame object keeps in frame 1's functional groups:
#: keyword -> (functional group sequence, attribute there).
_FUNCTIONAL_GROUP_HEADERS: dict[str, tuple[str, str]] = {
    "SliceThickness": ("PixelMeasuresSequence", "SliceThickness"),
    "KVP": ("CTXRayDetailsSequence", "KVP"),
    "ConvolutionKernel": ("CTReconstructionSequence", "ConvolutionKernel"),
    "EchoTime": ("MREchoSequence", "EffectiveEchoTime"),
    "RepetitionTime": ("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
}


def _header_value(ds: Dataset, kw: str) -> Any:
    if kw in ds:
        return ds[kw].value
    if kw in _FUNCTIONAL_GROUP_HEADERS:
        seq, attribute = _FUNCTIONAL_GROUP_HEADERS[kw]
        item = _group(ds, 0, seq)
        return item.get(attribute) if item is not None else None
    when = str(ds.get("AcquisitionDateTime") or "")  # Enhanced objects: no separate date/time
    if kw == "AcquisitionDate" and len(when) >= 8:
        return when[:8]
    if kw == "AcquisitionTime" and len(when) > 8:
        return when[8:].split("+")[0].split("-")[0]
    return None


def _headers(ds: Dataset, notes: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kw in HEADER_KEYWORDS:
        value = _header_value(ds, kw)
        if value in (None, ""):
            continue
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            out[kw] = [str(v) for v in value]
        elif isinstance(value, int):
            out[kw] = int(value)
        elif isinstance(value, float):
            out[kw] = float(value)
        else:
            out[kw] = str(value)
    out["ContrastApplied"] = (
        bool(out.get("ContrastBolusAgent")) or "ContrastBolusAgentSequence" in ds
    )
    out["loader"] = notes
    return out


def _values(s: _Slice) -> npt.NDArray[np.float32]:
    stored = s.pixels()
    if s.modality_lut is not None:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(stored, s.modality_lut), dtype=np.float32)
    out = stored.astype(np.float32)
    if s.slope != 1.0:
        out *= np.float32(s.slope)
    if s.intercept != 0.0:
        out += np.float32(s.intercept)
    return out


def load_series(
    source: Path | str | Sequence[Path | str] | Sequence[Dataset],
    *,
    uneven: str = "refuse",
    tilt: str = "refuse",
) -> Volume:
    """Load one DICOM series (a folder, file paths, or datasets) as a :class:`Volume`.

    ``uneven``: ``"refuse"`` (default) or ``"resample"`` onto the median slice spacing.
    ``tilt``: ``"refuse"`` (default) or ``"shear"`` (exact sheared affine).
    Raises :class:`SeriesRefused` (a :class:`VolumeError`) with a reason code.
    """
    if uneven not in ("refuse", "resample"):
        raise ValueError("uneven must be 'refuse' or 'resample'")
    if tilt not in ("refuse", "shear"):
        raise ValueError("tilt must be 'refuse' or 'shear'")
    datasets = _dedupe(_read(source))
    _check_uniform(datasets)
    slices: list[_Slice] = []
    for ds in datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            slices.extend(_multi_frame_slices(ds))
        else:
            slices.extend(_single_frame_slices(ds))
    _check_slices(slices)

    first = slices[0]
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_cos, col_cos)
    along = np.array([s.position @ normal for s in slices])
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    along = along[order]
    notes: dict[str, Any] = {"slices": len(slices), "resampled": False, "tilt_deg": 0.0}

    if len(slices) > 1:
        steps = np.diff(along)
        if np.any(steps < SPACING_ATOL / 10):
            i = int(np.argmin(steps))
            raise SeriesRefused(
                RefusalReason.DUPLICATE_POSITION,
                f"slices {slices[i].sop_uid} and {slices[i + 1].sop_uid} share a position "
                f"({along[i]:.2f} mm along the normal): several phases, echoes or "
                "acquisitions in one series",
            )
        total = slices[-1].position - slices[0].position
        inplane = total - (total @ normal) * normal
        tilt_deg = float(np.degrees(np.arctan2(np.linalg.norm(inplane), abs(total @ normal))))
        notes["tilt_deg"] = round(tilt_deg, 3)
        if tilt_deg > TILT_TOL_DEG and tilt == "refuse":
            raise SeriesRefused(
                RefusalReason.GANTRY_TILT,
                f"slices are stacked {tilt_deg:.1f} degrees off the slice normal (gantry tilt)",
            )
        median = float(np.median(steps))
        uneven_found = bool(
            np.any(np.abs(steps - median) > max(SPACING_RTOL * median, SPACING_ATOL))
        )
        # positions must lie on one line (in-plane offsets proportional to depth)
        rel = np.array([s.position - slices[0].position for s in slices])
        depth = along - along[0]
        predicted = np.outer(depth / max(depth[-1], 1e-9), total)
        if np.max(np.linalg.norm(rel - predicted, axis=1)) > max(first.spacing) / 2 + SPACING_ATOL:
            raise SeriesRefused(
                RefusalReason.MIXED_ORIENTATION,
                "slice positions do not lie on one line (several stacks in one series)",
            )
        if uneven_found and uneven == "refuse":
            raise SeriesRefused(
                RefusalReason.UNEVEN_SPACING,
                f"slice spacing varies from {steps.min():.2f} to {steps.max():.2f} mm "
                f"(median {median:.2f}): missing or extra slices",
            )
        step_vec = total / (len(slices) - 1)
    else:
        thickness = first.thickness or 1.0
        step_vec = normal * thickness
        uneven_found = False

    rows_vec = col_cos * first.spacing[0]
    cols_vec = row_cos * first.spacing[1]
    array = np.stack([_values(s) for s in slices]).astype(np.float32, copy=False)
    uids = tuple(s.sop_uid for s in slices)
    frames = tuple(s.frame for s in slices)
    if uneven_found:
        array, step_vec, idx = _resample(array, along, slices[-1].position - slices[0].position)
        uids = tuple(uids[i] for i in idx)
        frames = tuple(frames[i] for i in idx)
        notes["resampled"] = True
    affine = np.eye(4)
    affine[:3, 0] = step_vec
    affine[:3, 1] = rows_vec
    affine[:3, 2] = cols_vec
    affine[:3, 3] = slices[0].position
    ds0 = datasets[0]
    modality = str(ds0.get("Modality", ""))
    return Volume(
        array=array,
        affine=affine,
        sop_instance_uids=uids,
        modality=modality,
        series_instance_uid=str(ds0.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds0.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(ds0.get("FrameOfReferenceUID", "")),
        sop_class_uid=str(ds0.get("SOPClassUID", "")),
        frame_numbers=frames if any(f is not None for f in frames) else (),
        headers=_headers(ds0, notes),
    )


def _resample(
    array: npt.NDArray[np.float32], along: npt.NDArray[np.float64], total: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], list[int]]:
    """Linear interpolation onto the median spacing; nearest source slice per new slice."""
    depth = along - along[0]
    step = float(np.median(np.diff(depth)))
    n = round(depth[-1] / step) + 1
    target = np.linspace(0.0, depth[-1], n)
    hi = np.clip(np.searchsorted(depth, target, side="right"), 1, len(depth) - 1)
    lo = hi - 1
    w = ((target - depth[lo]) / (depth[hi] - depth[lo])).astype(np.float32)
    out = array[lo] * (1 - w)[:, None, None] + array[hi] * w[:, None, None]
    nearest = [int(np.argmin(np.abs(depth - t))) for t in target]
    return out.astype(np.float32), total / (n - 1), nearest
