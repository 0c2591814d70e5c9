"""Run the app as a local Flower simulation and report the run's real outcome.

``flwr run .`` exits 0 even when the run failed and leaves a SuperLink behind.
This module owns the local SuperLink (started here with Flower's own flags, in
its own session, stopped with everything below it on exit unless it was
already running), submits the run with ``flwr run``, waits for ``flwr ls`` to
report a final status, and returns it with the reason the coordinator recorded
in its ledger when the run failed. It also holds what ``server/deploy.py``
shares: the one readiness poller, the process stopper, the TOML writers.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import re
import select
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import psutil
import tomli_w

from models.home import fedhosp_home

OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else every run does `uv sync` from the internet
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# A simulation's Ray starts its workers as the ClientApps need them, not a spare worker per CPU first (each
# spare imports Ray for nothing: about 1.5 s of CPU per run here). Defaults: the caller's environment wins.
SIMULATION_ENV = {"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"}


def runtime_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's processes: offline, FEDHOSP_HOME and FLWR_HOME set."""
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_ENV)
    for key, value in SIMULATION_ENV.items():
        env.setdefault(key, value)
    home = Path(env.get("FEDHOSP_HOME") or fedhosp_home()).resolve()
    env["FEDHOSP_HOME"] = str(home)
    env.setdefault("FLWR_HOME", str(home / "flwr"))
    bin_dir = str(Path(sys.executable).parent)  # find flwr / flower-superlink of this environment
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def isolated_env(folder: Path, ports: dict[str, str]) -> tuple[dict[str, str], str]:
    """An environment whose FEDHOSP_HOME, FLWR_HOME and SQLite MLflow store lie under ``folder``, with its own
    SuperLink ports (a benchmark beside the tests), and that store's URI."""
    env = runtime_env({**os.environ, "FEDHOSP_HOME": str(Path(folder) / "home"),
                       "FLWR_HOME": str(Path(folder) / "flwr"), **ports})
    env.pop("MLFLOW_TRACKING_URI", None)
    return env, f"sqlite:///{folder}/mlflow.db"


def _port(env: dict[str, str]) -> str:
    return env.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")


class NotReady(RuntimeError):
    """A started process did not become ready: it exited first, or its check did not pass in time."""


class RunTimeout(TimeoutError):
    """A Flower command ran past the caller's timeout; it was stopped (with everything it started)."""


def http_ok(url: str, ca: Path | None = None) -> bool:
    """``url`` answers 200 within a second (over TLS trusting only ``ca`` when given)."""
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urlopen(url, timeout=1, context=context) as response:
            return response.status == 200
    except (URLError, OSError):
        return False


def log_tail(log: Path | None, lines: int = 20) -> str:
    """The last ``lines`` lines of ``log``, indented, for an error message ("" without a log)."""
    if log is None:
        return ""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 16384))
            tail = fh.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return f"; there is no log at {log}"
    if not tail:
        return f"; its log {log} is empty"
    return f"; the end of {log}:\n" + "\n".join(f"  | {line}" for line in tail)


