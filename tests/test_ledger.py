"""Ledgers: every kind of tampering is detected and named; reconcile finds what only one side recorded."""

from __future__ import annotations

import base64
import json

import pytest
from typer.testing import CliRunner

from models.ledger import GENESIS, Ledger, load_or_create_key, public_key_text, read_records, record_hash
from server.audit import audit_app

runner = CliRunner()


def _write_lines(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture
def ledger_path(tmp_path):
    key = load_or_create_key(tmp_path / "keys" / "coordinator_ed25519.pem")
    ledger = Ledger(tmp_path / "run-1.jsonl", key, {"role": "coordinator", "run_id": 1})
    ledger.append("run-start", {"run_config": {"lr": 0.01}, "initial_model_hash": "a" * 64})
    for rnd in (1, 2):
        ledger.append("round-start", {"round": rnd, "sites": ["A", "B"], "global_model_hash": "b" * 64})
        for site, n in (("A", 120), ("B", 80)):
            ledger.append("update", {"round": rnd, "site": site, "update_hash": f"{rnd}{site}".ljust(64, "0"),
                                     "num_examples": n, "metrics": {"train_loss": 0.693147}})
        ledger.append("aggregation", {"round": rnd, "global_model_hash": "c" * 64, "metrics": {"train_loss": 0.69}})
    return tmp_path / "run-1.jsonl"


def _verify(path, *args):
    return runner.invoke(audit_app, ["verify", str(path), *args], env={"COLUMNS": "200"})


def test_an_intact_ledger_verifies_with_its_head_and_pinned_key(ledger_path):
    head = read_records(ledger_path)[-1]["hash"]
    pub = ledger_path.parent / "keys" / "coordinator_ed25519.pub"
    result = _verify(ledger_path, "--head", head, "--public-key", str(pub))
    assert result.exit_code == 0, result.output
    assert "INTACT" in result.output and "10 records" in result.output


def test_one_changed_byte_in_a_metric_is_named_as_an_edit(ledger_path):
    text = ledger_path.read_text()
    ledger_path.write_text(text.replace("0.693147", "0.693148", 1))
    result = _verify(ledger_path)
    assert result.exit_code == 1
    assert "record 3 (seq 3, update) was edited" in result.output


def test_a_deleted_record_is_named(ledger_path):
    records = read_records(ledger_path)
    _write_lines(ledger_path, records[:5] + records[6:])
    result = _verify(ledger_path)
    assert result.exit_code == 1 and "record 5 (seq 6, round-start) removed: 1 record(s) missing" in result.output


def test_two_swapped_records_are_named(ledger_path):
    records = read_records(ledger_path)
    records[3], records[4] = records[4], records[3]
    _write_lines(ledger_path, records)
    result = _verify(ledger_path)
    assert result.exit_code == 1 and "record 3 (seq 4, update) reordered" in result.output


def test_a_forged_record_with_a_fresh_hash_and_chain_fails_on_its_signature(ledger_path):
    records = read_records(ledger_path)
    records[3]["data"]["num_examples"] = 10_000_000  # claim more patients, then repair the whole chain
    prev = records[2]["hash"]
    for record in records[3:]:
        record["prev"] = prev
        record["hash"] = record_hash(record)
        prev = record["hash"]
    _write_lines(ledger_path, records)
    result = _verify(ledger_path)
    assert result.exit_code == 1 and "record 3 (seq 3, update) has a bad signature" in result.output


def test_a_ledger_re_signed_by_another_key_fails_against_the_published_key(ledger_path, tmp_path):
    pub = (ledger_path.parent / "keys" / "coordinator_ed25519.pub").read_text()
    other = load_or_create_key(tmp_path / "other" / "key.pem")
    records = read_records(ledger_path)
    fake = Ledger(tmp_path / "fake.jsonl", other, {"role": "coordinator", "run_id": 1})
    for record in records[1:]:
        fake.append(record["event"], record["data"])
    assert _verify(tmp_path / "fake.jsonl").exit_code == 0  # self-consistent ...
    result = _verify(tmp_path / "fake.jsonl", "--public-key", pub)  # ... but not the coordinator's
    assert result.exit_code == 1 and "record 0 (seq 0, ledger-open) has a bad signature" in result.output


def test_a_cut_off_tail_is_only_seen_with_the_head(ledger_path):
    records = read_records(ledger_path)
    head = records[-1]["hash"]
    _write_lines(ledger_path, records[:-2])
    assert _verify(ledger_path).exit_code == 0  # a chain alone cannot see it
    result = _verify(ledger_path, "--head", head)
    assert result.exit_code == 1 and "cut off the end" in result.output


def test_records_are_chained_from_genesis_and_survive_reopening(ledger_path, tmp_path):
    records = read_records(ledger_path)
    assert records[0]["prev"] == GENESIS and records[0]["event"] == "ledger-open"
    assert all(b["prev"] == a["hash"] for a, b in zip(records, records[1:]))
    key = load_or_create_key(ledger_path.parent / "keys" / "coordinator_ed25519.pem")
    Ledger(ledger_path, key).append("run-end", {"final_model_hash": "d" * 64})
    assert _verify(ledger_path).exit_code == 0
    assert oct((ledger_path.parent / "keys" / "coordinator_ed25519.pem").stat().st_mode & 0o777) == "0o600"
    assert base64.b64decode(read_records(ledger_path)[-1]["sig"])


def _site_ledger(tmp_path, site, rounds):
    key = load_or_create_key(tmp_path / site / "site_ed25519.pem")
    ledger = Ledger(tmp_path / site / "run-1.jsonl", key, {"role": "site", "site": site, "run_id": 1})
    for rnd in rounds:
        n = 120 if site == "A" else 80
        ledger.append("train", {"run_id": 1, "site": site, "round": rnd, "received": {"model_hash": "b" * 64},
                                "sent": {"update_hash": f"{rnd}{site}".ljust(64, "0"), "num_examples": n}})
    return ledger.path


def test_reconcile_agrees_when_both_sides_recorded_the_same_updates(ledger_path, tmp_path):
    sites = [_site_ledger(tmp_path, s, (1, 2)) for s in ("A", "B")]
    result = runner.invoke(audit_app, ["reconcile", str(ledger_path), *map(str, sites)])
    assert result.exit_code == 0, result.output
    assert "RECONCILED" in result.output and "4 updates" in result.output


def test_reconcile_catches_an_update_the_coordinator_recorded_that_the_site_never_sent(ledger_path, tmp_path):
    sites = [_site_ledger(tmp_path, "A", (1, 2)), _site_ledger(tmp_path, "B", (1,))]
    result = runner.invoke(audit_app, ["reconcile", str(ledger_path), *map(str, sites)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "round 2, B: the coordinator recorded update 2B0000000000 that the site never sent" in result.output


def test_show_and_export_render_every_record(ledger_path, tmp_path):
    shown = runner.invoke(audit_app, ["show", str(ledger_path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "aggregation" in shown.output and "1A0000000000" in shown.output
    csv_out = runner.invoke(audit_app, ["export", str(ledger_path), "--format", "csv"])
    assert csv_out.exit_code == 0 and len(csv_out.output.strip().splitlines()) == 11
    html = tmp_path / "ledger.html"
    result = runner.invoke(audit_app, ["export", str(ledger_path), "--format", "html", "--out", str(html)])
    assert result.exit_code == 0 and html.read_text().count("<tr") == 11


def test_processes_creating_the_signing_key_at_once_all_sign_with_the_one_that_was_kept(tmp_path):
    import subprocess
    import sys

    from tests.conftest import APP_DIR

    path = tmp_path / "keys" / "site_ed25519.pem"
    code = ("import sys; from models.ledger import load_or_create_key, public_key_text; "
            "print(public_key_text(load_or_create_key(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=APP_DIR, stdout=subprocess.PIPE,
                              text=True) for _ in range(6)]
    keys = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert keys == {public_key_text(load_or_create_key(path))}
    assert sorted(p.name for p in path.parent.iterdir()) == ["site_ed25519.pem", "site_ed25519.pub"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
