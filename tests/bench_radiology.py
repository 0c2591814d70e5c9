"""Benchmark: DICOM decoding, federated vs pooled knee-grading CNNs, and what Flower costs per round.

On the radiology demo (5 synthetic regions, default sizes, KL grade, 64x64
images, small-cnn) it prints:

* decoding: images per second through ``load_radiology_site`` for every site,
  cold (empty cache) and warm (same cache), each in a fresh subprocess, with
  the pixel decodes counted (pydicom ``pixel_array`` reads and ``RadiologySite.decoded``);
  the DICOM files were just written, so "cold" means the fedhosp cache, not the
  OS page cache. The cache lives where the nodes look (``$FEDHOSP_HOME/cache``),
  so the federated runs below start warm and round 1 pays no decoding;
* AUC and quadratic weighted kappa on every site's test split (the reader's
  seeded patient split, the one the nodes use) for:
  - pooled: one small-cnn trained centrally on all training splits,
  - site alone: the same model trained on one site's training split only,
  - each Flower strategy: a real simulation through ``server.runner`` (one
    local SuperLink for all runs), read back from MLflow.
  The central models get rounds x local-epochs epochs with the app's own
  lr / batch size (run config + ``TASK_DEFAULTS``), one torch thread, like a node;
* round wall time (``federation/round_duration_s``) against the sites' pure
  compute (``train_seconds + eval_seconds``), summed and of the slowest site;
* bytes each site sends per round (``<site>/update_bytes``) against the model's
  raw float32 size (parameters x 4 bytes).

Not a pytest test; ``make bench-radiology ARGS="--quick"`` or
``.venv/bin/python tests/bench_radiology.py --rounds 5``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from client import hardware
from client.data.dicom import ImageSplit, RadiologySite, load_radiology_site
from client.data.radiology_demo import write_radiology_demo
from client.train import TrainSettings, evaluate_images, train_images
from models.builders import build_model
from server import runner
from server.settings import STRATEGIES, RunSettings
from server.summary import find_summary

APP_DIR = Path(__file__).resolve().parent.parent
# Neither Flower's defaults (39091/39093) nor the oncology benchmark's (39291/39293).
BENCH_PORTS = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39691", "FLWR_LOCAL_CONTROL_API_PORT": "39693"}
DEFAULT_STRATEGIES = ("fedavg", "fedprox")
QUICK_STRATEGIES = ("fedavg",)
N_SITES, TARGET, IMAGE_SIZE, MODEL = 5, "kl-grade", 64, "small-cnn"
METRICS = ("auc", "kappa")

console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200, log_path=False)


def app_settings(seed: int) -> RunSettings:
    """The app's run config (pyproject) for radiology: the lr, batch size and local epochs the nodes use."""
    config = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return RunSettings.from_run_config({**config, "task": "radiology", "target": TARGET, "model": MODEL,
                                        "image-size": IMAGE_SIZE, "seed": seed})


# ---------------------------------------------------------------- decoding

DECODE_WORKER = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)  # as on a node
from pydicom.dataset import Dataset
from client.data import dicom
reads = [0]
_pixel_array = Dataset.pixel_array
def _counted(ds):  # every pixel decode reads pixel_array once
    reads[0] += 1
    return _pixel_array.fget(ds)
Dataset.pixel_array = property(_counted)
root, cache, size, seed, target = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
folders = sorted(p for p in root.iterdir() if p.is_dir())
images = files = decoded = 0
started = time.perf_counter()
for folder in folders:
    site = dicom.load_radiology_site(folder, folder.name, image_size=size, seed=seed, target=target, cache_dir=cache)
    images += len(site.train) + len(site.test)
    files += len(site.train) + len(site.test) + sum(site.skipped.values())
    decoded += site.decoded
seconds = time.perf_counter() - started
print(json.dumps({"images": images, "files": files, "seconds": seconds, "decode_count": reads[0],
                  "site_decoded": decoded}))
"""


@dataclass
class DecodePass:
    label: str
    images: int  # usable images over all sites
    files: int  # files scanned, skipped ones included
    seconds: float  # the load_radiology_site calls only
    process_seconds: float  # the whole subprocess, imports included
    decode_count: int  # pydicom pixel_array reads in the subprocess
    site_decoded: int  # sum of RadiologySite.decoded

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def decode_pass(label: str, root: Path, cache: Path, seed: int) -> DecodePass:
    """Every site through ``load_radiology_site`` in a fresh Python process."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", DECODE_WORKER, str(root), str(cache), str(IMAGE_SIZE), str(seed),
                          TARGET], cwd=APP_DIR, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return DecodePass(label, r["images"], r["files"], r["seconds"], wall, r["decode_count"], r["site_decoded"])


