"""Every file in the shared interop set is read correctly or refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_sr import ReadError, UnsupportedObjectError, read_seg, read_sr
from dicom_sr.readers import SegRead, SrRead, read_any

# file -> expected outcome: "seg", "sr", or the start of the refusal reason
EXPECTED = {
    "dcmqi/partial_overlaps.dcm": "seg",
    "dcmqi/rwvm.dcm": "neither a SEG nor a TID 1500 SR",
    "dcmqi/seg.dcm": "seg",
    "dcmqi/sparse-labelmap-ppv5.dcm": "seg",
    "dcmqi/sr.dcm": "sr",
    "highdicom/ct_image.dcm": "neither a SEG nor a TID 1500 SR",
    "highdicom/seg_image_ct_binary.dcm": "seg",
    "highdicom/seg_image_ct_binary_fractional.dcm": "seg",
    "highdicom/seg_image_ct_binary_overlap.dcm": "seg",
    "highdicom/seg_image_ct_binary_single_frame.dcm": "seg",
    "highdicom/seg_image_ct_true_fractional.dcm": "seg",
    "highdicom/seg_image_sm_control_labelmap.dcm": "tiled (whole-slide microscopy) SEG",
    "highdicom/sr_document.dcm": "sr",
    "highdicom/sr_document_with_multiple_groups.dcm": "sr",
    "pydicom_data/liver.dcm": "seg",
    "pydicom_data/liver_deflate.dcm": "transfer syntax 1.2.840.10008.1.2.8.1",
    "pydicom_data/liver_expb.dcm": "seg",
    "pydicom_data/liver_j2k.dcm": "seg",
    "pydicom_data/liver_nonbyte_aligned.dcm": "seg",
    "pydicom_data/liver_nonbyte_aligned_deflate.dcm": "transfer syntax 1.2.840.10008.1.2.8.1",
    "pydicom_data/liver_nonbyte_aligned_j2k.dcm": "seg",
    "pydicom_data/liver_nonbyte_aligned_rle.dcm": "RLE Lossless SEG with 1-bit pixels",
    "pydicom_data/liver_rle.dcm": "RLE Lossless SEG with 1-bit pixels",
    "syngo/syngo.seg.dcm": "lack SegmentedPropertyCategoryCodeSequence",
    "tid1500/dcmqi_liver_result.dcm": "sr",
    "tid1500/headneck_11_lesions.dcm": "sr",
    "tid1500/pixelmed_tcga_kirc.dcm": "sr",
    "tid1500/rsna2018_liver.dcm": "sr",
}


def test_expected_table_covers_every_interop_file(shared_data: Path) -> None:
    found = {
        str(p.relative_to(shared_data / "interop"))
        for p in (shared_data / "interop").rglob("*.dcm")
    }
    assert found == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_interop_file(shared_data: Path, name: str) -> None:
    path = shared_data / "interop" / name
    outcome = EXPECTED[name]
    if outcome in ("seg", "sr"):
        result = read_any(path)
        if outcome == "seg":
            assert isinstance(result, SegRead)
            assert result.segments and result.masks
            assert all(m.any() for m in result.masks.values())
        else:
            assert isinstance(result, SrRead)
            assert result.groups
            assert all(g.measurements or g.evaluations for g in result.groups)
    else:
        with pytest.raises(UnsupportedObjectError) as info:
            read_any(path)
        assert outcome in str(info.value)
        assert name.split("/")[-1] in str(info.value)  # the message names the file


def test_liver_seg_encodings_agree(shared_data: Path) -> None:
    d = shared_data / "interop" / "pydicom_data"
    ref = read_seg(d / "liver.dcm").masks[1]
    assert int(ref.sum()) == 107098
    for name in ("liver_expb", "liver_j2k"):
        got = read_seg(d / f"{name}.dcm").masks[1]
        assert np.array_equal(got, ref), name
    # 510 x 510 frames: 1-bit frames do not end on byte boundaries
    odd = read_seg(d / "liver_nonbyte_aligned.dcm").masks[1]
    assert odd.shape[1:] == (510, 510) and odd.any()
    assert np.array_equal(read_seg(d / "liver_nonbyte_aligned_j2k.dcm").masks[1], odd)


def test_liver_seg_on_source_grid(shared_data: Path) -> None:
    import pydicom

    d = shared_data / "ct_liver_3slice"
    uids = [
        str(pydicom.dcmread(d / f"0{i}.dcm", stop_before_pixels=True).SOPInstanceUID)
        for i in (1, 2, 3)
    ]
    seg = read_seg(d / "liver_seg.dcm", uids)
    info = seg.segment("Liver")
    assert info.category is not None and info.category[1] in ("SCT", "SRT")
    assert seg.masks[info.number].shape == (3, 512, 512)
    per_slice = seg.masks[info.number].sum(axis=(1, 2))
    assert per_slice.sum() == 107098 and (per_slice > 0).all()


def test_tid1500_values_from_other_tools(shared_data: Path) -> None:
    d = shared_data / "interop" / "tid1500"
    liver = read_sr(d / "dcmqi_liver_result.dcm")
    (group,) = liver.groups
    means = [m for m in group.measurements if m.derivation and m.derivation[2] == "Mean"]
    assert means and means[0].value == pytest.approx(37.33, abs=0.01)
    vols = [
        m
        for m in group.measurements
        if m.name[2].lower().startswith("volume") and m.unit and m.unit[0] == "cm3"
    ]
    assert vols and vols[0].value == pytest.approx(70.36, abs=0.01)
    assert group.referenced_segment is not None
    assert len(read_sr(d / "headneck_11_lesions.dcm").groups) == 11
    pixelmed = read_sr(d / "pixelmed_tcga_kirc.dcm")
    assert any(m.scoords for g in pixelmed.groups for m in g.measurements) or any(
        g.regions for g in pixelmed.groups
    )


def test_clear_errors_for_missing_and_non_dicom(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="file not found"):
        read_seg(tmp_path / "nope.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not dicom" * 20)
    with pytest.raises(ReadError, match=r"junk\.dcm"):
        read_sr(junk)
