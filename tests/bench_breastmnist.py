"""Benchmark: the radiology recipe on real images — BreastMNIST breast ultrasound as DICOM at 3 sites.

The synthetic knee demo is too easy (pooled AUC 1.0) to tell a good recipe from
a poor one. BreastMNIST (MedMNIST v2: 780 real breast-ultrasound images, 28 x 28
grey, label 0 = malignant, 1 = normal/benign; official split train 546, val 78,
test 156) is not: the published centralised ResNet-18 reaches test AUC 0.901,
accuracy 0.863. This script

* writes the images as real DICOM site folders (Ultrasound Image Storage, file
  meta, UIDs, pseudonymous PatientIDs; each site its own encoding: 8-bit
  MONOCHROME2, 12-bit with a rescale slope, 8-bit MONOCHROME1) with
  ``labels.csv`` keyed by ``SOPInstanceUID`` (``label``, ``split``). Train + val
  (624 images) are dealt to the 3 sites at random, stratified by label; each
  site's test split is its stratified third of the official test split, so the
  sites' test splits together are the official 156 test images;
* reads them back through the node's reader (``load_radiology_site``, target
  ``binary``, the cache where the nodes look);
* trains, with the app's radiology defaults (model, image size, rounds, local
  epochs, lr, batch, augmentation; run config + ``TASK_DEFAULTS``), one torch
  thread like a node, the same initial weights:
  - pooled: one model on all sites' training images, rounds x local-epochs epochs
    (the same images and the same number of minibatch steps as the federation),
  - site alone: each site on its own training images, the same epochs,
  - fedavg: a real Flower simulation (``flwr run`` with ``data-root``, through
    ``server.runner``), its final model downloaded from MLflow,
  - fedavg replica (``--replica``): the same rounds in this process (the node's
    ``train_images`` from the global weights, weighted mean by training images,
    as Flower's FedAvg), which ``--sweep`` uses to compare recipes quickly;
* prints AUC and accuracy on each site's test split, and on the official test
  split (all sites' test images together), side by side, with the wall times.

``--sweep`` compares candidate recipes (pooled against the FedAvg replica, over
``--seeds``) instead of running the federation.

Not a pytest test (the suite must pass on a clone of the project alone);
``make bench-breastmnist`` or ``.venv/bin/python tests/bench_breastmnist.py --data ../shared/data/breastmnist.npz``.
The data file is read where it lies, never copied into the project.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import typer
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, UltrasoundImageStorage
from rich.console import Console
from rich.table import Table

from client import hardware
from client.data.dicom import ImageSplit, RadiologySite, load_radiology_site
from client.train import TrainSettings, evaluate_images, train_images
from models.builders import build_model
from server import runner
from server.settings import RunSettings
from server.summary import find_summary

APP_DIR = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "../shared/data/breastmnist.npz"
# Neither Flower's defaults nor another benchmark's ports.
BENCH_PORTS = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39791", "FLWR_LOCAL_CONTROL_API_PORT": "39793"}
TARGET = "binary"
PUBLISHED = {"auc": 0.901, "accuracy": 0.863}  # MedMNIST v2, ResNet-18 (28 px), centralised, official test split
METRICS = ("auc", "accuracy")
OFFICIAL = "official test"  # the union of the sites' test splits: the 156 official test images


@dataclass(frozen=True)
class Scanner:
    """How a site's ultrasound machine stores its images (the reader must make them equal again)."""

    name: str
    code: str
    manufacturer: str
    bits_stored: int  # 8: as delivered; 12: values x 16 with RescaleSlope 1/16
    monochrome1: bool = False  # stored inverted (white = 0)


SITES = (
    Scanner("Nord", "N", "GE Healthcare", 8),
    Scanner("Midt", "M", "Philips", 12),
    Scanner("Syd", "S", "Siemens Healthineers", 8, monochrome1=True),
)

console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200, log_path=False)


# ---------------------------------------------------------------- the site folders

def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: np.asarray(data[k]) for k in data.files}


