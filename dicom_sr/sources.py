"""Source datasets in Volume slice order, and slice geometry on the source grid."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_sr.errors import BuildError
from models.findings import Findings


@dataclass(frozen=True)
class SourceSlice:
    """Volume slice ``k``: its dataset and (for multi-frame sources) 1-based frame number."""

    dataset: Dataset
    frame_number: int | None


@dataclass(frozen=True)
class SourceSeries:
    datasets: tuple[Dataset, ...]  # distinct instances, in first-use order
    slices: tuple[SourceSlice, ...]  # one per Volume slice k

    @property
    def multiframe(self) -> bool:
        return any(s.frame_number is not None for s in self.slices)

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    def pixel_to_lps(self, k: int, rc: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map (row, column) pixel indices on slice k to LPS mm."""
        origin, row_dir, col_dir, spacing = plane_vectors(self.slices[k])
        p = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
        return (
            origin
            + p[:, 0:1] * (col_dir * spacing[0])[None, :]
            + p[:, 1:2] * (row_dir * spacing[1])[None, :]
        )


def order_sources(
    findings: Findings,
    source_datasets: Sequence[Dataset],
    frame_numbers: Sequence[int | None] | None = None,
) -> SourceSeries:
    """Map every Volume slice k to its source dataset (and frame) via provenance UIDs."""
    uids = findings.provenance.input_sop_uids
    if not uids:
        raise BuildError("findings.provenance.input_sop_uids is empty: cannot map slices")
    by_uid: dict[str, Dataset] = {}
    for ds in source_datasets:
        by_uid[str(ds.SOPInstanceUID)] = _sanitized(ds)
    missing = [u for u in dict.fromkeys(uids) if u not in by_uid]
    if missing:
        raise BuildError(
            f"{len(missing)} of {len(set(uids))} source instances named in the findings were "
            f"not supplied (first: {missing[0]})"
        )
    frames: list[int | None] = list(frame_numbers) if frame_numbers else [None] * len(uids)
    if len(frames) != len(uids):
        raise BuildError(f"{len(frames)} frame numbers for {len(uids)} slices")
    shapes = {f.mask.shape for f in findings.organs} | {les.mask.shape for les in findings.lesions}
    for shape in shapes:
        if shape[0] != len(uids):
            raise BuildError(f"masks have {shape[0]} slices but the series has {len(uids)}")
    slices: list[SourceSlice] = []
    for u, fn in zip(uids, frames, strict=True):
        ds = by_uid[u]
        nframes = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if fn is None and nframes > 1:
            raise BuildError(
                f"source instance {u} has {nframes} frames: frame_numbers are required"
            )
        if fn is not None and not 1 <= fn <= nframes:
            raise BuildError(f"frame number {fn} out of range for instance {u} ({nframes} frames)")
        slices.append(SourceSlice(ds, fn))
    seen: dict[tuple[str, int | None], int] = {}
    for k, key in enumerate(zip(uids, frames, strict=True)):
        if key in seen:
            raise BuildError(
                f"volume slices {seen[key]} and {k} both come from source instance {key[0]}"
                + (f" frame {key[1]}" if key[1] is not None else "")
                + ": the findings are on a resampled grid; DICOM objects need masks on the "
                "source slices"
            )
        seen[key] = k
    datasets = tuple(by_uid[u] for u in dict.fromkeys(uids))
    return SourceSeries(datasets, tuple(slices))


def _sanitized(ds: Dataset) -> Dataset:
    """A shallow copy without an empty SpecificCharacterSet (some scanners write one;
    it means the default repertoire, but highdicom refuses the empty value)."""
    if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
        ds = copy.copy(ds)
        del ds.SpecificCharacterSet
    return ds


def _frame_item(ds: Dataset, frame_number: int, attr: str) -> Dataset | None:
    per = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per is not None and len(per) >= frame_number:
        item = per[frame_number - 1]
        if attr in item:
            return item[attr].value[0]  # type: ignore[no-any-return]
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if shared is not None and len(shared) and attr in shared[0]:
        return shared[0][attr].value[0]  # type: ignore[no-any-return]
    return None


def plane_vectors(
    s: SourceSlice,
) -> tuple[
    npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], tuple[float, float]
]:
    ds = s.dataset
    if s.frame_number is None:
        ipp, iop, ps = ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    else:
        pos = _frame_item(ds, s.frame_number, "PlanePositionSequence")
        ori = _frame_item(ds, s.frame_number, "PlaneOrientationSequence")
        mea = _frame_item(ds, s.frame_number, "PixelMeasuresSequence")
        if pos is None or ori is None or mea is None:
            raise BuildError("multi-frame source lacks plane position/orientation/pixel measures")
        ipp, iop, ps = pos.ImagePositionPatient, ori.ImageOrientationPatient, mea.PixelSpacing
    origin = np.array([float(v) for v in ipp])
    row_dir = np.array([float(v) for v in iop[:3]])  # direction of increasing column
    col_dir = np.array([float(v) for v in iop[3:]])  # direction of increasing row
    return origin, row_dir, col_dir, (float(ps[0]), float(ps[1]))


STUDY_ATTRIBUTES = ("StudyDescription", "AccessionNumber", "StudyID", "ReferringPhysicianName")


def copy_study_attributes(target: Dataset, source: Dataset) -> None:
    """Copy study-level attributes some highdicom builders leave out, so every
    object of the study agrees with the source (dcentvfy checks this)."""
    for kw in STUDY_ATTRIBUTES:
        if kw in source and kw not in target:
            setattr(target, kw, source[kw].value)
