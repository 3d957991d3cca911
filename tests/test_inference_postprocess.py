"""Declared post-processing (``hpb_node.postprocess``): thresholds below the argmax for the
lesion channel and chosen organs, a seed threshold per lesion component, and the bundle
contract that refuses bad values."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage

from models.bundle import (
    Bundle,
    BundleError,
    FocalSearch,
    LesionRefine,
    PostProcess,
    load_bundle,
)
from models.evaluation.detection import longest_axial_diameter_mm
from models.inference import (
    drop_inconspicuous,
    find_focal_lesions,
    labels_from_probs,
    number_by_size,
    postprocess,
    refine_lesion,
    refine_lesions,
    split_refined_lesions,
)
from models.nifti import load_nifti_krc
from models.vocab import Organ
from tests.test_bundle import make_tiny_bundle

LIVER, GALLBLADDER, PANCREAS, LESION = 1, 2, 3, 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("b") / "tiny"))


def test_argmax_is_the_default(tiny: Bundle) -> None:
    assert tiny.postprocess == PostProcess()
    p = torch.zeros((9, 2, 2, 2))
    p[0] = 0.6
    p[LESION] = 0.4
    p[LESION, 0, 0, 0], p[0, 0, 0, 0] = 0.7, 0.3
    labels = labels_from_probs(p, tiny)
    assert labels[0, 0, 0] == LESION
    assert int((labels == LESION).sum()) == 1


def test_lesion_threshold_below_the_argmax(tiny: Bundle) -> None:
    p = torch.zeros((9, 1, 1, 3))
    p[LIVER] = torch.tensor([0.7, 0.8, 0.45])
    p[LESION] = torch.tensor([0.3, 0.2, 0.55])
    bundle = replace(tiny, postprocess=PostProcess(lesion_threshold=0.25))
    # 0.3 >= 0.25: lesion although the liver wins the argmax; 0.2: liver
    assert labels_from_probs(p, bundle)[0, 0].tolist() == [LESION, LIVER, LESION]
    # a threshold above the argmax: the voxel the argmax called lesion gets its next channel
    bundle = replace(tiny, postprocess=PostProcess(lesion_threshold=0.6))
    assert labels_from_probs(p, bundle)[0, 0].tolist() == [LIVER, LIVER, LIVER]


def test_organ_threshold_only_claims_background(tiny: Bundle) -> None:
    p = torch.zeros((9, 1, 1, 3))
    p[0] = torch.tensor([0.7, 0.9, 0.1])
    p[GALLBLADDER] = torch.tensor([0.3, 0.1, 0.3])
    p[LIVER] = torch.tensor([0.0, 0.0, 0.6])
    bundle = replace(tiny, postprocess=PostProcess(organ_thresholds={"gallbladder": 0.25}))
    # voxel 0: background by argmax, gallbladder 0.3 >= 0.25 -> gallbladder;
    # voxel 1: 0.1 < 0.25 stays background; voxel 2: the liver won the argmax, kept
    assert labels_from_probs(p, bundle)[0, 0].tolist() == [GALLBLADDER, 0, LIVER]
    assert labels_from_probs(p, tiny)[0, 0].tolist() == [0, 0, LIVER]


def test_seed_threshold_drops_lesions_without_a_confident_voxel(tiny: Bundle) -> None:
    lab = np.zeros((20, 40, 40), np.uint8)
    lab[2:18, 2:38, 2:38] = LIVER
    lab[4:8, 4:8, 4:8] = LESION  # confident somewhere: kept
    lab[12:16, 20:24, 20:24] = LESION  # never above 0.4: dropped
    prob = np.zeros(lab.shape, np.float32)
    prob[4:8, 4:8, 4:8] = 0.3
    prob[5, 5, 5] = 0.8
    prob[12:16, 20:24, 20:24] = 0.35
    bundle = replace(tiny, postprocess=PostProcess(lesion_threshold=0.3, lesion_seed_threshold=0.5))
    _, inst, organs, conf = postprocess(lab, prob, bundle, voxel_ml=0.027)
    assert conf[1] == pytest.approx(float(prob[4:8, 4:8, 4:8].mean()))
    assert set(np.unique(inst)) == {0, 1}
    assert inst[5, 5, 5] == 1 and inst[13, 21, 21] == 0
    assert organs == {1: Organ.LIVER}
    _, inst, _, _ = postprocess(lab, prob, tiny, voxel_ml=0.027)
    assert set(np.unique(inst)) == {0, 1, 2}  # without the seed threshold both are kept


def test_fill_holes_puts_enclosed_background_into_the_organ(tiny: Bundle) -> None:
    lab = np.zeros((12, 30, 30), np.uint8)
    lab[2:10, 5:25, 5:25] = GALLBLADDER
    lab[4:8, 10:15, 10:15] = 0  # a stone the network left as background, enclosed in 3-D
    lab[2:10, 18:21, 18:21] = 0  # a channel open at both ends: enclosed only in each slice
    prob = np.zeros(lab.shape, np.float32)
    organ_map, *_ = postprocess(lab, prob, tiny, voxel_ml=0.027)
    assert int((organ_map == GALLBLADDER).sum()) == int((lab == GALLBLADDER).sum())
    bundle = replace(tiny, postprocess=PostProcess(fill_holes=("gallbladder",)))
    organ_map, *_ = postprocess(lab, prob, bundle, voxel_ml=0.027)
    assert (organ_map[2:10, 5:25, 5:25] == GALLBLADDER).all()
    assert int((organ_map == GALLBLADDER).sum()) == 8 * 20 * 20
    # background outside the organ is never claimed
    assert (organ_map[:2] == 0).all() and (organ_map[:, :5] == 0).all()


def _two_touching_spheres() -> tuple[np.ndarray, np.ndarray]:
    lab = np.zeros((20, 40, 60), np.uint8)
    lab[1:19, 1:39, 1:59] = LIVER
    zz, yy, xx = np.mgrid[:20, :40, :60]
    a = (zz - 10) ** 2 + (yy - 20) ** 2 + (xx - 17) ** 2 <= 36
    b = (zz - 10) ** 2 + (yy - 20) ** 2 + (xx - 29) ** 2 <= 36  # centres 12 voxels apart
    bridge = (abs(zz - 10) <= 1) & (abs(yy - 20) <= 1) & (xx >= 17) & (xx <= 29)
    lab[a | b | bridge] = LESION
    prob = np.where(lab == LESION, 0.9, 0.0).astype(np.float32)
    return lab, prob


def test_lesion_split_separates_touching_lesions(tiny: Bundle) -> None:
    lab, prob = _two_touching_spheres()
    _, inst, organs, _ = postprocess(lab, prob, tiny, voxel_ml=0.027)
    assert set(np.unique(inst)) == {0, 1}  # one component without splitting
    bundle = replace(tiny, postprocess=PostProcess(lesion_split_mm=6.0))
    _, inst, organs, _ = postprocess(lab, prob, bundle, voxel_ml=0.027)
    assert set(np.unique(inst)) == {0, 1, 2}
    assert inst[10, 20, 17] != inst[10, 20, 29]
    assert organs == {1: Organ.LIVER, 2: Organ.LIVER}
    # a saddle shallower than the threshold: kept as one lesion
    bundle = replace(tiny, postprocess=PostProcess(lesion_split_mm=30.0))
    _, inst, _, _ = postprocess(lab, prob, bundle, voxel_ml=0.027)
    assert set(np.unique(inst)) == {0, 1}


def _with_post(tmp_path: Path, post: Any) -> Path:
    root = make_tiny_bundle(tmp_path / "b")
    meta_path = root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["hpb_node"]["postprocess"] = post
    meta_path.write_text(json.dumps(meta))
    return root


def test_bundle_reads_declared_postprocess(tmp_path: Path) -> None:
    post = {
        "lesion_threshold": 0.2,
        "lesion_seed_threshold": 0.5,
        "organ_thresholds": {"gallbladder": 0.3},
    }
    bundle = load_bundle(_with_post(tmp_path, post))
    assert bundle.postprocess == PostProcess(0.2, 0.5, {"gallbladder": 0.3})
    assert bundle.postprocess.to_json() == post
    post = {**post, "fill_holes": ["gallbladder", "liver"], "lesion_split_mm": 3.0}
    post["lesion_refine"] = {"grow_voxels": 3, "smooth_voxels": 0.5, "min_contrast": 2.5}
    bundle = load_bundle(_with_post(tmp_path / "2", post))
    assert bundle.postprocess.fill_holes == ("gallbladder", "liver")
    assert bundle.postprocess.lesion_split_mm == 3.0
    assert bundle.postprocess.lesion_refine == LesionRefine(3, 0.5, 2.5)
    assert bundle.postprocess.to_json() == post
    post["lesion_refine"] = {**post["lesion_refine"], "split_mm": 1.5, "split_min_mm": 12.0}
    bundle = load_bundle(_with_post(tmp_path / "3", post))
    assert bundle.postprocess.lesion_refine == LesionRefine(3, 0.5, 2.5, 1.5, 12.0)
    assert bundle.postprocess.to_json() == post
    post["lesion_refine"] = {**post["lesion_refine"], "min_conspicuity": 0.25}
    bundle = load_bundle(_with_post(tmp_path / "4", post))
    assert bundle.postprocess.lesion_refine == LesionRefine(3, 0.5, 2.5, 1.5, 12.0, 0.25)
    assert bundle.postprocess.to_json() == post
    post["lesion_refine"] = {**post["lesion_refine"], "conspicuity_organs": ["liver"]}
    bundle = load_bundle(_with_post(tmp_path / "5", post))
    refine = bundle.postprocess.lesion_refine
    assert refine is not None and refine.conspicuity_organs == ("liver",)
    assert not refine.open_slices
    assert bundle.postprocess.to_json() == post
    post["lesion_refine"] = {**post["lesion_refine"], "open_slices": True}
    bundle = load_bundle(_with_post(tmp_path / "5b", post))
    refine = bundle.postprocess.lesion_refine
    assert refine is not None and refine.open_slices
    assert bundle.postprocess.to_json() == post
    post["focal_search"] = {"organs": ["liver"], "min_z": 5.0, "min_inscribed_mm": 4.0}
    bundle = load_bundle(_with_post(tmp_path / "6", post))
    focal = bundle.postprocess.focal_search
    assert focal == FocalSearch(organs=("liver",), min_z=5.0, min_inscribed_mm=4.0)
    assert bundle.postprocess.to_json()["focal_search"] == focal.to_json()
    again = load_bundle(_with_post(tmp_path / "7", bundle.postprocess.to_json()))
    assert again.postprocess == bundle.postprocess


@pytest.mark.parametrize(
    ("post", "message"),
    [
        ({"lesion_threshold": 1.5}, "lesion_threshold must be a probability"),
        ({"lesion_seed_threshold": 0}, "lesion_seed_threshold must be a probability"),
        ({"organ_thresholds": {"gallbladder": "high"}}, "organ_thresholds.gallbladder"),
        ({"organ_thresholds": {"heart": 0.3}}, "not an organ channel: heart"),
        ({"lesion_threshhold": 0.2}, "unknown field"),
        ({"fill_holes": ["heart"]}, "fill_holes: not an organ channel: heart"),
        ({"fill_holes": "gallbladder"}, "fill_holes must be a list"),
        ({"lesion_split_mm": -1}, "lesion_split_mm must be a positive"),
        ({"lesion_refine": {"grow_voxels": 9}}, "grow_voxels must be an integer 1-5"),
        ({"lesion_refine": {"smooth_voxels": -1}}, "smooth_voxels must be a number >= 0"),
        ({"lesion_refine": {"grow": 2}}, "lesion_refine: unknown field"),
        ({"lesion_refine": {"split_mm": 0}}, "split_mm must be a positive number"),
        ({"lesion_refine": {"split_min_mm": -1}}, "split_min_mm must be a number >= 0"),
        ({"lesion_refine": {"min_conspicuity": 0}}, "min_conspicuity must be a positive"),
        ({"lesion_refine": {"conspicuity_organs": "liver"}}, "conspicuity_organs must be a list"),
        (
            {"lesion_refine": {"conspicuity_organs": ["heart"]}},
            "conspicuity_organs: not an organ channel: heart",
        ),
        ({"lesion_refine": 2}, "lesion_refine must be a JSON object"),
        ({"lesion_refine": {"open_slices": 1}}, "open_slices must be true or false"),
        ({"focal_search": {"organs": ["heart"]}}, "focal_search.organs: not an organ channel"),
        ({"focal_search": {"organs": "liver"}}, "focal_search.organs must be a list"),
        ({"focal_search": {"organs": []}}, "focal_search.organs must be a list"),
        ({"focal_search": {"min_z": 0}}, "focal_search.min_z must be a number > 0"),
        ({"focal_search": {"min_fill": -0.1}}, "focal_search.min_fill must be a number >= 0"),
        ({"focal_search": {"min_zz": 4}}, "focal_search: unknown field"),
        ({"focal_search": "liver"}, "focal_search must be a JSON object"),
        ([0.2], "must be a JSON object"),
    ],
)
def test_bundle_refuses_bad_postprocess(tmp_path: Path, post: Any, message: str) -> None:
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(_with_post(tmp_path, post))
    assert "hpb_node.postprocess" in str(err.value)


# ---------------------------------------------------------------------------
# lesion outlines redrawn on the source grid


AFFINE = np.diag([2.5, 1.0, 1.0, 1.0])  # slices 2.5 mm apart, 1 mm pixels


def _organ_with_lesion(
    contrast: float, radius_mm: float = 8.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A 50 HU organ filling the volume with a sphere of ``50 + contrast`` HU, blurred
    like a scanner, with noise of SD 5 HU; and the true sphere."""
    k, r, c = np.ogrid[:16, :48, :48]
    dist = np.sqrt(((k - 8) * 2.5) ** 2 + (r - 24.0) ** 2 + (c - 24.0) ** 2)
    sphere = dist <= radius_mm
    image = ndimage.gaussian_filter(np.where(sphere, 50.0 + contrast, 50.0), (0.4, 1.0, 1.0))
    image += np.random.default_rng(seed).normal(0.0, 5.0, image.shape)
    return image.astype(np.float32), sphere


