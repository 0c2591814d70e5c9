"""Benchmark: one hospital sends scaled updates; what do validation and Flower's robust strategies save?

Five synthetic demo regions (``write_demo(root, 5)``); Syddanmark's ClientApp
trains honestly and then sends ``global + 1000 x (its update)`` (the test-only
poison app of ``tests/test_robustness.py``, run-config ``poison =
"Syddanmark:scale"``). Every run is a real Flower simulation through
``server.runner`` (one local SuperLink for all runs, one run at a time):

1. FedAvg, update validation OFF (``validate-updates = false``): the damage;
2. FedAvg, update validation ON (the default): the coordinator rejects the
   scaled update before aggregation;
3. each robust Flower strategy with validation OFF: fedmedian, fedtrimmedavg
   (trim-beta 0.2), krum (num-malicious-nodes 1), multikrum (num-malicious-nodes 1,
   num-nodes-to-select 3), bulyan (num-malicious-nodes 1; Bulyan needs
   n >= 4f + 3 = 7 replies, so with five sites it cannot aggregate: whatever
   the run does is reported as it happened);
4. reference: FedAvg on the four honest sites only, nothing poisoned.

For each run it prints, read back from MLflow: each honest site's ``<Site>/c_index``
at the last round (their mean is the headline figure; Syddanmark is left out,
its own test C-index is shown apart), the federated weighted
``federation/c_index`` (all evaluating sites, Syddanmark included), the rejected
updates, how many rounds actually changed the global model (from the
coordinator's ledger) and the run's status. The C-index ranks patients only, so
a model pushed far off in the attacker's own direction can keep its ranking;
the weighted ``federation/eval_loss`` and the final weights' L2 distance from
the reference run's show such damage. And, from run 2, what validation
costs per round: ``federation/validation_ms`` against ``federation/round_duration_s``.

Not a pytest test; ``make bench-robustness ARGS="--quick"`` or
``.venv/bin/python tests/bench_robustness.py --rounds 5``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tests/bench_robustness.py` puts tests/ first, not the checkout
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from client import hardware  # noqa: E402
from client.data.demo import write_demo  # noqa: E402
from models.ledger import read_records  # noqa: E402
from server import runner  # noqa: E402
from server.summary import find_summary  # noqa: E402
from server.tracking import FLWR_RUN_TAG  # noqa: E402
from tests.test_robustness import _poison_app  # noqa: E402

# Neither Flower's defaults (39091/39093) nor bench_oncology's (39291/39293), nor the tests' free ports.
BENCH_PORTS = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39791", "FLWR_LOCAL_CONTROL_API_PORT": "39793"}
ATTACKER = "Syddanmark"
ATTACK = "scale"  # the poison client's x1000 update
NUM_SITES = 5
ROBUST = {  # strategy -> its run-config settings (validation off)
    "fedmedian": {},
    "fedtrimmedavg": {"trim-beta": 0.2},
    "krum": {"num-malicious-nodes": 1},
    "multikrum": {"num-malicious-nodes": 1, "num-nodes-to-select": 3},
    "bulyan": {"num-malicious-nodes": 1},
}
QUICK_ROBUST = ("fedmedian", "krum")
# Bulyan with f = 1 needs 4f + 3 = 7 replies; five sites give five: a failure there is expected, not a bug.
EXPECTED_TO_FAIL = {"bulyan"} if NUM_SITES < 4 * 1 + 3 else set()

console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200, log_path=False)


# ---------------------------------------------------------------- runs

@dataclass
class Spec:
    key: str  # short name in tables
    label: str  # what the run is
    strategy: str
    validate: bool
    poison: str
    honest_only: bool = False
    extra: dict[str, object] = field(default_factory=dict)


@dataclass
class Result:
    spec: Spec
    status: str = "not run"
    flwr_run_id: int = 0
    mlflow_status: str = ""
    c_index: dict[str, float] = field(default_factory=dict)  # site -> <Site>/c_index at the last logged round
    num_test: dict[str, int] = field(default_factory=dict)
    last_step: dict[str, int] = field(default_factory=dict)  # site -> the round that value is from
    weighted: float = float("nan")  # federation/c_index at the last logged round
    eval_loss: float = float("nan")  # federation/eval_loss (weighted Cox partial NLL) at the last logged round
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # the final global model (summary's model_file)
    rounds_logged: int = 0
    validation_ms: list[float] = field(default_factory=list)
    round_ms: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)  # federation/rejected_updates per round
    aggregated: int = -1  # rounds whose aggregation produced a new global model (ledger); -1: unknown
    model_changed: bool | None = None  # final model hash != initial model hash (ledger)
    run_seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"

    def honest_mean(self, sites: list[str]) -> float:
        values = [self.c_index[s] for s in sites if s in self.c_index]
        if len(values) < len(sites) or any(v != v for v in values):
            return float("nan")
        return statistics.fmean(values)


def specs(robust: list[str]) -> list[Spec]:
    poison = f"{ATTACKER}:{ATTACK}"
    out = [Spec("fedavg-off", "FedAvg, validation off", "fedavg", False, poison),
           Spec("fedavg-on", "FedAvg, validation on", "fedavg", True, poison)]
    out += [Spec(s, f"{s}, validation off", s, False, poison, extra=ROBUST[s]) for s in robust]
    out.append(Spec("reference", f"reference: FedAvg, {NUM_SITES - 1} honest sites", "fedavg", True, "",
                    honest_only=True))
    return out


def _ledger_facts(home: Path, flwr_run_id: int) -> tuple[int, bool | None, str]:
    """(rounds with a new global model, final != initial model, the ledger's run-failed reason)."""
    path = home / "ledgers" / f"run-{flwr_run_id}.jsonl"
    if not path.exists():
        return -1, None, ""
    records = read_records(path)
    aggregations = [r["data"] for r in records if r["event"] == "aggregation"]
    initial = next((r["data"].get("initial_model_hash") for r in records if r["event"] == "run-start"), None)
    final = next((r["data"].get("final_model_hash") for r in records if r["event"] == "run-end"), None)
    failed = next((r["data"].get("reason", "") for r in records if r["event"] == "run-failed"), "")
    changed = None if initial is None or final is None else final != initial
    return sum(1 for a in aggregations if a.get("global_model_hash")), changed, failed


def _mlflow_run(uri: str, flwr_run_id: int):
    """The MLflow run tagged with Flower's run id, completed or not (a failed run has no summary.json)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{FLWR_RUN_TAG}` = '{flwr_run_id}'", max_results=1)
    return client, (runs[0] if runs else None)


def federated_run(spec: Spec, app: Path, env: dict[str, str], uri: str, roots: dict[bool, Path], rounds: int,
                  seed: int, index: int) -> Result:
    """One simulation; figures from MLflow (metric histories), facts about aggregation from the ledger."""
    root = roots[spec.honest_only]
    num_sites = len([p for p in root.iterdir() if p.is_dir()])
    overrides = {"task": "oncology", "endpoint": "survival", "model": "linear", "strategy": spec.strategy,
                 "data-root": str(root), "num-server-rounds": rounds, "seed": seed, "mlflow-uri": uri,
                 "mlflow-experiment": f"robustness-{index:02d}-{spec.key}", "poison": spec.poison,
                 "validate-updates": spec.validate, **spec.extra}
    result = Result(spec)
    started = time.perf_counter()
    outcome = runner.flwr_run(app, env, overrides, num_sites)
    result.run_seconds = time.perf_counter() - started
    result.status, result.flwr_run_id = outcome.status, outcome.run_id

    if outcome.ok:
        summary = find_summary(uri, outcome.run_id)
        if summary is not None:
            result.num_test = {s: v["num_test"] for s, v in summary["sites"].items()}
            result.weights = {k: v.numpy().astype(np.float64) for k, v in torch.load(summary["model_file"]).items()}
    client, run = _mlflow_run(uri, outcome.run_id) if outcome.run_id else (None, None)
    if run is not None:
        result.mlflow_status = run.info.status
        if not result.num_test:
            try:
                import mlflow

                sites = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/sites.json")
                result.num_test = {s: v["num_test"] for s, v in sites.items()}
            except Exception:  # noqa: BLE001 — a run that failed before logging it
                pass

        def history(key: str) -> dict[int, float]:
            return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

        def last(key: str) -> tuple[int, float] | None:
            values = history(key)
            return (max(values), values[max(values)]) if values else None

        for site in result.num_test or run.data.tags.get("fedhosp.sites", "").split(","):
            found = last(f"{site}/c_index") if site else None
            if found:
                result.last_step[site], result.c_index[site] = found
        weighted = last("federation/c_index")
        result.weighted = weighted[1] if weighted else float("nan")
        loss = last("federation/eval_loss")
        result.eval_loss = loss[1] if loss else float("nan")
        wall = history("federation/round_duration_s")
        steps = sorted(wall)
        result.rounds_logged = len(steps)
        validation, rejected = history("federation/validation_ms"), history("federation/rejected_updates")
        result.round_ms = [wall[k] * 1000 for k in steps]
        result.validation_ms = [validation.get(k, float("nan")) for k in steps]
        result.rejected = [rejected.get(k, float("nan")) for k in steps]
        error_tag = run.data.tags.get("fedhosp.error", "")
    else:
        error_tag = ""
    result.aggregated, result.model_changed, ledger_reason = _ledger_facts(Path(env["FEDHOSP_HOME"]), outcome.run_id)

    if not outcome.ok:
        reason = (outcome.reason or error_tag or ledger_reason
                  or (outcome.log.strip().splitlines() or ["no log"])[-1])
        result.error = reason.strip().splitlines()[0][:300]
        console.print(f"[red]{spec.label}: run {outcome.run_id} ended {outcome.status}[/]; last lines of its log:")
        console.out("\n".join(outcome.log.strip().splitlines()[-15:]), highlight=False)
    elif result.aggregated == 0:
        result.error = "completed, but no round aggregated: the final model is the initial one"
        said = re.findall(r"(Insufficient replies[^\n]*)", outcome.log)  # e.g. Bulyan's 4f + 3 warning
        if said:
            result.error += f" (Flower: {said[-1].strip()})"
    elif result.rounds_logged != rounds:
        result.error = f"{result.rounds_logged} of {rounds} rounds logged"
    return result


def weight_norm(r: Result) -> float:
    return math.sqrt(sum(float(np.sum(v ** 2)) for v in r.weights.values())) if r.weights else float("nan")


def distance(r: Result, ref: Result | None) -> float:
    """L2 distance between a run's final model and the reference run's."""
    if not r.weights or ref is None or not ref.weights:
        return float("nan")
    return math.sqrt(sum(float(np.sum((r.weights[k] - ref.weights[k]) ** 2)) for k in ref.weights))


# ---------------------------------------------------------------- tables

def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def _status(r: Result) -> str:
    if r.ok and not r.error:
        return "[green]completed[/]"
    if r.ok:
        return "[yellow]completed[/]"
    return f"[red]{r.status}[/]"


def cindex_table(results: list[Result], honest: list[str], rounds: int, reference: float) -> Table:
    table = Table(title=f"C-index on the test splits after {rounds} rounds — {ATTACKER} sends x1000 updates "
                        "(reference: honest sites only)", title_justify="left")
    table.add_column("run")
    sizes = next((r.num_test for r in results if r.num_test), {})
    for s in honest:
        table.add_column(f"{s}\nn={sizes.get(s, '?')}", justify="right")
    table.add_column("honest\nmean", justify="right", style="bold")
    table.add_column("Δ vs\nreference", justify="right")
    table.add_column("federation\nweighted", justify="right")
    table.add_column(f"{ATTACKER}\n(attacker)", justify="right", style="dim")
    table.add_column("status")
    for r in results:
        def cell(site: str) -> str:
            if site not in r.c_index:
                return "–"
            stale = f" (r{r.last_step[site]})" if r.last_step.get(site, rounds) != rounds else ""
            return _f(r.c_index[site]) + stale
        mean = r.honest_mean(honest)
        delta = "" if r.spec.key == "reference" or mean != mean or reference != reference else f"{mean - reference:+.3f}"
        table.add_row(r.spec.label, *(cell(s) for s in honest), _f(mean), delta, _f(r.weighted),
                      cell(ATTACKER) if r.spec.poison else "(not in)", _status(r))
    return table


def runs_table(results: list[Result], rounds: int, ref: Result | None) -> Table:
    table = Table(title="What each run did (model: the final global weights; ‖w − ref‖: distance from the "
                        "reference run's final weights; eval loss: weighted Cox partial NLL)", title_justify="left")
    for name in ("run", "flwr run", "status", "MLflow", "rounds\nlogged", "rounds that\naggregated",
                 "model\nchanged", "rejected\nupdates", "eval loss\nweighted", "‖w‖", "‖w − ref‖",
                 "run wall s", "note / error"):
        table.add_column(name, justify="left" if name in ("run", "status", "MLflow", "note / error") else "right")
    for r in results:
        rejected = sum(v for v in r.rejected if v == v) if r.rejected else float("nan")
        changed = {True: "yes", False: "[red]no[/]", None: "?"}[r.model_changed]
        aggregated = "?" if r.aggregated < 0 else f"{r.aggregated}/{rounds}"
        table.add_row(r.spec.label, str(r.flwr_run_id or "–"), _status(r), r.mlflow_status or "–",
                      str(r.rounds_logged), aggregated, changed, _f(rejected, 0), _f(r.eval_loss),
                      _f(weight_norm(r)), _f(distance(r, ref)), _f(r.run_seconds, 0),
                      r.error or "")
    return table


def validation_table(on: Result, off: Result | None) -> Table:
    """Per round: validation time against the whole round, run 2 (and the round time of run 1 beside it)."""
    table = Table(title=f"Cost of update validation per round — {on.spec.label}", title_justify="left")
    for name in ("round", "validation ms", "round ms", "validation\n% of round", "rejected",
                 f"round ms\n({off.spec.label})" if off else ""):
        if name:
            table.add_column(name, justify="right")
    for i, (v, w, rej) in enumerate(zip(on.validation_ms, on.round_ms, on.rejected, strict=True), start=1):
        row = [str(i), _f(v, 2), _f(w, 0), _f(100 * v / w, 3), _f(rej, 0)]
        if off:
            row.append(_f(off.round_ms[i - 1], 0) if i <= len(off.round_ms) else "–")
        table.add_row(*row)
    v, w = statistics.fmean(on.validation_ms), statistics.fmean(on.round_ms)
    row = ["[bold]mean[/]", f"[bold]{v:.2f}[/]", f"[bold]{w:.0f}[/]", f"[bold]{100 * v / w:.3f}[/]",
           _f(statistics.fmean(on.rejected), 1)]
    if off:
        row.append(_f(statistics.fmean(off.round_ms), 0) if off.round_ms else "–")
    table.add_row(*row)
    return table


def key_figures(results: list[Result], honest: list[str], rounds: int, seed: int, reference: float,
                ref: Result | None) -> str:
    """Plain text, no markup, to paste into a note."""
    lines = [f"Key figures ({NUM_SITES} demo sites, {ATTACKER} sends x1000-scaled updates, linear Cox, "
             f"{rounds} rounds, seed {seed})",
             f"C-index = mean of the {len(honest)} honest sites' test splits ({', '.join(honest)}); "
             "weighted = federation/c_index (all evaluating sites); loss = federation/eval_loss; "
             "|w-ref| = L2 distance of the final weights from the reference run's"]
    for r in results:
        mean = r.honest_mean(honest)
        delta = "" if r.spec.key == "reference" or mean != mean else f" ({mean - reference:+.3f} vs reference)"
        rejected = int(sum(v for v in r.rejected if v == v)) if r.rejected else 0
        state = r.status if not r.error else f"{r.status}; {r.error}"
        aggregated = "?" if r.aggregated < 0 else str(r.aggregated)
        lines.append(f"  {r.spec.label:<38} C {_f(mean)}{delta}, weighted {_f(r.weighted)}, loss {_f(r.eval_loss)}, "
                     f"|w-ref| {_f(distance(r, ref))}; {aggregated}/{rounds} rounds aggregated, "
                     f"{rejected} updates rejected; {state}")
    on = next((r for r in results if r.spec.key == "fedavg-on" and r.round_ms), None)
    if on:
        v, w = statistics.fmean(on.validation_ms), statistics.fmean(on.round_ms)
        lines.append(f"  validation cost (FedAvg, validation on): {v:.2f} ms per round of {w:.0f} ms "
                     f"= {100 * v / w:.3f} % (max {max(on.validation_ms):.2f} ms)")
    return "\n".join(lines)


def processes_left(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


# ---------------------------------------------------------------- main

def main(
    rounds: int = typer.Option(5, help="Federated rounds per run."),
    seed: int = typer.Option(42, help="Data seed (demo cohorts, train/test splits) and training seed."),
    strategies: str = typer.Option(",".join(ROBUST), help=f"Comma list of robust strategies ({', '.join(ROBUST)})."),
    quick: bool = typer.Option(False, "--quick", help=f"2 rounds, robust strategies {'+'.join(QUICK_ROBUST)} only."),
) -> None:
    """FedAvg with and without update validation, and Flower's robust strategies, against one poisoning site."""
    robust = list(QUICK_ROBUST) if quick else [s.strip() for s in strategies.split(",") if s.strip()]
    rounds = 2 if quick else rounds
    for bad in [s for s in robust if s not in ROBUST]:
        raise typer.BadParameter(f"unknown robust strategy {bad!r}; choose from {', '.join(ROBUST)}")

    started = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fedhosp-bench-robust-") as tmp_name:
        tmp = Path(tmp_name)
        env, uri = runner.isolated_env(tmp, BENCH_PORTS)
        everyone = tmp / "data" / "all"
        folders = write_demo(everyone, NUM_SITES, seed)
        sites = sorted(f.name for f in folders)
        if ATTACKER not in sites:
            raise typer.BadParameter(f"{ATTACKER} is not among the demo sites {sites}")
        honest = [s for s in sites if s != ATTACKER]
        honest_root = tmp / "data" / "honest"
        for site in honest:  # the very same files, so the reference sees the same patients and splits
            shutil.copytree(everyone / site, honest_root / site)
        app = _poison_app(tmp)  # every run uses it; poison = "" for the reference makes it the honest ClientApp
        plan = specs(robust)
        console.log(f"{len(plan)} runs x {rounds} rounds; sites {', '.join(sites)}; attacker {ATTACKER} ({ATTACK})")
        with runner.local_superlink(env):
            for i, spec in enumerate(plan, start=1):
                r = federated_run(spec, app, env, uri, {False: everyone, True: honest_root}, rounds, seed, i)
                results.append(r)
                state = f"[red]{r.status}[/] {r.error}" if not r.ok else (
                    f"honest mean C {_f(r.honest_mean(honest))}" + (f" [yellow]({r.error})[/]" if r.error else ""))
                console.log(f"[{i}/{len(plan)}] {spec.label}: {r.run_seconds:.0f} s, {state}")
        leftovers = processes_left(str(tmp))

    reference_run = next((r for r in results if r.spec.key == "reference"), None)
    reference = reference_run.honest_mean(honest) if reference_run else float("nan")
    console.print()
    console.print(cindex_table(results, honest, rounds, reference))
    console.print()
    console.print(runs_table(results, rounds, reference_run))
    on = next((r for r in results if r.spec.key == "fedavg-on"), None)
    off = next((r for r in results if r.spec.key == "fedavg-off" and r.round_ms), None)
    if on and on.round_ms:
        console.print()
        console.print(validation_table(on, off))
    console.print()
    print(key_figures(results, honest, rounds, seed, reference, reference_run))
    print(f"processes left behind: {len(leftovers)}" + "".join(f"\n  {p}" for p in leftovers))
    print(f"nodes: {hardware.describe()} (oncology models train on the CPU)")
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s)")
    unexpected = [r for r in results if not r.ok and r.spec.strategy not in EXPECTED_TO_FAIL]
    if unexpected or leftovers or not (on and on.round_ms) or math.isnan(reference):
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