def _deal(labels: np.ndarray, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices dealt to ``parts`` sites at random, stratified by label (each class split as evenly as it goes)."""
    out: list[list[int]] = [[] for _ in range(parts)]
    offset = 0
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        rng.shuffle(members)
        for k, chunk in enumerate(np.array_split(members, parts)):
            out[(k + offset) % parts].extend(chunk.tolist())
        offset += len(members) % parts  # the larger shares of the next class go to other sites
    return [np.sort(np.array(o, dtype=np.int64)) for o in out]


def _uid(seed: int, *parts: object) -> str:
    name = "/".join(["fedhosp-breastmnist", str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _dicom(scanner: Scanner, image: np.ndarray, index: int, seed: int) -> bytes:
    sop = _uid(seed, scanner.name, "image", index)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundImageStorage, sop
    ds.PatientName = ""
    ds.PatientID = f"{scanner.code}-{index + 1:04d}"  # pseudonymous; BreastMNIST has one image per case
    ds.PatientSex = "F"
    ds.StudyInstanceUID = _uid(seed, scanner.name, "study", index)
    ds.SeriesInstanceUID = _uid(seed, scanner.name, "series", index)
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(index + 1), 1, 1
    ds.Modality = "US"
    ds.BodyPartExamined = "BREAST"
    ds.Manufacturer = scanner.manufacturer
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    pixels = image.astype(np.uint16 if scanner.bits_stored > 8 else np.uint8)
    if scanner.bits_stored > 8:
        pixels = pixels * np.uint16(2 ** (scanner.bits_stored - 8))
    top = 2**scanner.bits_stored - 1
    if scanner.monochrome1:
        pixels = (top - pixels).astype(pixels.dtype)
    ds.set_pixel_data(pixels, "MONOCHROME1" if scanner.monochrome1 else "MONOCHROME2", scanner.bits_stored,
                      generate_instance_uid=False)
    if scanner.bits_stored > 8:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{1 / 2 ** (scanner.bits_stored - 8):g}", "0", "US"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_sites(npz: dict[str, np.ndarray], root: Path, seed: int) -> dict[str, dict[str, int]]:
    """One DICOM site folder per scanner under ``root``; returns the images per site and split."""
    rng = np.random.default_rng(seed)
    images = {"train": np.concatenate([npz["train_images"], npz["val_images"]]), "test": npz["test_images"]}
    labels = {"train": np.concatenate([npz["train_labels"], npz["val_labels"]]).ravel().astype(np.int64),
              "test": npz["test_labels"].ravel().astype(np.int64)}
    shares = {split: _deal(labels[split], len(SITES), rng) for split in ("train", "test")}
    counts: dict[str, dict[str, int]] = {}
    for k, scanner in enumerate(SITES):
        folder = root / scanner.name
        rows = []
        index = 0
        for split in ("train", "test"):
            for i in shares[split][k]:
                data = _dicom(scanner, images[split][i], index, seed)
                path = folder / f"study{index // 50:02d}" / f"US{index:05d}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                rows.append({"SOPInstanceUID": _uid(seed, scanner.name, "image", index),
                             "label": int(labels[split][i]), "split": split})
                index += 1
        pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
        counts[scanner.name] = {split: len(shares[split][k]) for split in ("train", "test")}
    return counts


def load_sites(root: Path, settings: RunSettings, cache: Path) -> dict[str, RadiologySite]:
    return {f.name: load_radiology_site(f, f.name, image_size=settings.image_size, seed=settings.seed,
                                        target=TARGET, cache_dir=cache)
            for f in sorted(p for p in root.iterdir() if p.is_dir())}


# ---------------------------------------------------------------- the recipe and the arms

def app_settings(seed: int, overrides: dict[str, object]) -> RunSettings:
    """The app's run config (pyproject + the task's defaults) for radiology, with this benchmark's target."""
    config = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return RunSettings.from_run_config({**config, "task": "radiology", "target": TARGET, "seed": seed, **overrides})


def pool(splits: list[ImageSplit]) -> ImageSplit:
    return ImageSplit(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]),
                      [v for s in splits for v in s.vendors], np.arange(sum(len(s) for s in splits)))


def new_model(settings: RunSettings) -> torch.nn.Module:
    return build_model("radiology", settings.model, target=TARGET, image_size=settings.image_size)


