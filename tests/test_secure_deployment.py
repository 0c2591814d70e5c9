"""Secure aggregation on Flower's distributed runtime (127.0.0.1, TLS, SuperNode authentication): hardened nodes
that insist on it, and a SuperNode that dies mid-round without costing the others their round."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from typer.testing import CliRunner

from client.data import demo
from models.ledger import read_records
from server.audit import audit_app
from server.deploy import deploy_local, run_on
from tests.conftest import APP_DIR
from tests.test_deployment import cold_train_message_seconds

pytestmark = pytest.mark.timeout(900)


def test_five_hardened_sites_aggregate_securely_when_one_supernode_dies_mid_round_and_refuse_a_plain_run(tmp_path):
    dirs = demo.write_demo(tmp_path / "data", 5)
    names = [d.name for d in dirs]
    victim = names[4]
    policy = tmp_path / "hardened.toml"
    policy.write_text("require-secure-aggregation = true\nmin-sites = 3\n")
    # Every protocol stage waits up to the round timeout; derived from this machine's speed now (one cold train
    # message): five nodes start such a process at once for each stage. It stays above the SuperLink's verdict
    # on a dead node (two missed 30 s heartbeats), which is what ends the stage the dead node never answers.
    round_timeout = max(90.0, 12 * cold_train_message_seconds(dirs[0]))
    hang = 20 * round_timeout  # only a hang is that slow
    with deploy_local(tmp_path / "dep", names, dict(zip(names, dirs)), policies=dict.fromkeys(names, policy),
                      mlflow_server=False) as d:
        result: dict = {}
        config = {"num-server-rounds": 1, "round-timeout": round_timeout, "secure-aggregation": True,
                  "local-epochs": 2}
        thread = threading.Thread(target=lambda: result.update(run=run_on(d, APP_DIR, config)))
        thread.start()
        victim_log = d.workdir / "logs" / f"supernode-{victim}.log"
        victim_ledger = d.workdir / "sites" / victim / "ledger"

        def victim_stages() -> list[str]:
            found = list(victim_ledger.glob("run-*.jsonl"))
            return [r["data"]["sent"].get("secure_aggregation", "") for r in read_records(found[0])
                    if r["event"] == "train"] if found else []

        def shared_its_keys() -> bool:
            """The SuperNode has delivered its second train reply (setup, then its key shares): from here its
            loss is a dropout the others must recover; the next message it would get is the masked-vector one,
            which the coordinator sends only once every node has shared its keys."""
            text = victim_log.read_text(encoding="utf-8", errors="replace") if victim_log.exists() else ""
            parts = text.split("Sending: train message")
            return len(parts) >= 3 and "Sent successfully" in parts[2]

        deadline = time.monotonic() + hang
        while not shared_its_keys():
            assert thread.is_alive() and time.monotonic() < deadline, "the victim never shared its keys"
            time.sleep(0.05)
        proc = next(p for n, p in d.processes.started if n == f"supernode-{victim}")
        os.killpg(os.getpgid(proc.pid), signal.SIGKILL)  # the hospital's node dies before sending its masked update
        proc.wait()
        thread.join(timeout=hang)
        outcome = result["run"]
        assert outcome.ok, outcome.log[-3000:]
        # the same hardened nodes refuse a run without secure aggregation, at the site check
        plain = run_on(d, APP_DIR, {"num-server-rounds": 1, "min-nodes": 4}, timeout=hang)
    assert not plain.ok and "require-secure-aggregation" in (plain.reason + plain.log), plain.log[-3000:]

    records = read_records(d.workdir / "coordinator" / "ledgers" / f"run-{outcome.run_id}.jsonl")
    [aggregation] = [r["data"] for r in records if r["event"] == "aggregation"]
    secure = aggregation["secure_aggregation"]
    assert secure["in_sum"] == sorted(names[:4])  # the round still aggregated the other four
    assert list(secure["left_out"]) == [victim]
    failed = [r["data"] for r in records if r["event"] == "update-failed"]
    assert [f["site"] for f in failed] == [victim]
    assert {r["data"]["site"] for r in records if r["event"] == "update"} == set(names[:4])
    assert not any("update_hash" in r["data"] for r in records if r["event"] == "update")  # never one site's update
    assert [r["event"] for r in records][-1] == "run-end"
    # the sites' own ledgers: each survivor masked its bounded update; the victim got as far as sharing its keys
    for name in names[:4]:
        site = read_records(d.workdir / "sites" / name / "ledger" / f"run-{outcome.run_id}.jsonl")
        stages = [r["data"]["sent"].get("secure_aggregation") for r in site if r["event"] == "train"]
        assert stages == ["setup", "share_keys", "collect_masked_vectors", "unmask"], stages
    assert victim_stages() == ["setup", "share_keys"]
    # an auditor's reconciliation agrees: four masked updates in the sum, the victim's none
    ledgers = [d.workdir / "sites" / n / "ledger" / f"run-{outcome.run_id}.jsonl" for n in names]
    audited = CliRunner().invoke(audit_app, ["reconcile", str(d.workdir / "coordinator" / "ledgers" /
                                                              f"run-{outcome.run_id}.jsonl"), *map(str, ledgers)],
                                 env={"COLUMNS": "200"})
    assert audited.exit_code == 0 and "4 in secure sums" in audited.output, audited.output
    print(f"secure round with one of five sites lost: protocol {secure['protocol_seconds']:.1f} s "
          f"(round timeout {round_timeout:.0f} s)")
