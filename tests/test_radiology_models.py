"""Radiology networks and metrics: shapes, shared keys, and metrics against direct computations."""

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from models.radiology import classification_metrics, num_classes, referral_from_grade
from models.builders import build_model, model_hash


@pytest.mark.parametrize("model", ["small-cnn", "densenet121"])
@pytest.mark.parametrize("target", ["kl-grade", "referral"])
def test_networks_output_one_logit_per_class_and_build_identically_on_both_sides(model, target):
    a = build_model("radiology", model, target=target, image_size=64)
    b = build_model("radiology", model, target=target, image_size=64)
    a.eval()
    assert a(torch.zeros(3, 1, 64, 64)).shape == (3, num_classes(target))
    assert model_hash(a.state_dict()) == model_hash(b.state_dict())


def test_small_cnn_is_small_and_densenet_is_the_real_one():
    small = build_model("radiology", "small-cnn", target="kl-grade", image_size=64)
    dense = build_model("radiology", "densenet121", target="kl-grade", image_size=64)
    assert sum(p.numel() for p in small.parameters()) < 200_000
    assert sum(p.numel() for p in dense.parameters()) > 6_900_000


def test_kl_grade_metrics_equal_sklearn_when_every_grade_is_present():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 20)
    prob = rng.dirichlet(np.ones(5), size=100)
    prob[np.arange(100), labels] += 0.5
    prob /= prob.sum(axis=1, keepdims=True)
    m = classification_metrics(prob, labels, "kl-grade")
    assert m["auc"] == pytest.approx(roc_auc_score(labels, prob, multi_class="ovr", average="macro"))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(labels, prob.argmax(1), weights="quadratic"))
    assert m["accuracy"] == pytest.approx((prob.argmax(1) == labels).mean())


def test_auc_skips_a_grade_missing_from_the_site():
    labels = np.array([0, 0, 1, 1, 2, 2])
    prob = np.eye(5)[[0, 0, 1, 1, 2, 1]] * 0.9 + 0.02
    m = classification_metrics(prob, labels, "kl-grade")
    assert np.isfinite(m["auc"])


def test_referral_sensitivity_and_specificity():
    labels = referral_from_grade(np.array([0, 1, 2, 3, 4, 4]))
    assert labels.tolist() == [0, 0, 1, 1, 1, 1]
    prob = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3], [0.1, 0.9], [0.3, 0.7]])
    m = classification_metrics(prob, labels, "referral")
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, prob[:, 1]))
