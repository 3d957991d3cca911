"""Comprehensive 3D SR, TID 1500 Measurement Report, from ``Findings``.

Content (see docs/dicom-outputs.md for the tree):

* observer context naming the device (the model and the node);
* one volumetric group (TID 1411) per organ: volume, mean and SD of
  attenuation (CT) or signal (MR), referencing its SEG segment;
* one volumetric group per lesion: tracking identifier and UID, finding type,
  finding sites (organ and Couinaud segment / pancreatic part), volume, long and
  short axis, mean attenuation, referenced segment, centroid as SCOORD3D POINT;
* one planar group (TID 1410) per lesion on its key slice: outline as SCOORD
  POLYGON, long and short axis as NUM items each inferred from a 2-point SCOORD
  POLYLINE on the source image (the shape OHIF hydrates as a bidirectional);
* one measurement group (TID 1501) per diagnosis: finding type = disease,
  probability, qualitative evaluation "Finding = disease";
* one group of clinical inputs: used numeric values as NUM (LOINC, UCUM),
  missing ones as qualitative evaluations "= Unknown";
* a "Qualitative Evaluations" container with the findings and impression text.
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
from models.findings import Axis, Findings, LesionFinding

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


def _diagnosis_groups(
    findings: Findings, algorithm: hd.sr.AlgorithmIdentification
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    p = findings.provenance
    groups = []
    for dx in findings.diagnoses:
        concept = codes.DISEASES[dx.disease]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=output_uid(p.input_series_uid, p.pipeline_version, "dx", dx.disease.value),
                    identifier=f"diagnosis {dx.disease.value}"[:64],
                ),
                finding_type=concept,
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(codes.PROBABILITY, float(dx.probability), codes.NO_UNITS)
                ],
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.DIAGNOSIS, concept)],
            )
        )
    return groups


def _clinical_group(
    findings: Findings, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    p = findings.provenance
    measurements = []
    evaluations = []
    for cv in p.clinical_used:
        if isinstance(cv.value, (int, float)) and not isinstance(cv.value, bool):
            unit = cv.unit or codes.lab_unit(cv.name, cv.code) or "1"
            measurements.append(
                hd.sr.Measurement(
                    codes.lab_concept(cv.name, cv.code), float(cv.value), codes.unit_concept(unit)
                )
            )
    for name in p.clinical_missing:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.lab_concept(name), codes.UNKNOWN))
    if not measurements and not evaluations:
        return None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=output_uid(p.input_series_uid, p.pipeline_version, "clinical"),
            identifier="clinical inputs",
        ),
        finding_type=codes.CLINICAL_INPUTS,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
    )


def _text_container(findings: Findings, opts: OutputOptions) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    items = []
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
    for_uid = str(series.first.FrameOfReferenceUID)

    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for organ in findings.organs:
        if organ.id not in seg_numbers:
            continue
        oc = codes.ORGANS[organ.organ]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking[organ.id], identifier=oc.label
                ),
                referenced_segment=hd.sr.ReferencedSegment.from_segmentation(
                    seg, seg_numbers[organ.id]
                ),
                finding_type=oc.type,
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(oc.type, laterality=oc.modifier)],
                measurements=[
                    hd.sr.Measurement(codes.VOLUME, float(organ.volume_ml), codes.MILLILITER),
                    *_intensity_measurements(organ.mean_intensity, organ.std_intensity, ct),
                ],
            )
        )
    for lesion in findings.lesions:
        if lesion.id not in seg_numbers:
            log.info("lesion %d has no segment: no SR groups", lesion.number)
            continue
        uid = tracking[lesion.id]
        volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=lesion_label(lesion)),
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(
                seg, seg_numbers[lesion.id]
            ),
            finding_type=codes.LESION_TYPES[lesion.kind],
            algorithm_id=algorithm,
            finding_sites=_finding_sites(lesion),
            measurements=[
                hd.sr.Measurement(codes.VOLUME, float(lesion.volume_ml), codes.MILLILITER),
                hd.sr.Measurement(
                    codes.LONG_AXIS, float(lesion.long_axis.length_mm), codes.MILLIMETER
                ),
                hd.sr.Measurement(
                    codes.SHORT_AXIS, float(lesion.short_axis.length_mm), codes.MILLIMETER
                ),
                *_intensity_measurements(lesion.mean_intensity, lesion.std_intensity, ct),
            ],
        )
        volumetric[0].ContentSequence.append(_centroid_item(lesion, for_uid))
        groups.append(volumetric)
        groups.append(_planar_group(lesion, series, uid, algorithm, opts))
    groups.extend(_diagnosis_groups(findings, algorithm))
    clinical = _clinical_group(findings, algorithm)
    if clinical is not None:
        groups.append(clinical)

    key_images = list(
        {
            str(series.slices[les.key_slice].dataset.SOPInstanceUID): series.slices[
                les.key_slice
            ].dataset
            for les in findings.lesions
            if les.id in seg_numbers and 0 <= les.key_slice < len(series.slices)
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
    report[0].ContentSequence.append(_text_container(findings, opts))
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