# ---------------------------------------------------------------- central training

def pool(splits: list[ImageSplit]) -> ImageSplit:
    return ImageSplit(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]),
                      [v for s in splits for v in s.vendors])


def train_central(train: ImageSplit, name: str, settings: RunSettings, epochs: int) -> tuple[torch.nn.Module, float]:
    """small-cnn with the nodes' initial weights, Adam, lr and batch size, for ``epochs`` epochs in one go."""
    model = build_model("radiology", MODEL, target=TARGET, image_size=IMAGE_SIZE)
    cfg = TrainSettings(local_epochs=epochs, batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
                        device=hardware.resolve({}).device)
    started = time.perf_counter()
    train_images(model, train, cfg, 0, name)
    return model, time.perf_counter() - started


def scores(model: torch.nn.Module, split: ImageSplit) -> dict[str, float]:
    metrics = evaluate_images(model, split, TARGET, hardware.resolve({}).device)
    return {m: metrics[m] for m in METRICS}


@dataclass
class Central:
    scores: dict[str, dict[str, float]]  # site -> metric -> value (each site's test split)
    seconds: float  # training time, all models together


def pooled_fit(sites: dict[str, RadiologySite], settings: RunSettings, epochs: int) -> Central:
    model, seconds = train_central(pool([s.train for s in sites.values()]), "pooled", settings, epochs)
    return Central({name: scores(model, s.test) for name, s in sites.items()}, seconds)


def local_fits(sites: dict[str, RadiologySite], settings: RunSettings, epochs: int) -> Central:
    out, total = {}, 0.0
    for name, site in sites.items():
        model, seconds = train_central(site.train, name, settings, epochs)
        out[name] = scores(model, site.test)
        total += seconds
    return Central(out, total)


# ---------------------------------------------------------------- federated runs

@dataclass
class FedResult:
    strategy: str
    scores: dict[str, dict[str, float]]  # site -> metric -> value, final round
    aggregate: dict[str, float]  # federation/<metric>, weighted by test images
    round_wall: list[float]  # federation/round_duration_s per round
    compute_sum: list[float]  # sum over sites of train_seconds + eval_seconds per round
    compute_max: list[float]  # the slowest site's train_seconds + eval_seconds per round
    update_bytes: dict[str, list[float]]  # site -> bytes of its train reply's arrays, per round
    run_seconds: float  # flwr run submitted -> final status
    error: str = ""


def federated_run(env: dict[str, str], uri: str, root: Path, test_sizes: dict[str, int], strategy: str,
                  rounds: int, seed: int) -> FedResult:
    """One real Flower simulation via ``server.runner``; metrics read back from MLflow."""
    from mlflow.tracking import MlflowClient

    sites = list(test_sizes)
    overrides = {"task": "radiology", "target": TARGET, "model": MODEL, "image-size": IMAGE_SIZE,
                 "strategy": strategy, "data-root": str(root), "num-server-rounds": rounds, "seed": seed,
                 "mlflow-uri": uri, "mlflow-experiment": "bench-rad"}
    started = time.perf_counter()
    outcome = runner.flwr_run(APP_DIR, env, overrides, len(sites))
    seconds = time.perf_counter() - started
    failed = FedResult(strategy, {}, {}, [], [], [], {}, seconds)
    summary = find_summary(uri, outcome.run_id) if outcome.ok else None
    if summary is None:
        console.print(f"[red]{strategy}: run {outcome.run_id} ended {outcome.status}[/]; last lines of its log:")
        console.out("\n".join(outcome.log.strip().splitlines()[-25:]), highlight=False)
        reason = outcome.reason or (outcome.log.strip().splitlines() or ["no log"])[-1]
        failed.error = f"{outcome.status}: {reason}"
        return failed
    seen = {s: summary["sites"].get(s, {}).get("num_test") for s in sites}
    if seen != test_sizes:
        failed.error = f"nodes' test splits differ: {seen}"
        return failed

    client = MlflowClient(uri)

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], key)}

    wall = history("federation/round_duration_s")
    steps = sorted(wall)
    per_site = []  # site -> round -> train_seconds + eval_seconds
    for s in sites:
        train, evaluated = history(f"{s}/train_seconds"), history(f"{s}/eval_seconds")
        per_site.append({k: train.get(k, 0.0) + evaluated.get(k, 0.0) for k in steps})
    sent = {s: [v for _, v in sorted(history(f"{s}/update_bytes").items())] for s in sites}
    return FedResult(
        strategy,
        {s: {m: summary["sites"][s].get(m, float("nan")) for m in METRICS} for s in sites},
        {m: summary["aggregate"].get(m, float("nan")) for m in METRICS},
        [wall[k] for k in steps],
        [sum(site[k] for site in per_site) for k in steps],
        [max(site[k] for site in per_site) for k in steps],
        sent,
        seconds,
    )


