"""Every metric fedhosp reports, one implementation, used by training, evaluation, validation and analysis.

A training round's per-site evaluation (client/train.py ``evaluate_tabular`` /
``evaluate_images``, :func:`round_metrics`) and a validation on the node
(client/validation.py, :func:`metric_functions` with :func:`estimate`) build the
same :class:`Predictions` from the model's outputs and call the same functions
below, so a round's ``auc`` and a validation's ``auc`` on the same model and
split are the same number.

The decision rule, wherever a case is classified:

* binary outcomes (``response``, ``referral``, ``binary``): the score is P(positive)
  (the sigmoid of a response logit, the softmax's positive-class column for
  referral and binary) and a case is positive iff ``P(positive) >= threshold``
  (:func:`positive`); the threshold is 0.5 (:data:`THRESHOLD`) unless the
  model's spec says otherwise (a validation's ``threshold``). A two-class
  softmax is not classified by argmax: at P = 0.5 exactly the case is positive.
* ``kl-grade``: the predicted grade is the argmax of the five class
  probabilities (:func:`predicted_grade`; on a tie the lowest grade, as
  ``numpy.argmax``).
* ``survival`` is not classified: the C-index ranks risks.

A validation's bootstrap calls these thousands of times, so they are written on
plain numpy (rank AUC, confusion-matrix kappa, blocked pair counts for the
C-index) and import neither scikit-learn nor SciPy (nor torch: the site check
imports this module); tests/test_metrics.py compares each with scikit-learn's or
lifelines' on the same data. A metric that is undefined on the data (AUC with
one class, C-index without a comparable pair, sensitivity without a positive)
is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
BINS = 10
THRESHOLD = 0.5  # the default operating threshold on P(positive)
# The metric a cross-site matrix and a training run's progress show, per outcome.
PRIMARY = {"survival": "c_index", "response": "auc", "referral": "auc", "binary": "auc", "kl-grade": "kappa"}
# The metrics a training round's evaluate reports per outcome (a validation reports all of metric_functions').
ROUND = {
    "survival": ("c_index",),
    "response": ("auc", "accuracy"),
    "referral": ("accuracy", "auc", "sensitivity", "specificity"),
    "binary": ("accuracy", "auc", "sensitivity", "specificity"),
    "kl-grade": ("accuracy", "auc", "kappa"),
}


@dataclass
class Predictions:
    """One site's test split with the model's outputs; never leaves the node."""

    outcome: str  # survival | response | referral | binary | kl-grade
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


# ---------------------------------------------------------------- the decision rule


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """P(positive) from a binary model's logits (float64)."""
    with np.errstate(over="ignore"):  # a logit below -709: exp overflows to inf, the probability is 0
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def positive(prob: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """The binary decision: positive iff P(positive) >= threshold."""
    return np.asarray(prob) >= threshold


def predicted_grade(prob: np.ndarray) -> np.ndarray:
    """The multi-class decision: the most probable class (the lowest one on a tie)."""
    return np.asarray(prob).argmax(axis=1)


# ---------------------------------------------------------------- the metrics


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (SciPy's ``rankdata(method="average")``)."""
    n = len(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half); NaN with one class or a NaN score."""
    y = np.asarray(y).reshape(-1).astype(bool)
    score = np.asarray(score, dtype=float).reshape(-1)
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0 or np.isnan(score).any():
        return float("nan")
    ranks = _midranks(score)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def macro_auc(prob: np.ndarray, y: np.ndarray) -> float:
    """One-vs-rest AUC averaged over the classes that occur in ``y`` with both positives and negatives
    (a site's test split may lack a grade); NaN when none does."""
    y = np.asarray(y)
    values = [auc(prob[:, c], y == c) for c in range(prob.shape[1])]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def quadratic_kappa(pred: np.ndarray, y: np.ndarray, classes: int) -> float:
    """Cohen's kappa with quadratic weights over ``classes`` ordered grades; NaN when undefined (no case,
    or every case and prediction in one grade)."""
    if classes < 2:
        return float("nan")
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


def concordance_index(time: np.ndarray, risk: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C-index: the share of comparable pairs ordered correctly by risk.

    A pair (i, j) is comparable when ``event[i] == 1`` and either
    ``time[i] < time[j]``, or the times are equal and j was censored (j is known
    to have outlived i, as in lifelines and R's survival). It is concordant when
    ``risk[i] > risk[j]``; equal risks count one half. Returns
    NaN when no pair is comparable. Memory is bounded by working in row blocks.
    """
    time = np.asarray(time, dtype=float).reshape(-1)
    risk = np.asarray(risk, dtype=float).reshape(-1)
    event = np.asarray(event).reshape(-1).astype(bool)
    concordant = 0.0
    comparable = 0
    idx = np.flatnonzero(event)
    block = max(1, 4_000_000 // max(len(time), 1))
    for start in range(0, len(idx), block):
        rows = idx[start : start + block]
        later = (time[None, :] > time[rows, None]) | (
            (time[None, :] == time[rows, None]) & ~event[None, :]
        )
        comparable += int(later.sum())
        diff = risk[rows, None] - risk[None, :]
        concordant += float(((diff > 0) & later).sum()) + 0.5 * float(((diff == 0) & later).sum())
    return concordant / comparable if comparable else float("nan")


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


def metric_functions(outcome: str, threshold: float = THRESHOLD) -> dict[str, Callable[[Predictions], float]]:
    """The outcome's metrics, each a function of a (resampled) prediction set."""
    if outcome == "survival":
        return {"c_index": lambda p: concordance_index(p.y, p.score, p.event)}
    if outcome in ("response", "referral", "binary"):
        def sensitivity(p):
            return _rate(positive(p.score[p.y == 1], threshold))

        def specificity(p):
            return _rate(~positive(p.score[p.y == 0], threshold))

        return {
            "auc": lambda p: auc(p.score, p.y),
            "sensitivity": sensitivity,
            "specificity": specificity,
            "accuracy": lambda p: _rate(positive(p.score, threshold) == (p.y == 1)),
            "ece": lambda p: reliability(p.score, p.y == 1)[3],
        }
    if outcome == "kl-grade":
        return {
            "kappa": lambda p: quadratic_kappa(predicted_grade(p.score), p.y, p.score.shape[1]),
            "accuracy": lambda p: _rate(predicted_grade(p.score) == p.y),
            "auc": lambda p: macro_auc(p.score, p.y),
            "ece": lambda p: reliability(p.score.max(1), predicted_grade(p.score) == p.y)[3],
        }
    raise ValueError(f"no metrics for outcome {outcome!r}")


def round_metrics(pred: Predictions, threshold: float = THRESHOLD) -> dict[str, float]:
    """A training round's evaluation figures (:data:`ROUND`): point values of the validation's own functions."""
    functions = metric_functions(pred.outcome, threshold)
    return {name: float(functions[name](pred)) for name in ROUND[pred.outcome]}


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
