"""Differential privacy at the site: Opacus' DP-SGD, ε as Opacus' own accountant counts it, the site's budget."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from client.data import demo
from client.data.tabular import load_cohort
from models.ledger import read_records
from models.errors import PolicyRefusal
from client.privacy import PrivacyBudget, sample_plan
from models.builders import build_model, model_hash
from tests.conftest import APP_DIR
from tests.test_client_app import _context, _message, _train_content
from tests.node_replies import refusal, error_text

DP = {"dp": True, "dp-noise-multiplier": 1.1, "dp-max-grad-norm": 1.0, "dp-delta": 1e-5}
BATCH = 64


@pytest.fixture
def site_dir(tmp_path):
    folder = tmp_path / "site"
    demo.write_site(folder, demo.REGIONS[3])
    return folder


def _node(tmp_path, site_dir, policy: str | None = None):
    ctx = _context(site_dir, endpoint="response", dp=True)
    ctx.node_config["ledger-dir"] = str(tmp_path / "ledger")
    if policy is not None:
        (tmp_path / "policy.toml").write_text(policy)
        ctx.node_config["policy"] = str(tmp_path / "policy.toml")
    return ctx


def _dp_train(server_round=1, **config):
    cfg = {"batch-size": BATCH, "run-key": "7", "server-round": server_round, **DP, **config}
    return _message(MessageType.TRAIN, _train_content("response", **cfg))


def _opacus_epsilon(units: int, epochs: int, noise: float = DP["dp-noise-multiplier"]) -> float:
    """The reference: Opacus itself, training on ``units`` rows with a Poisson loader for ``epochs`` epochs."""
    from opacus import PrivacyEngine

    model = torch.nn.Linear(3, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(units, 3)), batch_size=BATCH)
    engine = PrivacyEngine(accountant="rdp")
    model, optimiser, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), 0.1),
                                                   data_loader=loader, noise_multiplier=noise, max_grad_norm=1.0)
    for _ in range(epochs):
        for (x,) in loader:
            optimiser.zero_grad()
            model(x).sum().backward()
            optimiser.step()
    return engine.get_epsilon(DP["dp-delta"])


def test_a_dp_round_reports_the_epsilon_opacus_own_accountant_gives_and_keeps_it_on_the_node(tmp_path, site_dir):
    from client.app import app

    ctx = _node(tmp_path, site_dir)
    units = len(load_cohort(site_dir, "Sjælland", "response").train)
    first = dict(app(_dp_train(1), ctx).content["metrics"])
    second = dict(app(_dp_train(2), ctx).content["metrics"])
    assert first["epsilon"] == pytest.approx(_opacus_epsilon(units, 1), rel=1e-9)
    assert second["epsilon"] == pytest.approx(_opacus_epsilon(units, 2), rel=1e-9)  # rounds compose
    rate, steps = sample_plan(units, BATCH, 1, 0)
    assert (first["sample_rate"], first["dp_steps"], first["noise_multiplier"]) == (rate, steps, 1.1)
    assert first["delta"] == 1e-5 and first["max_epsilon"] == 0  # no budget set
    # the node's own record: next to its ledger, keyed by the data's fingerprint, and in its signed ledger
    [budget] = (tmp_path / "ledger" / "privacy").glob("*.json")
    entries = json.loads(budget.read_text())["entries"]
    assert [(e["run"], e["round"], e["steps"]) for e in entries] == [("7", 1, steps), ("7", 2, steps)]
    records = read_records(next((tmp_path / "ledger").glob("run-*.jsonl")))
    sent = [r["data"]["sent"]["metrics"]["epsilon"] for r in records if r["event"] == "train"]
    assert sent == [first["epsilon"], second["epsilon"]]
    assert budget.stem == records[-1]["data"]["data_fingerprint"]


def test_dp_updates_differ_from_plain_training_and_from_each_other_yet_stay_a_model(tmp_path, site_dir):
    from client.app import app

    def weights(reply):
        return {k: a.numpy() for k, a in reply.content["arrays"].items()}

    plain = weights(app(_message(MessageType.TRAIN, _train_content("response", **{"batch-size": BATCH})),
                        _context(site_dir, endpoint="response")))
    again = weights(app(_message(MessageType.TRAIN, _train_content("response", **{"batch-size": BATCH})),
                        _context(site_dir, endpoint="response")))
    private = [weights(app(_dp_train(1), _node(tmp_path / str(i), site_dir))) for i in range(2)]
    assert model_hash(plain) == model_hash(again)  # plain training is seeded: replayable
    assert len({model_hash(plain), *(model_hash(p) for p in private)}) == 3  # the noise is fresh every time
    for p in private:  # same names, shapes and dtypes: it aggregates like any update
        assert {k: (v.shape, v.dtype) for k, v in p.items()} == {k: (v.shape, v.dtype) for k, v in plain.items()}
        assert all(np.isfinite(v).all() for v in p.values())
    mean = {k: (private[0][k] + private[1][k]) / 2 for k in plain}
    build_model("oncology", "linear", endpoint="response", num_features=len(demo.FEATURES)).load_state_dict(
        {k: torch.from_numpy(v) for k, v in mean.items()})


def test_the_budget_refuses_the_round_that_would_overspend_and_a_restarted_node_still_knows_it(tmp_path, site_dir):
    from client.app import app

    units = len(load_cohort(site_dir, "Sjælland", "response").train)
    one, two = _opacus_epsilon(units, 1), _opacus_epsilon(units, 2)
    ctx = _node(tmp_path, site_dir, f"max-epsilon = {(one + two) / 2}\n")  # one round fits, two do not
    check = _message(MessageType.QUERY, _train_content("response", **{
        "mode": "train", "num-server-rounds": 3, "local-epochs": 1, "local-steps": 0, "batch-size": BATCH, **DP}))
    plan = dict(app(check, ctx).content["metrics"])  # the site check, before round 1
    assert plan["dp-rounds-allowed"] == 1 and plan["epsilon-spent"] == 0
    assert plan["epsilon-planned"] == pytest.approx(_opacus_epsilon(units, 3), rel=1e-9)
    app(_dp_train(1), ctx)
    refusal(app(_dp_train(2), ctx), r"^site Sjælland: policy refuses round 2: the privacy budget would be "
                                    r"exceeded \(ε spent [\d.]+ of max-epsilon [\d.]+; this round would "
                                    r"bring it to [\d.]+\)$", rule="max-epsilon")
    records = read_records(next((tmp_path / "ledger").glob("run-*.jsonl")))
    assert records[-1]["event"] == "train-failed" and "privacy budget would be exceeded" in records[-1]["data"]["reason"]
    # a fresh process (a restarted node) reads the same budget from disk and refuses a new run's first round
    policy = f"max-epsilon = {(one + two) / 2}\n"
    script = f"""
