"""Comprehensive 3D SR, TID 1500 Measurement Report, from ``Findings``.

Content (see docs/dicom-outputs.md for the tree and why it is ordered so):

* observer context naming the device (the model and the node);
* Imaging Measurements, lesions first, then organs:

  - per lesion, a planar group (TID 1410) on its key slice: outline as SCOORD
    POLYLINE, long and short axis as NUM items each inferred from a 2-point
    SCOORD POLYLINE on the source image (the shape OHIF hydrates as a
    bidirectional), then a volumetric group (TID 1411) with the same tracking
    UID: finding type, finding sites (organ and Couinaud segment / pancreatic
    part), volume, mean and SD attenuation, referenced segment, centroid as
    SCOORD3D POINT;
  - per organ, a volumetric group: volume, mean and SD of attenuation (CT) or
    signal (MR), referenced segment, and its centre of mass as a SCOORD POINT
    on the source image nearest to it;

* a "Qualitative Evaluations" container: one CODE "Diagnosis = disease" per
  diagnosis with its probability (NUM, HAS PROPERTIES) and the algorithm
  (HAS CONCEPT MOD), then the findings and impression text, and the contrast
  phase with how it was found (``models.phase``; local code CONTRAST-PHASE);
* a "Clinical inputs used by the algorithm" container: used numeric values as
  NUM (LOINC, UCUM), missing ones as CODE "= Unknown".

Every measurement group carries image coordinates, and the first
coordinate OHIF 3.12 meets under each tracking UID is a 2-D one on a source
image: groups without coordinates crash its SR viewport, and 3-D points are
drawn without an image to anchor them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from skimage import measure

from dicom_sr import codes
from dicom_sr.errors import BuildError
from dicom_sr.options import SERIES_OFFSETS, OutputOptions
from dicom_sr.seg import algorithm_identification, lesion_label, plan_segments
from dicom_sr.sources import SourceSeries, copy_study_attributes, order_sources
from dicom_sr.uids import output_uid
from models.findings import Axis, Findings, LesionFinding, OrganFinding

log = logging.getLogger(__name__)

OHIF_BIDIRECTIONAL_TAG = "Cornerstone3DTools@^0.1.0:Bidirectional"


def _is_ct(series: SourceSeries) -> bool:
    return str(getattr(series.first, "Modality", "")) == "CT"


def _intensity_measurements(
    mean: float | None, sd: float | None, ct: bool
) -> list[hd.sr.Measurement]:
    out: list[hd.sr.Measurement] = []
    if mean is None or not math.isfinite(mean):
        return out
    if sd is not None and not math.isfinite(sd):
        sd = None
    if ct:
        out.append(hd.sr.Measurement(codes.MEAN_ATTENUATION, mean, codes.HOUNSFIELD))
        if sd is not None:
            out.append(hd.sr.Measurement(codes.SD_ATTENUATION, sd, codes.HOUNSFIELD))
    else:
        out.append(
            hd.sr.Measurement(codes.MEAN_SIGNAL, mean, codes.NO_UNITS, derivation=codes.MEAN)
        )
        if sd is not None:
            out.append(
                hd.sr.Measurement(
                    codes.MEAN_SIGNAL, sd, codes.NO_UNITS, derivation=codes.STANDARD_DEVIATION
                )
            )
    return out


def _source_image(series: SourceSeries, k: int) -> hd.sr.SourceImageForRegion:
    s = series.slices[k]
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=str(s.dataset.SOPClassUID),
        referenced_sop_instance_uid=str(s.dataset.SOPInstanceUID),
        referenced_frame_numbers=[s.frame_number] if s.frame_number is not None else None,
    )


def _pixel_xy(points_krc: Sequence[tuple[float, float, float]]) -> npt.NDArray[np.float32]:
    """(k, r, c) voxel indices -> SCOORD (column, row) image coordinates (pixel centre +0.5)."""
    return np.array([[c + 0.5, r + 0.5] for _, r, c in points_krc], dtype=np.float32)


def _outline(lesion: LesionFinding) -> list[tuple[float, float, float]]:
    if len(lesion.outline) >= 3:
        pts = list(lesion.outline)
    else:
        plane = np.pad(lesion.mask[lesion.key_slice].astype(np.float32), 1)
        contours = measure.find_contours(plane, 0.5)
        if not contours:
            return []
        contour = max(contours, key=len)
        contour = measure.approximate_polygon(contour, tolerance=0.5)
        pts = [(float(lesion.key_slice), float(r - 1), float(c - 1)) for r, c in contour]
    if len(pts) < 3:
        return []
    if pts[0] != pts[-1]:
        pts.append(pts[0])
    return pts


def _axis_coordinates(
    axis: Axis, source: hd.sr.SourceImageForRegion
) -> hd.sr.CoordinatesForMeasurement:
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_pixel_xy([axis.start, axis.end]),
        source_image=source,
    )


def _attach_axis_coordinates(
    group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
    lesion: LesionFinding,
    source: hd.sr.SourceImageForRegion,
) -> None:
    """Add each axis' 2-point SCOORD POLYLINE under its NUM (INFERRED FROM).

    highdicom refuses coordinates on measurements of TID 1410 groups, but TID 300
    (which TID 1419 includes) allows them and OHIF's bidirectional tool needs them,
    so they are attached after the group is built.
    """
    wanted = {
        codes.LONG_AXIS.value: lesion.long_axis,
        codes.SHORT_AXIS.value: lesion.short_axis,
    }
    for item in group[0].ContentSequence:
        if item.ValueType != "NUM":
            continue
        code = item.ConceptNameCodeSequence[0].CodeValue
        if code in wanted:
            coords = _axis_coordinates(wanted.pop(code), source)
            if "ContentSequence" not in item:
                item.ContentSequence = []
            item.ContentSequence.append(coords)
    if wanted:
        raise BuildError(f"lesion {lesion.number}: axis measurement missing from planar group")


def _finding_sites(lesion: LesionFinding) -> list[hd.sr.FindingSite]:
    organ = codes.ORGANS[lesion.organ]
    sites = [hd.sr.FindingSite(organ.type, laterality=organ.modifier)]
    if lesion.sub_site is not None:
        sites.append(hd.sr.FindingSite(codes.SUB_SITES[lesion.sub_site]))
    return sites


def _planar_group(
    lesion: LesionFinding,
    series: SourceSeries,
    tracking_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
    opts: OutputOptions,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    k = lesion.key_slice
    if not 0 <= k < len(series.slices):
        raise BuildError(f"lesion {lesion.number}: key slice {k} outside the series")
    source = _source_image(series, k)
    outline = _outline(lesion)
    if outline:
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,  # closed: first == last
            graphic_data=_pixel_xy(outline),
            source_image=source,
        )
    else:  # no outline: the long axis itself is the region
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=_pixel_xy([lesion.long_axis.start, lesion.long_axis.end]),
            source_image=source,
        )
    label = f"lesion {lesion.number} key slice"
    identifier = f"{OHIF_BIDIRECTIONAL_TAG} {label}" if opts.ohif_tracking_prefix else label
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier),
        referenced_region=region,
        finding_type=codes.LESION_TYPES[lesion.kind],
        algorithm_id=algorithm,
        finding_sites=_finding_sites(lesion),
        measurements=[
            hd.sr.Measurement(codes.LONG_AXIS, float(lesion.long_axis.length_mm), codes.MILLIMETER),
            hd.sr.Measurement(
                codes.SHORT_AXIS, float(lesion.short_axis.length_mm), codes.MILLIMETER
            ),
        ],
    )
    _attach_axis_coordinates(group, lesion, source)
    return group


def _centroid_item(lesion: LesionFinding, frame_of_reference_uid: str) -> hd.sr.Scoord3DContentItem:
    return hd.sr.Scoord3DContentItem(
        name=codes.CENTER_OF_MASS,
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.array([lesion.centroid_lps], dtype=np.float64),
        frame_of_reference_uid=frame_of_reference_uid,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _frame_segment_numbers(seg: Dataset) -> list[int | None]:
    """The segment number of each SEG frame (None: a LABELMAP frame, all segments)."""
    shared = None
    sfg = seg.get("SharedFunctionalGroupsSequence")
    if sfg and "SegmentIdentificationSequence" in sfg[0]:
        shared = int(sfg[0].SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    numbers: list[int | None] = []
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        if "SegmentIdentificationSequence" in frame:
            numbers.append(int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber))
        else:
            numbers.append(shared)
    return numbers


def _referenced_segment(seg: Dataset, segment_number: int) -> hd.sr.ReferencedSegment:
    """TID 1411 "Referenced Segment" with the source images of the segment's frames.

    highdicom's ``ReferencedSegment.from_segmentation`` reads the segment of each
    frame from the per-frame functional groups only; highdicom itself moves
    Segment Identification to the shared groups when a SEG has one segment, and
    a LABELMAP SEG has none, so both are handled here.
    """
    per_frame = seg.get("PerFrameFunctionalGroupsSequence", [])
    numbers = _frame_segment_numbers(seg)
    sources: dict[str, hd.sr.SourceImageForSegmentation] = {}
    for frame, number in zip(per_frame, numbers, strict=True):
        if number is not None and number != segment_number:
            continue
        for derivation in frame.get("DerivationImageSequence", []):
            for src in derivation.get("SourceImageSequence", []):
                uid = str(src.ReferencedSOPInstanceUID)
                if uid in sources:
                    continue
                frames = None
                if "ReferencedFrameNumber" in src:
                    raw = src.ReferencedFrameNumber
                    frames = [
                        int(v) for v in (raw if src["ReferencedFrameNumber"].VM > 1 else [raw])
                    ]
                sources[uid] = hd.sr.SourceImageForSegmentation(
                    referenced_sop_class_uid=str(src.ReferencedSOPClassUID),
                    referenced_sop_instance_uid=uid,
                    referenced_frame_numbers=frames,
                )
    if not sources:
        raise BuildError(f"SEG segment {segment_number}: no frame references a source image")
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=segment_number,
        source_images=list(sources.values()),
    )


def _organ_center(
    organ: OrganFinding, series: SourceSeries
) -> tuple[hd.sr.ScoordContentItem, int] | None:
    """The organ's centre of mass as a SCOORD POINT on the nearest slice holding the organ.

    OHIF 3.12 needs an image coordinate in every measurement group (see the
    module docstring); a 2-D point on a source image is one it draws, as an
    arrow labelled with the group's measurements.
    """
    voxels = np.argwhere(organ.mask)
    if len(voxels) == 0:
        return None
    k_mean, r_mean, c_mean = voxels.mean(axis=0)
    slices = np.unique(voxels[:, 0])
    k = int(slices[np.argmin(np.abs(slices - k_mean))])
    if not 0 <= k < len(series.slices):
        return None
    item = hd.sr.ScoordContentItem(
        name=codes.CENTER_OF_MASS,
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=_pixel_xy([(float(k), float(r_mean), float(c_mean))]),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    item.ContentSequence = hd.sr.ContentSequence([_source_image(series, k)])
    return item, k


def _organ_group(
    organ: OrganFinding,
    series: SourceSeries,
    seg: Dataset,
    segment_number: int,
    tracking_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> tuple[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations, int] | None:
    """The organ's group and the slice its centre-of-mass point lies on."""
    center = _organ_center(organ, series)
    if center is None:
        log.info("organ %s has no voxel on the source slices: no SR group", organ.organ.value)
        return None
    oc = codes.ORGANS[organ.organ]
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=oc.label),
        referenced_segment=_referenced_segment(seg, segment_number),
        finding_type=oc.type,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(oc.type, laterality=oc.modifier)],
        measurements=[
            hd.sr.Measurement(codes.VOLUME, float(organ.volume_ml), codes.MILLILITER),
            *_intensity_measurements(organ.mean_intensity, organ.std_intensity, _is_ct(series)),
        ],
    )
    group[0].ContentSequence.append(center[0])
    return group, center[1]


