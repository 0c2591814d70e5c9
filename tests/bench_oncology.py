"""Benchmark: does federated Cox training get close to pooling the data, and what does Flower cost?

For each data set (synthetic demo regions; the public GBSG2 breast-cancer study
split into sites by tumour grade) it prints the C-index on every site's test
split (``load_cohort`` with the same seed, so all methods see the same
patients) for:

* pooled: one linear Cox model fitted centrally on all training splits, with a
  site-stratified partial likelihood, i.e. the model a federation tries to reach;
* site alone: the same model fitted on one site's training split only, i.e.
  what a hospital gets without the federation (and how it transfers);
* each Flower strategy: a real simulation through ``server.runner`` (one local
  SuperLink for all runs), read back from MLflow like ``fedhosp run`` does,
  together with the framework overhead: mean round wall time divided by the
  sites' pure local compute (``train_seconds + eval_seconds``) per round, and
  the fixed cost of a run outside its rounds (start-up, site check, model logging).

Not a pytest test; ``make bench ARGS="--quick"`` or
``.venv/bin/python tests/bench_oncology.py --rounds 10``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import typer
from rich.columns import Columns
from rich.console import Console
from rich.table import Table

from client import hardware
from client.data.demo import write_demo
from client.data.tabular import SiteCohort, Split, load_cohort
from client.train import evaluate_tabular
from models.oncology import cox_partial_nll
from models.builders import build_model
from server import runner
from server.settings import STRATEGIES
from server.summary import find_summary

APP_DIR = Path(__file__).resolve().parent.parent
# Not Flower's defaults (39091/39093), so the benchmark never meets the tests' SuperLink.
BENCH_PORTS = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39291", "FLWR_LOCAL_CONTROL_API_PORT": "39293"}
QUICK_STRATEGIES = ("fedavg", "fedadam", "newton")

# Piped output (make bench > file) gets room for two tables side by side; a terminal or $COLUMNS wins.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200, log_path=False)


# ---------------------------------------------------------------- site folders

def demo_sites(root: Path, seed: int) -> list[Path]:
    """The five synthetic Danish regions the app simulates by default."""
    return write_demo(root, 5, seed)


def gbsg2_sites(root: Path, seed: int) -> list[Path]:
    """GBSG2 (lifelines, 686 patients) as one site folder per tumour grade I/II/III.

    Grade is a strong prognostic factor, so the split gives sites with different
    case mix and size (81/444/161), a real non-IID federation. The grade column
    is dropped (constant within a site); categorical columns become 0/1.
    """
    from lifelines.datasets import load_gbsg2

    data = load_gbsg2()
    cohort = pd.DataFrame({
        "age": data["age"], "tsize": data["tsize"], "pnodes": data["pnodes"],
        "progrec": data["progrec"], "estrec": data["estrec"],
        "horTh": (data["horTh"] == "yes").astype(int),
        "menostat": (data["menostat"] == "Post").astype(int),
        "time": data["time"], "event": data["cens"],
    })
    folders = []
    for grade, part in cohort.groupby(data["tgrade"].astype(str)):
        folder = root / f"grade-{grade}"
        folder.mkdir(parents=True, exist_ok=True)
        part.to_csv(folder / "cohort.csv", index=False)
        folders.append(folder)
    return folders


DATASETS: dict[str, tuple[str, Callable[[Path, int], list[Path]]]] = {
    "demo": ("demo (5 synthetic regions)", demo_sites),
    "gbsg2": ("GBSG2 (3 sites by tumour grade)", gbsg2_sites),
}


# ---------------------------------------------------------------- central fits

def fit_cox(splits: list[Split], num_features: int) -> torch.nn.Module:
    """Full-batch L-BFGS on the site-stratified Cox loss (sum over sites' own risk sets).

    Stratifying keeps each site's baseline hazard separate, as the federation's
    per-site losses do; fitting in float64 to convergence gives the reference
    the federated models are compared with.
    """
    model = build_model("oncology", "linear", endpoint="survival", num_features=num_features).double()
    data = [(torch.from_numpy(s.x).double(), torch.from_numpy(s.time), torch.from_numpy(s.event)) for s in splits]
    n_events = sum(int(s.event.sum()) for s in splits)
    optimiser = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = sum(cox_partial_nll(model(x), t, e, reduction="sum") for x, t, e in data) / n_events
        loss.backward()
        return loss

    optimiser.step(closure)
    return model.float()


def c_index(model: torch.nn.Module, split: Split) -> float:
    """Harrell's C on one split, computed exactly as the sites' evaluate does."""
    return evaluate_tabular(model, split, "survival")["c_index"]


def pooled_fit(cohorts: dict[str, SiteCohort]) -> dict[str, float]:
    """C-index per site of the centrally pooled (stratified) model."""
    model = fit_cox([c.train for c in cohorts.values()], len(next(iter(cohorts.values())).features))
    return {name: c_index(model, c.test) for name, c in cohorts.items()}


def local_fits(cohorts: dict[str, SiteCohort]) -> dict[str, dict[str, float]]:
    """trained-at -> evaluated-at -> C-index: each site alone, tested everywhere."""
    out = {}
    for name, cohort in cohorts.items():
        model = fit_cox([cohort.train], len(cohort.features))
        out[name] = {other: c_index(model, c.test) for other, c in cohorts.items()}
    return out


# ---------------------------------------------------------------- federated runs

@dataclass
class FedResult:
    strategy: str
    c_index: dict[str, float]
    aggregate: float
    round_wall: list[float]  # federation/round_duration_s per round
    compute_sum: list[float]  # sum over sites of train_seconds + eval_seconds per round
    compute_max: list[float]  # the slowest site's train_seconds + eval_seconds per round
    run_seconds: float  # flwr run submitted -> final status (incl. start-up and model logging)
    error: str = ""


def federated_run(env: dict[str, str], uri: str, root: Path, test_sizes: dict[str, int], strategy: str,
                  rounds: int, seed: int) -> FedResult:
    """One real Flower simulation via ``server.runner``; metrics read back from MLflow.

    ``test_sizes`` (site -> test patients in the benchmark's own split) guards the
    comparison: the nodes must have evaluated on the very same test splits.
    """
    from mlflow.tracking import MlflowClient

    sites = list(test_sizes)
    overrides = {"task": "oncology", "endpoint": "survival", "model": "linear", "strategy": strategy,
                 "data-root": str(root), "num-server-rounds": rounds, "seed": seed,
                 "mlflow-uri": uri, "mlflow-experiment": "bench"}
    started = time.perf_counter()
    outcome = runner.flwr_run(APP_DIR, env, overrides, len(sites))
    seconds = time.perf_counter() - started
    summary = find_summary(uri, outcome.run_id) if outcome.ok else None
    if summary is None:
        console.print(f"[red]{strategy}: run {outcome.run_id} ended {outcome.status}[/]; last lines of its log:")
        console.out("\n".join(outcome.log.strip().splitlines()[-25:]), highlight=False)
        reason = outcome.reason or (outcome.log.strip().splitlines() or ["no log"])[-1]
        return FedResult(strategy, {}, float("nan"), [], [], [], seconds, f"{outcome.status}: {reason}")
    seen = {s: summary["sites"].get(s, {}).get("num_test") for s in sites}
    if seen != test_sizes:
        return FedResult(strategy, {}, float("nan"), [], [], [], seconds, f"nodes' test splits differ: {seen}")

    client = MlflowClient(uri)

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], key)}

    wall = history("federation/round_duration_s")
    per_site = []  # site -> round -> train_seconds + eval_seconds
    for s in sites:
        train, evaluated = history(f"{s}/train_seconds"), history(f"{s}/eval_seconds")
        per_site.append({k: train.get(k, 0.0) + evaluated.get(k, 0.0) for k in wall})
    steps = sorted(wall)
    return FedResult(
        strategy,
        {s: summary["sites"][s]["c_index"] for s in sites},
        summary["aggregate"].get("c_index", float("nan")),
        [wall[k] for k in steps],
        [sum(site[k] for site in per_site) for k in steps],
        [max(site[k] for site in per_site) for k in steps],
        seconds,
    )


# ---------------------------------------------------------------- tables

@dataclass
class DatasetResult:
    key: str
    title: str
    cohorts: dict[str, SiteCohort]
    pooled: dict[str, float]
    alone: dict[str, dict[str, float]]
    federated: list[FedResult]
    rounds: int

    @property
    def sites(self) -> list[str]:
        return list(self.cohorts)

    @property
    def test_sizes(self) -> dict[str, int]:
        return {s: len(c.test) for s, c in self.cohorts.items()}

    def mean(self, per_site: dict[str, float]) -> float:
        return statistics.fmean(per_site[s] for s in self.sites)

    def weighted(self, per_site: dict[str, float]) -> float:
        """Weighted by test patients, as Flower aggregates the sites' c_index."""
        n = self.test_sizes
        return sum(per_site[s] * n[s] for s in self.sites) / sum(n.values())

    def own_site(self) -> dict[str, float]:
        return {s: self.alone[s][s] for s in self.sites}


def _f(value: float, digits: int = 3) -> str:
    return "–" if value != value else f"{value:.{digits}f}"


def cindex_table(r: DatasetResult) -> Table:
    """Methods (rows) side by side on the same sites' test splits (columns)."""
    table = Table(title=f"C-index, test splits — {r.title}", title_justify="left")
    table.add_column("method")
    for s in r.sites:
        table.add_column(f"{s}\nn={len(r.cohorts[s].test)}", justify="right")
    table.add_column("mean", justify="right", style="bold")
    table.add_column("weighted", justify="right")
    rows = [("pooled (central)", r.pooled, r.weighted(r.pooled)),
            ("site alone (own)", r.own_site(), r.weighted(r.own_site()))]
    rows += [(f"{f.strategy} ({r.rounds} r)", f.c_index, f.aggregate) for f in r.federated if not f.error]
    for label, per_site, weighted in rows:
        table.add_row(label, *(_f(per_site[s]) for s in r.sites), _f(r.mean(per_site)), _f(weighted))
    for f in r.federated:
        if f.error:
            table.add_row(f"{f.strategy} ({r.rounds} r)", "[red]failed[/]", *([""] * (len(r.sites) + 1)))
    return table


def transfer_table(r: DatasetResult) -> Table:
    """How a single site's model does at the other sites (own site in bold)."""
    table = Table(title=f"Site alone, trained at row, tested at column — {r.key}", title_justify="left")
    table.add_column("trained at")
    for s in r.sites:
        table.add_column(s, justify="right")
    table.add_column("mean", justify="right", style="bold")
    for trained in r.sites:
        row = r.alone[trained]
        table.add_row(trained, *(f"[bold]{_f(row[s])}[/]" if s == trained else _f(row[s]) for s in r.sites),
                      _f(r.mean(row)))
    return table


def overhead(f: FedResult) -> tuple[float, float]:
    """Mean round wall time over mean local compute: summed over sites, and of the slowest site."""
    wall = statistics.fmean(f.round_wall)
    return wall / statistics.fmean(f.compute_sum), wall / statistics.fmean(f.compute_max)


def timing_table(r: DatasetResult) -> Table:
    """Flower's cost per round against the sites' pure compute (2 cores: clients mostly run in turn)."""
    table = Table(title=f"Round time vs local compute — {r.key}", title_justify="left")
    for name in ("strategy", "round wall s", "compute s\nΣ sites", "compute s\nmax site",
                 "overhead\n× Σ", "overhead\n× max", "run wall s", "outside\nrounds s"):
        table.add_column(name, justify="left" if name == "strategy" else "right")
    for f in r.federated:
        if f.error:
            table.add_row(f.strategy, "[red]failed[/]", *([""] * 6))
            continue
        ratio_sum, ratio_max = overhead(f)
        table.add_row(f.strategy, _f(statistics.fmean(f.round_wall), 2), _f(statistics.fmean(f.compute_sum), 3),
                      _f(statistics.fmean(f.compute_max), 3), _f(ratio_sum, 1), _f(ratio_max, 1),
                      _f(f.run_seconds, 1), _f(f.run_seconds - sum(f.round_wall), 1))
    return table


def key_figures(results: list[DatasetResult], seed: int) -> str:
    """Plain text, no markup, to paste into a note."""
    lines = [f"Key figures (linear Cox, C-index = mean over sites' test splits; seed {seed})"]
    for r in results:
        patients = sum(len(c.train) + len(c.test) for c in r.cohorts.values())
        lines.append(f"{r.title}, {patients} patients, {r.rounds} rounds:")
        lines.append(f"  pooled {_f(r.mean(r.pooled))} | site alone {_f(r.mean(r.own_site()))} "
                     f"(worst {min(r.own_site().values()):.3f})")
        for f in r.federated:
            if f.error:
                lines.append(f"  {f.strategy:<10} FAILED: {f.error}")
                continue
            ratio_sum, ratio_max = overhead(f)
            lines.append(f"  {f.strategy:<10} {_f(r.mean(f.c_index))} (weighted {_f(f.aggregate)}); "
                         f"{len(f.round_wall)} rounds; "
                         f"round {statistics.fmean(f.round_wall):.2f} s vs compute "
                         f"{statistics.fmean(f.compute_sum) * 1000:.0f} ms → overhead ×{ratio_sum:.1f} "
                         f"(×{ratio_max:.1f} vs slowest site); run {f.run_seconds:.0f} s, "
                         f"{f.run_seconds - sum(f.round_wall):.0f} s of it outside rounds")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main(
    rounds: int = typer.Option(10, help="Federated rounds per run."),
    seed: int = typer.Option(42, help="Data seed (demo cohorts, train/test splits) and training seed."),
    strategies: str = typer.Option(",".join(STRATEGIES), help="Comma list of Flower strategies."),
    datasets: str = typer.Option("demo,gbsg2", help=f"Comma list of {', '.join(DATASETS)}."),
    quick: bool = typer.Option(False, "--quick", help=f"3 rounds, {'+'.join(QUICK_STRATEGIES)} only."),
) -> None:
    """Pooled vs site-alone vs federated Cox models on the demo regions and GBSG2."""
    chosen = list(QUICK_STRATEGIES) if quick else [s.strip() for s in strategies.split(",") if s.strip()]
    rounds = 3 if quick else rounds
    names = [d.strip() for d in datasets.split(",") if d.strip()]
    for bad in [s for s in chosen if s not in STRATEGIES] + [d for d in names if d not in DATASETS]:
        raise typer.BadParameter(f"unknown strategy or data set {bad!r}")

    started = time.perf_counter()
    results: list[DatasetResult] = []
    with tempfile.TemporaryDirectory(prefix="fedhosp-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env, uri = runner.isolated_env(tmp, BENCH_PORTS)
        for key in names:  # central baselines first: seconds, and they validate the site folders
            title, write = DATASETS[key]
            root = tmp / "data" / key
            folders = write(root, seed)
            cohorts = {f.name: load_cohort(f, f.name, "survival", seed) for f in sorted(folders)}
            results.append(DatasetResult(key, title, cohorts, pooled_fit(cohorts), local_fits(cohorts), [], rounds))
            console.log(f"{key}: central fits done ({len(cohorts)} sites)")
        if chosen:
            with runner.local_superlink(env):
                for r in results:
                    for strategy in chosen:
                        f = federated_run(env, uri, tmp / "data" / r.key, r.test_sizes, strategy, rounds, seed)
                        r.federated.append(f)
                        state = f"[red]FAILED[/] {f.error}" if f.error else f"mean C {r.mean(f.c_index):.3f}"
                        console.log(f"{r.key}/{strategy}: {rounds} rounds in {f.run_seconds:.0f} s, {state}")

    console.print()
    for build in (cindex_table, transfer_table, timing_table):
        tables = [build(r) for r in results if build is not timing_table or r.federated]
        if tables:
            console.print(Columns(tables, padding=(1, 4)))
    console.print()
    print(key_figures(results, seed))
    print(f"nodes: {hardware.describe()} (oncology models train on the CPU)")
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s)")
    if any(f.error for r in results for f in r.federated):
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