def train_settings(settings: RunSettings, epochs: int) -> TrainSettings:
    return TrainSettings(local_epochs=epochs, local_steps=settings.local_steps, batch_size=settings.batch_size,
                         lr=settings.lr, seed=settings.seed, device=hardware.resolve({}).device)


def scores(model: torch.nn.Module, sites: dict[str, RadiologySite]) -> dict[str, dict[str, float]]:
    """Each site's test split, and the official test split (all of them together)."""
    device = hardware.resolve({}).device
    out = {name: evaluate_images(model, site.test, TARGET, device) for name, site in sites.items()}
    out[OFFICIAL] = evaluate_images(model, pool([s.test for s in sites.values()]), TARGET, device)
    return {k: {m: v[m] for m in METRICS} for k, v in out.items()}


@dataclass
class Arm:
    label: str
    scores: dict[str, dict[str, float]]  # site (or OFFICIAL) -> metric -> value
    seconds: float  # wall time of the arm (training; the whole flwr run for the federation)
    note: str = ""


def pooled_arm(sites: dict[str, RadiologySite], settings: RunSettings, rounds: int) -> Arm:
    """One model on every site's training images, rounds x local-epochs epochs in one go."""
    model = new_model(settings)
    started = time.perf_counter()
    train_images(model, pool([s.train for s in sites.values()]), train_settings(settings, rounds * settings.local_epochs),
                 0, "pooled")
    return Arm(f"pooled ({rounds * settings.local_epochs} ep)", scores(model, sites), time.perf_counter() - started)


def alone_arm(sites: dict[str, RadiologySite], settings: RunSettings, rounds: int) -> Arm:
    """Each site trains on its own images only, the same epochs; scored on its own test split."""
    out, started = {}, time.perf_counter()
    official = []
    for name, site in sites.items():
        model = new_model(settings)
        train_images(model, site.train, train_settings(settings, rounds * settings.local_epochs), 0, name)
        own = scores(model, {name: site})
        out[name] = own[name]
        official.append(scores(model, sites)[OFFICIAL])
    out[OFFICIAL] = {m: statistics.fmean(o[m] for o in official) for m in METRICS}  # mean of the 3 models
    return Arm(f"site alone ({rounds * settings.local_epochs} ep)", out, time.perf_counter() - started,
               "official test: the mean of the three sites' models")


def fedavg_replica(sites: dict[str, RadiologySite], settings: RunSettings, rounds: int) -> tuple[Arm, dict]:
    """FedAvg in this process: each round every site trains the node's loop from the global weights
    (seeded by seed, round, site as on a node), the weighted mean by training images is the next global model
    (Flower's FedAvg; integer buffers rounded back, as ``ModelDtypes`` does). The same arithmetic as the
    federation, though not bit for bit (the nodes' thread count, Flower's float32 sum in reply order): the
    difference grows through training like a change of seed, so compare its AUCs as one more seed's."""
    model = new_model(settings)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    total = sum(len(s.train) for s in sites.values())
    started = time.perf_counter()
    for server_round in range(1, rounds + 1):
        mean: dict[str, np.ndarray] = {}
        for name, site in sites.items():
            local = new_model(settings)
            local.load_state_dict(state)
            train_images(local, site.train, train_settings(settings, settings.local_epochs), server_round, name)
            weight = len(site.train) / total
            for k, v in local.state_dict().items():
                mean[k] = mean.get(k, 0.0) + weight * v.numpy().astype(np.float64)
        state = {k: torch.from_numpy(np.asarray(np.rint(v) if not state[k].is_floating_point() else v)).to(state[k].dtype)
                 for k, v in mean.items()}
    model.load_state_dict(state)
    return (Arm(f"fedavg replica ({rounds} r × {settings.local_epochs} ep)", scores(model, sites),
                time.perf_counter() - started), state)


@dataclass
class Federation:
    arm: Arm
    nodes: dict[str, dict[str, float]]  # what the nodes reported for the final model on their test splits
    round_wall: list[float]  # federation/round_duration_s per round
    state: dict[str, torch.Tensor] | None  # the final model's weights
    error: str = ""


