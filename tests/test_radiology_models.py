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


def test_binary_target_reads_0_1_labels_scores_p_class_1_and_refuses_kl_grades(tmp_path):
    """target = "binary": labels.csv's label is the class itself; a KL-graded folder is refused, not misread."""
    import pandas as pd

    from client.data.dicom import load_radiology_site
    from client.data.radiology_demo import RADIOLOGY_REGIONS, write_radiology_site
    from client.train import evaluate_images
    from models.errors import SiteDataError

    labels_file = write_radiology_site(tmp_path, RADIOLOGY_REGIONS[0], n_images=12)
    with pytest.raises(SiteDataError, match="^site S: target 'binary' needs labels 0 and 1"):
        load_radiology_site(tmp_path, "S", image_size=16, target="binary", cache_dir=tmp_path / "cache")
    labels = pd.read_csv(labels_file, dtype=str)
    labels["label"] = (labels["label"].astype(int) % 2).astype(str)
    labels.to_csv(labels_file, index=False)
    site = load_radiology_site(tmp_path, "S", image_size=16, target="binary", cache_dir=tmp_path / "cache")
    assert set(site.class_counts) == {0, 1} and set(site.train.labels) | set(site.test.labels) <= {0, 1}
    model = build_model("radiology", "small-cnn", target="binary", image_size=16)
    assert set(evaluate_images(model, site.test, "binary")) == {"loss", "accuracy", "auc", "sensitivity",
                                                                 "specificity"}


def test_training_updates_batchnorm_statistics_but_sends_its_step_counters_back_as_received():
    """The small CNN normalises with BatchNorm; its running statistics are learnt (and averaged), its integer
    step counters are not: a count per site would make distances between updates measure site size."""
    from client.data.dicom import ImageSplit
    from client.train import TrainSettings, train_images

    model = build_model("radiology", "small-cnn", target="referral", image_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("num_batches_tracked") for k in before)
    rng = np.random.default_rng(0)
    data = ImageSplit(rng.normal(size=(40, 1, 32, 32)).astype(np.float32), rng.integers(0, 2, 40),
                      ["v"] * 40, np.arange(40))
    train_images(model, data, TrainSettings(local_epochs=1, batch_size=8, lr=0.001), 1, "S", augment=False)
    after = model.state_dict()
    for name, value in before.items():
        if value.is_floating_point():
            continue
        assert torch.equal(after[name], value), name
    moved = [k for k in before if k.endswith("running_mean") and not torch.equal(after[k], before[k])]
    assert moved, "BatchNorm's running statistics did not change"
