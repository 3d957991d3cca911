"""Key images: Secondary Capture images with the overlay burned in, and a KOS.

For each lesion, its key slice (``LesionFinding.key_slice``: the slice of largest
diameter) is rendered with the lesion outline and both axes drawn on it, as an
RGB Secondary Capture image marked BurnedInAnnotation "YES" and ImageType
DERIVED\\SECONDARY, referencing its source image. The Key Object Selection
document ("Of Interest") lists the source key slices and those SC images.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from skimage import draw, measure

from dicom_sr import codes
from dicom_sr.errors import BuildError
from dicom_sr.options import SERIES_OFFSETS, OutputOptions
from dicom_sr.sources import (
    SourceSeries,
    SourceSlice,
    copy_study_attributes,
    order_sources,
    plane_vectors,
)
from dicom_sr.uids import output_uid
from models.findings import Findings, LesionFinding


def _frame_pixels(s: SourceSlice) -> npt.NDArray[np.float64]:
    ds = s.dataset
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable pixel data
        raise BuildError(f"source image {ds.SOPInstanceUID} pixel data unreadable: {exc}") from exc
    if s.frame_number is not None:
        arr = arr[s.frame_number - 1]
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return np.asarray(arr, dtype=np.float64) * slope + intercept


def _window(image: npt.NDArray[np.float64], ds: Dataset) -> npt.NDArray[np.uint8]:
    if str(getattr(ds, "Modality", "")) == "CT":
        lo, hi = -160.0, 240.0  # abdominal soft-tissue window (W 400, L 40)
    else:
        lo, hi = (float(v) for v in np.percentile(image, [1.0, 99.0]))
        hi = max(hi, lo + 1.0)
    scaled = (np.clip(image, lo, hi) - lo) / (hi - lo) * 255.0
    return np.round(scaled).astype(np.uint8)


def render_key_image(lesion: LesionFinding, series: SourceSeries) -> npt.NDArray[np.uint8]:
    """RGB rendering of the lesion's key slice with outline and axes burned in."""
    s = series.slices[lesion.key_slice]
    grey = _window(_frame_pixels(s), s.dataset)
    rgb = np.stack([grey] * 3, axis=-1)
    colour = np.array(codes.LESION_RGB[lesion.kind], dtype=np.uint8)
    plane = np.pad(lesion.mask[lesion.key_slice].astype(np.float32), 1)
    for contour in measure.find_contours(plane, 0.5):
        rr = np.clip(np.round(contour[:, 0] - 1).astype(int), 0, rgb.shape[0] - 1)
        cc = np.clip(np.round(contour[:, 1] - 1).astype(int), 0, rgb.shape[1] - 1)
        rgb[rr, cc] = colour
    for axis, col in ((lesion.long_axis, (255, 255, 0)), (lesion.short_axis, (0, 255, 255))):
        r0, c0 = round(axis.start[1]), round(axis.start[2])
        r1, c1 = round(axis.end[1]), round(axis.end[2])
        rr, cc = draw.line(r0, c0, r1, c1)
        ok = (rr >= 0) & (rr < rgb.shape[0]) & (cc >= 0) & (cc < rgb.shape[1])
        rgb[rr[ok], cc[ok]] = col
    return rgb


def _letters(vec: Sequence[float]) -> str:
    names = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(np.asarray(vec)))
    out = ""
    for i in order:
        if abs(vec[i]) > 1e-3:
            out += names[i][0] if vec[i] > 0 else names[i][1]
    return out or "L"


def _orientation(s: SourceSlice) -> tuple[str, str]:

    _, row_dir, col_dir, _ = plane_vectors(s)
    return _letters(list(row_dir)), _letters(list(col_dir))