def _grown(mask: np.ndarray, voxels: int) -> np.ndarray:
    out: np.ndarray = ndimage.binary_dilation(mask, iterations=voxels)
    return out


@pytest.mark.parametrize("contrast", [-40.0, 60.0])
def test_refine_redraws_a_too_wide_outline_at_half_contrast(contrast: float) -> None:
    image, sphere = _organ_with_lesion(contrast)
    coarse = _grown(sphere, 2)  # the network's outline, two voxels too wide
    inst = coarse.astype(np.int32)
    organ = ~coarse
    true_mm = longest_axial_diameter_mm(sphere, AFFINE)
    assert longest_axial_diameter_mm(coarse, AFFINE) - true_mm >= 3.5
    refined = refine_lesion(image, inst, 1, organ, (2.5, 1.0, 1.0), LesionRefine())
    assert refined is not None
    new, edge = refined
    # the edge lies halfway between the lesion and the organ (50 HU)
    assert abs(edge.level - (50.0 + contrast / 2)) <= abs(contrast) * 0.2
    assert abs(edge.outside - 50.0) <= 3.0
    assert abs(longest_axial_diameter_mm(new, AFFINE) - true_mm) <= 1.5
    overlap = (new & sphere).sum() / (new | sphere).sum()
    assert overlap >= 0.8