def federated_arm(env: dict[str, str], uri: str, root: Path, sites: dict[str, RadiologySite], settings: RunSettings,
                  overrides: dict[str, object], rounds: int) -> Federation:
    """A real Flower simulation (FedAvg, the app's defaults but for ``overrides``); the final model from MLflow."""
    import mlflow
    from mlflow.tracking import MlflowClient

    run_config = {"task": "radiology", "target": TARGET, "strategy": "fedavg", "data-root": str(root),
                  "seed": settings.seed, "mlflow-uri": uri, "mlflow-experiment": "bench-breastmnist", **overrides}
    label = f"fedavg, flwr run ({rounds} r × {settings.local_epochs} ep)"
    started = time.perf_counter()
    outcome = runner.flwr_run(APP_DIR, env, run_config, len(sites))
    seconds = time.perf_counter() - started
    summary = find_summary(uri, outcome.run_id) if outcome.ok else None
    if summary is None:
        console.print(f"[red]fedavg: run {outcome.run_id} ended {outcome.status}[/]; last lines of its log:")
        console.out("\n".join(outcome.log.strip().splitlines()[-25:]), highlight=False)
        reason = outcome.reason or (outcome.log.strip().splitlines() or ["no log"])[-1]
        return Federation(Arm(label, {}, seconds), {}, [], None, f"{outcome.status}: {reason}")
    if summary.get("rejected") or summary.get("skipped_rounds") or summary.get("failures"):  # all rounds must count
        return Federation(Arm(label, {}, seconds), {}, [], None,
                          f"rounds skipped {summary.get('skipped_rounds')}, updates rejected {summary.get('rejected')}, "
                          f"failures {summary.get('failures')}")
    folder = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{summary['mlflow_run_id']}/final_model",
                                                 tracking_uri=uri)
    state = torch.load(Path(folder) / "model.pt", weights_only=True)
    model = new_model(settings)
    model.load_state_dict(state)
    history = MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "federation/round_duration_s")
    nodes = {s: {m: float(summary["sites"].get(s, {}).get(m, float("nan"))) for m in METRICS} for s in sites}
    return Federation(Arm(label, scores(model, sites), seconds, "wall time: the whole flwr run"), nodes,
                      [m.value for m in sorted(history, key=lambda m: m.step)], state)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, bool]:
    """The largest difference over the floating-point tensors, and whether the integer buffers (BatchNorm's step
    counters) are equal."""
    floats = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    return floats, all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())


# ---------------------------------------------------------------- tables

