"""Benchmark: what differential privacy costs in accuracy, ε ∈ {∞, 8, 3, 1}, on the demo data.

For the oncology response endpoint (demo cohorts) and radiology (the demo knee
DICOM), each row is a real Flower simulation through ``server.runner`` with the
same seed, rounds and sites; only the noise changes. For a target ε the noise
multiplier is Opacus' own ``get_noise_multiplier`` (RDP accountant) for the site
with the largest sample rate (the smallest cohort), so every site ends the run
at or under the target; the table prints the ε each run actually reached (the
largest over the sites, as the nodes reported it), the noise used and the
federated AUC on the sites' test splits.

Not a pytest test; ``make bench-privacy`` or ``.venv/bin/python tests/bench_privacy.py --rounds 5``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from client.data.tabular import load_cohort
from client.privacy import sample_plan
from server import runner
from server.settings import TASK_DEFAULTS
from server.summary import find_summary
from bench_federation import bench_superlink, task_demo  # a sibling: the benchmarks run as scripts

APP_DIR = Path(__file__).resolve().parent.parent
BENCH_PORTS = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39591", "FLWR_LOCAL_CONTROL_API_PORT": "39593"}
TARGETS = (math.inf, 8.0, 3.0, 1.0)
DELTA = 1e-5
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200, log_path=False)


def noise_for(target: float, units: list[int], batch: int, epochs: int, rounds: int) -> float:
    """Opacus' noise multiplier that keeps the site with the largest sample rate at ``target`` after the run."""
    from opacus.accountants.utils import get_noise_multiplier

    rate, steps = sample_plan(min(units), batch, epochs, 0)
    return float(get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=rate,
                                      steps=steps * rounds, accountant="rdp"))


def units_of(task: str, root: Path, seed: int, image_size: int) -> list[int]:
    """The rows DP-SGD samples at each site: patients (one image each per round for radiology)."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if task == "oncology":
        return [len(load_cohort(f, f.name, "response", seed).train) for f in folders]
    from client.data.dicom import load_radiology_site

    return [len(np.unique(load_radiology_site(f, f.name, image_size=image_size, seed=seed).train.patients))
            for f in folders]


def run(env: dict, uri: str, overrides: dict, sites: int) -> dict:
    started = time.perf_counter()
    outcome = runner.flwr_run(APP_DIR, env, overrides, sites)
    summary = find_summary(uri, outcome.run_id) if outcome.ok else None
    if summary is None:
        reason = outcome.reason or (outcome.log.strip().splitlines() or ["no log"])[-1]
        return {"error": f"{outcome.status}: {reason}", "seconds": time.perf_counter() - started}
    epsilons = [p["epsilon"] for p in (summary.get("privacy") or {}).values()]
    return {"auc": summary["aggregate"].get("auc", float("nan")), "epsilon": max(epsilons) if epsilons else math.inf,
            "seconds": time.perf_counter() - started}


def main(
    rounds: int = typer.Option(5, help="Federated rounds per run."),
    sites: int = typer.Option(3, help="Simulated sites."),
    seed: int = typer.Option(42, help="Demo data, splits and training seed."),
    tasks: str = typer.Option("oncology,radiology", help="Comma list: oncology (response), radiology (kl-grade)."),
    max_grad_norm: float = typer.Option(1.0, help="dp-max-grad-norm for every dp run."),
) -> None:
    """ε against AUC, side by side, for each task."""
    started = time.perf_counter()
    rows: list[tuple] = []
    with bench_superlink("fedhosp-bench-dp-", BENCH_PORTS) as (tmp, env, uri):
        for task in [t.strip() for t in tasks.split(",") if t.strip()]:
            root = task_demo(task, tmp / task, sites, seed)
            base = {"task": task, "data-root": str(root), "num-server-rounds": rounds, "seed": seed,
                    "mlflow-uri": uri, "mlflow-experiment": f"bench-dp-{task}", "local-epochs": 2,
                    **({"endpoint": "response"} if task == "oncology" else {"target": "kl-grade"})}
            batch = TASK_DEFAULTS[task]["batch_size"]
            units = units_of(task, root, seed, 64)
            for target in TARGETS:
                overrides = dict(base)
                noise = 0.0
                if math.isfinite(target):
                    noise = noise_for(target, units, batch, 2, rounds)
                    overrides.update({"dp": True, "dp-noise-multiplier": noise, "dp-max-grad-norm": max_grad_norm,
                                      "dp-delta": DELTA})
                result = run(env, uri, overrides, sites)
                console.log(f"{task} target ε {target:g}: {result}")
                rows.append((task, target, noise, min(units), result))
    table = Table(title=f"privacy vs utility: {sites} demo sites, {rounds} rounds × 2 local epochs, seed {seed}, "
                        f"δ = {DELTA:g}, clip {max_grad_norm:g}")
    for column in ("task", "target ε", "noise multiplier", "smallest site (patients)", "ε reached (max over sites)",
                   "federated AUC", "run s"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, target, noise, smallest, result in rows:
        label = "oncology response" if task == "oncology" else "radiology KL grade"
        table.add_row(label, "∞ (no dp)" if math.isinf(target) else f"{target:g}", f"{noise:.3f}" if noise else "–",
                      str(smallest), "∞" if math.isinf(result.get("epsilon", math.inf)) else f"{result['epsilon']:.2f}",
                      result.get("error") or f"{result['auc']:.3f}", f"{result['seconds']:.0f}")
    console.print(table)
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores)")


if __name__ == "__main__":
    typer.run(main)
