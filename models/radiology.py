"""Radiology models: MONAI networks for knee X-ray grading (their metrics are models/metrics.py's).

Targets: ``kl-grade`` (Kellgren–Lawrence 0–4, five classes), ``referral``
(binary: KL >= 2, the patients who should see the orthopaedic specialist) or
``binary`` (the site's own 0/1 labels, any finding: labels.csv's ``label`` is
the class itself). All are trained as softmax classifiers so one loss and one
evaluation path serve them; a binary model's positive-class probability is then
classified by models/metrics.py's rule (P >= threshold), not by argmax.
"""

from __future__ import annotations

import numpy as np
from torch import nn

TARGETS = {"kl-grade": 5, "referral": 2, "binary": 2}
BINARY_TARGETS = ("referral", "binary")  # scored by P(class 1)
MODELS = ("small-cnn", "densenet121", "small-cnn-instancenorm")
# An architecture that changed under its name, and what the earlier one is called now: a model saved with the
# earlier one (its model.json naming the old name) is still loaded, validated and monitored as what it is.
EARLIER = {"small-cnn": "small-cnn-instancenorm"}


def num_classes(target: str) -> int:
    if target not in TARGETS:
        raise ValueError(f"unknown radiology target {target!r}; choose one of {tuple(TARGETS)}")
    return TARGETS[target]


def build_radiology_model(model: str, target: str, image_size: int) -> nn.Module:
    """``densenet121`` is MONAI's DenseNet-121 (2D, one channel); ``small-cnn`` is MONAI's
    residual ``Classifier`` with ~0.1 M weights, which trains in seconds on two CPU cores.

    ``small-cnn`` normalises with BatchNorm: MONAI's default InstanceNorm (no affine) scales every image's feature
    maps to unit variance, throwing away how bright or coarse a structure is against the rest of the picture, and
    cost 0.04–0.06 AUC on real ultrasound (tests/bench_breastmnist.py). FedAvg averages the BatchNorm running
    statistics with the weights, by training images; the reader standardises every image first, so the sites'
    statistics describe the same scale. Under ``dp`` Opacus' fix replaces BatchNorm by GroupNorm (models/builders.py).
    ``small-cnn-instancenorm`` is the small CNN before 2026-12-06 (MONAI's default InstanceNorm): models trained
    with it still load (``EARLIER``).
    """
    from monai.networks.nets import Classifier, DenseNet121  # imported here: oncology nodes never pay for it

    classes = num_classes(target)
    if model == "densenet121":
        return DenseNet121(spatial_dims=2, in_channels=1, out_channels=classes)
    if model in ("small-cnn", "small-cnn-instancenorm"):
        norm = "BATCH" if model == "small-cnn" else "INSTANCE"
        return Classifier(in_shape=(1, image_size, image_size), classes=classes,
                          channels=(8, 16, 32, 64), strides=(2, 2, 2, 2), norm=norm)
    raise ValueError(f"unknown radiology model {model!r}; choose one of {MODELS}")


def referral_from_grade(grade: np.ndarray) -> np.ndarray:
    """The referral label of a KL grade (KL >= 2); a label, not a prediction."""
    return (np.asarray(grade) >= 2).astype(np.int64)
