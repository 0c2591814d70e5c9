"""Secure aggregation (SecAgg+): the coordinator gets the sum, equal to FedAvg's within the quantisation error;
the nodes bound their own updates and their policy can insist on it."""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from client.data import demo
from client.policy import SitePolicy
from client.secure_update import SECAGG_RECORD, SecureInstruction, bounded_update, check_policy
from models.builders import build_model, model_hash
from models.errors import PolicyRefusal, SiteDataError
from models.ledger import read_records
from server import runner
from server.audit import audit_app, reconcile_secure
from server.secure_aggregation import MIN_SITES
from server.settings import RunSettings
from server.sites import FederationError
from server.strategy import build_strategy
from tests.conftest import APP_DIR


def message(kind: str, content: RecordDict, node: int = 7, group: str = "1") -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                    group_id=group, created_at=time.time(), ttl=600.0, message_type=kind)
    return Message(content=content, metadata=meta)


def stage(name: str, **configs) -> Message:
    return message("train", RecordDict({SECAGG_RECORD: ConfigRecord({"stage": name, **configs})}))


# ---------------------------------------------------------------- the node's policy and bounds

def test_a_policy_that_requires_secure_aggregation_refuses_plain_training_and_plain_runs():
    plain_train = message("train", RecordDict({"config": ConfigRecord({"server-round": 1})}))
    with pytest.raises(PolicyRefusal) as refused:
        check_policy("Sjælland", plain_train, {"secure-aggregation": True}, require=True, min_sites=3)
    assert refused.value.rule == "require-secure-aggregation" and "site Sjælland" in str(refused.value)
    site_check = message("query", RecordDict({"config": ConfigRecord({"mode": "train"})}))
    with pytest.raises(PolicyRefusal):  # the run says it is plain: refused at the site check already
        check_policy("Sjælland", site_check, {"mode": "train", "secure-aggregation": False}, require=True, min_sites=3)
    check_policy("Sjælland", site_check, {"mode": "train", "secure-aggregation": True}, require=True, min_sites=3)
    # validating a model sends no update: allowed
    check_policy("Sjælland", site_check, {"mode": "validate", "secure-aggregation": False}, require=True, min_sites=3)
    check_policy("Sjælland", stage("setup", sample_num=3), {}, require=True, min_sites=3)
    check_policy("Sjælland", plain_train, {}, require=False, min_sites=3)  # without the rule, plain is fine


def test_a_secure_round_among_fewer_sites_than_the_policy_allows_is_refused_before_any_key_is_shared():
    with pytest.raises(PolicyRefusal) as refused:
        check_policy("Sjælland", stage("setup", sample_num=2), {}, require=False, min_sites=3)
    assert refused.value.rule == "min-sites" and "among 2 sites" in str(refused.value)
    keys = {str(n): [b"pk1", b"pk2"] for n in (1, 2, 3)}
    check_policy("Sjælland", stage("share_keys", **keys), {}, require=False, min_sites=3)
    with pytest.raises(PolicyRefusal):  # the coordinator said 5, but handed this node the keys of a group of 3
        check_policy("Sjælland", stage("share_keys", **keys), {}, require=False, min_sites=4)


