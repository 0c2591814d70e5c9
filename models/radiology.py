"""Radiology models: MONAI networks for knee X-ray grading, and their metrics.

Targets: ``kl-grade`` (Kellgren–Lawrence 0–4, five classes) or ``referral``
(binary: KL >= 2, the patients who should see the orthopaedic specialist).
Both are trained as softmax classifiers so one loss and one evaluation path
serve both.
"""

from __future__ import annotations

import numpy as np
from torch import nn

TARGETS = {"kl-grade": 5, "referral": 2}
MODELS = ("small-cnn", "densenet121")


def num_classes(target: str) -> int:
    if target not in TARGETS:
        raise ValueError(f"unknown radiology target {target!r}; choose one of {tuple(TARGETS)}")
    return TARGETS[target]


def build_radiology_model(model: str, target: str, image_size: int) -> nn.Module:
    """``densenet121`` is MONAI's DenseNet-121 (2D, one channel); ``small-cnn`` is MONAI's
    residual ``Classifier`` with ~0.1 M weights, which trains in seconds on two CPU cores."""
    from monai.networks.nets import Classifier, DenseNet121  # imported here: oncology nodes never pay for it

    classes = num_classes(target)
    if model == "densenet121":
        return DenseNet121(spatial_dims=2, in_channels=1, out_channels=classes)
    if model == "small-cnn":
        return Classifier(in_shape=(1, image_size, image_size), classes=classes,
                          channels=(8, 16, 32, 64), strides=(2, 2, 2, 2))
    raise ValueError(f"unknown radiology model {model!r}; choose one of {MODELS}")


def referral_from_grade(grade: np.ndarray) -> np.ndarray:
    return (np.asarray(grade) >= 2).astype(np.int64)


def classification_metrics(prob: np.ndarray, labels: np.ndarray, target: str) -> dict[str, float]:
    """Accuracy and AUC for both targets; QWK for KL grades; sensitivity/specificity for referral.

    AUC for five classes is the one-vs-rest macro average over the classes that
    occur in ``labels`` with both positives and negatives (a site's test split
    may lack a grade); NaN when none does.
    """
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    prob = np.asarray(prob, dtype=float)
    labels = np.asarray(labels).astype(int)
    pred = prob.argmax(axis=1)
    out = {"accuracy": float((pred == labels).mean())}
    aucs = [roc_auc_score(labels == c, prob[:, c]) for c in range(prob.shape[1])
            if 0 < (labels == c).sum() < len(labels)]
    out["auc"] = float(np.mean(aucs)) if aucs else float("nan")
    if target == "kl-grade":
        out["kappa"] = float(cohen_kappa_score(labels, pred, weights="quadratic", labels=list(range(5))))
    else:
        pos, neg = labels == 1, labels == 0
        out["sensitivity"] = float((pred[pos] == 1).mean()) if pos.any() else float("nan")
        out["specificity"] = float((pred[neg] == 0).mean()) if neg.any() else float("nan")
    return out