def _lesion_volumetric_group(
    lesion: LesionFinding,
    series: SourceSeries,
    seg: Dataset,
    segment_number: int,
    tracking_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """Volume, attenuation, segment and centroid; the axes are in the planar group."""
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=lesion_label(lesion)
        ),
        referenced_segment=_referenced_segment(seg, segment_number),
        finding_type=codes.LESION_TYPES[lesion.kind],
        algorithm_id=algorithm,
        finding_sites=_finding_sites(lesion),
        measurements=[
            hd.sr.Measurement(codes.VOLUME, float(lesion.volume_ml), codes.MILLILITER),
            *_intensity_measurements(lesion.mean_intensity, lesion.std_intensity, _is_ct(series)),
        ],
    )
    group[0].ContentSequence.append(_centroid_item(lesion, str(series.first.FrameOfReferenceUID)))
    return group


def _diagnosis_items(
    findings: Findings, algorithm: hd.sr.AlgorithmIdentification
) -> list[hd.sr.CodeContentItem]:
    """One CODE "Diagnosis = disease" per diagnosis, for the Qualitative Evaluations container.

    Children: the probability (NUM, HAS PROPERTIES) and the algorithm that
    estimated it (TID 4019 items, HAS CONCEPT MOD).
    """
    items = []
    for dx in findings.diagnoses:
        item = hd.sr.CodeContentItem(
            name=codes.DIAGNOSIS,
            value=codes.DISEASES[dx.disease],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        item.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.NumContentItem(
                    name=codes.PROBABILITY,
                    value=float(dx.probability),
                    unit=codes.NO_UNITS,
                    relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
                ),
                *algorithm,
            ]
        )
        items.append(item)
    return items


