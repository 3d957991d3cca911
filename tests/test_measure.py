"""Measurements on hand-made masks with known answers, and on real CT labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from models.measure import (
    ArrayGrid,
    LesionEdge,
    MeasureError,
    lesion_instances,
    measure_lesion,
    measure_lesions,
    measure_organ,
    slice_diameters,
)
from models.nifti import load_nifti_krc
from models.vocab import LesionKind, Organ


def _affine(spacing: tuple[float, float, float]) -> npt.NDArray[np.float64]:
    a = np.eye(4)
    a[0, 0], a[1, 1], a[2, 2] = spacing
    a[:3, 3] = (10.0, -20.0, 30.0)
    return a


def _ellipse(
    shape: tuple[int, int],
    centre: tuple[float, float],
    semi_mm: tuple[float, float],
    pixel_mm: tuple[float, float],
    angle: float = 0.0,
) -> npt.NDArray[np.bool_]:
    """Pixels whose centre (in mm) lies inside an ellipse with semi-axes (a along
    rows rotated by ``angle``, b perpendicular)."""
    r, c = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    y = (r - centre[0]) * pixel_mm[0]
    x = (c - centre[1]) * pixel_mm[1]
    u = y * np.cos(angle) + x * np.sin(angle)
    v = -y * np.sin(angle) + x * np.cos(angle)
    out: npt.NDArray[np.bool_] = (u / semi_mm[0]) ** 2 + (v / semi_mm[1]) ** 2 <= 1.0
    return out


def test_disc_diameter_isotropic() -> None:
    disc = _ellipse((200, 200), (100, 100), (20.0, 20.0), (0.5, 0.5))
    d = slice_diameters(disc, _affine((2.0, 0.5, 0.5)))
    assert d.long_mm == pytest.approx(40.0, abs=0.6)
    assert d.short_mm == pytest.approx(40.0, abs=0.8)


def test_ellipse_axes_rotated() -> None:
    ell = _ellipse((200, 200), (100, 100), (30.0, 12.0), (0.5, 0.5), angle=np.pi / 6)
    d = slice_diameters(ell, _affine((2.0, 0.5, 0.5)))
    assert d.long_mm == pytest.approx(60.0, abs=0.8)
    assert d.short_mm == pytest.approx(24.0, abs=0.8)
    # the long axis runs along the rotated major axis (30 degrees from rows)
    (r1, c1), (r2, c2) = d.long_rc
    angle = np.arctan2(abs(c2 - c1), abs(r2 - r1))
    assert angle == pytest.approx(np.pi / 6, abs=0.05)
    # the short axis is perpendicular to the long axis
    (s1, t1), (s2, t2) = d.short_rc
    dot = (r2 - r1) * (s2 - s1) + (c2 - c1) * (t2 - t1)
    assert abs(dot) / (np.hypot(r2 - r1, c2 - c1) * np.hypot(s2 - s1, t2 - t1)) < 0.05


def test_anisotropic_pixels() -> None:
    # a 40 mm disc on 0.5 mm rows x 1.0 mm columns: 80 rows tall, 40 columns wide
    disc = _ellipse((120, 80), (60, 40), (20.0, 20.0), (0.5, 1.0))
    d = slice_diameters(disc, _affine((3.0, 0.5, 1.0)))
    assert d.long_mm == pytest.approx(40.0, abs=1.1)
    assert d.short_mm == pytest.approx(40.0, abs=1.5)
    # a 60 x 20 mm ellipse whose long axis runs along columns (1 mm pixels)
    ell = _ellipse((120, 120), (60, 60), (10.0, 30.0), (0.5, 1.0))
    d = slice_diameters(ell, _affine((3.0, 0.5, 1.0)))
    assert d.long_mm == pytest.approx(60.0, abs=1.1)
    assert d.short_mm == pytest.approx(20.0, abs=1.1)
    (r1, c1), (r2, c2) = d.long_rc
    assert abs(c2 - c1) > 50 and abs(r2 - r1) < 3


def test_oblique_grid_uses_affine() -> None:
    # rotate the in-plane axes by 40 degrees about the slice normal: lengths unchanged
    rot = np.eye(4)
    th = np.deg2rad(40)
    rot[:3, :3] = [[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]]
    affine = rot @ _affine((2.5, 0.8, 0.8))
    disc = _ellipse((100, 100), (50, 50), (15.0, 15.0), (0.8, 0.8))
    d = slice_diameters(disc, affine)
    assert d.long_mm == pytest.approx(30.0, abs=1.0)


def _liver_and_pancreas() -> tuple[
    tuple[int, int, int],
    npt.NDArray[np.float64],
    npt.NDArray[np.float32],
    npt.NDArray[np.bool_],
    npt.NDArray[np.bool_],
]:
    """A 20 x 100 x 100 grid (2 x 1 x 1 mm): image at 60, a liver block and a pancreas block."""
    shape = (20, 100, 100)
    image = np.full(shape, 60.0, dtype=np.float32)
    liver = np.zeros(shape, dtype=bool)
    liver[:, 10:90, 10:60] = True
    pancreas = np.zeros(shape, dtype=bool)
    pancreas[:, 40:80, 62:95] = True
    return shape, _affine((2.0, 1.0, 1.0)), image, liver, pancreas


def test_measure_lesions_instances_key_slice_and_organ() -> None:
    shape, affine, image, liver, pancreas = _liver_and_pancreas()
    lesions = np.zeros(shape, dtype=bool)
    # a sphere of radius ~8 mm in the liver, centred on slice 10
    kk, rr, cc = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float64)
    sphere = ((kk - 10) * 2.0) ** 2 + (rr - 40) ** 2 + (cc - 35) ** 2 <= 8.0**2
    lesions |= sphere
    image[sphere] = 5.0  # cyst-like
    # a small cube in the pancreas
    lesions[4:7, 60:66, 75:81] = True
    found = measure_lesions(
        ArrayGrid(image, affine),
        lesions,
        {Organ.LIVER: liver, Organ.PANCREAS: pancreas},
        modality="CT",
    )
    assert len(found) == 2
    big, small = found
    assert big.number == 1 and small.number == 2
    assert big.organ == Organ.LIVER and small.organ == Organ.PANCREAS
    assert big.key_slice == 10
    assert big.long_axis.length_mm == pytest.approx(17.0, abs=1.5)
    assert big.kind == LesionKind.CYST and small.kind == LesionKind.MASS
    assert big.sub_site is not None and big.sub_site.value.startswith("couinaud_")
    assert small.sub_site is not None and small.sub_site.value.startswith("pancreas_")
    assert big.mean_intensity == pytest.approx(5.0)
    assert big.volume_ml == pytest.approx(int(sphere.sum()) * 2.0 / 1000)
    # centroid in LPS: index (10, 40, 35) through the affine
    assert big.centroid_lps == pytest.approx((10.0 + 20.0, -20.0 + 40.0, 30.0 + 35.0), abs=0.05)
    assert small.long_axis.length_mm == pytest.approx(np.hypot(6, 6), abs=0.8)
    assert all(p[0] == big.key_slice for p in big.outline)
    assert len(big.outline) > 10


def test_integer_instances_keep_numbers_and_min_size() -> None:
    inst = np.zeros((5, 20, 20), dtype=np.int16)
    inst[2, 2:6, 2:6] = 3
    inst[2, 10:11, 10:11] = 7
    out = lesion_instances(inst, min_voxels=2)
    assert set(np.unique(out)) == {0, 3}
    grid = ArrayGrid(np.zeros(inst.shape, np.float32), _affine((1.0, 1.0, 1.0)))
    found = measure_lesions(grid, inst, {}, min_voxels=2, modality="MR")
    assert [f.number for f in found] == [3]
    assert found[0].organ == Organ.LIVER  # default when no organ masks


def test_lesion_outside_organs_goes_to_touching_organ() -> None:
    shape = (6, 40, 40)
    liver = np.zeros(shape, dtype=bool)
    liver[:, :, :20] = True
    spleen = np.zeros(shape, dtype=bool)
    spleen[:, :, 35:] = True
    lesion = np.zeros(shape, dtype=bool)
    lesion[2:4, 10:14, 21:24] = True  # one voxel right of the liver, not inside it
    grid = ArrayGrid(np.zeros(shape, np.float32), _affine((1.0, 1.0, 1.0)))
    (found,) = measure_lesions(grid, lesion, {Organ.LIVER: liver, Organ.SPLEEN: spleen})
    assert found.organ == Organ.LIVER


def test_shape_mismatch_is_refused() -> None:
    grid = ArrayGrid(np.zeros((4, 8, 8), np.float32), _affine((1.0, 1.0, 1.0)))
    with pytest.raises(MeasureError, match="shape"):
        measure_organ(grid, np.zeros((4, 8, 9), bool), Organ.LIVER)


def test_real_ct_liver_volume(shared_data: Path) -> None:
    ct, affine = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "ct.nii.gz")
    liver, affine_l = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "labels" / "liver.nii.gz")
    np.testing.assert_allclose(affine, affine_l)
    f = measure_organ(ArrayGrid(ct.astype(np.float32), affine), liver > 0, Organ.LIVER)
    assert int(f.mask.sum()) == 41602
    assert f.volume_ml == pytest.approx(41602 * 27 / 1000, rel=1e-3)
    assert f.mean_intensity is not None and 20.0 < f.mean_intensity < 90.0  # non-contrast liver HU


def _partial_volume_sphere(radius_mm: float, sub: int = 5) -> npt.NDArray[np.float32]:
    """A 90 HU sphere in 50 HU tissue on 4 x 2.5 x 2.5 mm voxels, each voxel the mean
    over ``sub``^3 points (partial volume), centred off the voxel grid."""
    k, r, c = np.meshgrid(np.arange(9), np.arange(40), np.arange(40), indexing="ij")
    inside = np.zeros(k.shape)
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    for a in offsets:
        for b in offsets:
            for d in offsets:
                dist = np.sqrt(
                    ((k + a - 4) * 4.0) ** 2
                    + ((r + b - 20.3) * 2.5) ** 2
                    + ((c + d - 19.6) * 2.5) ** 2
                )
                inside += dist <= radius_mm
    return (50.0 + 40.0 * inside / sub**3).astype(np.float32)


@pytest.mark.parametrize("radius_mm", [5.3, 6.9, 11.2])
def test_edge_contour_measures_between_voxels(radius_mm: float) -> None:
    image = _partial_volume_sphere(radius_mm)
    grid = ArrayGrid(image, _affine((4.0, 2.5, 2.5)))
    mask = image >= 70.0
    true_mm = 2 * radius_mm
    on_mask = measure_lesion(grid, mask, 1, Organ.LIVER, LesionKind.MASS)
    edge = LesionEdge(level=70.0, outside=50.0)
    on_edge = measure_lesion(grid, mask, 1, Organ.LIVER, LesionKind.MASS, edge=edge)
    assert abs(on_edge.long_axis.length_mm - true_mm) <= 0.4
    assert abs(on_edge.long_axis.length_mm - true_mm) < abs(on_mask.long_axis.length_mm - true_mm)
    assert abs(on_edge.short_axis.length_mm - true_mm) <= 1.0  # slice thickness blurs it
    assert on_edge.key_slice == 4
    # the same through measure_lesions, by lesion number
    (via,) = measure_lesions(grid, mask.astype(np.int32), {}, edges={1: edge})
    assert via.long_axis.length_mm == on_edge.long_axis.length_mm


def test_edge_levels_must_differ() -> None:
    with pytest.raises(MeasureError, match="equals the outside"):
        LesionEdge(level=50.0, outside=50.0)


def test_measure_lesions_builds_each_organ_frame_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three liver lesions and one pancreatic: the liver's and the pancreas's frames are
    built once each (reading every organ voxel per lesion had taken about a third of
    the node's inference time), and the sub-sites are those of the one-lesion call."""
    import models.anatomy as anatomy
    from models.measure import anatomical_sub_site

    shape, affine, image, liver, pancreas = _liver_and_pancreas()
    lesions = np.zeros(shape, dtype=np.int32)
    lesions[8:12, 15:25, 15:25] = 1
    lesions[8:12, 70:80, 45:55] = 2
    lesions[2:5, 40:46, 30:36] = 3
    lesions[4:7, 60:66, 75:81] = 4
    masks = {Organ.LIVER: liver, Organ.PANCREAS: pancreas}
    alone = [
        anatomical_sub_site(o, lesions == n, masks, affine)
        for n, o in [(1, Organ.LIVER), (2, Organ.LIVER), (3, Organ.LIVER), (4, Organ.PANCREAS)]
    ]
    built: list[str] = []
    for cls in (anatomy.LiverFrame, anatomy.PancreasFrame):
        real = cls.from_mask.__func__  # type: ignore[attr-defined,union-attr]

        def counted(c: type, *a: object, _real: object = real, **k: object) -> object:
            built.append(c.__name__)
            return _real(c, *a, **k)  # type: ignore[operator]

        monkeypatch.setattr(cls, "from_mask", classmethod(counted))
    found = measure_lesions(ArrayGrid(image, affine), lesions, masks, modality="CT")
    assert sorted(built) == ["LiverFrame", "PancreasFrame"]
    assert [f.sub_site for f in found] == alone
    assert alone[0] != alone[1]  # the lesions lie in different segments
    # the organ is found in the lesion's box as in the whole volume
    from scipy import ndimage

    from models.measure import assign_organ

    for n, box in enumerate(ndimage.find_objects(lesions), start=1):
        assert box is not None
        m = lesions == n
        whole = assign_organ(m, masks, Organ.SPLEEN)
        assert assign_organ(m, masks, Organ.SPLEEN, box) == whole == found[n - 1].organ


