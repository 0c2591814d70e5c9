"""Shared fixtures: each federation test gets its own FLWR_HOME, FEDHOSP_HOME and ports."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from server import runner
from server.deploy import free_port

APP_DIR = Path(__file__).resolve().parent.parent


def processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


@pytest.fixture
def flower_env(tmp_path: Path) -> dict[str, str]:
    env = runner.runtime_env({
        **os.environ,
        "FEDHOSP_HOME": str(tmp_path / "fedhosp-home"),
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    })
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


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
