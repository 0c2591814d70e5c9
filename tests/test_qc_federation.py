"""Federated validation in real Flower simulations with a real MLflow store and registry.

Models under test are trained here, in-process, on the pooled demo data (as a
vendor would deliver one), saved in fedhosp's model format and, where the test
needs the registry, registered in the test's MLflow store.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy.stats import bootstrap

from client.data import demo
from client.data.tabular import Split, load_cohort
from models.metrics import CONFIDENCE, auc
from client.train import TrainSettings, predict, train_tabular
from models.builders import build_model, model_hash
from server import runner
from server.summary import find_summary
from server.registry import register_version
from server.tracking import _experiment_id, mlflow_name
from tests.conftest import APP_DIR

pytestmark = pytest.mark.timeout(900)
SEED = 42


def _fit_response_model(root: Path, sites: list[str], folder: Path, degrade: bool = False) -> Path:
    """A logistic treatment-response model fitted on the sites' pooled training splits; ``degrade`` flips it."""
    cohorts = [load_cohort(root / s, s, "response", SEED) for s in sites]
    train = Split(*(np.concatenate([getattr(c.train, f) for c in cohorts]) for f in ("x", "time", "event", "label")))
    model = build_model("oncology", "linear", endpoint="response", num_features=len(cohorts[0].features))
    train_tabular(model, train, "response", TrainSettings(local_epochs=30, batch_size=64, lr=0.02), 1, "pooled")
    state = {k: (-v if degrade else v) for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "model.pt")
    spec = {"task": "oncology", "outcome": "response", "model": "linear", "features": cohorts[0].features,
            "threshold": 0.5, "model_hash": model_hash(state)}
    (folder / "model.json").write_text(json.dumps(spec))
    return folder


def _register(folder: Path, uri: str, name: str) -> str:
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=_experiment_id(client, uri, "vendor-models")) as run:
        mlflow.log_artifacts(str(folder), "final_model")
        version = register_version(client, name, mlflow.get_artifact_uri("final_model"), run.info.run_id)
    return f"models:/{name}/{version}"


def _validate(env, root: Path, uri: str, model_uri: str, sites: int, **extra):
    config = {"mode": "validate", "model-uri": model_uri, "data-root": str(root), "mlflow-uri": uri,
              "mlflow-experiment": "qc", "seed": SEED, "bootstrap-samples": 400, "min-nodes": min(sites, 2), **extra}
    outcome = runner.flwr_run(APP_DIR, env, config, num_supernodes=sites)
    assert outcome.ok, outcome.log[-4000:]
    return find_summary(uri, outcome.run_id), outcome


def test_single_site_intervals_match_a_direct_bootstrap_and_a_failing_model_exits_3(flower_env, tmp_path):
    """`fedhosp run` validating a degraded model at one site: FAIL (exit 3), and its figures equal a direct
    computation on the pooled (= that site's) test data, the interval within SciPy's percentile bootstrap."""
    root = tmp_path / "sites"
    [folder] = demo.write_demo(root, 1, seed=SEED)
    model_dir = _fit_response_model(root, [folder.name], tmp_path / "model", degrade=True)
    uri = f"sqlite:///{tmp_path / 'cli.db'}"
    config = (f"mode='validate' model-uri='{model_dir / 'model.pt'}' data-root='{root}' mlflow-uri='{uri}' "
              f"seed={SEED} bootstrap-samples=2000 min-nodes=1")
    done = subprocess.run([sys.executable, "-m", "server.cli", "run", "--sites", "1", "--quiet", "--run-config", config],
                          env=flower_env, capture_output=True, text=True, timeout=600, cwd=APP_DIR)
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Verdict         : FAIL" in done.stdout and "auc 95% lower bound" in done.stdout
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("fedhosp").experiment_id])
    summary = find_summary(uri, int(run.data.tags["flwr.run_id"]))
    federated = summary["sites"][folder.name]["metrics"]["auc"]
    assert summary["verdict"] == "FAIL" and summary["sites"][folder.name]["verdict"] == "FAIL"
    assert folder.name in Path(summary["report"]).read_text(encoding="utf-8")

    test = load_cohort(folder, folder.name, "response", SEED).test
    model = build_model("oncology", "linear", endpoint="response", num_features=test.x.shape[1])
    model.load_state_dict(torch.load(model_dir / "model.pt"))
    score = 1 / (1 + np.exp(-predict(model, test.x)))
    assert federated["value"] == pytest.approx(auc(score, test.label), abs=1e-9) and federated["value"] < 0.5
    ref = bootstrap((score, test.label), lambda s, y: auc(s, y), paired=True, vectorized=False, n_resamples=2000,
                    confidence_level=CONFIDENCE, method="percentile", random_state=1).confidence_interval
    assert federated["low"] == pytest.approx(ref.low, abs=0.015)
    assert federated["high"] == pytest.approx(ref.high, abs=0.015)
    assert summary["sites"][folder.name]["n"] == len(test)


