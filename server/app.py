"""The coordinator's ServerApp: discover sites, build the model, run Flower's strategy, track, save."""

from __future__ import annotations

import json
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from server.settings import RunSettings
from server.sites import FederationError, discover_sites
from server.strategy import ReportingStrategy, build_strategy
from server.tracking import Tracker

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(dict(context.run_config))
    sites = discover_sites(grid, settings.min_nodes, settings.round_timeout)
    features = list(next(iter(sites.values())).features)
    log(INFO, "fedhosp: %d sites: %s", len(sites), ", ".join(sorted(s.name for s in sites.values())))
    model = settings.build_model(len(features))

    train_config = ConfigRecord({
        "lr": settings.lr, "local-epochs": settings.local_epochs, "local-steps": settings.local_steps,
        "batch-size": settings.batch_size, "seed": settings.seed,
    })
    with Tracker(settings, context.run_id, sites) as tracker:
        strategy = ReportingStrategy(
            build_strategy(settings, len(sites)), {n: s.name for n, s in sites.items()}, tracker.log_round
        )
        result = strategy.start(
            grid, ArrayRecord(model.state_dict()), num_rounds=settings.num_server_rounds,
            timeout=settings.round_timeout, train_config=train_config, evaluate_config=ConfigRecord({}),
        )
        if not result.train_metrics_clientapp:
            raise FederationError("no round produced an aggregated model: every site failed (see failures/ in MLflow)")
        model.load_state_dict(result.arrays.to_torch_state_dict())
        summary = tracker.finish(model, features, settings.input_example(len(features)))
    log(INFO, "fedhosp summary: %s", json.dumps(summary))
