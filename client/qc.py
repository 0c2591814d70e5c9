"""Validation figures computed on the node: metrics with bootstrap intervals, subgroups, calibration.

A hospital tests a model on its own patients before switching it on, so every
figure is computed where the data is, and only aggregates leave: point
estimates, 95 % percentile-bootstrap intervals, reliability bins. Resampling
draws patients, not images, so a patient with both knees imaged does not
narrow the interval. Small cells are suppressed on the node: a subgroup or a
reliability bin with fewer than ``min_cell`` cases is sent as "suppressed" and
nothing else, and when an attribute has a suppressed group the other groups'
counts are withheld too, so no count can be recovered by subtraction.

Metrics are implemented here on plain numpy (rank AUC, confusion-matrix kappa)
because a bootstrap calls them thousands of times; the tests compare them
with scikit-learn's on the same data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from client.data.tabular import AGE_BANDS

AGE_ORDER = {name: k for k, (_, _, name) in enumerate(AGE_BANDS)}
CONFIDENCE = 0.95
BINS = 10
# Where an attribute's groups under min-cell are counted: one entry, no label (``g/<attribute>/~suppressed`` on
# the wire), so that neither a group's size nor its label leaves the node.
SUPPRESSED = "(suppressed)"
# The metric a cross-site matrix shows, per outcome.
PRIMARY = {"survival": "c_index", "response": "auc", "referral": "auc", "kl-grade": "kappa"}


@dataclass(frozen=True)
class QCSettings:
    bootstrap: int = 1000  # resamples; 0: point estimates only
    min_cell: int = 10
    threshold: float = 0.5  # the model's operating threshold on the positive-class probability
    seed: int = 42
    subgroups: bool = True


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


# ---------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------- one site's figures


def validate(pred: Predictions, cfg: QCSettings) -> dict:
    """Everything a site reports for one model: metrics, subgroups, reliability bins (nested, numbers only)."""
    functions = metric_functions(pred.outcome, cfg.threshold)
    result: dict = {"n": len(pred), "metrics": estimate(pred, functions, cfg.bootstrap, cfg.seed)}
    if cfg.subgroups and pred.groups:
        result["subgroups"] = {}
        for attribute, labels in sorted(pred.groups.items()):
            labels = np.asarray(labels, dtype=object)
            values = sorted({str(v) for v in labels if v}, key=_group_order)
            if not values:
                continue
            sizes = {v: int((labels == v).sum()) for v in values}
            withheld = any(size < cfg.min_cell for size in sizes.values()) or (labels == "").sum() > 0
            groups = {}
            small = [value for value in values if sizes[value] < cfg.min_cell]
            for value in values:
                if sizes[value] < cfg.min_cell:  # not even its label leaves the node: only that it exists
                    continue
                idx = np.flatnonzero(labels == value)
                part = pred.take(idx)
                part.clusters = None if pred.clusters is None else pred.clusters[idx]
                groups[value] = {"metrics": estimate(part, functions, cfg.bootstrap, cfg.seed)}
                if not withheld:
                    groups[value]["n"] = sizes[value]
            if small:
                groups[SUPPRESSED] = {"suppressed": True, "groups": len(small)}
            result["subgroups"][attribute] = groups
    if pred.outcome != "survival":
        if pred.outcome == "kl-grade":
            confidence, correct, kind = pred.score.max(1), pred.score.argmax(1) == pred.y, "top-label"
        else:
            confidence, correct, kind = pred.score, pred.y == 1, "positive-class"
        count, mean, observed, _ = reliability(confidence, correct)
        small = count < cfg.min_cell
        result["reliability"] = {
            "kind": kind,
            "edges": [float(e) for e in np.linspace(0, 1, BINS + 1)],
            "count": [None if s else float(c) for c, s in zip(count, small)],
            "mean_predicted": [None if s else float(m) for m, s in zip(mean, small)],
            "observed": [None if s else float(o) for o, s in zip(observed, small)],
        }
    return result


# ---------------------------------------------------------------- the wire format


def flatten(result: dict, prefix: str = "") -> dict[str, float | list[float]]:
    """A site's figures as MetricRecord entries (``m/auc/low``, ``g/sex/F/m/auc``, ``rel/count``)."""
    flat: dict[str, float | list[float]] = {f"{prefix}n": float(result["n"])}

    def metrics(key: str, values: dict) -> None:
        for name, ci in values.items():
            for part in ("value", "low", "high"):
                flat[f"{key}m/{name}/{part}"] = float(ci[part])

    metrics(prefix, result["metrics"])
    for attribute, groups in result.get("subgroups", {}).items():
        for value, group in groups.items():
            if value == SUPPRESSED:
                flat[f"{prefix}g/{_safe_key(attribute)}/~suppressed"] = float(group["groups"])
                continue
            key = f"{prefix}g/{_safe_key(attribute)}/{_safe_key(value)}/"
            if "n" in group:
                flat[key + "n"] = float(group["n"])
            metrics(key, group["metrics"])
    if "reliability" in result:
        rel = result["reliability"]
        flat[f"{prefix}rel/top-label"] = 1.0 if rel["kind"] == "top-label" else 0.0
        for part in ("edges", "count", "mean_predicted", "observed"):
            flat[f"{prefix}rel/{part}"] = [float("nan") if v is None else float(v) for v in rel[part]]
    return flat


def unflatten(flat: dict, prefix: str = "") -> dict:
    """The inverse of :func:`flatten` (NaN becomes None), for the coordinator."""
    def number(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    result: dict = {"n": int(flat[f"{prefix}n"]), "metrics": {}}
    subgroups: dict = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix):].split("/")
        if parts[0] == "m" and len(parts) == 3:
            result["metrics"].setdefault(parts[1], {})[parts[2]] = number(value)
        elif parts[0] == "g" and parts[2] == "~suppressed":
            subgroups.setdefault(parts[1], {})[SUPPRESSED] = {"suppressed": True, "groups": int(value)}
        elif parts[0] == "g":
            group = subgroups.setdefault(parts[1], {}).setdefault(parts[2], {})
            if not group.get("suppressed"):
                if parts[3] == "n":
                    group["n"] = int(value)
                elif parts[3] == "m":
                    group.setdefault("metrics", {}).setdefault(parts[4], {})[parts[5]] = number(value)
    if subgroups:  # the wire does not keep order: attributes by name, groups in band order
        result["subgroups"] = {attribute: {v: groups[v] for v in sorted(groups, key=_group_order)}
                               for attribute, groups in sorted(subgroups.items())}
    if f"{prefix}rel/count" in flat:
        result["reliability"] = {
            "kind": "top-label" if flat.get(f"{prefix}rel/top-label") else "positive-class",
            **{part: [number(v) for v in flat[f"{prefix}rel/{part}"]]
               for part in ("edges", "count", "mean_predicted", "observed")},
        }
    return result


def _group_order(value: str) -> tuple[int, str]:
    if value == SUPPRESSED:
        return len(AGE_ORDER) + 1, value  # the suppressed groups' line comes last
    return AGE_ORDER.get(value, len(AGE_ORDER)), value


def _safe_key(text: str) -> str:
    return str(text).replace("/", "-").strip() or "unknown"
