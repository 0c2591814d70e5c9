"""The coordinator's ServerApp: discover sites, build the model, run Flower's strategy, track, save.

Everything the run does is also written, as it happens, to the coordinator's
signed ledger (``$FEDHOSP_HOME/ledgers/run-<flwr run id>.jsonl``), and after
every round a checkpoint lets a killed run continue (run-config ``resume-from``).
"""

from __future__ import annotations

import json
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from models.builders import model_hash
from models.home import fedhosp_home
from models.metrics import PRIMARY
from server import checkpoint as ckpt
from server import progress
from server.ledgers import failure_recorded, open_ledger
from server.round_report import SiteRound
from server.settings import RunSettings
from server.sites import FederationError, discover_sites
from server.strategy import build_strategy, wrapped
from server.tracking import Tracker, checkpoint_of_run

app = ServerApp()


def log_summary(summary: dict) -> None:
    """The run's last log line, which ``fedhosp run`` prints from (server/summary.py:summary_from_log).

    Called only after the MLflow run was closed as FINISHED, so the line says so.
    """
    log(INFO, "fedhosp summary: %s", json.dumps({**summary, "mlflow_status": "FINISHED"}))


def find_checkpoint(settings: RunSettings) -> ckpt.Checkpoint | None:
    """``resume-from``: a checkpoint file, or the MLflow run id whose checkpoint to continue."""
    if not settings.resume_from:
        return None
    path = Path(settings.resume_from).expanduser()
    if not path.is_file():
        path = Path(checkpoint_of_run(settings, settings.resume_from))
    checkpoint = ckpt.load(path)
    now = settings.as_params()
    changed = sorted(k for k, v in checkpoint.run_config.items() if k != "resume-from" and now.get(k) != v)
    if changed:  # a different run config would not continue the same run
        raise FederationError(f"resume-from: the run config differs from the checkpointed run in {changed}")
    return checkpoint


def validate(grid: Grid, context: Context, settings: RunSettings) -> None:
    """``mode = validate | cross-site`` (server/validate.py), recorded in the same kind of signed ledger."""
    from server.validate import run_validation  # the report's matplotlib and SciPy: a training run never pays for them

    summary = run_validation(grid, context, settings, open_ledger(context.run_id))
    log(INFO, "fedhosp validation: %s", json.dumps({k: summary[k] for k in ("verdict", "report", "drift")}))
    log_summary(summary)


