"""``fedhosp``'s commands that need no federation: the hospital's node key, and how a failed run is told."""

from __future__ import annotations

import stat
import subprocess
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from server.cli import _report, app
from server.runner import RunOutcome
from tests.conftest import APP_DIR


def test_a_hospital_makes_its_node_key_with_fedhosp_site_node_key(tmp_path):
    folder = tmp_path / "keys"
    done = CliRunner().invoke(app, ["site", "node-key", str(folder)], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    private, public = folder / "node_key", folder / "node_key.pub"
    assert f"private key (keep on the node): {private}" in done.output
    assert f"public key (send to the coordinator): {public}" in done.output
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    pub = serialization.load_ssh_public_key(public.read_bytes())  # what `flwr supernode register` reads
    assert isinstance(key.curve, ec.SECP384R1) and isinstance(pub.curve, ec.SECP384R1)
    assert key.public_key().public_numbers() == pub.public_numbers()
    # a hospital command only: no longer at the top, beside the coordinator's
    assert CliRunner().invoke(app, ["node-key", str(tmp_path / "other")]).exit_code == 2
    assert not (tmp_path / "other").exists()


def test_the_site_commands_and_the_node_key_need_nothing_of_the_coordinators_package(tmp_path):
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom client.site_check import site_app\n"
            f"assert CliRunner().invoke(site_app, ['node-key', {str(tmp_path)!r}]).exit_code == 0\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'server'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=APP_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]" and (tmp_path / "node_key.pub").exists()


LOG = "\n".join([
    "INFO :      Starting Flower ServerApp",
    "ERROR :     ServerApp thread raised an exception: site check failed:",
    "  - site Syddanmark: cohort.csv has no column 'event'",
    "Traceback (most recent call last):",
    '  File "server/app.py", line 97, in main',
])


def test_a_failed_run_is_told_by_its_ledgers_reason_or_else_by_the_log_lines_that_matter(tmp_path, capsys):
    env = {"FEDHOSP_HOME": str(tmp_path / "home")}
    reason = "site check failed:\n  - site Syddanmark: cohort.csv has no column [event]"  # no Rich markup
    assert _report(RunOutcome(5, "finished:failed", LOG, reason), env, "sqlite:///x.db", verbose=False) == 1
    out = capsys.readouterr().out
    assert "Run 5 did not complete: status finished:failed" in out and reason in out
    assert "  | " not in out and "Traceback" not in out  # the ledger said why: no log lines
    assert f"The run's whole log: {tmp_path / 'home' / 'logs' / 'run-5.log'}" in out.replace("\n", "")
    assert (tmp_path / "home" / "logs" / "run-5.log").read_text() == LOG

    # no ledger event (the app failed before it could record one): the log's relevant lines, for reading only
    assert _report(RunOutcome(6, "finished:failed", LOG), env, "sqlite:///x.db", verbose=False) == 1
    out = capsys.readouterr().out
    assert "  | ERROR :     ServerApp thread raised an exception: site check failed:" in out
    assert "  |   - site Syddanmark: cohort.csv has no column 'event'" in out and "Traceback" not in out
    # --verbose showed the whole log already
    assert _report(RunOutcome(7, "finished:failed", LOG), env, "sqlite:///x.db", verbose=True) == 1
    assert "  | " not in capsys.readouterr().out
    # a run that never started: flwr run's own last words
    said = "Loading project configuration...\n❌ The provided configuration string is in an invalid format."
    _report(RunOutcome(0, "not-started (flwr run exited 1)", said), env, "sqlite:///x.db", verbose=False)
    assert "  | ❌ The provided configuration string is in an invalid format." in capsys.readouterr().out
