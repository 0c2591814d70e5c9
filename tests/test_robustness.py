"""Nothing lost, nothing poisoned: bad updates rejected in a real federation, resume after a killed coordinator."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from client.data import demo
from models.ledger import read_records
from server import runner
from server.audit import audit_app
from tests.conftest import APP_DIR

pytestmark = pytest.mark.timeout(900)
POISON = {"Site-06": "nan", "Site-07": "scale", "Syddanmark": "shape", "Nordjylland": "examples"}
HONEST = ["Hovedstaden", "Midtjylland", "Sjælland"]


def _poison_app(tmp_path: Path) -> Path:
    """A copy of the app whose ClientApp is tests/poison/poison_client.py."""
    app = tmp_path / "poison-app"
    for folder in ("server", "client", "models", "configs"):
        shutil.copytree(APP_DIR / folder, app / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(APP_DIR / "tests" / "poison" / "poison_client.py", app / "poison_client.py")
    text = (APP_DIR / "pyproject.toml").read_text()
    text = text.replace('clientapp = "client.app:app"', 'clientapp = "poison_client:app"')
    text = text.replace("fab-include = [", 'fab-include = ["poison_client.py", ')
    text = text.replace("[tool.flwr.app.config]\n", '[tool.flwr.app.config]\npoison = ""\n')
    (app / "pyproject.toml").write_text(text)
    (app / "README.md").write_text("test-only app\n")
    return app


def _final_weights(uri: str, experiment: str) -> dict[str, np.ndarray]:
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]
    summary = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/summary.json")
    return {k: v.numpy() for k, v in torch.load(summary["model_file"]).items()}, run


def test_poisoned_updates_are_rejected_and_the_model_equals_a_run_without_the_bad_sites(superlink, tmp_path, mlflow_uri):
    mlflow.set_tracking_uri(mlflow_uri)
    everyone = tmp_path / "everyone"
    demo.write_demo(everyone, 7)
    honest_only = tmp_path / "honest"
    for site in HONEST:
        shutil.copytree(everyone / site, honest_only / site)
    poison = ",".join(f"{site}:{kind}" for site, kind in POISON.items())
    common = {"num-server-rounds": 3, "mlflow-uri": mlflow_uri, "min-train-nodes": 2}
    outcome = runner.flwr_run(_poison_app(tmp_path), superlink, {**common, "data-root": str(everyone), "poison": poison,
                                                                 "mlflow-experiment": "poisoned"}, num_supernodes=7)
    assert outcome.ok, outcome.log[-3000:]
    clean = runner.flwr_run(APP_DIR, superlink, {**common, "data-root": str(honest_only), "mlflow-experiment": "clean"},
                            num_supernodes=3)
    assert clean.ok, clean.log[-3000:]

    poisoned_weights, run = _final_weights(mlflow_uri, "poisoned")
    clean_weights, _ = _final_weights(mlflow_uri, "clean")
    for name, value in clean_weights.items():
        np.testing.assert_allclose(poisoned_weights[name], value, rtol=1e-5, atol=1e-6)

    expected = {"Site-06": "holds NaN or infinite values", "Site-07": "x the round's median",
                "Syddanmark": "has shape", "Nordjylland": "exceeds the declared training cohort"}
    for rnd in (1, 2, 3):
        rejected = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/rejected/round-{rnd:04d}.json")["rejected"]
        assert set(rejected) == set(POISON)
        for site, text in expected.items():
            assert text in rejected[site], (site, rejected[site])
    client = MlflowClient(mlflow_uri)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "federation/rejected_updates")] == [4.0] * 3
    assert client.get_metric_history(run.info.run_id, "Site-07/rejected")[-1].value == 1.0

    # the ledgers show it too: the coordinator rejected what the poisoned sites' own ledgers say they did not send
    home = Path(superlink["FEDHOSP_HOME"])
    ledger = home / "ledgers" / f"run-{outcome.run_id}.jsonl"
    records = read_records(ledger)
    assert {r["data"]["site"] for r in records if r["event"] == "update-rejected"} == set(POISON)
    sites = [home / "site-ledgers" / s / f"run-{outcome.run_id}.jsonl" for s in [*HONEST, *POISON]]
    result = CliRunner().invoke(audit_app, ["reconcile", str(ledger), *map(str, sites)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert all(site in result.output for site in POISON) and not any(site in result.output for site in HONEST)


def _flwr_simulation_pids(flwr_home: str, older: frozenset[int] = frozenset()) -> list[int]:
    """This test's coordinator processes but ``older`` ones: the other xdist workers may be running simulations of
    their own, and the previous run's may still be exiting."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid not in older and any("flwr-simulation" in part for part in proc.info["cmdline"] or ()) and \
                    proc.environ().get("FLWR_HOME") == flwr_home:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            pass
    return found


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass  # it had ended: its last round was checkpointed (the caller reads which)


