"""Flower's distributed runtime on 127.0.0.1: TLS, SuperNode authentication, site policy, compose files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import psycopg2
import pytest
import yaml
from mlflow.tracking import MlflowClient

from client.data import demo
from models.ledger import read_records
from server import runner
from client.credentials import make_node_key
from server.credentials import make_tls
from server.deploy import (deploy_local, drop_database, free_port, launcher_command, run_on, site_env,
                           superlink_command, supernode_command)
from tests.conftest import APP_DIR, TRAIN_MESSAGE

pytestmark = pytest.mark.timeout(900)
COMPOSE = APP_DIR / "compose"


def test_tls_node_auth_federation_admits_only_registered_nodes_honours_policy_and_tracks_on_postgresql(tmp_path):
    dirs = demo.write_demo(tmp_path / "data", 3)
    names = [d.name for d in dirs]
    policy = tmp_path / "policy.toml"
    policy.write_text('tasks = ["radiology"]\n')  # this hospital does not take part in oncology
    capped = tmp_path / "capped.toml"
    capped.write_text("max-analysis-iterations = 2\n")  # this one answers two Newton iterations of an analysis
    with deploy_local(tmp_path / "dep", names, dict(zip(names, dirs)),
                      policies={"Syddanmark": policy, "Midtjylland": capped}) as d:
        assert d.backend.startswith("postgresql")
        superlink = f"127.0.0.1:{d.superlink_port}"
        # a node whose key the coordinator never registered, and one that does not trust the coordinator's CA
        stranger_key, _ = make_node_key(tmp_path / "stranger", "node_key")
        other_ca = make_tls(tmp_path / "other-ca")["ca"]
        logs = {"stranger": tmp_path / "stranger.log", "no-ca": tmp_path / "no-ca.log"}
        d.processes.start("stranger", supernode_command(d.certs / "ca.crt", superlink, stranger_key,
                                                        "site-name='Stranger'", free_port()),
                          site_env(d.env, tmp_path / "stranger"), logs["stranger"])
        d.processes.start("no-ca", supernode_command(other_ca, superlink, d.workdir / "sites" / names[0] / "keys" /
                                                     "node_key", "site-name='Impostor'", free_port()),
                          site_env(d.env, tmp_path / "no-ca"), logs["no-ca"])
        outcome = run_on(d, APP_DIR, {"num-server-rounds": 1, "local-epochs": 8})
        assert outcome.ok, outcome.log[-3000:]

        mlflow.set_tracking_uri(d.mlflow_uri)
        client = MlflowClient(d.mlflow_uri)
        run = client.search_runs([client.get_experiment_by_name("fedhosp").experiment_id])[0]
        assert run.info.status == "FINISHED" and run.data.params["num-sites"] == "2"
        failures = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/failures/round-0001.json")
        assert failures == {"Syddanmark": "site Syddanmark: policy refuses task 'oncology' (accepts radiology)"}
        assert client.get_metric_history(run.info.run_id, "Syddanmark/failed")[-1].value == 1.0
        assert "Stranger" not in run.data.tags["fedhosp.sites"] and "Impostor" not in run.data.tags["fedhosp.sites"]

        # validating the registered model on the nodes (each message in a fresh process, weights and spec from the
        # MLflow server): the refusing hospital gets NO RESULT, so the model cannot pass everywhere
        [version] = client.search_model_versions("name = 'fedhosp-oncology-survival'")
        uri = f"models:/fedhosp-oncology-survival/{version.version}"
        checked = run_on(d, APP_DIR, {"mode": "validate", "model-uri": uri, "bootstrap-samples": 100})
        assert checked.ok, checked.log[-3000:]
        tags = client.get_model_version("fedhosp-oncology-survival", version.version).tags
        assert tags["fedhosp.validation.verdict"] == "FAIL"
        assert tags["fedhosp.validation.sites"] == "Hovedstaden=PASS,Midtjylland=PASS,Syddanmark=NO RESULT"
        assert tags["fedhosp.validation.report"].startswith("mlflow-artifacts:")
        report = Path(mlflow.artifacts.download_artifacts(tags["fedhosp.validation.report"])).read_text(encoding="utf-8")
        assert "site Syddanmark: policy refuses task &#39;oncology&#39;" in report and "Hovedstaden" in report

        # an analysis whose fit needs more Newton iterations than Midtjylland answers: the fit stops there, the
        # run is FAILED (a sum without that site would be a wrong answer), and Syddanmark's refusal is no failure
        analysis = run_on(d, APP_DIR, {"mode": "analyse", "covariates": "age,stage,ecog", "subgroups": "mutation"})
        assert not analysis.ok
        reason = analysis.reason  # from the coordinator's ledger (its run-failed event)
        assert reason.startswith("site Midtjylland failed during the Cox fit (iteration 3): site Midtjylland: policy "
                                 "refuses more than 2 Newton iterations"), reason
        [failed] = client.search_runs([client.get_experiment_by_name("fedhosp").experiment_id],
                                      filter_string="tags.`fedhosp.mode` = 'analyse'")
        assert failed.info.status == "FAILED"

    # MLflow's backend store really is PostgreSQL
    conn = psycopg2.connect(d.backend.replace("+psycopg2", ""))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchone() == ("FINISHED",)
    conn.close()
    drop_database(d.backend)
    # what was refused is in both ledgers, with the reason and no data
    coordinator = read_records(d.workdir / "coordinator" / "ledgers" / f"run-{outcome.run_id}.jsonl")
    refusals = [r["data"] for r in coordinator if r["event"] == "update-failed"]
    assert {r["site"] for r in refusals} == {"Syddanmark"} and len(refusals) == 1
    site = read_records(d.workdir / "sites" / "Syddanmark" / "ledger" / f"run-{outcome.run_id}.jsonl")
    assert [r["event"] for r in site].count("train-failed") == 1
    assert all(r["data"].get("data_fingerprint") is None for r in site)  # refused before any data was read
    # the stranger and the impostor never got in
    assert "Stranger" not in outcome.log and "Impostor" not in outcome.log
    assert "SuperNode ID" not in logs["stranger"].read_text() and "SuperNode ID" not in logs["no-ca"].read_text()
    assert "Failed to activate SuperNode" in logs["stranger"].read_text()  # unknown key: refused by the SuperLink
    assert "CERTIFICATE_VERIFY_FAILED" in logs["no-ca"].read_text()  # cannot trust the coordinator
    assert not list((tmp_path / "stranger").rglob("run-*.jsonl"))


def modified_copy(app: Path, into: Path) -> Path:
    """The app, changed: its ClientApp module now writes ``modified-app-ran`` into the node's FEDHOSP_HOME when
    imported (what a coordinator could slip into an app a hospital approved)."""
    import shutil

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    into.mkdir(parents=True)
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy2(app / name, into / name)
    for folder in ("server", "client", "models", "configs"):
        shutil.copytree(app / folder, into / folder, ignore=ignore)
    with open(into / "client" / "app.py", "a", encoding="utf-8") as out:
        out.write('\nimport os as _os, pathlib as _pathlib\n'
                  '_pathlib.Path(_os.environ["FEDHOSP_HOME"], "modified-app-ran").write_text("ran")\n')
    return into


def test_a_node_pinning_apps_refuses_a_modified_app_before_any_of_its_code_runs(tmp_path):
    from typer.testing import CliRunner

    from client.launcher import app_hash
    from server.cli import app as cli

    started = time.monotonic()
    dirs = demo.write_demo(tmp_path / "data", 2)
    pinned, other = names = [d.name for d in dirs]
    printed = CliRunner().invoke(cli, ["site", "app-hash", str(APP_DIR)])
    assert printed.exit_code == 0, printed.output
    original = printed.output.strip()
    policy = tmp_path / "pinned.toml"
    policy.write_text(f'allowed-app-hashes = ["{original}"]\n')  # what the hospital reviewed
    modified = modified_copy(APP_DIR, tmp_path / "modified-app")
    changed = app_hash(modified)
    config = {"num-server-rounds": 1, "local-epochs": 1, "min-train-nodes": 1}
    # both hospitals run their ClientApps through the launcher; only the first pins apps. The two runs go at once
    # (the SuperLink runs them side by side, each node's launcher checks every message's app on its own), each
    # tracking to a SQLite file of its own (SQLite is no store for two writers)
    with deploy_local(tmp_path / "dep", names, dict(zip(names, dirs)), policies={pinned: policy},
                      mlflow_server=False, launched=names) as d:
        deployed = time.monotonic()
        with ThreadPoolExecutor(max_workers=2) as pool:
            first, second = pool.map(lambda app: run_on(d, app, {
                **config, "mlflow-uri": f"sqlite:///{tmp_path / app.name}.db"}), (APP_DIR, modified))
        ran = time.monotonic()
        assert first.ok, first.log[-3000:]
        assert second.ok, second.log[-3000:]
    print(f"pinned apps: deployed in {deployed - started:.0f}s, both runs in {ran - deployed:.0f}s, "
          f"stopped in {time.monotonic() - ran:.0f}s")
    ledgers = d.workdir / "coordinator" / "ledgers"
    one = read_records(ledgers / f"run-{first.run_id}.jsonl")
    start = next(r["data"] for r in one if r["event"] == "run-start")
    assert start["app"]["fab_hash"] == original  # what `flwr run` uploads is what `fedhosp site app-hash` printed
    # (the pinned site's ClientApp checked that it runs from the folder of the FAB the launcher verified: so the
    # launcher handed over to the FAB's own code, not to the fedhosp it imports itself)
    assert set(start["sites"]) == set(names) and not start["refused"]
    assert {r["data"]["site"] for r in one if r["event"] == "update"} == set(names)
    two = read_records(ledgers / f"run-{second.run_id}.jsonl")
    start = next(r["data"] for r in two if r["event"] == "run-start")
    assert start["app"]["fab_hash"] == changed != original
    assert start["refused"] == {pinned: f"site {pinned}: policy refuses app {changed} (not in allowed-app-hashes)"}
    assert set(start["sites"]) == {other}
    assert {r["data"]["site"] for r in two if r["event"] == "update"} == {other}
    assert [(r["data"]["site"], r["data"]["refused"]) for r in two if r["event"] == "update-failed"] == \
        [(pinned, "allowed-app-hashes")]  # the round's message too, refused as a record, named by site
    # the pinned site's own ledger: each refusal, its rule and the hash, recorded by the launcher
    site = read_records(d.workdir / "sites" / pinned / "ledger" / f"run-{second.run_id}.jsonl")[1:]
    assert [(r["event"], r["data"]["refused"], r["data"]["app"]["fab_hash"]) for r in site] == \
        [(event, "allowed-app-hashes", changed) for event in ("query-failed", "train-failed", "evaluate-failed")]
    # the modified code never ran on the pinned node, nor was it installed there; on the other node it did run
    homes = {name: d.workdir / "sites" / name for name in names}
    assert not list(homes[pinned].rglob("modified-app-ran"))
    assert not list((homes[pinned] / "flwr").rglob(f"*.{changed[:8]}")) and list(
        (homes[pinned] / "flwr").rglob(f"*.{original[:8]}"))
    assert (homes[other] / "modified-app-ran").read_text() == "ran"


def test_the_superlink_refuses_to_start_without_tls_unless_told_insecure(tmp_path):
    port = free_port()
    result = subprocess.run(["flower-superlink", "--host", "127.0.0.1", "--port", str(port)],
                            env=runner.runtime_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Certificates are required unless running in insecure mode" in result.stdout + result.stderr
    command = superlink_command(tmp_path, port, tmp_path / "state.db")
    assert "--insecure" not in command and {"--ssl-certfile", "--enable-supernode-auth"} <= set(command)


def _flags(command: list[str]) -> set[str]:
    return {part for part in command if part.startswith("--")}


def test_compose_files_parse_and_use_the_local_deployments_flags_and_versions():
    coordinator = yaml.safe_load((COMPOSE / "coordinator.yml").read_text())
    site = yaml.safe_load((COMPOSE / "site.yml").read_text())
    flwr_pin = next(d for d in tomllib.loads((APP_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
                    if d.startswith("flwr"))
    version = flwr_pin.split("==")[1]
    assert coordinator["services"]["superlink"]["image"] == f"flwr/superlink:{version}"
    assert site["services"]["supernode"]["image"] == f"flwr/supernode:{version}"
    assert f"FROM flwr/superexec:{version}" in (COMPOSE / "app.Dockerfile").read_text()
    mlflow_pin = next(d for d in tomllib.loads((APP_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
                      if d.startswith("mlflow"))
    assert f"mlflow:v{mlflow_pin.split('==')[1]}" in (COMPOSE / "mlflow.Dockerfile").read_text()

    # the same flags as make deploy-local, plus the container-only ones (process isolation, superexec secret)
    compose_only = {"--isolation", "--superexec-auth-secret-file"}
    local = _flags(superlink_command(Path("/c"), 9093, Path("/s")))
    assert _flags(coordinator["services"]["superlink"]["command"]) == local | compose_only
    # a hospital's node: as deploy-local's launched sites, the SuperNode isolated and the launcher beside it
    local_node = _flags(supernode_command(Path("/ca"), "x:9093", Path("/k"), "", 9094, Path("/secret")))
    assert _flags(site["services"]["supernode"]["command"]) == local_node
    launcher = launcher_command("127.0.0.1:9094", Path("/secret"))
    clientapp = site["services"]["clientapp"]
    assert clientapp["entrypoint"] == ["python", *launcher[1:launcher.index("--runtime-api-address")]]
    assert _flags(clientapp["command"]) == _flags(launcher)
    assert clientapp["command"][clientapp["command"].index("--runtime-api-address") + 1] == "127.0.0.1:9094"
    assert "site-policy.toml" in clientapp["secrets"]  # the launcher reads the policy the node config names
    assert "9093:9093" in coordinator["services"]["superlink"]["ports"]
    superlink_port = coordinator["services"]["superlink"]["command"]
    assert superlink_port[superlink_port.index("--port") + 1] == "9093"
    # TLS always on; no deprecated flags; nothing downloaded at run time
    for service in (coordinator["services"]["superlink"], site["services"]["supernode"]):
        assert "--insecure" not in service["command"]
        assert not {"--fleet-api-address", "--clientappio-api-address", "--allow-runtime-dependency-installation"} \
            & set(service["command"])
    node_config = site["services"]["supernode"]["command"][site["services"]["supernode"]["command"].index("--node-config") + 1]
    assert all(key in node_config for key in ("site-name=", "data-dir='/data'", "ledger-dir=", "policy="))
    assert "${DATA_DIR:?set DATA_DIR}:/data:ro" in site["services"]["clientapp"]["volumes"]
    # every secret and volume a service uses is declared
    for spec in (coordinator, site):
        for service in spec["services"].values():
            assert set(service.get("secrets", [])) <= set(spec["secrets"])
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                assert source.startswith(("/", "$", ".")) or source in spec["volumes"]


def cold_train_message_seconds(site: Path) -> float:
    """What one SuperNode training message costs here, now: a fresh interpreter that imports Flower's ClientApp
    runtime and handles one train message with our ClientApp (a SuperNode starts one such process per message)."""
    code = "import flwr.supernode.cli\n" + TRAIN_MESSAGE.format(folder=str(site), endpoint="survival",
                                                                 features=len(demo.FEATURES), kind="train")
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], cwd=APP_DIR, env=runner.runtime_env(), check=True, timeout=600,
                   capture_output=True)
    return time.monotonic() - started


def test_a_supernode_killed_during_training_fails_that_round_and_rejoins_when_it_is_back(tmp_path):
    import signal
    import threading

    dirs = demo.write_demo(tmp_path / "data", 3)
    names = [d.name for d in dirs]
    victim = names[2]
    # The round timeout is derived from this machine's speed now (one cold train message, timed first): three
    # nodes start such a process at once for every message, beside whatever else runs. It stays above the
    # SuperLink's own verdict on a dead node (two missed 30 s heartbeats, at most a minute), since a node
    # restarted before that verdict is refused.
    round_timeout = max(90.0, 12 * cold_train_message_seconds(dirs[0]))
    hang = 20 * round_timeout  # only a hang is that slow
    with deploy_local(tmp_path / "dep", names, dict(zip(names, dirs)), mlflow_server=False) as d:
        result: dict = {}
        config = {"num-server-rounds": 3, "round-timeout": round_timeout, "min-train-nodes": 2, "local-epochs": 30}
        thread = threading.Thread(target=lambda: result.update(run=run_on(d, APP_DIR, config)))
        thread.start()
        ledgers = d.workdir / "coordinator" / "ledgers"

        def events() -> list[dict]:
            found = list(ledgers.glob("run-*.jsonl"))
            return read_records(found[0]) if found else []

        def wait_for(condition, what: str) -> list[dict]:
            deadline = time.monotonic() + hang
            while not condition(records := events()):
                assert thread.is_alive() and time.monotonic() < deadline, f"{what}: not seen; ledger {records}"
                time.sleep(0.2)
            return records

        wait_for(lambda rs: any(r["event"] == "round-start" for r in rs), "round 1 sent out")
        name, proc = next((n, p) for n, p in d.processes.started if n == f"supernode-{victim}")
        os.killpg(os.getpgid(proc.pid), signal.SIGKILL)  # the hospital's node dies mid-round
        proc.wait()
        seen = wait_for(lambda rs: any(r["event"] == "update-failed" and r["data"]["site"] == victim for r in rs),
                        "the dead node's failure")
        failed_in = next(r["data"]["round"] for r in seen if r["event"] == "update-failed")
        # it comes back, as under a supervisor (compose's restart: unless-stopped): a SuperNode whose old session
        # the SuperLink still holds online is refused and exits, so it is started again until it is let in
        home = d.workdir / "sites" / victim
        log = d.workdir / "logs" / f"{name}-restarted.log"
        while thread.is_alive():
            node = d.processes.start(name, proc.args, site_env(d.env, home), log)
            while thread.is_alive() and node.poll() is None:
                time.sleep(0.5)
            if thread.is_alive():
                time.sleep(1.0)
        thread.join(timeout=hang)
        outcome = result["run"]
        assert outcome.ok, outcome.log[-3000:]
        records = events()
    drop_database(d.backend)
    failed = [(r["data"]["round"], r["data"]["site"]) for r in records if r["event"] == "update-failed"]
    assert failed and {site for _, site in failed} == {victim}  # the round it died in (and any while it was away)
    updates = {(r["data"]["round"], r["data"]["site"]) for r in records if r["event"] == "update"}
    assert all((rnd, site) in updates for rnd in range(1, 4) for site in names[:2])  # the others never stopped
    # back, and taking part again in a later round
    assert any((rnd, victim) in updates for rnd in range(failed_in + 1, 4)), (failed_in, sorted(updates))
    assert not any(site.startswith("node-") for _, site in failed)  # failures are named by site
    assert [r["event"] for r in records][-1] == "run-end"


def test_a_site_privacy_budget_stops_its_dp_training_mid_run_and_still_holds_after_its_supernode_restarts(tmp_path):
    from typer.testing import CliRunner

    from client.data.tabular import load_cohort
    from client.privacy import epsilon, sample_plan
    from server.cli import app as cli

    dirs = demo.write_demo(tmp_path / "data", 2)
    names = [d.name for d in dirs]
    capped = names[1]
    config = {"endpoint": "response", "dp": True, "dp-noise-multiplier": 1.1, "num-server-rounds": 2,
              "local-epochs": 1, "batch-size": 64, "min-train-nodes": 1}
    rate, steps = sample_plan(len(load_cohort(dirs[1], capped, "response").train), 64, 1, 0)
    one, two = (epsilon([(1.1, rate, steps * r)], 1e-5) for r in (1, 2))
    policy = tmp_path / "budget.toml"
    policy.write_text(f"max-epsilon = {(one + two) / 2}\n")  # one round of this run fits, two do not
    with deploy_local(tmp_path / "dep", names, dict(zip(names, dirs)), policies={capped: policy},
                      mlflow_server=False) as d:
        first = run_on(d, APP_DIR, config)
        assert first.ok, first.log[-3000:]
        assert f"site {capped}: its privacy budget carries 1 of the 2 rounds" in first.log  # told before round 1
        # the node goes down and comes back (hospital IT restarts it): its budget is on its disk, not in memory
        name, proc = next((n, p) for n, p in d.processes.started if n == f"supernode-{capped}")
        runner.stop_process_tree(proc, grace=10.0)
        home = d.workdir / "sites" / capped
        log = d.workdir / "logs" / f"{name}-restarted.log"
        node = d.processes.start(name, proc.args, site_env(d.env, home), log)
        while "SuperNode ID" not in (log.read_text() if log.exists() else ""):
            if node.poll() is not None:  # refused while the SuperLink still held its old session: start it again
                node = d.processes.start(name, proc.args, site_env(d.env, home), log)
            time.sleep(0.5)
        second = run_on(d, APP_DIR, {**config, "num-server-rounds": 1})
        assert second.ok, second.log[-3000:]
        client = MlflowClient(d.mlflow_uri)
        runs = client.search_runs([client.get_experiment_by_name("fedhosp").experiment_id],
                                  order_by=["attributes.start_time ASC"])
        tags = client.get_model_version("fedhosp-oncology-response", "1").tags
    drop_database(d.backend)
    ledgers = d.workdir / "coordinator" / "ledgers"
    coordinator = read_records(ledgers / f"run-{first.run_id}.jsonl")
    refused = [r["data"] for r in coordinator if r["event"] == "update-failed"]
    assert [(r["round"], r["site"]) for r in refused] == [(2, capped)]
    assert "policy refuses round 2: the privacy budget would be exceeded" in refused[0]["reason"]
    updates = {(r["data"]["round"], r["data"]["site"]): r["data"]["metrics"]["epsilon"]
               for r in coordinator if r["event"] == "update"}
    assert set(updates) == {(1, names[0]), (2, names[0]), (1, capped)}
    assert updates[(1, names[0])] < updates[(2, names[0])]  # ε grows with every round, in the coordinator's ledger
    assert [r["event"] for r in coordinator].count("aggregation") == 2  # noisy updates aggregate
    # MLflow: ε per site per round, and the model's privacy on its registered version
    history = {site: [m.value for m in client.get_metric_history(runs[0].info.run_id, f"{site}/epsilon")]
               for site in names}
    assert history[capped] == [updates[(1, capped)]] and len(history[names[0]]) == 2
    assert json.loads(tags["fedhosp.privacy"])[capped]["epsilon"] == pytest.approx(one, rel=1e-9)
    # the site's own ledger records what it sent, with ε, and the refusal
    site = read_records(d.workdir / "sites" / capped / "ledger" / f"run-{first.run_id}.jsonl")
    assert [r["data"]["sent"]["metrics"]["epsilon"] for r in site if r["event"] == "train"] == [updates[(1, capped)]]
    assert any(r["event"] == "train-failed" and "privacy budget" in r["data"]["reason"] for r in site)
    # after the restart, the new run's site check already hears the refusal: the budget held
    start = next(r["data"] for r in read_records(ledgers / f"run-{second.run_id}.jsonl") if r["event"] == "run-start")
    assert f"site {capped}: policy refuses round 1: the privacy budget would be exceeded" in start["refused"][capped]
    budget = CliRunner().invoke(cli, ["site", "budget", "--ledger-dir", str(d.workdir / "sites" / capped / "ledger"),
                                      "--policy", str(policy)], env={"COLUMNS": "200"})
    assert budget.exit_code == 0 and f"{one:.3f}" in budget.output and f"{(one + two) / 2 - one:.3f}" in budget.output
    shown = CliRunner().invoke(cli, ["audit", "show", str(ledgers / f"run-{first.run_id}.jsonl")],
                               env={"COLUMNS": "250"})
    assert shown.exit_code == 0 and "ε" in shown.output and f"{updates[(1, capped)]:.3f}" in shown.output
