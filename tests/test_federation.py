"""Real Flower simulations (`flwr run` against a local SuperLink) tracked in a real MLflow store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from client.data import demo
from client.data.tabular import load_cohort
from models.metrics import concordance_index
from models.oncology import cox_partial_nll
from models.builders import build_model, model_hash
from server import runner
from server.summary import find_summary, summary_from_log
from server.tracking import FLWR_RUN_TAG
from tests.conftest import APP_DIR, processes_mentioning

pytestmark = pytest.mark.timeout(600)


def _runs(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def test_response_endpoint_trains_an_mlp_and_tracks_auc(superlink, tmp_path, mlflow_uri):
    root = tmp_path / "sites"
    demo.write_demo(root, 3)
    config = {"num-server-rounds": 2, "endpoint": "response", "model": "mlp", "strategy": "fedadam",
              "data-root": str(root), "mlflow-uri": mlflow_uri, "mlflow-experiment": "resp"}
    outcome = runner.flwr_run(APP_DIR, superlink, config, num_supernodes=3)
    assert outcome.ok, outcome.log[-3000:]
    client, runs = _runs(mlflow_uri, "resp")
    metrics = runs[0].data.metrics
    assert 0.5 < metrics["federation/auc"] <= 1.0
    # FedAdam computes in float64; the global model stays in the model's dtypes, so no update is "wrong"
    skipped = client.get_metric_history(runs[0].info.run_id, "federation/round_skipped")
    assert [m.value for m in skipped] == [0.0, 0.0]
    assert "Hovedstaden/accuracy" in metrics


def _check_ledgers(home: Path, flwr_run_id: int, run, client, sites: list[str], forbidden: list[str]) -> list[dict]:
    """Both ledgers exist, verify against the MLflow head, reconcile, and hold no identifier or path."""
    from typer.testing import CliRunner

    from models.ledger import read_records
    from server.audit import audit_app

    cli = CliRunner()
    coordinator = home / "ledgers" / f"run-{flwr_run_id}.jsonl"
    site_ledgers = [home / "site-ledgers" / s / f"run-{flwr_run_id}.jsonl" for s in sites]
    head = run.data.tags["fedhosp.ledger_head"]
    artifact = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/audit/ledger.jsonl")
    assert artifact == coordinator.read_text(encoding="utf-8")
    result = cli.invoke(audit_app, ["verify", str(coordinator), "--head", head,
                                    "--public-key", str(home / "keys" / "coordinator_ed25519.pub")])
    assert result.exit_code == 0, result.output
    for path in site_ledgers:
        result = cli.invoke(audit_app, ["verify", str(path), "--public-key", str(path.parent / "site_ed25519.pub")])
        assert result.exit_code == 0, result.output
    result = cli.invoke(audit_app, ["reconcile", str(coordinator), *map(str, site_ledgers)])
    assert result.exit_code == 0, result.output
    text = "".join(p.read_text(encoding="utf-8") for p in [coordinator, *site_ledgers])
    leaked = [value for value in forbidden if value in text]
    assert not leaked, leaked[:5]
    return read_records(coordinator)


def _break_two_sites(root):
    demo.cohort(demo.REGIONS[1]).drop(columns=["event"]).to_csv(root / "Midtjylland" / "cohort.csv", index=False)
    frame = demo.cohort(demo.REGIONS[2])
    frame["stage"] = frame["stage"].map(lambda s: f"T{s}N0")
    frame.to_csv(root / "Syddanmark" / "cohort.csv", index=False)
    return ["site Midtjylland: cohort.csv has no column 'event'",
            "site Syddanmark: cohort.csv column 'stage' is not numeric"]


def test_bad_site_data_fails_the_run_with_a_clear_error_and_no_finished_mlflow_run(superlink, tmp_path, mlflow_uri):
    breakage = _break_two_sites
    root = tmp_path / "sites"
    demo.write_demo(root, 3)
    expected = breakage(root)
    config = {"num-server-rounds": 2, "data-root": str(root), "mlflow-uri": mlflow_uri, "mlflow-experiment": "bad"}
    # through `fedhosp run`, as a person would (it uses the test's SuperLink, already up on its port)
    done = subprocess.run([sys.executable, "-m", "server.cli", "run", "--sites", "3", "--run-config",
                           runner.config_arg(config)], env=superlink, capture_output=True, text=True, timeout=600,
                          cwd=APP_DIR)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "did not complete[/]" not in done.stdout and "status finished:failed" in done.stdout
    log_file = Path(done.stdout.rsplit("The run's whole log: ", 1)[1].split()[0])
    run_id = int(log_file.stem.removeprefix("run-"))
    reason = runner.ledger_failure(Path(superlink["FEDHOSP_HOME"]), run_id)  # the coordinator's run-failed event
    assert reason.startswith("site check failed:") and all(e in reason for e in expected)  # every site's problem
    assert "Traceback" not in reason and "ray::" not in reason
    printed = done.stdout.replace("\n", " ")
    assert all(e in printed for e in expected) and "Traceback" not in done.stdout  # the relevant lines, no more
    _, runs = _runs(mlflow_uri, "bad")
    assert [r for r in runs if r.info.status == "FINISHED"] == []


def _pooled_cox_fit(cohorts) -> torch.nn.Module:
    """Centralised fit of the same linear Cox model on all training splits (site-stratified risk sets)."""
    model = build_model("oncology", "linear", num_features=len(cohorts[0].features)).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")
    parts = [(torch.tensor(c.train.x, dtype=torch.float64), torch.tensor(c.train.time), torch.tensor(c.train.event))
             for c in cohorts]

    def closure():
        opt.zero_grad()
        loss = sum(cox_partial_nll(model(x), t, e, reduction="sum") for x, t, e in parts)
        loss.backward()
        return loss

    opt.step(closure)
    return model.float()


def _pooled_test_c_index(model, cohorts) -> float:
    with torch.no_grad():
        risk = np.concatenate([model(torch.from_numpy(c.test.x)).numpy() for c in cohorts])
    time = np.concatenate([c.test.time for c in cohorts])
    event = np.concatenate([c.test.event for c in cohorts])
    return concordance_index(time, risk, event)


def test_main_job_tracks_every_round_per_site_keeps_agreeing_ledgers_and_recovers_the_pooled_fit(flower_env):
    """`fedhosp run` (the README's main job) on the five demo regions, 8 rounds: progress lines, one MLflow run
    with every metric per round and site, the saved and registered model, both ledgers verified and reconciled
    with no identifier or path, and a federated C-index within 0.02 of a pooled fit. One federation, read by all."""
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "run", "--sites", "5",
         "--run-config", "num-server-rounds=8 mlflow-experiment='recovery'"],
        env=flower_env, capture_output=True, text=True, timeout=600, cwd=APP_DIR,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for region in demo.REGIONS:
        assert region.name in result.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stdout.replace("\n", "")
    assert not processes_mentioning(flower_env["FLWR_HOME"])

    # without a terminal: one plain progress line per round instead of Flower's log
    progress = [line for line in result.stdout.splitlines() if line.startswith("fedhosp round ")]
    assert [line.split(" · ")[0] for line in progress] == [f"fedhosp round {k}/8" for k in range(1, 9)]
    assert all("5/5 sites answered · c_index 0." in line for line in progress)
    assert "configure_train" not in result.stdout and "[ROUND" not in result.stdout

    uri = f"sqlite:///{flower_env['FEDHOSP_HOME']}/mlflow.db"
    _, runs = _runs(uri, "recovery")
    flwr_run_id = int(runs[0].data.tags[FLWR_RUN_TAG])
    summary = find_summary(uri, flwr_run_id)
    # what the CLI printed came from the run's log (kept in FEDHOSP_HOME/logs), and it is what MLflow holds
    logged = summary_from_log((Path(flower_env["FEDHOSP_HOME"]) / "logs" / f"run-{flwr_run_id}.log").read_text(), flwr_run_id)
    mlflow_only = ("mlflow_status", "experiment_id")
    assert {k: v for k, v in logged.items() if k not in mlflow_only} == \
        {k: v for k, v in summary.items() if k not in mlflow_only}
    assert logged["mlflow_status"] == summary["mlflow_status"] == "FINISHED"

    # one MLflow run with the whole run config and every metric per round and per site
    client, run = MlflowClient(uri), runs[0]
    assert len(runs) == 1 and run.info.status == "FINISHED"
    assert {"strategy", "num-server-rounds", "local-epochs", "local-steps", "lr", "server-lr", "proximal-mu",
            "seed", "data-root", "mlflow-uri", "mlflow-experiment", "task", "endpoint", "model",
            "batch-size"} <= set(run.data.params)
    assert run.data.params["num-server-rounds"] == "8"
    rounds = list(range(1, 9))

    def steps(key):
        return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))

    for key in ("federation/c_index", "federation/train_loss", "federation/eval_loss",
                "federation/round_duration_s", "federation/num_patients", "federation/failed_sites"):
        assert steps(key) == rounds, key
    sites = [r.name for r in demo.REGIONS]
    root = Path(flower_env["FEDHOSP_HOME"]) / "demo" / "oncology-seed42"
    for site in sites:
        for key in ("c_index", "train_loss", "eval_loss", "num_patients", "num_test_patients", "failed", "update_bytes"):
            assert steps(f"{site}/{key}") == rounds, f"{site}/{key}"
    patients = {s: client.get_metric_history(run.info.run_id, f"{s}/num_patients")[-1].value for s in sites}
    assert patients == {s: len(load_cohort(root / s, s).train) for s in sites}

    # the saved model is the one MLflow and the registry name
    state = torch.load(summary["model_file"])
    assert model_hash(state) == summary["model_hash"] == run.data.tags["fedhosp.model_hash"]
    version = client.get_model_version("fedhosp-oncology-survival", summary["registered_model"].rsplit("/", 1)[1])
    assert version.tags["fedhosp.sites"] == ",".join(sorted(sites))
    assert version.run_id == run.info.run_id

    # the audit trail: signed ledgers on both sides that agree, with no patient identifier or data path
    patient_ids = [pid for s in sites for pid in pd.read_csv(root / s / "cohort.csv")["patient_id"]]
    records = _check_ledgers(Path(flower_env["FEDHOSP_HOME"]), flwr_run_id, run, client, sites,
                             patient_ids + [str(root)])
    events = [r["event"] for r in records]
    assert events[:2] == ["ledger-open", "run-start"] and events[-1] == "run-end"
    assert events.count("round-start") == 8 and events.count("update") == 40 and events.count("evaluation") == 40
    assert version.tags["fedhosp.ledger_head"] == records[-1]["hash"] == run.data.tags["fedhosp.ledger_head"]
    assert records[-1]["data"]["final_model_hash"] == summary["model_hash"]

    # the model itself: within 0.02 C-index of a centralised fit on the pooled data
    federated = build_model("oncology", "linear", num_features=len(demo.FEATURES))
    federated.load_state_dict(state)

    folder = lambda r: f"{flower_env['FEDHOSP_HOME']}/demo/oncology-seed42/{r.name}"  # noqa: E731
    cohorts = [load_cohort(folder(r), r.name) for r in demo.REGIONS]
    pooled = _pooled_cox_fit(cohorts)
    c_fed, c_pooled = _pooled_test_c_index(federated, cohorts), _pooled_test_c_index(pooled, cohorts)
    assert c_pooled > 0.68  # the known effects are strong enough to be learnt
    print(f"pooled test C-index: federated {c_fed:.4f}, centralised {c_pooled:.4f}")
    assert abs(c_fed - c_pooled) <= 0.02, (c_fed, c_pooled)
    # the known effects' directions are recovered (features are sorted by name)
    weights = dict(zip(cohorts[0].features, federated.net[-1].weight.detach().numpy().reshape(-1)))
    for feature, true in demo.TRUE_LOG_HR.items():
        if abs(true) >= 0.2:
            assert np.sign(weights[feature]) == np.sign(true), (feature, weights)


def test_radiology_simulation_learns_kl_grades_from_dicom_and_skips_broken_files(superlink, tmp_path, mlflow_uri):
    from client.data.radiology_demo import write_radiology_demo

    root = tmp_path / "sites"
    sites = [f.name for f in write_radiology_demo(root, 3, n_images=60)]
    config = {"task": "radiology", "num-server-rounds": 3, "data-root": str(root), "mlflow-uri": mlflow_uri,
              "mlflow-experiment": "rad"}
    outcome = runner.flwr_run(APP_DIR, superlink, config, num_supernodes=3)
    assert outcome.ok, outcome.log[-3000:]

    client, runs = _runs(mlflow_uri, "rad")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    for site in sites:
        for key in ("auc", "kappa", "accuracy", "train_loss", "num_images", "num_test_images", "update_bytes"):
            assert sorted(m.step for m in client.get_metric_history(run_id, f"{site}/{key}")) == [1, 2, 3]
    final_auc = client.get_metric_history(run_id, "federation/auc")[-1].value
    assert final_auc > 0.8, final_auc  # chance is 0.5
    # the broken objects in Syddanmark were skipped and counted, not a crash of the round
    site_counts = mlflow.artifacts.load_dict(f"{runs[0].info.artifact_uri}/sites.json")
    assert site_counts["Syddanmark"]["skipped_rows"] == 4 and site_counts["Hovedstaden"]["skipped_rows"] == 0
    assert runs[0].data.params["model"] == "small-cnn" and runs[0].data.params["lr"] == "0.001"
    # the data path in MLflow as in the ledger: its SHA-256, no param or tag holding the path itself
    assert runs[0].data.params["data-root"].startswith("sha256:")
    assert str(root) not in "\n".join([*runs[0].data.params.values(), *runs[0].data.tags.values()])
    assert client.get_registered_model("fedhosp-radiology-kl-grade") is not None

    import pydicom

    uids = []
    for path in root.rglob("*"):
        if path.is_file() and path.name != "labels.csv":
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            uids += [str(getattr(ds, k)) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                                                   "PatientID") if k in ds]
    assert len(uids) > 100
    _check_ledgers(Path(superlink["FEDHOSP_HOME"]), outcome.run_id, runs[0], client, sites, uids + [str(root)])