def test_refine_keeps_the_outline_where_the_lesion_does_not_show() -> None:
    image, sphere = _organ_with_lesion(2.0)  # 2 HU in noise of SD 5 HU
    inst = _grown(sphere, 1).astype(np.int32)
    organ = inst == 0
    assert refine_lesion(image, inst, 1, organ, (2.5, 1.0, 1.0), LesionRefine()) is None


def test_refine_lesions_moves_voxels_between_lesion_and_organ_only() -> None:
    image, sphere = _organ_with_lesion(-40.0)
    coarse = _grown(sphere, 2)
    inst = coarse.astype(np.int32)
    # a second lesion next to the first keeps every voxel it had
    inst[8, 24, 40:44] = 2
    labels = np.full(inst.shape, LIVER, dtype=np.uint8)
    labels[:, :, 46:] = 0  # outside the organ
    new_inst, new_labels, edges = refine_lesions(
        image, inst, labels, (2.5, 1.0, 1.0), LesionRefine()
    )
    assert set(edges) == {1}  # the image shows no second lesion: it keeps its outline
    assert ((new_inst == 2) == (inst == 2)).all()
    assert (new_inst == 1).sum() < coarse.sum()
    assert ((new_inst == 1) <= (new_labels == LIVER)).all()
    assert (new_labels == labels).all()  # the lesion stayed inside its organ


