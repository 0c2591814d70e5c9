"""Radiology networks: shapes, identical builds, sizes, the referral label (the metrics: tests/test_metrics.py)."""

import numpy as np
import pytest
import torch

from models.radiology import num_classes, referral_from_grade
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


def test_referral_label_is_kl_grade_two_or_more():
    labels = referral_from_grade(np.array([0, 1, 2, 3, 4, 4]))
    assert labels.tolist() == [0, 0, 1, 1, 1, 1]