# ---------------------------------------------------------------- tables

@dataclass
class Bench:
    sites: dict[str, RadiologySite]
    settings: RunSettings
    rounds: int
    epochs: int  # central epochs = rounds x local epochs
    cold: DecodePass
    warm: DecodePass
    pooled: Central
    alone: Central
    federated: list[FedResult]
    raw_bytes: int  # parameters x 4
    num_tensors: int

    @property
    def names(self) -> list[str]:
        return list(self.sites)

    def mean(self, per_site: dict[str, dict[str, float]], metric: str) -> float:
        return statistics.fmean(per_site[s][metric] for s in self.names)

    def weighted(self, per_site: dict[str, dict[str, float]], metric: str) -> float:
        """Weighted by test images, as Flower aggregates the sites' metrics."""
        n = {s: len(site.test) for s, site in self.sites.items()}
        return sum(per_site[s][metric] * n[s] for s in self.names) / sum(n.values())

    def ok(self) -> list[FedResult]:
        return [f for f in self.federated if not f.error]


def _f(value: float, digits: int = 3) -> str:
    return "–" if value != value else f"{value:.{digits}f}"


def decode_table(b: Bench) -> Table:
    table = Table(title=f"Decoding: load_radiology_site, {N_SITES} sites, {IMAGE_SIZE}px, fresh process each",
                  title_justify="left")
    for name in ("cache", "images", "files", "load s", "img/s", "pixel_array reads", "Σ site.decoded", "process s"):
        table.add_column(name, justify="left" if name == "cache" else "right")
    for p in (b.cold, b.warm):
        table.add_row(p.label, str(p.images), str(p.files), _f(p.seconds, 2), _f(p.rate, 0), str(p.decode_count),
                      str(p.site_decoded), _f(p.process_seconds, 1))
    table.caption = f"warm / cold speed-up ×{b.warm.rate / b.cold.rate:.1f} (load s only; process s includes imports)"
    return table


def metric_table(b: Bench, metric: str) -> Table:
    """Methods (rows) side by side on the same sites' test splits (columns)."""
    title = {"auc": "AUC (one-vs-rest, macro)", "kappa": "Quadratic weighted kappa"}[metric]
    table = Table(title=f"{title}, test splits — KL grade, {MODEL}", title_justify="left")
    table.add_column("method")
    for s in b.names:
        table.add_column(f"{s}\nn={len(b.sites[s].test)}", justify="right")
    table.add_column("mean", justify="right", style="bold")
    table.add_column("weighted", justify="right")
    rows = [(f"pooled ({b.epochs} ep)", b.pooled.scores, b.weighted(b.pooled.scores, metric)),
            (f"site alone ({b.epochs} ep)", b.alone.scores, b.weighted(b.alone.scores, metric))]
    rows += [(f"{f.strategy} ({b.rounds} r × {b.settings.local_epochs} ep)", f.scores, f.aggregate[metric])
             for f in b.ok()]
    for label, per_site, weighted in rows:
        table.add_row(label, *(_f(per_site[s][metric]) for s in b.names), _f(b.mean(per_site, metric)), _f(weighted))
    for f in b.federated:
        if f.error:
            table.add_row(f.strategy, "[red]failed[/]", *([""] * (len(b.names) + 1)))
    return table


def overhead(f: FedResult) -> tuple[float, float]:
    """Mean round wall time over mean local compute: summed over sites, and of the slowest site."""
    wall = statistics.fmean(f.round_wall)
    return wall / statistics.fmean(f.compute_sum), wall / statistics.fmean(f.compute_max)


