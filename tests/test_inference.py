"""Inference pipeline: geometry round trips, post-processing, modality refusal, findings.

The geometry tests use ``FakeIntensityNetwork``, a stand-in for a trained
network (named as a fake): it labels each voxel by its normalised intensity,
so the expected masks are known exactly and any flip, transpose or resampling
error in the pipeline shows up as a wrong mask.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from models.bundle import Bundle, FocalSearch, LesionRefine, PostProcess, load_bundle
from models.findings import Diagnosis
from models.inference import (
    NoModelForModality,
    Reorientation,
    analyse,
    postprocess,
    resample_labels,
    segment,
    with_interpretation,
)
from models.network import DEFAULT_LABELS
from models.vocab import ContrastPhase, Disease, Organ
from models.volume import Volume
from tests.test_bundle import make_tiny_bundle

# intensity level (HU) the fake network maps to each channel
LEVELS = {0: -1000.0, 1: 60.0, 2: 0.0, 3: 120.0, 8: 200.0}
WINDOW = (-200.0, 300.0)


class FakeIntensityNetwork(torch.nn.Module):
    """Fake network: channel c scores high where the (windowed) input is near LEVELS[c]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = WINDOW
        out = torch.full((x.shape[0], len(DEFAULT_LABELS), *x.shape[2:]), -1e4)
        for ch, hu in LEVELS.items():
            level = (min(max(hu, lo), hi) - lo) / (hi - lo)
            out[:, ch] = -((x[:, 0] - level) ** 2) * 1e3
        return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("b") / "tiny"))


def _volume(
    array: npt.NDArray[np.float32], affine: npt.NDArray[np.float64], modality: str = "CT"
) -> Volume:
    return Volume(
        array=array,
        affine=affine,
        sop_instance_uids=tuple(f"1.2.3.{i}" for i in range(array.shape[0])),
        modality=modality,
        series_instance_uid="1.2.3",
        study_instance_uid="1.2",
        frame_of_reference_uid="1.2.4",
    )


def _phantom() -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.bool_]]]:
    """A 24 x 64 x 64 phantom: liver block with a lesion, pancreas, gallbladder."""
    shape = (24, 64, 64)
    img = np.full(shape, -1000.0, dtype=np.float32)
    liver = np.zeros(shape, bool)
    liver[4:20, 8:40, 6:34] = True
    lesion = np.zeros(shape, bool)
    kk, rr, cc = np.mgrid[: shape[0], : shape[1], : shape[2]]
    lesion[(kk - 12) ** 2 * 4 + (rr - 22) ** 2 + (cc - 18) ** 2 <= 36] = True
    pancreas = np.zeros(shape, bool)
    pancreas[8:14, 44:52, 30:58] = True
    gb = np.zeros(shape, bool)
    gb[6:12, 44:52, 6:16] = True
    img[liver] = 60.0
    img[lesion] = 200.0
    img[pancreas] = 120.0
    img[gb] = 0.0
    return img, {"liver": liver | lesion, "lesion": lesion, "pancreas": pancreas, "gallbladder": gb}


def _dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


AFFINES = {
    # axial, k towards superior, 2 x 1.5 x 1.5 mm
    "axial_up": np.array([[0, 0, 1.5, -40], [0, 1.5, 0, -50], [2.0, 0, 0, 10], [0, 0, 0, 1]]),
    # slices stored superior -> inferior, rows flipped
    "axial_down_flipped": np.array(
        [[0, 0, 1.5, -40], [0, -1.5, 0, 50], [-2.0, 0, 0, 60], [0, 0, 0, 1]]
    ),
    # a coronal-like stack: k runs posterior, rows run inferior
    "coronal": np.array([[0, 0, 1.5, -40], [2.0, 0, 0, -50], [0, -1.5, 0, 60], [0, 0, 0, 1]]),
}


def test_reorientation_round_trip_and_direction() -> None:
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for affine in AFFINES.values():
        reo = Reorientation.from_affine(affine)
        np.testing.assert_array_equal(reo.invert(reo.apply(arr)), arr)
        # canonical axes run towards +z, +y, +x: (after permutation) positive diagonal
        cols = affine[:3, :3][:, list(reo.perm)] * np.where(reo.flip, -1, 1)
        assert cols[2, 0] > 0 and cols[1, 1] > 0 and cols[0, 2] > 0


