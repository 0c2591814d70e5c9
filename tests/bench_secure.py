"""Benchmark: what secure aggregation (SecAgg+) costs in round wall time and bytes, and how far it moves the model.

For the oncology survival endpoint (demo cohorts, linear Cox) and radiology
(the demo knee DICOM, small-cnn, KL grade), each pair of rows is two real Flower
simulations through ``server.runner`` with the same sites, seed and rounds: plain
FedAvg, then ``secure-aggregation = true``. Per task and mode it prints, from the
coordinator's ledger (``$FEDHOSP_HOME/ledgers/run-<id>.jsonl``):

- the median round wall time (``round-end`` ``duration_s``: training, aggregation
  and the federated evaluation), and its ratio to the plain run;
- the mean bytes each site uploaded per round (``update`` entries'
  ``update_bytes``): in a plain run the weights it sent, under secure aggregation
  the replies of all four protocol stages (setup, share keys, masked vectors,
  unmask) as the coordinator received them;
- the max |difference| between the secure and the plain final model's
  floating-point arrays (checkpoints ``$FEDHOSP_HOME/checkpoints/run-<id>.npz``;
  integer buffers such as BatchNorm's ``num_batches_tracked`` are not aggregated
  under secure aggregation and are left out), next to the bound on one round's
  quantisation error, ``n * quantisation_step / sum(num_examples / max num_examples)``
  (tests/test_secure_aggregation.py). After the first round the two runs train
  from slightly different global models and local training can amplify that
  (the CNN's does), so the final difference is not bounded by it; the same
  difference after one round (two more one-round runs per task, ``--no-first-round``
  skips them) is the figure the bound is for. Flower's SecAgg+ quantises with
  stochastic rounding, which the node seeds by the run's seed, the round and the
  site (client/secure_update.py), so secure runs repeat as plain ones do;
- the largest and the median L2 norm of the sites' updates before masking (the
  sites' own ledgers, ``collect_masked_vectors`` stage) against
  ``secure-update-norm``, and how many were scaled down to it (``update_scale < 1``);
- the federated evaluation metric of each run (c_index for survival, the
  radiology target's primary metric, ``models.metrics.PRIMARY``).

Not a pytest test; ``make bench-secure`` or ``.venv/bin/python tests/bench_secure.py --rounds 3``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from models.ledger import read_records
from models.metrics import PRIMARY
from server import checkpoint as ckpt
from server import runner
from server.settings import RunSettings
from server.summary import find_summary
from bench_federation import bench_superlink, task_demo  # a sibling: the benchmarks run as scripts

APP_DIR = Path(__file__).resolve().parent.parent
BENCH_PORTS = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39891", "FLWR_LOCAL_CONTROL_API_PORT": "39893"}
MODES = ("plain", "secure")
TASK_CONFIG = {
    "oncology": {"task": "oncology", "endpoint": "survival", "model": "linear"},
    "radiology": {"task": "radiology", "target": "kl-grade", "model": "small-cnn"},
}
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200, log_path=False)


def _data(record: dict) -> dict:
    return record.get("data") or {}


def ledger_figures(home: Path, run_id: int) -> dict:
    """Round wall times, bytes per site and round, and each secure round's quantisation bound, from the ledger."""
    records = read_records(home / "ledgers" / f"run-{run_id}.jsonl")
    durations = [float(_data(r)["duration_s"]) for r in records if r["event"] == "round-end"]
    updates = [_data(r) for r in records if r["event"] == "update"]
    sent = [float(u["update_bytes"] if "update_bytes" in u else (u.get("metrics") or {}).get("update_bytes", "nan"))
            for u in updates]
    bounds, steps, left_out = [], [], 0
    for record in records:
        if record["event"] not in ("aggregation", "round-skipped"):
            continue
        secure = _data(record).get("secure_aggregation")
        if not secure:
            continue
        left_out += len(secure.get("left_out") or {})
        step = float(secure["quantisation_step"])
        examples = [float(u["num_examples"]) for u in updates
                    if u["round"] == _data(record)["round"] and u["site"] in secure["in_sum"]]
        if examples:
            steps.append(step)
            bounds.append(len(examples) * step / sum(e / max(examples) for e in examples))
    return {"durations": durations, "bytes": sent, "bound": max(bounds) if bounds else None,
            "step": max(steps) if steps else None, "left_out": left_out,
            "skipped": sum(1 for r in records if r["event"] == "round-skipped")}


