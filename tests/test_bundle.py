"""The bundle property contract: a bad bundle cannot be loaded, the error names the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from models.bundle import (
    DEMO_BUNDLE,
    Bundle,
    BundleError,
    IntensityNorm,
    load_bundle,
    sha256_file,
    write_bundle,
)
from models.network import (
    DEFAULT_LABELS,
    NetworkError,
    build_network,
    check_network_def,
    ensemble_network_def,
    tiny_network_def,
)
from models.vocab import Organ

TINY_INTENSITY = {
    "CT": IntensityNorm("window", -200.0, 300.0),
    "MR": IntensityNorm("percentile", 1.0, 99.0),
}


def make_tiny_bundle(
    out: Path,
    *,
    seed: int = 0,
    network_def: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A contract-valid bundle with a tiny randomly initialised U-Net (or the given
    network definition and weights)."""
    torch.manual_seed(seed)
    net_def = network_def if network_def is not None else tiny_network_def()
    if state_dict is None:
        state_dict = build_network(net_def).state_dict()
    return write_bundle(
        out,
        name="hpb_tiny_test",
        version="0.0.1",
        network_def=net_def,
        state_dict=state_dict,
        labels=DEFAULT_LABELS,
        spacing_mm=(3.0, 3.0, 3.0),
        roi_size=(16, 32, 32),
        intensity=TINY_INTENSITY,
        min_lesion_ml=0.1,
        description="tiny test bundle, random weights",
        readme="# tiny test bundle\nRandom weights. Not for clinical use.\n",
    )


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return make_tiny_bundle(tmp_path / "tiny")


def _edit(bundle: Path, name: str, fn: Callable[[dict[str, Any]], None]) -> None:
    path = bundle / "configs" / name
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_valid_bundle_loads_and_runs(tiny: Path) -> None:
    b = load_bundle(tiny)
    assert isinstance(b, Bundle)
    assert b.modalities == ("CT", "MR")
    assert b.organ_channels[Organ.PANCREAS] == 3
    assert b.lesion_channel == 8
    assert b.weights_sha256 == sha256_file(tiny / "models" / "model.pt")
    net = b.network()
    out = net(torch.zeros(1, 1, 16, 32, 32))
    assert out.shape == (1, len(DEFAULT_LABELS), 16, 32, 32)


@pytest.mark.parametrize(
    ("field", "mutate"),
    [
        ("intended_use", lambda d: d.pop("intended_use")),
        ("hpb_node.weights_sha256", lambda d: d["hpb_node"].pop("weights_sha256")),
        ("hpb_node.spacing_mm", lambda d: d["hpb_node"].update(spacing_mm=[3.0, -1.0, 3.0])),
        ("hpb_node.intensity.MR", lambda d: d["hpb_node"]["intensity"].pop("MR")),
        (
            "num_channels",
            lambda d: d["network_data_format"]["inputs"]["image"].update(num_channels=3),
        ),
        (
            "modality",
            lambda d: d["network_data_format"]["inputs"]["image"].update(modality=["US"]),
        ),
    ],
)
def test_bad_metadata_names_the_field(
    tiny: Path, field: str, mutate: Callable[[dict[str, Any]], None]
) -> None:
    _edit(tiny, "metadata.json", mutate)
    with pytest.raises(BundleError, match=field.replace(".", r"\.")):
        load_bundle(tiny)


def test_label_map_must_cover_organs(tiny: Path) -> None:
    def drop_pancreas(d: dict[str, Any]) -> None:
        d["network_data_format"]["outputs"]["pred"]["channel_def"]["3"] = "stomach"

    _edit(tiny, "metadata.json", drop_pancreas)
    with pytest.raises(BundleError, match=r"channel_def: missing organ\(s\) pancreas"):
        load_bundle(tiny)


def test_weights_hash_and_presence(tiny: Path) -> None:
    weights = tiny / "models" / "model.pt"
    state = torch.load(weights, weights_only=True)
    state[next(iter(state))] += 1.0
    torch.save(state, weights)
    with pytest.raises(BundleError, match="weights_sha256 does not match"):
        load_bundle(tiny)
    weights.unlink()
    with pytest.raises(BundleError, match=r"hpb_node\.weights: models/model\.pt is missing"):
        load_bundle(tiny)


