"""Training on tiny cases: manifest, epochs, validation Dice, resume, bundle export, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import load_bundle
from models.network import DEFAULT_LABELS
from models.nifti import save_nifti_krc
from models.train import (
    TrainConfig,
    TrainError,
    dice_per_class,
    load_labels,
    read_manifest,
    record_from_json,
    train,
)
from node.cli import main

AFFINE = np.array([[0, 0, 3.0, 0], [0, 3.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])


def _case(root: Path, name: str, seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    shape = (16, 40, 40)
    img = rng.normal(-100, 10, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[3:13, 5:25, 5:22] = 1  # liver
    lab[5:9, 28:34, 20:36] = 3  # pancreas
    lab[4:8, 26:32, 5:10] = 2  # gallbladder
    lab[10:14, 28:36, 28:36] = 8  # bile duct: not a network class -> background
    les = np.zeros(shape, np.int16)
    les[6:9, 10:15, 10:15] = 1
    img[lab == 1] = 60
    img[lab == 3] = 120
    img[lab == 2] = 5
    img[les > 0] = 200
    for arr, suffix in ((img, "img"), (lab, "lab"), (les, "les")):
        save_nifti_krc(arr, AFFINE, root / f"{name}_{suffix}.nii.gz")
    return {
        "case_id": name,
        "modality": "CT",
        "image": f"{name}_img.nii.gz",
        "organ_labels": f"{name}_lab.nii.gz",
        "lesion_instances": f"{name}_les.nii.gz",
    }


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    lines = []
    for i, split in enumerate(("train", "train", "val")):
        rec = _case(root, f"case{i}", i)
        rec["split"] = split
        lines.append(json.dumps(rec))
    path = root / "manifest.jsonl"
    path.write_text("# tiny test manifest\n" + "\n".join(lines) + "\n")
    return path


def _config(manifest: Path, workdir: Path, epochs: int, resume: bool = False) -> TrainConfig:
    return TrainConfig(
        manifests=[manifest],
        workdir=workdir,
        bundle_out=workdir / "bundle",
        network="tiny",
        spacing_mm=(3.0, 3.0, 3.0),
        roi_size=(16, 32, 32),
        epochs=epochs,
        iterations_per_epoch=3,
        batch_size=2,
        threads=1,
        resume=resume,
        name="hpb_tiny",
    )


def test_manifest_and_label_mapping(manifest: Path) -> None:
    recs = read_manifest(manifest)
    assert [r.split for r in recs] == ["train", "train", "val"]
    assert recs[0].image.is_file() and recs[0].lesions is not None
    lab = load_labels(recs[0], (16, 40, 40))
    channel = {v: k for k, v in DEFAULT_LABELS.items()}
    assert lab[4, 10, 6] == channel["liver"]
    assert lab[7, 12, 12] == channel["lesion"]  # lesion overrides the liver label
    assert lab[11, 30, 30] == 0  # bile duct is not a network class


def test_bad_manifest_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"case_id": "x", "image": "a.nii.gz"}\n')
    with pytest.raises(TrainError, match="no organ label map"):
        read_manifest(bad)


def test_dice_per_class() -> None:
    a = np.array([0, 1, 1, 2, 2, 2])
    b = np.array([0, 1, 0, 2, 2, 0])
    d = dice_per_class(a, b, {0: "background", 1: "liver", 2: "pancreas", 3: "spleen"})
    assert d["liver"] == pytest.approx(2 / 3)
    assert d["pancreas"] == pytest.approx(0.8)
    assert np.isnan(d["spleen"])


def test_train_resume_and_export(manifest: Path, tmp_path: Path) -> None:
    work = tmp_path / "run"
    first = train(_config(manifest, work, epochs=1))
    assert first.epochs_run == 1 and len(first.history) == 1
    assert (work / "last.pt").is_file() and (work / "best.pt").is_file()
    assert set(first.history[0]["val_dice"]) >= {"liver", "pancreas", "gallbladder", "lesion"}
    before = torch.load(work / "last.pt", weights_only=False)["model"]

    second = train(_config(manifest, work, epochs=2, resume=True))
    assert [h["epoch"] for h in second.history] == [0, 1]  # epoch 0 from the checkpoint
    after = torch.load(work / "last.pt", weights_only=False)["model"]
    key = next(iter(before))
    assert not torch.equal(before[key], after[key])  # training continued

    assert second.bundle is not None
    bundle = load_bundle(second.bundle)
    assert bundle.name == "hpb_tiny"
    assert bundle.metadata["hpb_node"]["training"]["epochs_run"] == 2
    card = (second.bundle / "docs" / "README.md").read_text()
    assert "NOT FOR CLINICAL USE" in card and "no model for ultrasound" in card.lower()
    out = bundle.network()(torch.zeros(1, 1, 16, 32, 32))
    assert out.shape[1] == len(DEFAULT_LABELS)


def test_resume_without_checkpoint_fails_via_cli(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "train",
            "--manifest",
            str(manifest),
            "--workdir",
            str(tmp_path / "none"),
            "--network",
            "tiny",
            "--resume",
        ]
    )
    assert rc == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_cli_train(manifest: Path, tmp_path: Path) -> None:
    rc = main(
        [
            "train", "--manifest", str(manifest), "--workdir", str(tmp_path / "w"),
            "--bundle-out", str(tmp_path / "b"), "--network", "tiny", "--epochs", "1",
            "--iterations", "2", "--batch-size", "1", "--spacing", "3", "3", "3",
            "--roi", "16", "32", "32", "--threads", "1",
        ]
    )  # fmt: skip
    assert rc == 0
    assert load_bundle(tmp_path / "b").version == "0.1.0"


def test_dicom_folder_image_gives_same_labels_grid(manifest: Path, tmp_path: Path) -> None:
    """A manifest image may be a DICOM series folder (read with models.loader)."""
    from models.nifti import load_nifti_krc
    from models.series_writer import write_series
    from models.train import prepare_record

    rec = read_manifest(manifest)[0]
    img, affine = load_nifti_krc(rec.image)
    write_series(np.rint(img).astype(np.int16), affine, tmp_path / "dicom")
    dcm_rec = record_from_json(
        {
            "case_id": "d",
            "image": str(tmp_path / "dicom"),
            "label": str(rec.label),
            "lesions": str(rec.lesions),
        },
        tmp_path,
    )
    cfg = _config(manifest, tmp_path / "w", epochs=1)
    a, b = prepare_record(rec, cfg), prepare_record(dcm_rec, cfg)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_allclose(a.image.astype(np.float32), b.image.astype(np.float32), atol=0.01)