def site_updates(home: Path, run_id: int) -> list[dict]:
    """What each site masked per secure round: its update's norm and scale (the sites' own ledgers)."""
    out = []
    for path in sorted((home / "site-ledgers").glob(f"*/run-{run_id}.jsonl")):
        for record in read_records(path):
            sent = _data(record).get("sent") or {}
            if record["event"] == "train" and sent.get("secure_aggregation") == "collect_masked_vectors":
                out.append({"site": path.parent.name, "norm": float(sent["update_norm"]),
                            "scale": float(sent["update_scale"]), "bound": float(sent.get("update_bound", "nan"))})
    return out


def final_arrays(home: Path, run_id: int) -> dict[str, np.ndarray]:
    return ckpt.load(home / "checkpoints" / f"run-{run_id}.npz").arrays


def run(env: dict, uri: str, overrides: dict, sites: int) -> dict:
    started = time.perf_counter()
    outcome = runner.flwr_run(APP_DIR, env, overrides, sites)
    seconds = time.perf_counter() - started
    summary = find_summary(uri, outcome.run_id) if outcome.ok else None
    if summary is None:
        console.print(f"[red]run {outcome.run_id} ended {outcome.status}[/]; last lines of its log:")
        console.out("\n".join(outcome.log.strip().splitlines()[-25:]), highlight=False)
        reason = outcome.reason or (outcome.log.strip().splitlines() or ["no log"])[-1]
        return {"error": f"{outcome.status}: {reason}", "seconds": seconds}
    home = Path(env["FEDHOSP_HOME"])
    metric = PRIMARY[summary["outcome"]]
    return {"run_id": outcome.run_id, "seconds": seconds, "metric": metric,
            "value": summary["aggregate"].get(metric, float("nan")), "rounds": summary["rounds"],
            **ledger_figures(home, outcome.run_id), "sites": site_updates(home, outcome.run_id),
            "arrays": final_arrays(home, outcome.run_id)}


def model_difference(secure: dict[str, np.ndarray], plain: dict[str, np.ndarray]) -> tuple[float, list[str]]:
    """Max |secure - plain| over the floating-point arrays; the integer arrays left out."""
    floats = [k for k, a in plain.items() if np.issubdtype(a.dtype, np.floating)]
    skipped = sorted(set(plain) - set(floats))
    error = max(float(np.abs(secure[k].astype(np.float64) - plain[k].astype(np.float64)).max()) for k in floats)
    return error, skipped


def _ratio(value: float, base: float) -> str:
    return f"×{value / base:.2f}" if base else "–"


def _bytes(value: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def main(
    rounds: int = typer.Option(3, help="Federated rounds per run."),
    sites: int = typer.Option(5, help="Simulated sites (secure aggregation needs at least 3)."),
    seed: int = typer.Option(42, help="Demo data, splits and training seed."),
    tasks: str = typer.Option("oncology,radiology", help="Comma list: oncology (survival), radiology (kl-grade)."),
    first_round: bool = typer.Option(True, help="Also compare the two modes' models after one round (2 more runs)."),
) -> None:
    """Plain FedAvg against SecAgg+, side by side, for each task."""
    started = time.perf_counter()
    results: dict[tuple[str, str], dict] = {}
    norm_bound = {task: RunSettings.from_run_config(config).secure_update_norm for task, config in TASK_CONFIG.items()}
    with bench_superlink("fedhosp-bench-secure-", BENCH_PORTS) as (tmp, env, uri):
        for task in [t.strip() for t in tasks.split(",") if t.strip()]:
            root = task_demo(task, tmp / task, sites, seed)
            base = {**TASK_CONFIG[task], "data-root": str(root), "num-server-rounds": rounds, "seed": seed,
                    "mlflow-uri": uri, "mlflow-experiment": f"bench-secure-{task}"}
            for mode in MODES:
                overrides = {**base, **({"secure-aggregation": True} if mode == "secure" else {})}
                result = run(env, uri, overrides, sites)
                shown = {k: v for k, v in result.items() if k not in ("arrays", "sites", "durations", "bytes")}
                console.log(f"{task} {mode}: {shown}")
                results[(task, mode)] = result
            if first_round and rounds > 1:
                for mode in MODES:
                    overrides = {**base, "num-server-rounds": 1,
                                 **({"secure-aggregation": True} if mode == "secure" else {})}
                    result = run(env, uri, overrides, sites)
                    done = result.get("error") or f"{result['seconds']:.0f} s"
                    console.log(f"{task} {mode}, one round: {done}")
                    results[(task, f"{mode}-1")] = result
            elif first_round:
                results[(task, "plain-1")], results[(task, "secure-1")] = results[(task, "plain")], \
                    results[(task, "secure")]
    report(results, sites=sites, rounds=rounds, seed=seed, first_round=first_round, norm_bound=norm_bound)
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores)")