def test_the_site_policy_reads_the_secure_aggregation_rules(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("require-secure-aggregation = true\nmin-sites = 4\n")
    policy = SitePolicy.load(path, "Sjælland")
    assert policy.require_secure_aggregation and policy.min_sites == 4
    assert SitePolicy().min_sites == 3 and not SitePolicy().require_secure_aggregation


def test_the_node_scales_its_update_to_the_bound_and_sends_nothing_that_is_not_finite():
    global_arrays = {"w": np.zeros(4, dtype=np.float32), "steps": np.array(5)}
    ins = SecureInstruction(global_arrays, {}, ["w"], bound=1.0)
    update, record = bounded_update("Sjælland", {"w": np.array([3.0, 4.0, 0, 0]), "steps": np.array(9)}, ins)
    assert record["norm"] == pytest.approx(5.0) and record["scale"] == pytest.approx(0.2)
    assert np.linalg.norm(update[0]) == pytest.approx(1.0) and len(update) == 1  # the step counter stays home
    small, record = bounded_update("Sjælland", {"w": np.array([0.3, 0.4, 0, 0]), "steps": np.array(9)}, ins)
    assert record["scale"] == 1.0 and np.allclose(small[0], [0.3, 0.4, 0, 0])
    with pytest.raises(SiteDataError) as broken:
        bounded_update("Sjælland", {"w": np.array([np.nan, 0, 0, 0]), "steps": np.array(9)}, ins)
    assert "site Sjælland" in str(broken.value) and "nothing was sent" in str(broken.value)


# ---------------------------------------------------------------- the coordinator's refusals

@pytest.mark.parametrize("strategy", ["krum", "fedmedian", "bulyan", "fedadam", "newton"])
def test_strategies_that_need_each_update_are_refused_under_secure_aggregation(strategy):
    with pytest.raises(ValueError) as refused:
        RunSettings.from_run_config({"secure-aggregation": True, "strategy": strategy})
    assert "needs each one" in str(refused.value)


def test_the_update_bound_defaults_to_the_models_and_a_chosen_one_wins():
    """0 = the model's bound: above its round-1 update, BatchNorm statistics included (server/settings.py)."""
    bound = lambda **cfg: RunSettings.from_run_config({"secure-aggregation": True, **cfg}).secure_update_norm  # noqa: E731
    assert bound() == 10.0 and bound(model="mlp") == 10.0
    assert bound(task="radiology") == 20.0 and bound(task="radiology", model="densenet121") == 200.0
    assert bound(task="radiology", **{"secure-update-norm": 5.0}) == 5.0


def test_secure_aggregation_is_refused_outside_training_and_below_three_sites():
    with pytest.raises(ValueError):
        RunSettings.from_run_config({"secure-aggregation": True, "mode": "validate", "model-uri": "models:/m/1"})
    with pytest.raises(ValueError):
        RunSettings.from_run_config({"secure-aggregation": True, "secure-update-norm": -1.0})
    settings = RunSettings.from_run_config({"secure-aggregation": True})
    with pytest.raises(FederationError) as few:
        build_strategy(settings, MIN_SITES - 1)
    assert f"at least {MIN_SITES} sites" in str(few.value)
    build_strategy(settings, MIN_SITES)


# ---------------------------------------------------------------- a real federation

def masked_hash(site_records: list[dict]) -> str:
    return next(r["data"]["sent"]["update_hash"] for r in site_records
                if r["event"] == "train" and r["data"]["sent"].get("secure_aggregation") == "collect_masked_vectors")


def _plain_site_weights(site: Path, name: str, arrays: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """What this site's node trains from ``arrays`` with ``config``, run here through the same ClientApp (the
    weights a plain FedAvg round would have sent)."""
    from client.app import app

    context = Context(run_id=1, node_id=7, node_config={"site-name": name, "data-dir": str(site)},
                      state=RecordDict(), run_config={"task": "oncology", "endpoint": "survival", "seed": 42})
    content = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}),
                          "config": ConfigRecord(config)})
    torch.set_num_threads(1)  # as in the simulation's node processes
    reply = app(message("train", content), context)
    assert not reply.has_error(), reply.error
    return {k: a.numpy() for k, a in reply.content["arrays"].items()}


