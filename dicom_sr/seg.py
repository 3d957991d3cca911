"""DICOM Segmentation (SEG) from ``Findings``.

One segment per organ, then one per lesion, numbered in that order (empty masks
are left out). Each segment carries a coded SNOMED CT category and type, the
anatomic region (lesions: their organ), algorithm identification (name, version,
family "Artificial Intelligence"), tracking identifier and UID, and a
recommended display colour.

Overlap policy (see docs/dicom-outputs.md):

* BINARY (default): segments overlap deliberately. An organ segment is the whole
  organ *including* the lesions inside it, so organ volumes in the SEG equal the
  SR's; each lesion is its own segment on top. SegmentsOverlap is "YES" then.
* LABELMAP: one label per voxel, so overlap is impossible: lesions are painted
  over their organ (the organ label keeps only non-lesion voxels). Readers that
  need the whole organ take the union of the organ and its lesions.

Geometry comes from the source instances themselves: every SEG frame references
the source image (or source frame of an Enhanced CT/MR instance) it lies on, so
any slice order, gaps, oblique or RAS-flipped series and MR work alike. Frames
with no segmented pixels are left out (``omit_empty_frames``) without moving
the others, because each frame keeps its own source reference and position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_sr import codes
from dicom_sr.errors import BuildError
from dicom_sr.options import SERIES_OFFSETS, OutputOptions
from dicom_sr.sources import SourceSeries, copy_study_attributes, order_sources
from dicom_sr.uids import output_uid
from models.findings import Findings, LesionFinding, OrganFinding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentSpec:
    """One planned segment: its number, the finding it shows, and its coding."""

    number: int
    finding_id: str
    label: str
    category: CodedConcept
    type: CodedConcept
    modifier: CodedConcept | None
    anatomic_region: CodedConcept | None
    rgb: tuple[int, int, int]
    tracking_id: str
    tracking_uid: str
    mask: npt.NDArray[np.bool_]


def lesion_tracking_uid(findings: Findings, lesion: LesionFinding) -> str:
    """The lesion's tracking UID: its own when set, else derived from series and number."""
    if lesion.tracking_uid:
        return lesion.tracking_uid
    p = findings.provenance
    return output_uid(p.input_series_uid, p.pipeline_version, "tracking", str(lesion.number))


def organ_tracking_uid(findings: Findings, organ: OrganFinding) -> str:
    p = findings.provenance
    return output_uid(p.input_series_uid, p.pipeline_version, "tracking", organ.organ.value)


def lesion_label(lesion: LesionFinding) -> str:
    organ = codes.ORGANS[lesion.organ].label.lower()
    site = f" {codes.SUB_SITE_LABELS[lesion.sub_site]}" if lesion.sub_site else ""
    return f"Lesion {lesion.number} ({lesion.kind.value}, {organ}{site})"[:64]


def plan_segments(findings: Findings) -> list[SegmentSpec]:
    """Segments in SEG order: organs, then lesions; empty masks are left out."""
    specs: list[SegmentSpec] = []
    for organ in findings.organs:
        if not organ.mask.any():
            log.info("organ %s has an empty mask: no segment written", organ.organ.value)
            continue
        oc = codes.ORGANS[organ.organ]
        specs.append(
            SegmentSpec(
                number=len(specs) + 1,
                finding_id=organ.id,
                label=oc.label,
                category=oc.category,
                type=oc.type,
                modifier=oc.modifier,
                anatomic_region=None,
                rgb=oc.rgb,
                tracking_id=oc.label,
                tracking_uid=organ_tracking_uid(findings, organ),
                mask=organ.mask,
            )
        )
    for lesion in findings.lesions:
        if not lesion.mask.any():
            log.info("lesion %d has an empty mask: no segment written", lesion.number)
            continue
        specs.append(
            SegmentSpec(
                number=len(specs) + 1,
                finding_id=lesion.id,
                label=lesion_label(lesion),
                category=codes.MORPHOLOGICALLY_ALTERED_STRUCTURE,
                type=codes.LESION_TYPES[lesion.kind],
                modifier=None,
                anatomic_region=codes.ORGANS[lesion.organ].type,
                rgb=codes.LESION_RGB[lesion.kind],
                tracking_id=f"lesion {lesion.number}",
                tracking_uid=lesion_tracking_uid(findings, lesion),
                mask=lesion.mask,
            )
        )
    return specs


