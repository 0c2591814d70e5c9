"""Every metric fedhosp reports, one implementation, used by training, evaluation, validation and analysis.

A validation's bootstrap calls these thousands of times, so they are written on
plain numpy (rank AUC, confusion-matrix kappa, sorted-pair concordance); the
tests compare each with scikit-learn's or lifelines' on the same data. A binary
case is positive when its probability is at or above the threshold (0.5 unless
the model's spec says otherwise), wherever it is classified.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
BINS = 10
# The metric a cross-site matrix and a training run's progress show, per outcome.
PRIMARY = {"survival": "c_index", "response": "auc", "referral": "auc", "kl-grade": "kappa"}


@dataclass
class Predictions:
    """One site's test split with the model's outputs; never leaves the node."""

    outcome: str  # survival | response | referral | kl-grade
    score: np.ndarray  # survival: risk [n]; binary: P(positive) [n]; kl-grade: class probabilities [n, 5]
    y: np.ndarray  # binary/class labels; survival: event times
    event: np.ndarray | None = None  # survival only
    clusters: np.ndarray | None = None  # patient per case (radiology), for the patient-level bootstrap
    groups: dict[str, list[str]] | None = None  # subgroup labels per case

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> "Predictions":
        return Predictions(self.outcome, self.score[idx], self.y[idx],
                           None if self.event is None else self.event[idx])


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half); NaN with one class."""
    y = np.asarray(y).astype(bool)
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    from scipy.stats import rankdata  # imported here: a training message never pays for SciPy

    ranks = rankdata(score)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def quadratic_kappa(pred: np.ndarray, y: np.ndarray, classes: int) -> float:
    """Cohen's kappa with quadratic weights over ``classes`` ordered grades."""
    confusion = np.zeros((classes, classes))
    np.add.at(confusion, (np.asarray(y, int), np.asarray(pred, int)), 1)
    n = confusion.sum()
    if n == 0:
        return float("nan")
    grid = np.arange(classes)
    weights = (grid[:, None] - grid[None, :]) ** 2 / (classes - 1) ** 2
    expected = np.outer(confusion.sum(1), confusion.sum(0)) / n
    denominator = (weights * expected).sum()
    return float(1 - (weights * confusion).sum() / denominator) if denominator else float("nan")


def _rate(hit: np.ndarray) -> float:
    return float(hit.mean()) if len(hit) else float("nan")


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, ...]:
    """Counts, mean confidence and observed frequency per equal-width bin, and the ECE over all cases."""
    index = np.clip((np.asarray(confidence) * bins).astype(int), 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(index, weights=confidence, minlength=bins) / count
        observed = np.bincount(index, weights=correct.astype(float), minlength=bins) / count
    gap = np.nan_to_num(np.abs(mean - observed)) * count
    ece = float(gap.sum() / count.sum()) if count.sum() else float("nan")
    return count, mean, observed, ece


def metric_functions(outcome: str, threshold: float) -> dict[str, Callable[[Predictions], float]]:
    """The outcome's metrics, each a function of a (resampled) prediction set."""
    if outcome == "survival":
        from models.oncology import concordance_index  # (torch's module: not for the site check)

        return {"c_index": lambda p: concordance_index(p.y, p.score, p.event)}
    if outcome in ("response", "referral"):
        def sensitivity(p):
            return _rate(p.score[p.y == 1] >= threshold)

        def specificity(p):
            return _rate(p.score[p.y == 0] < threshold)

        return {
            "auc": lambda p: auc(p.score, p.y),
            "sensitivity": sensitivity,
            "specificity": specificity,
            "accuracy": lambda p: _rate((p.score >= threshold) == (p.y == 1)),
            "ece": lambda p: reliability(p.score, p.y == 1)[3],
        }
    if outcome == "kl-grade":
        def macro_auc(p):
            values = [auc(p.score[:, c], p.y == c) for c in range(p.score.shape[1])]
            values = [v for v in values if not math.isnan(v)]
            return float(np.mean(values)) if values else float("nan")

        return {
            "kappa": lambda p: quadratic_kappa(p.score.argmax(1), p.y, p.score.shape[1]),
            "accuracy": lambda p: _rate(p.score.argmax(1) == p.y),
            "auc": macro_auc,
            "ece": lambda p: reliability(p.score.max(1), p.score.argmax(1) == p.y)[3],
        }
    raise ValueError(f"no validation metrics for outcome {outcome!r}")


# ---------------------------------------------------------------- bootstrap


def bootstrap_indices(n: int, clusters: np.ndarray | None, samples: int, seed: int):
    """Resampled case indices, one array per resample: cases, or whole patients when ``clusters`` is given."""
    rng = np.random.default_rng(seed)
    if clusters is None:
        for _ in range(samples):
            yield rng.integers(0, n, n)
        return
    _, inverse = np.unique(clusters, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]
    for _ in range(samples):
        yield np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])


def estimate(pred: Predictions, functions: dict[str, Callable], samples: int, seed: int) -> dict[str, dict]:
    """Point estimate and percentile interval per metric; the interval is NaN when most resamples are undefined."""
    out = {name: {"value": float(fn(pred)), "low": float("nan"), "high": float("nan")} for name, fn in functions.items()}
    if samples <= 0:
        return out
    draws = {name: np.empty(samples) for name in functions}
    for b, idx in enumerate(bootstrap_indices(len(pred), pred.clusters, samples, seed)):
        resample = pred.take(idx)
        for name, fn in functions.items():
            draws[name][b] = fn(resample)
    tail = (1 - CONFIDENCE) / 2 * 100
    for name, values in draws.items():
        finite = values[np.isfinite(values)]
        if len(finite) >= samples / 2:
            out[name]["low"], out[name]["high"] = (float(v) for v in np.percentile(finite, [tail, 100 - tail]))
    return out
