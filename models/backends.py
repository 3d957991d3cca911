"""Other segmentation backends: MONAI Model Zoo bundles and TotalSegmentator.

Neither downloads anything. Weights must already be on a local path; a missing
path raises :class:`BackendError` saying what to put where.

* :func:`load_zoo_bundle`: any MONAI Model Zoo segmentation bundle directory
  (``configs/inference.json`` with ``network_def``, ``models/model.pt``) plus a
  small *label mapping* file written by the administrator (plain JSON; see
  :class:`ZooMapping`) that maps the bundle's output channels to the node's
  organ codes and declares the preprocessing the bundle expects. The result is
  a :class:`models.bundle.Bundle`, so :func:`models.inference.segment` runs it.
  Untrusted by default: ``network_def`` must be plain JSON with a whitelisted
  network (see :mod:`models.network`); only ``trusted=True`` lets MONAI's
  config parser evaluate the bundle's expressions.
* :class:`TotalSegmentatorBackend`: runs TotalSegmentator (optional extra,
  ``pip install TotalSegmentator``) with weights from a local folder, and maps
  its class names to the node's organs. The mapping functions
  (:func:`organ_masks_from_totalseg_dir`, :func:`organ_masks_from_totalseg_labelmap`)
  also read existing TotalSegmentator outputs.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.bundle import Bundle, BundleError, IntensityNorm, sha256_file
from models.inference import Segmentation
from models.network import LESION_LABEL, NetworkError, check_network_def
from models.nifti import load_nifti_krc, save_nifti_krc
from models.vocab import Organ
from models.volume import Volume


class BackendError(ValueError):
    """A backend cannot run; the message says what is missing and where to put it."""


# ---------------------------------------------------------------------------
# TotalSegmentator label mapping

#: TotalSegmentator class name -> node organ (classes of the "total" and "total_mr" tasks).
TOTALSEG_NAME_TO_ORGAN: dict[str, Organ] = {
    "liver": Organ.LIVER,
    "gallbladder": Organ.GALLBLADDER,
    "pancreas": Organ.PANCREAS,
    "spleen": Organ.SPLEEN,
    "portal_vein_and_splenic_vein": Organ.PORTAL_SPLENIC_VEIN,
    "kidney_left": Organ.KIDNEY_LEFT,
    "kidney_right": Organ.KIDNEY_RIGHT,
}
#: Label values of TotalSegmentator's ``total_mr`` multi-label output for the classes
#: the node uses (as in the shared MR example's README: spleen 1, kidney_right 2,
#: kidney_left 3, gallbladder 4, liver 5, pancreas 7, portal/splenic vein 25).
TOTALSEG_MR_VALUES: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    7: "pancreas",
    25: "portal_vein_and_splenic_vein",
}


def organ_masks_from_totalseg_dir(
    folder: Path | str, shape: tuple[int, ...] | None = None
) -> dict[Organ, npt.NDArray[np.bool_]]:
    """Read TotalSegmentator's one-file-per-class output (``<class>.nii.gz``) as node organs.

    Classes the node does not use are ignored; a node organ without a file is absent."""
    root = Path(folder)
    if not root.is_dir():
        raise BackendError(f"TotalSegmentator output folder {root} does not exist")
    out: dict[Organ, npt.NDArray[np.bool_]] = {}
    for name, organ in TOTALSEG_NAME_TO_ORGAN.items():
        path = root / f"{name}.nii.gz"
        if not path.is_file():
            continue
        arr, _ = load_nifti_krc(path)
        if shape is not None and arr.shape != tuple(shape):
            raise BackendError(f"{path}: shape {arr.shape} differs from the image {shape}")
        out[organ] = np.asarray(arr) > 0
    return out


def organ_masks_from_totalseg_labelmap(
    labelmap: npt.NDArray[Any], values: Mapping[int, str] = TOTALSEG_MR_VALUES
) -> dict[Organ, npt.NDArray[np.bool_]]:
    """Split a TotalSegmentator multi-label map (``values``: label value -> class name)."""
    lab = np.asarray(labelmap)
    out: dict[Organ, npt.NDArray[np.bool_]] = {}
    for value, name in values.items():
        organ = TOTALSEG_NAME_TO_ORGAN.get(name)
        if organ is not None:
            out[organ] = lab == value
    return out


def totalseg_manifest_rows(shared_data: Path | str) -> list[dict[str, Any]]:
    """Dataset-manifest rows (docs/dataset-manifest.md) for the TotalSegmentator example
    CT (per-class masks) and MR (label map) in the shared data folder, absolute paths."""
    root = Path(shared_data).resolve()
    ct, mr = root / "ct_abdomen_3mm", root / "mr_abdomen_3mm"
    return [
        {
            "version": 1,
            "case_id": "real-ct-abdomen-3mm",
            "modality": "CT",
            "split": "train",
            "source": "totalsegmentator-example",
            "synthetic": False,
            "image": str(ct / "ct.nii.gz"),
            "label_masks": {
                name: str(ct / "labels" / f"{name}.nii.gz") for name in TOTALSEG_NAME_TO_ORGAN
            },
        },
        {
            "version": 1,
            "case_id": "real-mr-abdomen-3mm",
            "modality": "MR",
            "split": "train",
            "source": "totalsegmentator-example",
            "synthetic": False,
            "image": str(mr / "mr.nii.gz"),
            "label": str(mr / "labels.nii.gz"),
            "label_table": {str(k): v for k, v in TOTALSEG_MR_VALUES.items()},
        },
    ]


# ---------------------------------------------------------------------------
# TotalSegmentator backend

_TOTALSEG_TASKS = {"total": "CT", "total_mr": "MR"}


@dataclass(frozen=True)
class TotalSegmentatorBackend:
    """Run an installed TotalSegmentator with weights from ``weights_dir`` (no download).

    ``weights_dir`` is what TotalSegmentator calls its weights folder (the
    ``nnunet/results`` folder under ``TOTALSEG_HOME_DIR``, holding
    ``Dataset*`` sub-folders); it is passed as ``TOTALSEG_WEIGHTS_PATH``."""

    weights_dir: Path
    task: str = "total"
    device: str = "cpu"
    fast: bool = False

    def __post_init__(self) -> None:
        if self.task not in _TOTALSEG_TASKS:
            raise BackendError(f"TotalSegmentator task must be one of {sorted(_TOTALSEG_TASKS)}")

    def check(self) -> None:
        """Raise BackendError unless the package and the local weights are present."""
        if importlib.util.find_spec("totalsegmentator") is None:
            raise BackendError(
                "TotalSegmentator is not installed: `pip install TotalSegmentator` into the "
                "node's environment (optional extra), then put its weights on a local path"
            )
        wd = Path(self.weights_dir)
        datasets = sorted(p.name for p in wd.glob("Dataset*")) if wd.is_dir() else []
        if not datasets:
            raise BackendError(
                f"TotalSegmentator weights not found: put the task '{self.task}' weight folders "
                f"(Dataset<id>_... as TotalSegmentator stores them under "
                f"$TOTALSEG_HOME_DIR/nnunet/results) into {wd}; the node never downloads them"
            )

    def segment(self, volume: Volume) -> Segmentation:
        self.check()
        modality = _TOTALSEG_TASKS[self.task]
        if volume.modality.upper() != modality:
            raise BackendError(
                f"TotalSegmentator task {self.task!r} is for {modality}, the series is "
                f"{volume.modality}"
            )
        os.environ["TOTALSEG_WEIGHTS_PATH"] = str(Path(self.weights_dir).resolve())
        api = importlib.import_module("totalsegmentator.python_api")
        with tempfile.TemporaryDirectory(prefix="hpb-totalseg-") as tmp:
            src = Path(tmp) / "image.nii.gz"
            out = Path(tmp) / "seg"
            save_nifti_krc(np.asarray(volume.array), volume.affine, src)
            api.totalsegmentator(
                src,
                out,
                task=self.task,
                fast=self.fast,
                device=self.device,
                roi_subset=list(TOTALSEG_NAME_TO_ORGAN),
                quiet=True,
            )
            masks = organ_masks_from_totalseg_dir(out, volume.shape)
        return Segmentation(
            organ_masks=masks,
            lesion_instances=np.zeros(volume.shape, dtype=np.int32),
            lesion_organs={},
            lesion_confidence={},
            organ_confidence={o: 1.0 for o in masks},
        )


# ---------------------------------------------------------------------------
# MONAI Model Zoo bundles


@dataclass(frozen=True)
class ZooMapping:
    """How to run a zoo bundle, written by the administrator as plain JSON::

    {"name": "spleen_ct_segmentation", "version": "0.5.9",
     "labels": {"1": "spleen"},                 # channel -> Organ value or "lesion"
     "spacing_mm": [1.5, 1.5, 2.0],             # in the bundle's axis order
     "axcodes": "RAS",                          # the bundle's array orientation
     "roi_size": [96, 96, 96],                  # in the bundle's axis order
     "intensity": {"CT": {"kind": "window", "lower": -57, "upper": 164}},
     "min_lesion_ml": 0.5}
    """

    labels: dict[int, str]
    spacing_mm: tuple[float, float, float]
    roi_size: tuple[int, int, int]
    intensity: dict[str, IntensityNorm]
    axcodes: str = "RAS"
    name: str = ""
    version: str = ""
    min_lesion_ml: float = 0.5

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "label mapping") -> ZooMapping:
        try:
            labels = {int(k): str(v) for k, v in data["labels"].items()}
            known = {o.value for o in Organ} | {LESION_LABEL}
            bad = sorted(v for v in labels.values() if v not in known)
            if bad:
                raise BackendError(f"{where}: labels: unknown organ code(s) {', '.join(bad)}")
            if 0 in labels:
                raise BackendError(f"{where}: labels: channel 0 is the background")
            sp = [float(v) for v in data["spacing_mm"]]
            roi = [int(v) for v in data["roi_size"]]
            if len(sp) != 3 or len(roi) != 3 or min(sp) <= 0:
                raise BackendError(f"{where}: spacing_mm and roi_size need 3 positive values")
            intensity = {
                str(m).upper(): IntensityNorm(str(s["kind"]), float(s["lower"]), float(s["upper"]))
                for m, s in data["intensity"].items()
            }
            axcodes = str(data.get("axcodes", "RAS")).upper()
        except KeyError as exc:
            raise BackendError(f"{where}: {exc.args[0]} is required") from None
        except (TypeError, ValueError, AttributeError, BundleError) as exc:
            if isinstance(exc, BackendError):
                raise
            raise BackendError(f"{where}: {exc}") from None
        if sorted(axcodes.replace("L", "R").replace("P", "A").replace("I", "S")) != ["A", "R", "S"]:
            raise BackendError(f"{where}: axcodes must be like 'RAS' or 'LPS', got {axcodes!r}")
        return cls(
            labels=labels,
            spacing_mm=(sp[0], sp[1], sp[2]),
            roi_size=(roi[0], roi[1], roi[2]),
            intensity=intensity,
            axcodes=axcodes,
            name=str(data.get("name", "")),
            version=str(data.get("version", "")),
            min_lesion_ml=float(data.get("min_lesion_ml", 0.5)),
        )


def load_zoo_bundle(
    bundle_dir: Path | str, mapping: ZooMapping | Path | str, *, trusted: bool = False
) -> Bundle:
    """A MONAI Model Zoo bundle as a node :class:`Bundle` (see the module docstring)."""
    root = Path(bundle_dir).resolve()
    if not isinstance(mapping, ZooMapping):
        mpath = Path(mapping)
        try:
            mdata = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BackendError(f"label mapping {mpath}: cannot read: {exc}") from exc
        mapping = ZooMapping.from_json(mdata, f"label mapping {mpath}")
    infer_path = root / "configs" / "inference.json"
    weights = root / "models" / "model.pt"
    if not infer_path.is_file():
        raise BackendError(
            f"MONAI bundle not found: put the unpacked bundle (configs/inference.json, "
            f"models/model.pt) at {root}; the node never downloads bundles"
        )
    if not weights.is_file():
        raise BackendError(f"MONAI bundle weights missing: put model.pt at {weights}")
    try:
        infer = json.loads(infer_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BackendError(f"{infer_path}: not valid JSON: {exc}") from exc
    network_def = infer.get("network_def")
    if network_def is None:
        raise BackendError(f"{infer_path}: network_def is required")
    if not trusted:
        try:
            check_network_def(network_def, "configs/inference.json: network_def")
        except NetworkError as exc:
            raise BackendError(f"MONAI bundle {root}: {exc}") from None
    canonical = ("S", "P", "L")
    opposite = {"S": "I", "P": "A", "L": "R"}
    # canonical axis i is the bundle's axis inv[i]
    inv = [
        next(j for j, ch in enumerate(mapping.axcodes) if ch in (c, opposite[c])) for c in canonical
    ]
    n_out = network_def.get("out_channels") if isinstance(network_def, dict) else None
    n_channels = int(n_out) if isinstance(n_out, int) else max(mapping.labels) + 1
    labels = {0: "background"} | {
        ch: mapping.labels.get(ch, f"unmapped_{ch}") for ch in range(1, n_channels)
    }
    meta_path = root / "configs" / "metadata.json"
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
    return Bundle(
        root=root,
        name=mapping.name or str(meta.get("name", root.name)),
        version=mapping.version or str(meta.get("version", "unknown")),
        labels=labels,
        spacing_mm=(
            mapping.spacing_mm[inv[0]],
            mapping.spacing_mm[inv[1]],
            mapping.spacing_mm[inv[2]],
        ),
        roi_size=mapping.roi_size,
        intensity=mapping.intensity,
        weights_path=weights,
        weights_sha256=sha256_file(weights),
        min_lesion_ml=mapping.min_lesion_ml,
        network_def=dict(network_def) if isinstance(network_def, dict) else {},
        metadata=meta,
        trusted=trusted,
        extra={"inference_config": infer, "axcodes": mapping.axcodes},
    )
