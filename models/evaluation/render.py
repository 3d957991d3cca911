"""The evaluation as files: a JSON of every figure and a self-contained HTML page
(tables, and plots as inline base64 PNGs drawn with matplotlib's Agg backend)."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure

from models.evaluation.dataset import CaseMasks, EvaluationSet, resample_nearest
from models.nifti import load_nifti_krc

log = logging.getLogger(__name__)


def jsonable(value: Any) -> Any:
    """NaN -> null, ±inf -> "inf"/"-inf", numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(
        json.dumps(jsonable(result), indent=1, sort_keys=True, allow_nan=False), encoding="utf-8"
    )


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------
# plots


def plot_roc(diag: dict[str, Any]) -> str | None:
    per = diag.get("per_disease", {})
    if not per:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    for d, e in per.items():
        auc = e["auroc"]["value"]
        label = f"{d} (AUROC {auc:.2f})" if not math.isnan(auc) else f"{d} (one class)"
        ax.plot(e["roc"]["fpr"], e["roc"]["tpr"], label=label)  # ties: straight segments
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title="ROC per disease",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=6, loc="lower right")
    return _png(fig)


def plot_calibration(diag: dict[str, Any]) -> str | None:
    per = {d: e for d, e in diag.get("per_disease", {}).items() if "calibration" in e}
    if not per:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    for d, e in per.items():
        c = e["calibration"]
        x = np.array(c["bin_confidence"], dtype=float)
        y = np.array(c["bin_frequency"], dtype=float)
        ok = ~np.isnan(x)
        ax.plot(x[ok], y[ok], "o-", ms=3, label=f"{d} (ECE {c['ece']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(
        xlabel="mean predicted probability",
        ylabel="observed frequency",
        title="Reliability diagram",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(fontsize=6, loc="upper left")
    return _png(fig)


def plot_dice(seg: dict[str, Any]) -> str | None:
    rows = seg.get("per_case", [])
    names = sorted({r["structure"] for r in rows})
    if not names:
        return None
    data = [[r["dice"] for r in rows if r["structure"] == n] for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names)), 3.5))
    ax.boxplot(data)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="Dice", ylim=(0, 1.02), title="Dice per structure")
    return _png(fig)


def plot_froc(seg: dict[str, Any]) -> str | None:
    les = seg.get("lesions")
    if not les:
        return None
    c = les["detection"]["curve"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(c["fp_per_case"], c["sensitivity"], "o-", ms=3)
    ax.set(
        xlabel="false positives per case", ylabel="lesion sensitivity", ylim=(0, 1.02), title="FROC"
    )
    return _png(fig)


def load_image(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]] | None:
    """A study image for overlays: a NIfTI file, or a DICOM series folder
    (:func:`models.loader.load_series`); ``None`` when neither can be read."""
    if path.is_file() and path.name.endswith((".nii", ".nii.gz")):
        arr, aff = load_nifti_krc(path)
        return np.asarray(arr, dtype=np.float32), aff
    if path.is_dir():
        from models.loader import load_series
        from models.volume import VolumeError

        try:
            vol = load_series(path)
        except VolumeError as exc:
            log.warning("study image %s not usable for overlays: %s", path.name, exc)
            return None
        return np.asarray(vol.array, dtype=np.float32), vol.affine
    return None


def plot_overlay(
    title: str,
    ref: npt.NDArray[np.bool_],
    pred: npt.NDArray[np.bool_],
    image: npt.NDArray[Any] | None,
) -> str:
    """The slice where prediction and reference disagree most, reference in green,
    prediction in red, on the image when one is given."""
    disagree = (ref ^ pred).sum(axis=(1, 2))
    k = int(np.argmax(disagree)) if disagree.any() else int(np.argmax(ref.sum(axis=(1, 2))))
    fig, ax = plt.subplots(figsize=(3.5, 3.5))
    if image is not None:
        lo, hi = np.percentile(image[k], [1, 99])
        ax.imshow(image[k], cmap="gray", vmin=lo, vmax=hi)
    else:
        ax.imshow(np.zeros(ref.shape[1:]), cmap="gray")
    if ref[k].any():
        ax.contour(ref[k].astype(float), levels=[0.5], colors="lime", linewidths=1)
    if pred[k].any():
        ax.contour(pred[k].astype(float), levels=[0.5], colors="red", linewidths=1)
    ax.set_title(f"{title}\nslice {k}: reference green, model red", fontsize=7)
    ax.axis("off")
    return _png(fig)