class _ExitWatch:
    """Sleeps that end the moment ``proc`` exits: a pidfd turns readable then (Linux); elsewhere plain sleeps.

    A pidfd neither reaps the process nor needs a thread, so ``proc``'s own ``poll()`` still reads its exit code.
    """

    def __init__(self, proc: subprocess.Popen | None):
        self.fd = None
        if proc is not None and proc.returncode is None and hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                self.fd = os.pidfd_open(proc.pid)

    def sleep(self, seconds: float) -> None:
        if self.fd is None:
            time.sleep(seconds)
        else:
            select.select([self.fd], [], [], seconds)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def wait_until(check, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Wait until ``check()`` is true; :class:`NotReady` when ``proc`` (the process that should answer) exits
    first, at once, or after ``timeout`` seconds, either way with the end of its ``log``.

    Between looks it waits on ``proc``'s exit (not a blind sleep), from 50 ms up to half a second.
    """
    deadline = time.monotonic() + timeout
    watch = _ExitWatch(proc)
    pause = 0.05
    try:
        while not check():
            if proc is not None and proc.poll() is not None:
                raise NotReady(f"{what} exited with code {proc.returncode} before it was ready{log_tail(log)}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotReady(f"{what} was not ready within {timeout:g} s{log_tail(log)}")
            watch.sleep(min(pause, left))
            pause = min(2 * pause, 0.5)
    finally:
        watch.close()


@contextmanager
def local_superlink(env: dict[str, str], startup_timeout: float = 60.0):
    """A simulation SuperLink on 127.0.0.1, stopped (with everything below it) on exit."""
    port = _port(env)
    health = f"http://127.0.0.1:{port}/health"
    if http_ok(health):
        yield None  # someone else's; leave it running
        return
    runtime = Path(env["FLWR_HOME"]) / "local-superlink"
    runtime.mkdir(parents=True, exist_ok=True)
    log = runtime / "superlink.log"
    command = [
        "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
        "--disable-runtime-dependency-installation",
        "--control-api-address", f"127.0.0.1:{env.get('FLWR_LOCAL_CONTROL_API_PORT', '39093')}",
        "--host", "127.0.0.1", "--port", port,
        "--database", str(runtime / "state.db"), "--log-file", str(log),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        wait_until(lambda: http_ok(health), f"flower-superlink (port {port})", startup_timeout, process, log)
        yield process
    finally:
        stop_process_tree(process)


def _session(sid: int) -> list[psutil.Process]:
    """The processes of session ``sid`` (a process started with ``start_new_session`` leads one), not this one."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if os.getsid(proc.pid) == sid:
                found.append(proc)
    return found


def _tree(process: subprocess.Popen) -> tuple[psutil.Process | None, dict[int, psutil.Process]]:
    """``process`` (while it is not reaped) and every live process below it or in its session, as psutil
    objects: each knows its process's start time, so a signal never reaches a process that got a reused pid."""
    leader = None
    if process.returncode is None:  # not reaped (running, or a zombie): the pid is still this process's
        with contextlib.suppress(psutil.NoSuchProcess):
            leader = psutil.Process(process.pid)
        session_is_ours = True
    else:  # reaped: Linux hands its number out again only once nothing uses it, as a session id either
        session_is_ours = not psutil.pid_exists(process.pid)
    roots = ([leader] if leader else []) + (_session(process.pid) if session_is_ours else [])
    found: dict[int, psutil.Process] = {}
    for root in roots:
        found.setdefault(root.pid, root)
        with contextlib.suppress(psutil.Error):
            for child in root.children(recursive=True):  # also those in sessions of their own (flower-superexec)
                found.setdefault(child.pid, child)
    found.pop(process.pid, None)  # the leader is waited for through its Popen, which then keeps its exit code
    return leader, found


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(procs, kill: bool) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):  # gone meanwhile (or its pid reused: psutil checks)
            proc.kill() if kill else proc.terminate()


def _wait(process: subprocess.Popen, others, deadline: float) -> list[psutil.Process]:
    """Until ``process`` and ``others`` are gone or ``deadline``; those still running.

    Not :func:`psutil.wait_procs`: it counts a zombie as running, and an orphan's zombie stays one for as long as
    nothing reaps it; ``process`` itself is reaped through its Popen, which keeps its exit code.
    """
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
    alive, pause = list(others), 0.02
    while alive := [p for p in alive if _running(p)]:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(pause, left))
        pause = min(2 * pause, 0.2)
    return alive


