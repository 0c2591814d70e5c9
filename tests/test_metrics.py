"""models/metrics.py, the one implementation of every metric: against scikit-learn, SciPy and lifelines as
oracles, and the same figures from a training round's evaluation and from a validation on the same predictions."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index as lifelines_cindex
from scipy.stats import bootstrap, rankdata
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, cohen_kappa_score, recall_score, roc_auc_score
from torch import nn

from client import validation as qc
from client.data.dicom import ImageSplit
from client.data.tabular import Split
from client.tasks import OncologyTask, RadiologyTask
from models import metrics
from models.metrics import Predictions, concordance_index, round_metrics, sigmoid
from models.radiology import referral_from_grade
from tests.synthetic import binary_predictions, survival_data

RNG = np.random.default_rng(7)


def _binary(n=300, groups=None):
    return binary_predictions(RNG, n, groups)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ---------------------------------------------------------------- the validation's metrics (from tests/test_qc.py)


def test_fast_metrics_equal_scikit_learn():
    pred = _binary()
    assert metrics.auc(pred.score, pred.y) == pytest.approx(roc_auc_score(pred.y, pred.score), abs=1e-12)
    y = RNG.integers(0, 5, 200)
    prob = RNG.dirichlet(np.ones(5), 200)
    assert metrics.quadratic_kappa(prob.argmax(1), y, 5) == pytest.approx(
        cohen_kappa_score(y, prob.argmax(1), weights="quadratic", labels=list(range(5))), abs=1e-12)
    functions = metrics.metric_functions("kl-grade", 0.5)
    macro = np.mean([roc_auc_score(y == c, prob[:, c]) for c in range(5)])
    assert functions["auc"](metrics.Predictions("kl-grade", prob, y)) == pytest.approx(macro, abs=1e-12)
    binary = metrics.metric_functions("referral", 0.6)
    assert binary["sensitivity"](pred) == pytest.approx(((pred.score >= 0.6) & (pred.y == 1)).sum() / (pred.y == 1).sum())
    assert binary["specificity"](pred) == pytest.approx(((pred.score < 0.6) & (pred.y == 0)).sum() / (pred.y == 0).sum())


def test_bootstrap_interval_agrees_with_scipy_percentile_bootstrap():
    pred = _binary(400)
    ours = metrics.estimate(pred, {"auc": metrics.metric_functions("referral", 0.5)["auc"]}, 2000, seed=3)["auc"]
    ref = bootstrap((pred.score, pred.y), lambda s, y: roc_auc_score(y, s), paired=True, vectorized=False,
                    n_resamples=2000, method="percentile", random_state=5).confidence_interval
    assert ours["low"] < ours["value"] < ours["high"]
    assert ours["low"] == pytest.approx(ref.low, abs=0.012) and ours["high"] == pytest.approx(ref.high, abs=0.012)


def test_patient_bootstrap_draws_whole_patients():
    clusters = np.repeat(np.arange(50), 2)  # every patient has both knees imaged
    for idx in metrics.bootstrap_indices(100, clusters, 20, seed=1):
        assert len(idx) == 100
        drawn = clusters[idx]
        assert all(np.sum(drawn == p) % 2 == 0 for p in np.unique(drawn))


# ---------------------------------------------------------------- binary: AUC, accuracy, sensitivity, specificity


def test_ranks_equal_scipy_rankdata_with_ties():
    rng = np.random.default_rng(11)
    for n in (1, 2, 7, 200):
        values = np.round(rng.normal(size=n), 1)
        np.testing.assert_array_equal(metrics._midranks(values), rankdata(values))


@pytest.mark.parametrize("seed", range(8))
def test_auc_equals_scikit_learn_on_random_scores_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
    y[:2] = [0, 1]  # both classes
    score = rng.normal(y * rng.uniform(0, 2), 1)
    for s in (score, np.round(score, 1), np.round(score), np.zeros(n), sigmoid(3 * score)):
        assert metrics.auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_is_nan_with_one_class_or_a_nan_score():
    assert math.isnan(metrics.auc(np.array([0.2, 0.8, 0.5]), np.array([1, 1, 1])))
    assert math.isnan(metrics.auc(np.array([0.2, 0.8]), np.array([0, 0])))
    assert math.isnan(metrics.auc(np.array([]), np.array([])))
    assert math.isnan(metrics.auc(np.array([0.2, np.nan, 0.4]), np.array([0, 1, 1])))
    assert metrics.auc(np.array([0.3, 0.7]), np.array([0, 1])) == 1.0
    assert metrics.auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.8])
def test_accuracy_sensitivity_specificity_equal_scikit_learn_with_scores_on_the_threshold(threshold):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 250)
    score = np.round(np.clip(0.3 + 0.4 * y + rng.normal(0, 0.25, 250), 0, 1), 1)
    score[:20] = threshold  # exactly on the threshold: positive
    pred = Predictions("response", score, y)
    decided = (score >= threshold).astype(int)
    functions = metrics.metric_functions("response", threshold)
    assert functions["accuracy"](pred) == pytest.approx(accuracy_score(y, decided), abs=1e-12)
    assert functions["sensitivity"](pred) == pytest.approx(recall_score(y, decided), abs=1e-12)
    assert functions["specificity"](pred) == pytest.approx(recall_score(y, decided, pos_label=0), abs=1e-12)
    np.testing.assert_array_equal(metrics.positive(score, threshold), decided == 1)


def test_sensitivity_without_positives_and_specificity_without_negatives_are_nan():
    functions = metrics.metric_functions("referral")
    negatives = Predictions("referral", np.array([0.1, 0.7]), np.array([0, 0]))
    positives = Predictions("referral", np.array([0.1, 0.7]), np.array([1, 1]))
    assert math.isnan(functions["sensitivity"](negatives)) and functions["specificity"](negatives) == 0.5
    assert math.isnan(functions["specificity"](positives)) and functions["sensitivity"](positives) == 0.5
    assert math.isnan(functions["auc"](positives)) and functions["accuracy"](positives) == 0.5


def test_binary_metrics_auc_and_accuracy():  # from tests/test_oncology_math.py: a response model's logits
    logits = np.array([-2.0, -1.0, 1.0, 2.0, 0.5])
    labels = np.array([0, 1, 0, 1, 1])
    m = round_metrics(Predictions("response", sigmoid(logits), labels))
    assert m["auc"] == pytest.approx(4 / 6)
    assert m["accuracy"] == pytest.approx(0.6)
    assert set(m) == {"auc", "accuracy"}


def test_sigmoid_is_the_plain_formula_and_saturates_without_warnings():
    logits = np.array([-800.0, -5.0, 0.0, 3.0, 800.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prob = sigmoid(logits)
    np.testing.assert_array_equal(prob[1:4], 1.0 / (1.0 + np.exp(-logits[1:4])))
    assert prob[0] == 0.0 and prob[2] == 0.5 and prob[4] == 1.0


def test_referral_sensitivity_and_specificity():  # from tests/test_radiology_models.py
    labels = referral_from_grade(np.array([0, 1, 2, 3, 4, 4]))  # [0, 0, 1, 1, 1, 1]: tests/test_radiology_models.py
    prob = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3], [0.1, 0.9], [0.3, 0.7]])
    m = round_metrics(Predictions("referral", prob[:, 1], labels))
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, prob[:, 1]))


# ---------------------------------------------------------------- KL grade: kappa, accuracy, macro AUC


def test_kl_grade_metrics_equal_sklearn_when_every_grade_is_present():  # from tests/test_radiology_models.py
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 20)
    prob = rng.dirichlet(np.ones(5), size=100)
    prob[np.arange(100), labels] += 0.5
    prob /= prob.sum(axis=1, keepdims=True)
    m = round_metrics(Predictions("kl-grade", prob, labels))
    assert m["auc"] == pytest.approx(roc_auc_score(labels, prob, multi_class="ovr", average="macro"))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(labels, prob.argmax(1), weights="quadratic"))
    assert m["accuracy"] == pytest.approx((prob.argmax(1) == labels).mean())


def test_auc_skips_a_grade_missing_from_the_site():  # from tests/test_radiology_models.py
    labels = np.array([0, 0, 1, 1, 2, 2])
    prob = np.eye(5)[[0, 0, 1, 1, 2, 1]] * 0.9 + 0.02
    m = round_metrics(Predictions("kl-grade", prob, labels))
    assert np.isfinite(m["auc"])
    # the mean over the grades present with both classes, each as scikit-learn has it
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(labels == c, prob[:, c]) for c in range(3)]), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_quadratic_kappa_accuracy_and_macro_auc_equal_scikit_learn_with_missing_grades_and_ties(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(5, 300))
    grades = rng.choice(5, size=3 if seed % 2 else 5, replace=False)  # a site may lack grades
    y = rng.choice(grades, n)
    prob = np.round(rng.dirichlet(np.ones(5), n), 1)  # rounded: tied maxima and tied scores
    prob[np.arange(n), y] += rng.uniform(0, 0.3, n)
    pred = prob.argmax(1)
    m = round_metrics(Predictions("kl-grade", prob, y))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(5))),
                                       abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    present = [c for c in range(5) if 0 < (y == c).sum() < n]
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y == c, prob[:, c]) for c in present]), abs=1e-12)
    np.testing.assert_array_equal(metrics.predicted_grade(prob), prob.argmax(1))  # ties: the lowest grade


def test_kappa_is_one_for_agreement_and_nan_when_undefined():
    y = np.array([0, 1, 2, 3, 4, 4])
    assert metrics.quadratic_kappa(y, y, 5) == 1.0
    assert math.isnan(metrics.quadratic_kappa(np.array([2, 2]), np.array([2, 2]), 5))  # one grade: undefined
    assert math.isnan(cohen_kappa_score([2, 2], [2, 2], weights="quadratic", labels=list(range(5))))
    assert math.isnan(metrics.quadratic_kappa(np.array([], int), np.array([], int), 5))
    assert math.isnan(metrics.quadratic_kappa(np.array([0]), np.array([0]), 1))
    one_grade = round_metrics(Predictions("kl-grade", np.tile(np.eye(5)[1], (4, 1)), np.ones(4, int)))
    assert one_grade["accuracy"] == 1.0 and math.isnan(one_grade["auc"]) and math.isnan(one_grade["kappa"])


# ---------------------------------------------------------------- survival: Harrell's C (from tests/test_oncology_math.py)


@pytest.mark.parametrize("rounding", [3, 0])
def test_c_index_equals_lifelines_including_tied_times_and_risks(rounding):
    x, t, e = survival_data(n=400, seed=5, rounding=rounding)
    risk = np.round(x[:, 0], 1)  # tied risks too
    assert concordance_index(t, risk, e) == pytest.approx(lifelines_cindex(t, -risk, e), abs=1e-12)


def test_c_index_is_one_for_perfect_and_zero_for_reversed_ranking():
    t = np.arange(1.0, 11.0)
    e = np.ones(10)
    assert concordance_index(t, -t, e) == 1.0
    assert concordance_index(t, t, e) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_c_index_equals_lifelines_on_random_censored_data(seed):
    rng = np.random.default_rng(50 + seed)
    n = int(rng.integers(3, 300))
    t = np.round(rng.exponential(1, n), int(rng.integers(0, 3))) + 0.1
    e = (rng.random(n) < rng.uniform(0.2, 0.9)).astype(int)
    e[0] = 1
    t[1] = t[0] + 1  # at least one comparable pair
    risk = np.round(rng.normal(size=n), int(rng.integers(0, 2)))
    assert concordance_index(t, risk, e) == pytest.approx(lifelines_cindex(t, -risk, e), abs=1e-12)


def test_c_index_in_row_blocks_equals_lifelines():
    x, t, e = survival_data(n=3000, seed=9)  # 4e6 // 3000 = 1333 rows a block: two blocks of events
    assert e.sum() > 1333
    assert concordance_index(t, x[:, 1], e) == pytest.approx(lifelines_cindex(t, -x[:, 1], e), abs=1e-12)


def test_c_index_is_nan_without_a_comparable_pair():
    t, risk = np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.2, 0.3])
    assert math.isnan(concordance_index(t, risk, np.zeros(3)))  # no event
    with pytest.raises(ZeroDivisionError):  # lifelines refuses the same data
        lifelines_cindex(t, -risk, np.zeros(3))
    assert math.isnan(concordance_index(np.array([2.0]), np.array([0.5]), np.array([1])))


# ---------------------------------------------------------------- calibration


def test_reliability_bins_and_ece_equal_scikit_learn_calibration_curve():
    rng = np.random.default_rng(21)
    prob = rng.beta(2, 3, 500)  # no value on a bin edge
    y = (rng.random(500) < prob ** 1.3).astype(int)
    count, mean, observed, ece = metrics.reliability(prob, y == 1)
    true, predicted = calibration_curve(y, prob, n_bins=metrics.BINS, strategy="uniform")
    filled = count > 0
    np.testing.assert_allclose(observed[filled], true, atol=1e-12)
    np.testing.assert_allclose(mean[filled], predicted, atol=1e-12)
    assert ece == pytest.approx(float(np.sum(count[filled] / count.sum() * np.abs(true - predicted))), abs=1e-12)
    assert metrics.metric_functions("referral")["ece"](Predictions("referral", prob, y)) == ece
    assert math.isnan(metrics.reliability(np.array([]), np.array([], bool))[3])


# ---------------------------------------------------------------- one implementation: a round and a validation agree


class Echo(nn.Module):
    """A "model" whose outputs are written in its inputs: a tabular row's first ``k`` features, an image's first
    row's first ``k`` pixels. So any logits can be planted, ties and p = 0.5 exactly included."""

    def __init__(self, k: int, image: bool):
        super().__init__()
        self.k, self.image = k, image
        self.unused = nn.Linear(1, 1)  # predict() moves the model: it needs a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x[:, 0, 0, : self.k] if self.image else x[:, : self.k]
        return out.squeeze(-1) if self.k == 1 else out