def test_refine_lesions_in_place_changes_the_arrays_given_and_nothing_else() -> None:
    """``in_place``: the maps given come back changed, with the same result as the
    copying call, which leaves its inputs as they were."""
    image, sphere = _organ_with_lesion(-40.0)
    inst = _grown(sphere, 2).astype(np.int32)
    labels = np.full(inst.shape, LIVER, dtype=np.uint8)
    before = inst.copy(), labels.copy()
    copied = refine_lesions(image, inst, labels, (2.5, 1.0, 1.0), LesionRefine())
    assert (inst == before[0]).all() and (labels == before[1]).all()
    done = refine_lesions(image, inst, labels, (2.5, 1.0, 1.0), LesionRefine(), in_place=True)
    assert done[0] is inst and done[1] is labels
    assert (inst == copied[0]).all() and (labels == copied[1]).all()
    assert not (inst == before[0]).all()
    assert done[2] == copied[2]


def test_refine_never_grows_a_lesion_into_the_fat_beyond_its_organ() -> None:
    image, sphere = _organ_with_lesion(-40.0)  # a 10 HU lesion in 50 HU liver
    labels = np.full(image.shape, LIVER, dtype=np.uint8)
    labels[:, :, 30:] = 0  # beyond the liver's edge: fat, darker than the lesion
    image[:, :, 30:] = -100.0
    # the network's outline, too wide but inside the liver (lesions are folded into it)
    inst = (_grown(sphere, 2) & (labels == LIVER)).astype(np.int32)
    new_inst, new_labels, edges = refine_lesions(
        image, inst, labels, (2.5, 1.0, 1.0), LesionRefine()
    )
    assert set(edges) == {1}
    assert not (new_inst[:, :, 30:] > 0).any()
    assert (new_labels == labels).all()


