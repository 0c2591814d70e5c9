"""The runner's and the local deployment's machinery, with real processes, files and PostgreSQL, no federation:
stopping a process tree, the readiness poller, timeouts, the failure reason from the ledger, the TOML writers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.cli.flower_config import parse_superlink_connection
from flwr.common.config import parse_config_args

from models.ledger import Ledger
from server import runner
from server.deploy import Processes, drop_database, free_port, mlflow_backend, write_connection

PY = sys.executable

# A leader (in a session of its own, as Processes and the runner start everything) with: a child that ignores
# SIGTERM, a child in a session of its own with a grandchild (as the SuperLink's flower-superexec), and an orphan
# whose parent has exited (no longer below the leader, still in its session). It prints every pid as JSON.
TREE = textwrap.dedent("""
    import json, subprocess, sys, time
    SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"], stdout=subprocess.PIPE)
    stubborn.stdout.readline()
    own = subprocess.Popen([sys.executable, "-c", f"import subprocess; print(subprocess.Popen({SLEEP!r}).pid, "
                            "flush=True); import time; time.sleep(600)"], stdout=subprocess.PIPE, start_new_session=True)
    grandchild = int(own.stdout.readline())
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess; print(subprocess.Popen("
                               f"{SLEEP!r}, stdout=subprocess.DEVNULL).pid)"], stdout=subprocess.PIPE)
    orphan = int(parent.communicate()[0])
    print(json.dumps({"stubborn": stubborn.pid, "own": own.pid, "grandchild": grandchild, "orphan": orphan}),
          flush=True)
    time.sleep(600)
