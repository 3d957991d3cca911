"""Training the node's segmentation network on a dataset manifest, export to a bundle.

Data: a JSON-lines dataset manifest (``docs/dataset-manifest.md``). Each case
has an image (a NIfTI file, or a folder holding one DICOM series), an organ
label map (NIfTI, values per the record's ``label_table`` or the synthetic
``ORGAN_LABELS``) or per-structure binary masks (``label_masks``), and optionally
a lesion instance map. Labels are mapped by organ name onto the network's
channels (:data:`models.network.DEFAULT_LABELS`); lesion voxels become the
``lesion`` channel; structures the network does not segment become background.

Every case is preprocessed once, exactly as inference does it (reorientation,
resampling to the bundle spacing, CT window / MR percentiles), and kept in
memory. Training samples patches centred on a voxel of a randomly chosen class
(rare classes oversampled), augments them with small affine transforms and
intensity changes (no left/right flips: they would break anatomy), and
minimises Dice + cross-entropy. Validation computes the Dice per class with
sliding-window inference after every epoch. Checkpoints (``last.pt``,
``best.pt``) hold model, optimiser, scheduler and history, so ``resume`` picks
up where a run stopped. The best checkpoint is exported as a bundle.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from models.bundle import IntensityNorm, write_bundle
from models.inference import Reorientation, normalise_intensity, resample_labels, target_shape
from models.network import (
    DEFAULT_LABELS,
    LESION_LABEL,
    build_network,
    demo_network_def,
    tiny_network_def,
)
from models.nifti import load_nifti_krc

log = logging.getLogger(__name__)

DEFAULT_INTENSITY: dict[str, IntensityNorm] = {
    "CT": IntensityNorm("window", -200.0, 300.0),
    "MR": IntensityNorm("percentile", 1.0, 99.5),
}
#: value -> organ name of the synthetic generator's organ label maps (models.synthetic.labels)
SYNTHETIC_LABEL_TABLE: dict[int, str] = {
    1: "liver",
    2: "gallbladder",
    3: "pancreas",
    4: "spleen",
    5: "portal_vein_and_splenic_vein",
    6: "kidney_left",
    7: "kidney_right",
    8: "bile_duct",
}
#: sampling weight of patch centres per channel name (rare, small structures more often)
CLASS_WEIGHTS: dict[str, float] = {
    "background": 0.5,
    "liver": 1.0,
    "gallbladder": 1.5,
    "pancreas": 2.5,
    "spleen": 0.7,
    "portal_vein_and_splenic_vein": 1.0,
    "kidney_left": 0.5,
    "kidney_right": 0.5,
    LESION_LABEL: 3.0,
}


class TrainError(ValueError):
    """Training cannot start or continue; the message says why."""


# ---------------------------------------------------------------------------
# manifest


@dataclass(frozen=True)
class TrainRecord:
    case_id: str
    image: Path
    modality: str
    split: str = "train"
    label: Path | None = None
    label_table: dict[int, str] = field(default_factory=lambda: dict(SYNTHETIC_LABEL_TABLE))
    label_masks: dict[str, Path] = field(default_factory=dict)
    lesions: Path | None = None
    source: str = "synthetic"
    weight: float = 1.0  # relative sampling weight of the case's patches


def _path(value: Any, base: Path) -> Path:
    p = Path(str(value))
    return p if p.is_absolute() else (base / p)


def _first(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if data.get(key) not in (None, ""):
            return data[key]
    return None


def record_from_json(data: Mapping[str, Any], base: Path, line: str = "") -> TrainRecord:
    """One manifest line -> ``TrainRecord`` (paths relative to the manifest's folder)."""
    where = f"manifest {line}".strip()
    image = _first(data, "image", "image_nifti", "nifti", "dicom_dir", "series_dir", "dicom")
    if image is None:
        raise TrainError(f"{where}: no image path")
    label = _first(data, "label", "labels", "organ_labels", "label_nifti", "organ_labels_nifti")
    masks = data.get("label_masks") or {}
    if label is None and not masks:
        raise TrainError(f"{where}: no organ label map (label) nor label_masks")
    lesions = _first(data, "lesions", "lesion_instances", "lesion_mask", "lesion_instances_nifti")
    table = data.get("label_table")
    return TrainRecord(
        case_id=str(data.get("case_id", data.get("id", image))),
        image=_path(image, base),
        modality=str(data.get("modality", "CT")).upper(),
        split=str(data.get("split", "train")),
        label=_path(label, base) if label is not None else None,
        label_table=(
            {int(k): str(v) for k, v in table.items()} if table else dict(SYNTHETIC_LABEL_TABLE)
        ),
        label_masks={str(k): _path(v, base) for k, v in masks.items()},
        lesions=_path(lesions, base) if lesions is not None else None,
        source=str(data.get("source", "synthetic")),
        weight=float(data.get("weight", 1.0)),
    )


def read_manifest(path: Path | str) -> list[TrainRecord]:
    """Read a JSON-lines manifest (blank lines and ``#`` comments ignored)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TrainError(f"cannot read manifest {p}: {exc}") from exc
    out = []
    for n, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainError(f"manifest {p} line {n}: not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise TrainError(f"manifest {p} line {n}: must be a JSON object")
        out.append(record_from_json(data, p.parent, f"{p} line {n}"))
    if not out:
        raise TrainError(f"manifest {p} lists no cases")
    return out


# ---------------------------------------------------------------------------
# loading and preprocessing


def load_image(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """A NIfTI file, or a folder with one DICOM series (via ``models.loader``)."""
    if path.is_dir():
        loader = importlib.import_module("models.loader")  # DICOM series -> Volume
        vol = loader.load_series(path)
        return vol.array, vol.affine
    return load_nifti_krc(path)


def load_labels(
    record: TrainRecord, shape: tuple[int, ...], labels: Mapping[int, str] = DEFAULT_LABELS
) -> npt.NDArray[np.uint8]:
    """The record's labels on the image grid as network channels (uint8)."""
    channel_of = {name: ch for ch, name in labels.items()}
    out = np.zeros(shape, dtype=np.uint8)
    if record.label is not None:
        lab, _ = load_nifti_krc(record.label)
        if lab.shape != tuple(shape):
            raise TrainError(f"{record.case_id}: label shape {lab.shape} != image shape {shape}")
        lab = np.asarray(lab).astype(np.int64)
        lut = np.zeros(max(int(lab.max()), max(record.label_table, default=0)) + 1, np.uint8)
        for value, name in record.label_table.items():
            if name in channel_of and value >= 0:
                lut[value] = channel_of[name]
        out = lut[np.clip(lab, 0, len(lut) - 1)]
    for name, mpath in record.label_masks.items():
        if name not in channel_of:
            continue
        m, _ = load_nifti_krc(mpath)
        if m.shape != tuple(shape):
            raise TrainError(
                f"{record.case_id}: mask {name} shape {m.shape} != image shape {shape}"
            )
        out[np.asarray(m) > 0] = channel_of[name]
    if record.lesions is not None:
        les, _ = load_nifti_krc(record.lesions)
        if les.shape != tuple(shape):
            raise TrainError(f"{record.case_id}: lesion shape {les.shape} != image shape {shape}")
        out[np.asarray(les) > 0] = channel_of[LESION_LABEL]
    return out


@dataclass
class Prepared:
    """One case on the network grid: image in [0, 1] (float16) and channel labels."""

    case_id: str
    modality: str
    image: npt.NDArray[np.float16]
    label: npt.NDArray[np.uint8]
    index: dict[int, npt.NDArray[np.int32]] = field(default_factory=dict)
    weight: float = 1.0


def prepare(
    image: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    label: npt.NDArray[np.uint8],
    modality: str,
    spacing: Sequence[float],
    intensity: Mapping[str, IntensityNorm],
    case_id: str = "",
    max_index: int = 4000,
    seed: int = 0,
) -> Prepared:
    """Preprocess as inference does (see :func:`models.inference.prepare_input`)."""
    reo = Reorientation.from_affine(affine)
    canon = reo.apply(image)
    lab = reo.apply(label)
    shape = (int(canon.shape[0]), int(canon.shape[1]), int(canon.shape[2]))
    net_shape = target_shape(shape, reo.spacing(affine), spacing)
    norm = normalise_intensity(canon, intensity[modality])
    x = torch.from_numpy(np.ascontiguousarray(norm))[None, None]
    if net_shape != shape:
        x = torch.nn.functional.interpolate(
            x, size=net_shape, mode="trilinear", align_corners=False
        )
    lab_net = np.ascontiguousarray(resample_labels(np.asarray(lab), net_shape))
    rng = np.random.default_rng(seed)
    index: dict[int, npt.NDArray[np.int32]] = {}
    flat = lab_net.ravel()
    for ch in np.unique(flat):
        where = np.flatnonzero(flat == ch)
        if where.size > max_index:
            where = rng.choice(where, max_index, replace=False)
        index[int(ch)] = where.astype(np.int32)
    return Prepared(
        case_id=case_id,
        modality=modality,
        image=x[0, 0].numpy().astype(np.float16),
        label=lab_net,
        index=index,
    )


def prepare_record(record: TrainRecord, config: TrainConfig) -> Prepared:
    image, affine = load_image(record.image)
    label = load_labels(record, image.shape)
    prepared = prepare(
        image,
        affine,
        label,
        record.modality,
        config.spacing_mm,
        config.intensity,
        case_id=record.case_id,
        seed=config.seed,
    )
    prepared.weight = record.weight
    return prepared


# ---------------------------------------------------------------------------
# sampling and augmentation


def sample_patch(
    case: Prepared,
    roi: Sequence[int],
    rng: np.random.Generator,
    weights: Mapping[int, float],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """A patch of ``roi`` centred (with jitter) on a voxel of a random present class."""
    classes = [c for c in case.index if weights.get(c, 0.0) > 0]
    p = np.array([weights[c] for c in classes], dtype=np.float64)
    ch = classes[int(rng.choice(len(classes), p=p / p.sum()))]
    flat = int(case.index[ch][int(rng.integers(len(case.index[ch])))])
    centre = np.unravel_index(flat, case.label.shape)
    img = np.zeros(tuple(roi), np.float32)
    lab = np.zeros(tuple(roi), np.uint8)
    src: list[slice] = []
    dst: list[slice] = []
    for axis, size in enumerate(roi):
        n = case.label.shape[axis]
        jitter = int(rng.integers(-size // 4, size // 4 + 1))
        start = int(centre[axis]) - size // 2 + jitter
        start = min(max(start, -max(size - n, 0) // 2 if n < size else 0), max(n - size, 0))
        s0, s1 = max(start, 0), min(start + size, n)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - start, s0 - start + (s1 - s0)))
    img[tuple(dst)] = case.image[tuple(src)]
    lab[tuple(dst)] = case.label[tuple(src)]
    return img, lab


def augmentation(seed: int) -> Compose:
    """Small affine and intensity augmentation; no flips (left/right matters)."""
    aug = Compose(
        [
            RandAffined(
                keys=("image", "label"),
                prob=0.35,
                rotate_range=(0.2, 0.05, 0.05),  # mostly in-plane (about the slice axis)
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),
            RandGaussianNoised(keys="image", std=0.02, prob=0.3),
        ]
    )
    aug.set_random_state(seed=seed)
    return aug


# ---------------------------------------------------------------------------
# training


@dataclass
class TrainConfig:
    manifests: list[Path]
    workdir: Path
    bundle_out: Path | None = None
    network: str = "demo"  # "demo" or "tiny"
    spacing_mm: tuple[float, float, float] = (3.0, 2.0, 2.0)
    roi_size: tuple[int, int, int] = (32, 96, 96)
    intensity: dict[str, IntensityNorm] = field(default_factory=lambda: dict(DEFAULT_INTENSITY))
    epochs: int = 20
    iterations_per_epoch: int = 50
    batch_size: int = 4
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    max_minutes: float | None = None
    max_val_cases: int = 8
    val_every: int = 1  # validate every N epochs (and always after the last one)
    threads: int = 2
    seed: int = 0
    resume: bool = False
    name: str = "hpb_demo"
    version: str = "0.1.0"
    min_lesion_ml: float = 0.1
    command: str = ""
    #: start from these weights (a bundle's ``models/model.pt`` or a checkpoint) instead
    #: of a random initialisation: fine-tuning; ignored when resuming
    init_weights: Path | None = None
    #: patch-centre sampling weight per channel name (defaults: :data:`CLASS_WEIGHTS`)
    sampling_weights: dict[str, float] = field(default_factory=dict)
    #: loss weight per channel name (Dice and cross-entropy; default 1 for every class)
    loss_weights: dict[str, float] = field(default_factory=dict)
    #: Dice over the whole batch instead of per patch, so that a patch without a small
    #: class (a lesion) does not push that class's probability down everywhere
    batch_dice: bool = False
    #: post-processing parameters written to the bundle (``hpb_node.postprocess``)
    postprocess: dict[str, Any] = field(default_factory=dict)

    def network_def(self) -> dict[str, Any]:
        if self.network == "demo":
            return demo_network_def(len(DEFAULT_LABELS))
        if self.network == "tiny":
            return tiny_network_def(len(DEFAULT_LABELS))
        raise TrainError(f"network must be 'demo' or 'tiny', got {self.network!r}")


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_dice: dict[str, float]
    history: list[dict[str, Any]]
    seconds: float
    bundle: Path | None
    train_cases: int
    val_cases: int


def dice_per_class(
    pred: npt.NDArray[Any], truth: npt.NDArray[Any], labels: Mapping[int, str]
) -> dict[str, float]:
    """Dice per channel name; ``nan`` where the class is absent from both."""
    out: dict[str, float] = {}
    for ch, name in labels.items():
        if ch == 0:
            continue
        p, t = pred == ch, truth == ch
        denom = int(p.sum()) + int(t.sum())
        out[name] = float(2 * int((p & t).sum()) / denom) if denom else float("nan")
    return out


def _split(records: list[TrainRecord], seed: int) -> tuple[list[TrainRecord], list[TrainRecord]]:
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split in ("val", "validation")]
    if not val and len(train) > 2:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(train))
        n_val = max(1, len(train) // 10)
        val = [train[i] for i in order[:n_val]]
        train = [train[i] for i in order[n_val:]]
    if not train:
        raise TrainError("the manifest has no training cases (split 'train')")
    return train, val


def validate(
    net: torch.nn.Module, cases: Sequence[Prepared], config: TrainConfig
) -> dict[str, float]:
    """Mean Dice per class over validation cases (network grid, no post-processing)."""
    per: dict[str, list[float]] = {}
    net.eval()
    with torch.inference_mode():
        for case in cases:
            x = torch.from_numpy(case.image.astype(np.float32))[None, None]
            logits = sliding_window_inference(
                x, config.roi_size, sw_batch_size=2, predictor=net, overlap=0.25, mode="gaussian"
            )
            assert isinstance(logits, torch.Tensor)
            pred = logits[0].argmax(0).numpy()
            for name, d in dice_per_class(pred, case.label, DEFAULT_LABELS).items():
                if not math.isnan(d):
                    per.setdefault(name, []).append(d)
    net.train()
    return {name: float(np.mean(v)) for name, v in per.items()}


def _mean_dice(d: Mapping[str, float]) -> float:
    keys = ("liver", "pancreas", "gallbladder", LESION_LABEL)
    vals = [d[k] for k in keys if k in d]
    return float(np.mean(vals)) if vals else 0.0


def model_card(config: TrainConfig, result: TrainResult, cases: Mapping[str, int]) -> str:
    dice = "\n".join(f"| {k} | {v:.3f} |" for k, v in sorted(result.best_dice.items()))
    sources = ", ".join(f"{k}: {v}" for k, v in sorted(cases.items()))
    return f"""# {config.name} {config.version}: HPB organ and lesion segmentation (demo)

**NOT FOR CLINICAL USE.** A small demonstration model trained mostly on
synthetic data. **There is no model for ultrasound**: the node answers US
series with "no model for US".

## What it does
3-D segmentation of liver, gallbladder, pancreas, spleen, portal/splenic vein,
left and right kidney, and focal lesions (one "lesion" class, split into
instances and assigned to organs after inference) on abdominal CT and MR.

## Network and preprocessing
- Network: `{json.dumps(config.network_def())}`
- Input: one channel; index axes reoriented to (superior, posterior, left);
  resampled to {list(config.spacing_mm)} mm (slice, row, column); CT window
  {config.intensity["CT"].lower:g}..{config.intensity["CT"].upper:g} HU, MR percentiles
  {config.intensity["MR"].lower:g}..{config.intensity["MR"].upper:g}, scaled to [0, 1].
- Sliding-window inference, ROI {list(config.roi_size)}, Gaussian blending.

## Training
- Data (cases by source): {sources}. Synthetic cases come from the project's
  own generator (`hpb-node synth`); numbers measured on them are synthetic.
  Real cases: TotalSegmentator example CT and MR (labels are model output,
  Apache-2.0), used for training where listed.
- Command: `{config.command or "hpb-node train ..."}`
- Epochs run: {result.epochs_run} ({config.iterations_per_epoch} iterations of batch {config.batch_size}),
  best epoch {result.best_epoch}; wall time {result.seconds / 60:.1f} min on a shared
  {config.threads}-thread CPU (no GPU).
- Loss: Dice + cross-entropy; AdamW, learning rate {config.learning_rate:g}, cosine decay.
- Augmentation: small rotations/scaling, intensity scale/shift/gamma/noise; no flips.

## Validation Dice (network grid, best epoch, {result.val_cases} validation cases)
| class | Dice |
|---|---|
{dice}

See `bench/results/model_quality.json` for Dice and lesion sensitivity measured
with the full inference pipeline on held-out synthetic cases and the real CT/MR.

## Limitations
Trained on few real cases and many synthetic ones; it will fail on real
anatomy and pathology it has not seen. Lesion detection below about 10 mm is
unreliable. Not validated for any clinical purpose.
"""


def train(config: TrainConfig, progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume), validate each epoch, checkpoint, export the best to a bundle."""
    say = progress or log.info
    torch.set_num_threads(max(1, config.threads))
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    started = time.monotonic()
    records: list[TrainRecord] = []
    for m in config.manifests:
        records.extend(read_manifest(m))
    train_recs, val_recs = _split(records, config.seed)
    val_recs = val_recs[: config.max_val_cases]
    say(f"{len(train_recs)} training and {len(val_recs)} validation cases")
    train_cases = [prepare_record(r, config) for r in train_recs]
    val_cases = [prepare_record(r, config) for r in val_recs]
    say(f"preprocessed in {time.monotonic() - started:.0f} s")
    train_start = time.monotonic()
    # With a time budget the learning rate follows a cosine over the remaining wall
    # time (so it has decayed when the budget ends); otherwise over the iterations.
    deadline = None if config.max_minutes is None else started + 60.0 * config.max_minutes

    def cosine(frac: float) -> float:
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))

    sampling = {**CLASS_WEIGHTS, **config.sampling_weights}
    weights_by_ch = {ch: sampling.get(name, 1.0) for ch, name in DEFAULT_LABELS.items()}
    case_p = np.array([max(c.weight, 0.0) for c in train_cases], dtype=np.float64)
    if case_p.sum() <= 0:
        raise TrainError("every training case has weight 0")
    case_p /= case_p.sum()

    net = build_network(config.network_def())
    if config.init_weights is not None and not config.resume:
        init = torch.load(config.init_weights, map_location="cpu", weights_only=True)
        if isinstance(init, dict) and isinstance(init.get("model"), dict):
            init = init["model"]
        try:
            net.load_state_dict(init)
        except RuntimeError as exc:
            raise TrainError(f"--init-weights {config.init_weights}: {exc}") from exc
        say(f"initialised from {config.init_weights}")
    opt = torch.optim.AdamW(
        net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    total = config.epochs * config.iterations_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: cosine(it / max(total, 1)))
    unknown = sorted(set(config.loss_weights) - set(DEFAULT_LABELS.values()))
    if unknown:
        raise TrainError(f"loss weights for unknown class(es): {', '.join(unknown)}")
    class_w = torch.tensor(
        [float(config.loss_weights.get(name, 1.0)) for _, name in sorted(DEFAULT_LABELS.items())]
    )
    loss_fn = DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        batch=config.batch_dice,
        weight=class_w if config.loss_weights else None,
    )
    config.workdir.mkdir(parents=True, exist_ok=True)
    last, best_path = config.workdir / "last.pt", config.workdir / "best.pt"
    history: list[dict[str, Any]] = []
    start_epoch, best_score, best_epoch = 0, -1.0, 0
    best_dice: dict[str, float] = {}
    if config.resume:
        if not last.is_file():
            raise TrainError(f"--resume: no checkpoint at {last}")
        ck = torch.load(last, map_location="cpu", weights_only=False)
        if ck.get("network_def") != config.network_def():
            raise TrainError(f"--resume: {last} was trained with a different network")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch = int(ck["epoch"]) + 1
        best_score, best_epoch = float(ck["best_score"]), int(ck["best_epoch"])
        best_dice, history = dict(ck["best_dice"]), list(ck["history"])
        rng = np.random.default_rng(config.seed + start_epoch)
        say(f"resumed from {last} at epoch {start_epoch}")
    aug = augmentation(config.seed + start_epoch)
    net.train()
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs):
        t0 = time.monotonic()
        losses = []
        for _ in range(config.iterations_per_epoch):
            xs, ys = [], []
            for _ in range(config.batch_size):
                case = train_cases[int(rng.choice(len(train_cases), p=case_p))]
                img, lab = sample_patch(case, config.roi_size, rng, weights_by_ch)
                d = aug({"image": img[None], "label": lab[None].astype(np.float32)})
                xs.append(torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32))
                ys.append(torch.as_tensor(np.asarray(d["label"]), dtype=torch.float32))
            x, y = torch.stack(xs), torch.stack(ys).round()
            loss = loss_fn(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if deadline is None:
                sched.step()
            else:
                lr = config.learning_rate * cosine(
                    (time.monotonic() - train_start) / max(deadline - train_start, 1.0)
                )
                for group in opt.param_groups:
                    group["lr"] = lr
            losses.append(float(loss.detach()))
        final = epoch == config.epochs - 1 or (
            config.max_minutes is not None
            and (time.monotonic() - started) / 60 > config.max_minutes
        )
        due = final or (epoch + 1) % max(config.val_every, 1) == 0
        dice = validate(net, val_cases, config) if val_cases and due else {}
        if val_cases and not due:
            score = -float("inf")
        else:
            score = _mean_dice(dice) if val_cases else -float(np.mean(losses))
        entry = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "val_dice": dice,
            "seconds": time.monotonic() - t0,
        }
        history.append(entry)
        say(
            f"epoch {epoch}: loss {entry['loss']:.4f} "
            + " ".join(f"{k}={v:.3f}" for k, v in sorted(dice.items()))
            + f" ({entry['seconds']:.0f} s)"
        )
        if score > best_score:
            best_score, best_epoch, best_dice = score, epoch, dice
            torch.save({"model": net.state_dict(), "network_def": config.network_def()}, best_path)
        torch.save(
            {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "best_dice": best_dice,
                "history": history,
                "network_def": config.network_def(),
                "config": {k: str(v) for k, v in asdict(config).items()},
            },
            last,
        )
        if (
            config.max_minutes is not None
            and (time.monotonic() - started) / 60 > config.max_minutes
        ):
            say(f"time budget of {config.max_minutes} min reached after epoch {epoch}")
            break
    seconds = time.monotonic() - started
    result = TrainResult(
        epochs_run=epoch + 1,
        best_epoch=best_epoch,
        best_dice=best_dice,
        history=history,
        seconds=seconds,
        bundle=None,
        train_cases=len(train_cases),
        val_cases=len(val_cases),
    )
    if config.bundle_out is not None:
        result.bundle = export(config, result, best_path if best_path.is_file() else last, records)
        say(f"bundle written to {result.bundle}")
    return result


def export(
    config: TrainConfig, result: TrainResult, checkpoint: Path, records: Sequence[TrainRecord]
) -> Path:
    """Write the checkpoint's weights as a bundle with a generated model card."""
    assert config.bundle_out is not None
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sources: dict[str, int] = {}
    for r in records:
        key = f"{r.source} {r.modality} ({r.split})"
        sources[key] = sources.get(key, 0) + 1
    return write_bundle(
        config.bundle_out,
        name=config.name,
        version=config.version,
        network_def=config.network_def(),
        state_dict=ck["model"],
        labels=DEFAULT_LABELS,
        spacing_mm=config.spacing_mm,
        roi_size=config.roi_size,
        intensity=config.intensity,
        min_lesion_ml=config.min_lesion_ml,
        description="Demo 3-D U-Net for HPB organs and focal lesions on CT and MR; "
        "trained mostly on synthetic data. Not for clinical use.",
        readme=model_card(config, result, sources),
        extra_metadata={
            "training": {
                "epochs_run": result.epochs_run,
                "best_epoch": result.best_epoch,
                "seconds": round(result.seconds, 1),
                "validation_dice": result.best_dice,
                "cases": sources,
                "command": config.command,
            },
            **({"postprocess": dict(config.postprocess)} if config.postprocess else {}),
        },
    )