def test_refine_adds_no_island_that_only_joins_the_lesion_through_another_slice() -> None:
    """A dark voxel outside the lesion on one slice that touches the lesion only through
    a dark voxel on the next slice (partial volume along an organ's edge) is not taken:
    in each slice the outline keeps the pieces that overlap the network's outline."""
    rng = np.random.default_rng(3)
    k, r, c = np.ogrid[:16, :48, :48]
    sphere = ((k - 8) * 2.5) ** 2 + (r - 24.0) ** 2 + (c - 24.0) ** 2 <= 8.0**2
    image = np.where(sphere, 10.0, 50.0) + rng.normal(0.0, 2.0, sphere.shape)
    assert sphere[8, 24, 32] and not sphere[8, 24, 33]  # slice 8 reaches column 32
    assert sphere[9, 24, 31] and not sphere[9, 24, 32]  # slice 9 reaches column 31
    image[8, 24, 33] = 10.0  # touches the lesion in slice 8
    image[9, 24, 33] = 10.0  # touches the lesion only through (8, 24, 33)
    inst = sphere.astype(np.int32)
    params = LesionRefine(grow_voxels=2, smooth_voxels=0.0)
    refined = refine_lesion(image.astype(np.float32), inst, 1, ~sphere, (2.5, 1.0, 1.0), params)
    assert refined is not None
    new = refined[0]
    assert new[8, 24, 33]
    assert not new[9, 24, 33]
    assert (new & sphere).sum() >= 0.95 * sphere.sum()


def test_open_slices_cuts_a_strand_along_the_organs_edge_off_the_outline() -> None:
    """A dark strand two voxels wide that leaves the lesion along the organ's edge
    (partial volume with the fat beyond the capsule) stays in the outline and doubles
    the long axis; with ``open_slices`` it is cut off and the lesion's own outline kept."""
    rng = np.random.default_rng(5)
    k, r, c = np.ogrid[:16, :48, :48]
    sphere = ((k - 8) * 2.5) ** 2 + (r - 24.0) ** 2 + (c - 30.0) ** 2 <= 6.0**2
    strand = np.zeros(sphere.shape, dtype=bool)
    strand[7:10, 6:25, 36:38] = True  # from the lesion's edge up the organ's edge
    dark = sphere | strand
    image = np.where(dark, 10.0, 50.0) + rng.normal(0.0, 2.0, sphere.shape)
    image[:, :, 38:] = -100.0  # fat beyond the organ
    organ = np.ones(sphere.shape, dtype=bool)
    organ[:, :, 38:] = False
    inst = dark.astype(np.int32)  # the network marked the strand too
    true_mm = longest_axial_diameter_mm(sphere, AFFINE)
    for open_slices, longer in ((False, True), (True, False)):
        params = LesionRefine(grow_voxels=2, smooth_voxels=0.0, open_slices=open_slices)
        refined = refine_lesion(
            image.astype(np.float32), inst, 1, organ & ~dark, (2.5, 1.0, 1.0), params
        )
        assert refined is not None
        new = refined[0]
        assert (new & sphere).sum() >= 0.9 * sphere.sum()
        assert (longest_axial_diameter_mm(new, AFFINE) > true_mm + 8.0) is longer
        assert bool(new[8, 8, 36]) is longer  # the strand's far end


SPLIT_SPACING = (2.5, 1.0, 1.0)  # a 20 x 60 x 60 grid