""")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, waiting for whoever reaps it
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def tree():
    """The TREE processes (leader, pids); whatever a failed test left of them is killed afterwards."""
    proc = subprocess.Popen([PY, "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids = json.loads(proc.stdout.readline())
    proc.stdout.close()
    assert not any(_gone(pid) for pid in pids.values())
    yield proc, pids
    for pid in [proc.pid, *pids.values()]:
        with contextlib.suppress(psutil.Error):
            if not _gone(pid) and psutil.Process(pid).cmdline()[:1] == [PY]:
                psutil.Process(pid).kill()
    proc.poll()


def test_the_stopper_stops_a_whole_tree_of_processes_also_in_other_sessions_and_orphans_and_nothing_else(tree):
    bystander = subprocess.Popen([PY, "-c", "import time; time.sleep(600)"], start_new_session=True)
    proc, pids = tree
    assert psutil.Process(pids["orphan"]).ppid() != proc.pid  # not below the leader any more
    started = time.monotonic()
    runner.stop_process_tree(proc, grace=1.0)
    took = time.monotonic() - started
    assert proc.returncode == -15  # its Popen reaped it, so its exit code is known
    assert {name: pid for name, pid in pids.items() if not _gone(pid)} == {}
    assert 1.0 <= took < 6.0, took  # the stubborn child held out for the grace period, then was killed
    try:
        assert bystander.poll() is None  # a process of its own, outside the tree: untouched
    finally:
        runner.stop_process_tree(bystander, grace=1.0)
    assert bystander.returncode == -15


def test_after_the_leader_exited_and_was_reaped_what_it_left_in_its_session_is_still_stopped(tree):
    proc, pids = tree
    os.kill(proc.pid, 9)
    proc.wait()  # reaped: its pid could now be reused, so only its session (which holds the number) is searched
    assert not _gone(pids["orphan"]) and not _gone(pids["stubborn"])
    runner.stop_process_tree(proc, grace=1.0)
    assert not _gone(pids["own"])  # in a session of its own and no longer below anything of ours: out of reach
    survivors = {name: pid for name, pid in pids.items() if name not in ("own", "grandchild") and not _gone(pid)}
    assert survivors == {}  # (the fixture kills "own" and its child)


def test_the_poller_fails_at_once_with_the_log_tail_when_the_process_dies(tmp_path):
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PY, "-c", "import sys, time; print('starting'); print('bind: address in use', "
                                 "flush=True); time.sleep(0.3); sys.exit(3)"], stdout=out, stderr=subprocess.STDOUT)
    started = time.monotonic()
    with pytest.raises(runner.NotReady) as failed:
        runner.wait_until(lambda: False, "the test server", 120, proc, log)
    assert time.monotonic() - started < 10  # not the 120 s timeout
    message = str(failed.value)
    assert message.startswith("the test server exited with code 3 before it was ready; the end of ")
    assert "  | starting\n  | bind: address in use" in message


def test_the_poller_gives_up_at_its_timeout_and_returns_as_soon_as_the_check_passes(tmp_path):
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        started = time.monotonic()
        with pytest.raises(runner.NotReady, match=r"the sleeper was not ready within 0.5 s; there is no log at "):
            runner.wait_until(lambda: False, "the sleeper", 0.5, sleeper, tmp_path / "none.log")
        assert 0.5 <= time.monotonic() - started < 5
        flag = tmp_path / "ready"
        subprocess.Popen([PY, "-c", f"import time, pathlib; time.sleep(0.3); pathlib.Path({str(flag)!r}).touch()"])
        started = time.monotonic()
        runner.wait_until(flag.exists, "the flag", 60, sleeper)
        assert time.monotonic() - started < 5
    finally:
        runner.stop_process_tree(sleeper, grace=1.0)


def _fake_flwr_run(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "fake_flwr_run.py"
    script.write_text(textwrap.dedent(body))
    return [PY, str(script)]


def test_a_run_whose_log_stream_does_not_end_is_stopped_at_the_callers_timeout(tmp_path):
    pid_file = tmp_path / "child.pid"
    command = _fake_flwr_run(tmp_path, f"""
        import subprocess, sys, time, pathlib
        print("Loading project configuration...", flush=True)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pathlib.Path({str(pid_file)!r}).write_text(str(child.pid))
        print("Successfully started run 7", flush=True)
        time.sleep(600)  # a stream that never ends
    """)
    seen: list[str] = []
    started = time.monotonic()
    with pytest.raises(runner.RunTimeout) as timed_out:
        runner.submit(command, runner.runtime_env(), "unused", tmp_path, echo=seen.append, timeout=4)
    assert 4 <= time.monotonic() - started < 15
    assert "still streaming the log of run 7 after 4 s (the caller's timeout); it was stopped" in str(timed_out.value)
    assert seen == ["Loading project configuration...", "Successfully started run 7"]
    assert _gone(int(pid_file.read_text()))  # what it started went with it


def test_a_run_command_that_closes_its_output_but_does_not_exit_is_stopped_too(tmp_path):
    command = _fake_flwr_run(tmp_path, """
        import os, time
        print("Successfully started run 8", flush=True)
        os.close(1); os.close(2)
        time.sleep(600)
    """)
    with pytest.raises(runner.RunTimeout, match=r"had not exited 3 s after it started .* though its output had ended"):
        runner.submit(command, runner.runtime_env(), "unused", tmp_path, timeout=3)


def _ledger(home: Path, name: str, *events: tuple[str, dict]) -> Path:
    path = home / "ledgers" / f"run-{name}.jsonl"
    ledger = Ledger(path, Ed25519PrivateKey.generate(), {"role": "coordinator", "run_id": name})
    for event, data in events:
        ledger.append(event, data)
    return path


def test_the_failure_reason_is_the_run_failed_event_of_the_coordinators_ledger(tmp_path):
    home = tmp_path / "home"
    reason = "analysis check failed:\n  - site A: cohort.csv has no column 'kras'"  # as failure_recorded writes it
    _ledger(home, "41", ("run-start", {"sites": ["A"]}), ("run-failed", {"flwr_run_id": 41, "reason": reason}))
    assert runner.ledger_failure(home, 41) == "analysis check failed:\n  - site A: cohort.csv has no column 'kras'"
    _ledger(home, "43", ("run-failed", {"flwr_run_id": 43, "reason": "ValueError: lr must be positive"}))
    assert runner.ledger_failure(home, 43) == "ValueError: lr must be positive"
    # a resumed run (42) appends to the ledger of the run it continues (40)
    since = time.time() - 1
    _ledger(home, "40", ("run-failed", {"flwr_run_id": 40, "reason": "first"}),
            ("run-resumed", {"flwr_run_id": 42}), ("run-failed", {"flwr_run_id": 42, "reason": "second"}))
    assert runner.ledger_failure(home, 42, since) == "second"
    assert runner.ledger_failure(home, 42) == ""  # only its own ledger without `since`
    assert runner.ledger_failure(home, 44, since) == ""  # no event: the app failed before it could say
    assert runner.ledger_failure(tmp_path / "nowhere", 41, since) == ""


def test_config_values_reach_flowers_parser_unchanged_and_impossible_ones_are_refused():
    assert runner.config_arg({"a": 1, "b": 0.5, "c": "it's", "d": True}) == 'a=1 b=0.5 c="it\'s" d=true'
    values = {"site-name": "Sjælland", "data-dir": "/data/my site/it's", "quote": 'say "hi"', "win": "C:\\data\\x",
              "lines": "one\ntwo", "tab": "a\tb", "empty": "", "neg": -3, "big": 1e300, "off": False,
              "tiny": 2.5e-7}
    assert parse_config_args([runner.config_arg(values)]) == values
    with pytest.raises(ValueError, match="both quote marks"):
        runner.config_arg({"x": "it's \"both\""})
    with pytest.raises(ValueError, match="a config key"):
        runner.config_arg({"a b": 1})
    with pytest.raises(TypeError):
        runner.config_arg({"x": [1, 2]})


def test_the_connection_files_are_toml_that_flower_reads(tmp_path):
    env = {"FLWR_HOME": str(tmp_path / "flwr"), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "41234"}
    name = runner.connection(env)
    path = tmp_path / "flwr" / "config.toml"
    config = tomllib.loads(path.read_text())
    assert config["superlink"]["default"] == "local" and config["superlink"]["local"] == {"address": ":local:"}
    parsed = parse_superlink_connection(config["superlink"][name], name)
    assert parsed.address == "127.0.0.1:41234" and parsed.insecure is True
    before = path.read_text()
    assert runner.connection(env) == name and path.read_text() == before  # once only
    other = {**env, "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "41235"}
    runner.connection(other)
    assert set(tomllib.loads(path.read_text())["superlink"]) == {"default", "local", name, "fedhosp-41235"}

    ca = tmp_path / "certs with space" / "ca.crt"
    write_connection(tmp_path / "deploy", "deploy-9093", 9093, ca)
    config = tomllib.loads((tmp_path / "deploy" / "config.toml").read_text())
    assert config["superlink"]["default"] == "deploy-9093"
    parsed = parse_superlink_connection(config["superlink"]["deploy-9093"], "deploy-9093")
    assert parsed.address == "127.0.0.1:9093" and parsed.root_certificates == str(ca)


def test_mlflow_falls_back_to_sqlite_only_where_no_postgresql_listens(tmp_path, caplog):
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="server.deploy"):
        assert mlflow_backend(tmp_path, "fedhosp_unused", server=closed) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert "no PostgreSQL listens at postgres@127.0.0.1:" in caplog.text and "SQLite" in caplog.text
    # a PostgreSQL that answers and refuses is an error to see, not a reason to track elsewhere
    import psycopg2

    with pytest.raises(psycopg2.OperationalError, match="fedhosp_no_such_role"):
        mlflow_backend(tmp_path, "fedhosp_unused", server="postgresql://fedhosp_no_such_role@127.0.0.1:5432")
    # and the one on this machine (trust auth, as in CI) gets a database of our own, dropped again
    database = f"fedhosp_runner_test_{os.getpid()}"
    backend = mlflow_backend(tmp_path, database)
    assert backend == f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}"
    conn = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        def exists() -> bool:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                return cur.fetchone() is not None

        assert exists()
        drop_database(backend)
        assert not exists()
    finally:
        conn.close()


def test_processes_keep_no_handle_on_their_logs_and_stop_together(tmp_path):
    processes = Processes()
    logs = [tmp_path / "logs" / f"p{i}.log" for i in range(3)]
    for i, log in enumerate(logs):
        processes.start(f"p{i}", [PY, "-c", f"import time; print('p{i} up', flush=True); time.sleep(600)"],
                        dict(os.environ), log)
    for log in logs:
        runner.wait_until(lambda log=log: "up" in log.read_text(), log.name, 30)
    ours = {f.path for f in psutil.Process().open_files()}
    assert not ours & {str(log) for log in logs}  # the processes have their own copies; this one none
    started = [proc for _, proc in processes.started]
    processes.stop()
    assert [proc.returncode for proc in started] == [-15, -15, -15] and processes.started == []
