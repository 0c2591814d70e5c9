"""The trackers driven directly against a real SQLite MLflow store: no federation, no mocks.

What a run leaves in MLflow: the redacted run config as params, metrics per round, the ledger
as it grows (parts that always add up to it) and whole at the end, FAILED on an exception,
a resumed run continuing without logging anything twice, the registered model and its tags,
and drift's previous validation read strictly.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from mlflow.tracking import MlflowClient

from models.builders import build_model, model_hash
from models.ledger import Ledger, load_or_create_key
from server.registry import download_model, registered_name, tag_validation_verdict
from server.settings import RunSettings
from server.sites import SiteInfo
from server.round_report import SiteRound
from server.tracking import (ERROR_TAG, FLWR_RUN_TAG, LEDGER_ARTIFACT, LEDGER_HEAD_TAG, AnalysisTracker, Tracker,
                             ValidationTracker, checkpoint_of_run)

FEATURES = ("age", "stage", "biomarker")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds); each test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


@pytest.fixture
def experiment(request) -> str:
    return request.node.name


@pytest.fixture
def data_root(tmp_path) -> Path:
    return tmp_path / "hospital-share" / "cohorts"


@pytest.fixture
def settings(mlflow_uri, data_root, experiment) -> RunSettings:
    return RunSettings.from_run_config({"num-server-rounds": 3, "data-root": str(data_root), "mlflow-uri": mlflow_uri,
                                        "mlflow-experiment": experiment})


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    key = load_or_create_key(tmp_path / "keys" / "coordinator_ed25519.pem")
    return Ledger(tmp_path / "ledgers" / "run-7.jsonl", key, {"role": "coordinator", "run_id": 7})


def _sites() -> dict[int, SiteInfo]:
    return {1: SiteInfo(1, "Hovedstaden", FEATURES, 120, 30, 0), 2: SiteInfo(2, "Sjælland", FEATURES, 80, 20, 2)}


def _round(ledger: Ledger, k: int, failed: bool = False) -> SiteRound:
    """One round as the strategy reports it, its events in the ledger first (as RoundReporter writes them)."""
    ledger.append("round-start", {"round": k, "sites": ["Hovedstaden", "Sjælland"]})
    ledger.append("aggregation", {"round": k, "global_model_hash": f"{k:064d}"})
    ledger.append("round-end", {"round": k})
    train = {"Hovedstaden": {"num-examples": 120.0, "train_loss": 1.0 / k}}
    if not failed:
        train["Sjælland"] = {"num-examples": 80.0, "train_loss": 1.1 / k}
    evaluate = {name: {"num-examples": 25.0, "c_index": 0.6 + 0.01 * k, "loss": 2.0 / k} for name in train}
    return SiteRound(server_round=k, started=time.time(), duration_s=0.5 + k, train=train, evaluate=evaluate,
                     failures={"Sjælland": "timed out"} if failed else {},
                     train_aggregate={"train_loss": 1.0 / k, "num-examples": 200.0},
                     evaluate_aggregate={"c_index": 0.6 + 0.01 * k, "loss": 2.0 / k, "num-examples": 50.0})


def _text(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> str:
    folder = tmp_path / f"download-{time.monotonic_ns()}"
    return Path(client.download_artifacts(run_id, path, dst_path=str(folder))).read_text(encoding="utf-8")


def _parts(client: MlflowClient, run_id: str, tmp_path: Path) -> tuple[list[str], str]:
    """The names of the ledger's parts in MLflow, and the parts concatenated in name order."""
    names = sorted(f.path for f in client.list_artifacts(run_id, "audit/ledger"))
    return names, "".join(_text(client, run_id, name, tmp_path) for name in names)


def _strings(run) -> str:
    return "\n".join([*run.data.params.values(), *run.data.tags.values()])