def _f(value: float, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def results_table(arms: list[Arm], sites: dict[str, RadiologySite], settings: RunSettings, counts) -> Table:
    table = Table(title=f"BreastMNIST, {len(sites)} sites: test AUC / accuracy — {settings.model} "
                        f"{settings.image_size}px, lr {settings.lr:g}, batch {settings.batch_size}, seed {settings.seed}",
                  title_justify="left")
    table.add_column("arm")
    for s in sites:
        table.add_column(f"{s}\nn={len(sites[s].test)}", justify="right")
    n_official = sum(len(s.test) for s in sites.values())
    table.add_column(f"{OFFICIAL}\nn={n_official}", justify="right", style="bold")
    table.add_column("wall s", justify="right")
    for arm in arms:
        cells = [f"{_f(arm.scores[s]['auc'])} / {_f(arm.scores[s]['accuracy'])}" if s in arm.scores else "–"
                 for s in [*sites, OFFICIAL]]
        table.add_row(arm.label, *cells, _f(arm.seconds, 0))
    table.add_row("published: MedMNIST v2, ResNet-18 (28), centralised", *([""] * len(sites)),
                  f"{PUBLISHED['auc']:.3f} / {PUBLISHED['accuracy']:.3f}", "")
    table.caption = ("site alone: each site's model on its own test split; its official-test figure is the mean of "
                     "the three models. Sites: " + ", ".join(f"{s} {c['train']} train + {c['test']} test"
                                                           for s, c in counts.items()))
    return table


def key_figures(arms: list[Arm], settings: RunSettings, rounds: int, fed: Federation | None, wall: float) -> str:
    """Plain text, no markup, to paste into a note."""
    pooled = next(a for a in arms if a.label.startswith("pooled"))
    lines = [f"Key figures (BreastMNIST, {len(SITES)} sites, target {TARGET}, {settings.model} {settings.image_size}px, "
             f"{rounds} rounds × {settings.local_epochs} local epochs, lr {settings.lr:g}, batch {settings.batch_size}, "
             f"seed {settings.seed}; AUC / accuracy on the official test split)"]
    for arm in arms:
        o = arm.scores.get(OFFICIAL)
        if not o:
            continue
        gap = "" if arm is pooled else f"  (Δ AUC vs pooled {o['auc'] - pooled.scores[OFFICIAL]['auc']:+.3f})"
        lines.append(f"  {arm.label:<40} {_f(o['auc'])} / {_f(o['accuracy'])}  {arm.seconds:.0f} s{gap}")
    lines.append(f"  {'published (ResNet-18, 28 px, centralised)':<40} {PUBLISHED['auc']:.3f} / {PUBLISHED['accuracy']:.3f}")
    if fed is not None and not fed.error:
        differ = max(abs(fed.nodes[s]['auc'] - fed.arm.scores[s]['auc']) for s in fed.nodes)
        lines.append(f"  flwr run: {fed.arm.seconds:.0f} s, rounds {statistics.fmean(fed.round_wall):.1f} s each; "
                     f"the nodes' own AUCs differ from the downloaded model's by {differ:.1e}")
    lines.append(f"  benchmark wall time {wall:.0f} s ({wall / 60:.1f} min) on {os.cpu_count()} cores")
    return "\n".join(lines)


# ---------------------------------------------------------------- sweep

# The recipes ``--sweep`` compares: run-config keys (the app's defaults for the rest). small-cnn-instancenorm is the
# small CNN as it was before this benchmark (MONAI's default InstanceNorm; small-cnn now has BatchNorm).
SWEEP = (
    {"model": "small-cnn-instancenorm", "lr": 0.003},  # the defaults before this benchmark
    {"model": "small-cnn-instancenorm", "lr": 0.001},
    {"lr": 0.003},
    {"lr": 0.001},  # the defaults now
    {"lr": 0.0005},
    {"lr": 0.001, "num-server-rounds": 10, "local-epochs": 1},
    {"lr": 0.001, "image-size": 32},
)


def sweep(root: Path, cache: Path, seeds: list[int], recipes: list[dict[str, object]]) -> Table:
    """Pooled against the FedAvg replica for each recipe, official-test AUC, mean over ``seeds`` (training seeds;
    the sites stay as written)."""
    table = Table(title=f"Recipes: official-test AUC, mean over training seeds {seeds} (min–max)",
                  title_justify="left")
    for name in ("recipe", "pooled", "fedavg replica", "Δ", "s per seed (pooled + replica)"):
        table.add_column(name, justify="left" if name == "recipe" else "right")
    for recipe in recipes:
        pooled, fed, seconds = [], [], 0.0
        for seed in seeds:
            settings = app_settings(seed, recipe)
            sites = load_sites(root, settings, cache)
            rounds = settings.num_server_rounds
            p = pooled_arm(sites, settings, rounds)
            f, _ = fedavg_replica(sites, settings, rounds)
            pooled.append(p.scores[OFFICIAL]["auc"])
            fed.append(f.scores[OFFICIAL]["auc"])
            seconds += p.seconds + f.seconds
        label = " ".join(f"{k}={v}" for k, v in recipe.items())
        console.log(f"{label}: pooled {statistics.fmean(pooled):.3f}, fedavg replica {statistics.fmean(fed):.3f}")
        table.add_row(label, f"{statistics.fmean(pooled):.3f} ({min(pooled):.3f}–{max(pooled):.3f})",
                      f"{statistics.fmean(fed):.3f} ({min(fed):.3f}–{max(fed):.3f})",
                      f"{statistics.fmean(fed) - statistics.fmean(pooled):+.3f}", f"{seconds / len(seeds):.0f}")
    return table


# ---------------------------------------------------------------- main

def resolve_data(data: str) -> Path:
    path = Path(data).expanduser()
    if not path.is_absolute() and not path.exists():
        path = APP_DIR / path  # the default is relative to the project root
    if not path.is_file():
        raise typer.BadParameter(f"{data}: no such file (BreastMNIST from MedMNIST v2, breastmnist.npz)")
    return path


def main(
    data: str = typer.Option(DEFAULT_DATA, help="breastmnist.npz (MedMNIST v2); a relative path is taken from the "
                                                "current folder, else from the project root. Read in place."),
    seed: int = typer.Option(42, help="The sites' split and the training seed."),
    model: str = typer.Option("", help="Override the app's radiology model (small-cnn | densenet121)."),
    image_size: int = typer.Option(0, help="Override the app's image-size (0 = the app's)."),
    rounds: int = typer.Option(0, help="Override num-server-rounds (0 = the app's)."),
    local_epochs: int = typer.Option(0, help="Override local-epochs (0 = the app's)."),
    lr: float = typer.Option(0.0, help="Override lr (0 = the app's radiology default)."),
    federated: bool = typer.Option(True, help="Run the real Flower simulation (--no-federated: central arms only)."),
    replica: bool = typer.Option(False, "--replica", help="Also FedAvg in this process (and its weights against "
                                                          "the Flower run's)."),
    do_sweep: bool = typer.Option(False, "--sweep", help="Compare the SWEEP recipes (pooled vs the FedAvg replica) "
                                                         "over --seeds instead."),
    seeds: str = typer.Option("42,1,2", help="--sweep: training seeds."),
) -> None:
    """BreastMNIST as DICOM at 3 sites: pooled vs site alone vs FedAvg (flwr run), AUC and accuracy side by side."""
    path = resolve_data(data)
    overrides = {k: v for k, v in {"model": model, "image-size": image_size, "num-server-rounds": rounds,
                                   "local-epochs": local_epochs, "lr": lr}.items() if v}
    torch.set_num_threads(1)  # as on a node; leaves the other core to the federation's neighbours
    settings = app_settings(seed, overrides)
    rounds = settings.num_server_rounds
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    fed = None
    with tempfile.TemporaryDirectory(prefix="fedhosp-bench-breastmnist-") as tmp_name:
        tmp = Path(tmp_name)
        env, uri = runner.isolated_env(tmp, BENCH_PORTS)
        root = tmp / "data"
        counts = write_sites(read_npz(path), root, seed)
        cache = Path(env["FEDHOSP_HOME"]) / "cache" / "radiology"  # where the nodes look: the federation starts warm
        sites = load_sites(root, settings, cache)
        console.log(f"{len(sites)} DICOM site folders from {path.name}: {counts} (read in "
                    f"{time.perf_counter() - started:.0f} s)")
        if do_sweep:
            console.print(sweep(root, cache, [int(s) for s in seeds.split(",") if s.strip()],
                                [{**r, **overrides} for r in SWEEP]))
            print(f"(sweep wall time {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores)")
            return
        arms = [pooled_arm(sites, settings, rounds)]
        console.log(f"{arms[-1].label}: {arms[-1].seconds:.0f} s")
        arms.append(alone_arm(sites, settings, rounds))
        console.log(f"{arms[-1].label}: {arms[-1].seconds:.0f} s")
        replica_state = None
        if replica:
            arm, replica_state = fedavg_replica(sites, settings, rounds)
            arms.append(arm)
            console.log(f"{arm.label}: {arm.seconds:.0f} s")
        if federated:
            with runner.local_superlink(env):
                fed = federated_arm(env, uri, root, sites, settings, overrides, rounds)
            if fed.error:
                console.print(f"[red]fedavg FAILED[/] {fed.error}")
            else:
                arms.append(fed.arm)
                console.log(f"{fed.arm.label}: {fed.arm.seconds:.0f} s")
                if replica_state is not None:
                    floats, counters = max_difference(fed.state, replica_state)
                    console.log(f"Flower vs replica: largest |weight difference| {floats:.2e}, step counters "
                                f"{'equal' if counters else 'DIFFER'}")
    wall = time.perf_counter() - started
    console.print()
    console.print(results_table(arms, sites, settings, counts))
    console.print()
    print(key_figures(arms, settings, rounds, fed, wall))
    print(f"nodes and central fits: {hardware.describe()}")
    print(f"(1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end: shared-machine timings)")
    if fed is not None and fed.error:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