def test_resample_labels_nearest() -> None:
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[2:, :, :] = 1
    up = resample_labels(lab, (8, 8, 8))
    assert up.shape == (8, 8, 8)
    assert (up[4:] == 1).all() and (up[:4] == 0).all()
    # every axis resampled on its own ratio, up and down: each voxel takes the label of
    # the nearest source voxel along each axis
    rng = np.random.default_rng(5)
    lab = rng.integers(0, 9, (5, 7, 9)).astype(np.int32)
    out = resample_labels(lab, (13, 4, 17))
    for k, r, c in np.ndindex(13, 4, 17):
        src = [
            min(int(np.rint((i + 0.5) * n / m - 0.5)), n - 1)
            for i, n, m in zip((k, r, c), lab.shape, out.shape, strict=True)
        ]
        assert out[k, r, c] == lab[src[0], src[1], src[2]]


def _iso3(affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The same orientation with 3 mm voxels (the tiny bundle's spacing)."""
    out = affine.astype(np.float64).copy()
    out[:3, :3] = out[:3, :3] / np.linalg.norm(out[:3, :3], axis=0) * 3.0
    return out


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_segment_geometry_exact_at_network_spacing(tiny: Bundle, name: str) -> None:
    """No resampling: any flip or transpose error would break the exact match."""
    img, truth = _phantom()
    seg = segment(_volume(img, _iso3(AFFINES[name])), tiny, network=FakeIntensityNetwork())
    for organ in ("liver", "pancreas", "gallbladder"):
        np.testing.assert_array_equal(seg.organ_masks[Organ(organ)], truth[organ])
    np.testing.assert_array_equal(seg.lesion_instances == 1, truth["lesion"])
    assert seg.lesion_organs == {1: Organ.LIVER}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_segment_geometry_with_resampling(tiny: Bundle, name: str) -> None:
    img, truth = _phantom()
    vol = _volume(img, AFFINES[name].astype(np.float64))
    seg = segment(vol, tiny, network=FakeIntensityNetwork())
    assert _dice(seg.organ_masks[Organ.LIVER], truth["liver"]) > 0.9
    assert _dice(seg.organ_masks[Organ.PANCREAS], truth["pancreas"]) > 0.75
    assert _dice(seg.organ_masks[Organ.GALLBLADDER], truth["gallbladder"]) > 0.75
    assert set(np.unique(seg.lesion_instances)) == {0, 1}
    assert _dice(seg.lesion_instances == 1, truth["lesion"]) > 0.6
    assert seg.lesion_organs == {1: Organ.LIVER}


def test_analyse_findings_and_provenance(tiny: Bundle) -> None:
    img, truth = _phantom()
    vol = _volume(img, AFFINES["axial_up"].astype(np.float64))
    f = analyse(vol, tiny, network=FakeIntensityNetwork())
    liver = f.organ(Organ.LIVER)
    assert liver is not None
    expected_ml = truth["liver"].sum() * 2.0 * 1.5 * 1.5 / 1000
    assert liver.volume_ml == pytest.approx(expected_ml, rel=0.15)
    # parenchyma attenuation excludes the lesion
    assert liver.mean_intensity == pytest.approx(60.0, abs=5.0)
    (lesion,) = f.lesions
    assert lesion.organ == Organ.LIVER
    assert lesion.long_axis.length_mm == pytest.approx(18.0, abs=4.0)
    assert lesion.sub_site is not None
    assert 0.0 < lesion.confidence <= 1.0
    assert f.diagnoses == () and f.report == ()
    p = f.provenance
    assert p.model_name == "hpb_tiny_test" and p.weights_sha256 == tiny.weights_sha256
    assert p.input_sop_uids == vol.sop_instance_uids
    # no description and no vein or spleen in the phantom: the phase is unknown, and why
    assert p.contrast_phase is ContrastPhase.UNKNOWN
    assert any(n.startswith("contrast phase unknown") for n in p.notes)
    named = analyse(
        replace(vol, headers={"SeriesDescription": "Arterial 2mm"}),
        tiny,
        network=FakeIntensityNetwork(),
    )
    assert named.provenance.contrast_phase is ContrastPhase.ARTERIAL
    assert (
        "contrast phase arterial: from SeriesDescription 'Arterial 2mm'" in named.provenance.notes
    )
    g = with_interpretation(f, [Diagnosis(Disease.HCC, 0.3, (lesion.id,))])
    assert g.diagnoses[0].disease == Disease.HCC and g.lesions == f.lesions
    # a lesion the image does not show clearly enough is not reported, and the note says so:
    # in noise of SD 4 the lesion stands 140 / 4 = 35 SD above the liver around it
    noisy = np.random.default_rng(0).normal(0.0, 4.0, img.shape).astype(np.float32)
    vol = replace(vol, array=img + noisy)
    strict = replace(
        tiny, postprocess=PostProcess(lesion_refine=LesionRefine(min_conspicuity=50.0))
    )
    hidden = analyse(vol, strict, network=FakeIntensityNetwork())
    assert hidden.lesions == ()
    assert (
        "1 lesion(s) the network marked are not reported: their median differs from the "
        "organ around them by less than 50.0 robust standard deviations"
    ) in hidden.provenance.notes
    shown = analyse(
        vol,
        replace(tiny, postprocess=PostProcess(lesion_refine=LesionRefine(min_conspicuity=1.0))),
        network=FakeIntensityNetwork(),
    )
    assert len(shown.lesions) == 1
    assert not any("network marked" in n for n in shown.provenance.notes)


def test_analyse_reports_a_distinct_area_the_network_missed_and_says_so(tiny: Bundle) -> None:
    """With ``postprocess.focal_search``, a ball 25 HU above the liver that the (fake)
    network calls liver becomes a lesion, refined and measured like the network's; the
    provenance says which lesion the search found and that its confidence is fixed."""
    shape = (30, 72, 72)
    img = np.full(shape, -1000.0, dtype=np.float32)
    kk, rr, cc = np.mgrid[: shape[0], : shape[1], : shape[2]]
    img[2:28, 4:68, 4:68] = 60.0  # liver
    img[(kk - 15) ** 2 * 4 + (rr - 18) ** 2 + (cc - 18) ** 2 <= 36] = 200.0  # marked
    missed = ((kk - 15) * 2.0) ** 2 + ((rr - 46) * 1.5) ** 2 + ((cc - 46) * 1.5) ** 2 <= 12.0**2
    img[missed] = 85.0  # nearer the liver's level than any other: the network says liver
    img += np.random.default_rng(1).normal(0.0, 4.0, shape).astype(np.float32)
    vol = _volume(img, AFFINES["axial_up"].astype(np.float64))
    plain = analyse(vol, tiny, network=FakeIntensityNetwork())
    assert len(plain.lesions) == 1
    assert not any("focal search" in n for n in plain.provenance.notes)
    searching = replace(
        tiny,
        postprocess=PostProcess(lesion_refine=LesionRefine(), focal_search=FocalSearch()),
    )
    seg = segment(vol, searching, network=FakeIntensityNetwork())
    (number,) = seg.lesions_found_by_search
    assert seg.lesion_organs[number] == Organ.LIVER
    found = seg.lesion_instances == number
    assert (found & missed).sum() / found.sum() > 0.8
    assert (found & missed).sum() / missed.sum() > 0.7
    f = analyse(vol, searching, network=FakeIntensityNetwork())
    assert len(f.lesions) == 2
    lesion = next(x for x in f.lesions if x.number == number)
    assert lesion.confidence == 0.5
    assert lesion.long_axis.length_mm == pytest.approx(24.0, abs=3.0)
    assert lesion.mean_intensity == pytest.approx(85.0, abs=5.0)
    assert (
        f"lesion(s) {number} found by the focal search, not the network: areas of the "
        "organ that stand out from it and that the network did not mark (confidence 0.5 "
        "is a fixed value, not a probability)"
    ) in f.provenance.notes


def test_ultrasound_and_unknown_modalities_are_refused(tiny: Bundle) -> None:
    img, _ = _phantom()
    with pytest.raises(NoModelForModality, match="no model for US"):
        segment(_volume(img, AFFINES["axial_up"].astype(np.float64), "US"), tiny)
    with pytest.raises(NoModelForModality, match="no model for PT"):
        segment(_volume(img, AFFINES["axial_up"].astype(np.float64), "PT"), tiny)


def test_postprocess_components_min_size_and_organ_restriction(tiny: Bundle) -> None:
    lab = np.zeros((20, 40, 40), np.uint8)
    lab[2:18, 2:20, 2:20] = 1  # liver
    lab[5:7, 30:32, 30:32] = 1  # stray liver island: removed (not the largest component)
    lab[8:12, 8:12, 8:12] = 8  # lesion inside the liver: kept
    lab[10, 10, 25] = 8  # one-voxel speck: below min size
    lab[14:18, 30:36, 30:36] = 8  # lesion touching no organ: dropped
    prob = np.full(lab.shape, 0.9, np.float32)
    organ_map, inst, organs, conf = postprocess(lab, prob, tiny, voxel_ml=0.027)
    assert organ_map[6, 31, 31] == 0
    assert set(np.unique(inst)) == {0, 1}
    assert organs == {1: Organ.LIVER}
    assert conf[1] == pytest.approx(0.9)
    assert (organ_map[inst == 1] == 1).all()  # the lesion is folded into the liver


def test_demo_bundle_on_real_ct(shared_data: Path) -> None:
    from models.nifti import load_nifti_krc

    bundle = load_bundle()
    ct, affine = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "ct.nii.gz")
    liver, _ = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "labels" / "liver.nii.gz")
    torch.set_num_threads(2)
    seg = segment(_volume(ct.astype(np.float32), affine), bundle)
    assert _dice(seg.organ_masks[Organ.LIVER], liver > 0) > 0.8


