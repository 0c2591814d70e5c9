"""The launcher's parts that need no deployment: the hash a hospital pins, the FAB check, its hook into Flower.

The whole path (a SuperNode under --isolation process, the launcher beside it, a modified app refused before
any of its code runs) is tests/test_deployment.py::test_a_node_pinning_apps_refuses_a_modified_app_...
"""

import hashlib
import importlib
import os
import shutil

import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.fab import Fab
from typer.testing import CliRunner

from client.launcher import CheckingPlugin, app_hash, check_task, fab_refusal, task_command
from client.policy import SitePolicy
from tests.conftest import APP_DIR


def _app_copy(into):
    into.mkdir()
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy2(APP_DIR / name, into / name)
    for folder in ("server", "client", "models", "configs"):
        shutil.copytree(APP_DIR / folder, into / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return into


def test_the_app_hash_is_the_same_for_the_same_files_whatever_their_timestamps_and_for_the_built_fab(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    copy = _app_copy(tmp_path / "app")
    before = app_hash(copy)
    for path in copy.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))  # another checkout, another day
    assert app_hash(copy) == before == app_hash(APP_DIR)
    fab = tmp_path / "app.fab"
    fab.write_bytes(build_fab_from_disk(copy))  # as `flwr build` / `flwr run` build it
    assert app_hash(fab) == before == hashlib.sha256(fab.read_bytes()).hexdigest()
    (copy / "client" / "app.py").write_text((copy / "client" / "app.py").read_text() + "\n# changed\n")
    assert app_hash(copy) != before
    from server.cli import app as cli

    printed = CliRunner().invoke(cli, ["site", "app-hash", str(fab)])
    assert printed.exit_code == 0 and printed.output.strip() == before


def test_the_fab_is_checked_by_the_hash_of_its_own_bytes():
    content = b"a FAB's bytes"
    actual = hashlib.sha256(content).hexdigest()
    pinned = SitePolicy(app_hashes=(actual,))
    assert fab_refusal("A", pinned, content, actual) == (actual, None)
    # sent under the pinned hash, but its bytes are another app's
    other, refusal = fab_refusal("A", pinned, b"another app", actual)
    assert other != actual and refusal.rule == "allowed-app-hashes"
    assert str(refusal).startswith(f"site A: policy refuses app {other}: its content does not match")
    _, refusal = fab_refusal("A", SitePolicy(app_hashes=("0" * 64,)), content, actual)
    assert str(refusal) == f"site A: policy refuses app {actual} (not in allowed-app-hashes)"
    assert fab_refusal("A", SitePolicy(), content, actual) == (actual, None)  # nothing pinned


def test_an_unreadable_policy_refuses_the_task_before_the_app_is_looked_at(tmp_path):
    bad = tmp_path / "policy.toml"
    bad.write_text('allowed-app-hashes = ["3cd0468d"]\n')  # a prefix: not a pin
    context = Context(run_id=1, node_id=7, node_config={"site-name": "Sjælland", "data-dir": str(tmp_path),
                                                        "policy": str(bad)}, state=RecordDict(), run_config={})
    content = b"any app"
    site, fab_hash, refusal = check_task(Fab(hashlib.sha256(content).hexdigest(), content, {}), context)
    assert (site, fab_hash, refusal.rule) == ("Sjælland", hashlib.sha256(content).hexdigest(), "policy-file")
    assert str(refusal).startswith("site Sjælland: policy file's allowed-app-hashes must be full")


def test_the_launcher_hooks_into_flowers_own_superexec_and_starts_tasks_with_flwr_clientapps_flags():
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec
    from flwr.supercore.superexec.plugin import AutoExecPlugin
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp

    # the one name Flower's SuperExec loop builds its plugin from, which the launcher replaces
    assert importlib.import_module("flwr.supercore.superexec.run_superexec").AutoExecPlugin is AutoExecPlugin
    assert issubclass(CheckingPlugin, AutoExecPlugin) and CheckingPlugin.supported_task_types == {TaskType.CLIENT_APP}
    spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token="ab" * 16,
                         insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                         parent_pid=42, suppress_output=False, task_id=1)
    command = task_command(spec)
    assert command[1:4] == ["-m", "client.launcher", "task"]
    args = _parse_args_run_flwr_clientapp().parse_args(command[4:])
    assert (args.runtime_api_address, args.token, args.insecure, args.parent_pid) == ("127.0.0.1:9094", "ab" * 16,
                                                                                       True, 42)
    with pytest.raises(SystemExit, match="--executor is not supported"):
        from client.launcher import run_launcher

        run_launcher(["--runtime-api-address", "x:1", "--executor", "kubernetes"])