def report(results: dict[tuple[str, str], dict], *, sites: int, rounds: int, seed: int, first_round: bool,
           norm_bound: dict[str, float]) -> None:
    """The table and its notes; ``results`` by (task, mode), mode ``plain``/``secure`` and their one-round runs
    ``plain-1``/``secure-1``."""
    table = Table(title=f"secure aggregation (SecAgg+) vs plain FedAvg: {sites} demo sites, {rounds} rounds, "
                        f"seed {seed}, secure-update-norm " + ", ".join(f"{t} {b:g}" for t, b in norm_bound.items()))
    for column in ("task", "mode", "median round s", "bytes/site/round", "max |Δ| final",
                   "max |Δ| round 1", "bound/round", "update norm max/median", "scaled", "federated metric", "run s"):
        table.add_column(column, justify="left" if column in ("task", "mode") else "right")
    skipped_arrays: set[str] = set()
    for task in dict.fromkeys(t for t, m in results if m in MODES):
        label = "oncology survival, linear" if task == "oncology" else "radiology KL grade, small-cnn"
        plain = results.get((task, "plain"), {})
        for mode in MODES:
            result = results.get((task, mode), {})
            if "error" in result or not result:
                table.add_row(label, mode, result.get("error", "not run"), "", "", "", "", "", "", "",
                              f"{result.get('seconds', 0):.0f}")
                continue
            wall = statistics.median(result["durations"])
            sent = float(np.mean(result["bytes"]))
            both = bool(plain) and "error" not in plain and mode == "secure"
            difference, first, bound, norms, scaled = "–", "–", "–", "–", "–"
            if mode == "secure":
                if both:
                    error, skipped = model_difference(result["arrays"], plain["arrays"])
                    skipped_arrays.update(skipped)
                    difference = f"{error:.2e}"
                one = [results.get((task, f"{m}-1"), {}) for m in MODES]
                if all(r and "error" not in r for r in one):
                    error, skipped = model_difference(one[1]["arrays"], one[0]["arrays"])
                    skipped_arrays.update(skipped)
                    first = f"{error:.2e}"
                elif first_round:
                    first = "failed"
                bound = f"{result['bound']:.2e}" if result["bound"] is not None else "–"
                values = [s["norm"] for s in result["sites"]]
                if values:
                    norms = f"{max(values):.3g}/{statistics.median(values):.3g}"
                    scaled = f"{sum(1 for s in result['sites'] if s['scale'] < 1)} of {len(values)}"
            table.add_row(label, mode,
                          f"{wall:.2f}" + (f" {_ratio(wall, statistics.median(plain['durations']))}" if both else ""),
                          _bytes(sent) + (f" {_ratio(sent, float(np.mean(plain['bytes'])))}" if both else ""),
                          difference, first, bound, norms, scaled, f"{result['metric']} {result['value']:.3f}",
                          f"{result['seconds']:.0f}")
    console.print(table)
    print("×: secure / plain. bytes/site/round: plain, the weights each site sent; secure, all four protocol stages' "
          "replies (setup, share keys, masked vectors, unmask) as the coordinator received them (the masked vector "
          "holds 64-bit integers).")
    print("max |Δ|: secure vs plain, over the floating-point arrays of the final models (round 1: of one-round runs)"
          + ("; integer buffers left out (not aggregated under secure aggregation): "
             + ", ".join(sorted(skipped_arrays)) if skipped_arrays else "; the models have no integer buffers")
          + ". bound/round: one round's quantisation error, n * step / sum(examples / max examples); later rounds "
          "train from slightly different global models, so the final difference is not bounded by it.")
    print("update norm: L2 norm of each site's update before masking (sites' ledgers); scaled: updates with "
          "update_scale < 1 (norm above the task's secure-update-norm, in the title).")
    for (task, mode), result in results.items():
        if mode in MODES and (result.get("left_out") or result.get("skipped")):
            print(f"note: {task} {mode}: {result['left_out']} site-round(s) left out of the secure sum, "
                  f"{result['skipped']} round(s) skipped")
    print("SecAgg+ quantises with stochastic rounding, seeded on each node by the run's seed, the round and the "
          "site: the secure rows repeat like the plain ones.")


if __name__ == "__main__":
    typer.run(main)