def test_a_run_uploads_only_new_ledger_records_each_round_and_the_whole_ledger_once_at_the_end(
        settings, ledger, tmp_path, data_root):
    client = MlflowClient(settings.mlflow_uri)
    uploaded = []
    with Tracker(settings, 7, _sites(), ledger) as tracker:
        ledger.append("run-start", {"run_config": settings.as_params(redact_paths=True)})
        for k in (1, 2, 3):
            tracker.log_round(_round(ledger, k, failed=k == 2))
            names, joined = _parts(client, tracker.run_id, tmp_path)
            # the parts in MLflow add up to the ledger so far: an auditor has it all if the coordinator dies now
            assert joined == ledger.path.read_text(encoding="utf-8")
            assert client.get_run(tracker.run_id).data.tags[LEDGER_HEAD_TAG] == ledger.head
            assert LEDGER_ARTIFACT not in {f.path for f in client.list_artifacts(tracker.run_id, "audit")}
            uploaded.append(names)
        ledger.append("run-end", {"rounds": 3})
        tracker.log_ledger()
        run_id = tracker.run_id

    # one new part per round, each holding that round's records only (seq 0-4 is the opening, run-start, round 1)
    assert [len(names) for names in uploaded] == [1, 2, 3]
    assert uploaded[-1] == ["audit/ledger/part-000000-000004.jsonl", "audit/ledger/part-000005-000007.jsonl",
                            "audit/ledger/part-000008-000010.jsonl"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[FLWR_RUN_TAG] == "7"
    whole = ledger.path.read_text(encoding="utf-8")
    assert _text(client, run_id, LEDGER_ARTIFACT, tmp_path) == whole
    assert _parts(client, run_id, tmp_path)[1] == whole and run.data.tags[LEDGER_HEAD_TAG] == ledger.head

    # metrics per round and site at step = round, with the names the README lists
    steps = lambda key: sorted(m.step for m in client.get_metric_history(run_id, key))  # noqa: E731
    for key in ("federation/round_duration_s", "federation/c_index", "federation/eval_loss", "federation/num_patients",
                "Hovedstaden/c_index", "Hovedstaden/num_patients", "Hovedstaden/num_test_patients",
                "Sjælland/failed"):
        assert steps(key) == [1, 2, 3], key
    assert steps("Sjælland/c_index") == [1, 3]
    assert [m.value for m in client.get_metric_history(run_id, "federation/failed_sites")] == [0.0, 1.0, 0.0]
    assert json.loads(_text(client, run_id, "failures/round-0002.json", tmp_path)) == {"Sjælland": "timed out"}
    assert json.loads(_text(client, run_id, "sites.json", tmp_path))["Sjælland"]["skipped_rows"] == 2

    # the whole run config as params, the data path as the ledger has it: its SHA-256, never the path
    assert run.data.params["num-server-rounds"] == "3" and run.data.params["num-sites"] == "2"
    assert run.data.params["data-root"] == settings.as_params(redact_paths=True)["data-root"]
    assert run.data.params["data-root"].startswith("sha256:")
    assert str(data_root) not in _strings(run) and "hospital-share" not in _strings(run)


def test_an_exception_closes_the_run_as_failed_with_the_error_and_the_whole_ledger(settings, ledger, tmp_path):
    client = MlflowClient(settings.mlflow_uri)
    with pytest.raises(ZeroDivisionError), Tracker(settings, 7, _sites(), ledger) as tracker:
        tracker.log_round(_round(ledger, 1))
        ledger.append("run-failed", {"reason": "ZeroDivisionError: division by zero"})
        1 / 0  # noqa: B018
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert run.data.tags[ERROR_TAG] == "ZeroDivisionError: division by zero"
    whole = ledger.path.read_text(encoding="utf-8")
    assert _text(client, tracker.run_id, LEDGER_ARTIFACT, tmp_path) == whole
    assert _parts(client, tracker.run_id, tmp_path)[1] == whole and run.data.tags[LEDGER_HEAD_TAG] == ledger.head


def test_a_run_whose_opening_fails_is_failed_not_left_running(mlflow_uri, experiment, ledger, tmp_path):
    # the run is created, then its artifact store refuses sites.json: the run must not look alive
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the artifact store should be")
    client = MlflowClient(mlflow_uri)
    client.create_experiment(experiment, artifact_location=(blocked / "artifacts").as_uri())
    settings = RunSettings.from_run_config({"mlflow-uri": mlflow_uri, "mlflow-experiment": experiment})
    with pytest.raises(OSError):
        with Tracker(settings, 8, _sites(), ledger):
            pytest.fail("the body must not run")
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FAILED" and run.data.tags[ERROR_TAG].startswith(("NotADirectoryError", "FileExists"))


def test_a_resumed_run_logs_no_round_and_no_ledger_record_twice(settings, ledger, tmp_path):
    client = MlflowClient(settings.mlflow_uri)
    # the coordinator dies after round 2's metrics reached MLflow, and after it wrote round 3's first records
    first = Tracker(settings, 7, _sites(), ledger).__enter__()
    first.checkpointed(tmp_path / "checkpoints" / "run-7.npz")
    for k in (1, 2):
        first.log_round(_round(ledger, k))
    ledger.append("round-start", {"round": 3, "sites": ["Hovedstaden", "Sjælland"]})
    assert checkpoint_of_run(settings, first.run_id) == str(tmp_path / "checkpoints" / "run-7.npz")

    resumed_ledger = Ledger(ledger.path, ledger.key, {"role": "coordinator", "run_id": 9})
    resumed_ledger.append("run-resumed", {"flwr_run_id": 9, "after_round": 1})  # the checkpoint was at round 1
    with Tracker(settings, 9, _sites(), resumed_ledger, resume_run_id=first.run_id) as tracker:
        assert tracker.run_id == first.run_id and tracker.logged_up_to == 2
        assert client.get_run(first.run_id).info.status == "RUNNING"
        tracker.log_round(_round(resumed_ledger, 2))  # replayed: MLflow has its metrics already
        tracker.log_round(_round(resumed_ledger, 3))

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fedhosp.resumed_by"] == "9"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "federation/c_index")) == [1, 2, 3]
    names, joined = _parts(client, run.info.run_id, tmp_path)
    whole = ledger.path.read_text(encoding="utf-8")
    assert joined == whole == _text(client, run.info.run_id, LEDGER_ARTIFACT, tmp_path)  # no record twice
    # the resumed session went on from the first record MLflow lacked: round 3's start, written before the crash
    assert names[:3] == ["audit/ledger/part-000000-000003.jsonl", "audit/ledger/part-000004-000006.jsonl",
                         "audit/ledger/part-000007-000011.jsonl"]


def test_finish_saves_logs_and_registers_the_model_with_its_tags(settings, ledger, tmp_path):
    client = MlflowClient(settings.mlflow_uri)
    model = build_model("oncology", "linear", num_features=len(FEATURES))
    with Tracker(settings, 7, _sites(), ledger) as tracker:
        tracker.log_round(_round(ledger, 1, failed=True))
        summary = tracker.finish(model, list(FEATURES))
        ledger.append("run-end", {"final_model_hash": summary["model_hash"]})
        tracker.log_ledger(final=True)
        tracker.log_summary(summary)
    name = registered_name(settings)
    assert name == "fedhosp-oncology-survival" and summary["registered_model"] == f"models:/{name}/1"
    version = client.get_model_version(name, "1")
    assert version.run_id == tracker.run_id and version.source == f"{tracker.artifact_uri}/final_model"
    assert version.tags["fedhosp.sites"] == "Hovedstaden"  # Sjælland's update was not used
    assert version.tags["fedhosp.model_hash"] == model_hash(model.state_dict()) == summary["model_hash"]
    assert version.tags[LEDGER_HEAD_TAG] == ledger.head and version.tags[FLWR_RUN_TAG] == "7"
    assert json.loads(_text(client, tracker.run_id, "summary.json", tmp_path)) == json.loads(json.dumps(summary))

    # what validation loads from the registry: the same weights and spec
    folder, registry = download_model(f"models:/{name}/1", settings.mlflow_uri)
    assert registry == (name, "1")
    assert model_hash(torch.load(folder / "model.pt", weights_only=True)) == summary["model_hash"]
    assert json.loads((folder / "model.json").read_text())["mlflow_run_id"] == tracker.run_id


def _validation(settings: RunSettings, ledger: Ledger, flwr_run_id: int, write=None) -> str:
    """A finished validation of the weights ``h`` whose validation.json ``write(client, run_id)`` puts there."""
    time.sleep(0.01)  # runs are ordered by start time (milliseconds)
    with ValidationTracker(settings, flwr_run_id, "h" * 64, "models:/m/1", ledger) as tracker:
        if write:
            write(tracker.client, tracker.run_id)
        tracker.log_summary({"mode": "validate"})
    return tracker.run_id


@pytest.fixture
def validate_settings(mlflow_uri, data_root, experiment) -> RunSettings:
    return RunSettings.from_run_config({"mode": "validate", "model-uri": "models:/m/1", "data-root": str(data_root),
                                        "mlflow-uri": mlflow_uri, "mlflow-experiment": experiment})


def _previous(settings: RunSettings, ledger: Ledger) -> dict | None:
    with ValidationTracker(settings, 99, "h" * 64, "models:/m/1", ledger) as tracker:
        return tracker.previous()


def test_drift_passes_over_a_validation_without_its_result_and_says_so(validate_settings, ledger, caplog):
    older = _validation(validate_settings, ledger, 1,
                        lambda c, r: c.log_dict(r, {"verdict": "PASS", "sites": {}}, "validation.json"))
    newer = _validation(validate_settings, ledger, 2)  # finished, but no validation.json
    with caplog.at_level(logging.INFO, logger="flwr"):
        previous = _previous(validate_settings, ledger)
    assert previous == {"verdict": "PASS", "sites": {}, "mlflow_run_id": older}
    assert f"MLflow run {newer}" in caplog.text and "has no validation.json; skipped" in caplog.text


def test_drift_refuses_a_corrupt_previous_validation_naming_its_run(validate_settings, ledger):
    _validation(validate_settings, ledger, 1,
                lambda c, r: c.log_dict(r, {"verdict": "PASS", "sites": {}}, "validation.json"))
    corrupt = _validation(validate_settings, ledger, 2,
                          lambda c, r: c.log_text(r, '{"verdict": "PA', "validation.json"))  # cut off mid-write
    with pytest.raises(RuntimeError, match=f"cannot read validation.json of .*MLflow run {corrupt}"):
        _previous(validate_settings, ledger)


def test_drift_refuses_a_previous_validation_whose_artifacts_are_gone(validate_settings, ledger):
    _validation(validate_settings, ledger, 1,
                lambda c, r: c.log_dict(r, {"verdict": "PASS", "sites": {}}, "validation.json"))
    lost = _validation(validate_settings, ledger, 2,
                       lambda c, r: c.log_dict(r, {"verdict": "FAIL", "sites": {}}, "validation.json"))
    client = MlflowClient(validate_settings.mlflow_uri)
    shutil.rmtree(unquote(urlparse(client.get_run(lost).info.artifact_uri).path))  # the artifact share went away
    with pytest.raises(RuntimeError, match=f"MLflow run {lost} .*has no artifacts at all"):
        _previous(validate_settings, ledger)


def test_validation_and_analysis_runs_hold_no_data_path_and_tag_the_version(validate_settings, ledger, tmp_path,
                                                                          data_root):
    client = MlflowClient(validate_settings.mlflow_uri)
    client.create_registered_model("m")
    client.create_model_version("m", "file:///nowhere/final_model")
    report = tmp_path / "validate-flwr-3.html"
    report.write_text("<html>report</html>", encoding="utf-8")
    result = {"verdict": "PASS", "criteria": {"name": "response"}, "drift": {"flags": []},
              "sites": {"Sjælland": {"status": "ok", "verdict": "PASS", "n": 40, "seconds": 1.5,
                                     "metrics": {"auc": {"value": 0.8, "low": 0.7, "high": 0.9}},
                                     "subgroups": {"age": {"<50": {"n": 12, "metrics": {"auc": {"value": 0.75}}},
                                                           "80+": {"suppressed": True}}}}}}
    with ValidationTracker(validate_settings, 3, "h" * 64, "models:/m/1", ledger) as tracker:
        report_uri = tracker.log(result, report)
        tag_validation_verdict(tracker.client, ("m", "1"), result, report_uri, report, tracker.run_id)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fedhosp.verdict"] == "PASS"
    assert run.data.metrics["Sjælland/auc"] == 0.8 and run.data.metrics["Sjælland/age under 50/auc"] == 0.75
    assert not [k for k in run.data.metrics if "80 plus" in k]  # suppressed: no figure at all
    assert report_uri == f"{run.info.artifact_uri}/report/{report.name}"
    assert _text(client, tracker.run_id, f"report/{report.name}", tmp_path) == "<html>report</html>"
    tags = client.get_model_version("m", "1").tags
    assert tags["fedhosp.validation.verdict"] == "PASS" and tags["fedhosp.validation.run"] == tracker.run_id
    assert tags["fedhosp.validation.report"] == report_uri and tags["fedhosp.validation.drift"] == "none"
    assert tags["fedhosp.validation.sites"] == "Sjælland=PASS"

    analyse = RunSettings.from_run_config({"mode": "analyse", "data-root": str(data_root), "mlflow-experiment": "an",
                                           "mlflow-uri": validate_settings.mlflow_uri})
    with AnalysisTracker(analyse, 4, ledger) as analysis:
        pass
    for run in (client.get_run(tracker.run_id), client.get_run(analysis.run_id)):
        assert run.data.params["data-root"].startswith("sha256:") and str(data_root) not in _strings(run)
