"""Segmentation networks the node can build, and the label map of its own model.

A network is described by a ``network_def`` mapping in MONAI-bundle style
(``{"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, ...}``). For a
bundle that is not trusted, :func:`build_network` instantiates it *without*
MONAI's config parser: the target must be one of :data:`ALLOWED_NETWORKS` and
every argument a plain JSON value (numbers, strings, lists, booleans), so no
expression in a configuration file is ever evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.networks.nets import BasicUNet, SegResNet, UNet

from models.vocab import Organ


class NetworkError(ValueError):
    """A network definition cannot be built; the message names the field."""


class MeanEnsemble(torch.nn.Module):
    """Members with the same input and output channels; the output is the log of their
    mean softmax, so a softmax over it is the members' mean probability.

    Declared as ``{"_target_": "hpb.MeanEnsemble", "members": [def, def, ...]}``; the
    weights are one state dict with keys ``members.<i>.<member key>``."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        self.members = torch.nn.ModuleList(members)

    @staticmethod
    def member_state(state: Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        """Member ``index``'s weights from an ensemble's state dict, without the prefix."""
        prefix = f"members.{index}."
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in self.members]).mean(dim=0)
        return torch.log(probs.clamp_min(1e-12))


#: Channel index -> name of the node's own model. ``lesion`` is any focal
#: lesion (split into instances and assigned to organs after inference).
LESION_LABEL = "lesion"
DEFAULT_LABELS: dict[int, str] = {
    0: "background",
    1: Organ.LIVER.value,
    2: Organ.GALLBLADDER.value,
    3: Organ.PANCREAS.value,
    4: Organ.SPLEEN.value,
    5: Organ.PORTAL_SPLENIC_VEIN.value,
    6: Organ.KIDNEY_LEFT.value,
    7: Organ.KIDNEY_RIGHT.value,
    8: LESION_LABEL,
}

#: ``_target_`` names accepted from an untrusted bundle.
ALLOWED_NETWORKS: dict[str, Callable[..., torch.nn.Module]] = {
    "monai.networks.nets.UNet": UNet,
    "monai.networks.nets.BasicUNet": BasicUNet,
    "monai.networks.nets.SegResNet": SegResNet,
}
_SHORT_NAMES = {name.rsplit(".", 1)[1]: name for name in ALLOWED_NETWORKS}
ENSEMBLE_TARGET = "hpb.MeanEnsemble"


def ensemble_network_def(members: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The definition of a :class:`MeanEnsemble` of ``members`` (network definitions)."""
    return {"_target_": ENSEMBLE_TARGET, "members": [dict(m) for m in members]}


def demo_network_def(out_channels: int = len(DEFAULT_LABELS)) -> dict[str, Any]:
    """The demo model: a 5-level residual 3-D U-Net, about 0.6 M parameters (2.5 MB)."""
    return {
        "_target_": "monai.networks.nets.UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": out_channels,
        "channels": [8, 16, 32, 64, 128],
        "strides": [2, 2, 2, 2],
        "num_res_units": 1,
        "norm": "instance",
    }


def tiny_network_def(out_channels: int = len(DEFAULT_LABELS)) -> dict[str, Any]:
    """A very small U-Net for tests of training and bundles (seconds on a CPU)."""
    return {
        "_target_": "monai.networks.nets.UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": out_channels,
        "channels": [4, 8, 16],
        "strides": [2, 2],
        "num_res_units": 0,
    }


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything that MONAI's parser would treat as code or a reference."""
    if isinstance(value, str):
        if value.startswith(("$", "@", "%")) or "__" in value:
            raise NetworkError(
                f"{where}: expression or reference {value[:40]!r} is not allowed "
                "(the bundle is not trusted)"
            )
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if str(key).startswith("_"):
                raise NetworkError(
                    f"{where}.{key}: special key not allowed (the bundle is not trusted)"
                )
            _check_plain(item, f"{where}.{key}")
    elif value is not None and not isinstance(value, bool | int | float):
        raise NetworkError(f"{where}: unsupported value type {type(value).__name__}")


def check_network_def(network_def: Mapping[str, Any], where: str = "network_def") -> str:
    """Validate an untrusted network definition; return the full target name."""
    if not isinstance(network_def, Mapping):
        raise NetworkError(f"{where}: must be a mapping")
    target = network_def.get("_target_")
    if not isinstance(target, str):
        raise NetworkError(f"{where}._target_: missing")
    if target == ENSEMBLE_TARGET:
        members = network_def.get("members")
        if set(network_def) != {"_target_", "members"}:
            raise NetworkError(f"{where}: {ENSEMBLE_TARGET} takes only 'members'")
        if not isinstance(members, list) or len(members) < 2:
            raise NetworkError(f"{where}.members: a list of at least two network definitions")
        for i, member in enumerate(members):
            if isinstance(member, Mapping) and member.get("_target_") == ENSEMBLE_TARGET:
                raise NetworkError(f"{where}.members[{i}]: ensembles do not nest")
            check_network_def(member, f"{where}.members[{i}]")
        return ENSEMBLE_TARGET
    full = _SHORT_NAMES.get(target, target)
    if full not in ALLOWED_NETWORKS:
        raise NetworkError(
            f"{where}._target_: {target!r} is not an allowed network for an untrusted bundle "
            f"(allowed: {', '.join(sorted(ALLOWED_NETWORKS))})"
        )
    for key, value in network_def.items():
        if key == "_target_":
            continue
        if key.startswith("_"):
            raise NetworkError(
                f"{where}.{key}: special key not allowed (the bundle is not trusted)"
            )
        _check_plain(value, f"{where}.{key}")
    return full


def build_network(network_def: Mapping[str, Any], where: str = "network_def") -> torch.nn.Module:
    """Instantiate an allowed network from plain JSON arguments (no expression evaluation)."""
    full = check_network_def(network_def, where)
    if full == ENSEMBLE_TARGET:
        members = [
            build_network(m, f"{where}.members[{i}]") for i, m in enumerate(network_def["members"])
        ]
        return MeanEnsemble(members)
    kwargs = {k: v for k, v in network_def.items() if k != "_target_"}
    try:
        return ALLOWED_NETWORKS[full](**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise NetworkError(f"{where}: cannot build {full}: {exc}") from exc
