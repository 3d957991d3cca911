"""Fine-tuning options of ``models.train``: start from given weights, per-class sampling
and loss weights, batch Dice, post-processing written to the exported bundle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.bundle import PostProcess, load_bundle
from models.network import build_network, tiny_network_def
from models.train import TrainError, train
from tests.test_train import _config, manifest  # noqa: F401  (fixture)


def test_finetune_starts_from_given_weights_and_exports_postprocess(
    manifest: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    torch.manual_seed(7)
    start = build_network(tiny_network_def()).state_dict()
    init = tmp_path / "init.pt"
    torch.save(start, init)
    config = replace(
        _config(manifest, tmp_path / "run", epochs=1),
        init_weights=init,
        learning_rate=1e-12,  # the weights barely move: the export must equal the start
        sampling_weights={"lesion": 6.0},
        loss_weights={"lesion": 3.0},
        batch_dice=True,
        postprocess={"lesion_threshold": 0.3, "organ_thresholds": {"gallbladder": 0.2}},
    )
    result = train(config)
    assert result.bundle is not None
    bundle = load_bundle(result.bundle)
    assert bundle.postprocess == PostProcess(0.3, None, {"gallbladder": 0.2})
    exported = torch.load(bundle.weights_path, weights_only=True)
    for key, value in start.items():
        if value.is_floating_point():
            assert torch.allclose(exported[key], value, atol=1e-6), key
    # from a random start (no init_weights) the exported weights differ from ``start``
    other = train(
        replace(
            config,
            init_weights=None,
            workdir=tmp_path / "run2",
            bundle_out=tmp_path / "run2" / "bundle",
        )
    )
    assert other.bundle is not None
    exported2 = torch.load(load_bundle(other.bundle).weights_path, weights_only=True)
    assert any(
        not torch.allclose(exported2[k], v) for k, v in start.items() if v.is_floating_point()
    )


def test_unknown_loss_weight_class_is_refused(manifest: Path, tmp_path: Path) -> None:  # noqa: F811
    config = replace(_config(manifest, tmp_path / "run", epochs=1), loss_weights={"heart": 2.0})
    with pytest.raises(TrainError, match="unknown class"):
        train(config)


def test_init_weights_of_another_network_are_refused(
    manifest: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    init = tmp_path / "init.pt"
    torch.save({"not.a.layer": torch.zeros(1)}, init)
    config = replace(_config(manifest, tmp_path / "run", epochs=1), init_weights=init)
    with pytest.raises(TrainError, match="init-weights"):
        train(config)


def test_finetune_script_starts_from_one_ensemble_member(tmp_path: Path) -> None:
    """scripts/finetune_hpb_demo.py --init-member I: member I's weights, unprefixed."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "finetune_hpb_demo.py"
    spec = importlib.util.spec_from_file_location("finetune_hpb_demo", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.manual_seed(3)
    a, b = build_network(tiny_network_def()), build_network(tiny_network_def())
    state = {f"members.0.{k}": v for k, v in a.state_dict().items()}
    state.update({f"members.1.{k}": v for k, v in b.state_dict().items()})
    torch.save(state, tmp_path / "model.pt")
    out = script._member_weights(tmp_path / "model.pt", 1, tmp_path)
    got = torch.load(out, weights_only=True)
    assert set(got) == set(b.state_dict())
    assert all(torch.equal(got[k], v) for k, v in b.state_dict().items())
    assert not all(torch.equal(got[k], v) for k, v in a.state_dict().items())
    with pytest.raises(SystemExit, match=r"members\.2\."):
        script._member_weights(tmp_path / "model.pt", 2, tmp_path)