def reload_seconds(b: Bench) -> float:
    """Each site reads its folder (warm cache) for train and again for evaluate: twice a round."""
    return 2 * b.warm.seconds


def timing_table(b: Bench) -> Table:
    table = Table(title="Round time vs local compute (train_seconds + eval_seconds)", title_justify="left")
    for name in ("strategy", "round wall s", "compute s\nΣ sites", "compute s\nmax site", "overhead\n× Σ",
                 "overhead\n× max", "data reload s\nΣ sites (est.)", "run wall s", "outside\nrounds s"):
        table.add_column(name, justify="left" if name == "strategy" else "right")
    for f in b.federated:
        if f.error:
            table.add_row(f.strategy, "[red]failed[/]", *([""] * 7))
            continue
        ratio_sum, ratio_max = overhead(f)
        table.add_row(f.strategy, _f(statistics.fmean(f.round_wall), 2), _f(statistics.fmean(f.compute_sum), 2),
                      _f(statistics.fmean(f.compute_max), 2), _f(ratio_sum, 2), _f(ratio_max, 1),
                      _f(reload_seconds(b), 2), _f(f.run_seconds, 1), _f(f.run_seconds - sum(f.round_wall), 1))
    table.caption = "data reload: 2 × the warm decoding pass; it happens inside the round but outside compute"
    return table


def sent_per_round(f: FedResult) -> dict[str, float]:
    return {s: statistics.fmean(v) for s, v in f.update_bytes.items() if v}


def bytes_table(b: Bench) -> Table:
    table = Table(title=f"Bytes sent per round per site (update_bytes) vs raw float32 "
                        f"({b.raw_bytes // 4:,} parameters × 4 = {b.raw_bytes:,} B, {b.num_tensors} tensors)",
                  title_justify="left")
    table.add_column("strategy")
    for s in b.names:
        table.add_column(s, justify="right")
    table.add_column("ratio", justify="right", style="bold")
    table.add_column("Σ sites / round", justify="right")
    for f in b.ok():
        sent = sent_per_round(f)
        ratios = [v / b.raw_bytes for v in sent.values()]
        ratio = _f(min(ratios), 4) if max(ratios) == min(ratios) else f"{min(ratios):.4f}–{max(ratios):.4f}"
        table.add_row(f.strategy, *(f"{sent.get(s, float('nan')):,.0f}" for s in b.names), ratio,
                      f"{sum(sent.values()) / 1e6:.2f} MB")
    table.caption = "uplink only (train replies); the server also sends the model to every site for train and evaluate"
    return table


