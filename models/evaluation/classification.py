"""Diagnosis metrics: confusion counts, rates, AUROC, bootstrap intervals,
calibration and inter-reader agreement.

Conventions (also in ``docs/evaluation.md``):

* A case is *positive* when its label is 1. A score is called positive when
  ``score >= threshold`` (default 0.5).
* A rate whose denominator is zero (sensitivity with no positive cases,
  PPV with no positive calls, ...) is ``nan``: undefined, never silently 0 or 1.
* AUROC is the Mann-Whitney probability that a random positive scores above a
  random negative, ties counted one half; ``nan`` when one class is absent.
* 95 % intervals are percentile bootstrap intervals over cases (default
  2000 resamples, fixed seed); resamples in which the metric is undefined are
  dropped, and the number kept is reported.
* Expected calibration error (ECE) uses ``n_bins`` equal-width bins on [0, 1]
  (the last bin closed): ``sum_b |B|/n * |mean(y in B) - mean(p in B)|``.
* Cohen's kappa for two raters and Fleiss' kappa for several, on nominal
  labels; a kappa whose chance agreement is 1 (every rater always gives the
  same single label) is ``nan``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

FloatArray = npt.NDArray[np.float64]


class MetricInputError(ValueError):
    """Inputs a metric cannot use (shape mismatch, labels other than 0/1)."""


def _labels(y: npt.ArrayLike, what: str = "labels") -> npt.NDArray[np.int64]:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise MetricInputError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise MetricInputError(f"{what} must be 0 or 1")
    return arr.astype(np.int64)


def _scores(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    t = _labels(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if s.shape != t.shape:
        raise MetricInputError(f"{t.size} labels but scores of shape {s.shape}")
    if np.isnan(s).any():
        raise MetricInputError("scores contain NaN")
    return t, s


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.n)

    @property
    def sensitivity(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float:
        return _ratio(self.tn, self.tn + self.fn)

    def as_matrix(self) -> list[list[int]]:
        """``[[tn, fp], [fn, tp]]``: rows truth 0/1, columns call 0/1 (scikit-learn's layout)."""
        return [[self.tn, self.fp], [self.fn, self.tp]]


def confusion(y_true: npt.ArrayLike, y_call: npt.ArrayLike) -> Confusion:
    t = _labels(y_true)
    c = _labels(y_call, "calls")
    if c.shape != t.shape:
        raise MetricInputError(f"{t.size} labels but {c.size} calls")
    return Confusion(
        tp=int(((t == 1) & (c == 1)).sum()),
        fp=int(((t == 0) & (c == 1)).sum()),
        tn=int(((t == 0) & (c == 0)).sum()),
        fn=int(((t == 1) & (c == 0)).sum()),
    )


def auroc(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula, ties = 1/2."""
    t, s = _scores(y_true, y_score)
    n_pos = int(t.sum())
    n_neg = int(t.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks over ties, 1-based
    u = ranks[t == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_points(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    t, s = _scores(y_true, y_score)
    n_pos = max(int(t.sum()), 0)
    n_neg = int(t.size - n_pos)
    fpr = [0.0]
    tpr = [0.0]
    for thr in np.unique(s)[::-1]:
        call = s >= thr
        fpr.append(_ratio(int((call & (t == 0)).sum()), n_neg))
        tpr.append(_ratio(int((call & (t == 1)).sum()), n_pos))
    return np.asarray(fpr), np.asarray(tpr)


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    n_resamples: int  # resamples in which the metric was defined

    def as_dict(self) -> dict[str, float | int]:
        return {
            "value": self.value,
            "ci_low": self.low,
            "ci_high": self.high,
            "n_boot": self.n_resamples,
        }


def bootstrap(
    metric: Callable[[npt.NDArray[Any], npt.NDArray[Any]], float],
    y_true: npt.ArrayLike,
    y_score: npt.ArrayLike,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``metric(y_true, y_score)`` over cases."""
    t = np.asarray(y_true)
    s = np.asarray(y_score)
    value = float(metric(t, s))
    if t.size == 0:
        return Interval(value, float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, t.size, size=(n_resamples, t.size))
    values = np.array([metric(t[i], s[i]) for i in idx], dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return Interval(value, float("nan"), float("nan"), 0)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return Interval(value, float(low), float(high), int(values.size))


@dataclass(frozen=True)
class Calibration:
    ece: float
    bin_edges: tuple[float, ...]
    bin_count: tuple[int, ...]
    bin_confidence: tuple[float, ...]  # mean predicted probability (nan if empty)
    bin_frequency: tuple[float, ...]  # observed fraction positive (nan if empty)


def calibration(y_true: npt.ArrayLike, y_prob: npt.ArrayLike, n_bins: int = 10) -> Calibration:
    t, p = _scores(y_true, y_prob)
    if ((p < 0) | (p > 1)).any():
        raise MetricInputError("probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    counts, conf, freq = [], [], []
    ece = 0.0
    for b in range(n_bins):
        sel = which == b
        k = int(sel.sum())
        counts.append(k)
        if k:
            conf.append(float(p[sel].mean()))
            freq.append(float(t[sel].mean()))
            ece += k / t.size * abs(freq[-1] - conf[-1])
        else:
            conf.append(float("nan"))
            freq.append(float("nan"))
    return Calibration(
        ece=float(ece) if t.size else float("nan"),
        bin_edges=tuple(float(e) for e in edges),
        bin_count=tuple(counts),
        bin_confidence=tuple(conf),
        bin_frequency=tuple(freq),
    )


def cohen_kappa(a: Sequence[Any] | npt.ArrayLike, b: Sequence[Any] | npt.ArrayLike) -> float:
    """Cohen's kappa of two raters over the same items (nominal labels)."""
    x = np.asarray(a)
    y = np.asarray(b)
    if x.shape != y.shape or x.ndim != 1:
        raise MetricInputError("two raters need one label each for the same items")
    if x.size == 0:
        return float("nan")
    cats = np.union1d(x, y)
    po = float((x == y).mean())
    pe = float(sum((x == c).mean() * (y == c).mean() for c in cats))
    return _ratio(po - pe, 1.0 - pe) if pe < 1.0 else float("nan")


def fleiss_kappa(ratings: npt.ArrayLike) -> float:
    """Fleiss' kappa; ``ratings[i, j]`` is rater ``j``'s label for item ``i``."""
    r = np.asarray(ratings)
    if r.ndim != 2 or r.shape[1] < 2:
        raise MetricInputError("Fleiss' kappa needs an items x raters table with >= 2 raters")
    n_items, n_raters = r.shape
    if n_items == 0:
        return float("nan")
    cats = np.unique(r)
    counts = np.stack([(r == c).sum(axis=1) for c in cats], axis=1).astype(np.float64)
    p_i = ((counts * (counts - 1)).sum(axis=1)) / (n_raters * (n_raters - 1))
    p_bar = float(p_i.mean())
    p_j = counts.sum(axis=0) / (n_items * n_raters)
    pe = float((p_j**2).sum())
    return _ratio(p_bar - pe, 1.0 - pe) if pe < 1.0 else float("nan")


def binary_summary(
    y_true: npt.ArrayLike,
    y_score: npt.ArrayLike,
    *,
    threshold: float = 0.5,
    n_resamples: int = 2000,
    seed: int = 0,
    n_bins: int = 10,
) -> dict[str, Any]:
    """All diagnosis figures for one disease: each rate with its 95 % bootstrap interval,
    the confusion matrix at ``threshold``, ROC points and calibration."""
    t, s = _scores(y_true, y_score)

    def rate(name: str) -> Callable[[npt.NDArray[Any], npt.NDArray[Any]], float]:
        def fn(tt: npt.NDArray[Any], ss: npt.NDArray[Any]) -> float:
            return float(getattr(confusion(tt, (ss >= threshold).astype(np.int64)), name))

        return fn

    out: dict[str, Any] = {"n": int(t.size), "n_positive": int(t.sum()), "threshold": threshold}
    for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
        out[name] = bootstrap(rate(name), t, s, n_resamples=n_resamples, seed=seed).as_dict()
    out["auroc"] = bootstrap(auroc, t, s, n_resamples=n_resamples, seed=seed).as_dict()
    cm = confusion(t, (s >= threshold).astype(np.int64))
    out["confusion"] = {"tn": cm.tn, "fp": cm.fp, "fn": cm.fn, "tp": cm.tp}
    fpr, tpr = roc_points(t, s)
    out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    if ((s >= 0) & (s <= 1)).all():
        cal = calibration(t, s, n_bins)
        out["calibration"] = {
            "ece": cal.ece,
            "bin_edges": list(cal.bin_edges),
            "bin_count": list(cal.bin_count),
            "bin_confidence": list(cal.bin_confidence),
            "bin_frequency": list(cal.bin_frequency),
        }
    return out