def stop_process_tree(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM ``process`` and every process below it or in its session; SIGKILL what is left after ``grace`` s.

    The SuperLink starts flower-superexec in a session of its own, and that one starts flwr-simulation and Ray;
    stopping the SuperLink mid-run (Ctrl-C) would leave them (and Ray's agents) behind, so the whole tree is
    collected before anything is signalled (a child whose parent died is no longer below it), and once more
    before SIGKILL (for what was started meanwhile).
    """
    leader, others = _tree(process)
    _signal([leader, *others.values()] if leader else others.values(), kill=False)
    alive = _wait(process, others.values(), time.monotonic() + grace)
    if process.returncode is None or alive:
        leader, more = _tree(process)
        rest = {p.pid: p for p in alive} | more
        _signal([leader, *rest.values()] if leader else rest.values(), kill=True)
        _wait(process, rest.values(), time.monotonic() + grace)


@dataclass
class RunOutcome:
    run_id: int
    status: str  # e.g. finished:completed, finished:failed
    log: str
    reason: str = ""  # why it failed, from the coordinator's ledger ("" when the ledger has no run-failed event)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def ledger_failure(home: Path, run_id: int, since: float | None = None) -> str:
    """The reason the coordinator recorded when run ``run_id`` failed (its ledger's ``run-failed`` event), or "".

    A run's ledger is ``$FEDHOSP_HOME/ledgers/run-<id>.jsonl``; a resumed run appends to the ledger of the run it
    continues, so the ledgers written since ``since`` (``time.time()``) are read too.
    """
    from models.ledger import read_records

    folder = Path(home) / "ledgers"
    own = folder / f"run-{run_id}.jsonl"
    paths = [own]
    if since is not None and folder.is_dir():
        for path in folder.glob("run-*.jsonl"):
            with contextlib.suppress(OSError):
                if path != own and path.stat().st_mtime >= since:
                    paths.append(path)
    for path in paths:
        try:
            records = read_records(path)
        except (OSError, ValueError):
            continue
        for record in reversed(records):
            data = record.get("data") or {}
            if record.get("event") == "run-failed" and data.get("flwr_run_id") == run_id:
                return str(data.get("reason", ""))
    return ""


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def _toml_value(value: object) -> str:
    return tomli_w.dumps({"v": value}).partition(" = ")[2].rstrip("\n")


def config_value(value: object) -> str:
    """One value as TOML that Flower's ``--run-config`` / ``--node-config`` parser reads back unchanged.

    That parser cuts a quoted value at its next quote mark, so a string holding ``"`` is written as a TOML
    literal string (``'...'``); one holding both quote marks cannot be passed at all.
    """
    if isinstance(value, (bool, int, float)):
        return _toml_value(value)
    if not isinstance(value, str):
        raise TypeError(f"run-config values are bool, int, float or str, not {type(value).__name__}: {value!r}")
    if '"' not in value:
        return _toml_value(value)  # a basic string: escapes for backslashes and control characters
    if "'" not in value and all(c == "\t" or (" " <= c and c != "\x7f") for c in value):
        return f"'{value}'"
    raise ValueError(f"{value!r}: Flower's config parser cannot take a value with both quote marks "
                     "(or with a control character beside a double quote)")


def config_arg(values: dict[str, object]) -> str:
    """A ``--run-config`` / ``--node-config`` string, ``key=value ...``, values written by :func:`config_value`."""
    for key in values:
        if not _BARE_KEY.fullmatch(key):
            raise ValueError(f"{key!r}: a config key is letters, digits, '-' and '_' (dotted for tables)")
    return " ".join(f"{key}={config_value(value)}" for key, value in values.items())


def write_toml(path: Path, data: dict) -> Path:
    """``data`` as a TOML file, replaced in one step (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(tomli_w.dumps(data), encoding="utf-8")
    os.replace(partial, path)
    return path


def connection(env: dict[str, str]) -> str:
    """A named SuperLink connection to our own local SuperLink in ``$FLWR_HOME/config.toml``.

    Flower's default ``local`` connection starts a detached SuperLink whenever
    none answers, even for ``flwr ls``; an explicit address never does, so a
    status poll after a crash cannot leave a stray SuperLink behind.
    """
    port = _port(env)
    name = f"fedhosp-{port}"
    path = Path(env["FLWR_HOME"]) / "config.toml"
    config = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {
        "superlink": {"default": "local", "local": {"address": ":local:"}}}
    superlink = config.setdefault("superlink", {})
    if name not in superlink:
        superlink[name] = {"address": f"127.0.0.1:{port}", "insecure": True}
        write_toml(path, config)
    return name


def flwr_run(app_dir: Path, env: dict[str, str], run_config: dict[str, object], num_supernodes: int,
             echo=None, timeout: float | None = 3600.0) -> RunOutcome:
    """Submit the run to the local simulation SuperLink, stream its log, wait for its final status."""
    name = connection(env)
    command = ["flwr", "run", str(app_dir), name, "--stream",
               "--federation-config", f"num-supernodes={num_supernodes}"]
    if run_config:
        command += ["--run-config", config_arg(run_config)]
    return submit(command, env, name, app_dir, echo, timeout)


class _Expired(Exception):
    pass


class _Output:
    """A process's output lines, read on a thread of their own so that waiting for the next one can end."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._pump, name=f"output-of-{proc.pid}", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        try:
            for line in self.proc.stdout:
                self.lines.put(line)
        except (OSError, ValueError):  # closed under it
            pass
        finally:
            self.lines.put(None)

    def next_before(self, deadline: float | None) -> str | None:
        """The next line; None at the end of the output; :class:`_Expired` once ``deadline`` passed."""
        try:
            return self.lines.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise _Expired from None

    def close(self) -> None:
        self.thread.join(timeout=5.0)  # the process tree is gone by now, so the pipe is at its end
        self.proc.stdout.close()


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _stored_log(run_id: int, env: dict[str, str], connection_name: str, deadline: float | None) -> str:
    """``flwr log RUN --show``: what the SuperLink kept of the run's log, within what is left of the deadline."""
    proc = subprocess.Popen(["flwr", "log", str(run_id), connection_name, "--show"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        return proc.communicate(timeout=_left(deadline))[0]
    except subprocess.TimeoutExpired:
        stop_process_tree(proc, grace=5.0)
        proc.communicate()
        return f"(fedhosp: `flwr log {run_id} --show` had not answered when the run's timeout ran out; it was stopped)"
    finally:
        if proc.returncode is None:
            stop_process_tree(proc, grace=5.0)


def submit(command: list[str], env: dict[str, str], connection_name: str, cwd: Path, echo=None,
           timeout: float | None = 3600.0) -> RunOutcome:
    """Run a ``flwr run --stream`` command; then poll ``flwr ls`` until the run has a final status.

    ``timeout`` (seconds; None: none) bounds all of it: the log stream, ``flwr run``'s exit, the status. When it
    runs out, ``flwr run`` is stopped with whatever it started and :class:`RunTimeout` says which part did not
    end. A failed run's outcome carries the reason from the coordinator's ledger (:func:`ledger_failure`).
    """
    since = time.time()
    deadline = None if timeout is None else time.monotonic() + timeout
    what = f"`{' '.join(command[:2])}`"
    # a session of its own: a timeout (or Ctrl-C here) stops it with everything below it
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            start_new_session=True)
    output = _Output(proc)
    lines: list[str] = []
    run_id = None
    try:
        _control_api()  # imported while `flwr run` starts, not after the run (the pipe holds its lines meanwhile)
        try:
            while (line := output.next_before(deadline)) is not None:
                lines.append(line)
                if echo:
                    echo(line.rstrip("\n"))
                match = re.search(r"Successfully started run (\d+)", line)
                if match:
                    run_id = int(match.group(1))
        except _Expired:
            stop_process_tree(proc, grace=5.0)
            raise RunTimeout(f"{what} was still streaming the log of run {run_id if run_id is not None else '(none yet)'}"
                             f" after {timeout:g} s (the caller's timeout); it was stopped") from None
        try:
            proc.wait(timeout=_left(deadline))
        except subprocess.TimeoutExpired:
            stop_process_tree(proc, grace=5.0)
            raise RunTimeout(f"{what} had not exited {timeout:g} s after it started (the caller's timeout), though "
                             f"its output had ended; it was stopped") from None
    finally:
        if proc.returncode is None:  # an error or Ctrl-C here: the command does not outlive the caller
            stop_process_tree(proc, grace=5.0)
        output.close()
    text = "".join(lines)
    if run_id is None:
        return RunOutcome(0, f"not-started (flwr run exited {proc.returncode})", text)
    # The stream ends when the run does, so the first look usually finds the final status.
    status, pause = "unknown", 0.1
    while not (status := run_status(run_id, env, connection_name)).startswith("finished"):
        left = _left(deadline)
        if left is not None and left <= 0:
            raise RunTimeout(f"run {run_id} had no final status {timeout:g} s after {what} started (the caller's "
                             f"timeout); last seen: {status}")
        time.sleep(pause if left is None else min(pause, left))
        pause = min(2 * pause, 1.0)
    reason = ""
    if status != "finished:completed":  # the stream can end before the last lines arrive: read the stored log
        text += "\n" + _stored_log(run_id, env, connection_name, deadline)
        reason = ledger_failure(Path(env.get("FEDHOSP_HOME") or fedhosp_home()), run_id, since)
    return RunOutcome(run_id, status, text, reason)


def _control_api():
    """Flower's Control API client pieces (about a second of imports, paid once per process)."""
    from flwr.cli.flower_config import parse_superlink_connection
    from flwr.cli.run_utils import format_runs
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

    return parse_superlink_connection, format_runs, init_http_client_from_connection, run_from_proto, ListRunsRequest


def run_status(run_id: int, env: dict[str, str], connection_name: str | None = None) -> str:
    """The run's status (``finished:completed``, ``running``, ...) as ``flwr ls`` reports it.

    Asked in this process through Flower's own Control API client (its requests time out after 30 s) and the
    named connection in ``$FLWR_HOME/config.toml``: a ``flwr ls`` subprocess would pay about 2 s of imports for
    every look.
    """
    parse_superlink_connection, format_runs, init_http_client_from_connection, run_from_proto, ListRunsRequest = \
        _control_api()
    name = connection_name or connection(env)
    config = tomllib.loads((Path(env["FLWR_HOME"]) / "config.toml").read_text(encoding="utf-8"))
    with contextlib.redirect_stdout(io.StringIO()):  # Flower's client announces "Using SuperLink: ..." every time
        client = init_http_client_from_connection(parse_superlink_connection(config["superlink"][name], name))
    try:
        response = client.ListRuns(ListRunsRequest(run_id=run_id))
    except Exception:  # not yet known, or the SuperLink is gone: the caller keeps looking until its deadline
        return "unknown"
    finally:
        client.close()
    rows = format_runs([run_from_proto(proto) for proto in response.run_dict.values()], response.now)
    return rows[0].status_text if rows else "unknown"
