"""Other backends: TotalSegmentator label mapping on real outputs, zoo bundles, clear errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from models.backends import (
    TOTALSEG_MR_VALUES,
    BackendError,
    TotalSegmentatorBackend,
    ZooMapping,
    load_zoo_bundle,
    organ_masks_from_totalseg_dir,
    organ_masks_from_totalseg_labelmap,
    totalseg_manifest_rows,
)
from models.inference import segment
from models.nifti import load_nifti_krc
from models.train import load_labels, record_from_json
from models.vocab import Organ
from models.volume import Volume


def test_totalseg_ct_masks_map_to_node_organs(shared_data: Path) -> None:
    ct, _ = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "ct.nii.gz")
    masks = organ_masks_from_totalseg_dir(shared_data / "ct_abdomen_3mm" / "labels", ct.shape)
    assert set(masks) == {
        Organ.LIVER,
        Organ.GALLBLADDER,
        Organ.PANCREAS,
        Organ.SPLEEN,
        Organ.PORTAL_SPLENIC_VEIN,
        Organ.KIDNEY_LEFT,
        Organ.KIDNEY_RIGHT,
    }
    assert int(masks[Organ.LIVER].sum()) == 41602
    assert int(masks[Organ.PANCREAS].sum()) == 818
    assert int(masks[Organ.GALLBLADDER].sum()) == 1300
    # left kidney lies on the patient's left: larger LPS x than the right kidney
    _, affine = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "ct.nii.gz")
    x = {o: (np.argwhere(masks[o]).mean(0) @ affine[:3, :3].T + affine[:3, 3])[0] for o in masks}
    assert x[Organ.KIDNEY_LEFT] > x[Organ.KIDNEY_RIGHT]
    assert x[Organ.SPLEEN] > x[Organ.LIVER]


def test_totalseg_mr_labelmap_values(shared_data: Path) -> None:
    lab, _ = load_nifti_krc(shared_data / "mr_abdomen_3mm" / "labels.nii.gz")
    masks = organ_masks_from_totalseg_labelmap(lab)
    assert int(masks[Organ.LIVER].sum()) == int((lab == 5).sum()) > 1000
    assert int(masks[Organ.PANCREAS].sum()) == int((lab == 7).sum()) > 0
    assert int(masks[Organ.PORTAL_SPLENIC_VEIN].sum()) == int((lab == 25).sum())
    assert TOTALSEG_MR_VALUES[4] == "gallbladder"
    # the manifest rows for the real cases give the same masks through training's loader
    rows = totalseg_manifest_rows(shared_data)
    rec = record_from_json(rows[1], shared_data)
    train_lab = load_labels(rec, lab.shape)
    assert int((train_lab == 1).sum()) == int((lab == 5).sum())  # channel 1 = liver
    assert int((train_lab == 3).sum()) == int((lab == 7).sum())  # channel 3 = pancreas


def test_totalseg_backend_names_what_is_missing(tmp_path: Path) -> None:
    backend = TotalSegmentatorBackend(weights_dir=tmp_path / "weights")
    if importlib.util.find_spec("totalsegmentator") is None:
        with pytest.raises(BackendError, match="TotalSegmentator is not installed"):
            backend.check()
    else:
        with pytest.raises(BackendError, match=str(tmp_path / "weights")):
            backend.check()
    with pytest.raises(BackendError, match="task"):
        TotalSegmentatorBackend(weights_dir=tmp_path, task="body")


def _zoo(tmp_path: Path, network_def: dict[str, object]) -> Path:
    root = tmp_path / "spleen_ct_segmentation"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}))
    (root / "configs" / "metadata.json").write_text(
        json.dumps({"name": "spleen", "version": "0.5.9"})
    )
    net = UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


ZOO_NET = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
}
MAPPING = {
    "labels": {"1": "spleen"},
    "spacing_mm": [3.0, 3.0, 3.0],
    "axcodes": "RAS",
    "roi_size": [20, 16, 8],
    "intensity": {"CT": {"kind": "window", "lower": -57, "upper": 164}},
}


class FakeFirstAxisNetwork(torch.nn.Module):
    """Fake network (stands in for a zoo model): channel 1 on the first half of the
    first spatial axis of whatever array it is given, to reveal the axis order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((x.shape[0], 2, *x.shape[2:]))
        half = x.shape[2] // 2
        out[:, 1, :half] = 10.0
        out[:, 0, half:] = 10.0
        return out


def test_zoo_bundle_runs_in_its_own_axis_order(tmp_path: Path) -> None:
    bundle = load_zoo_bundle(_zoo(tmp_path, ZOO_NET), ZooMapping.from_json(MAPPING))
    assert bundle.organ_channels == {Organ.SPLEEN: 1}
    assert bundle.lesion_channel == -1
    net = bundle.network()  # the zoo weights load into the whitelisted network
    assert isinstance(net, UNet)
    shape = (8, 16, 20)  # (k -> S, r -> P, c -> L) at 3 mm: no resampling
    affine = np.diag([3.0, 3.0, 3.0, 1.0])[[2, 1, 0, 3]]
    vol = Volume(
        array=np.zeros(shape, np.float32),
        affine=affine,
        sop_instance_uids=tuple(str(i) for i in range(shape[0])),
        modality="CT",
        series_instance_uid="1",
        study_instance_uid="2",
        frame_of_reference_uid="3",
    )
    seg = segment(vol, bundle, network=FakeFirstAxisNetwork())
    # RAS axis 0 runs towards the patient's right: its first half is the patient's
    # left, i.e. the larger columns (c runs towards +x = left)
    expected = np.zeros(shape, bool)
    expected[:, :, 10:] = True
    np.testing.assert_array_equal(seg.organ_masks[Organ.SPLEEN], expected)


def test_zoo_bundle_errors(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="put the unpacked bundle"):
        load_zoo_bundle(tmp_path / "absent", ZooMapping.from_json(MAPPING))
    evil = {**ZOO_NET, "out_channels": "$__import__('os').getpid()"}
    root = _zoo(tmp_path, evil)
    with pytest.raises(BackendError, match="not allowed"):
        load_zoo_bundle(root, ZooMapping.from_json(MAPPING))
    with pytest.raises(BackendError, match="unknown organ code"):
        ZooMapping.from_json({**MAPPING, "labels": {"1": "brain"}})
    with pytest.raises(BackendError, match="spacing_mm is required"):
        ZooMapping.from_json({k: v for k, v in MAPPING.items() if k != "spacing_mm"})
    (root / "models" / "model.pt").unlink()
    with pytest.raises(BackendError, match=r"model\.pt"):
        load_zoo_bundle(root, ZooMapping.from_json(MAPPING), trusted=True)