def ball(cr: float, cc: float, radius: float) -> np.ndarray:
    """A ball of ``radius`` mm centred on slice 10, row ``cr``, column ``cc``."""
    k, r, c = np.ogrid[:20, :60, :60]
    out: np.ndarray = ((k - 10) * 2.5) ** 2 + (r - cr) ** 2 + (c - cc) ** 2 <= radius**2
    return out


def test_split_refined_lesions_separates_touching_lesions_only() -> None:
    spacing = SPLIT_SPACING
    inst = np.zeros((20, 60, 60), dtype=np.int32)
    inst[ball(30, 18, 9) | ball(30, 34, 8)] = 1  # two touching lesions in one outline
    inst[ball(8, 50, 5)] = 2  # a lesion on its own
    out, parent = split_refined_lesions(inst, spacing, 1.5, 12.0)
    assert parent == {3: 1}
    assert set(np.unique(out)) == {0, 1, 2, 3}
    assert set(np.unique(inst)) == {0, 1, 2}  # the input is not changed
    assert ((out > 0) == (inst > 0)).all()  # no voxel gained or lost
    assert (out == 1)[10, 30, 18] and (out == 3)[10, 30, 34]  # the larger keeps its number
    assert ((out == 2) == (inst == 2)).all()
    # a bump under the minimum diameter stays with its lesion
    bump = np.zeros_like(inst)
    bump[ball(30, 24, 9) | ball(30, 35, 3.5)] = 1
    out, parent = split_refined_lesions(bump, spacing, 1.5, 12.0)
    assert parent == {} and out is bump  # nothing split: no copy of the volume


def test_number_by_size_makes_lesion_one_the_largest_and_closes_gaps() -> None:
    spacing = SPLIT_SPACING
    inst = np.zeros((20, 60, 60), dtype=np.int32)
    inst[ball(30, 18, 9) | ball(30, 34, 8)] = 1
    inst[ball(8, 50, 5)] = 2
    inst[ball(50, 50, 3)] = 5  # 3 and 4 were dropped by refinement
    out, parent = split_refined_lesions(inst, spacing, 1.5, 12.0)
    assert parent == {6: 1}  # the split piece takes a number after the highest
    before = {n: int((out == n).sum()) for n in (1, 2, 5, 6)}
    mapping = number_by_size(out)
    # by decreasing size: the larger half of lesion 1, the piece split off it, 2, then 5
    assert mapping == {1: 1, 6: 2, 2: 3, 5: 4}
    assert set(np.unique(out)) == {0, 1, 2, 3, 4}
    sizes = [int((out == n).sum()) for n in (1, 2, 3, 4)]
    assert sizes == sorted(sizes, reverse=True)
    assert all(int((out == mapping[n]).sum()) == v for n, v in before.items())
    # the two halves share a bounding-box overlap: neither took the other's voxels
    assert (out == 1)[10, 30, 18] and (out == 2)[10, 30, 34]
    again = out.copy()
    assert number_by_size(again) == {1: 1, 2: 2, 3: 3, 4: 4}
    assert (again == out).all()
    assert number_by_size(np.zeros((3, 3, 3), dtype=np.int32)) == {}


def test_drop_inconspicuous_removes_only_lesions_the_image_does_not_show() -> None:
    rng = np.random.default_rng(3)
    shape = (20, 60, 60)
    k, r, c = np.ogrid[:20, :60, :60]
    image = rng.normal(100.0, 10.0, shape).astype(np.float32)  # organ, noise SD 10
    labels = np.full(shape, LIVER, dtype=np.uint8)
    labels[:, :, 55:] = 0  # background beyond the organ
    inst = np.zeros(shape, dtype=np.int32)

    def ball(cr: int, cc: int) -> np.ndarray:
        out: np.ndarray = ((k - 10) * 2.5) ** 2 + (r - cr) ** 2 + (c - cc) ** 2 <= 36
        return out

    inst[ball(15, 15)] = 1
    image[ball(15, 15)] -= 30.0  # 3 SD darker: shown
    inst[ball(15, 40)] = 2  # the organ's own level: not shown
    inst[ball(45, 15)] = 3
    image[ball(45, 15)] += 4.0  # 0.4 SD brighter: shown at 0.25, not at 0.5
    inst[2:4, 44:46, 56:58] = 4  # a stone that is its whole gallbladder: no ring, kept
    labels[inst > 0] = LIVER  # lesions are folded into their organ
    labels[inst == 4] = GALLBLADDER
    organ_labels = labels.copy()
    work = inst.copy()
    assert drop_inconspicuous(image, work, organ_labels, 0.25) == [2]
    assert set(np.unique(work)) == {0, 1, 3, 4}
    assert ((work == 0) == ((inst == 0) | (inst == 2))).all()
    assert (organ_labels == labels).all()  # the voxels stay in the organ
    # lesions of an organ that is not checked are kept however they look
    kept = inst.copy()
    assert drop_inconspicuous(image, kept, organ_labels, 0.5, channels={PANCREAS}) == []
    assert (kept == inst).all()
    assert drop_inconspicuous(image, work, organ_labels, 0.5, channels={LIVER}) == [3]