def test_lesions_are_measured_in_their_boxes_as_over_the_whole_volume() -> None:
    """measure_lesions reads each lesion in its box (whole-volume passes per lesion had
    taken half the node's inference time on 600 slices): volume, centroid, attenuation
    and sub-site are those computed over the whole volume, and an int32 instance map
    is neither copied nor changed."""
    from models.measure import anatomical_sub_site, mask_box

    shape, affine, image, liver, pancreas = _liver_and_pancreas()
    rng = np.random.default_rng(3)
    image = image + rng.normal(0.0, 10.0, shape).astype(np.float32)
    lesions = np.zeros(shape, dtype=np.int32)
    lesions[8:12, 15:25, 15:25] = 1
    lesions[3:6, 60:66, 75:81] = 2
    lesions[14, 30, 30] = 3  # one voxel: dropped by min_voxels below
    masks = {Organ.LIVER: liver, Organ.PANCREAS: pancreas}
    before = lesions.copy()
    assert lesion_instances(lesions) is lesions
    found = measure_lesions(ArrayGrid(image, affine), lesions, masks, modality="CT", min_voxels=2)
    assert np.array_equal(lesions, before)
    assert [f.number for f in found] == [1, 2]
    voxel_ml = 2.0 / 1000.0
    for f, organ in zip(found, (Organ.LIVER, Organ.PANCREAS), strict=True):
        m = lesions == f.number
        assert f.organ == organ
        assert np.array_equal(f.mask, m)
        assert f.volume_ml == pytest.approx(m.sum() * voxel_ml)
        centroid = np.argwhere(m).mean(axis=0) @ affine[:3, :3].T + affine[:3, 3]
        assert f.centroid_lps == pytest.approx(tuple(centroid))
        assert f.mean_intensity == pytest.approx(float(image[m].mean()), rel=1e-6)
        assert f.std_intensity == pytest.approx(float(image[m].std()), rel=1e-5)
        box = mask_box(m)
        assert box is not None
        whole = anatomical_sub_site(organ, m, masks, affine)
        assert anatomical_sub_site(organ, m, masks, affine, box=box) == whole == f.sub_site
        alone = measure_lesion(ArrayGrid(image, affine), m, f.number, organ, f.kind)
        assert alone.long_axis == f.long_axis and alone.short_axis == f.short_axis
    assert mask_box(np.zeros(shape, dtype=bool)) is None
