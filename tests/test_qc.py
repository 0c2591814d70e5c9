"""Validation figures on the node, acceptance criteria and drift: the arithmetic, without a federation.

The metrics and their bootstrap are tests/test_metrics.py's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from client import validation as qc
from models import metrics, wire
from client.data.dicom import load_radiology_site
from client.data.radiology_demo import radiology_regions, write_radiology_site
from server import criteria as acceptance
from tests.synthetic import binary_predictions

RNG = np.random.default_rng(7)


def _binary(n=300, groups=None):
    return binary_predictions(RNG, n, groups)


def test_small_groups_are_suppressed_and_no_count_can_be_recovered():
    n = 300
    ages = np.where(np.arange(n) < 7, "80+", np.where(np.arange(n) < 150, "50-64", "65-79")).tolist()
    sexes = ["F" if i % 2 else "M" for i in range(n)]
    pred = _binary(n, groups={"age": ages, "sex": sexes})
    result = qc.validate(pred, qc.QCSettings(bootstrap=50, min_cell=10))
    # the small group is not even named: only that one group of "age" was suppressed
    assert "80+" not in result["subgroups"]["age"]
    assert result["subgroups"]["age"][wire.SUPPRESSED] == {"suppressed": True, "groups": 1}
    assert "n" not in result["subgroups"]["age"]["50-64"]  # 300 - 143 - 150 would give the 7 away
    assert result["subgroups"]["sex"]["F"]["n"] == 150  # nothing suppressed: counts are fine
    flat = wire.flatten(result)
    assert not [k for k in flat if "80+" in k] and flat["g/age/~suppressed"] == 1.0
    counts = [c for c in result["reliability"]["count"] if c is not None]
    assert all(c >= 10 for c in counts)
    assert wire.unflatten(flat)["subgroups"] == result["subgroups"]


def test_dicom_headers_give_sex_age_and_vendor_groups_and_patients(tmp_path: Path):
    region = radiology_regions(1)[0]
    write_radiology_site(tmp_path / region.name, region, n_images=40)
    site = load_radiology_site(tmp_path / region.name, region.name, image_size=32)
    test = site.test
    assert set(test.groups["sex"]) <= {"F", "M"} and set(test.groups["vendor"]) == {region.manufacturer}
    assert set(test.groups["age"]) <= {"<50", "50-64", "65-79", "80+"} and "" not in test.groups["age"]
    patients = np.concatenate([site.train.patients, test.patients])
    assert len(test.patients) == len(test) and len(np.unique(patients)) < len(patients)  # some have both knees
    assert set(site.train.patients).isdisjoint(test.patients)  # split by patient


def _criteria(use_lower_bound=True, margin=0.05):
    rules = (acceptance.Rule("auc", 0.85, "min"), acceptance.Rule("ece", 0.10, "max"))
    return acceptance.Criteria("t", "t.toml", "referral", rules, use_lower_bound, margin)


def _site(auc, low, high, ece=0.05, ece_high=0.08):
    return {"status": "ok", "n": 100, "metrics": {"auc": {"value": auc, "low": low, "high": high},
                                                  "ece": {"value": ece, "low": 0.02, "high": ece_high}}}


def test_the_lower_bound_not_the_point_estimate_must_clear_the_bar():
    site = _site(0.90, 0.83, 0.95)
    assert acceptance.site_verdict(_criteria(use_lower_bound=False), site)[0] == "PASS"
    verdict, reasons = acceptance.site_verdict(_criteria(), site)
    assert verdict == "FAIL" and "auc 95% lower bound 0.83 < 0.85" in reasons
    assert acceptance.site_verdict(_criteria(), _site(0.95, 0.90, 0.97, ece_high=0.12))[0] == "FAIL"  # upper bound
    assert acceptance.site_verdict(_criteria(), _site(math.nan, None, None))[0] == "FAIL"
    assert acceptance.site_verdict(_criteria(), {"status": "failed", "error": "site X: gone"})[0] == "NO RESULT"
    result = {"sites": {"A": _site(0.95, 0.9, 0.97), "B": _site(0.90, 0.83, 0.95)}}
    acceptance.apply_verdicts(_criteria(), result)
    assert result["verdict"] == "FAIL" and result["reasons"][0].startswith("B: FAIL")
    result = {"sites": {"A": _site(0.95, 0.9, 0.97)}}
    acceptance.apply_verdicts(_criteria(), result)
    assert result["verdict"] == "PASS"


def test_drift_flags_a_fall_beyond_the_margin_and_a_bar_no_longer_cleared():
    previous = {"sites": {"Sjælland": _site(0.91, 0.87, 0.95), "Fyn": _site(0.93, 0.88, 0.96)}}
    now = {"metrics": ["auc", "ece"], "sites": {"Sjælland": _site(0.83, 0.78, 0.88), "Fyn": _site(0.92, 0.86, 0.96)}}
    flags = acceptance.drift(_criteria(), previous, now)
    assert "drift at Sjælland: AUC 0.91 → 0.83" in flags
    assert any(f.startswith("drift at Sjælland: auc 95% lower bound 0.87 → 0.78 no longer clears") for f in flags)
    assert not any("Fyn" in f for f in flags)  # fell by 0.01: within the margin, still clears the bar
    assert acceptance.drift(_criteria(), None, now) == []


def test_every_shipped_criteria_file_loads_and_bad_ones_are_named(tmp_path: Path):
    for outcome in ("survival", "response", "referral", "kl-grade", "binary"):
        crit = acceptance.load_criteria("", outcome, tuple(metrics.metric_functions(outcome, 0.5)))
        assert crit.rules and crit.file == f"configs/acceptance/{outcome}.toml"
    bad = tmp_path / "bad.toml"
    bad.write_text('outcome = "referral"\n[[rule]]\nmetric = "dice"\nmin = 0.5\n')
    with pytest.raises(ValueError, match=r"bad.toml: each \[\[rule\]\] needs a metric"):
        acceptance.load_criteria(str(bad), "referral", ("auc",))
    with pytest.raises(ValueError, match="is for outcome 'referral', the model predicts 'survival'"):
        acceptance.load_criteria(str(bad), "survival", ("c_index",))
    with pytest.raises(ValueError, match="not found"):
        acceptance.load_criteria(str(tmp_path / "none.toml"), "referral", ("auc",))


def test_a_model_that_cannot_be_used_is_refused_with_the_reason(tmp_path: Path):
    import json

    import torch

    from models.builders import build_model, model_hash
    from server.validate import load_model
    from server.settings import RunSettings
    from server.sites import FederationError

    settings = RunSettings()
    folder = tmp_path / "vendor"
    folder.mkdir()
    with pytest.raises(FederationError, match="no such file or folder"):
        load_model(str(tmp_path / "nowhere"), settings, {})
    state = build_model("oncology", "linear", endpoint="response", num_features=6).state_dict()
    torch.save(state, folder / "model.pt")
    with pytest.raises(FederationError, match="model.json is missing"):
        load_model(str(folder), settings, {})
    spec = {"task": "oncology", "outcome": "response", "model": "linear", "features": list("abcdef")}
    (folder / "model.json").write_text(json.dumps({**spec, "model_hash": "0" * 64}))
    with pytest.raises(FederationError, match="does not match the model_hash"):
        load_model(str(folder / "model.pt"), settings, {})
    (folder / "model.json").write_text(json.dumps({**spec, "features": list("abc")}))
    with pytest.raises(FederationError, match="the weights do not fit a linear model for oncology/response"):
        load_model(str(folder), settings, {})
    (folder / "model.json").write_text(json.dumps({**spec, "model": "transformer"}))
    with pytest.raises(FederationError, match="cannot build"):
        load_model(str(folder), settings, {})
    (folder / "model.json").write_text(json.dumps({**spec, "model_hash": model_hash(state)}))
    loaded = load_model(str(folder), settings, {"batch-size": 32})
    assert loaded.hash == model_hash(state) and loaded.registry is None


def test_the_printout_shows_the_verdict_intervals_and_report():
    from rich.console import Console

    from server.summary import print_summary

    summary = {"mode": "validate", "flwr_run_id": 7, "model_uri": "models:/m/2", "task": "radiology",
               "outcome": "referral", "criteria": "knee-referral", "metrics": ["auc"], "verdict": "FAIL",
               "reasons": ["Sjælland: FAIL (auc 95% lower bound 0.78 < 0.85)"], "drift": ["drift at Sjælland: AUC 0.91 → 0.83"],
               "report": "/r/validate-flwr-7.html", "mlflow_run_id": "abc", "experiment": "fedhosp",
               "tracking_uri": "sqlite:///x.db", "registered_model": "models:/m/2", "cross_site": None,
               "sites": {"Sjælland": {"verdict": "FAIL", "n": 40, "error": None,
                                      "metrics": {"auc": {"value": 0.83, "low": 0.78, "high": 0.88}}},
                         "Fyn": {"verdict": "NO RESULT", "n": None, "error": "site Fyn: no reply within 60s",
                                 "metrics": {}}}}
    console = Console(record=True, width=200)
    print_summary(summary, console)
    text = console.export_text()
    assert "0.83 (0.78–0.88)" in text and "NO RESULT site Fyn: no reply within 60s" in text
    assert "Verdict         : FAIL" in text and "drift at Sjælland: AUC 0.91 → 0.83" in text
    assert "/r/validate-flwr-7.html" in text and "fedhosp.validation.verdict=FAIL" in text


def test_a_small_cnn_saved_before_batchnorm_still_loads_as_the_architecture_it_was_trained_as(tmp_path: Path):
    """small-cnn gained BatchNorm on 2026-12-06: a model registered earlier (InstanceNorm, model.json naming
    small-cnn) is validated as small-cnn-instancenorm, not refused; weights that fit neither are still refused."""
    import json

    import torch

    from models.builders import build_model, model_hash
    from server.settings import RunSettings
    from server.sites import FederationError
    from server.validate import load_model, model_settings

    folder = tmp_path / "registered-2026-11"
    folder.mkdir()
    state = build_model("radiology", "small-cnn-instancenorm", target="referral", image_size=32).state_dict()
    assert not any("running_mean" in k for k in state)
    torch.save(state, folder / "model.pt")
    spec = {"task": "radiology", "outcome": "referral", "model": "small-cnn", "image_size": 32,
            "model_hash": model_hash(state)}
    (folder / "model.json").write_text(json.dumps(spec))
    loaded = load_model(str(folder), RunSettings(), {})
    assert loaded.spec["model"] == "small-cnn-instancenorm" and loaded.hash == model_hash(state)
    assert model_settings({}, loaded.spec).model == "small-cnn-instancenorm"  # what the nodes are told to build

    today = build_model("radiology", "small-cnn", target="referral", image_size=32).state_dict()
    assert any("running_mean" in k for k in today)
    torch.save(today, folder / "model.pt")
    (folder / "model.json").write_text(json.dumps({**spec, "model_hash": model_hash(today)}))
    assert load_model(str(folder), RunSettings(), {}).spec["model"] == "small-cnn"

    torch.save(build_model("radiology", "densenet121", target="referral", image_size=32).state_dict(),
               folder / "model.pt")
    (folder / "model.json").write_text(json.dumps({k: v for k, v in spec.items() if k != "model_hash"}))
    with pytest.raises(FederationError, match="the weights do not fit a small-cnn model for radiology/referral"):
        load_model(str(folder), RunSettings(), {})