def test_conspicuity_is_the_signed_distance_in_robust_sd_of_the_ring() -> None:
    """models.inference.conspicuity (drop_inconspicuous's measure and
    bench/lesion_conspicuity.py's): median difference over the ring's robust SD, signed;
    None without 5 ring voxels or without spread in the ring."""
    from models.inference import conspicuity

    rng = np.random.default_rng(8)
    image = rng.normal(100.0, 10.0, (9, 30, 30)).astype(np.float32)
    lesion = np.zeros(image.shape, dtype=bool)
    lesion[3:6, 12:18, 12:18] = True
    organ = ~lesion
    image[lesion] -= 25.0
    z = conspicuity(image, lesion, organ)
    assert z is not None and -3.2 < z < -1.8  # about -2.5 robust SD
    image[lesion] += 50.0
    z = conspicuity(image, lesion, organ)
    assert z is not None and 1.8 < z < 3.2
    assert conspicuity(image, lesion, np.zeros(image.shape, dtype=bool)) is None
    assert conspicuity(np.full(image.shape, 7.0, np.float32), lesion, organ) is None


def test_lesion_conspicuity_bench_counts_every_reference_lesion(tmp_path: Path) -> None:
    """bench/lesion_conspicuity.py on two synthetic cases with the shipped bundle: every
    reference lesion >= 10 mm is listed once, with its conspicuity on the reference
    masks, and the summary's counts add up to the list."""
    import subprocess
    import sys

    from node.cli import main

    data = tmp_path / "synth"
    assert main(["synth", "--out", str(data), "-n", "2", "--seed", "1001", "--shape", "80", "144",
                 "144", "--spacing", "4", "2.5", "2.5", "--no-dicom"]) == 0  # fmt: skip
    out = tmp_path / "conspicuity.json"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "bench" / "lesion_conspicuity.py"),
            str(data),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    truths = [json.loads(p.read_text()) for p in sorted(data.glob("cases/*/truth.json"))]
    big = [les for t in truths for les in t["lesions"] if les["diameter_mm"] >= 10.0]
    assert len(big) >= 3 and len(result["lesions"]) == len(big)
    summary = result["datasets"]["synth"]
    assert summary["lesions_10mm"] == len(big) == summary["found"] + summary["missed"]
    for key, found in (("missed_by_abs_conspicuity", False), ("found_by_abs_conspicuity", True)):
        listed = [x for x in result["lesions"] if x["found"] is found]
        assert sum(summary[key].values()) == len(listed)
        assert all(x["conspicuity"] is not None for x in listed)
    # a simple cyst stands out by several robust SD, darker than the liver
    cysts = [x for x in result["lesions"] if x["disease"] == "simple_cyst"]
    assert cysts and all(x["conspicuity"] < -2.0 for x in cysts)