def _kill_the_coordinator_mid_run(superlink: dict, config: dict, home: Path) -> tuple[dict, Path | None]:
    """Start a run; once a checkpoint of round >= 2 appears, freeze its coordinator, and kill it if rounds remain.
    Returns the run's outcome and the checkpoint it died with (None: it had checkpointed its last round first)."""
    from server.checkpoint import load

    before, older = set(home.glob("checkpoints/*.npz")), frozenset(_flwr_simulation_pids(superlink["FLWR_HOME"]))
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(run=runner.flwr_run(APP_DIR, superlink, config,
                                                                                 num_supernodes=3)))
    thread.start()
    pids: list[int] = []
    checkpoint, last_round = None, 0
    while thread.is_alive() and last_round < 2:
        pids = pids or _flwr_simulation_pids(superlink["FLWR_HOME"], older)  # found once, long before round 1 ends
        for path in set(home.glob("checkpoints/*.npz")) - before:
            try:
                checkpoint, last_round = path, load(path).server_round
            except (OSError, ValueError, KeyError, EOFError):
                pass  # (written to a temporary file and renamed: not expected)
        time.sleep(0.05)
    assert pids and checkpoint is not None, outcome.get("run")
    _signal(pids, signal.SIGSTOP)
    last_round = load(checkpoint).server_round  # frozen: no further round can be written
    _signal(pids, signal.SIGKILL)
    # The operator stops the dead run (else the SuperLink waits out the coordinator's missed heartbeats)
    dead_run = checkpoint.stem.removeprefix("run-")
    subprocess.run(["flwr", "stop", dead_run, runner.connection(superlink)], env=superlink, capture_output=True,
                   check=False, timeout=300)  # (it may have been marked failed already)
    thread.join(timeout=300)
    return outcome, (checkpoint if last_round < config["num-server-rounds"] else None)


def test_a_killed_coordinator_resumes_and_ends_with_the_weights_of_an_uninterrupted_run(superlink, tmp_path, mlflow_uri):
    mlflow.set_tracking_uri(mlflow_uri)
    root = tmp_path / "sites"
    demo.write_demo(root, 3)
    common = {"num-server-rounds": 4, "data-root": str(root), "mlflow-uri": mlflow_uri, "strategy": "fedadam"}
    full = runner.flwr_run(APP_DIR, superlink, {**common, "mlflow-experiment": "uninterrupted"}, num_supernodes=3)
    assert full.ok, full.log[-3000:]

    # run again and kill the coordinator (the simulation process running the ServerApp) once round 2 or 3 of 4 is
    # checkpointed: frozen first (SIGSTOP), so that the checkpoint read next is the one it dies with
    home = Path(superlink["FEDHOSP_HOME"])
    for attempt in range(1, 4):
        experiment = f"killed-{attempt}"
        outcome, checkpoint = _kill_the_coordinator_mid_run(superlink, {**common, "mlflow-experiment": experiment}, home)
        if checkpoint is not None:
            break
        # lost the race on a loaded machine (the last round checkpointed before the poll saw round 2): run again
    assert checkpoint is not None, "the coordinator finished all 4 rounds before it could be killed, 3 times"
    assert outcome["run"].status != "finished:completed", outcome["run"].status

    client = MlflowClient(mlflow_uri)
    killed_run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]
    resumed = runner.flwr_run(APP_DIR, superlink, {**common, "mlflow-experiment": experiment,
                                                   "resume-from": killed_run.info.run_id}, num_supernodes=3)
    assert resumed.ok, resumed.log[-3000:]

    final, run = _final_weights(mlflow_uri, experiment)
    reference, _ = _final_weights(mlflow_uri, "uninterrupted")
    for name, value in reference.items():
        np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-6)
    assert run.info.run_id == killed_run.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "federation/c_index")]
    assert sorted(steps) == [1, 2, 3, 4]  # each round once
    ledger = Path(run.data.tags["fedhosp.checkpoint"]).parent.parent / "ledgers"
    path = next(ledger.glob(f"run-{outcome['run'].run_id}.jsonl"))
    events = [r["event"] for r in read_records(path)]
    assert "run-resumed" in events and events[-1] == "run-end" and "round-skipped" not in events
    result = CliRunner().invoke(audit_app, ["verify", str(path), "--head", run.data.tags["fedhosp.ledger_head"]])
    assert result.exit_code == 0, result.output
    assert checkpoint.exists()
