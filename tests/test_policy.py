"""A hospital's policy, enforced by the ClientApp before any data is read, and recorded in its ledger."""

import pytest
from flwr.app import MessageType

from models.ledger import read_records
from client.policy import VERIFIED_APP_ENV, SitePolicy, installed_app_hash
from models.errors import PolicyRefusal
from tests.test_client_app import _context, _message, _train_content
from tests.node_replies import refusal


def _policy(tmp_path, text):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def _node(tmp_path, site_dir, policy):
    ctx = _context(site_dir)
    ctx.node_config["policy"] = str(policy)
    ctx.node_config["ledger-dir"] = str(tmp_path / "ledger")
    return ctx


@pytest.fixture
def site_dir(tmp_path):
    from client.data import demo

    folder = tmp_path / "site"
    demo.write_site(folder, demo.REGIONS[3])
    return folder


def test_a_task_the_policy_does_not_accept_is_refused_and_recorded_without_reading_data(tmp_path, site_dir):
    ctx = _node(tmp_path, site_dir, _policy(tmp_path, 'tasks = ["radiology"]\n'))
    (site_dir / "cohort.csv").rename(site_dir / "moved.csv")  # any read of the data would fail differently
    ctx.run_config["num-server-rounds"] = 3
    from client.app import app

    refusal(app(_message(MessageType.TRAIN, _train_content()), ctx),
            r"^site Sjælland: policy refuses task 'oncology' \(accepts radiology\)$", rule="tasks")
    records = read_records(next((tmp_path / "ledger").glob("run-*.jsonl")))
    assert records[-1]["event"] == "train-failed" and "policy refuses task" in records[-1]["data"]["reason"]
    assert "data_fingerprint" not in records[-1]["data"]  # no data was read


def test_too_many_rounds_and_too_few_patients_are_refused(tmp_path, site_dir):
    from client.app import app

    ctx = _node(tmp_path, site_dir, _policy(tmp_path, "max-rounds = 5\nmin-examples = 10000\n"))
    ctx.run_config["num-server-rounds"] = 10
    refusal(app(_message(MessageType.TRAIN, _train_content()), ctx), "more than 5 rounds", rule="max-rounds")
    ctx.run_config["num-server-rounds"] = 3
    refusal(app(_message(MessageType.TRAIN, _train_content()), ctx),
            r"refuses to train on \d+ patients; the minimum is 10000", rule="min-examples")


def test_default_policy_refuses_cohorts_under_twenty(tmp_path):
    with pytest.raises(PolicyRefusal, match="the minimum is 20"):
        SitePolicy().check_examples("A", 19, "images")
    SitePolicy().check_examples("A", 20, "images")


PINNED = "3cd0468d22d7b06559ee75a7b01e7df77ab8dc0a0352868015a56a1938dfa9b9"


def test_pinned_apps_are_compared_by_their_full_hash_so_a_colliding_prefix_is_refused():
    policy = SitePolicy(app_hashes=(PINNED,))
    policy.check_app("A", PINNED)
    policy.check_app("A", PINNED.upper())
    collision = PINNED[:8] + "0" * 56  # what a crafted app could match when only the install folder's prefix counted
    with pytest.raises(PolicyRefusal, match=f"^site A: policy refuses app {collision} \\(not in allowed-app-hashes\\)$") \
            as refused:
        policy.check_app("A", collision)
    assert refused.value.rule == "allowed-app-hashes"
    SitePolicy().check_app("A", collision)  # no pins: any app


def test_a_pin_that_is_not_a_full_sha256_refuses_all_work(tmp_path):
    for pin in (PINNED[:8], PINNED + "0", "z" * 64):
        with pytest.raises(PolicyRefusal, match="^site A: policy file's allowed-app-hashes must be full") as refused:
            SitePolicy.load(_policy(tmp_path, f'allowed-app-hashes = ["{pin}"]\n'), "A")
        assert refused.value.rule == "policy-file"
    assert SitePolicy.load(_policy(tmp_path, f'allowed-app-hashes = ["{PINNED.upper()}"]\n'), "A").app_hashes == (PINNED,)


def test_a_node_that_pins_apps_but_was_not_started_through_the_launcher_refuses_loudly(tmp_path, site_dir, monkeypatch):
    from client.app import app

    monkeypatch.delenv(VERIFIED_APP_ENV, raising=False)
    ctx = _node(tmp_path, site_dir, _policy(tmp_path, f'allowed-app-hashes = ["{PINNED}"]\n'))
    refusal(app(_message(MessageType.TRAIN, _train_content()), ctx),
            r"^site Sjælland: policy refuses to run an app it has not checked: it pins allowed-app-hashes, but this "
            r"ClientApp was not started by fedhosp's launcher$", rule="allowed-app-hashes")
    # the hash the launcher verified counts only for the code installed in that FAB's folder
    installed = tmp_path / "apps" / f"fedhosp.fedhosp.0.1.0.{PINNED[:8]}" / "client" / "mods.py"
    monkeypatch.setenv(VERIFIED_APP_ENV, PINNED)
    assert installed_app_hash(str(installed)) == PINNED
    assert installed_app_hash(str(tmp_path / "apps" / "fedhosp.fedhosp.0.1.0.deadbeef" / "client" / "mods.py")) is None
    assert installed_app_hash(str(site_dir / "client" / "mods.py")) is None
    monkeypatch.setenv(VERIFIED_APP_ENV, PINNED[:8])
    assert installed_app_hash(str(installed)) is None


def test_an_unreadable_or_unknown_policy_refuses_everything(tmp_path):
    with pytest.raises(PolicyRefusal, match="cannot be read"):
        SitePolicy.load(_policy(tmp_path, "tasks = [unterminated"), "A")
    with pytest.raises(PolicyRefusal, match="unknown keys"):
        SitePolicy.load(_policy(tmp_path, "max_rounds = 3\n"), "A")


def test_the_example_policy_in_configs_loads():
    from tests.conftest import APP_DIR

    policy = SitePolicy.load(APP_DIR / "configs" / "site-policy.example.toml", "A")
    assert policy.min_examples == 20 and "radiology" in policy.tasks


def test_the_example_and_hardened_policies_parse_and_the_hardened_one_fails_closed():
    from pathlib import Path

    configs = Path(__file__).resolve().parent.parent / "configs"
    example = SitePolicy.load(configs / "site-policy.example.toml", "Sjælland")
    assert not example.require_secure_aggregation and example.min_sites == 3
    hardened = SitePolicy.load(configs / "site-policy.hardened.toml", "Sjælland")
    assert hardened.require_secure_aggregation and hardened.min_sites >= 3 and len(hardened.app_hashes) == 1
    with pytest.raises(PolicyRefusal):  # the placeholder pin matches no real app until the hospital fills it in
        hardened.check_app("Sjælland", "ab" * 32)