def test_invalid_json_and_missing_card(tiny: Path) -> None:
    (tiny / "docs" / "README.md").unlink()
    with pytest.raises(BundleError, match="README"):
        load_bundle(tiny)
    (tiny / "configs" / "inference.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"configs/inference\.json is not valid JSON"):
        load_bundle(tiny)


def test_untrusted_expression_is_refused(tiny: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    payload = f"$__import__('os').system('touch {sentinel}')"
    loaded = load_bundle(tiny)
    _edit(tiny, "inference.json", lambda d: d["network_def"].update(out_channels=payload))
    with pytest.raises(BundleError, match=r"network_def\.out_channels: expression"):
        load_bundle(tiny)
    # even a Bundle object carrying the expression (bypassing the loader) will not run it
    forged = Bundle(
        **{**loaded.__dict__, "network_def": {**loaded.network_def, "out_channels": payload}}
    )
    with pytest.raises(BundleError, match="not trusted"):
        forged.network()
    assert not sentinel.exists()


def test_untrusted_target_outside_whitelist(tiny: Path) -> None:
    _edit(
        tiny,
        "inference.json",
        lambda d: d.update(network_def={"_target_": "torch.nn.Linear", "in_features": 1}),
    )
    with pytest.raises(
        BundleError, match=r"network_def\._target_: 'torch\.nn\.Linear' is not an allowed"
    ):
        load_bundle(tiny)


def test_trusted_bundle_uses_monai_config_parser(tiny: Path) -> None:
    _edit(tiny, "inference.json", lambda d: d["network_def"].update(out_channels="$4 + 5"))
    with pytest.raises(BundleError, match="expression"):
        load_bundle(tiny)
    b = load_bundle(tiny, trusted=True)
    net = b.network()
    assert net(torch.zeros(1, 1, 16, 32, 32)).shape[1] == 9


def test_demo_bundle_is_valid() -> None:
    if not (DEMO_BUNDLE / "configs" / "metadata.json").is_file():
        pytest.fail(f"the shipped demo bundle is missing at {DEMO_BUNDLE}")
    b = load_bundle()
    assert b.root == DEMO_BUNDLE
    assert (DEMO_BUNDLE / "models" / "model.pt").stat().st_size < 8 * 1024 * 1024
    assert "not for clinical use" in (DEMO_BUNDLE / "docs" / "README.md").read_text().lower()


def test_ensemble_bundle_averages_member_probabilities(tmp_path: Path) -> None:
    torch.manual_seed(1)
    a, b = build_network(tiny_network_def()), build_network(tiny_network_def())
    net_def = ensemble_network_def([tiny_network_def(), tiny_network_def()])
    state = {f"members.0.{k}": v for k, v in a.state_dict().items()}
    state.update({f"members.1.{k}": v for k, v in b.state_dict().items()})
    root = make_tiny_bundle(tmp_path / "ens", network_def=net_def, state_dict=state)
    net = load_bundle(root).network()
    x = torch.rand(1, 1, 16, 32, 32)
    a.eval(), b.eval()
    with torch.no_grad():
        want = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
        got = torch.softmax(net(x), 1)
    assert torch.allclose(got, want, atol=1e-5)
    # a member with the wrong output channels is refused, naming the member
    _edit(root, "inference.json", lambda d: d["network_def"]["members"][1].update(out_channels=3))
    with pytest.raises(BundleError, match=r"members\[1\]\.out_channels is 3"):
        load_bundle(root)


def test_ensemble_script_keeps_chosen_members_of_an_ensemble_base(tmp_path: Path) -> None:
    """scripts/ensemble_bundle.py: an ensemble base's member 1 plus a new member."""
    import subprocess
    import sys

    torch.manual_seed(2)
    a, b, c = (build_network(tiny_network_def()) for _ in range(3))
    net_def = ensemble_network_def([tiny_network_def(), tiny_network_def()])
    state = {f"members.0.{k}": v for k, v in a.state_dict().items()}
    state.update({f"members.1.{k}": v for k, v in b.state_dict().items()})
    base = make_tiny_bundle(tmp_path / "base", network_def=net_def, state_dict=state)
    torch.save({"model": c.state_dict()}, tmp_path / "last.pt")  # a models.train checkpoint
    script = Path(__file__).resolve().parents[1] / "scripts" / "ensemble_bundle.py"
    out = tmp_path / "out"
    args = ["--base", str(base), "--member", str(tmp_path / "last.pt"), "--out", str(out)]
    run = [sys.executable, str(script), *args, "--version", "9.9.9", "--keep-base-members", "1"]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    assert bundle.version == "9.9.9" and len(bundle.network_def["members"]) == 2
    got = torch.load(bundle.weights_path, weights_only=True)
    for i, want in enumerate((b, c)):
        for k, v in want.state_dict().items():
            assert torch.equal(got[f"members.{i}.{k}"], v), (i, k)
    proc = subprocess.run(
        [*run[:-1], "5"], capture_output=True, text=True, timeout=300
    )  # no member 5
    assert proc.returncode != 0 and "the base has 2" in proc.stderr


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([tiny_network_def()], "at least two"),
        ([tiny_network_def(), {"_target_": "torch.nn.Linear"}], r"members\[1\]\._target_"),
        (
            [tiny_network_def(), {**tiny_network_def(), "act": "$print(1)"}],
            r"members\[1\]\.act: expression",
        ),
        (
            [tiny_network_def(), ensemble_network_def([tiny_network_def()] * 2)],
            "do not nest",
        ),
    ],
)
def test_ensemble_definition_is_checked(members: list[Any], message: str) -> None:
    with pytest.raises(NetworkError, match=message):
        check_network_def({"_target_": "hpb.MeanEnsemble", "members": members})