def key_figures(b: Bench, seed: int) -> str:
    """Plain text, no markup, to paste into a note."""
    images = sum(len(s.train) + len(s.test) for s in b.sites.values())
    s = b.settings

    def both(per_site) -> str:
        return f"AUC {_f(b.mean(per_site, 'auc'))} kappa {_f(b.mean(per_site, 'kappa'))}"

    lines = [
        f"Key figures (radiology demo, {N_SITES} regions, {images} images, {TARGET}, {MODEL} {IMAGE_SIZE}px; "
        f"lr {s.lr:g}, batch {s.batch_size}; means over sites' test splits; seed {seed})",
        f"  decoding: cold {b.cold.rate:.0f} img/s ({b.cold.decode_count} decodes), warm {b.warm.rate:.0f} img/s "
        f"({b.warm.decode_count} decodes) → ×{b.warm.rate / b.cold.rate:.1f}",
        f"  pooled ({b.epochs} ep)     {both(b.pooled.scores)}  (trained in {b.pooled.seconds:.0f} s)",
        f"  site alone ({b.epochs} ep) {both(b.alone.scores)}  (worst kappa "
        f"{min(v['kappa'] for v in b.alone.scores.values()):.3f}; {b.alone.seconds:.0f} s for all sites)",
    ]
    for f in b.federated:
        if f.error:
            lines.append(f"  {f.strategy:<10} FAILED: {f.error}")
            continue
        ratio_sum, ratio_max = overhead(f)
        sent = sent_per_round(f)
        lines.append(f"  {f.strategy:<10} {both(f.scores)} (weighted AUC {_f(f.aggregate['auc'])} kappa "
                     f"{_f(f.aggregate['kappa'])}), {b.rounds} rounds × {s.local_epochs} ep")
        lines.append(f"  {'':<10} round {statistics.fmean(f.round_wall):.2f} s vs compute "
                     f"{statistics.fmean(f.compute_sum):.2f} s Σ sites → overhead ×{ratio_sum:.2f} "
                     f"(×{ratio_max:.1f} vs slowest site); run {f.run_seconds:.0f} s, "
                     f"{f.run_seconds - sum(f.round_wall):.0f} s of it outside rounds")
        lines.append(f"  {'':<10} update {statistics.fmean(sent.values()):,.0f} B/site/round = "
                     f"×{statistics.fmean(sent.values()) / b.raw_bytes:.4f} raw float32 ({b.raw_bytes:,} B)")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main(
    rounds: int = typer.Option(5, help="Federated rounds per run (central models get rounds × local-epochs epochs)."),
    seed: int = typer.Option(42, help="Demo data, train/test splits and training seed."),
    strategies: str = typer.Option(",".join(DEFAULT_STRATEGIES), help="Comma list of Flower strategies."),
    quick: bool = typer.Option(False, "--quick", help=f"2 rounds, {'+'.join(QUICK_STRATEGIES)} only."),
) -> None:
    """Decoding speed, pooled vs site-alone vs federated knee-grading CNNs, Flower's overhead and bytes."""
    chosen = list(QUICK_STRATEGIES) if quick else [s.strip() for s in strategies.split(",") if s.strip()]
    rounds = 2 if quick else rounds
    for bad in [s for s in chosen if s not in STRATEGIES]:
        raise typer.BadParameter(f"unknown strategy {bad!r}")
    torch.set_num_threads(1)  # as on a node; leaves the other core to the federation's neighbours
    settings = app_settings(seed)
    epochs = rounds * settings.local_epochs

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fedhosp-bench-rad-") as tmp_name:
        tmp = Path(tmp_name)
        env, uri = runner.isolated_env(tmp, BENCH_PORTS)
        root = tmp / "data"
        write_radiology_demo(root, N_SITES, seed)
        cache = Path(env["FEDHOSP_HOME"]) / "cache" / "radiology"  # where the nodes look
        cold = decode_pass("cold (empty)", root, cache, seed)
        warm = decode_pass("warm", root, cache, seed)
        console.log(f"decoding: cold {cold.rate:.0f} img/s, warm {warm.rate:.0f} img/s")

        folders = sorted(p for p in root.iterdir() if p.is_dir())
        sites = {f.name: load_radiology_site(f, f.name, image_size=IMAGE_SIZE, seed=seed, target=TARGET,
                                             cache_dir=cache) for f in folders}
        pooled = pooled_fit(sites, settings, epochs)
        console.log(f"pooled: {epochs} epochs in {pooled.seconds:.0f} s")
        alone = local_fits(sites, settings, epochs)
        console.log(f"site alone: {len(sites)} × {epochs} epochs in {alone.seconds:.0f} s")
        model = build_model("radiology", MODEL, target=TARGET, image_size=IMAGE_SIZE)
        bench = Bench(sites, settings, rounds, epochs, cold, warm, pooled, alone, [],
                      4 * sum(p.numel() for p in model.parameters()), len(model.state_dict()))

        if chosen:
            test_sizes = {name: len(site.test) for name, site in sites.items()}
            with runner.local_superlink(env):
                for strategy in chosen:
                    f = federated_run(env, uri, root, test_sizes, strategy, rounds, seed)
                    bench.federated.append(f)
                    state = f"[red]FAILED[/] {f.error}" if f.error else f"mean AUC {bench.mean(f.scores, 'auc'):.3f}"
                    console.log(f"{strategy}: {rounds} rounds in {f.run_seconds:.0f} s, {state}")

    console.print()
    tables = [decode_table(bench), metric_table(bench, "auc"), metric_table(bench, "kappa")]
    if bench.federated:
        tables.append(timing_table(bench))
    if bench.ok():
        tables.append(bytes_table(bench))
    for table in tables:
        console.print(table)
    console.print()
    print(key_figures(bench, seed))
    print(f"nodes and central fits: {hardware.describe()}")
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores; 1-min load average "
          f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end: timings are shared-machine timings)")
    if any(f.error for f in bench.federated):
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
