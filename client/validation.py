"""Validation figures computed on the node: metrics with bootstrap intervals, subgroups, calibration.

A hospital tests a model on its own patients before switching it on, so every
figure is computed where the data is, and only aggregates leave: point
estimates, 95 % percentile-bootstrap intervals, reliability bins. Resampling
draws patients, not images, so a patient with both knees imaged does not
narrow the interval. Small cells are suppressed on the node: a subgroup or a
reliability bin with fewer than ``min_cell`` cases is sent as "suppressed" and
nothing else, and when an attribute has a suppressed group the other groups'
counts are withheld too, so no count can be recovered by subtraction.

The metrics themselves, and the decision rule, are models/metrics.py's (the same
functions a training round's evaluation reports); the wire format models/wire.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.metrics import BINS, THRESHOLD, Predictions, estimate, metric_functions, predicted_grade, reliability
from models.wire import SUPPRESSED, group_order


@dataclass(frozen=True)
class QCSettings:
    bootstrap: int = 1000  # resamples; 0: point estimates only
    min_cell: int = 10
    threshold: float = THRESHOLD  # the model's operating threshold: positive iff P(positive) >= threshold
    seed: int = 42
    subgroups: bool = True


def validate(pred: Predictions, cfg: QCSettings) -> dict:
    """Everything a site reports for one model: metrics, subgroups, reliability bins (nested, numbers only)."""
    functions = metric_functions(pred.outcome, cfg.threshold)
    result: dict = {"n": len(pred), "metrics": estimate(pred, functions, cfg.bootstrap, cfg.seed)}
    if cfg.subgroups and pred.groups:
        result["subgroups"] = {}
        for attribute, labels in sorted(pred.groups.items()):
            labels = np.asarray(labels, dtype=object)
            values = sorted({str(v) for v in labels if v}, key=group_order)
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
            confidence, correct, kind = pred.score.max(1), predicted_grade(pred.score) == pred.y, "top-label"
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
