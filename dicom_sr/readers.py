"""Read SEG and TID 1500 SR objects (ours and other tools') back into plain data.

``read_seg`` gives the segment descriptions and, when the source instances are
named, one boolean mask per segment on the source grid ``[k, r, c]`` (slice k
is ``source_sop_uids[k]``, frame ``frame_numbers[k]`` of it for multi-frame
sources); without sources it gives highdicom's geometry-derived volume.
``read_sr`` walks the content tree of any TID 1500 report and returns its
measurement groups, the coded and text items of its Qualitative Evaluations
container (with their NUM properties), a clinical-inputs container when there
is one (ours), and the observer.

Everything that cannot be read ends in ``ReadError`` (or its child
``UnsupportedObjectError``) with a message naming the file and the reason;
nothing else escapes.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.filewriter
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from dicom_sr import codes
from dicom_sr.errors import ReadError, UnsupportedObjectError

log = logging.getLogger(__name__)

SEG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
}
SR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
}

Code = tuple[str, str, str]  # (value, scheme, meaning)


def _code(item: Dataset | None) -> Code | None:
    if item is None:
        return None
    value = (
        getattr(item, "CodeValue", None)
        or getattr(item, "LongCodeValue", None)
        or getattr(item, "URNCodeValue", "")
    )
    return (str(value), str(getattr(item, "CodingSchemeDesignator", "")), str(item.CodeMeaning))


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    seq = getattr(ds, keyword, None)
    if seq is None or len(seq) == 0:
        return None
    return seq[0]  # type: ignore[no-any-return]


def _load(source: str | Path | Dataset, what: str) -> tuple[Dataset, str]:
    if isinstance(source, Dataset):
        return source, str(getattr(source, "filename", None) or f"<{what} dataset>")
    name = str(source)
    try:
        return pydicom.dcmread(name), name
    except FileNotFoundError as exc:
        raise ReadError(f"{name}: file not found") from exc
    except (InvalidDicomError, EOFError, OSError) as exc:
        raise ReadError(f"{name}: not a readable DICOM file ({exc})") from exc
    except (ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise ReadError(f"{name}: DICOM file is malformed: {exc}") from exc


# --------------------------------------------------------------------------- SEG


@dataclass(frozen=True)
class SegmentInfo:
    number: int
    label: str
    category: Code | None
    type: Code | None
    type_modifier: Code | None
    anatomic_region: Code | None
    algorithm_type: str
    algorithm_name: str
    tracking_id: str
    tracking_uid: str
    rgb: tuple[int, int, int] | None


@dataclass
class SegRead:
    """A SEG read back: descriptions, and masks on the requested grid."""

    sop_instance_uid: str
    series_instance_uid: str
    segmentation_type: str
    segments: list[SegmentInfo]
    masks: dict[int, npt.NDArray[np.bool_]] = field(default_factory=dict)
    affine: npt.NDArray[np.float64] | None = None  # only for geometry-derived volumes
    referenced_series_uid: str = ""

    def segment(self, label: str) -> SegmentInfo:
        for s in self.segments:
            if s.label == label:
                return s
        raise KeyError(f"no segment labelled {label!r} (have {[s.label for s in self.segments]})")


def _segment_info(item: Dataset) -> SegmentInfo:
    alg = _first(item, "SegmentationAlgorithmIdentificationSequence")
    type_item = _first(item, "SegmentedPropertyTypeCodeSequence")
    modifier = _first(type_item, "SegmentedPropertyTypeModifierCodeSequence") if type_item else None
    rgb = None
    if "RecommendedDisplayCIELabValue" in item:
        lab = [int(v) for v in item.RecommendedDisplayCIELabValue]
        r, g, b = hd.color.CIELabColor.from_dicom_value(lab).to_rgb(clip=True)
        rgb = (int(r), int(g), int(b))
    return SegmentInfo(
        number=int(item.SegmentNumber),
        label=str(getattr(item, "SegmentLabel", "")),
        category=_code(_first(item, "SegmentedPropertyCategoryCodeSequence")),
        type=_code(type_item),
        type_modifier=_code(modifier),
        anatomic_region=_code(_first(item, "AnatomicRegionSequence")),
        algorithm_type=str(getattr(item, "SegmentAlgorithmType", "")),
        algorithm_name=str(getattr(alg, "AlgorithmName", "")) if alg else "",
        tracking_id=str(getattr(item, "TrackingID", "")),
        tracking_uid=str(getattr(item, "TrackingUID", "")),
        rgb=rgb,
    )


_DEFLATED_IMAGE_FRAME = "1.2.840.10008.1.2.8.1"


def _check_pixel_encoding(ds: Dataset, name: str) -> Dataset:
    """Refuse, with a clear reason, encodings whose pixel data we cannot decode.

    Returns the dataset to use: big-endian 1- or 8-bit SEGs are re-encoded as
    explicit VR little endian in memory (their pixel bytes need no swapping).
    """
    meta = getattr(ds, "file_meta", None)
    ts_value = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts_value is None or "PixelData" not in ds:
        return ds
    ts = pydicom.uid.UID(str(ts_value))
    if str(ts) == _DEFLATED_IMAGE_FRAME or not ts.is_transfer_syntax:
        label = (
            "Deflated Image Frame Compression" if str(ts) == _DEFLATED_IMAGE_FRAME else "unknown"
        )
        raise UnsupportedObjectError(
            f"{name}: transfer syntax {ts} ({label}) is not supported by the DICOM library "
            "(pydicom) this node uses: pixel data cannot be decoded"
        )
    bits = int(getattr(ds, "BitsAllocated", 8))
    if not ts.is_little_endian:
        if bits not in (1, 8):
            raise UnsupportedObjectError(
                f"{name}: big-endian {bits}-bit pixel data is not supported (retired encoding)"
            )
        buf = io.BytesIO()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        pydicom.filewriter.dcmwrite(
            buf, ds, little_endian=True, implicit_vr=False, enforce_file_format=True
        )
        buf.seek(0)
        return pydicom.dcmread(buf)
    if not ts.is_compressed:
        return ds
    if bits == 1 and ts == pydicom.uid.RLELossless:
        raise UnsupportedObjectError(
            f"{name}: RLE Lossless SEG with 1-bit pixels: neither pydicom nor pylibjpeg-rle "
            "can decode RLE at 1 bit allocated"
        )
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise UnsupportedObjectError(
            f"{name}: pixel data in transfer syntax {ts.name} ({ts}) cannot be decoded here"
        ) from exc
    if not decoder.is_available:
        raise UnsupportedObjectError(
            f"{name}: pixel data in transfer syntax {ts.name} ({ts}) needs a decoder plugin "
            "that is not installed"
        )
    return ds


def read_seg(
    source: str | Path | Dataset,
    source_sop_uids: Sequence[str] | None = None,
    *,
    frame_numbers: Sequence[int | None] | None = None,
    with_masks: bool = True,
) -> SegRead:
    """Read a SEG: segments, and masks on the source grid when its instances are given."""
    ds, name = _load(source, "SEG")
    sop_class = str(getattr(ds, "SOPClassUID", ""))
    if sop_class not in SEG_SOP_CLASSES:
        raise UnsupportedObjectError(
            f"{name}: SOP class {sop_class or '(none)'} is not a DICOM Segmentation"
        )
    seg_type = str(getattr(ds, "SegmentationType", ""))
    if seg_type not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise UnsupportedObjectError(f"{name}: unknown SegmentationType {seg_type!r}")
    if "SegmentSequence" not in ds or len(ds.SegmentSequence) == 0:
        raise ReadError(f"{name}: SEG has no SegmentSequence")
    missing_cat = [
        int(it.SegmentNumber)
        for it in ds.SegmentSequence
        if "SegmentedPropertyCategoryCodeSequence" not in it
    ]
    if missing_cat:
        raise UnsupportedObjectError(
            f"{name}: segments {missing_cat} lack SegmentedPropertyCategoryCodeSequence "
            "(a pre-standard SEG, e.g. written by an old syngo.via): not read"
        )
    ds = _check_pixel_encoding(ds, name)
    if str(getattr(ds, "DimensionOrganizationType", "")).startswith("TILED"):
        raise UnsupportedObjectError(
            f"{name}: tiled (whole-slide microscopy) SEG: the node reads radiology SEGs only"
        )
    # LABELMAP SEGs may describe the background as segment 0: not a segment to return
    segments = [_segment_info(item) for item in ds.SegmentSequence if int(item.SegmentNumber) != 0]
    ref_series = _first(ds, "ReferencedSeriesSequence")
    out = SegRead(
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        segmentation_type=seg_type,
        segments=segments,
        referenced_series_uid=str(getattr(ref_series, "SeriesInstanceUID", ""))
        if ref_series
        else "",
    )
    if not with_masks:
        return out
    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        numbers = [s.number for s in segments]
        if source_sop_uids is not None:
            masks = _masks_on_sources(seg, list(source_sop_uids), frame_numbers, numbers)
            out.masks = {n: masks[..., i] for i, n in enumerate(numbers)}
        else:
            vol = seg.get_volume(combine_segments=False, allow_missing_positions=True)
            arr = np.asarray(vol.array)
            out.masks = {n: arr[..., i] > 0 for i, n in enumerate(numbers)}
            out.affine = np.asarray(vol.affine, dtype=np.float64)
    except (ReadError, UnsupportedObjectError):
        raise
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as exc:
        raise ReadError(f"{name}: SEG pixel data could not be mapped: {exc}") from exc
    except NotImplementedError as exc:
        raise UnsupportedObjectError(f"{name}: {exc}") from exc
    return out


def _masks_on_sources(
    seg: hd.seg.Segmentation,
    sop_uids: list[str],
    frame_numbers: Sequence[int | None] | None,
    numbers: list[int],
) -> npt.NDArray[np.bool_]:
    if frame_numbers and any(f is not None for f in frame_numbers):
        by_instance: dict[str, list[tuple[int, int]]] = {}
        for k, (u, f) in enumerate(zip(sop_uids, frame_numbers, strict=True)):
            by_instance.setdefault(u, []).append((k, int(f or 1)))
        result: npt.NDArray[np.bool_] | None = None
        for u, pairs in by_instance.items():
            arr = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=u,
                source_frame_numbers=[f for _, f in pairs],
                segment_numbers=numbers,
                assert_missing_frames_are_empty=True,
                ignore_spatial_locations=True,
            )
            if result is None:
                result = np.zeros((len(sop_uids), *arr.shape[1:]), dtype=bool)
            for j, (k, _) in enumerate(pairs):
                result[k] = arr[j] > 0
        assert result is not None
        return result
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sop_uids,
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
        ignore_spatial_locations=True,
    )
    return np.asarray(arr) > 0


# --------------------------------------------------------------------------- SR


@dataclass
class Scoord:
    graphic_type: str
    points: npt.NDArray[np.float64]  # (n, 2) column,row  or  (n, 3) LPS mm
    referenced_sop_uid: str = ""
    referenced_frames: tuple[int, ...] = ()
    frame_of_reference_uid: str = ""


@dataclass
class MeasurementRead:
    name: Code
    value: float
    unit: Code | None
    derivation: Code | None = None
    scoords: list[Scoord] = field(default_factory=list)


@dataclass
class GroupRead:
    """One TID 1501/1410/1411 measurement group, as found."""

    tracking_id: str = ""
    tracking_uid: str = ""
    finding_type: Code | None = None
    finding_sites: list[Code] = field(default_factory=list)
    measurements: list[MeasurementRead] = field(default_factory=list)
    evaluations: list[tuple[Code, Code]] = field(default_factory=list)
    regions: list[Scoord] = field(default_factory=list)  # SCOORD image regions (TID 1410)
    points: list[tuple[Code, Scoord]] = field(default_factory=list)  # SCOORD centre of mass
    scoord3d: list[tuple[Code, Scoord]] = field(default_factory=list)
    referenced_segment: tuple[str, int] | None = None  # (SEG SOP UID, segment number)
    algorithm_name: str = ""

    @property
    def is_planar(self) -> bool:
        return bool(self.regions) or any(m.scoords for m in self.measurements)

    def measurement(self, meaning: str) -> MeasurementRead | None:
        low = meaning.lower()
        return next((m for m in self.measurements if m.name[2].lower() == low), None)


@dataclass
class EvaluationRead:
    """A CODE item of the report-level Qualitative Evaluations container (TID 1500)."""

    name: Code
    value: Code
    properties: list[MeasurementRead] = field(default_factory=list)  # NUM children

    def measurement(self, meaning: str) -> MeasurementRead | None:
        low = meaning.lower()
        return next((m for m in self.properties if m.name[2].lower() == low), None)


@dataclass
class SrRead:
    sop_instance_uid: str
    title: Code | None
    template: str
    device_name: str
    groups: list[GroupRead]
    texts: dict[str, str]
    evaluations: list[EvaluationRead] = field(default_factory=list)
    clinical_inputs: GroupRead | None = None  # NUM used / CODE "= Unknown" missing

    @property
    def findings_text(self) -> str:
        return self.texts.get("Finding", "")

    @property
    def impression_text(self) -> str:
        return self.texts.get("Impression", "")


def _scoord(item: Dataset) -> Scoord:
    data = np.asarray([float(v) for v in item.GraphicData], dtype=np.float64)
    three_d = item.ValueType == "SCOORD3D"
    pts = data.reshape(-1, 3 if three_d else 2)
    sop = ""
    frames: tuple[int, ...] = ()
    for child in getattr(item, "ContentSequence", []):
        if child.ValueType == "IMAGE" and "ReferencedSOPSequence" in child:
            ref = child.ReferencedSOPSequence[0]
            sop = str(ref.ReferencedSOPInstanceUID)
            if "ReferencedFrameNumber" in ref:
                raw = ref.ReferencedFrameNumber
                frames = tuple(int(v) for v in (raw if isinstance(raw, Sequence) else [raw]))
    return Scoord(
        graphic_type=str(item.GraphicType),
        points=pts,
        referenced_sop_uid=sop,
        referenced_frames=frames,
        frame_of_reference_uid=str(getattr(item, "ReferencedFrameOfReferenceUID", "")),
    )


def _num(item: Dataset) -> MeasurementRead | None:
    mv = _first(item, "MeasuredValueSequence")
    if mv is None:
        return None  # NUM with no value (allowed: TID 300 row "no value")
    name = _code(_first(item, "ConceptNameCodeSequence"))
    assert name is not None
    m = MeasurementRead(
        name=name,
        value=float(mv.NumericValue),
        unit=_code(_first(mv, "MeasurementUnitsCodeSequence")),
    )
    for child in getattr(item, "ContentSequence", []):
        cname = _code(_first(child, "ConceptNameCodeSequence"))
        if child.ValueType in ("SCOORD", "SCOORD3D"):
            m.scoords.append(_scoord(child))
        elif child.ValueType == "CODE" and cname and cname[0] == "121401":
            m.derivation = _code(_first(child, "ConceptCodeSequence"))
    return m


def _group(container: Dataset) -> GroupRead:
    g = GroupRead()
    for item in getattr(container, "ContentSequence", []):
        name = _code(_first(item, "ConceptNameCodeSequence"))
        vt = item.ValueType
        code = name[0] if name else ""
        if vt == "TEXT" and code == "112039":
            g.tracking_id = str(item.TextValue)
        elif vt == "UIDREF" and code == "112040":
            g.tracking_uid = str(item.UID)
        elif vt == "CODE" and code == "121071":
            g.finding_type = _code(_first(item, "ConceptCodeSequence"))
        elif vt == "CODE" and code in ("363698007", "G-C0E3"):
            site = _code(_first(item, "ConceptCodeSequence"))
            if site:
                g.finding_sites.append(site)
        elif vt == "TEXT" and code == "111001":
            g.algorithm_name = str(item.TextValue)
        elif vt == "NUM":
            m = _num(item)
            if m is not None:
                g.measurements.append(m)
        elif vt == "CODE" and name is not None:
            value = _code(_first(item, "ConceptCodeSequence"))
            if value is not None:
                g.evaluations.append((name, value))
        elif vt == "SCOORD" and code == codes.CENTER_OF_MASS.value and name is not None:
            g.points.append((name, _scoord(item)))
        elif vt == "SCOORD":
            g.regions.append(_scoord(item))
        elif vt == "SCOORD3D" and name is not None:
            g.scoord3d.append((name, _scoord(item)))
        elif vt == "IMAGE" and code == "121191" and "ReferencedSOPSequence" in item:
            ref = item.ReferencedSOPSequence[0]
            num = getattr(ref, "ReferencedSegmentNumber", None)
            if num is not None:
                g.referenced_segment = (str(ref.ReferencedSOPInstanceUID), int(num))
    return g


def read_sr(source: str | Path | Dataset) -> SrRead:
    """Read a TID 1500 Measurement Report (Enhanced, Comprehensive or Comprehensive 3D SR)."""
    ds, name = _load(source, "SR")
    sop_class = str(getattr(ds, "SOPClassUID", ""))
    if sop_class not in SR_SOP_CLASSES:
        raise UnsupportedObjectError(
            f"{name}: SOP class {sop_class or '(none)'} is not an SR we read "
            f"({', '.join(SR_SOP_CLASSES.values())})"
        )
    template = ""
    tpl = _first(ds, "ContentTemplateSequence")
    if tpl is not None:
        template = str(getattr(tpl, "TemplateIdentifier", ""))
    title = _code(_first(ds, "ConceptNameCodeSequence"))
    if template not in ("1500", "") or (template == "" and (title is None or title[0] != "126000")):
        raise UnsupportedObjectError(
            f"{name}: SR template {template or '(none)'} / title {title} is not TID 1500 "
            "Imaging Measurement Report"
        )
    groups: list[GroupRead] = []
    texts: dict[str, str] = {}
    evaluations: list[EvaluationRead] = []
    clinical: GroupRead | None = None
    device = ""
    try:
        for item in getattr(ds, "ContentSequence", []):
            iname = _code(_first(item, "ConceptNameCodeSequence"))
            code = iname[0] if iname else ""
            if item.ValueType == "TEXT" and code == "121013":  # Device Observer Name
                device = str(item.TextValue)
            if item.ValueType == "CONTAINER" and code == "126010":  # Imaging Measurements
                for sub in getattr(item, "ContentSequence", []):
                    sname = _code(_first(sub, "ConceptNameCodeSequence"))
                    if sub.ValueType == "CONTAINER" and sname and sname[0] == "125007":
                        groups.append(_group(sub))
            if item.ValueType == "CONTAINER" and code == "C0034375":  # Qualitative Evaluations
                for sub in getattr(item, "ContentSequence", []):
                    sname = _code(_first(sub, "ConceptNameCodeSequence"))
                    if sub.ValueType == "TEXT" and sname:
                        texts[sname[2]] = str(sub.TextValue)
                    value = _code(_first(sub, "ConceptCodeSequence"))
                    if sub.ValueType == "CODE" and sname and value:
                        nums = [
                            _num(c)
                            for c in getattr(sub, "ContentSequence", [])
                            if c.ValueType == "NUM"
                        ]
                        evaluations.append(
                            EvaluationRead(sname, value, [m for m in nums if m is not None])
                        )
            if item.ValueType == "CONTAINER" and code == codes.CLINICAL_INPUTS.value:
                clinical = _group(item)
    except (AttributeError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise ReadError(f"{name}: SR content tree is malformed: {exc}") from exc
    return SrRead(
        sop_instance_uid=str(ds.SOPInstanceUID),
        title=title,
        template=template,
        device_name=device,
        groups=groups,
        texts=texts,
        evaluations=evaluations,
        clinical_inputs=clinical,
    )


def read_any(source: str | Path | Dataset) -> SegRead | SrRead:
    """Read a SEG or an SR by its SOP class (no masks: no source grid is known)."""
    ds, name = _load(source, "object")
    sop_class = str(getattr(ds, "SOPClassUID", ""))
    if sop_class in SEG_SOP_CLASSES:
        return read_seg(ds, with_masks=True)
    if sop_class in SR_SOP_CLASSES:
        return read_sr(ds)
    raise UnsupportedObjectError(
        f"{name}: SOP class {sop_class or '(none)'} is neither a SEG nor a TID 1500 SR"
    )