def build_secondary_captures(
    findings: Findings,
    source_datasets: Sequence[Dataset],
    *,
    options: OutputOptions | None = None,
    frame_numbers: Sequence[int | None] | None = None,
) -> list[Dataset]:
    """One burned-in SC image per lesion (its key slice)."""
    opts = options or OutputOptions(pipeline_version=findings.provenance.pipeline_version)
    series = order_sources(findings, source_datasets, frame_numbers)
    p = findings.provenance
    out: list[Dataset] = []
    for i, lesion in enumerate(findings.lesions, start=1):
        if not lesion.mask.any():
            continue
        if not 0 <= lesion.key_slice < len(series.slices):
            raise BuildError(f"lesion {lesion.number}: key slice outside the series")
        s = series.slices[lesion.key_slice]
        ref = s.dataset
        try:
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=ref,
                pixel_array=render_key_image(lesion, series),
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=output_uid(p.input_series_uid, opts.pipeline_version, "sc"),
                series_number=opts.series_number_base + SERIES_OFFSETS["sc"],
                sop_instance_uid=output_uid(
                    p.input_series_uid, opts.pipeline_version, "sc", str(lesion.number)
                ),
                instance_number=i,
                manufacturer=opts.manufacturer,
                patient_orientation=_orientation(s),
                transfer_syntax_uid="1.2.840.10008.1.2.1",
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise BuildError(f"SC image for lesion {lesion.number} failed: {exc}") from exc
        copy_study_attributes(sc, ref)
        sc.BurnedInAnnotation = "YES"
        sc.Laterality = ""  # Type 2C in General Series; unpaired (abdominal) anatomy
        sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        sc.SeriesDescription = opts.describe("AI key images (annotated)")
        sc.ImageComments = (
            f"Lesion {lesion.number}: outline and axes burned in"
            + (f"; {opts.marking}" if opts.not_for_clinical_use else "")
        )[:10240]
        item = Dataset()
        item.ReferencedSOPClassUID = ref.SOPClassUID
        item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
        if s.frame_number is not None:
            item.ReferencedFrameNumber = s.frame_number
        sc.SourceImageSequence = DicomSequence([item])
        sc.DerivationDescription = "Key slice with AI lesion outline and axes burned in"
        out.append(sc)
    return out


def build_key_objects(
    findings: Findings,
    source_datasets: Sequence[Dataset],
    *,
    options: OutputOptions | None = None,
    secondary_captures: Sequence[Dataset] = (),
    frame_numbers: Sequence[int | None] | None = None,
) -> Dataset:
    """The Key Object Selection document: each lesion's key slice (and its SC image)."""
    opts = options or OutputOptions(pipeline_version=findings.provenance.pipeline_version)
    series = order_sources(findings, source_datasets, frame_numbers)
    p = findings.provenance
    keys: dict[str, Dataset] = {}
    for lesion in findings.lesions:
        if lesion.mask.any() and 0 <= lesion.key_slice < len(series.slices):
            ds = series.slices[lesion.key_slice].dataset
            keys[str(ds.SOPInstanceUID)] = ds
    referenced = [*keys.values(), *secondary_captures]
    if not referenced:
        raise BuildError("no lesion key slice to select: no Key Object Selection written")
    device = hd.sr.ObserverContext(
        observer_type=codes.DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=output_uid(p.input_series_uid, p.pipeline_version, "device"),
            name=f"{p.model_name} {p.model_version}"[:64],
        ),
    )
    description = "Key slices of AI-detected lesions"
    if opts.not_for_clinical_use:
        description += f" [{opts.marking}]"
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=codes.OF_INTEREST,
            referenced_objects=referenced,
            observer_device_context=device,
            description=description,
        )
        ko = hd.ko.KeyObjectSelectionDocument(
            evidence=referenced,
            content=content,
            series_instance_uid=output_uid(p.input_series_uid, opts.pipeline_version, "ko"),
            series_number=opts.series_number_base + SERIES_OFFSETS["ko"],
            sop_instance_uid=output_uid(p.input_series_uid, opts.pipeline_version, "ko", "1"),
            instance_number=1,
            manufacturer=opts.manufacturer,
            institution_name=opts.institution_name,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise BuildError(f"Key Object Selection could not be built: {exc}") from exc
    copy_study_attributes(ko, series.first)
    ko.SeriesDescription = opts.describe("AI key images")
    return ko