def test_validation_verdicts_report_registry_suppression_and_drift(superlink, tmp_path, mlflow_uri):
    root = tmp_path / "sites"
    sites = [f.name for f in demo.write_demo(root, 3, seed=SEED)]
    good = _register(_fit_response_model(root, sites, tmp_path / "good"), mlflow_uri, "vendor-response")
    client = MlflowClient(mlflow_uri)
    home = Path(superlink["FEDHOSP_HOME"])

    # 1. the model passes at every site, judged by configs/acceptance/response.toml; the registry learns it
    first, outcome = _validate(superlink, root, mlflow_uri, good, 3)
    assert first["verdict"] == "PASS", first["reasons"]
    assert {s: v["verdict"] for s, v in first["sites"].items()} == dict.fromkeys(sites, "PASS")
    version = client.get_model_version("vendor-response", "1")
    assert version.tags["fedhosp.validation.verdict"] == "PASS"
    assert version.tags["fedhosp.validation.run"] == first["mlflow_run_id"]
    assert version.tags["fedhosp.validation.report"].endswith(".html")
    report = Path(first["report"]).read_text(encoding="utf-8")
    assert all(site in report for site in sites) and "PASS" in report
    assert Path(mlflow.artifacts.download_artifacts(version.tags["fedhosp.validation.report"])).read_text(
        encoding="utf-8") == report

    # small cells: no figure for a group under min-cell (10) in MLflow, the report or either ledger
    small = set()
    for site in sites:
        groups = load_cohort(root / site, site, "response", SEED).test.groups
        for attribute, labels in groups.items():
            small |= {(site, attribute, v) for v in set(labels) if 0 < labels.count(v) < 10}
    assert small, "the demo should have small subgroups"
    run = client.get_run(first["mlflow_run_id"])
    result = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="validation.json", tracking_uri=mlflow_uri)).read_text())
    coordinator = (home / "ledgers" / f"run-{outcome.run_id}.jsonl").read_text(encoding="utf-8")
    for site, attribute, value in small:
        # not even the small group's label left the site: only how many groups of the attribute were suppressed
        groups = result["sites"][site]["subgroups"][attribute]
        assert value not in groups and groups["(suppressed)"]["suppressed"] and groups["(suppressed)"]["groups"] >= 1
        assert not [k for k in run.data.metrics if k.startswith(f"{site}/{attribute} {mlflow_name(value)}/")]
        section = report.split(f"<h3>{html.escape(site)}</h3>", 1)[1].split("<h3>", 1)[0]
        assert f'<tr class="suppressed"><td>{html.escape(attribute)}</td><td>' in section
        assert f"<td>{html.escape(attribute)}</td><td>{html.escape(value)}</td>" not in section
        site_ledger = (home / "site-ledgers" / site / f"run-{outcome.run_id}.jsonl").read_text(encoding="utf-8")
        for text in (coordinator, site_ledger):
            assert f"g/{attribute}/~suppressed" in text or '"(suppressed)"' in text
            assert f"g/{attribute}/{value}/" not in text

    # what each site says it sent is exactly what the coordinator recorded (the auditor's reconcile)
    from models.ledger import read_records
    from server.audit import reconcile_validation

    records = read_records(home / "ledgers" / f"run-{outcome.run_id}.jsonl")
    site_records = [read_records(home / "site-ledgers" / s / f"run-{outcome.run_id}.jsonl") for s in sites]
    assert reconcile_validation(records, site_records) == []
    result_record = next(r for r in records if r["event"] == "validation-result")
    result_record["data"]["sites"]["Midtjylland"]["metrics"]["auc"]["value"] += 0.05  # a coordinator that lied
    assert reconcile_validation(records, site_records) == [
        "Midtjylland: the validation figures the site sent differ from the coordinator's record in 1 entries "
        "(m/auc/value)"]

    # 2. Syddanmark changes its biomarker assay; re-validating the same model flags drift there only
    region = next(r for r in demo.regions(3, SEED) if r.name == "Syddanmark")
    demo.write_site(root / "Syddanmark", region, SEED, shift=2.0, overwrite=True)
    again, _ = _validate(superlink, root, mlflow_uri, good, 3)
    assert again["drift"], again
    assert again["sites"]["Syddanmark"]["metrics"]["auc"]["value"] < first["sites"]["Syddanmark"]["metrics"]["auc"]["value"]
    assert all(flag.startswith("drift at Syddanmark: ") for flag in again["drift"])
    assert re.search(r"drift at Syddanmark: AUC 0\.\d\d → 0\.\d\d", " ".join(again["drift"]))
    assert client.get_model_version("vendor-response", "1").tags["fedhosp.validation.drift"].startswith(
        "drift at Syddanmark")
    assert "drift at Syddanmark" in Path(again["report"]).read_text(encoding="utf-8")