def _planted(outcome: str, n: int = 120, seed: int = 0):
    """A task, an Echo model and a site whose test split's outputs are planted, with ties and p = 0.5 cases."""
    rng = np.random.default_rng(seed)
    if outcome in ("survival", "response"):
        logits = np.round(rng.normal(size=n), 1).astype(np.float32)
        logits[:15] = 0.0  # p = 0.5 exactly
        x = np.concatenate([logits[:, None], rng.normal(size=(n, 2)).astype(np.float32)], axis=1)
        y = (rng.random(n) < sigmoid(2 * logits)).astype(np.int64)
        time = np.round(rng.exponential(np.exp(-logits)), 1) + 0.1
        split = Split(x, time, (rng.random(n) < 0.7).astype(np.int64), y)
        return OncologyTask({"endpoint": outcome}, {}), Echo(1, image=False), SimpleNamespace(test=split)
    k = 2 if outcome == "referral" else 5
    logits = np.round(rng.normal(size=(n, k)), 1).astype(np.float32)
    logits[:15, 1] = logits[:15, 0]  # referral: P = 0.5 exactly; kl-grade: tied maxima on some rows
    y = rng.integers(0, k, n)
    y[:15:2] = 1  # positives among the p = 0.5 cases
    images = rng.normal(size=(n, 1, 4, 8)).astype(np.float32)
    images[:, 0, 0, :k] = logits
    split = ImageSplit(images, y.astype(np.int64), ["other"] * n, patients=np.arange(n) // 2)
    return RadiologyTask({"task": "radiology", "target": outcome}, {}), Echo(k, image=True), SimpleNamespace(test=split)


@pytest.mark.parametrize("outcome", ["survival", "response", "referral", "kl-grade"])
def test_a_round_and_a_validation_report_the_same_figures_for_the_same_predictions(outcome):
    task, model, data = _planted(outcome)
    round_figures = task.evaluate(model, data)  # what client/app.py's evaluate sends, per round
    validated = qc.validate(task.predictions(model, data), qc.QCSettings(bootstrap=0))["metrics"]
    assert set(round_figures) == {"loss", *metrics.ROUND[outcome]}
    for name in metrics.ROUND[outcome]:
        assert _same(round_figures[name], validated[name]["value"]), (name, round_figures[name], validated[name])


def test_a_referral_at_exactly_p_one_half_is_positive_in_training_and_validation():
    task, model, data = _planted("referral")
    logits = data.test.images[:, 0, 0, :2].astype(np.float64)
    assert (logits[:15, 0] == logits[:15, 1]).all() and data.test.labels[:15].sum() > 0
    pred = task.predictions(model, data)
    assert (pred.score[:15] == 0.5).all()
    positive = logits[:, 1] >= logits[:, 0]  # P(referral) >= 0.5, ties referred; argmax would not refer them
    y = data.test.labels
    round_figures = task.evaluate(model, data)
    validated = qc.validate(pred, qc.QCSettings(bootstrap=0))["metrics"]
    for figures in (round_figures, {k: v["value"] for k, v in validated.items()}):
        assert figures["sensitivity"] == pytest.approx(positive[y == 1].mean(), abs=1e-12)
        assert figures["specificity"] == pytest.approx((~positive[y == 0]).mean(), abs=1e-12)
        assert figures["accuracy"] == pytest.approx((positive == (y == 1)).mean(), abs=1e-12)
    assert round_figures["sensitivity"] > (logits[:, 1] > logits[:, 0])[y == 1].mean()  # the old argmax's figure
    assert round_figures["auc"] == pytest.approx(roc_auc_score(y, pred.score), abs=1e-12)


def test_the_metrics_path_imports_neither_scikit_learn_scipy_nor_torch():
    import subprocess
    import sys

    code = ("import sys, numpy as np\nfrom models import metrics\n"
            "p = metrics.Predictions('referral', np.array([0.2, 0.5, 0.9]), np.array([0, 1, 1]))\n"
            "f = metrics.metric_functions('referral'); [fn(p) for fn in f.values()]\n"
            "s = metrics.Predictions('survival', np.array([0.2, 0.5]), np.array([1.0, 2.0]), np.array([1, 1]))\n"
            "metrics.round_metrics(s); metrics.estimate(p, f, 20, 1)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy', 'torch', 'lifelines'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