def _clinical_container(findings: Findings) -> hd.sr.ContainerContentItem | None:
    """Clinical inputs: used numeric values as NUM (LOINC, UCUM), missing ones "= Unknown"."""
    p = findings.provenance
    items: list[hd.sr.ContentItem] = []
    for cv in p.clinical_used:
        if isinstance(cv.value, (int, float)) and not isinstance(cv.value, bool):
            unit = cv.unit or codes.lab_unit(cv.name, cv.code) or "1"
            items.append(
                hd.sr.NumContentItem(
                    name=codes.lab_concept(cv.name, cv.code),
                    value=float(cv.value),
                    unit=codes.unit_concept(unit),
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
    for name in p.clinical_missing:
        items.append(
            hd.sr.CodeContentItem(
                name=codes.lab_concept(name),
                value=codes.UNKNOWN,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    if not items:
        return None
    container = hd.sr.ContainerContentItem(
        name=codes.CLINICAL_INPUTS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _evaluations_container(
    findings: Findings, opts: OutputOptions, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    items: list[hd.sr.ContentItem] = [*_diagnosis_items(findings, algorithm)]
    prefix = f"[{opts.marking}] " if opts.not_for_clinical_use else ""
    findings_text = findings.report_text("findings")
    impression_text = findings.report_text("impression")
    if findings_text:
        items.append(
            hd.sr.TextContentItem(
                codes.FINDING, prefix + findings_text, hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    if impression_text:
        items.append(
            hd.sr.TextContentItem(
                codes.IMPRESSION, prefix + impression_text, hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    items.append(
        hd.sr.TextContentItem(
            codes.CONTRAST_PHASE,
            findings.provenance.phase_statement,
            hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    strings = [
        f"{cv.name}: {cv.value}"
        for cv in findings.provenance.clinical_used
        if isinstance(cv.value, str)
    ]
    if strings:
        items.append(
            hd.sr.TextContentItem(
                codes.CLINICAL_INPUTS, "; ".join(strings), hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_sr(
    findings: Findings,
    source_datasets: Sequence[Dataset],
    seg: Dataset,
    *,
    options: OutputOptions | None = None,
    frame_numbers: Sequence[int | None] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Comprehensive 3D SR referencing ``seg`` and the source images."""
    opts = options or OutputOptions(pipeline_version=findings.provenance.pipeline_version)
    series = order_sources(findings, source_datasets, frame_numbers)
    try:
        return _build_sr(findings, series, seg, opts)
    except BuildError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise BuildError(f"SR could not be built: {exc}") from exc


def _build_sr(
    findings: Findings, series: SourceSeries, seg: Dataset, opts: OutputOptions
) -> hd.sr.Comprehensive3DSR:
    p = findings.provenance
    ct = _is_ct(series)
    seg_numbers = {s.finding_id: s.number for s in plan_segments(findings)}
    tracking = {s.finding_id: s.tracking_uid for s in plan_segments(findings)}
    hd_alg = algorithm_identification(findings)
    algorithm = hd.sr.AlgorithmIdentification(
        name=hd_alg[0].AlgorithmName, version=hd_alg[0].AlgorithmVersion
    )
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    key_slices: list[int] = []
    # Lesions first, each planar group before its volumetric group: OHIF merges
    # groups by tracking UID, draws the first coordinate it finds and opens the
    # SR on its first measurement (docs/dicom-outputs.md).
    for lesion in findings.lesions:
        if lesion.id not in seg_numbers:
            log.info("lesion %d has no segment: no SR groups", lesion.number)
            continue
        uid = tracking[lesion.id]
        groups.append(_planar_group(lesion, series, uid, algorithm, opts))
        groups.append(
            _lesion_volumetric_group(lesion, series, seg, seg_numbers[lesion.id], uid, algorithm)
        )
        key_slices.append(lesion.key_slice)
    for organ in findings.organs:
        if organ.id not in seg_numbers:
            continue
        built = _organ_group(
            organ, series, seg, seg_numbers[organ.id], tracking[organ.id], algorithm
        )
        if built is not None:
            groups.append(built[0])
            key_slices.append(built[1])

    key_images = list(
        {
            str(series.slices[k].dataset.SOPInstanceUID): series.slices[k].dataset
            for k in key_slices
        }.values()
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=output_uid(p.input_series_uid, p.pipeline_version, "device"),
            name=f"{p.model_name} {p.model_version}"[:64],
            manufacturer_name=opts.manufacturer,
            model_name=opts.model_name,
            serial_number=opts.device_serial_number,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.CT_ABDOMEN if ct else codes.MR_ABDOMEN,
        imaging_measurements=groups,
        # highdicom's image library reads single-frame geometry only
        referenced_images=(key_images or None) if not series.multiframe else None,
    )
    report[0].ContentSequence.append(_evaluations_container(findings, opts, algorithm))
    clinical = _clinical_container(findings)
    if clinical is not None:
        report[0].ContentSequence.append(clinical)
    evidence = [*series.datasets, seg]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=output_uid(p.input_series_uid, opts.pipeline_version, "sr"),
        series_number=opts.series_number_base + SERIES_OFFSETS["sr"],
        sop_instance_uid=output_uid(p.input_series_uid, opts.pipeline_version, "sr", "1"),
        instance_number=1,
        manufacturer=opts.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=opts.institution_name,
    )
    copy_study_attributes(sr, series.first)
    sr.SeriesDescription = opts.describe("AI measurements TID1500")
    return sr