def worst_overlays(
    result: dict[str, Any], ref: EvaluationSet, res: EvaluationSet, per_structure: int = 1
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    rows = result.get("segmentation", {}).get("per_case", [])
    images: dict[str, tuple[npt.NDArray[Any], npt.NDArray[np.float64]] | None] = {}
    for name in sorted({r["structure"] for r in rows}):
        worst = sorted((r for r in rows if r["structure"] == name), key=lambda r: r["dice"])[
            :per_structure
        ]
        for r in worst:
            case_id = r["case_id"]
            rm = ref.masks[case_id]
            pm = res.masks.get(case_id)
            grid = (
                pm.on_grid(rm.shape, rm.affine)
                if pm is not None
                else CaseMasks(rm.affine, rm.shape)
            )
            pmask = grid.structures.get(name, np.zeros(rm.shape, bool))
            if case_id not in images:
                src = ref.images.get(case_id) or res.images.get(case_id)
                images[case_id] = load_image(src) if src is not None else None
            img = images[case_id]
            arr = None
            if img is not None:
                arr = (
                    img[0]
                    if img[0].shape == rm.shape and np.allclose(img[1], rm.affine, atol=1e-3)
                    else resample_nearest(img[0], img[1], rm.shape, rm.affine)
                )
            title = f"{name}, case {case_id}: Dice {r['dice']:.3f}"
            out.append((title, plot_overlay(title, rm.structures[name], pmask, arr)))
    return out


# ---------------------------------------------------------------------------
# HTML


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "∞"
        return f"{v:.3f}"
    return html.escape(str(v))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _ci(e: dict[str, Any]) -> str:
    return f"{_fmt(e['value'])} ({_fmt(e['ci_low'])}–{_fmt(e['ci_high'])})"


def render_html(
    result: dict[str, Any],
    plots: dict[str, str | None],
    overlays: list[tuple[str, str]],
    title: str = "hpb-node evaluation",
) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse;margin:1em 0}",
        "td,th{border:1px solid #bbb;padding:3px 6px;font-size:12px} th{background:#eee}",
        ".fail{color:#b00;font-weight:bold}.pass{color:#070;font-weight:bold} img{margin:4px}",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Reference: {html.escape(str(result.get('reference')))}; results: "
        f"{html.escape(str(result.get('results')))}; cases: {result.get('n_cases')}.</p>",
    ]
    if result.get("note"):
        parts.append(f"<p><b>Note:</b> {html.escape(str(result['note']))}</p>")
    if result.get("thresholds"):
        parts.append("<h2>Thresholds</h2><ul>")
        for c in result["thresholds"]:
            cls = "pass" if c["met"] else "fail"
            why = f" ({html.escape(c['reason'])})" if c.get("reason") else ""
            parts.append(
                f"<li class='{cls}'>{html.escape(c['threshold'])}: {_fmt(c['value'])} — "
                f"{'met' if c['met'] else 'NOT met'}{why}</li>"
            )
        parts.append("</ul>")
    diag = result.get("diagnosis", {})
    if diag.get("per_disease"):
        parts.append("<h2>Diagnosis</h2><p>Values with 95 % percentile-bootstrap intervals.</p>")
        rows = []
        for d, e in diag["per_disease"].items():
            cm = e["confusion"]
            rows.append(
                [
                    d,
                    e["n"],
                    e["n_positive"],
                    _ci(e["auroc"]),
                    _ci(e["sensitivity"]),
                    _ci(e["specificity"]),
                    _ci(e["ppv"]),
                    _ci(e["npv"]),
                    _ci(e["accuracy"]),
                    e.get("calibration", {}).get("ece"),
                    f"TN {cm['tn']} FP {cm['fp']} FN {cm['fn']} TP {cm['tp']}",
                ]
            )
        parts.append(
            _table(
                [
                    "disease",
                    "n",
                    "pos",
                    "AUROC",
                    "sensitivity",
                    "specificity",
                    "PPV",
                    "NPV",
                    "accuracy",
                    "ECE",
                    "confusion",
                ],
                rows,
            )
        )
        for d, e in diag["per_disease"].items():
            if e.get("readers"):
                rrows = [
                    [
                        name,
                        r["reader_vs_truth"]["sensitivity"],
                        r["reader_vs_truth"]["specificity"],
                        r["model_vs_truth_same_cases"]["sensitivity"],
                        r["model_vs_truth_same_cases"]["specificity"],
                        r["model_vs_reader"]["kappa"],
                    ]
                    for name, r in e["readers"].items()
                ]
                parts.append(f"<h3>Readers: {html.escape(d)}</h3>")
                parts.append(
                    _table(
                        [
                            "reader",
                            "reader sens.",
                            "reader spec.",
                            "model sens.",
                            "model spec.",
                            "κ model–reader",
                        ],
                        rrows,
                    )
                )
                if "inter_reader" in e:
                    parts.append(
                        f"<p>Inter-reader Fleiss κ: {_fmt(e['inter_reader']['fleiss_kappa'])}; "
                        + ", ".join(
                            f"Cohen κ {html.escape(k)}: {_fmt(v)}"
                            for k, v in e["inter_reader"]["cohen_kappa_pairs"].items()
                        )
                        + "</p>"
                    )
    seg = result.get("segmentation", {})
    if seg.get("per_structure"):
        parts.append("<h2>Segmentation</h2>")
        rows = [
            [
                s,
                e["dice"]["n"],
                e["dice"]["mean"],
                e["dice"]["median"],
                e["iou"]["mean"],
                e["hd95_mm"]["mean"],
                e["hd95_mm"]["n_inf"],
                e["assd_mm"]["mean"],
                e["centroid_error_mm"]["mean"],
                e["abs_volume_error_pct"]["mean"],
            ]
            for s, e in seg["per_structure"].items()
        ]
        parts.append(
            _table(
                [
                    "structure",
                    "n",
                    "Dice mean",
                    "Dice median",
                    "IoU",
                    "HD95 mm",
                    "HD95 ∞",
                    "ASSD mm",
                    "centroid err mm",
                    "|vol err| %",
                ],
                rows,
            )
        )
    les = seg.get("lesions")
    if les:
        det = les["detection"]
        parts.append("<h2>Lesions</h2>")
        parts.append(
            _table(
                [
                    "ref lesions",
                    "predicted",
                    "TP",
                    "FP",
                    "FN",
                    "sensitivity",
                    "precision",
                    "FP/case",
                    "CPM",
                    "matched Dice",
                    "|diameter err| mm",
                    "centroid err mm",
                ],
                [
                    [
                        det["n_reference_lesions"],
                        det["n_predicted_lesions"],
                        det["true_positives"],
                        det["false_positives"],
                        det["false_negatives"],
                        det["sensitivity"],
                        det["precision"],
                        det["fp_per_case"],
                        det["cpm"],
                        les["matched"]["dice"]["mean"],
                        les["abs_diameter_error_mm"]["mean"],
                        les["matched"]["centroid_error_mm"]["mean"],
                    ]
                ],
            )
        )
    for name, sub in (result.get("real_data") or {}).items():
        parts.append(
            f"<h2>Real data: {html.escape(str(name))} ({html.escape(str(sub.get('modality')))})</h2>"
        )
        rows = [
            [r["structure"], r["dice"], r["iou"], r["hd95_mm"], r["assd_mm"], r["centroid_error_mm"],
             r["volume_ref_ml"], r["volume_pred_ml"]]
            for r in sub.get("per_case", [])
        ]  # fmt: skip
        parts.append(
            _table(
                [
                    "structure",
                    "Dice",
                    "IoU",
                    "HD95 mm",
                    "ASSD mm",
                    "centroid err mm",
                    "ref ml",
                    "model ml",
                ],
                rows,
            )
        )
    rep = result.get("report", {}).get("summary")
    if rep:
        parts.append("<h2>Report</h2>")
        parts.append(
            _table(
                [
                    "n",
                    "completeness",
                    "correctness",
                    "contradictions",
                    "consistency",
                    "BLEU-1",
                    "BLEU-4",
                    "ROUGE-L",
                    "METEOR*",
                    "FK grade",
                    "reading ease",
                    "words/sentence",
                ],
                [
                    [
                        rep["n"],
                        rep["completeness"],
                        rep["correctness"],
                        rep["contradictions"],
                        rep.get("consistency"),
                        rep["bleu"]["bleu1"],
                        rep["bleu"]["bleu4"],
                        rep["rouge_l"],
                        rep["meteor"],
                        rep["flesch_kincaid_grade"],
                        rep["flesch_reading_ease"],
                        rep["mean_sentence_words"],
                    ]
                ],
            )
        )
        parts.append("<p>*METEOR as nltk: exact, Porter-stem and WordNet 3.0 synonym matches.</p>")
    parts.append("<h2>Plots</h2><div>")
    for name, b64 in plots.items():
        if b64:
            parts.append(
                f"<img class='plot' alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>"
            )
    parts.append("</div>")
    if overlays:
        parts.append("<h2>Worst cases</h2><div>")
        for t, b64 in overlays:
            parts.append(
                f"<img class='plot' alt='{html.escape(t)}' src='data:image/png;base64,{b64}'>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_outputs(
    result: dict[str, Any],
    ref: EvaluationSet,
    res: EvaluationSet,
    out_dir: Path,
    title: str = "hpb-node evaluation",
    stem: str = "evaluation",
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "roc": plot_roc(result.get("diagnosis", {})),
        "calibration": plot_calibration(result.get("diagnosis", {})),
        "dice": plot_dice(result.get("segmentation", {})),
        "froc": plot_froc(result.get("segmentation", {})),
    }
    overlays = worst_overlays(result, ref, res)
    json_path = out_dir / f"{stem}.json"
    html_path = out_dir / f"{stem}.html"
    write_json(result, json_path)
    html_path.write_text(render_html(jsonable(result), plots, overlays, title), encoding="utf-8")
    return json_path, html_path