def test_lesion_figure_bench_describes_every_reference_lesion(tmp_path: Path) -> None:
    """bench/lesion_figure.py on a synthetic case: every reference lesion with voxels is
    described (core, rim, ring, organ, and the same after smoothing inside the organ),
    the figure is a PNG, a simple cyst stands far below the liver even smoothed, and a
    case that is not in the dataset is refused by name."""
    import subprocess
    import sys

    from node.cli import main

    data = tmp_path / "synth"
    assert main(["synth", "--out", str(data), "-n", "1", "--seed", "1001", "--shape", "80", "144",
                 "144", "--spacing", "4", "2.5", "2.5", "--no-dicom"]) == 0  # fmt: skip
    script = Path(__file__).resolve().parents[1] / "bench" / "lesion_figure.py"
    png, out = tmp_path / "fig.png", tmp_path / "fig.json"
    args = [sys.executable, str(script), str(data)]
    proc = subprocess.run(
        [*args, "synth-001001", "--out", str(png), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    truth = json.loads((data / "cases" / "synth-001001" / "truth.json").read_text())
    labels = np.asarray(load_nifti_krc(data / "cases" / "synth-001001" / "lesion_labels.nii.gz")[0])
    with_voxels = [les["number"] for les in truth["lesions"] if (labels == les["number"]).any()]
    assert [x["lesion"] for x in result["lesions"]] == with_voxels
    cysts = [x for x in result["lesions"] if x["disease"] == "simple_cyst"]
    assert cysts
    for cyst in cysts:
        assert cyst["core"] < cyst["organ_median"] - 40.0
        assert cyst["smoothed_core_z"] < -3.0
    proc = subprocess.run(
        [*args, "synth-009999", "--out", str(png)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0 and "synth-009999 is not in" in proc.stderr


# ---------------------------------------------------------------------------
# distinct focal areas the network did not mark (postprocess.focal_search)


def test_find_focal_lesions_adds_only_distinct_compact_areas_nobody_marked() -> None:
    """In an organ of SD 10 noise: a bright and a dark ball, and a bright ball beside a
    dark lesion the network marked, are added as lesions 3-5 (after the highest
    number); a faint ball, a bright vessel, a bright ball whose middle the network
    marked (the rest is that lesion's, not a new one), and a ball of voxels the network
    gave another organ are not; nothing outside the new lesions changes."""
    rng = np.random.default_rng(5)
    shape = (40, 96, 96)
    spacing = (2.5, 1.5, 1.5)
    k, r, c = np.ogrid[: shape[0], : shape[1], : shape[2]]
    image = rng.normal(100.0, 10.0, shape).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:38, 4:92, 4:92] = LIVER
    inst = np.zeros(shape, dtype=np.int32)

    def ball(ck: int, cr: int, cc: int, mm: float) -> np.ndarray:
        d2 = ((k - ck) * 2.5) ** 2 + ((r - cr) * 1.5) ** 2 + ((c - cc) * 1.5) ** 2
        out: np.ndarray = d2 <= mm**2
        return out

    bright, dark = ball(12, 25, 25, 10.0), ball(26, 25, 70, 10.0)
    image[bright] += 45.0
    image[dark] -= 45.0
    image[ball(12, 70, 25, 10.0)] += 5.0  # faint: half an SD
    image[20:22, 30:80, 47:50] += 60.0  # a vessel, 3 mm across
    image[ball(28, 70, 70, 9.0)] += 45.0
    inst[ball(28, 70, 70, 4.0)] = 2  # the network marked the ball's middle only
    dark_marked = ball(8, 48, 48, 6.0)
    image[dark_marked] -= 45.0
    inst[dark_marked] = 1
    beside = ball(8, 48, 59, 8.0)  # 2.5 mm from lesion 1, and brighter where it is darker
    image[beside] += 45.0
    other = ball(20, 48, 20, 9.0)
    image[other] += 45.0
    labels[other] = PANCREAS
    labels_before, inst_before = labels.copy(), inst.copy()
    rule = FocalSearch()
    assert find_focal_lesions(image, inst, labels, spacing, rule, LIVER) == [3, 4, 5]
    for truth in (bright, dark, beside):
        (number,) = {int(x) for x in np.unique(inst[truth]) if x >= 3}
        found = inst == number
        overlap = (found & truth).sum()
        assert overlap / found.sum() > 0.8 and overlap / truth.sum() > 0.7
        assert (labels[found] == LIVER).all()
    new = inst >= 3
    assert (inst[~new] == inst_before[~new]).all()
    assert (labels[~new] == labels_before[~new]).all()
    assert (inst_before[new] == 0).all() and (labels_before[new] != PANCREAS).all()
    # a stricter rule finds neither; an organ that is absent, nothing
    strict = find_focal_lesions(
        image, inst_before.copy(), labels_before.copy(), spacing, FocalSearch(min_z=1000.0), LIVER
    )
    assert strict == []
    assert (
        find_focal_lesions(
            image, inst_before.copy(), labels_before.copy(), spacing, rule, GALLBLADDER
        )
        == []
    )
    # on a coarser grid (2 x 2 x 2 voxel blocks on a finer image) the same two are found
    fine = find_focal_lesions(
        image,
        inst_before.copy(),
        labels_before.copy(),
        (1.0, 0.8, 0.8),
        replace(rule, grid_mm=1.6),
        LIVER,
    )
    assert fine == [3, 4, 5]