def test_secure_aggregation_equals_fedavg_within_the_quantisation_error_and_no_site_update_is_seen(superlink, tmp_path,
                                                                                                    mlflow_uri):
    root = tmp_path / "sites"
    dirs = demo.write_demo(root, 3)
    config = {"num-server-rounds": 1, "data-root": str(root), "mlflow-uri": mlflow_uri, "secure-aggregation": True}
    outcome = runner.flwr_run(APP_DIR, superlink, config, num_supernodes=3)
    assert outcome.ok, outcome.log[-3000:]
    home = Path(superlink["FEDHOSP_HOME"])
    records = read_records(home / "ledgers" / f"run-{outcome.run_id}.jsonl")
    start = next(r["data"] for r in records if r["event"] == "round-start")
    aggregation = next(r["data"] for r in records if r["event"] == "aggregation")
    updates = {r["data"]["site"]: r["data"] for r in records if r["event"] == "update"}
    names = [d.name for d in dirs]
    # the coordinator's ledger: who is in the sum, never a site's update
    assert aggregation["secure_aggregation"]["in_sum"] == sorted(names) and sorted(updates) == sorted(names)
    assert not any("update_hash" in u for u in updates.values())
    client = MlflowClient(mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("fedhosp").experiment_id])
    assert run.data.metrics["federation/sites_in_secure_sum"] == 3.0 and run.data.params["secure-aggregation"] == "True"
    assert mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/secure_aggregation/round-0001.json")["in_sum"] == \
        sorted(names)
    # the sites' ledgers: every training message was a protocol stage (no plain update ever left), and what
    # each masked was trained from the global model the coordinator sent
    for name in names:
        site = read_records(home / "site-ledgers" / name / f"run-{outcome.run_id}.jsonl")
        trains = [r["data"] for r in site if r["event"] == "train"]
        assert [t["sent"]["secure_aggregation"] for t in trains] == \
            ["setup", "share_keys", "collect_masked_vectors", "unmask"]
        masked = trains[2]["sent"]
        assert masked["received_model_hash"] == start["global_model_hash"] and masked["update_scale"] == 1.0

    # an auditor reconciles the ledgers: every masked update in the sum, trained from the global model sent
    site_ledgers = [home / "site-ledgers" / n / f"run-{outcome.run_id}.jsonl" for n in names]
    audited = CliRunner().invoke(audit_app, ["reconcile", str(home / "ledgers" / f"run-{outcome.run_id}.jsonl"),
                                             *map(str, site_ledgers)], env={"COLUMNS": "200"})
    assert audited.exit_code == 0 and "3 in secure sums" in audited.output, audited.output
    sites_records = [read_records(p) for p in site_ledgers]
    dropped = [json.loads(json.dumps(r)) for r in records]  # a coordinator that left a site out of the sum
    next(r for r in dropped if r["event"] == "aggregation")["data"]["secure_aggregation"]["in_sum"].remove(names[0])
    assert reconcile_secure(dropped, sites_records) == [
        f"round 1, {names[0]}: the site masked update {masked_hash(sites_records[0])[:12]} but the coordinator's "
        "secure sum leaves it out"]

    # FedAvg of the same sites' plain updates, computed here
    model = build_model("oncology", "linear", endpoint="survival", num_features=len(demo.FEATURES))
    initial = {k: v.numpy() for k, v in model.state_dict().items()}
    assert model_hash(initial) == start["global_model_hash"]
    train_config = {k: v for k, v in start["config"].items() if k != "secure-update-norm"}
    weights = {d.name: _plain_site_weights(d, d.name, initial, train_config) for d in dirs}
    examples = {name: updates[name]["num_examples"] for name in names}
    total = sum(examples.values())
    fedavg = {k: sum(weights[n][k].astype(np.float64) * examples[n] for n in names) / total for k in initial}
    secure = np.load(glob.glob(str(home / "checkpoints" / "*.npz"))[0], allow_pickle=True)
    error = max(float(np.abs(secure[f"arrays/{k}"] - fedavg[k]).max()) for k in initial)
    # each site's weighted values are off by less than a step (stochastic rounding); the sum is divided by the
    # weights (server/secure_aggregation.py: quantisation_step); float32 rounding of the model on top
    step = aggregation["secure_aggregation"]["quantisation_step"]
    ratios = [examples[n] / max(examples.values()) for n in names]
    bound = len(names) * step / sum(ratios) + 1e-6 * max(np.abs(v).max() for v in fedavg.values())
    print(f"secure aggregation vs FedAvg: max |difference| {error:.2e} (bound {bound:.2e}, step {step:.2e})")
    assert error <= bound
    moved = max(float(np.abs(fedavg[k] - initial[k]).max()) for k in initial)
    assert moved > 100 * bound  # the round really trained: the agreement is not that of two unchanged models
