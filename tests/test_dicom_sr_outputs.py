"""All output objects for one CT case: validity (dciodvfy, dcentvfy, dsrdump),
content read back, deterministic UIDs and consistent references."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_sr import OutputOptions, build_all, codes, output_uid, read_seg, read_sr, readback
from dicom_sr.testing import findings_from_masks, sphere
from models.findings import ClinicalValue, Findings
from models.nifti import load_nifti_krc
from models.series_writer import SeriesInfo, write_series
from models.vocab import Disease, LesionKind, Organ, SubSite

MARK = "NOT FOR CLINICAL USE"
# dcentvfy warnings we accept (docs/dicom-outputs.md, "Known warnings").
KNOWN_DCENTVFY = (
    "Different information entities for attribute - Element=<AccessionNumber> IE <Series> "
    "versus <Study>",
)
KNOWN_DCIODVFY = ("Unrecognized defined term <99HPB>",)


@dataclasses.dataclass
class Case:
    source_paths: list[Path]
    sources: list[Dataset]
    findings: Findings
    objects: list[tuple[str, Dataset]]
    paths: dict[str, list[Path]]


def build_case(shared_data: Path, out: Path, version: str = "0.1.0-test") -> Case:
    d = shared_data / "ct_abdomen_3mm"
    ct, aff = load_nifti_krc(d / "ct.nii.gz")
    organs: dict[Organ, npt.NDArray[np.bool_]] = {}
    for organ in (Organ.LIVER, Organ.PANCREAS, Organ.GALLBLADDER, Organ.SPLEEN):
        m, _ = load_nifti_krc(d / "labels" / f"{organ.value}.nii.gz")
        organs[organ] = m > 0
    liver_idx = np.argwhere(organs[Organ.LIVER])
    les1 = sphere(ct.shape, liver_idx[len(liver_idx) // 3], 3.5) & organs[Organ.LIVER]
    les2 = sphere(ct.shape, liver_idx[2 * len(liver_idx) // 3], 2.2) & organs[Organ.LIVER]
    paths = write_series(ct, aff, out / "ct", info=SeriesInfo(), seed="outputs")
    sources = [pydicom.dcmread(p) for p in paths]
    findings = findings_from_masks(
        organs,
        [
            (Organ.LIVER, LesionKind.MASS, les1, SubSite.COUINAUD_VII),
            (Organ.LIVER, LesionKind.CYST, les2, SubSite.COUINAUD_IVB),
        ],
        aff,
        [str(ds.SOPInstanceUID) for ds in sources],
        str(sources[0].SeriesInstanceUID),
        image=ct,
        pipeline_version=version,
        diagnoses=[(Disease.HCC, 0.62), (Disease.SIMPLE_CYST, 0.3), (Disease.CIRRHOSIS, 0.08)],
        clinical_used=[
            ClinicalValue("AFP", "1834-1", 85.0, "ng/mL", source="synthetic"),
            ClinicalValue("ALBUMIN", "1751-7", 3.1, "g/dL", source="synthetic"),
        ],
        clinical_missing=["CA19-9", "INR"],
    )
    objects = build_all(findings, sources[::-1], OutputOptions(pipeline_version=version))
    written: dict[str, list[Path]] = {}
    for i, (kind, ds) in enumerate(objects):
        p = out / f"{i:02d}_{kind}.dcm"
        ds.save_as(p, enforce_file_format=True)
        written.setdefault(kind, []).append(p)
    return Case(paths, sources, findings, objects, written)


@pytest.fixture(scope="module")
def case(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return build_case(shared_data, tmp_path_factory.mktemp("outputs"))


def _run(*cmd: str) -> str:
    res = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    return res.stdout + res.stderr


def test_every_object_passes_dciodvfy(case: Case) -> None:
    assert sorted(case.paths) == ["ko", "pdf", "sc", "seg", "sr"]
    assert len(case.paths["sc"]) == 2  # one per lesion
    for paths in case.paths.values():
        for p in paths:
            out = _run("dciodvfy", str(p))
            errors = [line for line in out.splitlines() if "Error" in line]
            assert errors == [], f"{p.name}: {errors}"
            warnings = [line for line in out.splitlines() if line.startswith("Warning")]
            unexpected = [
                w
                for w in warnings
                if not any(k in w for k in KNOWN_DCIODVFY) and "Laterality" not in w
            ]
            assert unexpected == [], f"{p.name}: {unexpected}"


def test_dcentvfy_is_consistent_across_source_and_outputs(case: Case) -> None:
    files = [str(p) for p in case.source_paths] + [str(p) for ps in case.paths.values() for p in ps]
    out = _run("dcentvfy", *files)
    problems = [
        line
        for line in out.splitlines()
        if line.strip() and not any(k in line for k in KNOWN_DCENTVFY)
    ]
    assert problems == []


def test_dsrdump_parses_the_sr(case: Case) -> None:
    (sr_path,) = case.paths["sr"]
    res = subprocess.run(["dsrdump", str(sr_path)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert not [line for line in res.stderr.splitlines() if line.startswith(("E:", "F:"))]
    assert "Imaging Measurement Report" in res.stdout
    assert "Comprehensive 3D SR" in res.stdout
    (ko_path,) = case.paths["ko"]
    res = subprocess.run(["dsrdump", str(ko_path)], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "Of Interest" in res.stdout


def test_sr_content_reads_back(case: Case) -> None:
    (sr_path,) = case.paths["sr"]
    sr = read_sr(sr_path)
    f = case.findings
    assert sr.template == "1500"
    assert sr.device_name == "hpb-test-model 0.0-test"
    organs = {
        g.tracking_id: g
        for g in sr.groups
        if g.finding_type and g.tracking_id in ("Liver", "Pancreas", "Gallbladder", "Spleen")
    }
    assert set(organs) == {"Liver", "Pancreas", "Gallbladder", "Spleen"}
    liver = f.organ(Organ.LIVER)
    assert liver is not None and liver.mean_intensity is not None
    vol = organs["Liver"].measurement("Volume")
    assert vol is not None and vol.value == pytest.approx(liver.volume_ml)
    assert vol.unit is not None and vol.unit[0] == "ml"
    mean = organs["Liver"].measurement("Mean Attenuation Coefficient")
    assert mean is not None and mean.value == pytest.approx(liver.mean_intensity)
    assert organs["Liver"].measurement("Standard Deviation of Attenuation Coefficient")

    (seg_path,) = case.paths["seg"]
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    volumetric = [
        g for g in sr.groups if g.referenced_segment and g.tracking_id.startswith("Lesion")
    ]
    planar = [g for g in sr.groups if g.is_planar]
    assert len(volumetric) == len(planar) == len(f.lesions) == 2
    for les, vg, pg in zip(f.lesions, volumetric, planar, strict=True):
        assert vg.tracking_uid == pg.tracking_uid  # same lesion, same tracking UID
        assert vg.referenced_segment is not None
        assert vg.referenced_segment[0] == seg.SOPInstanceUID
        seg_item = seg.SegmentSequence[vg.referenced_segment[1] - 1]
        assert seg_item.TrackingUID == vg.tracking_uid
        sites = [s[0] for s in vg.finding_sites]
        assert sites[0] == "10200004"  # liver
        assert sites[1] in ("277961009", "277958008")  # Couinaud VII / IV
        # the axes are measured on the key slice: in the planar group only
        assert vg.measurement("Long Axis") is None and vg.measurement("Short Axis") is None
        vol = vg.measurement("Volume")
        assert vol is not None and vol.value == pytest.approx(les.volume_ml)
        ((name, centroid),) = vg.scoord3d
        assert name[0] == "128138"
        assert np.allclose(centroid.points[0], les.centroid_lps, atol=1e-3)
        # planar group: both axes as 2-point polylines on the key-slice source image
        key_uid = f.provenance.input_sop_uids[les.key_slice]
        for axis_name, axis in (("Long Axis", les.long_axis), ("Short Axis", les.short_axis)):
            m = pg.measurement(axis_name)
            assert m is not None and m.value == pytest.approx(axis.length_mm)
            (sc,) = m.scoords
            assert sc.graphic_type == "POLYLINE" and sc.points.shape == (2, 2)
            assert sc.referenced_sop_uid == key_uid
            assert np.allclose(sc.points[0], [axis.start[2] + 0.5, axis.start[1] + 0.5])
        assert pg.regions and pg.regions[0].referenced_sop_uid == key_uid
        assert np.array_equal(pg.regions[0].points[0], pg.regions[0].points[-1])  # closed

    # OHIF order: each lesion's planar group, then its volumetric group, then the organs
    order = [g.tracking_id for g in sr.groups]
    assert order[:4] == [
        planar[0].tracking_id,
        volumetric[0].tracking_id,
        planar[1].tracking_id,
        volumetric[1].tracking_id,
    ]
    assert order[4:] == ["Liver", "Pancreas", "Gallbladder", "Spleen"]
    # every organ group has a 2-D centre-of-mass point on a slice holding the organ
    for organ in f.organs:
        ((name, point),) = organs[codes.ORGANS[organ.organ].label].points
        k = f.provenance.input_sop_uids.index(point.referenced_sop_uid)
        voxels = np.argwhere(organ.mask)
        assert name[0] == "128138" and organ.mask[k].any()
        assert abs(k - voxels[:, 0].mean()) < 1.5
        # (column, row) of the centre of mass, pixel centres at +0.5
        assert np.allclose(point.points[0], voxels[:, [2, 1]].mean(axis=0) + 0.5, atol=1e-3)

    # no other measurement groups: diagnoses and clinical inputs are report-level
    assert len(sr.groups) == 2 * len(f.lesions) + len(f.organs)
    dx = {e.value[2]: e for e in sr.evaluations if e.name[0] == "439401001"}
    assert set(dx) == {"Hepatocellular carcinoma", "Cyst of liver", "Cirrhosis of liver"}
    prob = dx["Hepatocellular carcinoma"].measurement("Probability")
    assert prob is not None and prob.value == pytest.approx(0.62)
    assert dx["Hepatocellular carcinoma"].value[:2] == ("25370001", "SCT")

    clinical = sr.clinical_inputs
    assert clinical is not None
    afp = next(m for m in clinical.measurements if m.name[0] == "1834-1")
    assert afp.name[1] == "LN" and afp.value == 85.0 and afp.unit is not None
    assert afp.unit[:2] == ("ng/mL", "UCUM")
    missing = {name[2]: value[0] for name, value in clinical.evaluations}
    assert set(missing.values()) == {"261665006"} and len(missing) == 2

    assert MARK in sr.findings_text and "Lesion 1" in sr.findings_text
    assert "hepatocellular carcinoma" in sr.impression_text


def test_seg_segments_have_distinct_colours(case: Case) -> None:
    """Liver, pancreas and spleen are three near-identical greens in the TotalSegmentator
    mapping; the SEG gives every segment a colour a viewer shows apart (CIEDE2000 >= 15)."""
    from skimage.color import deltaE_ciede2000

    (seg_path,) = case.paths["seg"]
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    lab = {
        str(s.SegmentLabel): np.array(
            [
                int(s.RecommendedDisplayCIELabValue[0]) / 65535 * 100,
                int(s.RecommendedDisplayCIELabValue[1]) / 65535 * 255 - 128,
                int(s.RecommendedDisplayCIELabValue[2]) / 65535 * 255 - 128,
            ]
        )
        for s in seg.SegmentSequence
    }
    assert len(lab) == 6
    close = [
        (a, b)
        for i, a in enumerate(lab)
        for b in list(lab)[i + 1 :]
        if float(deltaE_ciede2000(lab[a], lab[b])) < 15
    ]
    assert close == []


def test_seg_reads_back_on_source_grid(case: Case) -> None:
    (seg_path,) = case.paths["seg"]
    got = read_seg(seg_path, list(case.findings.provenance.input_sop_uids))
    for organ in case.findings.organs:
        info = got.segment(organ.organ.value.capitalize())
        assert np.array_equal(got.masks[info.number], organ.mask)


def test_references_and_uids_are_consistent(case: Case) -> None:
    kinds = {kind: ds for kind, ds in case.objects if kind != "sc"}
    scs = [ds for kind, ds in case.objects if kind == "sc"]
    src = case.sources[0]
    series = {str(ds.SeriesInstanceUID) for _, ds in case.objects}
    assert len(series) == 5 and str(src.SeriesInstanceUID) not in series  # one per kind
    for _, ds in case.objects:
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.PatientID == src.PatientID and ds.PatientName == src.PatientName
        assert ds.AccessionNumber == src.AccessionNumber
        assert MARK in ds.SeriesDescription
    p = case.findings.provenance
    assert kinds["seg"].SeriesInstanceUID == output_uid(p.input_series_uid, "0.1.0-test", "seg")
    # SR evidence names the SEG and the source images
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in kinds["sr"].CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert str(kinds["seg"].SOPInstanceUID) in evidence
    assert set(p.input_sop_uids) <= evidence
    # PDF points at the SR; KO lists key slices and SC images; SC references its source
    assert (
        kinds["pdf"].SourceInstanceSequence[0].ReferencedSOPInstanceUID
        == kinds["sr"].SOPInstanceUID
    )
    ko_refs = {
        str(i.ReferencedSOPInstanceUID)
        for s in kinds["ko"].CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    key_uids = {p.input_sop_uids[les.key_slice] for les in case.findings.lesions}
    assert key_uids | {str(sc.SOPInstanceUID) for sc in scs} == ko_refs
    for sc, les in zip(scs, case.findings.lesions, strict=True):
        assert sc.BurnedInAnnotation == "YES"
        assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == p.input_sop_uids[les.key_slice]
        assert sc.PhotometricInterpretation == "RGB"
        # the outline is burned in: lesion colour present in the pixels
        assert (sc.pixel_array.reshape(-1, 3) == [255, 0, 200]).all(axis=1).any() or (
            sc.pixel_array.reshape(-1, 3) == [83, 175, 221]
        ).all(axis=1).any()


def test_uids_are_deterministic(shared_data: Path, case: Case, tmp_path: Path) -> None:
    again = build_case(shared_data, tmp_path / "again")
    assert [str(ds.SOPInstanceUID) for _, ds in again.objects] == [
        str(ds.SOPInstanceUID) for _, ds in case.objects
    ]
    other = build_case(shared_data, tmp_path / "v2", version="0.2.0-test")
    assert not {str(ds.SOPInstanceUID) for _, ds in other.objects} & {
        str(ds.SOPInstanceUID) for _, ds in case.objects
    }
    u = output_uid("1.2.3", "1.0", "seg")
    assert len(u) <= 64 and u == output_uid("1.2.3", "1.0", "seg")
    assert u != output_uid("1.2.3", "1.0", "sr") != output_uid("1.2.3", "1.0", "seg", "x")
    assert all(part == "0" or not part.startswith("0") for part in u.split("."))


def test_pdf_is_one_page_with_thumbnail_and_marking(case: Case) -> None:
    (pdf_path,) = case.paths["pdf"]
    ds = pydicom.dcmread(pdf_path)
    data: bytes = ds.EncapsulatedDocument[: int(ds.EncapsulatedDocumentLength)]
    assert data.startswith(b"%PDF")
    assert b"/Count 1" in data and b"/Subtype /Image" in data
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert MARK in ds.DocumentTitle
    unmarked = build_all(
        case.findings,
        case.sources,
        OutputOptions(
            pipeline_version="0.1.0-test", not_for_clinical_use=False, secondary_capture=False
        ),
    )
    kinds = [k for k, _ in unmarked]
    assert "sc" not in kinds
    assert all(MARK not in str(ds.SeriesDescription) for _, ds in unmarked)


def _pdf_text(pdf: bytes) -> str:
    """The page content of a ReportLab PDF (ASCII85 + Flate streams), decoded."""
    import base64
    import re
    import zlib

    out = []
    for raw in re.findall(rb"stream\r?\n(.*?)endstream", pdf, re.S):
        try:
            out.append(zlib.decompress(base64.a85decode(raw.strip(), adobe=True)).decode("latin-1"))
        except ValueError:
            continue  # an image stream
    return "\n".join(out)


def test_pdf_and_sr_state_the_contrast_phase(case: Case) -> None:
    from dicom_sr.report_pdf import render_pdf

    f = case.findings
    src = case.sources[0]
    options = OutputOptions(pipeline_version="0.1.0-test")
    text = _pdf_text(render_pdf(f, src, options))
    assert f"Series: {src.SeriesDescription}; contrast phase unknown" in text
    note = "contrast phase arterial: estimated from portal/splenic vein 95 HU, spleen 110 HU"
    named = dataclasses.replace(f, provenance=dataclasses.replace(f.provenance, notes=(note,)))
    text = _pdf_text(render_pdf(named, src, options))
    assert "contrast phase arterial: estimated from portal/splenic vein 95 HU" in text
    # the SR carries the same statement (a TEXT item under Qualitative Evaluations)
    (sr_path,) = case.paths["sr"]
    assert read_sr(sr_path).texts[codes.CONTRAST_PHASE.meaning] == "contrast phase unknown"
    objects = dict(build_all(named, case.sources, options))
    assert read_sr(objects["sr"]).texts[codes.CONTRAST_PHASE.meaning] == note


def test_findings_without_voxels_still_give_a_pdf(case: Case) -> None:
    f = case.findings
    empty: Any = dataclasses.replace(
        f,
        organs=tuple(dataclasses.replace(o, mask=np.zeros_like(o.mask)) for o in f.organs),
        lesions=(),
        report=tuple(s for s in f.report if all(i.startswith("organ") for i in s.finding_ids)),
        diagnoses=(),
    )
    kinds = [k for k, _ in build_all(empty, case.sources, OutputOptions(pipeline_version="1"))]
    assert kinds == ["pdf"]


def _dciodvfy_clean(objects: list[tuple[str, Dataset]], out: Path) -> None:
    for i, (kind, ds) in enumerate(objects):
        p = out / f"{i:02d}_{kind}.dcm"
        ds.save_as(p, enforce_file_format=True)
        errors = [line for line in _run("dciodvfy", str(p)).splitlines() if "Error" in line]
        assert errors == [], f"{kind}: {errors}"


def test_mr_outputs(shared_data: Path, tmp_path: Path) -> None:
    d = shared_data / "mr_abdomen_3mm"
    mr, aff = load_nifti_krc(d / "mr.nii.gz")
    labels, _ = load_nifti_krc(d / "labels.nii.gz")
    liver = labels == 5
    idx = np.argwhere(liver)
    lesion = sphere(mr.shape, idx[len(idx) // 2], 2.5) & liver
    paths = write_series(mr.astype(np.float64), aff, tmp_path / "mr", modality="MR", seed="mr-out")
    dss = [pydicom.dcmread(p) for p in paths]
    findings = findings_from_masks(
        {Organ.LIVER: liver, Organ.SPLEEN: labels == 1},
        [(Organ.LIVER, LesionKind.NODULE, lesion, SubSite.COUINAUD_VIII)],
        aff,
        [str(ds.SOPInstanceUID) for ds in dss],
        str(dss[0].SeriesInstanceUID),
        image=mr,
    )
    objects = build_all(findings, dss, OutputOptions(pipeline_version="mr-test"))
    assert [k for k, _ in objects] == ["seg", "sr", "pdf", "sc", "ko"]
    _dciodvfy_clean(objects, tmp_path)
    sr = read_sr(objects[1][1])
    liver_group = next(g for g in sr.groups if g.tracking_id == "Liver")
    signal = [m for m in liver_group.measurements if m.name[2] == "Mean signal intensity"]
    assert [m.derivation[2] for m in signal if m.derivation] == ["Mean", "Standard Deviation"]
    assert liver_group.measurement("Mean Attenuation Coefficient") is None  # no HU on MR


def test_enhanced_source_outputs(shared_data: Path, tmp_path: Path) -> None:
    import highdicom as hd

    d = shared_data / "ct_abdomen_3mm"
    ct, aff = load_nifti_krc(d / "ct.nii.gz")
    ct, aff = ct[80:105], aff.copy()
    aff[:3, 3] = aff[:3, 3] + 80 * aff[:3, 0]
    liver_full, _ = load_nifti_krc(d / "labels" / "liver.nii.gz")
    liver = liver_full[80:105] > 0
    idx = np.argwhere(liver)
    lesion = sphere(ct.shape, idx[len(idx) // 2], 3) & liver
    dss = [pydicom.dcmread(p) for p in write_series(ct, aff, tmp_path / "ct", seed="enh-out")]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        dss,
        series_instance_uid=hd.UID(),
        series_number=7,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    frame_of = {
        tuple(round(float(v), 3) for v in it.PlanePositionSequence[0].ImagePositionPatient): i
        for i, it in enumerate(enhanced.PerFrameFunctionalGroupsSequence, start=1)
    }
    frames = [frame_of[tuple(round(float(v), 3) for v in ds.ImagePositionPatient)] for ds in dss]
    findings = findings_from_masks(
        {Organ.LIVER: liver},
        [(Organ.LIVER, LesionKind.MASS, lesion, None)],
        aff,
        [str(enhanced.SOPInstanceUID)] * len(dss),
        str(enhanced.SeriesInstanceUID),
        image=ct,
    )
    objects = build_all(
        findings, [enhanced], OutputOptions(pipeline_version="enh"), frame_numbers=frames
    )
    _dciodvfy_clean(objects, tmp_path)
    sr = read_sr(objects[1][1])
    (planar,) = [g for g in sr.groups if g.is_planar]
    key_frame = frames[findings.lesions[0].key_slice]
    la = planar.measurement("Long Axis")
    assert la is not None and la.scoords[0].referenced_frames == (key_frame,)
    sc = next(ds for kind, ds in objects if kind == "sc")
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == key_frame


def test_readback_matches_findings(case: Case) -> None:
    (sr_path,) = case.paths["sr"]
    rb = readback(read_sr(sr_path))
    f = case.findings
    assert set(rb.organs) == {"Liver", "Pancreas", "Gallbladder", "Spleen"}
    for organ in f.organs:
        got = rb.organs[organ.organ.value.capitalize()]
        assert got.volume_ml == pytest.approx(organ.volume_ml)
        assert got.mean == pytest.approx(organ.mean_intensity)
        assert got.sd == pytest.approx(organ.std_intensity)
    assert len(rb.lesions) == len(f.lesions)
    for got, les in zip(rb.lesions, f.lesions, strict=True):
        assert got.volume_ml == pytest.approx(les.volume_ml)
        assert got.long_axis_mm == pytest.approx(les.long_axis.length_mm)
        assert got.short_axis_mm == pytest.approx(les.short_axis.length_mm)
        assert got.centroid_lps == pytest.approx(les.centroid_lps, abs=1e-3)
        assert got.key_sop_uid == f.provenance.input_sop_uids[les.key_slice]
        assert got.long_axis_xy is not None and got.long_axis_xy.shape == (2, 2)
    assert rb.diagnoses == pytest.approx({"25370001": 0.62, "85057007": 0.3, "19943007": 0.08})
    assert rb.clinical_used == {"1834-1": (85.0, "ng/mL"), "1751-7": (3.1, "g/dL")}
    assert len(rb.clinical_missing) == 2
    assert "Lesion 2" in rb.findings_text


def test_readback_of_another_tools_sr(shared_data: Path) -> None:
    rb = readback(read_sr(shared_data / "interop" / "tid1500" / "dcmqi_liver_result.dcm"))
    (organ,) = rb.organs.values()
    assert organ.volume_ml == pytest.approx(70.36, abs=0.01)
    assert organ.mean == pytest.approx(37.33, abs=0.01)


def test_invalid_numbers_are_refused_with_build_error(case: Case) -> None:
    from dicom_sr import BuildError, build_sr

    f = case.findings
    broken = dataclasses.replace(
        f, lesions=(dataclasses.replace(f.lesions[0], volume_ml=float("nan")), *f.lesions[1:])
    )
    seg = next(ds for kind, ds in case.objects if kind == "seg")
    with pytest.raises(BuildError, match=r"SR could not be built: .*non-finite"):
        build_sr(broken, case.sources, seg)
    with pytest.raises(BuildError, match="pipeline_version"):
        OutputOptions(pipeline_version=" ")


@pytest.mark.parametrize("only", ["organ", "lesion"])
def test_single_segment_seg_gets_its_sr(shared_data: Path, tmp_path: Path, only: str) -> None:
    # highdicom writes Segment Identification in the shared functional groups when
    # a SEG has one segment; the SR's referenced segment must still find its frames.
    d = shared_data / "ct_abdomen_3mm"
    ct, aff = load_nifti_krc(d / "ct.nii.gz")
    liver = load_nifti_krc(d / "labels" / "liver.nii.gz")[0] > 0
    k0 = int(np.argwhere(liver)[:, 0].mean()) - 4
    ct, liver = ct[k0 : k0 + 8], liver[k0 : k0 + 8]  # 8 slices through the liver
    aff = aff.copy()
    aff[:3, 3] += aff[:3, 0] * k0
    idx = np.argwhere(liver)
    lesion = sphere(ct.shape, idx[len(idx) // 2], 2.5) & liver
    dss = [pydicom.dcmread(p) for p in write_series(ct, aff, tmp_path / "ct", seed=only)]
    findings = findings_from_masks(
        {Organ.LIVER: liver} if only == "organ" else {},
        [(Organ.LIVER, LesionKind.MASS, lesion, None)] if only == "lesion" else [],
        aff,
        [str(ds.SOPInstanceUID) for ds in dss],
        str(dss[0].SeriesInstanceUID),
        image=ct,
        diagnoses=[(Disease.HCC, 0.4)],
    )
    objects = build_all(findings, dss, OutputOptions(pipeline_version="one"))
    seg = objects[0][1]
    assert [kind for kind, _ in objects[:2]] == ["seg", "sr"]
    assert len(seg.SegmentSequence) == 1
    assert "SegmentIdentificationSequence" not in seg.PerFrameFunctionalGroupsSequence[0]
    _dciodvfy_clean(objects, tmp_path)
    sr = read_sr(objects[1][1])
    (volumetric,) = [g for g in sr.groups if g.referenced_segment]
    assert volumetric.referenced_segment == (str(seg.SOPInstanceUID), 1)
    mask = liver if only == "organ" else lesion
    (container,) = [
        c
        for c in objects[1][1].ContentSequence
        if c.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    sources = {  # TID 1411 "Source image for segmentation" items
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for g in container.ContentSequence
        for i in g.ContentSequence
        if i.ValueType == "IMAGE" and i.ConceptNameCodeSequence[0].CodeValue == "121233"
    }
    on_slices = {str(dss[k].SOPInstanceUID) for k in np.unique(np.argwhere(mask)[:, 0])}
    assert sources == on_slices  # the source images of the segment's frames
    assert readback(sr).diagnoses == {"25370001": pytest.approx(0.4)}


# dicom3tools 2022 knows only Segmentation Storage as a segmentation, so it
# objects to Referenced Segment Number on a reference to a Label Map
# Segmentation (2024), which the Image Reference Macro requires for any
# segmentation (docs/dicom-outputs.md).
LABELMAP_SR_REFERENCE = (
    "Error - Shall not be present for Referenced SOP Class that is not segmentation - "
    "attribute <ReferencedSegmentNumber>"
)


def test_sr_referencing_a_labelmap_seg(case: Case, tmp_path: Path) -> None:
    from tests.test_dicom_sr_seg import (
        LABELMAP_SOP_CLASS,
        SEGMENTATION_SOP_CLASS,
        dciodvfy_errors,
    )

    options = OutputOptions(pipeline_version="lm", labelmap=True)
    objects = dict(build_all(case.findings, case.sources, options)[:2])
    seg, sr = objects["seg"], objects["sr"]
    assert seg.SOPClassUID == LABELMAP_SOP_CLASS
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    assert dciodvfy_errors(seg_path) == []

    read = read_sr(sr_path)
    refs = [g.referenced_segment for g in read.groups if g.referenced_segment]
    numbers = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert len(refs) == len(case.findings.organs) + len(case.findings.lesions)
    assert {n for _, n in refs} == set(numbers) - {0}  # every segment but the background
    errors = [line for line in _run("dciodvfy", str(sr_path)).splitlines() if "Error" in line]
    assert errors == [LABELMAP_SR_REFERENCE] * len(refs)

    # the same SR referencing the SEG as a Segmentation Storage instance is clean
    def swap(ds: Dataset, elem: Any) -> None:
        if elem.keyword == "ReferencedSOPClassUID" and elem.value == LABELMAP_SOP_CLASS:
            elem.value = SEGMENTATION_SOP_CLASS

    sr.walk(swap)
    sr.save_as(sr_path, enforce_file_format=True)
    assert [line for line in _run("dciodvfy", str(sr_path)).splitlines() if "Error" in line] == []
