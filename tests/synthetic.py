"""Small synthetic data sets that several test files check their arithmetic on."""

import numpy as np

from models.metrics import Predictions


def binary_predictions(rng: np.random.Generator, n: int = 300, groups=None) -> Predictions:
    """Referral scores that separate the classes imperfectly, with 15 cases tied at exactly 0.5."""
    y = rng.integers(0, 2, n)
    score = np.clip(0.35 + 0.3 * y + rng.normal(0, 0.2, n), 0, 1)
    score[:15] = 0.5  # ties
    return Predictions("referral", score, y, groups=groups)


def survival_data(n: int = 300, seed: int = 0, rounding: int = 1):
    """Covariates, event times (rounded: ties) and event flags (about 70 % events) for a Cox model."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    t = np.round(rng.exponential(np.exp(-x @ [0.5, -0.3, 0.1])), rounding) + 0.1
    e = (rng.random(n) < 0.7).astype(int)
    return x, t, e