import sys; sys.path.insert(0, {str(APP_DIR)!r})
from tests.test_privacy import _dp_train, _node
from pathlib import Path
from client.app import app
reply = app(_dp_train(1, **{{"run-key": "8"}}), _node(Path({str(tmp_path)!r}), Path({str(site_dir)!r}), {policy!r}))
if "refusal" in reply.content.config_records:
    print("REFUSED", reply.content["refusal"]["reason"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=APP_DIR, timeout=300)
    assert "REFUSED site Sjælland: policy refuses round 1: the privacy budget would be exceeded" in out.stdout, out.stderr
    [budget] = (tmp_path / "ledger" / "privacy").glob("*.json")
    assert len(json.loads(budget.read_text())["entries"]) == 1  # the refused rounds spent nothing
    refusal(app(check, ctx), "policy refuses round 1: the privacy budget")  # the site check says so before a run


def test_a_site_with_a_budget_refuses_training_without_dp_and_dp_is_refused_for_cox(tmp_path, site_dir):
    from client.app import app
    from server.settings import RunSettings

    ctx = _node(tmp_path, site_dir, "max-epsilon = 8\n")
    refusal(app(_message(MessageType.TRAIN, _train_content("response", **{"batch-size": BATCH})), ctx),
            r"policy refuses training without differential privacy \(its budget is max-epsilon = 8\); "
            r"run with dp = true", rule="max-epsilon")
    survival = _context(site_dir, dp=True)
    survival.node_config["ledger-dir"] = str(tmp_path / "cox")
    error_text(app(_message(MessageType.TRAIN, _train_content("survival", **{"batch-size": BATCH, **DP})), survival),
               "dp is refused for the survival endpoint: the Cox partial likelihood")
    assert not (tmp_path / "cox" / "privacy").exists()
    with pytest.raises(ValueError, match="dp is refused for the survival endpoint"):
        RunSettings.from_run_config({"dp": True})
    with pytest.raises(ValueError, match="FedProx's proximal term"):
        RunSettings.from_run_config({"dp": True, "endpoint": "response", "strategy": "fedprox"})
    with pytest.raises(ValueError, match="dp applies to training"):
        RunSettings.from_run_config({"dp": True, "endpoint": "response", "mode": "analyse"})


def test_a_corrupt_budget_file_refuses_dp_rather_than_reading_as_nothing_spent(tmp_path, site_dir):
    from client.app import app

    ctx = _node(tmp_path, site_dir)
    app(_dp_train(1), ctx)
    [budget] = (tmp_path / "ledger" / "privacy").glob("*.json")
    budget.write_text("{not json")
    error_text(app(_dp_train(2), ctx), rf"the privacy budget file {budget.name} cannot be read")


def test_poisson_batches_follow_the_plan_even_when_some_are_empty():
    from client.privacy import DPSettings, private_fit

    model = torch.nn.Linear(3, 1)
    x = torch.randn(50, 3)

    def loss(idx, _generator):
        out = model(x[idx])
        return out.sum() if not len(idx) else (out ** 2).mean()

    # 50 rows, batches of 2: a 4% sample rate, so about one Poisson batch in eight is empty
    losses, history = private_fit(model, 50, loss, torch.optim.SGD(model.parameters(), lr=0.1),
                                  DPSettings(1.0, 1.0, 1e-5), 2, 4, 0, torch.Generator())
    assert history == [(1.0, 1 / 25, 100)] and sample_plan(50, 2, 4, 0) == (1 / 25, 100)
    assert len(losses) == 100 and 0.0 in losses and all(np.isfinite(losses))


def test_radiology_dp_draws_one_image_per_patient_and_models_are_built_alike_on_both_sides():
    from client.train import one_image_per_patient
    from server.settings import RunSettings

    patients = np.array([0, 0, 1, 2, 2, 2, 3])
    rows = one_image_per_patient(patients, torch.Generator().manual_seed(1))
    assert sorted(patients[rows.numpy()].tolist()) == [0, 1, 2, 3]
    draws = {tuple(one_image_per_patient(patients, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(draws) > 1  # each round draws afresh
    # DenseNet's and the small CNN's BatchNorm becomes GroupNorm for Opacus, identically for the coordinator and
    # every site
    for model in ("densenet121", "small-cnn"):
        settings = RunSettings.from_run_config({"task": "radiology", "model": model, "dp": True})
        coordinator = settings.build_model()
        site = build_model("radiology", model, target="kl-grade", image_size=64, private=True)
        assert model_hash(coordinator.state_dict()) == model_hash(site.state_dict())
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in site.modules())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in build_model("radiology", model).modules())


def test_site_budget_prints_what_each_data_set_spent_and_has_left(tmp_path):
    from typer.testing import CliRunner

    from server.cli import app as cli

    store = PrivacyBudget(tmp_path / "ledger", "ab" * 32)
    store.record("1", 1, 1.1, 0.1, 30)
    store.record("2", 1, 1.1, 0.1, 30)
    (tmp_path / "policy.toml").write_text("max-epsilon = 10\ndelta = 1e-6\n")
    out = CliRunner().invoke(cli, ["site", "budget", "--ledger-dir", str(tmp_path / "ledger"),
                                   "--policy", str(tmp_path / "policy.toml")], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    spent = store.spent(1e-6)
    assert "δ = 1e-06" in out.output and "abababababab" in out.output
    assert f"{spent:.3f}" in out.output and f"{10 - spent:.3f}" in out.output
    assert PrivacyBudget(tmp_path / "ledger", "ab" * 32).spent(1e-6) == spent  # read back from disk


def test_the_run_summary_shows_each_sites_epsilon_and_budget():
    from rich.console import Console

    from server.summary import print_summary

    summary = {"flwr_run_id": 7, "mlflow_run_id": "abc", "tracking_uri": "sqlite:///x.db", "experiment": "fedhosp",
               "rounds": 2, "task": "oncology", "outcome": "response", "strategy": "fedavg",
               "registered_model": "models:/m/1", "model_file": "/m/model.pt", "model_hash": "f" * 64,
               "sites": {"Fyn": {"num_train": 400, "num_test": 130, "auc": 0.7},
                         "Sjælland": {"num_train": 300, "num_test": 100, "auc": 0.68}},
               "aggregate": {"auc": 0.69}, "failures": {},
               "privacy": {"Fyn": {"epsilon": 2.5, "delta": 1e-5, "epsilon_spent": 4.25, "max_epsilon": 8.0},
                           "Sjælland": {"epsilon": 1.25, "delta": 1e-6, "epsilon_spent": 1.25, "max_epsilon": 0.0}}}
    console = Console(record=True, width=200)
    print_summary(summary, console)
    text = console.export_text()
    assert "ε (this run)" in text and "2.50 (δ=1e-05)" in text and "4.25 / 8" in text
    assert "1.25 (δ=1e-06)" in text and "1.25 / ∞" in text  # no budget set at Sjælland


def test_two_runs_racing_for_the_last_of_the_budget_cannot_both_spend_it(tmp_path):
    from client.policy import SitePolicy

    policy = SitePolicy(max_epsilon=2.2)  # one release spends 1.96, two 2.59
    store = PrivacyBudget(tmp_path, "cd" * 32)
    # both runs checked the budget before training (each alone fits); the second to record is refused
    store.record("1", 1, 1.5, 0.1, 20, delta=1e-5,
                 check=lambda spent, total: policy.check_privacy("A", True, 1, spent, total))
    with pytest.raises(PolicyRefusal, match="policy refuses round 1: the privacy budget would be exceeded"):
        store.record("2", 1, 1.5, 0.1, 20, delta=1e-5,
                     check=lambda spent, total: policy.check_privacy("A", True, 1, spent, total))
    assert [e["run"] for e in store.entries()] == ["1"]