def algorithm_identification(findings: Findings) -> hd.AlgorithmIdentificationSequence:
    p = findings.provenance
    return hd.AlgorithmIdentificationSequence(
        name=p.model_name[:64],
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=p.model_version[:64],
        source="hpb-node",
        parameters={"pipeline_version": p.pipeline_version[:64]},
    )


def _descriptions(
    specs: Sequence[SegmentSpec], algorithm: hd.AlgorithmIdentificationSequence
) -> list[hd.seg.SegmentDescription]:
    out = []
    for s in specs:
        d = hd.seg.SegmentDescription(
            segment_number=s.number,
            segment_label=s.label,
            segmented_property_category=s.category,
            segmented_property_type=s.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=s.tracking_uid,
            tracking_id=s.tracking_id,
            anatomic_regions=[s.anatomic_region] if s.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*s.rgb),
        )
        if s.modifier is not None:
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                s.modifier
            ]
        out.append(d)
    return out


def _overlaps(specs: Sequence[SegmentSpec]) -> bool:
    if len(specs) < 2:
        return False
    count = np.zeros(specs[0].mask.shape, dtype=np.uint8)
    for s in specs:
        np.add(count, s.mask, out=count, casting="unsafe")
    return bool(count.max() > 1)


def _pixel_array(
    specs: Sequence[SegmentSpec], series: SourceSeries, stack: bool
) -> tuple[npt.NDArray[np.generic], list[Dataset]]:
    """The array highdicom encodes, and the source images its frames lie on.

    Single-frame sources: only slices with any segmented voxel are passed (each
    with its own source image, so nothing shifts). Multi-frame: the array follows
    the source instance's frame order.
    """
    nseg = len(specs)
    label_dtype: type = np.uint8 if nseg < 256 else np.uint16
    shape = specs[0].mask.shape
    if series.multiframe:
        if len(series.datasets) != 1:
            raise BuildError("multi-frame sources must be a single Enhanced instance")
        src = series.datasets[0]
        nframes = int(src.NumberOfFrames)
        index = [int(s.frame_number) - 1 for s in series.slices]  # type: ignore[arg-type]
        images = [src]
    else:
        any_voxel = np.zeros(shape[0], dtype=bool)
        for s in specs:
            any_voxel |= s.mask.any(axis=(1, 2))
        keep = np.flatnonzero(any_voxel)
        nframes = len(keep)
        index = [-1] * shape[0]
        for i, k in enumerate(keep):
            index[int(k)] = i
        images = [series.slices[int(k)].dataset for k in keep]

    def place(out: npt.NDArray[np.generic], mask: npt.NDArray[np.bool_], value: int) -> None:
        for k in range(shape[0]):
            if index[k] >= 0:
                plane = mask[k]
                if plane.any():
                    out[index[k]][plane] = value

    if not stack:
        labels: npt.NDArray[np.generic] = np.zeros((nframes, shape[1], shape[2]), dtype=label_dtype)
        for s in specs:  # organs first, lesions painted over them
            place(labels, s.mask, s.number)
        return labels, images
    dense = np.zeros((nframes, shape[1], shape[2], nseg), dtype=bool)
    for j, s in enumerate(specs):
        place(dense[..., j], s.mask, 1)
    return dense, images


