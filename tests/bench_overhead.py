"""Benchmark: what does fedhosp cost over the plainest Flower app of the same shape?

``fedhosp run`` wraps ``flwr run``, and the app does more than a template
Flower app does (site check before round 1, update validation, both ledgers,
MLflow, the saved and registered model). This script measures how much longer
the oncology main job takes than Flower itself needs for the same federation,
so that a slow run can be blamed on the right layer.

The plain app is written into a temp folder: a ``pyproject.toml`` shaped like
Flower's own Message-API templates, a ServerApp running
``flwr.serverapp.strategy.FedAvg().start(...)`` and a ClientApp whose
``@app.train()`` / ``@app.evaluate()`` fit a ``torch.nn.Linear(12, 1)`` on 600
random rows per node (numpy seeded by ``partition-id``), 2 local epochs, Adam;
no MLflow, nothing else. Three variants, alternating within one run
(``--repeat`` times each):

1. ``plain``: ``flwr run <plain app> --stream`` (Flower's default ``local``
   connection starts its own SuperLink);
2. ``flwr run fedhosp``: the same command on this project
   (``local-epochs=2``);
3. ``fedhosp run``: ``fedhosp run --sites N`` (its own SuperLink, status poll,
   MLflow summary, SuperLink stopped).

Every command gets a fresh ``FLWR_HOME`` and free SuperLink ports (so runs never
meet each other's SuperLink or a stray one on Flower's default port) and the
offline environment of ``server.runner.runtime_env``; all fedhosp runs share
one ``FEDHOSP_HOME`` (demo data, MLflow store), filled by one untimed warm-up
of variant 2. Wall time runs from the start of the command until it exits:
for 1 and 2 that is when ``flwr run --stream`` ends (the status check with
``flwr ls`` and stopping the SuperLink it leaves behind are not timed); for 3
it includes fedhosp's own status poll, summary and SuperLink shutdown. Peak RSS
is the largest sum, sampled every 0.2 s, of VmRSS over every process whose
environment holds that command's ``FLWR_HOME`` (SuperLink, ServerApp,
ClientApps, Ray). Each command's output goes, each line stamped with the
seconds since the command started, to a log in the temp folder (``--keep``
keeps it); the "where the time goes" table reads those stamps.

It first times the cold starts every process pays before any work (a fresh
interpreter importing the ClientApp, the ServerApp, the CLI's ``--help``,
MONAI's networks; ``--imports-only`` stops there).

Not a pytest test, and it asserts nothing; ``make bench-overhead`` or
``.venv/bin/python tests/bench_overhead.py --repeat 5``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tests/bench_overhead.py` puts tests/ first, not the checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from client import hardware  # noqa: E402
from server import runner  # noqa: E402
from server.deploy import free_port  # noqa: E402

BIN = Path(sys.executable).parent
PLAIN = "plain Flower app"
FLWR_FEDHOSP = "flwr run fedhosp"
FEDHOSP_RUN = "fedhosp run"
VARIANTS = (PLAIN, FLWR_FEDHOSP, FEDHOSP_RUN)
COMMAND_TIMEOUT = 900.0

# ---------------------------------------------------------------- the plain app

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "plainapp"
version = "1.0.0"
description = ""
license = "Apache-2.0"
dependencies = [
    "flwr[simulation]>=1.42.0",
    "torch>=2.4",
]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "plainapp.server_app:app"
clientapp = "plainapp.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 3
local-epochs = 2
lr = 0.01
"""

TASK = '''\
"""plainapp: a Flower (Message API) / PyTorch app."""

import numpy as np
import torch

NUM_FEATURES = 12
NUM_ROWS = 600
BATCH_SIZE = 64
TRUE_WEIGHTS = np.linspace(-1.0, 1.0, NUM_FEATURES)


def make_model() -> torch.nn.Module:
    return torch.nn.Linear(NUM_FEATURES, 1)


def load_data(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(partition_id)
    x = rng.standard_normal((NUM_ROWS, NUM_FEATURES)).astype(np.float32)
    y = (x @ TRUE_WEIGHTS + 0.5 * rng.standard_normal(NUM_ROWS)).astype(np.float32)[:, None]
    return torch.from_numpy(x), torch.from_numpy(y)


def train_fn(model, x, y, epochs: int, lr: float) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
    return total / steps


def test_fn(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()
'''

