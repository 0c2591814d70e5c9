"""Run the app as a local Flower simulation and report the run's real outcome.

``flwr run .`` exits 0 even when the run failed and leaves a SuperLink behind.
This module owns the local SuperLink (started here with Flower's own flags, in
its own process group, stopped on exit unless it was already running), submits
the run with ``flwr run``, waits for ``flwr ls`` to report a final status, and
returns it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from models.home import fedhosp_home

OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else every run does `uv sync` from the internet
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def runtime_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's processes: offline, FEDHOSP_HOME and FLWR_HOME set."""
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_ENV)
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


def _healthy(port: str) -> bool:
    try:
        with urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as response:
            return response.status == 200
    except (URLError, OSError):
        return False


@contextmanager
def local_superlink(env: dict[str, str], startup_timeout: float = 60.0):
    """A simulation SuperLink on 127.0.0.1, stopped (with its children) on exit."""
    port = _port(env)
    if _healthy(port):
        yield None  # someone else's; leave it running
        return
    runtime = Path(env["FLWR_HOME"]) / "local-superlink"
    runtime.mkdir(parents=True, exist_ok=True)
    command = [
        "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
        "--disable-runtime-dependency-installation",
        "--control-api-address", f"127.0.0.1:{env.get('FLWR_LOCAL_CONTROL_API_PORT', '39093')}",
        "--host", "127.0.0.1", "--port", port,
        "--database", str(runtime / "state.db"), "--log-file", str(runtime / "superlink.log"),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(port):
            if process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {process.returncode}; see {runtime / 'superlink.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"flower-superlink did not answer on port {port} within {startup_timeout:.0f}s")
            time.sleep(0.2)
        yield process
    finally:
        stop_process_group(process)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (Linux); elsewhere none."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _stop_pids(pids: list[int], grace: float) -> None:
    """SIGTERM, wait up to ``grace``, SIGKILL what is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in alive):
            time.sleep(0.2)


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left, descendants in other groups too.

    The SuperLink starts flower-superexec in a session of its own, and that one
    starts flwr-simulation and Ray; stopping the SuperLink mid-run (Ctrl-C)
    would leave them (and Ray's agents) behind, so they are collected first.
    """
    below = _descendants(process.pid)
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; make sure no child of the group survives it
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break
    _stop_pids(below, grace)


@dataclass
class RunOutcome:
    run_id: int
    status: str  # e.g. finished:completed, finished:failed
    log: str

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def config_arg(values: dict[str, object]) -> str:
    def toml(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))  # a TOML basic string

    return " ".join(f"{k}={toml(v)}" for k, v in values.items())


def connection(env: dict[str, str]) -> str:
    """A named SuperLink connection to our own local SuperLink in ``$FLWR_HOME/config.toml``.

    Flower's default ``local`` connection starts a detached SuperLink whenever
    none answers, even for ``flwr ls``; an explicit address never does, so a
    status poll after a crash cannot leave a stray SuperLink behind.
    """
    port = _port(env)
    name = f"fedhosp-{port}"
    path = Path(env["FLWR_HOME"]) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text(encoding="utf-8") if path.exists() else (
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    if f"[superlink.{name}]" not in text:
        text += f'\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        path.write_text(text, encoding="utf-8")
    return name


def flwr_run(app_dir: Path, env: dict[str, str], run_config: dict[str, object], num_supernodes: int,
             echo=None, timeout: float = 3600.0) -> RunOutcome:
    """Submit the run to the local simulation SuperLink, stream its log, wait for its final status."""
    name = connection(env)
    command = ["flwr", "run", str(app_dir), name, "--stream",
               "--federation-config", f"num-supernodes={num_supernodes}"]
    if run_config:
        command += ["--run-config", config_arg(run_config)]
    return submit(command, env, name, app_dir, echo, timeout)


def submit(command: list[str], env: dict[str, str], connection_name: str, cwd: Path, echo=None,
           timeout: float = 3600.0) -> RunOutcome:
    """Run a ``flwr run --stream`` command; then poll ``flwr ls`` until the run has a final status."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    _control_api()  # imported while `flwr run` starts, not after the run (the pipe holds its lines meanwhile)
    lines: list[str] = []
    run_id = None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if echo:
            echo(line.rstrip("\n"))
        match = re.search(r"Successfully started run (\d+)", line)
        if match:
            run_id = int(match.group(1))
    proc.wait()
    text = "".join(lines)
    if run_id is None:
        return RunOutcome(0, f"not-started (flwr run exited {proc.returncode})", text)
    # The stream ends when the run does, so the first look usually finds the final status.
    deadline = time.monotonic() + timeout
    status, pause = "unknown", 0.1
    while time.monotonic() < deadline:
        status = run_status(run_id, env, connection_name)
        if status.startswith("finished"):
            break
        time.sleep(pause)
        pause = min(2 * pause, 1.0)
    if status != "finished:completed":  # the stream can end before the last lines arrive: read the stored log
        shown = subprocess.run(["flwr", "log", str(run_id), connection_name, "--show"], env=env, capture_output=True,
                               text=True, check=False, timeout=120).stdout
        text += "\n" + shown
    return RunOutcome(run_id, status, text)


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

    Asked in this process through Flower's own Control API client and the named
    connection in ``$FLWR_HOME/config.toml``: a ``flwr ls`` subprocess would pay
    about 2 s of imports for every look.
    """
    import tomllib

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


def failure_reason(log_text: str) -> str:
    """The coordinator's error message from the run's log, when it gave one."""
    for kind in ("FederationError", "SiteDataError|ValueError|RuntimeError"):
        found = re.findall(rf"(?:{kind}): (.+(?:\n  - .+)*)", log_text)
        if found:
            return found[-1]
    return ""