def test_demo_bundle_numbers_lesions_by_decreasing_size() -> None:
    """Synthetic held-out case 1009 (as ``hpb-node synth --seed 1000`` writes it): lesion
    outlines redrawn on the source grid change the sizes the network grid numbered by,
    so the node numbers its lesions again, 1..n from the largest."""
    from models.synthetic.generator import generate_case

    case = generate_case(1009, shape=(80, 144, 144), spacing=(4.0, 2.5, 2.5), modality="CT")
    torch.set_num_threads(2)
    seg = segment(_volume(case.image.astype(np.float32), case.affine), load_bundle())
    sizes = np.bincount(seg.lesion_instances.ravel())[1:]
    assert sizes.size >= 3 and (sizes > 0).all()
    assert list(sizes) == sorted(sizes, reverse=True)
    assert set(seg.lesion_organs) == set(seg.lesion_confidence) == set(range(1, sizes.size + 1))


def test_demo_bundle_keeps_an_isoattenuating_pancreatic_adenocarcinoma() -> None:
    """Generator case 700006 (arterial CT; the fusion bench's test set): a 37 mm
    adenocarcinoma at 58 HU in a pancreas whose ring is uneven. The network finds it.
    Checking the pancreas's lesions for conspicuity (``min_conspicuity`` 0.25 on every
    organ) dropped it, and 8 more of the 320 test cases' adenocarcinomas, so the
    shipped bundle checks only the liver's (``conspicuity_organs``)."""
    from models.evaluation.detection import match_lesions
    from models.synthetic.generator import generate_case

    case = generate_case(700006, shape=(80, 144, 144), spacing=(4.0, 2.5, 2.5), modality="CT")
    (pdac,) = [les for les in case.truth.lesions if les.disease is Disease.PDAC]
    torch.set_num_threads(2)
    bundle = load_bundle()
    vol = _volume(case.image.astype(np.float32), case.affine)
    seg = segment(vol, bundle)
    found = match_lesions("700006", seg.lesion_instances, case.lesion_labels, case.affine)
    assert pdac.number in {m.ref for m in found.matches}
    refine = bundle.postprocess.lesion_refine
    assert refine is not None and refine.conspicuity_organs == ("liver",)
    every = replace(
        bundle,
        postprocess=replace(
            bundle.postprocess, lesion_refine=replace(refine, conspicuity_organs=())
        ),
    )
    seg = segment(vol, every)
    lost = match_lesions("700006", seg.lesion_instances, case.lesion_labels, case.affine)
    assert pdac.number not in {m.ref for m in lost.matches}