def analyse(grid: Grid, context: Context, settings: RunSettings) -> None:
    """``mode = analyse`` (server/analyse.py): the treatment's effect, overall and per subgroup."""
    from server.analyse import run_analysis  # SciPy, statsmodels, the report: a training run never pays for them

    summary = run_analysis(grid, context, settings, open_ledger(context.run_id))
    log(INFO, "fedhosp analysis: %s", summary["sentence"])
    log_summary(summary)


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    if settings.mode == "analyse":
        analyse(grid, context, settings)
        return
    if settings.mode != "train":
        validate(grid, context, settings)
        return
    resume = find_checkpoint(settings)
    original_run = resume.flwr_run_id if resume else context.run_id
    ledger = open_ledger(context.run_id, Path(resume.ledger_path) if resume else None)
    with failure_recorded(ledger, context.run_id):
        sites, refused = discover_sites(grid, settings.min_nodes, settings.round_timeout, settings.site_check_config())
        inner = build_strategy(settings, len(sites), len(sites) + len(refused))
    for _, reason in refused.values():
        log(INFO, "fedhosp: %s", reason)
    budget_warnings = [w for s in sites.values() if (w := s.budget_warning(settings.num_server_rounds))]
    for warning in budget_warnings:
        log(WARNING, "fedhosp: %s", warning)
    features = list(next(iter(sites.values())).features)
    log(INFO, "fedhosp: %d sites: %s", len(sites), ", ".join(sorted(s.name for s in sites.values())))
    progress.emit("sites", sites=len(sites), task=settings.task, rounds=settings.num_server_rounds,
                  warnings=budget_warnings)
    model = settings.build_model(len(features))
    offset = 0
    if resume:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in resume.arrays.items()})
        offset = resume.server_round
        ckpt.restore_strategy(inner, resume.strategy_state)
        ledger.append("run-resumed", {"flwr_run_id": context.run_id, "after_round": offset,
                                      "global_model_hash": model_hash(model.state_dict())})
    else:
        run = grid.run
        ledger.append("run-start", {
            "run_config": settings.as_params(redact_paths=True), "strategy": settings.strategy,
            "app": {"fab_id": run.fab_id, "fab_version": run.fab_version, "fab_hash": run.fab_hash},
            "initial_model_hash": model_hash(model.state_dict()),
            "sites": {s.name: {"num_train": s.num_train, "num_test": s.num_test, "skipped": s.skipped_rows,
                               **({"privacy": s.privacy} if s.privacy else {})} for s in sites.values()},
            "budget_warnings": budget_warnings,
            "refused": {site: reason for site, reason in refused.values()},
        })
    if offset >= settings.num_server_rounds:
        raise FederationError(f"the checkpoint is at round {offset}; num-server-rounds is {settings.num_server_rounds}")

    train_config = ConfigRecord({
        "lr": settings.lr, "local-epochs": settings.local_epochs, "local-steps": settings.local_steps,
        "batch-size": settings.batch_size, "seed": settings.seed, "run-key": str(original_run),
        **settings.privacy_config(),
    })
    checkpoint_path = fedhosp_home() / "checkpoints" / f"run-{original_run}.npz"
    with Tracker(settings, context.run_id, sites, ledger, resume_run_id=resume.mlflow_run_id if resume else "") as tracker:

        def on_round(r: SiteRound, arrays: ArrayRecord) -> None:
            # MLflow first, then the checkpoint: a coordinator killed between the two replays this round when
            # resumed, and the tracker skips the round MLflow already has; the other order loses its metrics
            tracker.log_round(r)
            ckpt.save(checkpoint_path, ckpt.Checkpoint(
                r.server_round, {k: a.numpy() for k, a in arrays.items()}, ckpt.strategy_state(inner),
                settings.as_params(), tracker.run_id, str(ledger.path), original_run))
            tracker.checkpointed(checkpoint_path)
            metric = PRIMARY[settings.outcome]
            progress.emit("round", round=r.server_round, rounds=settings.num_server_rounds, answered=len(r.train),
                          sampled=len(set(r.train) | set(r.failures) | set(r.rejected)), failed=sorted(r.failures),
                          metric=metric, value=r.evaluate_aggregate.get(metric), skipped=bool(r.skipped),
                          epsilon=r.epsilon_max)

        names = {**{n: site for n, (site, _) in refused.items()}, **{n: s.name for n, s in sites.items()}}
        strategy = wrapped(inner, settings, names, {s.name: s.num_train for s in sites.values()}, ledger, on_round,
                           round_offset=offset, context=context)
        with failure_recorded(ledger, context.run_id):
            start = dict(timeout=settings.round_timeout, train_config=train_config, evaluate_config=ConfigRecord({}))
            arrays = ArrayRecord(model.state_dict())
            if settings.strategy == "newton":  # a round at a time: the exact fit stops once it has converged
                for done in range(settings.num_server_rounds - offset):
                    strategy.offset = offset + done
                    result = strategy.start(grid, arrays, num_rounds=1, **start)
                    arrays = arrays if result.arrays is None else result.arrays  # None: the round was skipped
                    if inner.converged:
                        log(INFO, "fedhosp: the Newton fit converged after %d rounds", offset + done + 1)
                        break
            else:
                result = strategy.start(grid, arrays, num_rounds=settings.num_server_rounds - offset, **start)
                arrays = arrays if result.arrays is None else result.arrays  # None: no round aggregated
            if not resume and all(r.skipped for r in tracker.rounds):
                raise FederationError("no round produced an aggregated model (see failures/ and rejected/ in MLflow)")
        model.load_state_dict(arrays.to_torch_state_dict())
        summary = tracker.finish(model, features)
        ledger.append("run-end", {"final_model_hash": summary["model_hash"], "mlflow_run_id": summary["mlflow_run_id"],
                                  "registered_model": summary["registered_model"], "rounds": summary["rounds"]})
        summary["ledger"] = str(ledger.path)
        summary["ledger_head"] = ledger.head
        tracker.log_ledger(final=True)
        tracker.log_summary(summary)
    log_summary(summary)
