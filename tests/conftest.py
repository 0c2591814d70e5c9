"""Shared fixtures: each federation test gets its own FLWR_HOME, FEDHOSP_HOME and ports."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# Rich sizes its console from COLUMNS when it is created (at import): without a terminal (CI, xdist workers)
# it would wrap the CLI's tables at 80 columns, which some tests read.
os.environ.setdefault("COLUMNS", "200")

from server import runner
from server.deploy import free_port

APP_DIR = Path(__file__).resolve().parent.parent


# One ClientApp message handled in this interpreter, exactly as a SuperNode's fresh ClientApp process handles it
# (format with folder, endpoint, features, kind): the cold-start tests read its sys.modules, the deployment test
# times it.
TRAIN_MESSAGE = """
import time
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from client.app import app
from models.builders import build_model

def message(kind, content):
    meta = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=600.0, message_type=kind)
    return Message(content=content, metadata=meta)

context = Context(run_id=1, node_id=7, node_config={{"site-name": "Sjælland", "data-dir": {folder!r}}},
                  state=RecordDict(), run_config={{"task": "oncology", "endpoint": {endpoint!r}, "seed": 42}})
net = build_model("oncology", "linear", endpoint={endpoint!r}, num_features={features})
config = ConfigRecord({{"lr": 0.01, "local-epochs": 1, "local-steps": 0, "batch-size": 32, "seed": 42,
                        "server-round": 1}})
reply = app(message({kind!r}, RecordDict({{"arrays": ArrayRecord(net.state_dict()), "config": config}})), context)
assert not reply.has_error(), reply.error
"""


def processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def flower_environment(folder: Path) -> dict[str, str]:
    """Its own FEDHOSP_HOME, FLWR_HOME and SuperLink ports under ``folder``; no inherited MLflow URI."""
    env = runner.runtime_env({
        **os.environ,
        "FEDHOSP_HOME": str(folder / "fedhosp-home"),
        "FLWR_HOME": str(folder / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    })
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture
def flower_env(tmp_path: Path) -> dict[str, str]:
    return flower_environment(tmp_path)


@pytest.fixture
def superlink(flower_env: dict[str, str]):
    """A local simulation SuperLink for one test; the test fails if anything it started survives."""
    with runner.local_superlink(flower_env):
        yield flower_env
    leftovers = processes_mentioning(flower_env["FLWR_HOME"])
    assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _own_fedhosp_home(tmp_path, monkeypatch):
    """Nothing a test does lands in the user's ~/.fedhosp (demo data, caches, ledgers, keys)."""
    monkeypatch.setenv("FEDHOSP_HOME", str(tmp_path / "fedhosp-home"))


# Heaviest first (seconds, with three workers beside other work, 2026-12-06), so that the xdist workers share the
# long federations evenly and the quick unit tests fill the gaps at the end; every worker collects the same order.
WEIGHTS = {
    "test_planted_identifiers": 265, "test_five_hardened_sites": 202, "test_a_site_privacy_budget": 195,
    "test_a_supernode_killed": 182, "test_tls_node_auth": 181, "test_cross_site_matrix": 128,
    "test_radiology_simulation": 115, "test_validation_verdicts_report": 95, "test_poisoned_updates": 88,
    "test_a_killed_coordinator": 87, "test_a_node_pinning_apps": 75,
    "test_radiology_federation_with_one_site_reading_from_orthanc": 57, "test_main_job": 54,
    "test_single_site_intervals": 49, "test_secure_aggregation_equals": 49, "test_response_endpoint": 46,
    # one shared analysis federation: its first reader builds it early, the others read it at the end
    "test_an_analysis_prints": 42, "test_densenet121": 42, "test_an_unknown_column": 41, "test_bad_site_data": 41,
    "test_the_newton_strategy": 33, "test_the_budget_refuses_the_round": 29, "test_an_oncology_train": 16,
}


def pytest_collection_modifyitems(items):
    def weight(item) -> int:
        return next((w for prefix, w in WEIGHTS.items() if item.name.startswith(prefix)), 0)

    items.sort(key=weight, reverse=True)