def _restore_overlap(seg: Dataset, specs: Sequence[SegmentSpec], series: SourceSeries) -> bool:
    """Re-encode the frames of a SEG built from a painted label map with the full masks.

    The label map hides the organ voxels under each lesion; every frame keeps its
    segment and source reference, so re-packing each frame from the segment's own
    mask restores the overlap without a dense (frames x rows x cols x segments)
    array. Returns False (nothing changed) when some segment has a plane whose
    voxels are all covered by later segments: that frame is missing, and the
    caller falls back to the dense encoding.
    """
    by_number = {s.number: s for s in specs}
    where: dict[tuple[str, int | None], int] = {}
    for k, sl in enumerate(series.slices):
        where[(str(sl.dataset.SOPInstanceUID), sl.frame_number)] = k
    frames: list[tuple[int, int]] = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        fn = int(src.ReferencedFrameNumber) if "ReferencedFrameNumber" in src else None
        found = where.get((str(src.ReferencedSOPInstanceUID), fn if series.multiframe else None))
        if found is None:
            return False
        frames.append((found, number))
    present = set(frames)
    for s in specs:
        planes = np.flatnonzero(s.mask.any(axis=(1, 2)))
        if any((int(k), s.number) not in present for k in planes):
            return False
    rows, cols = int(seg.Rows), int(seg.Columns)
    if (rows * cols) % 8 == 0:
        packed = b"".join(
            np.packbits(by_number[n].mask[k], bitorder="little").tobytes() for k, n in frames
        )
    else:
        bits = np.concatenate([by_number[n].mask[k].ravel() for k, n in frames])
        packed = np.packbits(bits, bitorder="little").tobytes()
    if len(packed) % 2:
        packed += b"\x00"
    seg.PixelData = packed
    seg.SegmentsOverlap = "YES"
    return True


def build_seg(
    findings: Findings,
    source_datasets: Sequence[Dataset],
    *,
    pipeline_version: str | None = None,
    labelmap: bool = False,
    not_for_clinical_use: bool = True,
    frame_numbers: Sequence[int | None] | None = None,
    options: OutputOptions | None = None,
) -> Dataset:
    """Build the SEG (BINARY, or LABELMAP when ``labelmap``) for these findings.

    ``source_datasets`` are the source series' instances in any order; slice k of
    the masks lies on ``findings.provenance.input_sop_uids[k]`` (frame
    ``frame_numbers[k]`` of it for Enhanced multi-frame sources).
    """
    opts = options or OutputOptions(
        pipeline_version=pipeline_version or findings.provenance.pipeline_version,
        labelmap=labelmap,
        not_for_clinical_use=not_for_clinical_use,
    )
    series = order_sources(findings, source_datasets, frame_numbers)
    specs = plan_segments(findings)
    if not specs:
        raise BuildError("no organ or lesion has any segmented voxel: nothing to put in a SEG")
    src_series_uid = findings.provenance.input_series_uid
    seg_type = (
        hd.seg.SegmentationTypeValues.LABELMAP
        if opts.labelmap
        else hd.seg.SegmentationTypeValues.BINARY
    )
    descriptions = _descriptions(specs, algorithm_identification(findings))

    def encode(stack: bool) -> Dataset:
        array, images = _pixel_array(specs, series, stack)
        try:
            return hd.seg.Segmentation(
                source_images=images,
                pixel_array=array,
                segmentation_type=seg_type,
                segment_descriptions=descriptions,
                series_instance_uid=output_uid(src_series_uid, opts.pipeline_version, "seg"),
                series_number=opts.series_number_base + SERIES_OFFSETS["seg"],
                sop_instance_uid=output_uid(src_series_uid, opts.pipeline_version, "seg", "1"),
                instance_number=1,
                manufacturer=opts.manufacturer,
                manufacturer_model_name=opts.model_name,
                software_versions=opts.pipeline_version[:64],
                device_serial_number=opts.device_serial_number,
                content_description=opts.describe("AI organ and lesion segmentation"),
                content_label="HPB_AI_SEG",
                content_creator_name="hpb-node^AI",
                transfer_syntax_uid=ExplicitVRLittleEndian,
                omit_empty_frames=True,
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise BuildError(f"SEG could not be built: {exc}") from exc

    seg = encode(stack=False)
    if not opts.labelmap and _overlaps(specs) and not _restore_overlap(seg, specs, series):
        log.info("a segment plane is fully covered by others: dense SEG encoding used")
        seg = encode(stack=True)
    copy_study_attributes(seg, series.first)
    seg.SeriesDescription = opts.describe("AI SEG organs+lesions")
    if opts.institution_name:
        seg.InstitutionName = opts.institution_name
    return seg