CLIENT_APP = '''\
"""plainapp: a Flower (Message API) / PyTorch app."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from plainapp.task import load_data, make_model, test_fn, train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(int(context.node_config["partition-id"]))
    train_loss = train_fn(model, x, y, int(context.run_config["local-epochs"]), float(context.run_config["lr"]))
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(x)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(int(context.node_config["partition-id"]))
    metrics = MetricRecord({"eval_loss": test_fn(model, x, y), "num-examples": len(x)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
'''

SERVER_APP = '''\
"""plainapp: a Flower (Message API) / PyTorch app."""

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from plainapp.task import make_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = FedAvg()
    strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()),
                   num_rounds=int(context.run_config["num-server-rounds"]))
'''


def write_plain_app(root: Path) -> Path:
    package = root / "plainapp"
    package.mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT, encoding="utf-8")
    (package / "__init__.py").write_text('"""plainapp: a Flower (Message API) / PyTorch app."""\n', encoding="utf-8")
    (package / "task.py").write_text(TASK, encoding="utf-8")
    (package / "client_app.py").write_text(CLIENT_APP, encoding="utf-8")
    (package / "server_app.py").write_text(SERVER_APP, encoding="utf-8")
    return root


# ---------------------------------------------------------------- processes

def _environ_has(pid: str, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in b"\0" + f.read()
    except OSError:  # not ours, or gone
        return False


def processes_of(flwr_home: str) -> list[int]:
    """Processes whose environment holds ``FLWR_HOME=<flwr_home>`` or whose command line names it."""
    needle = b"\0FLWR_HOME=" + os.fsencode(flwr_home) + b"\0"
    mention = os.fsencode(flwr_home)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                named = mention in f.read()
        except OSError:
            named = False
        if named or _environ_has(entry.name, needle):
            found.append(int(entry.name))
    return found


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def stop_all(pids: list[int], grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in alive):
            time.sleep(0.2)


def cleanup(flwr_home: str) -> int:
    """Stop what a run left behind (``flwr run`` leaves its local SuperLink); how many processes that was."""
    left = processes_of(flwr_home)
    if left:
        stop_all(left)
        stop_all(processes_of(flwr_home), grace=5.0)  # anything the first pass let start
    return len(left)


# ---------------------------------------------------------------- one timed command

# Where the time goes, in seconds since the command started. From the SuperLink's log (its own time
# stamps, to the millisecond): the SuperLink answering, the run created, the ServerApp process started and
# ended. From the command's output (stamped when the line reached us; Flower's log stream comes in bursts,
# so these can lag by a second or so): round 1 starting (Flower's "[ROUND 1/"; fedhosp's progress line
# "sites ready" is printed just before it) and the last round done ("Strategy execution finished", or
# fedhosp's progress line "round N/N").
SUPERLINK_MARKERS = {
    "superlink up": re.compile(r"Starting the SuperLink Runtime HTTP API"),
    "run created": re.compile(r"Created run \d+"),
    "serverapp up": re.compile(r"Started task \d+ of run"),
    "serverapp end": re.compile(r"Finished task \d+ of run"),
}
OUTPUT_MARKERS = {
    "round 1": re.compile(r"\[ROUND 1/|fedhosp progress: \{\"event\": \"sites\"|sites ready \("),
    "rounds done": re.compile(r"Strategy execution finished|\bround (\d+)/\1 ·"),
}
COLUMNS = ("superlink up", "run created", "serverapp up", "round 1", "rounds done", "serverapp end")
SUPERLINK_TIME = re.compile(r"^\w+ flwr (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \| ")
SLOW_SUPERLINK = "Failed to start local SuperLink within"
ATTEMPTS = 3


@dataclass
class Measurement:
    variant: str
    wall_s: float = float("nan")
    peak_rss_mb: float = float("nan")
    status: str = "not run"
    run_id: int | None = None
    marks: dict[str, float] = field(default_factory=dict)
    log: Path | None = None
    left_behind: int = 0
    retries: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def timed(command: list[str], env: dict[str, str], log: Path, cwd: Path) -> Measurement:
    """Run ``command``; its wall time, peak summed RSS of every process in its FLWR_HOME, stamped log."""
    m = Measurement(variant="", log=log)
    needle = b"\0FLWR_HOME=" + os.fsencode(env["FLWR_HOME"]) + b"\0"
    peak_kb = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_kb
        while not stop.is_set():
            total = 0
            for entry in os.scandir("/proc"):
                if entry.name.isdigit() and _environ_has(entry.name, needle):
                    total += _rss_kb(int(entry.name))
            peak_kb = max(peak_kb, total)
            stop.wait(0.2)

    with open(log, "w", encoding="utf-8", errors="replace") as out:
        out.write("$ " + " ".join(command) + "\n")
        started = time.perf_counter()
        m.marks["t0"] = time.time()
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                at = time.perf_counter() - started
                out.write(f"{at:8.2f} {line}")
                for name, pattern in OUTPUT_MARKERS.items():
                    if name not in m.marks and pattern.search(line):
                        m.marks[name] = at
                found = re.search(r"Successfully started run (\d+)", line)
                if found and m.run_id is None:
                    m.run_id = int(found.group(1))

        sampler = threading.Thread(target=sample, daemon=True)
        reader = threading.Thread(target=pump, daemon=True)
        sampler.start()
        reader.start()
        try:
            rc = proc.wait(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            m.error = f"timed out after {COMMAND_TIMEOUT:.0f} s"
        m.wall_s = time.perf_counter() - started
        stop.set()
        sampler.join()
        reader.join(timeout=30)
        out.write(f"{m.wall_s:8.2f} [bench] exited with code {rc}\n")
    m.peak_rss_mb = peak_kb / 1024
    if rc != 0 and not m.error:
        m.error = f"exit code {rc}"
    return m


def superlink_marks(m: Measurement, flwr_home: str) -> None:
    """Add the SuperLink log's events, as seconds since the command started."""
    log = Path(flwr_home) / "local-superlink" / "superlink.log"
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return
    t0 = m.marks.pop("t0", None)
    if t0 is None:
        return
    for line in lines:
        stamp = SUPERLINK_TIME.match(line)
        if not stamp:
            continue
        for name, pattern in SUPERLINK_MARKERS.items():
            if name not in m.marks and pattern.search(line):
                when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                m.marks[name] = when - t0


def final_status(run_id: int, env: dict[str, str], cwd: Path, timeout: float = 120.0) -> str:
    """``flwr ls`` on the same FLWR_HOME (the default ``local`` connection), until the run has a final status."""
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        out = subprocess.run([str(BIN / "flwr"), "ls", "--run-id", str(run_id), "--format", "json"], env=env,
                             cwd=cwd, capture_output=True, text=True, check=False, timeout=120)
        try:
            runs = json.loads(out.stdout)["runs"]
            status = runs[0]["status"] if runs else "unknown"
        except (ValueError, KeyError, IndexError):
            status = "unknown"
        if status.startswith("finished"):
            break
        time.sleep(1.0)
    return status


def fresh_env(tmp: Path, tag: str, fedhosp_home: Path) -> dict[str, str]:
    env = runner.runtime_env({
        **os.environ,
        "FEDHOSP_HOME": str(fedhosp_home),
        "FLWR_HOME": str(tmp / f"flwr-{tag}"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",  # so that the log's time stamps are when a line was written
    })
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def measure(variant: str, tag: str, tmp: Path, plain_dir: Path, fedhosp_home: Path, sites: int,
            rounds: int) -> Measurement:
    """One timed run; again (fresh FLWR_HOME and ports) when Flower gave up on its own SuperLink's start.

    ``flwr run`` waits a fixed 15 s (``LOCAL_SUPERLINK_STARTUP_TIMEOUT``) for the SuperLink it starts; on a
    busy machine that is not always enough. Such an attempt is reported and not counted.
    """
    for attempt in range(1, ATTEMPTS + 1):
        m = _attempt(variant, tag if attempt == 1 else f"{tag}-retry{attempt - 1}", tmp, plain_dir, fedhosp_home,
                     sites, rounds)
        m.retries = attempt - 1
        slow = m.log is not None and SLOW_SUPERLINK in m.log.read_text(encoding="utf-8", errors="replace")
        if m.ok or not slow or attempt == ATTEMPTS:
            break
        print(f"  .. {variant} ({tag}): flwr run gave up waiting {m.wall_s:.0f} s for its local SuperLink "
              f"(Flower's fixed 15 s); again with a fresh FLWR_HOME", flush=True)
    if not m.ok:
        print(f"  !! {variant} ({tag}): {m.error}; last lines of {m.log}:")
        lines = m.log.read_text(encoding="utf-8", errors="replace").splitlines()
        print("\n".join("     " + line for line in lines[-25:]))
    return m


def _attempt(variant: str, tag: str, tmp: Path, plain_dir: Path, fedhosp_home: Path, sites: int,
             rounds: int) -> Measurement:
    env = fresh_env(tmp, tag, fedhosp_home)
    federation = ["--stream", "--federation-config", f"num-supernodes={sites}"]
    if variant == PLAIN:
        command = [str(BIN / "flwr"), "run", str(plain_dir), *federation,
                   "--run-config", f"num-server-rounds={rounds}"]
    elif variant == FLWR_FEDHOSP:
        command = [str(BIN / "flwr"), "run", str(REPO), *federation,
                   "--run-config", f"num-server-rounds={rounds} local-epochs=2"]
    else:
        command = [str(BIN / "fedhosp"), "run", "--sites", str(sites), "--run-config", f"num-server-rounds={rounds}"]
    cwd = tmp
    m = timed(command, env, tmp / "logs" / f"{tag}.log", cwd)
    m.variant = variant
    superlink_marks(m, env["FLWR_HOME"])
    if variant == FEDHOSP_RUN:
        m.status = "finished:completed" if m.ok else m.error
        m.left_behind = cleanup(env["FLWR_HOME"])  # fedhosp stops its own; anything here is a leak
        if m.left_behind and not m.error:
            m.error = f"{m.left_behind} processes left behind"
    else:
        if m.run_id is None:
            m.status = "not-started"
            m.error = m.error or "no 'Successfully started run' in the log"
        else:
            m.status = final_status(m.run_id, env, cwd)
            if m.status != "finished:completed":
                m.error = m.error or f"run {m.run_id} ended {m.status}"
        m.left_behind = cleanup(env["FLWR_HOME"])  # the SuperLink `flwr run` started and left running
    return m


# ---------------------------------------------------------------- report

def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _f(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def report(results: list[Measurement], args: argparse.Namespace) -> None:
    by_variant = {v: [m for m in results if m.variant == v and m.ok] for v in VARIANTS}
    plain = _median([m.wall_s for m in by_variant[PLAIN]])
    print()
    print(f"Overhead of fedhosp over a plain Flower app: {args.sites} simulated nodes, {args.rounds} rounds, "
          f"2 local epochs, repeat {args.repeat} (successful runs only)")
    header = f"{'variant':<20} {'n':>2}  {'wall s median (min-max)':<24} {'peak RSS MB':>11}  {'x plain':>7}"
    print(header)
    print("-" * len(header))
    for v in VARIANTS:
        runs = by_variant[v]
        walls = [m.wall_s for m in runs]
        wall = _median(walls)
        spread = f"{_f(wall)} ({_f(min(walls))}-{_f(max(walls))})" if walls else "-"
        ratio = wall / plain if plain == plain and wall == wall else float("nan")
        print(f"{v:<20} {len(runs):>2}  {spread:<24} {_f(_median([m.peak_rss_mb for m in runs]), 0):>11}  "
              f"{_f(ratio, 2):>7}")
    print()
    print("Where the time goes: median seconds since the command started (superlink/run/serverapp: the "
          "SuperLink's log; round 1, rounds done: the command's output)")
    header = f"{'variant':<20} " + " ".join(f"{name:>13}" for name in COLUMNS) + f" {'exited':>8}"
    print(header)
    print("-" * len(header))
    for v in VARIANTS:
        runs = by_variant[v]
        cells = [_f(_median([m.marks.get(name, float("nan")) for m in runs])) for name in COLUMNS]
        print(f"{v:<20} " + " ".join(f"{c:>13}" for c in cells) + f" {_f(_median([m.wall_s for m in runs])):>8}")
    print()
    for v in (FLWR_FEDHOSP, FEDHOSP_RUN):
        wall = _median([m.wall_s for m in by_variant[v]])
        ratio = wall / plain if plain == plain and wall == wall else float("nan")
        print(f"ratio {v} / plain: {_f(ratio, 2)}  (+{_f(wall - plain)} s)")
    print(f"nodes: {hardware.describe()}")
    print(f"torch.get_num_threads() = {torch.get_num_threads()}, os.cpu_count() = {os.cpu_count()}, "
          f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    left = sum(m.left_behind for m in results if m.variant != FEDHOSP_RUN)
    print(f"flwr run left its SuperLink behind: {left} processes stopped afterwards (not timed)")
    retried = sum(m.retries for m in results)
    if retried:
        print(f"retried: {retried} attempts where flwr run gave up on its local SuperLink's start "
              f"(Flower's fixed 15 s; not counted)")
    failed = [m for m in results if not m.ok]
    for m in failed:
        print(f"FAILED: {m.variant}: {m.error} (log {m.log})")


# ---------------------------------------------------------------- main

# What each process pays before any work: a SuperNode starts a fresh ClientApp process for every message,
# the simulation one ServerApp process per run, and a person waits for the CLI.
COLD_STARTS = (
    ("import torch (the floor)", ["-c", "import torch"]),
    ("import client.app", ["-c", "import client.app"]),
    ("import server.app", ["-c", "import server.app"]),
    ("fedhosp --help", ["-m", "server.cli", "--help"]),
    ("import monai.networks.nets (radiology only)", ["-c", "import monai.networks.nets"]),
)


def cold_starts(repeat: int) -> None:
    """Median wall time of a fresh interpreter doing each of COLD_STARTS (alternating, ``repeat`` times)."""
    times: dict[str, list[float]] = {name: [] for name, _ in COLD_STARTS}
    for _ in range(repeat):
        for name, args in COLD_STARTS:
            started = time.perf_counter()
            subprocess.run([sys.executable, *args], cwd=REPO, env=runner.runtime_env(), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT)
            times[name].append(time.perf_counter() - started)
    print(f"Cold starts: median wall s of a fresh interpreter (min-max), {repeat} each")
    for name, values in times.items():
        print(f"  {name:<44} {_median(values):5.2f}  ({min(values):.2f}-{max(values):.2f})")
    print(flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant (alternating)")
    parser.add_argument("--sites", type=int, default=5, help="simulated nodes (num-supernodes)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (num-server-rounds)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, apps, stores)")
    parser.add_argument("--imports-only", action="store_true", help="only the cold-start import timings")
    args = parser.parse_args()

    started = time.perf_counter()
    cold_starts(max(args.repeat, 3))
    if args.imports_only:
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="fedhosp-bench-overhead-"))
    results: list[Measurement] = []
    try:
        (tmp / "logs").mkdir()
        plain_dir = write_plain_app(tmp / "plainapp")
        fedhosp_home = tmp / "fedhosp-home"
        print(f"temp folder {tmp}; plain app in {plain_dir}")
        print("warm-up (untimed): one 'flwr run fedhosp' to write the demo data and warm the caches ...", flush=True)
        warm = measure(FLWR_FEDHOSP, "warmup", tmp, plain_dir, fedhosp_home, args.sites, args.rounds)
        print(f"  warm-up: {warm.wall_s:.1f} s, {warm.status}", flush=True)
        for i in range(1, args.repeat + 1):
            for n, variant in enumerate(VARIANTS):
                m = measure(variant, f"{i}-{n}", tmp, plain_dir, fedhosp_home, args.sites, args.rounds)
                results.append(m)
                print(f"  [{i}/{args.repeat}] {variant:<18} {m.wall_s:6.1f} s  peak RSS {m.peak_rss_mb:6.0f} MB  "
                      f"{m.status}", flush=True)
        report(results, args)
    finally:
        for home in tmp.glob("flwr-*"):  # nothing of ours survives an interrupted benchmark
            cleanup(str(home))
        if args.keep:
            print(f"(kept {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s)")
    return 1 if any(not m.ok for m in results) else 0


if __name__ == "__main__":
    sys.exit(main())
