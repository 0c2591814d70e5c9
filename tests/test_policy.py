"""A hospital's policy, enforced by the ClientApp before any data is read, and recorded in its ledger."""

import pytest
from flwr.app import MessageType

from models.ledger import read_records
from client.policy import SitePolicy, installed_app_hash
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


def test_app_hash_allow_list_uses_the_installed_fab_hash_prefix(tmp_path):
    policy = SitePolicy(app_hashes=("3cd0468d22d7b06559ee75a7b01e7df77ab8dc0a0352868015a56a1938dfa9b9",))
    policy.check_run("A", "oncology", 3, 1, "3cd0468d")
    with pytest.raises(PolicyRefusal, match="policy refuses app deadbeef"):
        policy.check_run("A", "oncology", 3, 1, "deadbeef")
    with pytest.raises(PolicyRefusal, match="of unknown hash"):
        policy.check_run("A", "oncology", 3, 1, None)
    app_file = tmp_path / "apps" / "fedhosp.fedhosp.0.1.0.3cd0468d" / "client" / "app.py"
    assert installed_app_hash(str(app_file)) == "3cd0468d"
    assert installed_app_hash("/work/main/client/app.py") is None


def test_an_unreadable_or_unknown_policy_refuses_everything(tmp_path):
    with pytest.raises(PolicyRefusal, match="cannot be read"):
        SitePolicy.load(_policy(tmp_path, "tasks = [unterminated"), "A")
    with pytest.raises(PolicyRefusal, match="unknown keys"):
        SitePolicy.load(_policy(tmp_path, "max_rounds = 3\n"), "A")


def test_the_example_policy_in_configs_loads():
    from tests.conftest import APP_DIR

    policy = SitePolicy.load(APP_DIR / "configs" / "site-policy.example.toml", "A")
    assert policy.min_examples == 20 and "radiology" in policy.tasks
