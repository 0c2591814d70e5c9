"""Validate and cross-site modes: test a model on every region's patients before it is used, and keep checking it.

``mode = "validate"`` sends one model (``model-uri``: the registry, an MLflow
run, or a file a vendor delivered) to every site; each site evaluates it on its
own test split and returns aggregates only (client/validation.py). The coordinator
judges them against the acceptance criteria written down in advance
(server/criteria.py), compares with the previous validation of the same
weights (drift), writes the HTML report, logs everything to MLflow and tags the
registered model version with the verdict.

``mode = "cross-site"`` first has every site train a model on its own data
alone, then evaluates each of those (and the global model, when ``model-uri``
names one) at every site: the matrix shows which sites' models generalise.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from models import metrics, wire
from models.ledger import Ledger
from models.home import fedhosp_home
from models.builders import model_hash
from server import criteria as acceptance
from server import progress
from server.report import write_report
from server.settings import RunSettings
from server.ledgers import failure_recorded
from server.sites import FederationError, SiteInfo, discover_sites, exchange
from server.registry import download_model, tag_validation_verdict
from server.tracking import ValidationTracker, tracking_uri
from server.update_checks import structural_problem

VALIDATE = f"{MessageType.EVALUATE}.validate"


@dataclass(frozen=True)
class LoadedModel:
    uri: str
    spec: dict
    state: dict[str, torch.Tensor]
    hash: str
    registry: tuple[str, str] | None  # (name, version) when the model came from the registry

    @property
    def registered(self) -> str | None:
        return f"models:/{self.registry[0]}/{self.registry[1]}" if self.registry else None


def load_model(uri: str, settings: RunSettings, run_config: dict) -> LoadedModel:
    """A fedhosp model: ``model.pt`` (state dict) with ``model.json`` (task, outcome, architecture) beside it."""
    registry = None
    path = Path(uri).expanduser()
    try:
        if uri.startswith(("models:/", "runs:/")):
            folder, registry = download_model(uri, tracking_uri(settings))
            weights = folder / "model.pt"
        elif path.is_dir():
            folder, weights = path, path / "model.pt"
        elif path.is_file():
            folder, weights = path.parent, path
        else:
            raise FederationError(f"model-uri {uri!r}: no such file or folder, and not a models:/ or runs:/ URI")
    except FederationError:
        raise
    except Exception as exc:
        raise FederationError(f"model-uri {uri!r} cannot be resolved: {exc}") from None
    try:
        spec = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise FederationError(f"model-uri {uri!r}: {Path(exc.filename).name} is missing (a fedhosp model is "
                              "model.pt with model.json beside it)") from None
    except Exception as exc:
        raise FederationError(f"model-uri {uri!r}: cannot read the model ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("task", "outcome", "model") if not spec.get(k)]
    if missing:
        raise FederationError(f"model-uri {uri!r}: model.json lacks {missing}")
    digest = model_hash(state)
    if spec.get("model_hash") and spec["model_hash"] != digest:
        raise FederationError(f"model-uri {uri!r}: model.pt does not match the model_hash in model.json "
                              "(altered or mismatched files)")
    try:
        spec = _fitting(spec, state, run_config)
    except RuntimeError as exc:
        raise FederationError(f"model-uri {uri!r}: the weights do not fit a {spec['model']} model for "
                              f"{spec['task']}/{spec['outcome']}: {str(exc).splitlines()[0]}") from None
    return LoadedModel(uri, spec, state, digest, registry)


def _fitting(spec: dict, state: dict, run_config: dict) -> dict:
    """``spec``, or, where the weights fit only the earlier architecture of its name (a small-cnn saved before it
    had BatchNorm), ``spec`` naming that one: the nodes then build what the weights were trained as. Raises the
    first misfit when none fits."""
    from models.radiology import EARLIER

    candidates = [spec]
    if spec["task"] == "radiology" and spec["model"] in EARLIER:
        candidates.append({**spec, "model": EARLIER[spec["model"]]})
    misfit = None
    for candidate in candidates:
        try:
            model_settings(run_config, candidate).build_model(len(spec.get("features") or [])).load_state_dict(state)
            return candidate
        except RuntimeError as exc:
            misfit = misfit or exc
    raise misfit


def model_settings(run_config: dict, spec: dict) -> RunSettings:
    """The run settings with the model's own task, outcome and architecture (and that task's defaults)."""
    outcome = {"endpoint": spec["outcome"]} if spec["task"] == "oncology" else {"target": spec["outcome"]}
    keys = {"task": spec["task"], "model": spec["model"], **outcome}
    if spec.get("image_size"):
        keys["image-size"] = int(spec["image_size"])
    try:
        settings = RunSettings.from_run_config({**run_config, **keys})
    except ValueError as exc:
        raise FederationError(f"model.json describes a model fedhosp cannot build: {exc}") from None
    # a model trained with dp has Opacus' architecture (BatchNorm as GroupNorm); validating it trains nothing
    return dataclasses.replace(settings, dp=bool(spec.get("dp", False)))


def node_config(settings: RunSettings) -> dict:
    """What the nodes need to rebuild the model: names and numbers, never code."""
    return {"mode": settings.mode, "task": settings.task, "endpoint": settings.endpoint, "target": settings.target,
            "model": settings.model, "image-size": settings.image_size, "dp": settings.dp}


def _send(grid: Grid, sites: dict[int, SiteInfo], content: dict[int, RecordDict], message_type: str,
          timeout: float) -> tuple[dict[str, Message], dict[str, str]]:
    """One message per site; replies by site name, and the reason for each site that gave none."""
    replies, reasons, refused = exchange(grid, content, message_type, timeout)
    ok = {sites[node].name: reply for node, reply in replies.items()}
    failed = {sites[node].name: reason if reason.startswith("site ") else f"site {sites[node].name}: {reason}"
              for node, reason in reasons.items()}
    failed.update({sites[node].name: refusal.reason for node, refusal in refused.items()})
    return ok, failed


def train_local_models(grid: Grid, sites: dict[int, SiteInfo], settings: RunSettings, initial: dict,
                       ledger: Ledger) -> tuple[dict[str, ArrayRecord], dict[str, str]]:
    """Each site trains the same initial model on its own data alone, for as many epochs as a federated run."""
    config = ConfigRecord({**node_config(settings), "lr": settings.lr, "batch-size": settings.batch_size,
                           "local-epochs": settings.local_epochs * settings.num_server_rounds,
                           "local-steps": settings.local_steps * settings.num_server_rounds,
                           "seed": settings.seed, "server-round": 1, "proximal-mu": 0.0})
    content = {node: RecordDict({"arrays": ArrayRecord(initial), "config": config}) for node in sites}
    replies, failed = _send(grid, sites, content, MessageType.TRAIN, settings.round_timeout)
    models = {}
    reference = {k: v.numpy() for k, v in initial.items()}
    for name, reply in replies.items():
        problem = structural_problem(reply, reference)  # the same check as a training round's updates
        if problem:
            failed[name] = f"site {name}: its local model was rejected: {problem}"
        else:
            models[name] = reply.content["arrays"]
    ledger.append("local-models", {"received": {n: model_hash({k: a.numpy() for k, a in m.items()})
                                                for n, m in models.items()}, "failed": failed})
    return models, failed


def run_validation(grid: Grid, context: Context, settings: RunSettings, ledger: Ledger) -> dict:
    """The whole validate / cross-site run; returns its summary (also logged to MLflow).

    Any failure is recorded in the ledger as ``run-failed`` with its reason: before
    the MLflow run is opened here, after it inside the tracker (which then logs the ledger).
    """
    with failure_recorded(ledger, context.run_id):
        prepared = _prepare(grid, context, settings, ledger)
    return _evaluate(grid, context, ledger, *prepared)


def _prepare(grid: Grid, context: Context, settings: RunSettings, ledger: Ledger):
    """The model, the sites, the criteria; the run-start record."""
    run_config = dict(context.run_config)
    loaded = load_model(settings.model_uri, settings, run_config) if settings.model_uri else None
    if loaded:
        settings = model_settings(run_config, loaded.spec)
    sites, refused = discover_sites(grid, settings.min_nodes, settings.round_timeout, node_config(settings))
    features = list(next(iter(sites.values())).features)
    if loaded and settings.task == "oncology" and list(loaded.spec.get("features") or []) != features:
        raise FederationError(f"the model was trained on features {loaded.spec.get('features')}; "
                              f"the sites have {features}")
    outcome = settings.outcome
    functions = tuple(metrics.metric_functions(outcome, 0.5))
    crit = acceptance.load_criteria(settings.criteria, outcome, functions)
    threshold = float(loaded.spec.get("threshold", 0.5)) if loaded else 0.5
    ledger.append("run-start", {
        "mode": settings.mode, "run_config": settings.as_params(redact_paths=True),
        "model_uri": settings.model_uri, "model_hash": loaded.hash if loaded else None, "threshold": threshold,
        "criteria": crit.as_dict(), "app": {"fab_hash": grid.run.fab_hash},
        "sites": {s.name: {"num_test": s.num_test} for s in sites.values()},
        "refused": {site: reason for site, reason in refused.values()},
    })
    names = sorted(s.name for s in sites.values())
    log(INFO, "fedhosp: %s of %s at %d sites: %s", settings.mode, settings.model_uri or "site models", len(sites),
        ", ".join(names))
    progress.emit("sites", sites=len(sites), task=settings.task, mode=settings.mode)
    return settings, loaded, sites, refused, features, crit, threshold, functions


def _evaluate(grid: Grid, context: Context, ledger: Ledger, settings: RunSettings, loaded: LoadedModel | None,
              sites: dict[int, SiteInfo], refused: dict, features: list[str], crit: acceptance.Criteria,
              threshold: float, functions: tuple[str, ...]) -> dict:
    """Train the site models (cross-site), send the models out, judge, report, track."""
    outcome = settings.outcome
    with ValidationTracker(settings, context.run_id, loaded.hash if loaded else "", settings.model_uri,
                           ledger) as tracker:
        with failure_recorded(ledger, context.run_id):
            records: dict[str, ArrayRecord] = {}
            failed_training: dict[str, str] = {}
            if loaded:
                records["arrays" if settings.mode == "validate" else "model/global"] = ArrayRecord(loaded.state)
            if settings.mode == "cross-site":
                initial = settings.build_model(len(features)).state_dict()
                local, failed_training = train_local_models(grid, sites, settings, initial, ledger)
                records.update({f"model/{name}": local[name] for name in sorted(local)})
            config = ConfigRecord({**node_config(settings), "bootstrap-samples": settings.bootstrap_samples,
                                   "min-cell": settings.min_cell, "threshold": threshold, "seed": settings.seed})
            content = {node: RecordDict({**records, "config": config}) for node in sites}
            progress.emit("validation", sites=len(sites), models=len(records))
            replies, failed = _send(grid, sites, content, VALIDATE, settings.round_timeout)
            result = _result(settings, loaded, crit, threshold, replies, failed, refused, records, failed_training,
                             functions, context.run_id, tracker.run_id)
            acceptance.apply_verdicts(crit, result)
            previous = tracker.previous() if settings.mode == "validate" else None
            result["drift"] = {"previous_mlflow_run_id": previous["mlflow_run_id"] if previous else None,
                               "flags": acceptance.drift(crit, previous, result)}
            for flag in result["drift"]["flags"]:
                log(INFO, "fedhosp: %s", flag)
            report = write_report(result, fedhosp_home() / "reports" / f"{settings.mode}-flwr-{context.run_id}.html")
            ledger.append("validation-result", {
                "verdict": result["verdict"], "reasons": result["reasons"], "drift": result["drift"]["flags"],
                "sites": {n: {k: s.get(k) for k in ("status", "error", "n", "metrics", "subgroups", "reliability",
                                                    "verdict")}
                          for n, s in result["sites"].items()},
                "cross_site": result["cross_site"], "report_sha256": _sha256(report)})
            report_uri = tracker.log(result, report)
            if loaded and loaded.registry and settings.mode == "validate":
                tag_validation_verdict(tracker.client, loaded.registry, result, report_uri, report, tracker.run_id)
        summary = {
            "mode": settings.mode, "flwr_run_id": context.run_id, "mlflow_run_id": tracker.run_id,
            "tracking_uri": tracker.uri, "experiment": settings.mlflow_experiment, "task": settings.task,
            "outcome": outcome, "model_uri": settings.model_uri, "model_hash": loaded.hash if loaded else None,
            "registered_model": loaded.registered if loaded else None,
            "criteria": crit.name, "verdict": result["verdict"], "reasons": result["reasons"],
            "metrics": result["metrics"], "report": str(report), "report_uri": report_uri,
            "drift": result["drift"]["flags"],
            "sites": {n: {"verdict": s["verdict"], "reasons": s["reasons"], "n": s.get("n"),
                          "metrics": s.get("metrics", {}), "error": s.get("error")} for n, s in result["sites"].items()},
            "cross_site": result["cross_site"],
        }
        ledger.append("run-end", {"verdict": result["verdict"], "mlflow_run_id": tracker.run_id,
                                  "report": report.name})
        summary["ledger"], summary["ledger_head"] = str(ledger.path), ledger.head
        tracker.log_ledger()
        tracker.log_summary(summary)
    return summary


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _result(settings: RunSettings, loaded: LoadedModel | None, crit: acceptance.Criteria, threshold: float,
            replies: dict[str, Message], failed: dict[str, str], refused: dict, records: dict,
            failed_training: dict[str, str], functions: tuple[str, ...], flwr_run_id: int, mlflow_run_id: str) -> dict:
    """The validation result in the shape the report, MLflow and the ledger share."""
    names = sorted(set(replies) | set(failed) | {site for site, _ in refused.values()})
    labels = ["global" if name == "model/global" else name.removeprefix("model/") for name in records if name != "arrays"]
    per_model: dict[str, dict[str, dict]] = {label: {} for label in labels}
    sites: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for name in names:
        if name in replies:
            flat = dict(replies[name].content["metrics"])
            if "arrays" in records:
                sites[name] = {"status": "ok", "error": None, **wire.unflatten(flat)}
            seconds[name] = float(flat.get("validate_seconds", float("nan")))
            for label in labels:
                if f"{label}::n" in flat:
                    per_model[label][name] = wire.unflatten(flat, f"{label}::")
        else:
            reason = failed.get(name) or next(r for s, r in refused.values() if s == name)
            sites[name] = {"status": "failed", "error": reason}
    if "arrays" not in records:  # cross-site: the site table shows the global model, else each site's own
        for name in names:
            if name in sites:
                continue
            figures = per_model.get("global" if loaded else name, {}).get(name)
            error = failed_training.get(name) if not loaded else None
            sites[name] = ({"status": "ok", "error": None, **figures} if figures else
                           {"status": "failed", "error": error or "no result for this site"})
    for name, value in seconds.items():
        sites[name]["seconds"] = value  # the site's compute for all models and resamples
    cross = None
    if settings.mode == "cross-site":
        primary = metrics.PRIMARY[settings.outcome]
        cross = {"metric": primary, "models": labels, "sites": names,
                 "matrix": {label: {site: figures["metrics"].get(primary) for site, figures in row.items()}
                            for label, row in per_model.items()},
                 "failed_training": failed_training}
    subject = settings.model_uri or "each site's own model"
    return {
        "mode": settings.mode,
        "title": f"{'Validation' if settings.mode == 'validate' else 'Cross-site evaluation'} of {subject}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "flwr_run_id": flwr_run_id, "mlflow_run_id": mlflow_run_id,
        "model": {"uri": settings.model_uri, "hash": loaded.hash if loaded else None, "task": settings.task,
                  "outcome": settings.outcome, "model": settings.model, "threshold": threshold,
                  "registered": loaded.registered if loaded else None,
                  "privacy": (loaded.spec.get("privacy") or {}) if loaded else {}},
        "criteria": crit.as_dict(), "min_cell": settings.min_cell, "bootstrap_samples": settings.bootstrap_samples,
        "confidence": metrics.CONFIDENCE, "metrics": list(functions), "sites": sites, "cross_site": cross,
    }
