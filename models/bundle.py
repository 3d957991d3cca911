"""The node's model bundle: MONAI bundle layout, checked against a property contract.

Layout (a MONAI bundle directory)::

    <bundle>/
      configs/metadata.json   name, version, label map (network_data_format), hpb_node section
      configs/inference.json  network_def (``_target_`` + plain arguments)
      models/model.pt         state dict (loaded with ``torch.load(weights_only=True)``)
      docs/README.md          model card

A bundle is checked when it is loaded (:func:`load_bundle`): every entry of
:data:`METADATA_CONTRACT` must be present with the declared type, the label map
must be the contiguous channels ``0..n-1`` with ``0`` = background and must cover
:data:`REQUIRED_ORGANS` and the lesion channel, inputs must declare channels,
spacing and an intensity normalisation for every modality, and the weights file
must exist with the declared SHA-256. A bad bundle cannot be loaded; the
:class:`BundleError` names the file and field.

Configuration expressions: MONAI's ``ConfigParser`` evaluates ``$`` expressions,
``@`` references and ``_target_`` instantiation, which is arbitrary code. Only a
bundle loaded with ``trusted=True`` goes through it. An untrusted bundle (the
default) is read as plain JSON; its ``network_def`` must name one of
:data:`models.network.ALLOWED_NETWORKS` with plain-value arguments, and any
expression anywhere in its configs is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from models.network import (
    ENSEMBLE_TARGET,
    LESION_LABEL,
    NetworkError,
    build_network,
    check_network_def,
)
from models.vocab import Organ

log = logging.getLogger(__name__)

DEMO_BUNDLE = Path(__file__).resolve().parent / "bundles" / "hpb_demo"

#: Organs every bundle for this node must segment (bile duct is optional).
REQUIRED_ORGANS: tuple[Organ, ...] = (
    Organ.LIVER,
    Organ.GALLBLADDER,
    Organ.PANCREAS,
    Organ.SPLEEN,
    Organ.PORTAL_SPLENIC_VEIN,
    Organ.KIDNEY_LEFT,
    Organ.KIDNEY_RIGHT,
)
SUPPORTED_MODALITIES = ("CT", "MR")

#: dotted path in configs/metadata.json -> required JSON type
METADATA_CONTRACT: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "version": str,
    "monai_version": str,
    "pytorch_version": str,
    "task": str,
    "description": str,
    "intended_use": str,
    "network_data_format": dict,
    "network_data_format.inputs.image.num_channels": int,
    "network_data_format.inputs.image.modality": list,
    "network_data_format.outputs.pred.channel_def": dict,
    "hpb_node": dict,
    "hpb_node.spacing_mm": list,
    "hpb_node.roi_size": list,
    "hpb_node.intensity": dict,
    "hpb_node.weights": str,
    "hpb_node.weights_sha256": str,
    "hpb_node.min_lesion_ml": (int, float),
}


class BundleError(ValueError):
    """A bundle breaks the property contract; the message names the file and field."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def _read_json(path: Path, root: Path) -> dict[str, Any]:
    rel = path.relative_to(root)
    if not path.is_file():
        raise BundleError(f"bundle {root}: {rel} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {root}: {rel} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"bundle {root}: {rel} must hold a JSON object")
    return data


def _refuse_expressions(value: Any, where: str) -> None:
    if isinstance(value, str):
        if value.startswith(("$", "@", "%")):
            raise BundleError(
                f"{where}: expression or reference {value[:40]!r} is not allowed "
                "(the bundle is not trusted; load it with trusted=True only if you wrote it)"
            )
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_expressions(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_expressions(item, f"{where}.{key}")


@dataclass(frozen=True)
class IntensityNorm:
    """How one modality's voxels are scaled to the network's input range [0, 1]."""

    kind: str  # "window" (fixed a_min..a_max, CT HU) or "percentile" (MR)
    lower: float
    upper: float

    def __post_init__(self) -> None:
        if self.kind not in ("window", "percentile"):
            raise BundleError(f"intensity kind must be 'window' or 'percentile', got {self.kind!r}")
        if not self.lower < self.upper:
            raise BundleError(f"intensity {self.kind}: lower must be < upper")
        if self.kind == "percentile" and not (self.lower >= 0.0 and self.upper <= 100.0):
            raise BundleError("intensity percentile bounds must lie within 0..100")


def _step_fields(step: str, data: Any, cls: type) -> dict[str, Any]:
    """A postprocess step's JSON object as a dict, refused unless it is an object whose
    keys are all fields of the dataclass ``cls``."""
    if not isinstance(data, Mapping):
        raise BundleError(f"postprocess {step} must be a JSON object")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise BundleError(f"postprocess {step}: unknown field(s) {', '.join(unknown)}")
    return dict(data)


@dataclass(frozen=True)
class LesionRefine:
    """Redraw a lesion's outline at half contrast on the source grid
    (``postprocess.lesion_refine``; :func:`models.inference.refine_lesion`).

    The lesion's level is the 75th (brighter lesion) or 25th (darker lesion) percentile
    of its voxels, the background's the median of a ring of organ voxels
    ``grow_voxels`` + 1 to ``grow_voxels`` + 3 voxels outside it; the new outline is
    where the image, smoothed by a Gaussian of ``smooth_voxels``, crosses halfway between
    them, searched within ``grow_voxels`` of the network's outline, keeping in each
    slice only the pieces that overlap the network's outline there. A lesion whose
    contrast is below ``min_contrast`` times the ring's robust noise keeps its outline.
    With ``split_mm``, touching lesions that one redrawn outline holds are split
    afterwards (:func:`models.inference.split_refined_lesions`: distance-map maxima that
    rise ``split_mm`` above their saddle); only pieces whose equivalent-sphere
    diameter reaches ``split_min_mm`` become lesions of their own.
    With ``open_slices``, each slice's redrawn outline is then opened by a 3 x 3 square
    and only the opened pieces that overlap the network's outline are kept, with the
    outline's voxels next to them given back: strands one or two voxels wide (darker
    partial-volume voxels along the organ's capsule, a vessel beside the lesion) are
    cut off beyond their first voxel, as they lengthen the axial long axis, and a slice
    whose outline is all strand keeps it.
    With ``min_conspicuity``, a lesion whose median differs from the median of the
    organ ring around it (2-3 voxels out) by less than this many robust standard
    deviations of that ring is not reported
    (:func:`models.inference.drop_inconspicuous`): the image does not show it. Only
    lesions of the organs named in ``conspicuity_organs`` are so checked (empty:
    every organ's); an organ whose lesions may be isoattenuating and still real (the
    pancreas: an adenocarcinoma seen by its contour and duct) is left out.
    """

    grow_voxels: int = 2
    smooth_voxels: float = 0.7
    min_contrast: float = 2.0
    split_mm: float | None = None
    split_min_mm: float = 0.0
    min_conspicuity: float | None = None
    conspicuity_organs: tuple[str, ...] = ()
    open_slices: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.grow_voxels, int) or not 1 <= self.grow_voxels <= 5:
            raise BundleError("postprocess lesion_refine.grow_voxels must be an integer 1-5")
        for name in ("smooth_voxels", "min_contrast", "split_min_mm"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise BundleError(f"postprocess lesion_refine.{name} must be a number >= 0")
        split = self.split_mm
        if split is not None and not (isinstance(split, int | float) and split > 0):
            raise BundleError("postprocess lesion_refine.split_mm must be a positive number of mm")
        least = self.min_conspicuity
        if least is not None and not (isinstance(least, int | float) and least > 0):
            raise BundleError("postprocess lesion_refine.min_conspicuity must be a positive number")
        if not all(isinstance(x, str) for x in self.conspicuity_organs):
            raise BundleError("postprocess lesion_refine.conspicuity_organs must be organ names")
        if not isinstance(self.open_slices, bool):
            raise BundleError("postprocess lesion_refine.open_slices must be true or false")

    @classmethod
    def from_json(cls, data: Any) -> LesionRefine:
        values = _step_fields("lesion_refine", data, cls)
        named = values.get("conspicuity_organs", [])
        if not isinstance(named, list):
            raise BundleError("postprocess lesion_refine.conspicuity_organs must be a list")
        values["conspicuity_organs"] = tuple(named)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "grow_voxels": self.grow_voxels,
            "smooth_voxels": self.smooth_voxels,
            "min_contrast": self.min_contrast,
        }
        if self.split_mm is not None:
            out.update(split_mm=self.split_mm, split_min_mm=self.split_min_mm)
        if self.min_conspicuity is not None:
            out.update(min_conspicuity=self.min_conspicuity)
        if self.conspicuity_organs:
            out.update(conspicuity_organs=list(self.conspicuity_organs))
        if self.open_slices:
            out.update(open_slices=True)
        return out


@dataclass(frozen=True)
class FocalSearch:
    """Look, inside the organs named, for distinct focal areas the network did not mark
    as lesion (``postprocess.focal_search``; :func:`models.inference.find_focal_lesions`).

    The image is averaged to a grid of about ``grid_mm`` and smoothed by a Gaussian of
    ``smooth_mm`` within the organ (its holes filled). The organ's median and spread
    (1.4826 x the median absolute deviation) are taken from the smoothed organ at least
    ``edge_mm`` inside it, lesions and the voxels near them left out; a voxel stands out
    when it lies at least ``min_z`` such spreads from that median, brighter or darker.
    Those voxels are opened by a ball of ``open_mm`` (which cuts the vessels and ducts
    that touch a lesion away from it), and a piece becomes a lesion when the largest
    ball it holds has a radius of at least ``min_inscribed_mm`` and it fills at least
    ``min_fill`` of the sphere as wide as its longest extent along the grid's axes: a
    compact area, not a vessel or a fissure. A piece is left alone as the unmarked part
    of a lesion when that lesion stands out the same way (both brighter or both darker
    than the organ) and at least half of it lies within two grid voxels of the piece (a
    bright mass beside a dark lesion, or beside a lesion that only touches it, is a
    lesion of its own); voxels the network gave another organ are never taken. Found
    lesions then go through ``lesion_refine`` like the network's.
    """

    organs: tuple[str, ...] = ("liver",)
    min_z: float = 4.0
    min_inscribed_mm: float = 6.0
    min_fill: float = 0.3
    smooth_mm: float = 2.5
    open_mm: float = 3.0
    edge_mm: float = 3.0
    grid_mm: float = 2.5

    def __post_init__(self) -> None:
        if not self.organs or not all(isinstance(x, str) for x in self.organs):
            raise BundleError("postprocess focal_search.organs must be a list of organ names")
        for name in ("min_z", "min_inscribed_mm", "smooth_mm", "grid_mm"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise BundleError(f"postprocess focal_search.{name} must be a number > 0")
        for name in ("open_mm", "edge_mm", "min_fill"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise BundleError(f"postprocess focal_search.{name} must be a number >= 0")

    @classmethod
    def from_json(cls, data: Any) -> FocalSearch:
        values = _step_fields("focal_search", data, cls)
        if "organs" in values:
            if not isinstance(values["organs"], list):
                raise BundleError("postprocess focal_search.organs must be a list of organ names")
            values["organs"] = tuple(values["organs"])
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {
            "organs": list(self.organs),
            "min_z": self.min_z,
            "min_inscribed_mm": self.min_inscribed_mm,
            "min_fill": self.min_fill,
            "smooth_mm": self.smooth_mm,
            "open_mm": self.open_mm,
            "edge_mm": self.edge_mm,
            "grid_mm": self.grid_mm,
        }


def _only_organs(field: str, names: Iterable[str], organs: Collection[str]) -> None:
    """Refuse a postprocess ``field`` that names something other than an organ channel."""
    bad = sorted(set(names) - set(organs))
    if bad:
        raise BundleError(f"postprocess {field}: not an organ channel: {', '.join(bad)}")


@dataclass(frozen=True)
class PostProcess:
    """How probabilities become labels (``hpb_node.postprocess`` in ``configs/metadata.json``;
    absent: the plain argmax).

    ``lesion_threshold``: a voxel is lesion when its lesion probability reaches this
    (None: when the lesion channel wins the argmax). ``lesion_seed_threshold``: a
    lesion component is kept only if its highest lesion probability reaches this
    (None: no such requirement). ``organ_thresholds``: organ name -> probability at or
    above which a voxel the argmax left as background joins that organ.
    ``fill_holes``: organ names whose enclosed background (in 3-D, then in each axial
    slice) joins the organ, so that a lesion the network left as background inside an
    organ (a gallstone in the bile) still counts in the organ's volume.
    ``lesion_split_mm``: split a lesion component into touching lesions where its
    distance map has separate maxima that rise at least this many millimetres above
    the saddle between them (None: components are not split).
    ``lesion_refine``: redraw each lesion's outline on the source grid where the image
    shows it (:class:`LesionRefine`; None: the network's outline, resampled, is kept).
    ``focal_search``: add the distinct focal areas inside the named organs that the
    network did not mark (:class:`FocalSearch`; None: only the network's lesions).
    """

    lesion_threshold: float | None = None
    lesion_seed_threshold: float | None = None
    organ_thresholds: dict[str, float] = field(default_factory=dict)
    fill_holes: tuple[str, ...] = ()
    lesion_split_mm: float | None = None
    lesion_refine: LesionRefine | None = None
    focal_search: FocalSearch | None = None

    def __post_init__(self) -> None:
        named = [("lesion_threshold", self.lesion_threshold)]
        named.append(("lesion_seed_threshold", self.lesion_seed_threshold))
        named += [(f"organ_thresholds.{k}", v) for k, v in self.organ_thresholds.items()]
        for name, value in named:
            if value is not None and not (isinstance(value, int | float) and 0.0 < value < 1.0):
                raise BundleError(f"postprocess {name} must be a probability in (0, 1)")
        split = self.lesion_split_mm
        if split is not None and not (isinstance(split, int | float) and split > 0):
            raise BundleError("postprocess lesion_split_mm must be a positive number of mm")

    @classmethod
    def from_json(cls, data: Any, organs: set[str]) -> PostProcess:
        if not isinstance(data, Mapping):
            raise BundleError("postprocess must be a JSON object")
        known = {
            "lesion_threshold",
            "lesion_seed_threshold",
            "organ_thresholds",
            "fill_holes",
            "lesion_split_mm",
            "lesion_refine",
            "focal_search",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"postprocess: unknown field(s) {', '.join(unknown)}")
        thresholds = data.get("organ_thresholds") or {}
        if not isinstance(thresholds, Mapping):
            raise BundleError("postprocess organ_thresholds must map organ names to numbers")
        _only_organs("organ_thresholds", thresholds, organs)
        fill = data.get("fill_holes") or []
        if not isinstance(fill, list) or not all(isinstance(x, str) for x in fill):
            raise BundleError("postprocess fill_holes must be a list of organ names")
        _only_organs("fill_holes", fill, organs)
        refine = (
            LesionRefine.from_json(data["lesion_refine"])
            if data.get("lesion_refine") is not None
            else None
        )
        _only_organs(
            "lesion_refine.conspicuity_organs", refine.conspicuity_organs if refine else (), organs
        )
        focal = (
            FocalSearch.from_json(data["focal_search"])
            if data.get("focal_search") is not None
            else None
        )
        _only_organs("focal_search.organs", focal.organs if focal else (), organs)
        return cls(
            lesion_threshold=data.get("lesion_threshold"),
            lesion_seed_threshold=data.get("lesion_seed_threshold"),
            organ_thresholds={str(k): v for k, v in thresholds.items()},
            fill_holes=tuple(fill),
            lesion_split_mm=data.get("lesion_split_mm"),
            lesion_refine=refine,
            focal_search=focal,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "lesion_threshold": self.lesion_threshold,
            "lesion_seed_threshold": self.lesion_seed_threshold,
            "organ_thresholds": dict(self.organ_thresholds),
        }
        # the later fields are written only when set, so older bundles read back unchanged
        if self.fill_holes:
            out["fill_holes"] = list(self.fill_holes)
        if self.lesion_split_mm is not None:
            out["lesion_split_mm"] = self.lesion_split_mm
        if self.lesion_refine is not None:
            out["lesion_refine"] = self.lesion_refine.to_json()
        if self.focal_search is not None:
            out["focal_search"] = self.focal_search.to_json()
        return out


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked bundle. Build the network with :meth:`network`."""

    root: Path
    name: str
    version: str
    labels: dict[int, str]
    spacing_mm: tuple[float, float, float]  # (slice, row, column) after reorientation
    roi_size: tuple[int, int, int]
    intensity: dict[str, IntensityNorm]
    weights_path: Path
    weights_sha256: str
    min_lesion_ml: float
    network_def: dict[str, Any]
    metadata: dict[str, Any]
    trusted: bool = False
    overlap: float = 0.25
    extra: dict[str, Any] = field(default_factory=dict)
    postprocess: PostProcess = field(default_factory=PostProcess)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.intensity)

    @property
    def organ_channels(self) -> dict[Organ, int]:
        values = {o.value: o for o in Organ}
        return {values[name]: ch for ch, name in self.labels.items() if name in values}

    @property
    def lesion_channel(self) -> int:
        """The lesion channel, or -1 for a model without one (e.g. an organ-only zoo bundle)."""
        return next((ch for ch, name in self.labels.items() if name == LESION_LABEL), -1)

    def network(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """Instantiate the network, load the weights, put it in eval mode on ``device``."""
        if self.trusted:
            from monai.bundle import ConfigParser  # evaluation only for trusted bundles

            parser = ConfigParser(
                {**self.extra.get("inference_config", {}), "bundle_root": str(self.root)}
            )
            net = parser.get_parsed_content("network_def")
            if not isinstance(net, torch.nn.Module):
                raise BundleError(f"bundle {self.root}: network_def did not build a torch module")
        else:
            try:
                net = build_network(self.network_def, "configs/inference.json: network_def")
            except NetworkError as exc:
                raise BundleError(f"bundle {self.root}: {exc}") from exc
        try:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise BundleError(
                f"bundle {self.root}: cannot read {self.weights_path}: {exc}"
            ) from exc
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise BundleError(
                f"bundle {self.root}: models/model.pt does not match network_def: {exc}"
            ) from exc
        return net.to(device).eval()


def load_bundle(path: Path | str | None = None, *, trusted: bool = False) -> Bundle:
    """Load and check a bundle directory (the shipped demo bundle when ``path`` is None)."""
    root = Path(path) if path is not None else DEMO_BUNDLE
    root = root.resolve()
    if not root.is_dir():
        raise BundleError(f"bundle {root}: not a directory")
    meta = _read_json(root / "configs" / "metadata.json", root)
    infer = _read_json(root / "configs" / "inference.json", root)
    mwhere = "configs/metadata.json"
    for dotted, typ in METADATA_CONTRACT.items():
        try:
            value = _get(meta, dotted)
        except KeyError:
            raise BundleError(f"bundle {root}: {mwhere}: {dotted} is required") from None
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise BundleError(f"bundle {root}: {mwhere}: {dotted} has the wrong type")
    if not trusted:
        try:
            _refuse_expressions(meta, mwhere)
            _refuse_expressions(infer, "configs/inference.json")
        except BundleError as exc:
            raise BundleError(f"bundle {root}: {exc}") from None
    hpb = meta["hpb_node"]

    # label map
    cdef = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    cwhere = f"{mwhere}: network_data_format.outputs.pred.channel_def"
    try:
        labels = {int(k): str(v) for k, v in cdef.items()}
    except ValueError:
        raise BundleError(f"bundle {root}: {cwhere}: keys must be channel numbers") from None
    if sorted(labels) != list(range(len(labels))):
        raise BundleError(f"bundle {root}: {cwhere}: channels must be 0..{len(labels) - 1}")
    if labels.get(0) != "background":
        raise BundleError(f"bundle {root}: {cwhere}: channel 0 must be 'background'")
    names = set(labels.values())
    missing = [o.value for o in REQUIRED_ORGANS if o.value not in names]
    if missing:
        raise BundleError(f"bundle {root}: {cwhere}: missing organ(s) {', '.join(missing)}")
    if LESION_LABEL not in names:
        raise BundleError(f"bundle {root}: {cwhere}: missing the '{LESION_LABEL}' channel")
    known = {o.value for o in Organ} | {"background", LESION_LABEL}
    unknown = sorted(names - known)
    if unknown:
        raise BundleError(f"bundle {root}: {cwhere}: unknown label(s) {', '.join(unknown)}")
    if len(names) != len(labels):
        raise BundleError(f"bundle {root}: {cwhere}: a label name appears twice")

    # inputs: channels, modalities, spacing, intensity normalisation
    image = meta["network_data_format"]["inputs"]["image"]
    if image["num_channels"] != 1:
        raise BundleError(
            f"bundle {root}: {mwhere}: network_data_format.inputs.image.num_channels must be 1"
        )
    spacing = hpb["spacing_mm"]
    if len(spacing) != 3 or not all(isinstance(s, int | float) and s > 0 for s in spacing):
        raise BundleError(
            f"bundle {root}: {mwhere}: hpb_node.spacing_mm must be 3 positive numbers"
        )
    roi = hpb["roi_size"]
    if len(roi) != 3 or not all(isinstance(s, int) and s >= 8 for s in roi):
        raise BundleError(f"bundle {root}: {mwhere}: hpb_node.roi_size must be 3 integers >= 8")
    modalities = [str(m).upper() for m in image["modality"]]
    bad = [m for m in modalities if m not in SUPPORTED_MODALITIES]
    if not modalities or bad:
        raise BundleError(
            f"bundle {root}: {mwhere}: network_data_format.inputs.image.modality must list "
            f"CT and/or MR (got {image['modality']})"
        )
    intensity: dict[str, IntensityNorm] = {}
    for mod in modalities:
        spec = hpb["intensity"].get(mod)
        iwhere = f"{mwhere}: hpb_node.intensity.{mod}"
        if not isinstance(spec, dict):
            raise BundleError(f"bundle {root}: {iwhere} is required (normalisation for {mod})")
        try:
            intensity[mod] = IntensityNorm(
                kind=str(spec["kind"]), lower=float(spec["lower"]), upper=float(spec["upper"])
            )
        except KeyError as exc:
            raise BundleError(f"bundle {root}: {iwhere}.{exc.args[0]} is required") from None
        except (TypeError, ValueError) as exc:
            raise BundleError(f"bundle {root}: {iwhere}: {exc}") from None

    # network definition
    if "network_def" not in infer:
        raise BundleError(f"bundle {root}: configs/inference.json: network_def is required")
    network_def = infer["network_def"]
    if not trusted:
        try:
            check_network_def(network_def, "configs/inference.json: network_def")
        except NetworkError as exc:
            raise BundleError(f"bundle {root}: {exc}") from None
    if isinstance(network_def, dict):
        members = network_def.get("members")
        defs = (
            [(f"network_def.members[{i}]", m) for i, m in enumerate(members)]
            if network_def.get("_target_") == ENSEMBLE_TARGET and isinstance(members, list)
            else [("network_def", network_def)]
        )
        for where, one in defs:
            for key, want in (("in_channels", 1), ("out_channels", len(labels))):
                got = one.get(key) if isinstance(one, dict) else None
                if isinstance(got, int) and got != want:
                    raise BundleError(
                        f"bundle {root}: configs/inference.json: {where}.{key} is {got}, "
                        f"the metadata declares {want}"
                    )

    # weights
    weights = (root / hpb["weights"]).resolve()
    if root not in weights.parents:
        raise BundleError(f"bundle {root}: {mwhere}: hpb_node.weights must lie inside the bundle")
    if not weights.is_file():
        raise BundleError(f"bundle {root}: {mwhere}: hpb_node.weights: {hpb['weights']} is missing")
    digest = sha256_file(weights)
    if digest != hpb["weights_sha256"].lower():
        raise BundleError(
            f"bundle {root}: {mwhere}: hpb_node.weights_sha256 does not match "
            f"{hpb['weights']} (file has {digest})"
        )
    if not (root / "docs" / "README.md").is_file():
        raise BundleError(f"bundle {root}: docs/README.md (model card) is missing")
    organ_names = {o.value for o in Organ} & names
    try:
        post = PostProcess.from_json(hpb.get("postprocess", {}), organ_names)
    except BundleError as exc:
        raise BundleError(f"bundle {root}: {mwhere}: hpb_node.{exc}") from None

    return Bundle(
        root=root,
        name=meta["name"],
        version=meta["version"],
        labels=labels,
        spacing_mm=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        roi_size=(int(roi[0]), int(roi[1]), int(roi[2])),
        intensity=intensity,
        weights_path=weights,
        weights_sha256=digest,
        min_lesion_ml=float(hpb["min_lesion_ml"]),
        network_def=dict(network_def) if isinstance(network_def, dict) else {},
        metadata=meta,
        trusted=trusted,
        overlap=float(hpb.get("overlap", 0.25)),
        extra={"inference_config": infer},
        postprocess=post,
    )


def write_bundle(
    out_dir: Path | str,
    *,
    name: str,
    version: str,
    network_def: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    labels: Mapping[int, str],
    spacing_mm: tuple[float, float, float],
    roi_size: tuple[int, int, int],
    intensity: Mapping[str, IntensityNorm],
    min_lesion_ml: float,
    description: str,
    readme: str,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a bundle directory (replacing one that exists) and check it by loading it."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "configs").mkdir(parents=True)
    (tmp / "models").mkdir()
    (tmp / "docs").mkdir()
    weights = tmp / "models" / "model.pt"
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, weights)
    import monai
    import numpy

    meta: dict[str, Any] = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "name": name,
        "version": version,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "task": "Segmentation of liver, gallbladder, pancreas, spleen, portal/splenic vein, "
        "kidneys and focal lesions on abdominal CT and MR",
        "description": description,
        "intended_use": "Research and demonstration only. NOT FOR CLINICAL USE. "
        "No model for ultrasound.",
        "authors": "hpb-node",
        "license": "Apache-2.0",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": sorted(intensity),
                    "num_channels": 1,
                    "spatial_shape": list(roi_size),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(labels),
                    "spatial_shape": list(roi_size),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {str(k): v for k, v in sorted(labels.items())},
                }
            },
        },
        "hpb_node": {
            "orientation": "index axes permuted/flipped to (superior, posterior, left)",
            "spacing_mm": list(spacing_mm),
            "roi_size": list(roi_size),
            "overlap": 0.25,
            "intensity": {
                m: {"kind": n.kind, "lower": n.lower, "upper": n.upper}
                for m, n in intensity.items()
            },
            "min_lesion_ml": min_lesion_ml,
            "weights": "models/model.pt",
            "weights_sha256": sha256_file(weights),
            **(dict(extra_metadata) if extra_metadata else {}),
        },
    }
    (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "configs" / "inference.json").write_text(
        json.dumps({"network_def": dict(network_def)}, indent=2) + "\n"
    )
    (tmp / "docs" / "README.md").write_text(readme)
    load_bundle(tmp)  # refuse to publish a bundle that breaks the contract
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("wrote bundle %s (%s %s)", out, name, version)
    return out
