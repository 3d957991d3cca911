"""Write a (slice, row, column) array with an LPS affine as one Enhanced multi-frame image.

The multi-frame sibling of :mod:`models.series_writer`: Enhanced CT Image Storage
(PS3.3 A.38) or Enhanced MR Image Storage (A.36), one frame per slice, with the
functional groups those IODs require. Geometry goes into Pixel Measures, Plane
Orientation (shared) and Plane Position (per frame); each frame's Frame Content
carries Stack ID 1, its In-Stack Position Number (``k + 1``) and the matching
Dimension Index Values of a two-index "3D" Dimension Organization. CT stores
``HU + 1024`` with the Pixel Value Transformation undoing it; MR stores the
intensities as unsigned integers.

Acquisition parameters (kVp, tube current, echo time, coils, ...) are plausible
constants, not measurements: the objects are for tests and for the synthetic
generator, and say so (Content Qualification RESEARCH).

``frame_order`` stores the slices as frames in another order (frame ``i`` holds
slice ``frame_order[i]``), so readers that stack frames by frame number instead
of by position are caught by tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
)
from pydicom.valuerep import DA, TM

from models.series_writer import SeriesInfo, _geometry, derived_uid

#: CT stores HU minus this intercept (stored 0 is -1024 HU), as models.series_writer does.
CT_RESCALE_INTERCEPT = -1024.0
_DATE = "20260101"
_TIME = "120000"
_DATETIME = _DATE + _TIME + ".000000"


def _item(**attributes: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _enhanced_image_type(image_type: Sequence[str]) -> list[str]:
    """Four-valued Image/Frame Type; single-frame flavour AXIAL becomes VOLUME (C.8.16.1)."""
    values = [str(v).upper() for v in image_type][:3]
    values += ["VOLUME"] * (3 - len(values))
    if values[2] == "AXIAL":
        values[2] = "VOLUME"
    return [*values, "NONE"]


def _frame_type(modality: str, image_type: Sequence[str]) -> Dataset:
    item = _item(
        FrameType=_enhanced_image_type(image_type),
        PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE",
    )
    if modality == "MR":
        item.ComplexImageComponent = "MAGNITUDE"
        item.AcquisitionContrast = "T1"
    return item


def _ct_acquisition_groups(spacing: Sequence[float], columns: int) -> dict[str, list[Dataset]]:
    """CT macros of Table A.38-2 that are required when Frame Type value 1 is ORIGINAL."""
    return {
        "CTAcquisitionTypeSequence": [
            _item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")
        ],
        "CTAcquisitionDetailsSequence": [
            _item(
                DataCollectionDiameter=500.0,
                GantryDetectorTilt=0.0,
                TableHeight=150.0,
                RotationDirection="CW",
                RevolutionTime=0.5,
                SingleCollimationWidth=0.625,
                TotalCollimationWidth=40.0,
            )
        ],
        "CTTableDynamicsSequence": [
            _item(TableSpeed=80.0, TableFeedPerRotation=40.0, SpiralPitchFactor=1.0)
        ],
        "CTGeometrySequence": [
            _item(DistanceSourceToDetector=1040.0, DistanceSourceToDataCollectionCenter=570.0)
        ],
        "CTReconstructionSequence": [
            _item(
                ReconstructionAlgorithm="FILTER_BACK_PROJ",
                ConvolutionKernel="STANDARD",
                ConvolutionKernelGroup="SOFT_TISSUE",
                ReconstructionDiameter=round(float(spacing[1]) * columns, 6),
                ReconstructionPixelSpacing=[round(float(v), 6) for v in spacing],
                ReconstructionAngle=360.0,
                ImageFilter="NONE",
            )
        ],
        "CTExposureSequence": [
            _item(
                ExposureTimeInms=500.0,
                XRayTubeCurrentInmA=200.0,
                ExposureInmAs=100.0,
                ExposureModulationType="NONE",
                CTDIvol=10.0,
                CTDIPhantomTypeCodeSequence=[
                    _item(
                        CodeValue="113691",
                        CodingSchemeDesignator="DCM",
                        CodeMeaning="IEC Body Dosimetry Phantom",
                    )
                ],
            )
        ],
        "CTXRayDetailsSequence": [
            _item(KVP=120.0, FocalSpots=[1.2], FilterType="BODY", FilterMaterial=["ALUMINUM"])
        ],
    }


def _mr_acquisition_groups(rows: int, columns: int) -> dict[str, list[Dataset]]:
    """MR macros of Table A.36-2 that are required when Frame Type value 1 is ORIGINAL."""
    return {
        "MRTimingAndRelatedParametersSequence": [
            _item(
                RepetitionTime=5.0,
                FlipAngle=15.0,
                EchoTrainLength=1,
                RFEchoTrainLength=0,
                GradientEchoTrainLength=1,
                SpecificAbsorptionRateSequence=[
                    _item(
                        SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                        SpecificAbsorptionRateValue=0.5,
                    )
                ],
                GradientOutputType="DB_DT",
                GradientOutput=0.5,
                OperatingModeSequence=[
                    _item(OperatingModeType=mode, OperatingMode="IEC_NORMAL")
                    for mode in ("STATIC FIELD", "RF", "GRADIENT")
                ],
            )
        ],
        "MRFOVGeometrySequence": [
            _item(
                InPlanePhaseEncodingDirection="ROW",
                MRAcquisitionFrequencyEncodingSteps=columns,
                MRAcquisitionPhaseEncodingStepsInPlane=rows,
                PercentSampling=100.0,
                PercentPhaseFieldOfView=100.0,
            )
        ],
        "MREchoSequence": [_item(EffectiveEchoTime=2.0)],
        "MRModifierSequence": [
            _item(
                InversionRecovery="NO",
                FlowCompensation="NONE",
                Spoiling="RF",
                T2Preparation="NO",
                SpectrallySelectedExcitation="NONE",
                SpatialPresaturation="NONE",
                PartialFourier="NO",
                ParallelAcquisition="NO",
            )
        ],
        "MRImagingModifierSequence": [
            _item(
                MagnetizationTransfer="NONE",
                BloodSignalNulling="NO",
                Tagging="NONE",
                TransmitterFrequency=63.87,
                PixelBandwidth=500.0,
            )
        ],
        "MRReceiveCoilSequence": [
            _item(
                ReceiveCoilName="BODY",
                ReceiveCoilManufacturerName="",
                ReceiveCoilType="BODY",
                QuadratureReceiveCoil="YES",
            )
        ],
        "MRTransmitCoilSequence": [
            _item(TransmitCoilName="BODY", TransmitCoilManufacturerName="", TransmitCoilType="BODY")
        ],
        "MRAveragesSequence": [_item(NumberOfAverages=1.0)],
    }


def _mr_image_attributes() -> dict[str, Any]:
    """Enhanced MR Image (C.8.13.1) and MR Pulse Sequence (C.8.13.4) module attributes."""
    return {
        "ResonantNucleus": "1H",
        "KSpaceFiltering": "NONE",
        "MagneticFieldStrength": 1.5,
        "ApplicableSafetyStandardAgency": "IEC",
        "ComplexImageComponent": "MAGNITUDE",
        "AcquisitionContrast": "T1",
        "PulseSequenceName": "GRE3D",
        "MRAcquisitionType": "3D",
        "EchoPulseSequence": "GRADIENT",
        "MultiPlanarExcitation": "NO",
        "PhaseContrast": "NO",
        "TimeOfFlightContrast": "NO",
        "SteadyStatePulseSequence": "NONE",
        "EchoPlanarPulseSequence": "NO",
        "SaturationRecovery": "NO",
        "SpectrallySelectedSuppression": "NONE",
        "OversamplingPhase": "NONE",
        "GeometryOfKSpaceTraversal": "RECTILINEAR",
        "RectilinearPhaseEncodeReordering": "LINEAR",
        "SegmentedKSpaceTraversal": "SINGLE",
        "CoverageOfKSpace": "FULL",
        "NumberOfKSpaceTrajectories": 1,
    }


def _dimension_organization(uid: str) -> tuple[list[Dataset], list[Dataset]]:
    """A two-index (Stack ID, In-Stack Position Number) organization, as for a 3D volume."""
    frame_content = tag_for_keyword("FrameContentSequence")
    indices = [
        _item(
            DimensionOrganizationUID=uid,
            DimensionIndexPointer=tag_for_keyword(keyword),
            FunctionalGroupPointer=frame_content,
            DimensionDescriptionLabel=label,
        )
        for keyword, label in (
            ("StackID", "Stack ID"),
            ("InStackPositionNumber", "In-Stack Position Number"),
        )
    ]
    return [_item(DimensionOrganizationUID=uid)], indices


def enhanced_image(
    array: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    *,
    modality: str = "CT",
    info: SeriesInfo | None = None,
    frame_order: Sequence[int] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: str = "hpb-enhanced",
    instance_number: int = 1,
) -> Dataset:
    """``array[k, r, c]`` (CT: HU; MR: intensities) as an Enhanced CT or MR data set.

    The SOP Instance UID derives from the series and ``instance_number``: give each
    object of one series its own number.
    """
    if array.ndim != 3:
        raise ValueError("array must be (slices, rows, columns)")
    n, rows, columns = (int(v) for v in array.shape)
    order = list(frame_order) if frame_order is not None else list(range(n))
    if sorted(order) != list(range(n)):
        raise ValueError("frame_order must be a permutation of range(n_slices)")
    if modality == "CT":
        sop_class = UID(EnhancedCTImageStorage)
        slope, intercept = 1.0, CT_RESCALE_INTERCEPT
        stored: npt.NDArray[Any] = np.clip(np.round(array - intercept), -32768, 32767).astype(
            np.int16
        )
    elif modality == "MR":
        sop_class = UID(EnhancedMRImageStorage)
        slope, intercept = 1.0, 0.0
        stored = np.clip(np.round(array), 0, 65535).astype(np.uint16)
    else:
        raise ValueError(f"unsupported modality {modality!r}")
    info = info or SeriesInfo()
    info.fill_uids(seed)
    affine = np.asarray(affine, dtype=np.float64)
    iop, spacing, thickness = _geometry(affine)
    original = str(info.image_type[0]).upper() == "ORIGINAL"

    ds = hd.SOPClass(
        study_instance_uid=info.study_uid,
        series_instance_uid=info.series_uid,
        series_number=info.series_number,
        sop_instance_uid=derived_uid(info.series_uid, "enhanced", str(instance_number)),
        sop_class_uid=sop_class,
        instance_number=instance_number,
        modality=modality,
        manufacturer=info.manufacturer,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        patient_id=info.patient_id,
        patient_name=info.patient_name,
        patient_birth_date=info.patient_birth_date,
        patient_sex=info.patient_sex,
        accession_number=info.accession_number,
        study_id="1",
        study_date=info.study_date,
        study_time=info.study_time,
        referring_physician_name="",
        content_qualification=hd.enum.ContentQualificationValues.RESEARCH,
        series_description=info.series_description,
        manufacturer_model_name="hpb-node enhanced writer",
        software_versions="1",
        device_serial_number="0",
        content_date=_DATE,
        content_time=_TIME,
        series_date=info.study_date,
        series_time=info.study_time,
        specific_character_set="ISO_IR 100",
    )
    ds.InstanceCreationDate = DA(_DATE)  # deterministic output (highdicom stamps "now")
    ds.InstanceCreationTime = TM(_TIME)
    ds.StudyDescription = info.study_description
    ds.BodyPartExamined = info.body_part
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageType = _enhanced_image_type(info.image_type)
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionNumber = 1
    if original:
        ds.AcquisitionDateTime = _DATETIME
        ds.AcquisitionDuration = 10.0
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = []
    if modality == "MR":
        for keyword, value in _mr_image_attributes().items():
            setattr(ds, keyword, value)

    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0

    # Multi-frame Dimension
    org_uid = derived_uid(info.series_uid, "dimension organization")
    ds.DimensionOrganizationSequence, ds.DimensionIndexSequence = _dimension_organization(org_uid)
    ds.DimensionOrganizationType = "3D"

    # Shared functional groups
    shared = Dataset()
    shared.PixelMeasuresSequence = hd.PixelMeasuresSequence(
        pixel_spacing=[round(v, 6) for v in spacing],
        slice_thickness=round(thickness, 6),
        spacing_between_slices=round(thickness, 6),
    )
    shared.PlaneOrientationSequence = hd.PlaneOrientationSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_orientation=[round(v, 8) for v in iop],
    )
    shared.FrameAnatomySequence = [
        _item(
            AnatomicRegionSequence=[
                _item(CodeValue="818981001", CodingSchemeDesignator="SCT", CodeMeaning="Abdomen")
            ],
            FrameLaterality="U",
        )
    ]
    shared.PixelValueTransformationSequence = [
        hd.ModalityLUTTransformation(
            rescale_intercept=intercept,
            rescale_slope=slope,
            rescale_type="HU" if modality == "CT" else "US",
        )
    ]
    if modality == "CT":
        window = (40.0, 400.0)  # abdomen soft tissue
    else:
        window = (float(np.percentile(array, 50)), max(float(np.ptp(array)), 1.0))
    shared.FrameVOILUTSequence = [
        hd.VOILUTTransformation(window_center=window[0], window_width=window[1])
    ]
    frame_type_kw = "CTImageFrameTypeSequence" if modality == "CT" else "MRImageFrameTypeSequence"
    setattr(shared, frame_type_kw, [_frame_type(modality, info.image_type)])
    if modality == "CT":
        shared.IrradiationEventIdentificationSequence = [
            _item(IrradiationEventUID=derived_uid(info.series_uid, "irradiation"))
        ]
        if original:
            for keyword, value in _ct_acquisition_groups(spacing, columns).items():
                setattr(shared, keyword, value)
    elif original:
        for keyword, value in _mr_acquisition_groups(rows, columns).items():
            setattr(shared, keyword, value)
    ds.SharedFunctionalGroupsSequence = [shared]

    # Per-frame functional groups
    per_frame = []
    centre = (np.array([rows, columns], dtype=np.float64) - 1) / 2
    for k in order:
        corner = affine[:3, 3] + k * affine[:3, 0]
        group = Dataset()
        content = _item(StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[1, k + 1])
        if original:
            content.FrameAcquisitionDateTime = _DATETIME
            content.FrameReferenceDateTime = _DATETIME
            content.FrameAcquisitionDuration = 100.0
        group.FrameContentSequence = [content]
        group.PlanePositionSequence = hd.PlanePositionSequence(
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            image_position=[round(float(v), 6) for v in corner],
        )
        if modality == "CT" and original:
            middle = corner + centre[0] * affine[:3, 1] + centre[1] * affine[:3, 2]
            centre_mm = [round(float(v), 6) for v in middle]
            group.CTPositionSequence = [
                _item(
                    TablePosition=round(float(middle[2]), 6),
                    ReconstructionTargetCenterPatient=centre_mm,
                    DataCollectionCenterPatient=centre_mm,
                )
            ]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.NumberOfFrames = n
    for key, value in info.extra.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored[order]).tobytes()
    if UID(transfer_syntax) != ExplicitVRLittleEndian:
        ds.compress(UID(transfer_syntax), generate_instance_uid=False)
    return ds


def write_enhanced(
    array: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    path: Path | str,
    **kwargs: Any,
) -> Path:
    """Write :func:`enhanced_image` to ``path`` (parent folders created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    enhanced_image(array, affine, **kwargs).save_as(out, enforce_file_format=True)
    return out