def test_cross_site_matrix_of_site_models_and_the_global_referral_model(superlink, tmp_path, mlflow_uri):
    from client.data.dicom import ImageSplit, load_radiology_site
    from client.data.radiology_demo import write_radiology_demo
    from client.train import train_images

    root = tmp_path / "sites"
    sites = [f.name for f in write_radiology_demo(root, 3, seed=SEED, n_images=100)]
    splits = [load_radiology_site(root / s, s, image_size=32, seed=SEED, target="referral").train for s in sites]
    pooled = ImageSplit(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]), [])
    model = build_model("radiology", "small-cnn", target="referral", image_size=32)
    train_images(model, pooled, TrainSettings(local_epochs=6, batch_size=16, lr=0.003), 1, "pooled", augment=False)
    folder = tmp_path / "global"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "model.json").write_text(json.dumps({"task": "radiology", "outcome": "referral", "model": "small-cnn",
                                                   "image_size": 32, "threshold": 0.5}))

    config = {"mode": "cross-site", "model-uri": str(folder), "data-root": str(root), "mlflow-uri": mlflow_uri,
              "mlflow-experiment": "xs", "seed": SEED, "bootstrap-samples": 200, "num-server-rounds": 1,
              "local-epochs": 2}
    outcome = runner.flwr_run(APP_DIR, superlink, config, num_supernodes=3)
    assert outcome.ok, outcome.log[-4000:]
    summary = find_summary(mlflow_uri, outcome.run_id)
    cross = summary["cross_site"]
    assert cross["metric"] == "auc" and cross["models"] == ["global", *sorted(sites)]
    assert cross["sites"] == sorted(sites)
    for model_name in cross["models"]:
        for site in sites:
            cell = cross["matrix"][model_name][site]
            assert 0 <= cell["low"] <= cell["value"] <= cell["high"] <= 1, (model_name, site, cell)
    # the site table is the global model's, with the referral metrics, and the DICOM headers' subgroups
    result = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=summary["mlflow_run_id"], artifact_path="validation.json", tracking_uri=mlflow_uri)).read_text())
    for site in sites:
        figures = result["sites"][site]
        assert figures["metrics"]["auc"]["value"] == cross["matrix"]["global"][site]["value"]
        assert {"sensitivity", "specificity", "ece"} <= set(figures["metrics"])
        assert set(figures["subgroups"]) == {"age", "sex", "vendor"}
        assert figures["reliability"]["kind"] == "positive-class"
    report = Path(summary["report"]).read_text(encoding="utf-8")
    assert "Cross-site" in report and all(site in report for site in sites)
    run = MlflowClient(mlflow_uri).get_run(summary["mlflow_run_id"])
    assert f"cross_site/global/{sites[0]}/auc" in run.data.metrics
