"""The coordinator's ServerApp: discover sites, build the model, run Flower's strategy, track, save.

Everything the run does is also written, as it happens, to the coordinator's
signed ledger (``$FEDHOSP_HOME/ledgers/run-<flwr run id>.jsonl``).
"""

from __future__ import annotations

import json
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from client.ledger import Ledger, load_or_create_key
from client.site import fedhosp_home
from models.registry import model_hash
from server.settings import RunSettings
from server.sites import FederationError, discover_sites
from server.strategy import ReportingStrategy, build_strategy
from server.tracking import Tracker

app = ServerApp()


def coordinator_ledger(run_id: int) -> Ledger:
    """Key: ``$FEDHOSP_HOME/keys/coordinator_ed25519.pem`` (0600, created on first use)."""
    key = load_or_create_key(fedhosp_home() / "keys" / "coordinator_ed25519.pem")
    return Ledger(fedhosp_home() / "ledgers" / f"run-{run_id}.jsonl", key, {"role": "coordinator", "run_id": run_id})


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    ledger = coordinator_ledger(context.run_id)
    try:
        sites, refused = discover_sites(grid, settings.min_nodes, settings.round_timeout)
    except FederationError as exc:
        ledger.append("run-failed", {"reason": str(exc)})
        raise
    for site, reason in refused.values():
        log(INFO, "fedhosp: %s", reason)
    features = list(next(iter(sites.values())).features)
    log(INFO, "fedhosp: %d sites: %s", len(sites), ", ".join(sorted(s.name for s in sites.values())))
    model = settings.build_model(len(features))
    run = grid.run
    ledger.append("run-start", {
        "run_config": settings.as_params(redact_paths=True), "strategy": settings.strategy,
        "app": {"fab_id": run.fab_id, "fab_version": run.fab_version, "fab_hash": run.fab_hash},
        "initial_model_hash": model_hash(model.state_dict()),
        "sites": {s.name: {"num_train": s.num_train, "num_test": s.num_test, "skipped": s.skipped_rows}
                  for s in sites.values()},
        "refused": {site: reason for site, reason in refused.values()},
    })

    train_config = ConfigRecord({
        "lr": settings.lr, "local-epochs": settings.local_epochs, "local-steps": settings.local_steps,
        "batch-size": settings.batch_size, "seed": settings.seed,
    })
    with Tracker(settings, context.run_id, sites, ledger) as tracker:
        names = {**{n: site for n, (site, _) in refused.items()}, **{n: s.name for n, s in sites.items()}}
        strategy = ReportingStrategy(
            build_strategy(settings, len(sites), len(names)), names, tracker.log_round, ledger
        )
        try:
            result = strategy.start(
                grid, ArrayRecord(model.state_dict()), num_rounds=settings.num_server_rounds,
                timeout=settings.round_timeout, train_config=train_config, evaluate_config=ConfigRecord({}),
            )
            if not result.train_metrics_clientapp:
                raise FederationError("no round produced an aggregated model: every site failed (see failures/ in MLflow)")
        except Exception as exc:
            ledger.append("run-failed", {"reason": f"{type(exc).__name__}: {exc}"})
            tracker.log_ledger()
            raise
        model.load_state_dict(result.arrays.to_torch_state_dict())
        summary = tracker.finish(model, features, settings.input_example(len(features)))
        ledger.append("run-end", {"final_model_hash": summary["model_hash"], "mlflow_run_id": summary["mlflow_run_id"],
                                  "registered_model": summary["registered_model"], "rounds": summary["rounds"]})
        summary["ledger"] = str(ledger.path)
        summary["ledger_head"] = ledger.head
        tracker.log_ledger(final=True)
        tracker.log_summary(summary)
    log(INFO, "fedhosp summary: %s", json.dumps(summary))
