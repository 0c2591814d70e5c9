"""Benchmark: models/metrics.py against the libraries its tests use as oracles, per call, and one bootstrap.

Prints milliseconds per call (median of repeats) at the size of a site's test
split, for our rank AUC / quadratic kappa / C-index against scikit-learn's
``roc_auc_score`` / ``cohen_kappa_score`` and lifelines' ``concordance_index``,
and the seconds of a 1000-resample validation of a referral model (five
metrics per resample). Figures only, no assertion.

Not a pytest test; ``.venv/bin/python tests/bench_metrics.py [N]`` (N cases, default 200).
"""

from __future__ import annotations

import sys
import time
from statistics import median

import numpy as np
from lifelines.utils import concordance_index as lifelines_cindex
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from models import metrics


def per_call_ms(fn, repeats: int = 200) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return median(times) * 1e3


def main(n: int = 200) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    score = np.clip(0.35 + 0.3 * y + rng.normal(0, 0.2, n), 0, 1)
    grades = rng.integers(0, 5, n)
    prob = rng.dirichlet(np.ones(5), n)
    time_, event, risk = rng.exponential(1, n), (rng.random(n) < 0.7).astype(int), rng.normal(size=n)
    rows = [
        ("AUC", lambda: metrics.auc(score, y), lambda: roc_auc_score(y, score), "roc_auc_score"),
        ("quadratic kappa", lambda: metrics.quadratic_kappa(prob.argmax(1), grades, 5),
         lambda: cohen_kappa_score(grades, prob.argmax(1), weights="quadratic", labels=list(range(5))),
         "cohen_kappa_score"),
        ("macro AUC (5 grades)", lambda: metrics.macro_auc(prob, grades),
         lambda: roc_auc_score(grades, prob, multi_class="ovr", average="macro"), "roc_auc_score ovr"),
        ("C-index", lambda: metrics.concordance_index(time_, risk, event),
         lambda: lifelines_cindex(time_, -risk, event), "lifelines"),
    ]
    print(f"n = {n}: ms per call (median)")
    print(f"{'metric':<22}{'ours':>9}{'oracle':>9}  oracle")
    for name, ours, oracle, label in rows:
        print(f"{name:<22}{per_call_ms(ours):>9.3f}{per_call_ms(oracle):>9.3f}  {label}")
    pred = metrics.Predictions("referral", score, y)
    functions = metrics.metric_functions("referral")
    started = time.perf_counter()
    metrics.estimate(pred, functions, 1000, seed=1)
    print(f"validation bootstrap, 1000 resamples x {len(functions)} metrics: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
